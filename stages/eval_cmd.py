"""`kdcache eval`: cross-entropy, agreement with the teacher cache, greedy generation (see pipeline/evaluation/evaluate.py)."""

from __future__ import annotations

import click

from pipeline.evaluation.evaluate import EvalConfig
from stages.common import config_options, given, setting, user_errors

E = EvalConfig


@click.command("eval")
@setting(E, "--model", show="required", help="Model directory (a training run directory means its final/, also at a URL: `train --out URL`), .gguf file or hub id.")
@setting(E, "--data", show="the data the cache records", help="Prepared data to score.")
@setting(E, "--cache", show="none", help="Teacher cache of the same data: adds teacher top-1 agreement and FKL.")
@setting(E, "--out", type=click.Path(file_okay=False), show="required",
         help="Output directory or fsspec URL (eval.json, config.yaml; a previous eval there is replaced).")
@setting(E, "--generate", type=int, help="Greedy generations on the first N examples (prompt-response or chat "
                                         "data; chat: the last assistant turn is the reference).")
@setting(E, "--extra-new-tokens", type=int, help="Generation budget beyond the reference's length.")
@setting(E, "--samples", type=int, help="Generations copied into eval.json.")
@setting(E, "--batch-size", type=int, help="Sequences per forward pass.")
@setting(E, "--device", type=click.Choice(["auto", "cpu", "cuda"]), help="auto: cuda when available.")
@setting(E, "--dtype", type=click.Choice(["auto", "float32", "bfloat16"]), help="auto: bfloat16 on GPU, float32 on CPU.")
@config_options
@user_errors("eval")
def eval_(config_file, sets, **opts):
    """Score a model on prepared data: CE/perplexity, teacher agreement and FKL, exact match and ROUGE-L."""
    from pipeline.config import resolve
    from pipeline.evaluation.evaluate import evaluate, summary_line

    cfg = resolve(EvalConfig, config_file, sets, given(opts))
    click.echo(summary_line(evaluate(cfg, progress=True), cfg.out))
