"""The sampled tail (methods.md §2): the teacher's tail estimated from S cached draws, at any temperature.

The teacher stage draws S ids j ~ π = p / r from the tail (the ids outside the top-K) and stores each distinct id
with its count c_j (Σ c = S) and log π_j (`tail_logprobs` - `tail_logprob`). At β = 1/T the tempered teacher
is p^T_j = p_j^β / e^A(β); the importance weight w_j = c_j / (S·π_j) makes any sum over the tail estimable:

    E[Σ_drawn w_j·f(p^T_j, q_j)] = Σ_tail f(p^T_j, q_j)        for every student q,

so an estimate built this way is unbiased in value and (w does not depend on the student) in gradient. Its
variance is (1/S)·(Σ_tail f_j²/π_j − (Σ_tail f_j)²). P̂_j = w_j·p^T_j estimates p^T_j; at T = 1 it is r·c_j/S,
which needs no log-prob (the caches written before draws had log-probs: fkl at T = 1 only, as before).

Each admitted divergence is its head terms over the K cached ids plus a tail sum written so that the estimated
part is weighted by the teacher's p^T_j, never by the student's q_j alone: for tvd, srkl and jsd's first part it is
at most a constant C times p^T_j, so its variance is at most C² times the tempering's own,
(1/S)·Σ_tail (p^T_j)²/π_j = (1/S)·(r^T)²·e^(A_π(2β−1) − 2A_π(β)); fkl and skl add a factor log(p/q):

    fkl   Σ p log(p/q)                                                          estimated
    skl   Σ p log(p/m), m = αp + (1−α)q                                          estimated
    tvd   ½Σ|p − q| = ½(r^T + Q_T) − Σ min(p, q)                                 exact part + estimated
    srkl  Σ q log(q/m), m = (1−α)p + αq:  −log α·Q_T − Σ q·log(1 + (1−α)p/(αq))   (q·log(1 + x·p/q) <= x·p)
    jsd   λ[−log λ·Q_T − Σ q·log(1 + (1−λ)p/(λq))] + (1−λ)·Σ p log(p/m),  m = (1−λ)p + λq

(sums over the tail; Q_T the student's exact mass outside the K ids). Refused, with the reason in `REFUSED`: rkl
and akl. A row without draws (K = V, or a tail that underflowed) keeps the plain K + 1 buckets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.losses.divergences import (
    NEG_INF,
    _dtype,
    _log_mix,
    _logaddexp,
    _student_log_masses,
    _summands,
    closed_form_grad,
    divergence,
)

SAMPLED_DIVERGENCES = ("fkl", "jsd", "tvd", "skl", "srkl")
# Why the others are refused with --tail sampled (one line each, the user's error message).
REFUSED = {
    "rkl": "rkl's tail terms q·log(q/p) are weighted by the student, not the teacher: draws from p estimate them "
           "with variance Σ q²·log²(q/p)/π, unbounded where the student has mass the teacher lacks; use --tail bucket",
    "akl": "akl mixes fkl and rkl with weights that are a ratio of Σ|P − Q| sums (biased under draws) and its rkl "
           "part is weighted by the student; use --tail bucket",
}


@dataclass
class SampledTeacher:
    """The teacher's side of the sampled tail for N rows at their temperatures (all detached).

    log_p_head [N, K] tempered head log p^T; log_p_tail [N] log r^T (the whole tail's tempered mass);
    ids [N, S] drawn ids (0 at pads: see `valid`); valid [N, S]; log_pw [N, S] log P̂_j = log(w_j·p^T_j);
    log_p_draw [N, S] log p^T_j and log_w [N, S] log w_j (None for a cache without draw log-probs: T = 1, fkl);
    has_draws [N]. Pads hold 0 in log_p_draw and -inf in log_w / log_pw.
    """

    log_p_head: Tensor
    log_p_tail: Tensor
    ids: Tensor
    valid: Tensor
    log_pw: Tensor
    log_p_draw: Tensor | None
    log_w: Tensor | None
    has_draws: Tensor


def check_sampled(name: str, with_logprobs: bool, temperature: Tensor | None = None) -> None:
    """ValueError (one line) for a divergence or a temperature the cached draws cannot serve."""
    if name in REFUSED:
        raise ValueError(f"a sampled tail cannot serve {name}: {REFUSED[name]}")
    if name not in SAMPLED_DIVERGENCES:
        raise ValueError(f"unknown divergence {name!r}; the sampled tail serves {', '.join(SAMPLED_DIVERGENCES)}")
    # Without tail_logprobs: a cache made before draws had log-probs, or rows read without that field
    # (`objective.kd_fields` names what the loss reads).
    if not with_logprobs:
        if name != "fkl":
            raise ValueError(f"a sampled tail serves {name} only with its draws' log-probs, which these cache rows "
                             "lack (a cache made before they were stored: re-run `kdcache teacher`; or rows read "
                             "without the field tail_logprobs); fkl at T = 1 needs none")
        if temperature is not None and bool((temperature != 1.0).any()):
            raise ValueError("a sampled tail is re-tempered with its draws' log-probs, which these cache rows lack (a "
                             "cache made before they were stored: re-run `kdcache teacher`; or rows read without the "
                             "field tail_logprobs); at T = 1 without IDTS it needs none")


def sampled_teacher(topk_logprobs: Tensor, tail_logprob: Tensor, tail_beta: Tensor, beta: Tensor, tail_ids: Tensor,
                    tail_counts: Tensor, tail_logprobs: Tensor | None = None) -> SampledTeacher:
    """The teacher's head, tail mass and importance-weighted draws at temperature 1/beta (methods.md §2).

    topk_logprobs [N, K] log p (T = 1, full vocabulary); tail_logprob [N] log r; tail_beta [N] = T(beta) = log Σ_tail
    p^beta (`temperature.tail_log_partition_at`); beta [N]; tail_ids [N, S] (-1 pads), tail_counts [N, S] (0 pads);
    tail_logprobs [N, S] log p_j of each drawn id at T = 1 (None: the cache lacks them; then beta must be 1).
    With A = log(Σ_K p^beta + e^T(beta)): log p^T = beta log p − A on the head and the draws, log r^T = T(beta) − A,
    log w_j = log(c_j / S) − (log p_j − log r).
    """
    dt = _dtype(topk_logprobs, tail_beta, beta)
    b = beta.detach().to(dt)[:, None]
    head = b * topk_logprobs.detach().to(dt)
    tail_beta = tail_beta.detach().to(dt)
    log_a = _logaddexp(torch.logsumexp(head, dim=-1), tail_beta)
    valid = (tail_counts > 0) & (tail_ids >= 0)
    counts = tail_counts.to(dt).masked_fill(~valid, 1.0)
    total = tail_counts.to(dt).masked_fill(~valid, 0.0).sum(-1, keepdim=True)
    log_c = torch.where(valid, counts.log() - total.clamp_min(1.0).log(), NEG_INF)  # log(c_j / S)
    log_p_tail = tail_beta - log_a
    if tail_logprobs is None:  # T = 1: P̂_j = r·c_j/S, no log-prob needed
        log_pw = torch.where(valid, log_c + log_p_tail[:, None], NEG_INF)
        log_p_draw = log_w = None
    else:
        lp = tail_logprobs.detach().to(dt).masked_fill(~valid, 0.0)
        log_share = lp - tail_logprob.detach().to(dt).masked_fill(~valid.any(-1), 0.0)[:, None]  # log π_j
        log_w = torch.where(valid, log_c - log_share, NEG_INF)
        log_p_draw = (b * lp - log_a[:, None]).masked_fill(~valid, 0.0)
        log_pw = torch.where(valid, log_w + log_p_draw, NEG_INF)
    return SampledTeacher(head - log_a[:, None], log_p_tail, tail_ids.clamp(min=0), valid, log_pw, log_p_draw, log_w,
                          valid.any(-1))


def sampled_divergence(name: str, t: SampledTeacher, log_q_head: Tensor, log_q_draw: Tensor, log_q_tail: Tensor,
                       lam: float = 0.9, alpha: float = 0.1, mu: float = 0.5) -> Tensor:
    """The estimate of D(p^T, q^T) over the whole vocabulary per row [N] (module docstring), from the student's
    log q^T on the head [N, K] and on the drawn ids [N, S] (anything at pads) and its log-mass outside the K ids
    log_q_tail [N]. Differentiable w.r.t. the student's inputs; the teacher `t` is data. mu: unused (akl is
    refused)."""
    check_sampled(name, t.log_w is not None)
    if not (0.0 < lam < 1.0 and 0.0 < alpha < 1.0):
        raise ValueError(f"the sampled tail needs 0 < lam, alpha < 1, got lam={lam}, alpha={alpha}")
    dt = log_q_head.dtype
    valid = t.valid
    lq = log_q_draw.masked_fill(~valid, 0.0)
    lpw = t.log_pw.to(dt)
    head = _summands(name, t.log_p_head.to(dt), log_q_head, lam, alpha).sum(-1)
    q_tail = log_q_tail.exp()
    if t.log_p_draw is None:  # fkl at T = 1 from a cache without draw log-probs: P̂_j stands for p_j in the log
        tail = (lpw.exp() * (lpw.masked_fill(~valid, 0.0) - lq)).sum(-1)
    else:
        lp, lw = t.log_p_draw.to(dt), t.log_w.to(dt)
        if name == "fkl":
            tail = (lpw.exp() * (lp - lq)).sum(-1)
        elif name == "skl":
            tail = (lpw.exp() * (lp - _log_mix(alpha, lp, 1 - alpha, lq))).sum(-1)
        elif name == "tvd":
            tail = 0.5 * (t.log_p_tail.to(dt).exp() + q_tail) - (lw + torch.minimum(lp, lq)).exp().sum(-1)
        elif name == "srkl":
            tail = _student_weighted(q_tail, lw, lp, lq, alpha, 1 - alpha)
        else:  # jsd
            m = _log_mix(1 - lam, lp, lam, lq)
            tail = lam * _student_weighted(q_tail, lw, lp, lq, lam, 1 - lam) + (1 - lam) * (lpw.exp() * (lp - m)).sum(-1)
    bucket = divergence(name, torch.cat([t.log_p_head.to(dt), t.log_p_tail.to(dt)[:, None]], dim=1),
                        torch.cat([log_q_head, log_q_tail[:, None]], dim=1), lam=lam, alpha=alpha, mu=mu)
    return torch.where(t.has_draws, head + tail, bucket)


def _student_weighted(q_tail: Tensor, lw: Tensor, lp: Tensor, lq: Tensor, a: float, b: float) -> Tensor:
    """Σ_tail q·log(q / (a·q + b·p)) = −log a·Q_T − Σ_tail q·log(1 + (b/a)·p/q), the sum estimated from the draws:
    each term is at most (b/a)·p, so the estimate's variance is the teacher's, not the student's."""
    return -math.log(a) * q_tail - ((lw + lq).exp() * F.softplus(math.log(b / a) + lp - lq)).sum(-1)


def sampled_tail_divergence(name: str, logits: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, tail_beta: Tensor,
                            beta: Tensor, temperature: Tensor, vocab_size: int, tail_ids: Tensor, tail_counts: Tensor,
                            tail_logprob: Tensor | None = None, tail_logprobs: Tensor | None = None,
                            **constants: float) -> Tensor:
    """`divergences.kd_divergence` with the tail estimated from cached draws -> [N], by autograd.

    Arguments as `kd_divergence`'s (tail_beta [N] = T(beta), log r at T = 1), plus tail_ids / tail_counts [N,S] (-1 /
    0 pads), tail_logprob [N] = log r (default: tail_beta, right at T = 1) and tail_logprobs [N,S] = log p of the
    drawn ids at T = 1 (None: a cache without them; then fkl at T = 1 only). ValueError (one line) otherwise."""
    if logits.shape[1] < vocab_size:
        raise ValueError(f"the student has {logits.shape[1]} logits per row, the teacher's vocabulary {vocab_size}")
    check_sampled(name, tail_logprobs is not None, temperature)
    if tail_logprobs is not None and tail_logprob is None:
        raise ValueError("tail_logprobs given without tail_logprob (log r: the draws' log-probs are relative to it)")
    teacher = sampled_teacher(topk_logprobs, tail_logprob if tail_logprob is not None else tail_beta, tail_beta, beta,
                              tail_ids, tail_counts, tail_logprobs)
    return sampled_kd_divergence(name, logits, topk_ids, teacher, temperature, vocab_size, **constants)


def sampled_kd_divergence(name: str, logits: Tensor, topk_ids: Tensor, teacher: SampledTeacher, temperature: Tensor,
                          vocab_size: int, **constants: float) -> Tensor:
    """D per row [N] from the student's logits [N, Vs] (ids >= vocab_size belong to neither distribution), by
    autograd (the full-logits objective; the chunked loss uses `sampled_kd_grad`)."""
    k = topk_ids.shape[1]
    ids = torch.cat([topk_ids, teacher.ids], dim=1)
    keep = torch.cat([torch.ones_like(topk_ids, dtype=torch.bool), teacher.valid], dim=1)
    picked, rest = _student_log_masses(logits, temperature, ids, keep, vocab_size)
    drawn = picked[:, k:]
    none = ~teacher.has_draws  # logsumexp over nothing but -inf has a NaN backward: computed on zeros there
    lse_drawn = torch.logsumexp(drawn.masked_fill(none[:, None], 0.0), dim=-1).masked_fill(none, NEG_INF)
    log_q_tail = _logaddexp(lse_drawn, rest)  # the drawn ids and the rest: the mass outside the K ids
    return sampled_divergence(name, teacher, picked[:, :k], picked[:, k:], log_q_tail, **constants)


@torch.no_grad()
def sampled_kd_grad(name: str, z: Tensor, topk_ids: Tensor, teacher: SampledTeacher, beta: Tensor, scale: Tensor,
                    vocab_size: int, ce_scale: float = 0.0, target_ids: Tensor | None = None,
                    **constants: float) -> tuple[Tensor, Tensor, Tensor | None]:
    """`sampled_kd_divergence` per row and the gradient of Σ scale·D (+ ce_scale·Σ CE) w.r.t. the logits z [N, Vs],
    in closed form (`divergences.closed_form_grad`: the drawn ids are singleton buckets inside the tail)."""
    def d_of(log_q_head: Tensor, log_q_draw: Tensor, log_q_tail: Tensor) -> Tensor:
        return sampled_divergence(name, teacher, log_q_head, log_q_draw, log_q_tail, **constants)

    return closed_form_grad(z, topk_ids, beta, scale, vocab_size, d_of, draw_ids=teacher.ids, draw_valid=teacher.valid,
                            ce_scale=ce_scale, target_ids=target_ids)
