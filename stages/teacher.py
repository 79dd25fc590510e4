"""`kdcache teacher`: run a teacher once and write the sharded cache (see pipeline/teacher.py)."""

from __future__ import annotations

import click

from stages.common import config_options, user_errors


@click.command()
@click.option("--data", help="A `kdcache prepare` output directory.")
@click.option("--model", help="Teacher: local directory or hub id of a causal LM.")
@click.option("--out", type=click.Path(file_okay=False), help="Cache directory.")
@click.option("--preset", type=click.Choice(["default", "hifi"]), default=None,
              help="Codec preset: default (K=8, about 20 bytes/row) or hifi (K=16); see docs/cache-format.md.")
@click.option("--top-k", type=int, help="Cached support size K (default: the preset's).")
@click.option("--temperatures", help="Comma-separated temperature grid for the log-partition (default 0.5,0.7,1.4,2.0).")
@click.option("--tail-samples", type=int, help="Draws per row from the teacher outside its top-K (default 0: off).")
@click.option("--batch-tokens", type=int, help="Padded tokens per forward pass.")
@click.option("--shard-rows", type=int, help="Target rows per shard (unit of work and restart).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None)
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16"]), default=None)
@click.option("--workers", type=int, help="Run shards on a local Dask cluster of N worker processes.")
@click.option("--scheduler", help="Run shards on an existing Dask cluster at this address.")
@click.option("--threads", type=int, help="Torch threads per process (default: all cores, or cores // workers).")
@click.option("--seed", type=int, help="Seed of the tail sampler.")
@click.option("--overwrite", is_flag=True, default=None, help="Replace a cache made with other settings.")
@config_options
@user_errors("teacher")
def teacher(config_file, sets, **opts):
    """Cache the teacher's top-K log-probs, entropy and log-partition for every target position."""
    from tqdm import tqdm

    from pipeline.config import resolve
    from pipeline.teacher import TeacherConfig, run_teacher

    cfg = resolve(TeacherConfig, config_file, sets, opts)
    bar = None

    def on_plan(summary):  # the rows still to compute are known: a bar with a total has an ETA
        nonlocal bar
        if summary["rows"]:
            bar = tqdm(total=summary["rows"], desc="teacher", unit="row", unit_scale=True, leave=False)

    def on_rows(n):
        if bar is not None:
            bar.update(n)

    try:
        summary = run_teacher(cfg, on_rows=on_rows, on_plan=on_plan)
    finally:
        if bar is not None:
            bar.close()
    if summary["done"] == 0 and summary["skipped"] == summary["shards"]:
        click.echo(f"teacher: {cfg.out} is already complete ({summary['shards']} shards); nothing to do")
        return
    rate = summary["rows"] / summary["seconds"] if summary["seconds"] else 0.0
    click.echo(f"teacher: {summary['done']} shard(s) written, {summary['skipped']} already committed, "
               f"{summary['rows']} rows in {summary['seconds']:.1f}s ({rate:,.0f} rows/s) -> {cfg.out}")
