"""`kdcache teacher`: run a teacher once and write the sharded cache (see pipeline/teacher/runner.py)."""

from __future__ import annotations

import click

from pipeline.cache.schema import PRESETS
from pipeline.teacher.runner import TeacherConfig
from stages.common import config_options, given, setting, user_errors

T = TeacherConfig


@click.command()
@setting(T, "--data", show="required", help="A `kdcache prepare` output directory.")
@setting(T, "--model", show="required",
         help="Teacher: local directory, .gguf file (pip install 'kdcache[gguf]'), hub id of a causal LM, or a "
              "`train --out URL` run (its final/).")
@setting(T, "--out", type=click.Path(file_okay=False), show="required", help="Cache directory.")
@setting(T, "--revision", show="latest", help="Hub revision of the model to pin (recorded in the cache).")
@setting(T, "--preset", type=click.Choice(list(PRESETS)),
         help="Codec preset: K, precisions and tail draws (default: K = 6 + 4 draws; compact: K = 8, no draws; "
              "hifi: K = 16, finer codes, 8 draws; docs/cache-format.md).")
@setting(T, "--top-k", type=int, help="Cached support size K (0: the preset's).")
@setting(T, "--temperatures", help="Comma-separated temperature grid for the log-partition.")
@setting(T, "--tail-samples", type=int,
         help="Draws per row from the teacher outside its top-K (-1: the preset's; 0: none).")
@setting(T, "--batch-tokens", type=int, help="Padded tokens per forward pass.")
@setting(T, "--shard-rows", type=int, help="Target rows per shard (unit of work and restart).")
@setting(T, "--chunk-rows", type=int, help="Rows per Zarr chunk (the student reads whole chunks).")
@setting(T, "--head-chunk-rows", type=int,
         help="Rows per output-head chunk (memory only; the cache is the same; 0: from the vocabulary size).")
@setting(T, "--device", type=click.Choice(["auto", "cpu", "cuda"]), help="auto: cuda when available.")
@setting(T, "--dtype", type=click.Choice(["auto", "float32", "bfloat16"]),
         help="auto: bfloat16 on GPU, float32 on CPU.")
@setting(T, "--workers", type=int, help="Run shards on a local Dask cluster of N worker processes (0: in this process).")
@setting(T, "--scheduler", show="none: see --workers", help="Run shards on an existing Dask cluster at this address.")
@setting(T, "--threads", type=int, help="Torch threads per process (0: all cores, or cores // workers).")
@setting(T, "--parallel", type=click.Choice(["none", "tp", "device_map"]),
         help="A teacher larger than one GPU: tp = tensor parallel over torchrun's ranks; device_map = its layers "
              "over this process's GPUs.")
@setting(T, "--replica", type=int, help="This launch computes the shards with index % replicas == replica.")
@setting(T, "--replicas", type=int, help="Independent launches (e.g. one torchrun TP group each) sharing the cache.")
@setting(T, "--seed", type=int, help="Seed of the tail sampler.")
@setting(T, "--clevel", type=int, help="zstd compression level of the shards.")
@setting(T, "--overwrite", is_flag=True, help="Replace a cache made with other settings (only the files teacher "
                                              "wrote; anything else refuses).")
@config_options
@user_errors("teacher")
def teacher(config_file, sets, **opts):
    """Cache the teacher's top-K log-probs, entropy and log-partition for every target position."""
    from tqdm import tqdm

    from pipeline.config import resolve
    from pipeline.teacher.runner import run_teacher

    cfg = resolve(TeacherConfig, config_file, sets, given(opts))
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
