"""`kdcache inspect CACHE [--verify]`: summary of a cache; --verify reads and checks everything."""

from __future__ import annotations

import sys

import click

from stages.common import user_errors


@click.command()
@click.argument("cache", type=click.Path())
@click.option("--verify", is_flag=True, help="Read every shard, check checksums and completeness.")
@click.option("--sample-rows", type=int, default=200_000, show_default=True,
              help="Rows read for the entropy / top-K-mass statistics.")
@user_errors("inspect")
def inspect(cache, verify, sample_rows):
    """Summarise a teacher cache (rows, K, bytes/row, statistics, shard status)."""
    from pipeline.cache import open_cache
    from pipeline.inspection import summarize, format_summary

    c = open_cache(cache)
    summary = summarize(c, sample_rows)
    click.echo(format_summary(summary))
    if summary.get("unreadable") and not verify:
        click.echo(f"inspect: {len(summary['unreadable'])} unreadable shard(s) in {cache}; "
                   "run with --verify for the full list", err=True)
        sys.exit(1)
    if verify:
        from tqdm import tqdm

        with tqdm(total=len(c.shards), desc="verify", unit="shard", leave=False) as bar:
            problems = c.verify(on_shard=lambda i: bar.update(1))
        if problems:
            for p in problems:
                click.echo(f"BAD {p}", err=True)
            click.echo(f"inspect: {len(problems)} bad shard(s) in {cache}", err=True)
            sys.exit(1)
        click.echo(f"verify: all {len(c.shards)} shards complete and checksums match")
