"""SE-KD position selection (Tavor et al., 2026, "Rethinking Selective Knowledge Distillation"): distil only
the positions where the *student* is least sure, the top fraction of each sequence by student entropy.

methods.md §4b fixes the rules:
- Entropy H(q) of the student's softmax over its whole head at T = 1 (padded ids included, as its CE),
  detached: selection never has a gradient.
- Per sequence: of the n eligible target positions of a sequence (weight > 0 after the SpecKD gate, all of
  them without one), keep ceil(ratio·n − 1e-9) with the highest entropy (at least one when n ≥ 1); ties
  keep the lower row index. Per sequence, not per micro-batch, so the selection does not depend on how a
  step is split into micro-batches (the authors select per example).
- Composition (methods.md §5): gate -> SE-KD selection -> LATF among the selected -> IDTS.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

SELECTIONS = ("none", "student_entropy")


@torch.no_grad()
def student_entropy(logits: Tensor) -> Tensor:
    """H(softmax(logits)) per row, in nats: logits [N, Vs] -> [N] float32 (float32 arithmetic)."""
    z = logits.float()
    z = z - z.max(dim=-1, keepdim=True).values  # large logits (|z| ~ 1e4) would lose the entropy to round-off
    logq = z - torch.logsumexp(z, dim=-1, keepdim=True)
    return -(logq.exp() * logq).sum(-1)


@torch.no_grad()
def keep_top_fraction(score: Tensor, eligible: Tensor, ratio: float, groups: Tensor | None = None) -> Tensor:
    """Keep ceil(ratio·n − 1e-9) of the n eligible rows with the highest score, per group (at least one of a
    group with any); ties keep the lower row index. The one selection rule of SE-KD (per sequence) and
    LATF (per micro-batch, `groups` None: no host sync, the count stays on the device).

    score [N] float, eligible [N] bool, ratio in (0, 1], groups [N] int64 or None -> keep [N] bool ⊆ eligible.
    """
    n = score.shape[0]
    if n == 0:
        return eligible.clone()
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must lie in (0, 1], got {ratio}")
    dev = score.device
    # Ineligible rows sort last (-inf) and are never counted or kept; float64 keeps every float32 score distinct.
    key = torch.where(eligible, score.detach().to(torch.float64), torch.full((n,), -math.inf, dtype=torch.float64,
                                                                             device=dev))
    by_score = torch.sort(key, descending=True, stable=True).indices
    if groups is None:
        rank = torch.empty_like(by_score).scatter_(0, by_score, torch.arange(n, device=dev))
        quota = torch.ceil(eligible.sum().to(torch.float64) * ratio - 1e-9).clamp(min=1.0)
        return eligible & (rank < quota)
    # Per group: then a stable sort by group keeps the score order within each group.
    g = groups.to(dev, torch.int64)
    order = by_score[torch.sort(g[by_score], stable=True).indices]
    gs = g[order]
    start = torch.ones(n, dtype=torch.bool, device=dev)
    start[1:] = gs[1:] != gs[:-1]
    first = torch.cummax(torch.where(start, torch.arange(n, device=dev), torch.zeros(n, dtype=torch.long, device=dev)),
                         0).values
    rank = torch.arange(n, device=dev) - first  # position of each sorted row within its group
    _, inverse = torch.unique_consecutive(gs, return_inverse=True)
    n_eligible = torch.zeros(int(inverse.max()) + 1, dtype=torch.float64, device=dev)
    n_eligible.index_add_(0, inverse, eligible[order].double())
    quota = torch.ceil(n_eligible * ratio - 1e-9).clamp(min=1.0)
    keep_sorted = eligible[order] & (rank < quota[inverse])
    keep = torch.zeros(n, dtype=torch.bool, device=dev)
    keep[order] = keep_sorted
    return keep


def select_top_entropy(entropy: Tensor, eligible: Tensor, groups: Tensor | None, ratio: float) -> Tensor:
    """SE-KD: keep the top `ratio` of each group's eligible rows by student entropy (`keep_top_fraction`).

    entropy [N] float, eligible [N] bool, groups [N] int64 (the sequence of each row; None = one group),
    ratio in (0, 1] -> keep [N] bool, a subset of `eligible`.
    """
    return keep_top_fraction(entropy, eligible, ratio, groups)
