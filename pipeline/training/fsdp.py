"""Students that do not fit one GPU with their optimizer state: FSDP2 (`torch.distributed.fsdp.fully_shard`).

    torchrun --nproc_per_node 8 $(which kdcache) train --cache CACHE --student Qwen/Qwen2.5-3B --out runs/kd \
        --fsdp --activation-checkpointing

Every decoder layer is one FSDP unit (its parameters, gradients and AdamW state live 1/world on each rank
and are gathered only for its forward and backward), and the student-plus-loss module is the root unit,
so the output head is gathered inside that module's forward, where the chunked loss uses it
(pipeline/losses/chunked.py). On CUDA the layers compute in bf16 with float32 gradient reduction
(`MixedPrecisionPolicy`); on CPU everything stays float32 (gloo, the tests).

Checkpoints and `final/` hold FULL state dicts, gathered collectively (every rank must call
`full_model_state` / `full_optimizer_state`; rank 0 writes): a checkpoint is a normal Hugging Face
directory that resumes under FSDP or not, and `final/` loads with `from_pretrained` anywhere.
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.errors import KdError


def decoder_layers(model: Any) -> list[torch.nn.Module]:
    """The model's repeated blocks: the modules whose class Hugging Face marks as not to be split."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise KdError(f"{type(model).__name__} names no decoder-layer class (_no_split_modules): cannot shard it "
                      "layer by layer with --fsdp")
    return layers


def shard(objective: torch.nn.Module, model: Any, device: torch.device, bf16: bool) -> torch.nn.Module:
    """Apply FSDP2 to `model`'s decoder layers, then to `objective` (the root holding `model`). In place;
    returns `objective`. Build the optimizer afterwards: the parameters become DTensors."""
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise KdError("--fsdp needs torchrun (one process per GPU)")
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=policy)
    fully_shard(objective, mp_policy=policy)
    return objective


def full_model_state(model: Any) -> dict[str, torch.Tensor]:
    """The model's full state dict on CPU (collective: every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model: Any, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's full state dict on CPU, keyed by parameter name (collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_states(model: Any, optimizer: torch.optim.Optimizer, weights: dict[str, torch.Tensor],
                     optim_state: dict[str, Any] | None) -> None:
    """Load full state dicts (as `full_*_state` made them, read by every rank) into the sharded model."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, weights, options=opts)
    if optim_state is not None:
        set_optimizer_state_dict(model, optimizer, optim_state, options=opts)


def local_norm(value: Any) -> float:
    """A (possibly DTensor) scalar as a Python float: clip_grad_norm_ over FSDP parameters returns a DTensor."""
    if hasattr(value, "full_tensor"):
        value = value.full_tensor()
    return float(value)
