"""`kdcache eval`: cross-entropy, agreement with the teacher cache, greedy generation (see pipeline/evaluate.py)."""

from __future__ import annotations

import click

from stages.common import config_options, user_errors


@click.command("eval")
@click.option("--model", help="Model directory (a training run directory means its final/) or hub id.")
@click.option("--data", help="Prepared data (default: the path the cache records).")
@click.option("--cache", help="Teacher cache of the same data: adds teacher top-1 agreement and FKL.")
@click.option("--out", type=click.Path(file_okay=False), help="Output directory (eval.json, config.yaml).")
@click.option("--generate", type=int, help="Greedy generations on the first N examples (prompt-response data).")
@click.option("--samples", type=int, help="Generations copied into eval.json (default 3).")
@click.option("--batch-size", type=int, help="Sequences per forward pass.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None)
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16"]), default=None)
@config_options
@user_errors("eval")
def eval_(config_file, sets, **opts):
    """Score a model on prepared data: CE/perplexity, teacher agreement and FKL, exact match and ROUGE-L."""
    from pipeline.config import resolve
    from pipeline.evaluate import EvalConfig, evaluate, summary_line

    cfg = resolve(EvalConfig, config_file, sets, opts)
    click.echo(summary_line(evaluate(cfg, progress=True), cfg.out))
