"""`kdcache report RUN_DIR... --out DIR`: one table and plots comparing runs (see pipeline/evaluation/report.py)."""

from __future__ import annotations

import click

from pipeline.evaluation.report import ReportConfig
from stages.common import config_options, given, setting, user_errors

R = ReportConfig


@click.command()
@click.argument("run_dirs", nargs=-1, type=click.Path())
@setting(R, "--out", type=click.Path(file_okay=False), show="required",
         help="Report directory or fsspec URL (report.md and PNGs; a previous report there is replaced).")
@setting(R, "--teacher", field="teachers", show="none",
         help="Teacher directories (with their eval/), comma-separated: references in the table and chart, not "
              "ranked among the students.")
@setting(R, "--cache", show="the runs' cache", help="Teacher cache for the entropy / top-K mass histograms.")
@setting(R, "--bins", type=int, help="Histogram bins.")
@config_options
@user_errors("report")
def report(run_dirs, config_file, sets, **opts):
    """Compare training runs (RUN_DIRS, or `runs` in --config): the best student and its margin against the seed
    spread, held-out chart, eval figures, final TAR, throughput, curves and cache histograms."""
    from pipeline.config import resolve
    from pipeline.evaluation.report import build_report, summary_line

    cfg = resolve(ReportConfig, config_file, sets, {**given(opts), "runs": list(run_dirs) or None})
    click.echo(summary_line(build_report(cfg)))
