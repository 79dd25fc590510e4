"""The optimizer of `kdcache train` and its schedule: how many steps the run plans, AdamW with weight decay
off for norms and biases, the learning-rate multiplier per step, and the optimizer's state in a checkpoint
(full state dicts under FSDP, `pipeline.training.fsdp`)."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from pipeline.training.config import TrainConfig


def lr_lambda(cfg: TrainConfig, total: int) -> Callable[[int], float]:
    """Multiplier of cfg.lr at step s: linear warm-up, then constant / linear / cosine to min_lr_ratio."""

    def f(step: int) -> float:
        if cfg.warmup and step < cfg.warmup:
            return (step + 1) / cfg.warmup
        if cfg.schedule == "constant":
            return 1.0
        frac = min(1.0, (step - cfg.warmup) / max(1, total - cfg.warmup))
        decay = 1.0 - frac if cfg.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * decay

    return f


def planned_steps(cfg: TrainConfig, stream: Any) -> int:
    """Optimizer steps of the run: --max-steps, else --epochs (default 1) of `stream`'s micro-batches."""
    if cfg.max_steps:
        return cfg.max_steps
    epochs = cfg.epochs or 1.0
    per_epoch = [stream.batches_in_epoch(e) for e in range(math.ceil(epochs))]
    micro = sum(per_epoch[:-1]) + per_epoch[-1] * (epochs - (len(per_epoch) - 1))
    return max(1, int(micro // cfg.grad_accum))


def make_optimizer(model: Any, cfg: TrainConfig, total: int) -> tuple[torch.optim.Optimizer, Any]:
    """(AdamW, its LambdaLR schedule) over `model`'s parameters: no weight decay on vectors and norms.
    Under FSDP call it after sharding: the parameters are then DTensors, which the optimizer must hold."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total))


def optimizer_state(model: Any, optimizer: torch.optim.Optimizer, fsdp: bool) -> dict[str, Any]:
    """The optimizer's state for a checkpoint; under FSDP the full state, gathered (a collective)."""
    if fsdp:
        from pipeline.training.fsdp import full_optimizer_state

        return full_optimizer_state(model, optimizer)
    return optimizer.state_dict()


def load_model_and_optimizer(model: Any, optimizer: torch.optim.Optimizer, weights: dict[str, torch.Tensor],
                             optim_state: dict[str, Any], fsdp: bool) -> None:
    """Load a checkpoint's full weights and optimizer state; under FSDP every rank keeps its shards."""
    if fsdp:
        from pipeline.training.fsdp import load_full_states

        load_full_states(model, optimizer, weights, optim_state)
    else:
        model.load_state_dict(weights)
        optimizer.load_state_dict(optim_state)
