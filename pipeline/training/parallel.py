"""How the student-plus-loss module is spread over the ranks of `kdcache train`: FSDP with --fsdp
(`pipeline.training.fsdp`: layers and the root sharded, bf16 compute on CUDA), else DDP around the whole
objective with several ranks, else nothing; and the full weights of a sharded model, for checkpoints."""

from __future__ import annotations

from typing import Any

import torch


def parallelize(net: torch.nn.Module, model: Any, device: torch.device, fsdp: bool, dtype: str,
                world: int) -> tuple[torch.nn.Module, bool]:
    """(the module to train through, whether FSDP computes in bf16: autocast must then be off). `net` holds
    `model`; FSDP shards both in place. Build the optimizer afterwards: FSDP's parameters are DTensors."""
    if fsdp:
        from pipeline.training.fsdp import shard

        bf16 = device.type == "cuda" and dtype in ("auto", "bfloat16")
        shard(net, model, device, bf16)
        return net, bf16  # with bf16, FSDP's mixed-precision policy already computes in bf16
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(net, device_ids=[device.index] if device.type == "cuda" else None), False
    return net, False


def full_weights(model: Any, fsdp: bool) -> dict[str, torch.Tensor] | None:
    """Under FSDP the model's full state dict, gathered (every rank must call it); None otherwise."""
    if not fsdp:
        return None
    from pipeline.training.fsdp import full_model_state

    return full_model_state(model)
