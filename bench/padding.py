"""Padding of the student's micro-batches: fixed `batch_size` against length-bucketed `batch_tokens`.

    .venv/bin/kdcache prepare --data data/demo/train.jsonl --tokenizer data/demo/tokenizer --max-length 128 \\
        --out runs/demo/prepared/train
    OMP_NUM_THREADS=1 .venv/bin/python bench/padding.py runs/demo/prepared/train:64 runs/stdlib/prepared/train:16

Each argument is PREPARED_DIR[:BATCH_SIZE]. The plan is the one `CacheStream` makes for that data and a
cache of the teacher stage's default layout (`--shard-rows` 65,536, `--chunk-rows` 8,192: blocks are the
examples whose first row falls in one chunk, windows of 8 blocks), epoch 0, seed 0; no cache needs to
exist (the plan only needs each example's length and row count). The token budget compared is
BATCH_SIZE x the mean length, so both plans hold about as many tokens per micro-batch.
Padding = padded positions / all positions of the micro-batches (B x longest, summed).

The stdlib corpus is real text: `pipeline/data/stdlib_corpus.py` (also `data/make_stdlib.py`) tiles the Python standard
library's sources into prompt -> completion records; runs/stdlib/prepared/train is its `bench/realtext.py`
preparation (byte-level BPE, V = 16,384, max length 512, every token a target).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def padding(batches: list[np.ndarray], lengths: np.ndarray) -> float:
    real = sum(int(lengths[b].sum()) for b in batches)
    slots = sum(len(b) * int(lengths[b].max()) for b in batches)
    return 1.0 - real / slots


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", nargs="+", help="PREPARED_DIR[:BATCH_SIZE] (default batch size 8)")
    ap.add_argument("--shard-rows", type=int, default=65536)
    ap.add_argument("--chunk-rows", type=int, default=8192)
    ap.add_argument("--buffer-blocks", type=int, default=8)
    args = ap.parse_args()

    from pipeline.cache.rows import target_counts
    from pipeline.data.epoch_plan import PlanSettings, chunk_blocks, plan_epoch
    from pipeline.data.prepare import load_prepared
    from pipeline.teacher.runner import plan_shards

    print("| corpus | examples | mean / p90 / max length | plan | tokens per micro-batch | micro-batches | padding |")
    print("|---|---|---|---|---|---|---|")
    for spec in args.data:
        path, _, bs = spec.partition(":")
        batch_size = int(bs or 8)
        counts, lengths = target_counts(load_prepared(path))
        row_start = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        shards = plan_shards(counts, args.shard_rows)
        blocks, block_shards = chunk_blocks(row_start, np.asarray([s["row_start"] for s in shards]), args.chunk_rows)
        kept = [(b[counts[b] > 0], s) for b, s in zip(blocks, block_shards)]
        blocks = [b for b, _ in kept if len(b)]
        block_shards = np.asarray([s for b, s in kept if len(b)])
        budget = int(round(batch_size * lengths[counts > 0].mean()))
        name = Path(path).parent.parent.name + "/" + Path(path).name
        stats = f"{lengths.mean():.0f} / {np.percentile(lengths, 90):.0f} / {lengths.max()}"
        for label, s in ((f"batch_size {batch_size}", PlanSettings(batch_size=batch_size, buffer_blocks=args.buffer_blocks)),
                         (f"batch_tokens {budget}", PlanSettings(batch_tokens=budget, buffer_blocks=args.buffer_blocks))):
            plan = plan_epoch(blocks, block_shards, lengths, s, epoch=0)
            tokens = np.mean([len(b) * lengths[b].max() for b in plan.batches])
            print(f"| {name} | {int((counts > 0).sum()):,} | {stats} | {label} | {tokens:,.0f} | {len(plan.batches):,} | "
                  f"{padding(plan.batches, lengths):.1%} |")


if __name__ == "__main__":
    main()
