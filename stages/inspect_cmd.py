"""`kdcache inspect CACHE [--verify]`: summary of a cache; --verify reads and checks everything."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from pipeline.cache.inspection import InspectConfig
from pipeline.storage import is_url
from stages.common import config_options, given, setting, user_errors

I = InspectConfig  # noqa: E741


@click.command()
@click.argument("cache", required=False, type=click.Path())
@setting(I, "--verify", is_flag=True, help="Read and check every file: metadata and index checksums, every shard "
                                           "(completeness, checksums, chunks), and files the cache does not know.")
@setting(I, "--sample-rows", type=int, help="Rows read for the entropy / top-K-mass statistics.")
@config_options
@user_errors("inspect")
def inspect(cache, config_file, sets, **opts):
    """Summarise a teacher cache (rows, K, bytes/row, statistics, shard status); CACHE or `cache` in --config."""
    from pipeline.cache.inspection import format_summary, inspect_cache, verify_cache
    from pipeline.config import resolve
    from pipeline.ownership import TEACHER, check_records

    cfg = resolve(InspectConfig, config_file, sets, {**given(opts), "cache": cache})
    summary = inspect_cache(cfg)
    click.echo(format_summary(summary))
    if summary.get("unreadable") and not cfg.verify:
        click.echo(f"inspect: {len(summary['unreadable'])} unreadable shard(s) in {cfg.cache}; "
                   "run with --verify for the full list", err=True)
        sys.exit(1)
    if cfg.verify:
        from tqdm import tqdm

        with tqdm(total=summary["shards"], desc="verify", unit="shard", leave=False) as bar:
            problems = verify_cache(cfg.cache, on_shard=lambda i: bar.update(1))
        # The stage's manifest: readable, and every file it records unchanged (files not named above already).
        named = {p.split(":")[0].split(" ")[0] for p in problems}
        if not is_url(cfg.cache):  # a remote cache keeps no manifest: every object is judged by `verify` above
            problems += [p for p in check_records(Path(cfg.cache), TEACHER, new_files=False)
                         if p.split(":")[0] not in named]
        if problems:
            for p in problems:
                click.echo(f"BAD {p}", err=True)
            shards = sum(p.startswith("shard_") for p in problems)
            files = len(problems) - shards
            what = " and ".join(([f"{shards} bad shard(s)"] if shards else []) + ([f"{files} bad file(s)"] if files else []))
            click.echo(f"inspect: {what} in {cfg.cache}", err=True)
            sys.exit(1)
        note = ("" if summary.get("checksummed", True) else
                " (kdcache.json, index.parquet and config.yaml have no checksums: an older cache; they parse)")
        click.echo(f"verify: all {summary['shards']} shards complete and checksums match, and every file of the cache "
                   f"is its own{note}")
