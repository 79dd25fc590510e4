"""The ranks of `kdcache train` under torchrun: the process group, and what the trainer agrees on across ranks.

Every function here is a no-op on one process (WORLD_SIZE unset or 1); with several ranks each is a
collective: every rank must call it, at the same point of the run.
"""

from __future__ import annotations

import os
from typing import Any, Iterable

import torch


def init_dist() -> tuple[int, int]:
    """(rank, world) under torchrun, initialising the process group once."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world


def all_sum(values: list[float], world: int, device: torch.device) -> list[float]:
    """`values` summed over the ranks (float64); returned as given with one rank."""
    if world == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def any_rank(flag: bool, world: int, device: torch.device) -> bool:
    """Whether `flag` is set on any rank (a Ctrl-C on one rank stops them all at the same step)."""
    if world == 1:
        return flag
    return all_sum([float(flag)], world, device)[0] > 0


def all_finite(params: Iterable[torch.Tensor], world: int, device: torch.device) -> bool:
    """Whether every parameter is finite, on every rank (each checks its own shard under FSDP; all agree)."""
    local = all(bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()) for p in params)
    return all_sum([0.0 if local else 1.0], world, device)[0] == 0.0


def gather_per_rank(obj: Any, world: int) -> list[Any]:
    """Every rank's `obj`, in rank order (world > 1)."""
    import torch.distributed as dist

    per_rank: list[Any] = [None] * world
    dist.all_gather_object(per_rank, obj)
    return per_rank
