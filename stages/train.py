"""`kdcache train`: distill a student from the cache, or plain CE training without one (see pipeline/train.py)."""

from __future__ import annotations

import click

from stages.common import config_options, user_errors


@click.command()
@click.option("--data", help="Prepared data (default: the path the cache records).")
@click.option("--cache", help="Teacher cache; without it, plain cross-entropy training.")
@click.option("--student", help="Student model directory or hub id.")
@click.option("--student-config", help="transformers config.json: build the student from scratch.")
@click.option("--out", type=click.Path(file_okay=False), help="Run directory.")
@click.option("--loss", type=click.Choice(["none", "fkl", "rkl", "jsd", "tvd", "skl", "srkl", "akl"]), default=None)
@click.option("--tail", type=click.Choice(["bucket", "renorm", "ignore", "sampled"]), default=None)
@click.option("--gate", type=click.Choice(["none", "topk", "spec", "threshold"]), default=None, help="SpecKD rule.")
@click.option("--proposal", type=click.Choice(["greedy", "sample"]), default=None)
@click.option("--gate-k", type=int, help="topk rule: teacher top-k_v that accepts.")
@click.option("--gate-threshold", type=float, help="threshold rule: minimum teacher probability.")
@click.option("--reject-weight", type=float, help="Weight of rejected positions (0 = masked).")
@click.option("--latf/--no-latf", default=None, help="AdaKD loss-driven adaptive token focusing.")
@click.option("--latf-warmup", type=float, help="Fraction of the run before LATF's reference is taken.")
@click.option("--latf-epsilon", type=float)
@click.option("--latf-sigma", type=float)
@click.option("--latf-min-ratio", type=float)
@click.option("--idts/--no-idts", default=None, help="AdaKD inverse-difficulty temperature scaling.")
@click.option("--idts-c", type=float)
@click.option("--temperature", type=float, help="T_base.")
@click.option("--ce-weight", type=float, help="alpha: weight of cross-entropy on the labels.")
@click.option("--lr", type=float)
@click.option("--warmup", type=int, help="Warm-up steps.")
@click.option("--schedule", type=click.Choice(["constant", "linear", "cosine"]), default=None)
@click.option("--weight-decay", type=float)
@click.option("--max-steps", type=int)
@click.option("--epochs", type=float)
@click.option("--batch-size", type=int, help="Sequences per micro-batch.")
@click.option("--grad-accum", type=int, help="Micro-batches per optimizer step.")
@click.option("--max-grad-norm", type=float)
@click.option("--seed", type=int)
@click.option("--shuffle/--no-shuffle", default=None)
@click.option("--save-every", type=int, help="Checkpoint every N steps.")
@click.option("--stop-after", type=int, help="Train N steps of the planned run, checkpoint and exit.")
@click.option("--resume", is_flag=True, default=None, help="Continue from the newest complete checkpoint.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None)
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16"]), default=None)
@click.option("--overwrite", is_flag=True, default=None, help="Replace an existing run in --out.")
@config_options
@user_errors("train")
def train(config_file, sets, **opts):
    """Train a student against a teacher cache (SpecKD gate, AdaKD LATF/IDTS, divergence family)."""
    from pipeline.config import resolve
    from pipeline.train import summary_line, train as run_train
    from pipeline.train_config import TrainConfig

    cfg = resolve(TrainConfig, config_file, sets, opts)
    click.echo(summary_line(run_train(cfg, progress=True)))
