"""`kdcache train`: distill a student from the cache, or plain CE training without one (see pipeline/training/trainer.py)."""

from __future__ import annotations

import click

from pipeline.losses.selection import SELECTIONS
from pipeline.losses.options import GATES, LOSSES, PROPOSALS, TAILS
from pipeline.training.config import BEST_METRICS, SCHEDULES, TrainConfig
from stages.common import config_options, given, setting, user_errors

T = TrainConfig


@click.command()
@setting(T, "--data", show="the data the cache records", help="Prepared data (a `kdcache prepare` output).")
@setting(T, "--cache", show="none: plain cross-entropy",
         help="Teacher cache to distill from: a directory or an fsspec URL (s3://, gs://, az://, ...).")
@setting(T, "--local-cache", show="$KDCACHE_LOCAL_CACHE or ~/.cache/kdcache/remote",
         help="A URL --cache is read through a copy of its shards in this local directory.")
@setting(T, "--local-cache-gb", type=float, help="At most this many GiB of shards kept locally (least recently "
                                                 "used evicted; 0: no bound).")
@setting(T, "--prefetch", field="prefetch_shards", type=int,
         help="A URL --cache: shards downloaded ahead of the reader, in the epoch's order.")
@setting(T, "--student", show="one of the two is required",
         help="Student model directory, .gguf file or hub id to start from (or the final/ of a `train --out URL` run).")
@setting(T, "--student-config", show="one of the two is required", help="transformers config.json: build the student from scratch.")
@setting(T, "--out", type=click.Path(file_okay=False), show="required",
         help="Run directory, or an fsspec URL (s3://, gs://, az://): trained in a local copy, each checkpoint "
              "uploaded as it is written; re-running the same command anywhere continues from the newest one.")
@setting(T, "--loss", type=click.Choice(LOSSES), help="Divergence to the teacher (none: cross-entropy only).")
@setting(T, "--tail", type=click.Choice(TAILS),
         help="What the loss does with the mass outside the cached top-K: auto (sampled when the cache has tail "
              "draws that serve the loss, else bucket), bucket (one bucket), renorm, ignore, or sampled (estimated "
              "from the cache's tail draws, `kdcache teacher --tail-samples S`: unbiased at any temperature and with "
              "IDTS for fkl, jsd, tvd, skl, srkl; not rkl or akl).")
@setting(T, "--gate", type=click.Choice(GATES), help="SpecKD rule deciding which positions the teacher accepts.")
@setting(T, "--proposal", type=click.Choice(PROPOSALS), help="SpecKD: how the student proposes a token.")
@setting(T, "--gate-k", type=int, help="topk rule: accept when the proposal is among the teacher's top k.")
@setting(T, "--gate-threshold", type=float, help="threshold rule: minimum teacher probability of the proposal.")
@setting(T, "--reject-weight", type=float, help="Weight of rejected positions (0 = masked).")
@setting(T, "--latf/--no-latf", help="AdaKD loss-driven adaptive token focusing.")
@setting(T, "--latf-warmup", type=float, help="Fraction of the run before LATF's reference loss is taken.")
@setting(T, "--latf-ema-decay", type=float, help="Decay of LATF's moving average of the KD loss.")
@setting(T, "--latf-epsilon", type=float, help="LATF: relative change of the loss average against its reference that moves the focus ratio.")
@setting(T, "--latf-sigma", type=float, help="LATF: the focus ratio moves to r * (1 -+ sigma).")
@setting(T, "--latf-min-ratio", type=float, help="LATF: smallest fraction of positions kept.")
@setting(T, "--idts/--no-idts", help="AdaKD inverse-difficulty temperature scaling.")
@setting(T, "--idts-c", type=float, help="IDTS: temperatures span T_base * exp(+-c).")
@setting(T, "--temperature", type=float, help="T_base, the distillation temperature.")
@setting(T, "--select", type=click.Choice(SELECTIONS), help="SE-KD: distil only each sequence's positions of highest "
                                                          "student entropy (student_entropy) or all (none).")
@setting(T, "--select-ratio", type=float, help="SE-KD: fraction of each sequence's positions distilled.")
@setting(T, "--ce-weight", type=float, help="alpha: weight of cross-entropy on the labels (loss = alpha*CE + (1-alpha)*KD).")
@setting(T, "--lr", type=float, help="Peak learning rate (AdamW).")
@setting(T, "--warmup", type=int, help="Warm-up steps (linear from 0).")
@setting(T, "--schedule", type=click.Choice(SCHEDULES), help="Learning-rate schedule after warm-up.")
@setting(T, "--min-lr-ratio", type=float, help="Floor of linear/cosine decay, as a fraction of --lr.")
@setting(T, "--weight-decay", type=float, help="AdamW weight decay (not on norms and biases).")
@setting(T, "--max-steps", type=int, help="Optimizer steps (0: from --epochs).")
@setting(T, "--epochs", type=float, help="Passes over the data when --max-steps is 0 (0: one epoch).")
@setting(T, "--batch-size", type=int, help="Sequences per micro-batch (when --batch-tokens is 0).")
@setting(T, "--batch-tokens", type=int, help="Padded tokens per micro-batch, sequences bucketed by length "
                                            "(0: --batch-size sequences each).")
@setting(T, "--grad-accum", type=int, help="Micro-batches per optimizer step.")
@setting(T, "--max-grad-norm", type=float, help="Gradient clipping norm (0: none).")
@setting(T, "--seed", type=int, help="Seed of initialisation, data order and the gate's sampling.")
@setting(T, "--shuffle/--no-shuffle", help="Shuffle the examples every epoch.")
@setting(T, "--save-every", type=int, help="Checkpoint every N steps (0: only at the end or on Ctrl-C).")
@setting(T, "--stop-after", type=int, help="Train N more steps of the planned run, checkpoint and exit (0: to the end).")
@setting(T, "--resume", is_flag=True, help="Continue from the newest checkpoint even if the settings changed "
                                           "(the same settings continue without it).")
@setting(T, "--device", type=click.Choice(["auto", "cpu", "cuda"]), help="auto: cuda when available.")
@setting(T, "--dtype", type=click.Choice(["auto", "float32", "bfloat16"]),
         help="auto: bfloat16 autocast on GPU, float32 on CPU.")
@setting(T, "--read-threads", type=int, help="Background threads decoding the cache.")
@setting(T, "--report-to", metavar="TRACKERS",
         help="Where metrics go besides OUT/metrics.jsonl (always written): none, jsonl, tensorboard (OUT/tensorboard, "
              "extra [tensorboard]), wandb (offline unless WANDB_MODE says otherwise, extra [wandb]); "
              "comma-separated for several.")
@setting(T, "--eval-every", type=int, help="Score the held-out split every N steps and at the end, logged as eval_* "
                                           "metrics; keeps OUT/best (0: never).")
@setting(T, "--eval-data", show="the data --eval-cache records",
         help="Held-out split for --eval-every (a `kdcache prepare` output, same tokenizer).")
@setting(T, "--eval-cache", show="none: ce and ppl only",
         help="Teacher cache of --eval-data: adds teacher_top1_agreement and fkl_to_teacher.")
@setting(T, "--best-metric", type=click.Choice(BEST_METRICS),
         help="Held-out figure that picks OUT/best (ce and fkl_to_teacher: lower is better; agreement: higher).")
@setting(T, "--push-to-hub", metavar="OWNER/NAME", show="no upload",
         help="Upload OUT/final (model, tokenizer, model card) to this Hugging Face Hub repo when training ends.")
@setting(T, "--fsdp/--no-fsdp", help="Shard the student over torchrun's ranks with FSDP2 (bf16 compute on CUDA) "
                                     "instead of DDP: for students that do not fit one GPU with their optimizer state.")
@setting(T, "--activation-checkpointing/--no-activation-checkpointing",
         help="Recompute each layer's activations in backward: less memory, about a third more compute.")
@setting(T, "--follow/--no-follow", help="Train while `kdcache teacher` still writes the cache: the first epoch goes "
                                         "shard by shard, each read once committed.")
@setting(T, "--follow-timeout", type=float, help="--follow: seconds to wait for a shard's commit before stopping.")
@setting(T, "--overwrite", is_flag=True, help="Start over in --out (removes only what train wrote there; anything "
                                              "else refuses).")
@config_options
@user_errors("train")
def train(config_file, sets, **opts):
    """Train a student against a teacher cache (SpecKD gate, AdaKD LATF/IDTS, divergence family).

    Re-running the same command continues an interrupted run from its newest checkpoint and does
    nothing for a finished one.
    """
    from pipeline.config import resolve
    from pipeline.training.summary import summary_line
    from pipeline.training.trainer import train as run_train

    cfg = resolve(TrainConfig, config_file, sets, given(opts))
    click.echo(summary_line(run_train(cfg, progress=True)))
