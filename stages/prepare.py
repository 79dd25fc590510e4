"""`kdcache prepare`: tokenize a corpus into input_ids + loss_mask (see pipeline/data/prepare.py)."""

from __future__ import annotations

import click

from pipeline.data.prepare import FORMATS, PrepareConfig
from stages.common import config_options, given, setting, user_errors

P = PrepareConfig


@click.command()
@setting(P, "--data", show="required", help="jsonl/json/parquet/csv/txt file or folder, a saved dataset, or a datasets "
                                        "hub name.")
@setting(P, "--tokenizer", show="required", help="Tokenizer directory, .gguf file (its tokenizer) or hub id.")
@setting(P, "--out", type=click.Path(file_okay=False), show="required", help="Output directory (load_from_disk-able).")
@setting(P, "--max-length", type=int, help="Truncate examples to this many tokens.")
@setting(P, "--format", type=click.Choice(FORMATS),
         help="Record layout; auto: messages -> chat, prompt+response -> prompt-response, else text.")
@setting(P, "--split", help="Split to read from a dataset dict or hub dataset.")
@setting(P, "--text-field", help="Field holding the text of text-format records.")
@setting(P, "--add-eos/--no-add-eos", help="Append EOS (a target) to text and prompt-response examples.")
@setting(P, "--max-examples", type=int, help="A seeded random subset of this many examples, in corpus order (0: all).")
@setting(P, "--sample-seed", type=int, help="Seed of the --max-examples subset.")
@setting(P, "--overwrite", is_flag=True, help="Replace an output prepared with other settings (only the files "
                                              "prepare wrote; anything else refuses).")
@config_options
@user_errors("prepare")
def prepare(config_file, sets, **opts):
    """Tokenize a corpus; mark the positions that are training targets."""
    from pipeline.config import resolve
    from pipeline.data.prepare import prepare as run_prepare, summary_line

    cfg = resolve(PrepareConfig, config_file, sets, given(opts))
    meta = run_prepare(cfg, progress=True)
    click.echo(summary_line(meta, cfg.out))
