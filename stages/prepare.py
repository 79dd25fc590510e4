"""`kdcache prepare`: tokenize a corpus into input_ids + loss_mask (see pipeline/prepare.py)."""

from __future__ import annotations

import click

from stages.common import config_options, user_errors


@click.command()
@click.option("--data", help="jsonl/json/parquet/csv/txt file or folder, a saved dataset, or a datasets hub name.")
@click.option("--tokenizer", help="Tokenizer directory or hub id.")
@click.option("--out", type=click.Path(file_okay=False), help="Output directory (load_from_disk-able).")
@click.option("--max-length", type=int, help="Truncate examples to this many tokens.")
@click.option("--format", "format_", type=click.Choice(["auto", "text", "prompt-response", "chat"]), default=None)
@click.option("--split", help="Split to read from a dataset dict or hub dataset.")
@click.option("--overwrite", is_flag=True, default=None, help="Replace an output prepared with other settings.")
@config_options
@user_errors("prepare")
def prepare(config_file, sets, format_, **opts):
    """Tokenize a corpus; mark the positions that are training targets."""
    from pipeline.config import resolve
    from pipeline.prepare import PrepareConfig, prepare as run_prepare, summary_line

    cfg = resolve(PrepareConfig, config_file, sets, {**opts, "format": format_})
    meta = run_prepare(cfg, progress=True)
    click.echo(summary_line(meta, cfg.out))
