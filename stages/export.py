"""`kdcache export CACHE --format F --out DIR`: the cache and its data as a Hugging Face dataset in the layout of
kdcache itself, axolotl's KD plugin or DistillKit (see pipeline/interop/export.py and docs/api.md)."""

from __future__ import annotations

import click

from pipeline.interop.export import FORMATS, ExportConfig
from stages.common import config_options, given, setting, user_errors

E = ExportConfig


@click.command()
@click.argument("cache", required=False, type=click.Path())
@setting(E, "--format", type=click.Choice(FORMATS), help="Column layout: hf-datasets (kdcache's own, with the tail "
                                                         "mass), axolotl (KD plugin) or distillkit (raw top-k rows).")
@setting(E, "--out", type=click.Path(file_okay=False), show="required", help="Output directory, or an fsspec URL (load_from_disk-able).")
@setting(E, "--data", show="the data the cache records", help="Prepared data the cache was made from.")
@setting(E, "--batch-examples", type=int, help="Examples decoded and written at a time (bounds memory).")
@setting(E, "--overwrite", is_flag=True, help="Replace an earlier export in --out (only the files export wrote; "
                                              "anything else refuses).")
@config_options
@user_errors("export")
def export(cache, config_file, sets, **opts):
    """Export a teacher cache (CACHE, or `cache` in --config) joined to its prepared data, one row per example."""
    from tqdm import tqdm

    from pipeline.config import resolve
    from pipeline.interop.export import export as run_export, summary_line

    cfg = resolve(ExportConfig, config_file, sets, {**given(opts), "cache": cache})
    bar = None

    def on_plan(n):
        nonlocal bar
        bar = tqdm(total=n, desc=f"export {cfg.format}", unit="ex", leave=False)

    try:
        summary = run_export(cfg, on_examples=lambda n: bar.update(n), on_plan=on_plan)
    finally:
        if bar is not None:
            bar.close()
    click.echo(summary_line(summary))
