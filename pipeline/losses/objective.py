"""The distillation objective per micro-batch (methods.md §5): the one place the KD methods are composed.

    target positions -> SpecKD gate (weights) -> SE-KD selection among positions with weight > 0
    -> LATF among those -> IDTS temperatures -> the teacher's tail at each row's temperature
    -> divergence per position on K + 1 buckets
    -> numerator  = sum_t w_t * T_t^2 * D_t,   denominator = sum_t w_t

`RowSignals` gathers what the composition reads from the student (its proposal, log q of it, its entropy, the
Hellinger difficulty), from full logits or a row chunk at a time; `plan_kd` turns them into one `KdPlan` (the
gate -> selection -> LATF -> IDTS -> tail decisions). Both objectives consume that plan: `kd_terms` here on
full logits (`pipeline.interop.loss_module`), and the chunked loss (`pipeline.losses.chunked`) that
`kdcache train` runs. The caller divides the numerator by the denominator summed over the *whole optimizer
step*, so splitting a step into micro-batches does not change the gradient. Gate, difficulty and
temperatures are computed without gradient, at temperature 1 for the gate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from pipeline.losses.adakd import LATF, idts_temperatures
from pipeline.losses.divergences import hellinger, kd_divergence, teacher_log_buckets
from pipeline.losses.gate import propose, verify
from pipeline.losses.options import KdOptions
from pipeline.losses.sampled import SampledTeacher, check_sampled, sampled_kd_divergence, sampled_teacher
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
# ... with --tail sampled: the draws, and their log-probs where the cache has them (what re-tempers them).
SAMPLED_FIELDS = ("tail_ids", "tail_counts", "tail_logprobs")


def kd_fields(tail: str, draw_logprobs: bool = True) -> tuple[str, ...]:
    """The cache fields the KD loss reads under tail policy `tail`; draw_logprobs: whether the cache stores the
    draws' log-probs (`CodecParams.draw_logprobs`; caches made before them serve fkl at T = 1 only)."""
    if tail != "sampled":
        return KD_FIELDS
    return KD_FIELDS + (SAMPLED_FIELDS if draw_logprobs else SAMPLED_FIELDS[:2])


def for_batch(s: KdOptions | None, cache: dict[str, Tensor] | None) -> KdOptions | None:
    """`s` with `--tail auto` resolved for these cache rows: sampled when they carry draws with log-probs and the
    loss admits them (`KdOptions.resolved_tail`), else bucket. The trainer and `KDLoss` resolve it once from the
    cache's record; this serves a caller that builds the objective from options alone."""
    if s is None or s.tail != "auto" or cache is None:
        return s
    draws = "tail_ids" in cache and "tail_logprobs" in cache
    return replace(s, tail=s.resolved_tail(int(draws), draws))


def gate_generator(seed: int, rank: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The gate's random stream (sampled proposals, the spec rule's uniforms) for one DDP rank.

    Seeded per rank: with one shared seed every rank would draw the same uniforms for its own, different
    rows, correlating the gate's decisions across the global batch.
    """
    g = torch.Generator(device=device)
    g.manual_seed(seed + 7919 + 1_000_003 * rank)
    return g


class RowSignals:
    """What the KD composition reads from the student, for N target rows (all detached, float32 [N]).

    Filled a slice of rows at a time by `add` (full logits: one slice; the chunked loss: one per chunk, so no
    [N, V] tensor is needed). Only the signals the options use are computed: the gate's proposal ŷ (and
    log q(ŷ) for the spec rule), the student's entropy (SE-KD), the Hellinger difficulty at T = 1 (LATF, IDTS).
    """

    def __init__(self, n: int, s: KdOptions, device: torch.device):
        gate = s.gate != "none"
        self.proposals = torch.empty(n, dtype=torch.int64, device=device) if gate else None
        self.log_q = torch.empty(n, dtype=torch.float32, device=device) if gate and s.gate == "spec" else None
        self.entropy = torch.empty(n, dtype=torch.float32, device=device) if s.select != "none" else None
        self.difficulty = torch.empty(n, dtype=torch.float32, device=device) if (s.latf or s.idts) else None
        self.proposal = s.proposal

    @torch.no_grad()
    def add(self, a: int, z: Tensor, cache: dict[str, Tensor], vocab_size: int,
            generator: torch.Generator | None, lse: Tensor | None = None) -> None:
        """Rows [a, a + C): z [C, Vs] the student's float32 logits at T = 1; cache the N rows' cache fields;
        lse [C] logsumexp of z when the caller has it. Draws the proposals in row order (slices in order)."""
        b = a + z.shape[0]
        if self.proposals is not None:
            self.proposals[a:b] = propose(z, self.proposal, generator)
            if self.log_q is not None:
                lse = torch.logsumexp(z, dim=-1) if lse is None else lse
                self.log_q[a:b] = z.gather(1, self.proposals[a:b, None]).squeeze(1) - lse
        if self.entropy is not None:
            self.entropy[a:b] = student_entropy(z)
        if self.difficulty is not None:
            ones = torch.ones(b - a, device=z.device)
            log_p1 = teacher_log_buckets(cache["topk_logprobs"][a:b].float(), cache["tail_logprob"][a:b].float(), ones)
            self.difficulty[a:b] = hellinger(log_p1, ranking_log_buckets(z, cache["topk_ids"][a:b], vocab_size))


@dataclass
class KdPlan:
    """The KD decisions for N target rows (all detached).

    weight [N] the gate's weight (1 without a gate); keep [N] bool, rows whose divergence enters the loss;
    temps [N] per-row temperature; tail_beta [N] the teacher's tail power sum T(1/T) at each kept row's
    temperature (-inf elsewhere); accepted: rows the gate accepted.
    """

    weight: Tensor
    keep: Tensor
    temps: Tensor
    tail_beta: Tensor
    accepted: int

    @classmethod
    def nothing(cls, n: int, device: torch.device) -> "KdPlan":
        """No KD (cross-entropy only): no row kept."""
        return cls(torch.zeros(n, device=device), torch.zeros(n, dtype=torch.bool, device=device),
                   torch.ones(n, device=device), torch.full((n,), -math.inf, device=device), 0)

    @property
    def kept(self) -> int:
        return int(self.keep.sum())

    @property
    def denominator(self) -> float:
        """Σ w over the kept rows: the micro-batch's share of the KD normaliser."""
        return float(self.weight[self.keep].sum())


@torch.no_grad()
def plan_kd(sig: RowSignals, cache: dict[str, Tensor], s: KdOptions, vocab_size: int, grid_betas: Tensor,
            latf: LATF | None, generator: torch.Generator | None, groups: Tensor | None = None) -> KdPlan:
    """gate -> SE-KD selection -> LATF -> IDTS -> the tail at each kept row's temperature (methods.md §5).

    sig the rows' `RowSignals`; cache (decoded, `KD_FIELDS`) topk_ids [N, K], topk_logprobs [N, K],
    tail_logprob [N], tail_entropy [N], tail_log_partition [N, G]; vocab_size the teacher's V; grid_betas [G]
    = 1 / the cache's temperatures; groups [N] the sequence of each row (SE-KD selects per sequence; None =
    one sequence). The gate's uniforms are drawn after every proposal (the order `gate.speckd_gate` uses).
    """
    ids, lps, tail_lp = cache["topk_ids"], cache["topk_logprobs"].float(), cache["tail_logprob"].float()
    n, dev = ids.shape[0], ids.device
    if s.gate != "none":
        g = verify(sig.proposals, sig.log_q, ids, lps, tail_lp, vocab_size, rule=s.gate, gate_k=s.gate_k,
                   threshold=s.gate_threshold, reject_weight=s.reject_weight, generator=generator)
        weight, accepted = g.weight.float(), int(g.accepted.sum())
    else:
        weight, accepted = torch.ones(n, device=dev), n
    eligible = weight > 0
    if sig.entropy is not None:
        eligible = select_top_entropy(sig.entropy, eligible, groups, s.select_ratio)
    keep = latf.select(sig.difficulty, eligible) if (s.latf and latf is not None) else eligible
    if s.idts:
        temps = idts_temperatures(sig.difficulty, keep, t_base=s.temperature, c=s.idts_c)
    else:
        temps = torch.full((n,), float(s.temperature), device=dev)
    tail_beta = torch.full((n,), -math.inf, device=dev)
    rows = keep.nonzero().squeeze(1)
    if rows.numel():  # the teacher's tail at each row's temperature, from the cached tail statistics
        tail_beta[rows] = tail_log_partition_at(1.0 / temps[rows], grid_betas.to(dev),
                                                cache["tail_log_partition"][rows].float(), tail_lp[rows],
                                                cache["tail_entropy"][rows].float(), vocab_size - ids.shape[1])
    return KdPlan(weight, keep, temps, tail_beta, accepted)


def divergence_of_rows(s: KdOptions, z: Tensor, cache: dict[str, Tensor], plan: KdPlan, rows: Tensor,
                       vocab_size: int) -> Tensor:
    """D per kept row at the plan's temperatures: z [R, Vs] the student's logits of the kept rows; rows [R] their
    indices into `cache` and `plan`. tail "sampled": the tail estimated from the cached draws (`losses.sampled`)."""
    t = plan.temps[rows]
    if s.tail == "sampled":
        if "tail_ids" not in cache:
            raise ValueError("tail 'sampled' needs the cache rows' tail draws (fields tail_ids, tail_counts)")
        check_sampled(s.loss, "tail_logprobs" in cache, t)
        teacher = sampled_teacher_of(cache, rows, plan.tail_beta[rows], 1.0 / t)
        return sampled_kd_divergence(s.loss, z, cache["topk_ids"][rows], teacher, t, vocab_size)
    return kd_divergence(s.loss, z, cache["topk_ids"][rows], cache["topk_logprobs"][rows].float(),
                         plan.tail_beta[rows], 1.0 / t, t, vocab_size, tail=s.tail)


def sampled_teacher_of(cache: dict[str, Tensor], rows: Tensor, tail_beta: Tensor, beta: Tensor) -> SampledTeacher:
    """`sampled.sampled_teacher` of cache rows [R] at their temperatures (tail_beta [R] = T(beta), beta [R])."""
    lps = cache.get("tail_logprobs")
    return sampled_teacher(cache["topk_logprobs"][rows].float(), cache["tail_logprob"][rows].float(), tail_beta, beta,
                           cache["tail_ids"][rows], cache["tail_counts"][rows],
                           lps[rows].float() if lps is not None else None)


@dataclass
class KdTerms:
    """Sums over one micro-batch: numerator (differentiable), denominator, and counts for logging."""

    numerator: torch.Tensor
    denominator: float
    targets: int
    accepted: int
    kept: int
    temps: torch.Tensor  # [kept] temperatures used


def kd_terms(logits: torch.Tensor, cache: dict[str, torch.Tensor], s: KdOptions, vocab_size: int,
             grid_betas: torch.Tensor, latf: LATF | None, generator: torch.Generator | None,
             groups: torch.Tensor | None = None) -> KdTerms:
    """KD sums of N target positions from full logits.

    logits [N, Vs] (student, at the targets, with gradient; ids >= vocab_size are a padded head and
    belong to neither distribution); cache (decoded, `KD_FIELDS`): topk_ids [N, K] int64,
    topk_logprobs [N, K], tail_logprob [N], tail_entropy [N], tail_log_partition [N, G], optional
    tail_ids/tail_counts/tail_logprobs [N, S] (`SAMPLED_FIELDS`); grid_betas [G] = 1 / cache temperatures;
    vocab_size: the teacher's V; groups [N] the sequence of each row (SE-KD selects per sequence; None = one sequence).
    """
    s = for_batch(s, cache)
    n = logits.shape[0]
    sig = RowSignals(n, s, logits.device)
    sig.add(0, logits.detach().float(), cache, vocab_size, generator)
    plan = plan_kd(sig, cache, s, vocab_size, grid_betas, latf, generator, groups)
    rows = plan.keep.nonzero().squeeze(1)
    if rows.numel() == 0:
        return KdTerms(logits.sum() * 0.0, 0.0, n, plan.accepted, 0, plan.temps[:0])
    t = plan.temps[rows]
    d = divergence_of_rows(s, logits[rows], cache, plan, rows, vocab_size)
    w = plan.weight[rows]
    return KdTerms((w * t * t * d).sum(), float(w.sum()), n, plan.accepted, int(rows.numel()), t)
