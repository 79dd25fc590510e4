"""Computing one shard of the cache: run the teacher over the shard's examples, encode, commit.

A shard's result depends only on its own examples (its batches are formed from them alone and the
tail sampler is seeded by the shard's index), so any process, in any order, recomputes a shard
to the same bytes on the same hardware: the basis of restart and of multi-worker runs.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.batching import token_budget_batches
from pipeline.cache import format as fmt
from pipeline.cache.writer import clean_tmp, write_shard
from pipeline.errors import KdError
from pipeline.models import load_causal_lm, pick_device, pick_dtype
from pipeline.teacher_stats import NonFiniteLogits, auto_chunk_rows, head_spec, rows_from_hidden

log = logging.getLogger(__name__)

_MODEL: dict[str, Any] = {}  # one loaded teacher per process (Dask workers reuse it across shards)


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


def get_model(model: str, device: str, dtype: str) -> tuple[Any, torch.device]:
    """Load (once per process) the teacher in eval mode."""
    key = f"{model}|{device}|{dtype}"
    if key not in _MODEL:
        _MODEL.clear()
        dev = pick_device(_device_for_worker(device))
        _MODEL[key] = (load_causal_lm(model, dev, pick_dtype(dtype, dev)), dev)
    return _MODEL[key]


def _shard_generator(seed: int, shard: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + shard) % (2**63))
    return g


@torch.no_grad()
def compute_shard(job: dict[str, Any]) -> dict[str, np.ndarray]:
    """Run the teacher over shard `job['index']`; returns its encoded arrays (rows in dataset order).

    job: cache path, prepared data path, shard plan entry, and the teacher settings (see
    `pipeline.teacher.shard_job`).
    """
    from pipeline.prepare import load_prepared

    shard, k, v = job["shard"], job["top_k"], job["vocab_size"]
    model, dev = get_model(job["model"], job["device"], job["dtype"])
    ds = load_prepared(job["data"]).select(range(shard["example_start"], shard["example_stop"]))
    ids_list, mask_list = ds["input_ids"], ds["loss_mask"]
    n = shard["row_stop"] - shard["row_start"]
    g = len(job["temperatures"])
    s = job["tail_samples"]
    out = {
        "topk_ids": np.zeros((n, k), fmt.id_dtype(v)), "topk_logprobs": np.zeros((n, k), np.uint16),
        "entropy": np.zeros(n, np.float16), "log_partition": np.zeros((n, g), np.float16),
        "target_ids": np.zeros(n, fmt.id_dtype(v)), "target_logprobs": np.zeros(n, np.float16),
    }
    if s:
        out["tail_ids"] = np.full((n, s), -1, np.int32)
        out["tail_counts"] = np.zeros((n, s), np.uint16)
    # Row offset of each example inside the shard (targets are positions t >= 1 with mask 1).
    counts = [int(np.count_nonzero(np.asarray(m[1:]))) for m in mask_list]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    assert offsets[-1] == n, f"shard {shard['index']}: {offsets[-1]} targets, plan says {n}"

    head = head_spec(model, v)
    betas = torch.tensor([1.0 / t for t in job["temperatures"]], dtype=torch.float32)
    chunk_rows = job["head_chunk_rows"] or auto_chunk_rows(v)
    gen = _shard_generator(job["seed"], shard["index"], dev) if s else None
    lengths = [len(x) for x in ids_list]
    for batch in token_budget_batches(lengths, job["batch_tokens"]):
        batch = [e for e in batch if counts[e]]
        if not batch:
            continue
        width = max(lengths[e] for e in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        att = torch.zeros((len(batch), width), dtype=torch.long)
        for b, e in enumerate(batch):
            ids[b, : lengths[e]] = torch.as_tensor(ids_list[e])
            att[b, : lengths[e]] = 1
        ids, att = ids.to(dev, non_blocking=True), att.to(dev, non_blocking=True)
        hidden = model.base_model(input_ids=ids, attention_mask=att).last_hidden_state  # [B, L, H]
        # Position t is predicted from the hidden state at t - 1.
        rows_b, rows_t = [], []
        for b, e in enumerate(batch):
            t = np.nonzero(np.asarray(mask_list[e]))[0]
            t = t[t >= 1]
            rows_b.append(np.full(len(t), b))
            rows_t.append(t)
        rb = torch.as_tensor(np.concatenate(rows_b), device=dev)
        rt = torch.as_tensor(np.concatenate(rows_t), device=dev)
        try:
            stats = rows_from_hidden(hidden[rb, rt - 1], ids[rb, rt], head, k, betas.to(dev), chunk_rows, s, gen)
        except NonFiniteLogits as bad:
            e = batch[int(rb[bad.row])]
            raise KdError(f"teacher logits are not finite for example {shard['example_start'] + e} "
                          f"at position {int(rt[bad.row])} (model {job['model']}, dtype {job['dtype']})") from None
        stats = {name: t.cpu() for name, t in stats.items()}
        target_ids = ids[rb, rt].cpu().numpy()
        # Scatter the batch's rows (grouped per example, in batch order) to dataset order.
        pos = 0
        for e, t in zip(batch, rows_t):
            dst = slice(offsets[e], offsets[e] + len(t))
            src = slice(pos, pos + len(t))
            out["topk_ids"][dst] = stats["topk_ids"][src].numpy()
            out["topk_logprobs"][dst] = fmt.encode_logprobs(stats["topk_logprobs"][src].numpy())
            out["entropy"][dst] = stats["entropy"][src].numpy()
            out["log_partition"][dst] = stats["log_partition"][src].numpy()
            out["target_ids"][dst] = target_ids[src]
            out["target_logprobs"][dst] = np.maximum(stats["target_logprobs"][src].numpy(), -65000.0)
            if s:
                out["tail_ids"][dst] = stats["tail_ids"][src].numpy()
                out["tail_counts"][dst] = stats["tail_counts"][src].numpy()
            pos += len(t)
    return out


def run_shard_job(job: dict[str, Any]) -> dict[str, Any]:
    """Compute and commit one shard (the unit of work of every execution mode)."""
    cache = Path(job["cache"])
    shard = job["shard"]
    clean_tmp(cache, shard["index"])
    arrays = compute_shard(job)
    info = {"index": shard["index"], "example_start": shard["example_start"], "example_stop": shard["example_stop"],
            "row_start": shard["row_start"], "row_stop": shard["row_stop"]}
    return write_shard(cache, shard["index"], arrays, info, job["chunk_rows"], job["clevel"])
