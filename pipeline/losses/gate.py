"""SpecKD gate: the student proposes a token, the cached teacher verifies it (methods.md §3).

Per target position, without gradient, at temperature 1 (before any per-token temperature):
propose ŷ from the student (greedy argmax or a seeded sample), accept it by one of three rules, and
weight the position 1 if accepted, `reject_weight` (default 0: masked out) if not.

Rules the paper leaves open, fixed here (methods.md §3):
- p(ŷ) outside the cached top-K is the tail spread evenly, r/(V-K) (0 when V = K), with r the cached
  tail mass. A proposal id >= V (a padded student id) is one the teacher cannot emit: p = 0.
- `spec` draws u ~ U(0,1) per position and accepts iff u < min(1, p(ŷ)/q(ŷ)). With proposal="sample"
  the generator is used first for the N proposals (one float64 uniform each, inverse CDF), then for the N
  uniforms.
- `topk` uses the first gate_k cached ids (default all K); `threshold` has no default τ and must be given.
- The token acceptance rate of an empty mask is 0.0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

PROPOSALS = ("greedy", "sample")
_CDF_ELEMENTS = 1 << 24  # a sampled proposal's float64 CDF is built this many elements at a time
RULES = ("topk", "spec", "threshold")


@dataclass(frozen=True)
class GateResult:
    """Outcome of the gate: accepted bool [N], weight float32 [N], proposal int64 [N]."""

    accepted: Tensor
    weight: Tensor
    proposal: Tensor


@torch.no_grad()
def propose(logits: Tensor, mode: str = "greedy", generator: torch.Generator | None = None) -> Tensor:
    """Student proposal ŷ at T = 1: logits [N,Vs] -> ids [N] int64.

    greedy: argmax (first index on ties); sample: one draw from softmax(logits) with `generator`.
    """
    if mode == "greedy":
        return logits.argmax(dim=-1)
    if mode == "sample":
        # Inverse CDF: one uniform per row against the row's cumulative sum (float64, so the last of 150k
        # ids keeps its share). torch.multinomial does the same draw ~4x slower on CPU at V = 8k.
        n, v = logits.shape
        u = torch.rand(n, 1, generator=generator, dtype=torch.float64, device=logits.device)  # all drawn first
        ids = torch.empty(n, dtype=torch.long, device=logits.device)
        step = max(1, _CDF_ELEMENTS // max(v, 1))  # rows per block: the float64 CDF stays <= 128 MiB
        for a in range(0, n, step):
            cdf = torch.softmax(logits[a:a + step].float(), dim=-1).cumsum(-1, dtype=torch.float64)  # [rows, Vs]
            # The first id whose cumulative mass exceeds u·total: ids of probability 0 are never drawn.
            ids[a:a + step] = torch.searchsorted(cdf, u[a:a + step] * cdf[:, -1:], right=True).squeeze(1)
        return ids.clamp_(max=v - 1)
    raise ValueError(f"unknown proposal mode {mode!r}; choose one of {PROPOSALS}")


@torch.no_grad()
def teacher_prob_of(proposal: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, tail_logprob: Tensor,
                    vocab_size: int) -> Tensor:
    """Teacher probability p(ŷ) at T = 1: proposal [N], topk_ids [N,K], topk_logprobs [N,K], tail_logprob [N]
    (log r, from the cache) -> [N] float32.

    p(ŷ) from the cache if ŷ is in the top-K; else r/(V-K), the tail spread evenly (0 if V = K); 0 for an
    id the teacher cannot emit (ŷ >= V: a padded student head).
    """
    k = topk_ids.shape[1]
    p = topk_logprobs.float().exp()  # [N,K]
    match = topk_ids == proposal[:, None]
    head = torch.where(match, p, torch.zeros_like(p)).sum(-1)
    r = tail_logprob.float().exp()
    tail = r / (vocab_size - k) if vocab_size > k else torch.zeros_like(r)
    tail = torch.where(proposal < vocab_size, tail, torch.zeros_like(tail))
    return torch.where(match.any(-1), head, tail)


@torch.no_grad()
def speckd_gate(
    logits: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    tail_logprob: Tensor,
    vocab_size: int,
    rule: str = "topk",
    proposal: str = "greedy",
    gate_k: int | None = None,
    threshold: float | None = None,
    reject_weight: float = 0.0,
    generator: torch.Generator | None = None,
) -> GateResult:
    """Propose-and-verify gate per position.

    logits [N,Vs] student logits (T = 1; Vs may exceed V: a padded proposal gets p = 0), topk_ids [N,K],
    topk_logprobs [N,K], tail_logprob [N] (log r), vocab_size V of the teacher (from the cache).
    rule: topk (ŷ among the first gate_k cached ids), spec (u < min(1, p(ŷ)/q(ŷ)), u ~ U(0,1) from
    `generator`), threshold (p(ŷ) >= threshold). Weight: 1 if accepted else reject_weight.
    """
    y = propose(logits, proposal, generator)
    logq = torch.log_softmax(logits.float(), dim=-1).gather(1, y[:, None]).squeeze(1) if rule == "spec" else None
    return verify(y, logq, topk_ids, topk_logprobs, tail_logprob, vocab_size, rule=rule, gate_k=gate_k,
                  threshold=threshold, reject_weight=reject_weight, generator=generator)


@torch.no_grad()
def verify(
    proposal: Tensor,
    log_q_proposal: Tensor | None,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    tail_logprob: Tensor,
    vocab_size: int,
    rule: str = "topk",
    gate_k: int | None = None,
    threshold: float | None = None,
    reject_weight: float = 0.0,
    generator: torch.Generator | None = None,
) -> GateResult:
    """The verify half of the gate, from proposals already made (so proposals can be made chunk by chunk
    from logits that are never all in memory: `pipeline.losses.chunked`).

    proposal [N] int64, log_q_proposal [N] = log q(ŷ) at T = 1 (the spec rule only; None otherwise), cache
    fields as in `speckd_gate`. The spec rule's N uniforms are drawn here, after the proposals' draws.
    """
    if rule not in RULES:
        raise ValueError(f"unknown gate rule {rule!r}; choose one of {RULES}")
    if not 0.0 <= reject_weight <= 1.0:
        raise ValueError(f"reject_weight must lie in [0, 1], got {reject_weight}")
    k = topk_ids.shape[1]
    y = proposal
    if rule == "topk":
        kv = k if gate_k is None else gate_k
        if not 1 <= kv <= k:
            raise ValueError(f"gate_k must lie in [1, K={k}], got {gate_k}")
        accepted = (topk_ids[:, :kv] == y[:, None]).any(-1)
    else:
        p = teacher_prob_of(y, topk_ids, topk_logprobs, tail_logprob, vocab_size)
        if rule == "threshold":
            if threshold is None:
                raise ValueError("rule 'threshold' needs a threshold τ (accept iff p(ŷ) >= τ)")
            accepted = p >= threshold
        else:
            if log_q_proposal is None:
                raise ValueError("rule 'spec' needs log q of the proposals")
            q = log_q_proposal.float().exp()
            ratio = torch.where(q > 0, p / q.clamp_min(torch.finfo(q.dtype).tiny), torch.ones_like(p))
            u = torch.rand(y.shape[0], generator=generator, device=y.device)
            accepted = u < ratio.clamp(max=1.0)
    weight = torch.where(accepted, 1.0, reject_weight).to(torch.float32)
    return GateResult(accepted=accepted, weight=weight, proposal=y)


def token_acceptance_rate(accepted: Tensor, mask: Tensor | None = None) -> float:
    """TAR = accepted target positions / target positions: accepted bool [N], mask bool [N] (None = all).

    Returns 0.0 when there are no target positions.
    """
    if mask is None:
        mask = torch.ones_like(accepted, dtype=torch.bool)
    n = int(mask.sum())
    return float((accepted & mask).sum()) / n if n else 0.0
