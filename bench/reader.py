"""Reader throughput: rows/s of the cache reader alone (no model), on a cache of >= 200k rows.

    OMP_NUM_THREADS=1 .venv/bin/python bench/reader.py                 # K = 8 (default preset), ~280k rows
    OMP_NUM_THREADS=1 .venv/bin/python bench/reader.py --top-k 32      # the demo's K

The first run builds a synthetic prepared dataset and its cache under `--workdir` (default
runs/bench-reader/<settings>, ~30 s); later runs reuse them. The cache is real format 3, written by
`pipeline.cache.writer.write_shard` from statistics that `pipeline.teacher.stats.distribution_stats`
computes over synthetic logits shaped like a language model's (a Zipf prior over V = 16,384 ids plus a
few strongly boosted candidates per row, so heads are peaked and ids recur, as on real text); each
sequence's tokens are drawn from those distributions, so about as many targets fall in the head as
with a trained teacher. 65,536 distinct rows are computed and reused, permuted, by the other shards.

What is timed, each on the same cache in one process (this machine is noisy: compare ratios within
one run, not across runs):
  read    `Cache.read(a, b, KD_FIELDS)` chunk by chunk in the calling thread: stored bytes -> decoded
          float32 fields (what one background thread of the stream does per block)
  stream  `CacheStream` end to end for one whole epoch (the second: the first opens the shards) with
          `--threads` threads: blocks read and decoded in the background, joined to their sequences,
          collated into micro-batches of about `--batch-tokens` padded tokens (`--batch-size` sequences
          with --batch-tokens 0, or on a reader without token budgets)
Prints one markdown table row per measurement.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build(work: Path, rows: int, k: int, vocab: int, chunk_rows: int, shard_rows: int, seed: int = 0) -> None:
    """A prepared dataset and a format-3 cache over it under `work` (see the module docstring)."""
    import torch

    from pipeline.cache import layout
    from pipeline.cache.rows import target_ids_of, targets_sha256
    from pipeline.cache.schema import FORMAT_VERSION, CodecParams, RowCodec
    from pipeline.cache.writer import write_index, write_shard
    from pipeline.identity import write_json
    from pipeline.data.prepare import load_prepared, write_prepared
    from pipeline.teacher.runner import plan_shards
    from pipeline.teacher.stats import distribution_stats

    rng = np.random.default_rng(seed)
    params = CodecParams(top_k=k, vocab_size=vocab, temperatures=(0.5, 0.7, 1.4, 2.0))
    # Distinct rows: Zipf prior + 1..8 boosted candidates per row + noise, computed 2,048 rows at a time.
    distinct = min(rows, 65536)
    prior = torch.from_numpy(-1.1 * np.log(np.arange(1, vocab + 1, dtype=np.float32)))
    noise = torch.from_numpy(rng.standard_normal((2048, vocab), dtype=np.float32))
    parts = []
    gen = torch.Generator().manual_seed(seed)
    for a in range(0, distinct, 2048):
        n = min(2048, distinct - a)
        z = prior[None, :] + noise[torch.randperm(2048, generator=gen)[:n]]
        cand = torch.from_numpy(np.minimum(rng.zipf(1.3, size=(n, 8)) - 1, vocab - 1))
        boost = torch.from_numpy(rng.normal(3.5, 2.0, size=(n, 8)).astype(np.float32))
        boost[torch.from_numpy(rng.random((n, 8)) < 0.5)] = 0.0
        z.scatter_add_(1, cand, boost)
        st = distribution_stats(z, torch.zeros(n, dtype=torch.int64), k, torch.tensor(params.betas, dtype=torch.float32))
        # Tokens drawn from each row's head (renormalised) with probability 1 - r, else a random id.
        p_head = torch.softmax(st["topk_logprobs"], dim=1)
        pick = st["topk_ids"].gather(1, torch.multinomial(p_head, 1, generator=gen))[:, 0]
        outside = torch.rand(n, generator=gen) < st["tail_logprob"].exp()
        st["target_ids"] = torch.where(outside, torch.randint(0, vocab, (n,), generator=gen), pick)
        st["target_logprobs"] = torch.log_softmax(z, dim=1).gather(1, st["target_ids"][:, None])[:, 0]
        parts.append({n_: v.numpy() for n_, v in st.items()})
    stats = {n_: np.concatenate([p[n_] for p in parts]) for n_ in parts[0]}
    # Sequences of 32..512 tokens (every position after the first a target) until `rows` targets.
    lengths = []
    while sum(lengths) - len(lengths) < rows:
        lengths.append(int(rng.integers(32, 513)))
    row_of = np.concatenate([rng.permutation(distinct) for _ in range(-(-(sum(lengths) - len(lengths)) // distinct))])
    ids, masks, r = [], [], 0
    for n in lengths:
        seq_rows = row_of[r: r + n - 1]
        ids.append([int(rng.integers(0, vocab))] + stats["target_ids"][seq_rows].tolist())
        masks.append([0] + [1] * (n - 1))
        r += n - 1
    total = r
    prepared, cache = work / "prepared", work / "cache"
    write_prepared(prepared, ids, masks, {
        "kind": "kdcache-prepared", "format": "synthetic", "data": "bench/reader.py", "fingerprint": work.name,
        "tokenizer": {"name": "synthetic", "vocab_size": vocab, "vocab_sha256": "synthetic"},
        "examples": len(ids), "tokens": sum(lengths), "targets": total, "truncated": 0})
    counts = np.asarray(lengths, dtype=np.int64) - 1
    shards = plan_shards(counts, shard_rows)
    cache.mkdir(parents=True, exist_ok=True)
    write_index(cache, counts, shards)
    codec = RowCodec(params)
    ds = load_prepared(prepared)
    for s in shards:
        sel = row_of[s["row_start"]: s["row_stop"]]
        tgt = target_ids_of(ds, s["example_start"], s["example_stop"])
        arrays = codec.encode({n_: v[sel] for n_, v in stats.items() if n_ != "target_ids"}, tgt)
        write_shard(cache, s["index"], arrays, {**s, "dtype": "float32", "device": "cpu",
                                                "targets_sha256": targets_sha256(tgt)}, params, chunk_rows)
    write_json(cache / layout.META_FILENAME, {
        "kind": "kdcache-teacher-cache", "format_version": FORMAT_VERSION, "codec": params.to_meta(),
        "num_rows": total, "num_examples": len(ids), "chunk_rows": chunk_rows, "masked_model_ids": 0,
        "teacher": {"model": "synthetic"}, "tokenizer": {"name": "synthetic", "vocab_size": vocab,
                                                         "vocab_sha256": "synthetic"},
        "data": {"path": str(prepared.resolve()), "fingerprint": work.name}, "shards": shards})


def time_read(cache, fields: tuple[str, ...]) -> float:
    """rows/s of Cache.read over every chunk, in this thread."""
    chunk = cache.chunk_rows
    cache.read(0, min(chunk, cache.num_rows), fields)  # opens the first shard, reads its commit record
    t0 = time.perf_counter()
    for a in range(0, cache.num_rows, chunk):
        cache.read(a, min(cache.num_rows, a + chunk), fields)
    return cache.num_rows / (time.perf_counter() - t0)


def time_stream(data, cache, threads: int, batch_tokens: int, batch_size: int) -> tuple[float, float, int]:
    """(rows/s, padding fraction, micro-batches) of CacheStream's epoch 1, timed whole (its start-up
    included); epoch 0 before it opens the shards and checks their alignment hashes (once per run)."""
    from pipeline.data.stream import CacheStream

    kw = {"batch_tokens": batch_tokens} if "batch_tokens" in inspect.signature(CacheStream).parameters else {}
    s = CacheStream(data, cache, batch_size, seed=0, threads=threads, **kw)
    it = iter(s)
    for _ in range(s.batches_in_epoch(0)):
        next(it)
    n = s.batches_in_epoch(1)
    rows = real = slots = 0
    t0 = time.perf_counter()
    for _ in range(n):
        mb = next(it)
        rows += mb.num_targets
        real += int(mb.attention_mask.sum())
        slots += mb.attention_mask.numel()
    dt = time.perf_counter() - t0
    it.close()
    return rows / dt, 1.0 - real / slots, n


def add_cache_args(ap: argparse.ArgumentParser) -> None:
    """The synthetic cache's settings (bench/remote.py reuses them, and the cache they build)."""
    ap.add_argument("--rows", type=int, default=280_000)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--chunk-rows", type=int, default=8192)
    ap.add_argument("--shard-rows", type=int, default=65536)


def work_dir(args: argparse.Namespace) -> Path:
    """Where the synthetic cache of these settings is built: --workdir, else runs/bench-reader/<settings hash>."""
    key = hashlib.sha256(json.dumps([args.rows, args.top_k, args.vocab, args.chunk_rows, args.shard_rows]).encode())
    return Path(args.workdir or REPO / "runs" / "bench-reader" / key.hexdigest()[:12])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_cache_args(ap)
    ap.add_argument("--threads", default="1,2", help="decode threads of the stream, comma-separated")
    ap.add_argument("--batch-tokens", type=int, default=8192)
    ap.add_argument("--batch-size", type=int, default=30, help="sequences per micro-batch with --batch-tokens 0 or "
                                                               "a reader without token budgets (30 x 272 ~ 8192)")
    ap.add_argument("--repeats", type=int, default=3, help="best of N (noise only ever slows a run down)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--cache", default=None, help="time an existing cache instead (with --data, its prepared data)")
    ap.add_argument("--data", default=None)
    args = ap.parse_args()

    from pipeline.cache import open_cache
    from pipeline.losses.objective import KD_FIELDS
    from pipeline.data.prepare import load_prepared

    if args.cache:
        cache_dir, data_dir = Path(args.cache), Path(args.data or open_cache(args.cache).meta["data"]["path"])
    else:
        work = work_dir(args)
        if not (work / "cache" / "kdcache.json").is_file():
            t0 = time.perf_counter()
            build(work, args.rows, args.top_k, args.vocab, args.chunk_rows, args.shard_rows)
            print(f"built {work} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        cache_dir, data_dir = work / "cache", work / "prepared"
    data = load_prepared(data_dir)
    results = []
    cache = open_cache(cache_dir, data=data)
    k, rows = cache.k, cache.num_rows
    results.append(("read (1 thread)", max(time_read(cache, KD_FIELDS) for _ in range(args.repeats)), None, None))
    batching = f"{args.batch_tokens} tokens" if args.batch_tokens else f"{args.batch_size} sequences"
    for t in [int(x) for x in args.threads.split(",")]:
        best = max((time_stream(data, open_cache(cache_dir, data=data), t, args.batch_tokens, args.batch_size)
                    for _ in range(args.repeats)), key=lambda r: r[0])
        results.append((f"stream, {batching} ({t} thread{'s' if t > 1 else ''})", *best))
    print("| what | K | rows | rows/s | padding | micro-batches |")
    print("|---|---|---|---|---|---|")
    for what, rate, pad, n in results:
        print(f"| {what} | {k} | {rows:,} | {rate:,.0f} | {'' if pad is None else f'{pad:.1%}'} | "
              f"{'' if n is None else n} |")


if __name__ == "__main__":
    main()
