"""Student-stage benchmark: cost of SpecKD + IDTS over cross-entropy with every row kept, and reader headroom.

    .venv/bin/python bench/student.py                       # CPU, ~3 min: V = 32,000, 4-layer student
    .venv/bin/python bench/student.py --vocab 151936 --steps 6   # Qwen-size vocabulary
    .venv/bin/python bench/student.py --device cuda --hidden 896 --layers 24 --vocab 151936 --batch-size 8 --seq 2048

Builds a synthetic prepared dataset (random token sequences, every position after the first a target)
and caches a small random Llama teacher over it (default preset, K = 8), then times optimizer steps of the
*same* student on the *same* micro-batches two ways, interleaved step by step so machine noise hits both:
  A: cross-entropy only (no cache),
  B: KD fkl on K+1 buckets with the SpecKD topk gate (rejected rows down-weighted x0.5, so EVERY row
     reaches the divergence), and IDTS (alpha = 0),
and, with --compare-autograd, B and A again with the gradient of each chunk taken by local autograd (the path
before the closed-form gradients of `divergences.bucket_kd_grad`), in the same interleaved loop.
Both go through the trainer's chunked objective (pipeline/losses/chunked.py). Reports median step times and
their ratio B/A (goal <= 1.10), the kept fraction of B's steps (a step where the gate kept nothing measures
no divergence and is refused), and the reader's rows/s (CacheStream alone) against what the student consumes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

# The synthetic data's tokenizer is named "synthetic": without this the trainer's tokenizer lookup retries the
# Hugging Face hub for minutes on a machine with no network before giving up.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def synthetic_prepared(out: Path, vocab: int, n_examples: int, seq: int, seed: int = 0) -> None:
    """A prepared dataset of random sequences, with the record `kdcache prepare` writes."""
    import datasets

    from pipeline.identity import write_json

    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(n_examples, seq)).tolist()
    masks = [[0] + [1] * (seq - 1) for _ in range(n_examples)]
    feats = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32")),
                               "loss_mask": datasets.Sequence(datasets.Value("int8"))})
    datasets.Dataset.from_dict({"input_ids": ids, "loss_mask": masks}, features=feats).save_to_disk(str(out))
    write_json(out / "kdcache_prepare.json", {
        "kind": "kdcache-prepared", "format": "synthetic", "data": "bench", "fingerprint": f"bench-{seed}-{n_examples}",
        "tokenizer": {"name": "synthetic", "vocab_size": vocab, "vocab_sha256": "synthetic"},
        "examples": n_examples, "tokens": n_examples * seq, "targets": n_examples * (seq - 1), "truncated": 0})


def llama_config(path: Path, vocab: int, hidden: int, layers: int) -> Path:
    path.write_text(json.dumps({"model_type": "llama", "vocab_size": vocab, "hidden_size": hidden,
                                "intermediate_size": hidden * 3, "num_hidden_layers": layers,
                                "num_attention_heads": max(1, hidden // 64), "num_key_value_heads": max(1, hidden // 64),
                                "max_position_embeddings": 4096, "tie_word_embeddings": True}))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--examples", type=int, default=256)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--compare-autograd", action="store_true",
                    help="also time both steps with local autograd in the loss (the pre-closed-form path)")
    args = ap.parse_args()

    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from pipeline.cache import open_cache
    from pipeline.losses.chunked import _ChunkedLoss
    from pipeline.data.prepare import load_prepared
    from pipeline.data.stream import CacheStream
    from pipeline.teacher.runner import TeacherConfig, run_teacher
    from pipeline.training.trainer import Trainer
    from pipeline.training.config import TrainConfig

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="kdbench-student-"))
    work.mkdir(parents=True, exist_ok=True)
    prepared, cache = work / "prepared", work / "cache"
    if not prepared.exists():
        synthetic_prepared(prepared, args.vocab, args.examples, args.seq)
    teacher_dir = work / "teacher"
    if not teacher_dir.exists():
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(
            str(llama_config(work / "teacher.json", args.vocab, 128, 2)))).save_pretrained(teacher_dir)
    run_teacher(TeacherConfig(data=str(prepared), model=str(teacher_dir), out=str(cache), device=args.device,
                              dtype="float32"))
    scfg = str(llama_config(work / "student.json", args.vocab, args.hidden, args.layers))

    common = dict(data=str(prepared), student_config=scfg, batch_size=args.batch_size, max_steps=10_000, seed=0,
                  shuffle=False, device=args.device)
    ce = Trainer(TrainConfig(out=str(work / "ce"), loss="none", **common))
    kd = Trainer(TrainConfig(out=str(work / "kd"), cache=str(cache), loss="fkl", gate="topk", gate_k=5,
                             reject_weight=0.5, idts=True, **common))
    kd.model.load_state_dict(ce.model.state_dict())
    it = iter(kd.stream)
    batches = [next(it).to(kd.device) for _ in range(args.steps + 2)]
    sync = torch.cuda.synchronize if kd.device.type == "cuda" else (lambda: None)
    t_ce, t_kd, t_ce_auto, t_kd_auto, kept = [], [], [], [], []
    pairs = [(ce, t_ce, True), (kd, t_kd, True)]
    if args.compare_autograd:
        pairs += [(ce, t_ce_auto, False), (kd, t_kd_auto, False)]
    for i, mb in enumerate(batches):
        for trainer, times, closed in (pairs if i % 2 == 0 else pairs[::-1]):
            _ChunkedLoss.closed_form = closed
            sync()
            t0 = time.perf_counter()
            row = trainer.train_step([mb])
            sync()
            if i >= 2:  # first steps warm up allocators and kernels
                times.append(time.perf_counter() - t0)
            if trainer is kd:
                kept.append(row["kept_fraction"])
    _ChunkedLoss.closed_form = True
    if min(kept) <= 0.0:
        raise SystemExit("a KD step kept no row: its time would measure no divergence")
    a, b = statistics.median(t_ce), statistics.median(t_kd)
    rows_per_step = statistics.mean(mb.num_targets for mb in batches)

    # Reader alone: decode + join + collate on background threads, no model.
    stream = CacheStream(load_prepared(prepared), open_cache(cache), args.batch_size, shuffle=True, seed=1)
    n_rows, t0 = 0, time.perf_counter()
    for j, mb in enumerate(stream):
        n_rows += mb.num_targets
        if j >= 3 * stream.batches_in_epoch(0):
            break
    reader_rows_s = n_rows / (time.perf_counter() - t0)
    student_rows_s = rows_per_step / b
    print("| device | V | student | batch | CE step (s) | KD+gate+IDTS step (s) | ratio | kept | reader rows/s | student rows/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.device} | {args.vocab:,} | {args.layers}x{args.hidden} | {args.batch_size}x{args.seq} | {a:.4f} | "
          f"{b:.4f} | {b / a:.3f} | {statistics.mean(kept):.2f} | {reader_rows_s:,.0f} | {student_rows_s:,.0f} |")
    if args.compare_autograd:
        a2, b2 = statistics.median(t_ce_auto), statistics.median(t_kd_auto)
        print(f"\nlocal autograd in the loss (before): CE step {a2:.4f} s, KD step {b2:.4f} s, ratio {b2 / a2:.3f}; "
              f"closed form / autograd: CE {a / a2:.3f}, KD {b / b2:.3f}")


if __name__ == "__main__":
    main()
