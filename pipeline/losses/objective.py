"""The distillation objective per micro-batch (methods.md §5), composed from the small pieces:

    target positions -> SpecKD gate (weights) -> SE-KD selection among positions with weight > 0
    -> LATF among those -> IDTS temperatures -> divergence per position on K + 1 buckets
    -> numerator  = sum_t w_t * T_t^2 * D_t,   denominator = sum_t w_t

The caller divides the numerator by the denominator summed over the *whole optimizer step*
(`pipeline.training.trainer`), so splitting a step into micro-batches does not change the gradient.
Gate, difficulty and temperatures are computed without gradient, at temperature 1 for the gate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.losses.adakd import LATF, idts_temperatures
from pipeline.losses.divergences import hellinger, kd_divergence, teacher_log_buckets
from pipeline.losses.gate import speckd_gate
from pipeline.losses.selection import select_top_entropy, student_entropy
from pipeline.losses.temperature import log1mexp, tail_log_partition_at


@torch.no_grad()
def ranking_log_buckets(logits: torch.Tensor, topk_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Student log-masses on K + 1 buckets at T = 1 for *ranking* positions by difficulty.

    logits [N, Vs], topk_ids [N, K], vocab_size the teacher's V -> [N, K + 1]. The tail is
    log(1 - sum of the head) instead of an exact masked logsumexp: two passes over [N, V] instead of
    about seven. In float32 the tail's absolute error is ~1e-7, so the Hellinger difficulty moves by at
    most ~3e-4; the loss itself always uses the exact tail (`divergences.student_log_buckets`).
    """
    z = logits[:, :vocab_size].float()
    head = z.gather(1, topk_ids) - torch.logsumexp(z, dim=-1, keepdim=True)
    total = torch.logsumexp(head, dim=-1).clamp(max=-1e-7)  # log of head mass, kept < 0 for log1mexp
    return torch.cat([head, log1mexp(total)[:, None]], dim=1)


# The cache fields the KD loss reads (`Cache.read(..., fields=KD_FIELDS)`); tail draws are added when used.
KD_FIELDS = ("topk_ids", "topk_logprobs", "tail_logprob", "tail_entropy", "tail_log_partition", "target_rank")


def gate_generator(seed: int, rank: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The gate's random stream (sampled proposals, the spec rule's uniforms) for one DDP rank.

    Seeded per rank: with one shared seed every rank would draw the same uniforms for its own, different
    rows, correlating the gate's decisions across the global batch.
    """
    g = torch.Generator(device=device)
    g.manual_seed(seed + 7919 + 1_000_003 * rank)
    return g


@dataclass
class KdSettings:
    """The KD options of a training run (a view of `TrainConfig`)."""

    loss: str = "fkl"
    tail: str = "bucket"
    gate: str = "none"
    proposal: str = "greedy"
    gate_k: int = 1
    gate_threshold: float = 0.1
    reject_weight: float = 0.0
    latf: bool = False
    idts: bool = False
    idts_c: float = 0.5
    temperature: float = 1.0
    select: str = "none"  # SE-KD position selection: none | student_entropy
    select_ratio: float = 0.2  # fraction of each sequence's eligible positions kept by the selection


@dataclass
class KdTerms:
    """Sums over one micro-batch: numerator (differentiable), denominator, and counts for logging."""

    numerator: torch.Tensor
    denominator: float
    targets: int
    accepted: int
    kept: int
    temps: torch.Tensor  # [kept] temperatures used


def kd_terms(logits: torch.Tensor, cache: dict[str, torch.Tensor], s: KdSettings, vocab_size: int,
             grid_betas: torch.Tensor, latf: LATF | None, generator: torch.Generator | None,
             groups: torch.Tensor | None = None) -> KdTerms:
    """KD sums of N target positions.

    logits [N, Vs] (student, at the targets, with gradient; ids >= vocab_size are a padded head and
    belong to neither distribution); cache (decoded, `KD_FIELDS`): topk_ids [N, K] int64,
    topk_logprobs [N, K], tail_logprob [N], tail_entropy [N], tail_log_partition [N, G], optional
    tail_ids/tail_counts [N, S]; grid_betas [G] = 1 / cache temperatures; vocab_size: the teacher's V;
    groups [N] the sequence of each row (SE-KD selects per sequence; None = one sequence).
    """
    n = logits.shape[0]
    dev = logits.device
    ids, lps = cache["topk_ids"], cache["topk_logprobs"].float()
    tail_lp = cache["tail_logprob"].float()
    with torch.no_grad():
        detached = logits.detach().float()
        if s.gate != "none":
            g = speckd_gate(detached, ids, lps, tail_lp, vocab_size, rule=s.gate, proposal=s.proposal,
                            gate_k=s.gate_k, threshold=s.gate_threshold, reject_weight=s.reject_weight,
                            generator=generator)
            weight, accepted = g.weight.float(), int(g.accepted.sum())
        else:
            weight, accepted = torch.ones(n, device=dev), n
        eligible = weight > 0
        if s.select == "student_entropy":
            eligible = select_top_entropy(student_entropy(detached), eligible, groups, s.select_ratio)
        if s.latf or s.idts:
            log_p1 = teacher_log_buckets(lps, tail_lp, torch.ones(n, device=dev))
            log_q1 = ranking_log_buckets(detached, ids, vocab_size)
            difficulty = hellinger(log_p1, log_q1)
        keep = latf.select(difficulty, eligible) if (s.latf and latf is not None) else eligible
        if s.idts:
            temps = idts_temperatures(difficulty, keep, t_base=s.temperature, c=s.idts_c)
        else:
            temps = torch.full((n,), float(s.temperature), device=dev)
    rows = keep.nonzero().squeeze(1)
    if rows.numel() == 0:
        return KdTerms(logits.sum() * 0.0, 0.0, n, accepted, 0, temps[:0])
    t = temps[rows]
    beta = 1.0 / t
    # The teacher's tail at each row's temperature, from the cached tail statistics (exact at T = 1).
    tail_beta = tail_log_partition_at(beta, grid_betas.to(dev), cache["tail_log_partition"][rows].float(),
                                      tail_lp[rows], cache["tail_entropy"][rows].float(), vocab_size - ids.shape[1])
    # "sampled" = the K + 1 buckets with the tail bucket split over the cached tail draws (T = 1 only).
    tail_ids = cache.get("tail_ids") if s.tail == "sampled" else None
    d = kd_divergence(s.loss, logits[rows], ids[rows], lps[rows], tail_beta, beta, t, vocab_size,
                      tail="bucket" if s.tail == "sampled" else s.tail,
                      tail_ids=tail_ids[rows] if tail_ids is not None else None,
                      tail_counts=cache["tail_counts"][rows] if tail_ids is not None else None)
    w = weight[rows]
    return KdTerms((w * t * t * d).sum(), float(w.sum()), n, accepted, int(rows.numel()), t)
