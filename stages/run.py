"""`kdcache run CONFIG`: prepare, teach, cache, distill, evaluate and report in one command (see pipeline/run.py)."""

from __future__ import annotations

import click

from stages.common import user_errors


@click.command()
@click.argument("config_file", type=click.Path(dir_okay=False))
@click.option("--only", type=click.Choice(["prepare", "teacher", "train", "eval", "report"]), default=None,
              help="Run just this stage.")
@click.option("--from", "start", type=click.Choice(["prepare", "teacher", "train", "eval", "report"]), default=None,
              help="Run this stage and those after it.")
@click.option("--set", "sets", multiple=True, metavar="SECTION.KEY=VALUE", help="Override a config key.")
@user_errors("run")
def run(config_file, only, start, sets):
    """Run the stages a config lists, skipping work already complete for the same settings."""
    import time

    from pipeline.run import Pipeline, load_run_config, select_stages

    t0 = time.perf_counter()
    cfg = load_run_config(config_file, sets)
    stages = select_stages(cfg, only, start)
    Pipeline(cfg, echo=click.echo).run(stages)
    report = f"{cfg.out}/report/report.md"
    tail = f"; report: {report}" if "report" in stages else ""
    click.echo(f"run: {', '.join(stages)} done in {time.perf_counter() - t0:.0f}s{tail}")
