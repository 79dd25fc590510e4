"""`kdcache run CONFIG`: prepare, teach, cache, distill, evaluate and report in one command (see pipeline/run.py)."""

from __future__ import annotations

import click

from pipeline.run import STAGES
from stages.common import user_errors


@click.command()
@click.argument("config_path", required=False, type=click.Path(dir_okay=False))
@click.option("--only", type=click.Choice(STAGES), default=None, show_default="every stage the config lists",
              help="Run just this stage.")
@click.option("--from", "start", type=click.Choice(STAGES), default=None, show_default="the first",
              help="Run this stage and those after it.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="YAML merged over CONFIG_PATH section by section (the whole run config when CONFIG_PATH is omitted).")
@click.option("--set", "sets", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override one nested key (repeatable), e.g. students.kd.max_steps=12; beats both files.")
@user_errors("run")
def run(config_path, only, start, config_file, sets):
    """Run the stages a config lists, skipping work already complete for the same settings.

    CONFIG_PATH is the run config; --config FILE is merged over it section by section (or used alone),
    and --set section.key=value (e.g. students.kd.max_steps=12) overrides single keys.
    """
    import time

    from pipeline.run import Pipeline, load_run_config, select_stages

    t0 = time.perf_counter()
    cfg = load_run_config(config_path, sets, override=config_file)
    stages = select_stages(cfg, only, start)
    Pipeline(cfg, echo=click.echo).run(stages)
    report = f"{cfg.out}/report/report.md"
    tail = f"; report: {report}" if "report" in stages else ""
    click.echo(f"run: {', '.join(stages)} done in {time.perf_counter() - t0:.0f}s{tail}")
