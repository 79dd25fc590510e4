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
def select_top_entropy(entropy: Tensor, eligible: Tensor, groups: Tensor | None, ratio: float) -> Tensor:
    """Keep the top `ratio` of each group's eligible rows by entropy.

    entropy [N] float, eligible [N] bool, groups [N] int64 (the sequence of each row; None = one group),
    ratio in (0, 1] -> keep [N] bool, a subset of `eligible`.
    """
    n = entropy.shape[0]
    if n == 0:
        return eligible.clone()
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must lie in (0, 1], got {ratio}")
    dev = entropy.device
    g = groups.to(dev, torch.int64) if groups is not None else torch.zeros(n, dtype=torch.int64, device=dev)
    # Order rows by group, then entropy descending, then index: two stable sorts (the second keeps the first's
    # order within a group). Ineligible rows go last in their group (-inf) and are never counted or kept.
    score = torch.where(eligible, entropy.float(), torch.full_like(entropy, -math.inf, dtype=torch.float32))
    by_score = torch.sort(score, descending=True, stable=True).indices
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
