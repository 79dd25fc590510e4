"""Computing one shard of the cache: run the teacher over the shard's examples, encode, commit.

A shard's result depends only on its own examples (its batches are formed from them alone and the
tail sampler is seeded by the shard's index), so any process, in any order, recomputes a shard
to the same bytes on the same hardware: the basis of restart and of multi-worker runs.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from pipeline.data.batching import pad_right, token_budget_batches
from pipeline.cache.rows import target_positions, targets_sha256
from pipeline.cache.schema import CodecParams, RowCodec
from pipeline.cache.writer import CacheWriter
from pipeline.errors import KdError
from pipeline.models import input_device, load_causal_lm, local_model, model_vocab_size, pick_device, pick_dtype
from pipeline.head import HeadSpec, check_head, head_spec
from pipeline.storage import is_url, use_job_options
from pipeline.teacher.stats import auto_chunk_rows, rows_from_hidden

log = logging.getLogger(__name__)

_MODEL: dict[str, Any] = {}  # one loaded teacher per process (Dask workers reuse it across shards)


@dataclass(frozen=True)
class ShardJob:
    """Everything a worker needs for one shard (`pipeline.teacher.runner.shard_job` makes it): plain data,
    picklable, since it crosses process boundaries (Dask workers, the writing thread)."""

    cache: str  # the cache directory (planned: its kdcache.json is written)
    data: str  # the prepared data directory
    model: str
    device: str
    dtype: str
    shard: dict[str, int]  # the plan entry: index, example_start/stop, row_start/stop
    codec: dict[str, Any]  # kdcache.json's "codec" (`CodecParams.from_meta`)
    batch_tokens: int
    head_chunk_rows: int
    seed: int
    threads: int = 0  # torch threads; 0 = torch's choice
    revision: str | None = None
    parallel: str = "none"
    compile: str = "auto"
    # The launcher's storage options when `cache` is a URL: workers of an existing Dask cluster run on other
    # machines, without the launcher's --storage-option or environment. Held in memory only (repr=False: a
    # task's repr may reach a log).
    storage: dict[str, Any] = field(default_factory=dict, repr=False)


def _device_for_worker(device: str) -> str:
    """With several Dask workers on a multi-GPU node, worker i takes GPU i % n."""
    if device not in ("auto", "cuda") or not torch.cuda.is_available():
        return device
    try:
        from distributed import get_worker

        name = get_worker().name
        return f"cuda:{int(name) % torch.cuda.device_count()}" if str(name).isdigit() else "cuda"
    except (ImportError, ValueError):
        local_rank = os.environ.get("LOCAL_RANK")
        return f"cuda:{local_rank}" if local_rank is not None else "cuda"


def get_model(model: str, device: str, dtype: str, revision: str | None = None,
              parallel: str = "none") -> tuple[Any, torch.device, HeadSpec]:
    """Load (once per process) the teacher in eval mode, at the revision the cache records.

    Returns (model, the device its inputs go to, the head for the statistics). Under tensor parallelism the
    head's weight is a vocabulary-sharded DTensor: it is gathered into one full local copy here, once, so
    the statistics are computed from full-vocabulary float32 logits, never from a shard's slice (every TP
    rank computes the same rows; rank 0 commits).
    """
    key = f"{model}|{revision}|{device}|{dtype}|{parallel}"
    if key not in _MODEL:
        _MODEL.clear()
        dev = pick_device(_device_for_worker(device))
        m = load_causal_lm(local_model(model), dev, pick_dtype(dtype, dev), revision, parallel)  # a URL: this
        # machine's checked copy of the run's final/
        head = head_spec(m, model_vocab_size(m))
        head.weight, head.bias = _full(head.weight), _full(head.bias)
        check_head(m, head, input_device(m))
        _MODEL[key] = (m, input_device(m), head)
    return _MODEL[key]


def _full(t: torch.Tensor | None) -> torch.Tensor | None:
    """A DTensor (a tensor-parallel shard) as the full tensor on this rank; anything else unchanged."""
    return t.full_tensor() if t is not None and hasattr(t, "full_tensor") else t


def _shard_generator(seed: int, shard: int) -> torch.Generator:
    """The tail sampler's random stream of one shard: a CPU generator whatever device computes, so a shard's draws
    do not depend on the device's RNG (`stats.tail_uniforms` moves the uniforms to the logits)."""
    g = torch.Generator(device="cpu")
    g.manual_seed((seed * 1_000_003 + shard) % (2**63))
    return g


def ragged_column(ds: Any, name: str) -> list[np.ndarray]:
    """A list-of-ints column of a `datasets.Dataset` as one numpy array per row, via Arrow (no
    per-row Python formatting; respects a `select` view)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    col = ds.with_format("arrow")[name]
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks else pa.array([], type=pa.list_(pa.int64()))
    lengths = np.asarray(pc.list_value_length(col).fill_null(0), dtype=np.int64)
    flat = np.asarray(pc.list_flatten(col))
    return np.split(flat, np.cumsum(lengths)[:-1]) if len(lengths) else []


def set_threads(n: int) -> None:
    """Pin torch's intra-op threads (0 = leave torch's choice). Results do not depend on it (checked
    bitwise at 1 vs 2 threads), but speed does: Dask workers start with OMP_NUM_THREADS=1."""
    if n > 0 and torch.get_num_threads() != n:
        torch.set_num_threads(n)


@torch.no_grad()
def compute_shard(job: ShardJob, on_rows: Callable[[int], None] | None = None
                  ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Run the teacher over shard `job.shard`; returns (encoded arrays in dataset row order, info).

    job: cache path, prepared data path, shard plan entry, codec parameters and the teacher settings
    (see `pipeline.teacher.runner.shard_job`). The device and dtype are resolved HERE, on the process that
    computes (a login node planning for GPU workers cannot know them), and returned in `info` with the
    shard's target-id hash for the commit record. `on_rows(n)` is called as each batch's rows are done.
    """
    from pipeline.data.prepare import load_prepared

    set_threads(job.threads)
    params = CodecParams.from_meta(job.codec)
    shard, k, v = job.shard, params.top_k, params.vocab_size
    model, dev, head = get_model(job.model, job.device, job.dtype, job.revision, job.parallel)
    ds = load_prepared(job.data).select(range(shard["example_start"], shard["example_stop"]))
    ids_list, mask_list = ragged_column(ds, "input_ids"), ragged_column(ds, "loss_mask")
    n = shard["row_stop"] - shard["row_start"]
    g = len(params.temperatures)
    s = params.tail_samples
    stats = {"topk_ids": np.zeros((n, k), np.int64), "topk_logprobs": np.zeros((n, k), np.float32),
             "tail_logprob": np.zeros(n, np.float32), "tail_entropy": np.zeros(n, np.float32),
             "tail_shape": np.zeros((n, g), np.float32), "target_logprobs": np.zeros(n, np.float32)}
    if s:
        stats["tail_ids"] = np.full((n, s), -1, np.int64)
        stats["tail_counts"] = np.zeros((n, s), np.int64)
        stats["tail_logshares"] = np.full((n, s), -np.inf, np.float32)
    target_ids = np.zeros(n, np.int64)
    # Target positions of each example (t >= 1 with mask 1: position t is predicted from the
    # hidden state at t - 1) and the row offset of each example inside the shard.
    targets = [target_positions(m) for m in mask_list]
    counts = np.array([len(t) for t in targets], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    if offsets[-1] != n:
        raise KdError(f"shard {shard['index']}: the prepared data has {offsets[-1]} target positions where the "
                      f"cache plan says {n}: {job.data} changed after the cache was started; re-run with --overwrite")

    head = HeadSpec(head.weight, head.bias, v, head.softcap, head.scale)  # the tokenizer's ids only
    betas = torch.tensor(params.betas, dtype=torch.float32)
    chunk_rows = job.head_chunk_rows or auto_chunk_rows(v, dev)
    gen = _shard_generator(job.seed, shard["index"]) if s else None
    lengths = [len(x) for x in ids_list]
    # compile "auto" is the eager path on every device (the path the tests exercise) until bench/gpu_suite.py
    # (part teacher: tokens/s with compile off and on, on a GPU) shows that torch.compile pays there.
    compiled = job.compile == "always"
    host = _HostBuffers(head.weight.device)

    def finish(p: tuple) -> None:
        """Wait for batch p's copies, check its rows are finite, scatter them into the shard's arrays."""
        batch, rb, rt, dst, out, tgt, done = p
        if done is not None:
            done.synchronize()
        bad = ~np.isfinite(out["log_normaliser"].numpy())  # NaN/+inf logits (see distribution_stats)
        if bad.any():
            row = int(np.argmax(bad))
            dt = str(head.weight.dtype).replace("torch.", "")
            raise KdError(f"teacher logits are not finite for example {shard['example_start'] + batch[rb[row]]} "
                          f"at position {int(rt[row])} (model {job.model}, {dt})")
        for name, arr in stats.items():
            arr[dst] = out[name].numpy()
        target_ids[dst] = tgt.numpy()
        if on_rows:
            on_rows(len(dst))

    # Batch i's results are copied to pinned host memory asynchronously and scattered only after batch
    # i + 1's forward is queued, so on a GPU the copies and the host-side work overlap compute: one wait
    # per batch, none per head chunk.
    pending = None
    for batch in token_budget_batches(lengths, job.batch_tokens):
        batch = [e for e in batch if counts[e]]
        if not batch:
            continue
        ids, att = (torch.from_numpy(a).to(dev, non_blocking=True) for a in pad_right([ids_list[e] for e in batch]))
        # No attention mask: rows are right-padded and attention is causal, so no position we read attends to
        # the padding after it (bitwise the same hidden states: tests/training/test_train.py), and without a mask SDPA can
        # take its causal flash / memory-efficient kernels instead of a masked one.
        hidden = model.base_model(input_ids=ids).last_hidden_state  # [B, L, H]
        rb = np.concatenate([np.full(counts[e], b) for b, e in enumerate(batch)])
        rt = np.concatenate([targets[e] for e in batch])
        rb_d, rt_d = torch.as_tensor(rb, device=dev), torch.as_tensor(rt, device=dev)
        tgt = ids[rb_d, rt_d]
        # With device_map the last layer (and the head) may sit on another GPU than the inputs.
        hd = hidden[rb_d.to(hidden.device), (rt_d - 1).to(hidden.device)].to(head.weight.device)
        part = rows_from_hidden(hd, tgt.to(head.weight.device), head, k, betas, chunk_rows, s, gen, compiled)
        # The batch's rows are grouped per example in batch order: scatter them to dataset order.
        dst = np.concatenate([np.arange(offsets[e], offsets[e + 1]) for e in batch])
        out, done = host.copy({**part, "target": tgt})
        tgt_host = out.pop("target")
        if pending is not None:
            finish(pending)
        pending = (batch, rb, rt, dst, out, tgt_host, done)
    if pending is not None:
        finish(pending)
    arrays = RowCodec(params).encode(stats, target_ids)
    info = {"dtype": str(head.weight.dtype).replace("torch.", ""), "device": dev.type,
            "targets_sha256": targets_sha256(target_ids)}
    return arrays, info


def run_shard_job(job: ShardJob) -> dict[str, Any]:
    """Compute and commit one shard (the unit of work of every execution mode)."""
    if is_url(job.cache):  # the launcher's options, and only those (a shared cluster's worker ran others' jobs)
        use_job_options(job.storage)
    writer = CacheWriter.open(job.cache)
    writer.clean_tmp(job.shard["index"])
    arrays, info = compute_shard(job)
    return commit_shard(job, arrays, info, writer)


def commit_shard(job: ShardJob, arrays: dict[str, np.ndarray], info: dict[str, Any],
                 writer: CacheWriter | None = None) -> dict[str, Any]:
    """Write and commit the arrays `compute_shard` returned, with the plan entry in the record, through
    `writer` (by default the writer of the planned cache at `job.cache`)."""
    shard = job.shard
    have = committed_dtype(job.cache)
    if have is not None and have != info["dtype"]:
        raise KdError(f"shard {shard['index']} was computed in {info['dtype']} but the cache's committed shards are "
                      f"{have}: one cache holds one precision (pass --dtype {have}, or --overwrite to start again)")
    plan = {key: shard[key] for key in ("index", "example_start", "example_stop", "row_start", "row_stop")}
    writer = writer or CacheWriter.open(job.cache)
    return writer.write_shard(shard["index"], arrays, {**plan, **info})


def committed_dtype(cache: str | Path) -> str | None:
    """The dtype the cache's first committed shard was computed in (None before any is committed).
    `cache`: a directory or a URL."""
    from pipeline.cache import layout

    for i in layout.committed_shards(cache):
        try:
            return layout.read_commit(cache, i).get("dtype")
        except KdError:
            continue
    return None


class _HostBuffers:
    """Two alternating sets of host buffers for a batch's results.

    The worker scatters batch i's results only after batch i + 1's copies are queued (so on a GPU the
    copies and the host-side work overlap compute), so batch i + 1 must write into the other set. That
    logic (which set, when a buffer grows, the slices handed out) is the same on every device, and
    tests/teacher/test_host_buffers.py exercises it on CPU. What differs is isolated in `_host_empty` and
    `_copy_to_host`: on CUDA the buffers are pinned (a GPU copies into pinned memory asynchronously;
    pageable memory would make every copy synchronous) and `copy` returns before the copies are done,
    with a handle to wait on; elsewhere the copies are done when `copy` returns. bench/gpu_suite.py
    (part cuda_paths) compares the CUDA path with the CPU one on the same batches.
    """

    def __init__(self, device: torch.device):
        self.asynchronous = device.type == "cuda"
        self.sets: list[dict[str, torch.Tensor]] = [{}, {}]
        self.turn = 0

    def copy(self, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Any]:
        """(host tensors, a handle whose `synchronize()` waits for the copies, or None when they are done)."""
        bufs = self.sets[self.turn]
        self.turn ^= 1
        out = {}
        for n, t in tensors.items():
            b = bufs.get(n)
            if b is None or b.shape[0] < t.shape[0] or b.shape[1:] != t.shape[1:] or b.dtype != t.dtype:
                b = bufs[n] = _host_empty((max(t.shape[0], 1024),) + tuple(t.shape[1:]), t.dtype, self.asynchronous)
            out[n] = b[: t.shape[0]]
        return out, _copy_to_host(out, tensors, self.asynchronous)


def _host_empty(shape: tuple[int, ...], dtype: torch.dtype, pinned: bool) -> torch.Tensor:
    """A host buffer; pinned (page-locked, CUDA only) for asynchronous copies from a GPU."""
    return torch.empty(shape, dtype=dtype, pin_memory=pinned)


class _Copies:
    """The copies `_copy_to_host` queued: `synchronize()` waits for all of them."""

    def __init__(self, events: list[Any]):
        self.events = events

    def synchronize(self) -> None:
        for e in self.events:
            e.synchronize()


def _copy_to_host(dst: dict[str, torch.Tensor], src: dict[str, torch.Tensor], asynchronous: bool) -> _Copies | None:
    """Copy each src tensor into dst[name]. asynchronous (CUDA): queued on the current stream of each source
    GPU, with one event per GPU (with device_map the statistics and the target ids may come from two
    GPUs); returns what to wait on. Otherwise the copies are done now: None."""
    for n, t in src.items():
        dst[n].copy_(t, non_blocking=asynchronous)
    if not asynchronous:
        return None
    events = []
    for index in sorted({t.device.index for t in src.values() if t.is_cuda}):
        with torch.cuda.device(index):
            e = torch.cuda.Event()
            e.record()
            events.append(e)
    return _Copies(events)
