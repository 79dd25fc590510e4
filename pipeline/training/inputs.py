"""What a `kdcache train` run reads, checked before anything is trained: the prepared data (--data, or the data
the cache was made from), and whether the cache can serve the objective (the gate's K, tail samples, the
temperature grid). Each refusal is one line saying what to pass instead."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.errors import KdError
from pipeline.storage import is_url
from pipeline.training.config import TrainConfig


def data_path(cfg: TrainConfig, cache: Any | None) -> str:
    """The prepared data to train on: --data, else the data the cache was made from (still there)."""
    data = cfg.data or (cache.meta["data"]["path"] if cache else "")
    if not data:
        raise KdError("no training data: pass --data DIR (a `kdcache prepare` output)")
    if not cfg.data and not is_url(data) and not Path(data).is_dir():
        raise KdError(f"the cache's prepared data {data} is gone; pass --data DIR with the same prepared data")
    return data


def check_cache_serves(cfg: TrainConfig, cache: Any) -> None:
    """Refuse a gate or tail (the policy resolved for this cache: `--tail auto`) the cache cannot serve
    (distilling; checked before the stream is opened)."""
    if cfg.gate == "topk" and cfg.gate_k > cache.k:
        raise KdError(f"gate_k {cfg.gate_k} exceeds the cache's K = {cache.k}: the gate can only verify "
                      f"against cached ids (use --gate-k <= {cache.k} or a cache with a larger --top-k)")
    draws, logprobs = cache.tail_samples, cache.params.draw_logprobs
    cfg.for_cache(draws, logprobs).check_tail_draws(draws, logprobs, str(cfg.cache))


def check_temperatures(cfg: TrainConfig, grid: list[float]) -> None:
    """Refuse KD temperatures (IDTS's whole range) outside the cache's temperature grid (distilling)."""
    cfg.check_grid(grid)
