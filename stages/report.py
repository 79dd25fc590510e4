"""`kdcache report RUN_DIR... --out DIR`: one table and plots comparing runs (see pipeline/report.py)."""

from __future__ import annotations

import click

from stages.common import config_options, user_errors


@click.command()
@click.argument("run_dirs", nargs=-1, type=click.Path())
@click.option("--out", type=click.Path(file_okay=False), help="Report directory (report.md and PNGs).")
@click.option("--cache", help="Teacher cache for the entropy / top-K mass histograms (default: the runs' cache).")
@click.option("--bins", type=int, help="Histogram bins (default 50).")
@config_options
@user_errors("report")
def report(run_dirs, config_file, sets, **opts):
    """Compare training runs: eval figures, final TAR, throughput, curves and cache histograms."""
    from pipeline.config import resolve
    from pipeline.report import ReportConfig, build_report, summary_line

    cfg = resolve(ReportConfig, config_file, sets, {**opts, "runs": list(run_dirs) or None})
    click.echo(summary_line(build_report(cfg)))
