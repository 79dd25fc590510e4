"""Float64 references for the KD mathematics, written from docs/methods.md alone: nothing here imports
`pipeline`, and nothing is copied from it. The tests compare the project's code with these functions, so a
defect in the project's mathematics cannot hide behind a comparison of two project paths.

Plain, unoptimised code on purpose (per-row Python loops where a rule is a rule about rows), in float64:

  §1 a dense teacher row -> the cache fields the loss reads        `cache_fields`
     the exact tempered log-partition A(β) = log Σ_j p_j^β          `log_partition`, `tail_power_sum`
  §2 the K + 1 buckets at temperature T                            `teacher_buckets` (dense, exact),
                                                                   `teacher_buckets_from_fields` (cache fields),
                                                                   `student_buckets`
     the divergences fkl rkl jsd tvd skl srkl akl, Hellinger        `divergence`, `hellinger`
     T(β) between grid knots (PCHIP through the tail's Rényi        `pchip_tail_power_sum`
     entropy R(β) = A_π(β)/(1 − β), knots R(0), R(β_g), R(1))
  §3 the SpecKD gate (topk / spec / threshold, weights)            `gate`
  §4 LATF's selection (hardest ⌈r·n⌉ by Hellinger difficulty)      `latf_keep`
     IDTS's per-token temperature                                  `idts_temperatures`
  §4b SE-KD's per-sequence top-entropy selection                  `sekd_keep`, `student_entropy`
  §5 the composition gate -> SE-KD -> LATF -> IDTS -> D at T_t,    `plan`, `kd_sums`
     kd_loss = Σ w·T²·D / Σ w (0 when nothing is kept)

Constants (methods.md §2): jsd λ = 0.9, skl/srkl α = 0.1, akl μ = 0.5. Formulas of the divergences (the
papers'): fkl KL(P‖Q); rkl KL(Q‖P); jsd (DistiLLM) λ·KL(Q‖M) + (1 − λ)·KL(P‖M), M = (1 − λ)P + λQ;
tvd ½Σ|P − Q|; skl KL(P ‖ αP + (1 − α)Q); srkl KL(Q ‖ (1 − α)P + αQ); akl (Wu et al. 2024)
g_head/(g_head + g_tail)·fkl + g_tail/(g_head + g_tail)·rkl with g = Σ|P − Q| over the head (buckets in
descending P while the cumulative P ≤ μ, the top one always in, ties in bucket order) and over the rest;
weights ½/½ when g_head + g_tail = 0; the weights carry no gradient (the authors compute them under no_grad).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

F64 = torch.float64
LAM, ALPHA, MU = 0.9, 0.1, 0.5
DIVERGENCES = ("fkl", "rkl", "jsd", "tvd", "skl", "srkl", "akl")


# ---- §1: the teacher's row and its cache fields ---------------------------------------------------------------

def cache_fields(logp: Tensor, k: int, temperatures: Sequence[float]) -> dict[str, Tensor]:
    """Dense teacher log p [N, V] (normalised over V) -> the cache fields the KD loss reads, exactly, float64.

    topk_ids [N, K] (descending p, ties by lower id), topk_logprobs [N, K] (log p over all V),
    tail_logprob [N] = log r = log Σ_tail p (-inf when K = V), tail_entropy [N] = H(π), π = p/r on the tail,
    tail_log_partition [N, G] = T(β_g) = log Σ_tail p^β_g, tail_shape [N, G] = A_π(β_g) = log Σ_tail π^β_g
    (what the teacher stage writes), betas [G].
    """
    logp = logp.detach().to(F64)
    n, v = logp.shape
    ids, head, rest = [], [], []
    for row in logp.tolist():
        order = sorted(range(v), key=lambda j: (-row[j], j))
        ids.append(order[:k])
        head.append([row[j] for j in order[:k]])
        rest.append([row[j] for j in order[k:]])
    betas = [1.0 / t for t in temperatures]
    log_r, h_tail, t_grid = [], [], []
    for r in rest:
        if not r:
            log_r.append(-math.inf)
            h_tail.append(0.0)
            t_grid.append([-math.inf] * len(betas))
            continue
        lr = _lse(r)
        log_r.append(lr)
        h_tail.append(-sum(math.exp(x - lr) * (x - lr) for x in r))
        t_grid.append([_lse([b * x for x in r]) for b in betas])
    t = torch.tensor(t_grid, dtype=F64).reshape(n, len(betas))
    lr_t = torch.tensor(log_r, dtype=F64)
    b_t = torch.tensor(betas, dtype=F64)
    shape = torch.where(torch.isfinite(lr_t)[:, None], t - b_t[None, :] * lr_t.nan_to_num(0.0, neginf=0.0)[:, None],
                        torch.zeros_like(t))
    return {"topk_ids": torch.tensor(ids, dtype=torch.int64).reshape(n, k),
            "topk_logprobs": torch.tensor(head, dtype=F64).reshape(n, k),
            "tail_logprob": lr_t, "tail_entropy": torch.tensor(h_tail, dtype=F64),
            "tail_log_partition": t, "tail_shape": shape, "betas": b_t}


def _lse(xs: Sequence[float]) -> float:
    m = max(xs)
    if m == -math.inf:
        return -math.inf
    return m + math.log(sum(math.exp(x - m) for x in xs))


def log_partition(logp: Tensor, beta: Tensor) -> Tensor:
    """A(β) = log Σ_j p_j^β over the whole vocabulary: logp [N, V], beta [N] or [B] with logp [1, V] -> [N]."""
    return torch.logsumexp(beta.to(F64)[:, None] * logp.to(F64), dim=-1)


def tail_power_sum(logp: Tensor, topk_ids: Tensor, beta: Tensor) -> Tensor:
    """T(β) = log Σ_{j outside the K ids} p_j^β, exactly from the dense row: [N] (-inf when K = V)."""
    x = beta.to(F64)[:, None] * logp.to(F64)
    x = x.scatter(1, topk_ids, -math.inf)
    return torch.logsumexp(x, dim=-1)


def pchip_tail_power_sum(fields: dict[str, Tensor], beta: Tensor, vocab_size: int) -> Tensor:
    """T(β) between grid knots from the cache fields alone (methods.md §2, "Temperatures off the grid"):
    T(β) = β log r + (1 − β) R(β), R the tail's Rényi entropy interpolated by PCHIP through the knots
    R(0) = log(V − K), R(β_g) = A_π(β_g)/(1 − β_g) with A_π(β_g) = T(β_g) − β_g log r, R(1) = H(π).
    A β on a grid knot gives the stored T(β_g); β = 1 gives log r; a row without a tail gives -inf. [N]."""
    betas = [float(b) for b in fields["betas"].tolist()]
    k = fields["topk_ids"].shape[1]
    n_tail = vocab_size - k
    out = []
    for i, b in enumerate(beta.to(F64).tolist()):
        log_r = float(fields["tail_logprob"][i])
        t_grid = [float(x) for x in fields["tail_log_partition"][i].tolist()]
        if log_r == -math.inf:
            out.append(-math.inf)
        elif b == 1.0:
            out.append(log_r)
        elif b in betas:
            out.append(t_grid[betas.index(b)])
        else:
            knots = [(0.0, math.log(n_tail) if n_tail > 1 else 0.0), (1.0, float(fields["tail_entropy"][i]))]
            knots += [(bg, (t - bg * log_r) / (1.0 - bg)) for bg, t in zip(betas, t_grid) if bg != 1.0]
            knots.sort()
            out.append(b * log_r + (1.0 - b) * _pchip([x for x, _ in knots], [y for _, y in knots], b))
    return torch.tensor(out, dtype=F64)


def _pchip(xs: list[float], ys: list[float], x: float) -> float:
    """The monotone piecewise-cubic Hermite interpolant (Fritsch-Butland slopes; the one-sided three-point
    end slope, set to 0 against the end secant's sign and limited to 3x the secant where the secants change
    sign — scipy's PchipInterpolator), evaluated at x (clamped to the knots' range)."""
    m = len(xs)
    h = [xs[i + 1] - xs[i] for i in range(m - 1)]
    s = [(ys[i + 1] - ys[i]) / h[i] for i in range(m - 1)]
    d = [0.0] * m
    if m == 2:
        d = [s[0], s[0]]
    else:
        for i in range(1, m - 1):
            if s[i - 1] * s[i] > 0:
                w1, w2 = 2 * h[i] + h[i - 1], h[i] + 2 * h[i - 1]
                d[i] = (w1 + w2) / (w1 / s[i - 1] + w2 / s[i])

        def sign(x: float) -> int:
            return (x > 0) - (x < 0)

        def end(h0: float, h1: float, s0: float, s1: float) -> float:
            e = ((2 * h0 + h1) * s0 - h0 * s1) / (h0 + h1)
            if sign(e) != sign(s0):
                return 0.0
            if sign(s0) != sign(s1) and abs(e) > 3 * abs(s0):
                return 3 * s0
            return e

        d[0] = end(h[0], h[1], s[0], s[1])
        d[-1] = end(h[-1], h[-2], s[-1], s[-2])
    x = min(max(x, xs[0]), xs[-1])
    i = max(j for j in range(m - 1) if xs[j] <= x)
    t = (x - xs[i]) / h[i]
    return ((2 * t ** 3 - 3 * t ** 2 + 1) * ys[i] + (t ** 3 - 2 * t ** 2 + t) * h[i] * d[i]
            + (-2 * t ** 3 + 3 * t ** 2) * ys[i + 1] + (t ** 3 - t ** 2) * h[i] * d[i + 1])


# ---- §2: K + 1 buckets and the divergences --------------------------------------------------------------------

def teacher_buckets(logp: Tensor, topk_ids: Tensor, temperature: Tensor) -> Tensor:
    """The teacher at temperature T, exactly: p^T = softmax(log p / T) over all V ids, then the K cached ids'
    masses and the mass of every other id. logp [N, V], topk_ids [N, K], temperature [N] -> P [N, K + 1]."""
    p_t = torch.softmax(logp.to(F64) / temperature.to(F64)[:, None], dim=-1)
    rest = torch.ones_like(p_t).scatter(1, topk_ids, 0.0)
    return torch.cat([p_t.gather(1, topk_ids), (p_t * rest).sum(-1, keepdim=True)], dim=1)


def teacher_buckets_from_fields(fields: dict[str, Tensor], temperature: Tensor, tail_power: Tensor) -> Tensor:
    """The teacher at T from the cache fields: masses ∝ p_i^β on the K ids and e^{T(β)} on the tail, with
    tail_power [N] = T(β) (exact, or `pchip_tail_power_sum`). -> P [N, K + 1], summing to one."""
    beta = 1.0 / temperature.to(F64)
    logs = torch.cat([beta[:, None] * fields["topk_logprobs"].to(F64), tail_power.to(F64)[:, None]], dim=1)
    return torch.softmax(logs, dim=-1)


def student_buckets(logits: Tensor, topk_ids: Tensor, vocab_size: int, temperature: Tensor) -> Tensor:
    """The student at T over the teacher's V ids (a padded head's ids >= V belong to no bucket):
    q^T = softmax(logits[:, :V] / T), the K ids' masses and the sum of the others. Differentiable. [N, K + 1]."""
    q_t = torch.softmax(logits.to(F64)[:, :vocab_size] / temperature.to(F64)[:, None], dim=-1)
    rest = torch.ones_like(q_t).scatter(1, topk_ids, 0.0)
    return torch.cat([q_t.gather(1, topk_ids), (q_t * rest).sum(-1, keepdim=True)], dim=1)


def kl(a: Tensor, b: Tensor) -> Tensor:
    """Σ a·log(a/b) per row, 0·log 0 = 0 (masses > 0 elsewhere)."""
    live = a > 0
    a_s, b_s = torch.where(live, a, torch.ones_like(a)), torch.where(live, b, torch.ones_like(b))
    return torch.where(live, a_s * (a_s.log() - b_s.log()), torch.zeros_like(a)).sum(-1)


def akl_weights(p: Tensor, q: Tensor, mu: float = MU) -> tuple[Tensor, Tensor]:
    """AKL's (w_head, w_tail) per row, detached, by a per-row loop over the buckets."""
    wh, wt = [], []
    for pr, qr in zip(p.detach().tolist(), q.detach().tolist()):
        order = sorted(range(len(pr)), key=lambda j: (-pr[j], j))
        head, cum = set(), 0.0
        for rank, j in enumerate(order):
            cum += pr[j]
            if rank == 0 or cum <= mu:
                head.add(j)
            else:
                break
        g_head = sum(abs(pr[j] - qr[j]) for j in head)
        g_tail = sum(abs(pr[j] - qr[j]) for j in range(len(pr)) if j not in head)
        total = g_head + g_tail
        wh.append(g_head / total if total > 0 else 0.5)
        wt.append(g_tail / total if total > 0 else 0.5)
    return torch.tensor(wh, dtype=F64), torch.tensor(wt, dtype=F64)


def divergence(name: str, p: Tensor, q: Tensor) -> Tensor:
    """D(P, Q) per row on probability vectors p, q [N, B] (the K + 1 buckets), float64."""
    p, q = p.to(F64), q.to(F64)
    if name == "fkl":
        return kl(p, q)
    if name == "rkl":
        return kl(q, p)
    if name == "jsd":
        m = (1 - LAM) * p + LAM * q
        return LAM * kl(q, m) + (1 - LAM) * kl(p, m)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if name == "skl":
        return kl(p, ALPHA * p + (1 - ALPHA) * q)
    if name == "srkl":
        return kl(q, (1 - ALPHA) * p + ALPHA * q)
    if name == "akl":
        w_head, w_tail = akl_weights(p, q)
        return w_head * kl(p, q) + w_tail * kl(q, p)
    raise ValueError(name)


def hellinger(p: Tensor, q: Tensor) -> Tensor:
    """(1/√2)·‖√P − √Q‖₂ per row."""
    return (p.to(F64).sqrt() - q.to(F64).sqrt()).square().sum(-1).sqrt() / math.sqrt(2.0)


# ---- §3: the SpecKD gate -------------------------------------------------------------------------------------

@dataclass
class Gate:
    proposal: list[int]
    p_proposal: list[float]
    accepted: list[bool]
    weight: list[float]


def gate(logits: Tensor, fields: dict[str, Tensor], vocab_size: int, rule: str, gate_k: int | None = None,
         threshold: float | None = None, reject_weight: float = 0.0, uniforms: Sequence[float] | None = None) -> Gate:
    """The greedy proposal ŷ = argmax of the student's full logits (first on ties); p(ŷ) from the cache: its
    head log-prob if ŷ is a cached id, r/(V − K) for any other id < V (0 when K = V), 0 for ŷ >= V;
    accept: topk ŷ among the first gate_k ids; spec u < min(1, p(ŷ)/q(ŷ)) with the given uniforms (accepted
    when q(ŷ) = 0); threshold p(ŷ) >= τ. Weight 1 if accepted, reject_weight if not."""
    z = logits.detach().to(F64)
    log_q = torch.log_softmax(z, dim=-1)
    k = fields["topk_ids"].shape[1]
    out = Gate([], [], [], [])
    for i in range(z.shape[0]):
        row = z[i].tolist()
        y = max(range(len(row)), key=lambda j: (row[j], -j))
        ids = fields["topk_ids"][i].tolist()
        if y in ids:
            p = math.exp(float(fields["topk_logprobs"][i, ids.index(y)]))
        elif y < vocab_size and vocab_size > k:
            p = math.exp(float(fields["tail_logprob"][i])) / (vocab_size - k)
        else:
            p = 0.0
        if rule == "topk":
            acc = y in ids[: (gate_k or k)]
        elif rule == "threshold":
            acc = p >= threshold
        elif rule == "spec":
            q = math.exp(float(log_q[i, y]))
            acc = True if q == 0 else uniforms[i] < min(1.0, p / q)
        else:
            raise ValueError(rule)
        out.proposal.append(y)
        out.p_proposal.append(p)
        out.accepted.append(bool(acc))
        out.weight.append(1.0 if acc else reject_weight)
    return out


# ---- §4, §4b: selections and temperatures --------------------------------------------------------------------

def top_fraction(score: Sequence[float], eligible: Sequence[bool], ratio: float,
                 groups: Sequence[int] | None = None) -> list[bool]:
    """Per group: of its n eligible rows keep the ⌈ratio·n − 1e-9⌉ (at least one) with the highest score,
    ties by the lower row index."""
    groups = [0] * len(score) if groups is None else list(groups)
    keep = [False] * len(score)
    for g in set(groups):
        rows = [i for i in range(len(score)) if groups[i] == g and eligible[i]]
        if not rows:
            continue
        quota = max(1, math.ceil(ratio * len(rows) - 1e-9))
        for i in sorted(rows, key=lambda i: (-score[i], i))[:quota]:
            keep[i] = True
    return keep


def latf_keep(difficulty: Sequence[float], eligible: Sequence[bool], ratio: float) -> list[bool]:
    """LATF: the ⌈r·n⌉ hardest eligible positions of the micro-batch (ties: lower index)."""
    return top_fraction(difficulty, eligible, ratio)


def sekd_keep(entropy: Sequence[float], eligible: Sequence[bool], groups: Sequence[int] | None,
              ratio: float) -> list[bool]:
    """SE-KD: per sequence, the ⌈ratio·n⌉ eligible positions with the highest student entropy."""
    return top_fraction(entropy, eligible, ratio, groups)


def student_entropy(logits: Tensor) -> list[float]:
    """H(q) at T = 1 over the student's whole head (padded ids included)."""
    log_q = torch.log_softmax(logits.detach().to(F64), dim=-1)
    return (-(log_q.exp() * log_q).sum(-1)).tolist()


def idts_temperatures(difficulty: Sequence[float], keep: Sequence[bool], t_base: float = 1.0,
                      c: float = 0.5) -> list[float]:
    """IDTS: m = the median of s over the kept positions (mean of the two middle values for an even count);
    T_t = T_base·exp(−c·tanh(log(s_t/m))) for a kept position (s = 0: T_base·e^c), T_base elsewhere and
    when m = 0 or nothing is kept."""
    kept = [s for s, k in zip(difficulty, keep) if k]
    m = statistics.median(kept) if kept else 0.0
    out = []
    for s, k in zip(difficulty, keep):
        if not k or m <= 0:
            out.append(t_base)
        elif s == 0:
            out.append(t_base * math.exp(c))
        else:
            out.append(t_base * math.exp(-c * math.tanh(math.log(s / m))))
    return out


# ---- §5: the composition -------------------------------------------------------------------------------------

@dataclass
class Plan:
    """The reference's per-row decisions: weight [N], keep [N], temps [N], the gate's acceptances."""

    weight: list[float]
    keep: list[bool]
    temps: list[float]
    accepted: int
    difficulty: list[float] | None = None
    entropy: list[float] | None = None

    @property
    def denominator(self) -> float:
        return sum(w for w, k in zip(self.weight, self.keep) if k)


def plan(logits: Tensor, fields: dict[str, Tensor], vocab_size: int, *, gate_rule: str = "none",
         gate_k: int | None = None, threshold: float | None = None, reject_weight: float = 0.0,
         uniforms: Sequence[float] | None = None, select_ratio: float | None = None,
         groups: Sequence[int] | None = None, latf_ratio: float | None = None, idts: bool = False,
         t_base: float = 1.0, idts_c: float = 0.5) -> Plan:
    """gate -> SE-KD among weight > 0 -> LATF among those -> IDTS over the kept (methods.md §5), at T = 1."""
    n = logits.shape[0]
    if gate_rule != "none":
        g = gate(logits, fields, vocab_size, gate_rule, gate_k, threshold, reject_weight, uniforms)
        weight, accepted = g.weight, sum(g.accepted)
    else:
        weight, accepted = [1.0] * n, n
    eligible = [w > 0 for w in weight]
    entropy = None
    if select_ratio is not None:
        entropy = student_entropy(logits)
        eligible = sekd_keep(entropy, eligible, groups, select_ratio)
    difficulty = None
    if latf_ratio is not None or idts:
        one = torch.ones(n, dtype=F64)
        p1 = torch.cat([fields["topk_logprobs"].to(F64).exp(), fields["tail_logprob"].to(F64).exp()[:, None]], 1)
        difficulty = hellinger(p1, student_buckets(logits.detach(), fields["topk_ids"], vocab_size, one)).tolist()
    keep = latf_keep(difficulty, eligible, latf_ratio) if latf_ratio is not None else eligible
    temps = idts_temperatures(difficulty, keep, t_base, idts_c) if idts else [t_base] * n
    return Plan(weight, keep, temps, accepted, difficulty, entropy)


def kd_sums(name: str, logits: Tensor, plan_: Plan, teacher_at: Callable[[Tensor, Tensor], Tensor],
            topk_ids: Tensor, vocab_size: int) -> tuple[Tensor, float, Tensor]:
    """(Σ_kept w·T²·D [differentiable w.r.t. logits], Σ_kept w, D [kept rows]) with D on K + 1 buckets at each
    row's temperature; teacher_at(rows [R], T [R]) -> P^T [R, K + 1] for those rows."""
    rows = torch.tensor([i for i, k in enumerate(plan_.keep) if k], dtype=torch.int64)
    if rows.numel() == 0:
        return logits.to(F64).sum() * 0.0, 0.0, torch.zeros(0, dtype=F64)
    t = torch.tensor(plan_.temps, dtype=F64)[rows]
    w = torch.tensor(plan_.weight, dtype=F64)[rows]
    p = teacher_at(rows, t)
    q = student_buckets(logits[rows], topk_ids[rows], vocab_size, t)
    d = divergence(name, p, q)
    return (w * t * t * d).sum(), float(w.sum()), d


def kd_loss(numerator: Tensor, denominator: float) -> Tensor:
    """kd_loss = Σ w·T²·D / Σ w, 0 when nothing is kept."""
    return numerator / denominator if denominator > 0 else numerator * 0.0


def dense_teacher(logp: Tensor, topk_ids: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """teacher_at for `kd_sums` from the dense teacher rows (exact tempering)."""
    return lambda rows, t: teacher_buckets(logp[rows], topk_ids[rows], t)


def fields_teacher(fields: dict[str, Tensor], vocab_size: int) -> Callable[[Tensor, Tensor], Tensor]:
    """teacher_at for `kd_sums` from the cache fields (T(β) by `pchip_tail_power_sum`)."""
    def at(rows: Tensor, t: Tensor) -> Tensor:
        sub = {**{f: fields[f][rows] for f in ("topk_ids", "topk_logprobs", "tail_logprob", "tail_entropy",
                                                 "tail_log_partition")}, "betas": fields["betas"]}
        return teacher_buckets_from_fields(sub, t, pchip_tail_power_sum(sub, 1.0 / t, vocab_size))
    return at
