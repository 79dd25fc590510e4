"""KD divergences on the cached support: K + 1 buckets (methods.md §2).

Teacher and student are both coarse-grained to the K cached ids plus one tail bucket. The teacher's
buckets come from the cache exactly, at any temperature in the grid (log p^T_i = β·log p_i - A(β), the
tail from the cached tail statistics, so they sum to one by construction); the student's come from its
logits over the teacher's V ids, the tail computed in log space with the K ids masked out. With K = V the
tail is empty and every divergence equals its full-vocabulary value (tests/losses/test_divergences.py).

All functions take batch-first tensors, upcast bf16/fp16/fp32 to float32 (float64 stays float64) and loop
over nothing but the handful of divergence names. A bucket with zero mass (log-mass -inf) contributes
0·log 0 = 0 and no NaN to the gradient, also when P and Q of that bucket are both 0.

Choices methods.md leaves open (all documented per function):
- AKL when P = Q on every bucket (g_head + g_tail = 0): weights 1/2, 1/2 (the value is 0 either way).
- Sampled tail (`pipeline.losses.sampled`): the tail estimated from cached draws with importance weights; a row
  without draws keeps the plain K + 1 buckets.
- Student ids >= the teacher's V (a padded head) belong to neither distribution: they are sliced off.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor


DIVERGENCES = ("fkl", "rkl", "jsd", "tvd", "skl", "srkl", "akl")
TAIL_POLICIES = ("bucket", "renorm", "ignore")
NEG_INF = -math.inf


def _dtype(*xs: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32: the dtype every computation here runs in."""
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def _logaddexp(a: Tensor, b: Tensor) -> Tensor:
    """log(e^a + e^b) that is -inf with a zero gradient where both are -inf (torch's gives NaN there)."""
    both = (a == NEG_INF) & (b == NEG_INF)
    out = torch.logaddexp(a.masked_fill(both, 0.0), b.masked_fill(both, 0.0))
    return out.masked_fill(both, NEG_INF)


def _log_mix(w_a: float, log_a: Tensor, w_b: float, log_b: Tensor) -> Tensor:
    """log(w_a·A + w_b·B) from log A, log B [N,B]; a zero weight drops its term exactly."""
    la = log_a + math.log(w_a) if w_a > 0 else torch.full_like(log_a, NEG_INF)
    lb = log_b + math.log(w_b) if w_b > 0 else torch.full_like(log_b, NEG_INF)
    return _logaddexp(la, lb)


def _xlogx_ratio(log_a: Tensor, log_b: Tensor) -> Tensor:
    """Per-bucket A·(log A - log B) [N,B]: 0 where A = 0 (even if B = 0), +inf where only B = 0.

    Both special cases are constants cut out of the graph by where() on the inputs: 0·inf in a backward
    pass would be NaN, and a NaN reaches every parameter even from a position whose weight is 0. So an
    infinite bucket has value +inf but passes no gradient (its true gradient is infinite too).
    """
    live = log_a.exp() > 0
    finite = live & (log_b > -math.inf)
    la = log_a.masked_fill(~finite, 0.0)
    lb = log_b.masked_fill(~finite, 0.0)
    special = torch.where(live, math.inf, 0.0).to(la.dtype)
    return torch.where(finite, la.exp() * (la - lb), special)


def _summands(name: str, log_p: Tensor, log_q: Tensor, lam: float, alpha: float) -> Tensor:
    """Per-bucket terms [N,B] of the decomposable divergences; D = terms.sum(-1)."""
    if name == "fkl":
        return _xlogx_ratio(log_p, log_q)
    if name == "rkl":
        return _xlogx_ratio(log_q, log_p)
    if name == "jsd":  # DistiLLM's form: M = (1-λ)P + λQ, λ·KL(Q‖M) + (1-λ)·KL(P‖M)
        log_m = _log_mix(1 - lam, log_p, lam, log_q)
        return lam * _xlogx_ratio(log_q, log_m) + (1 - lam) * _xlogx_ratio(log_p, log_m)
    if name == "tvd":
        return 0.5 * (log_p.exp() - log_q.exp()).abs()
    if name == "skl":  # KL(P ‖ αP + (1-α)Q)
        return _xlogx_ratio(log_p, _log_mix(alpha, log_p, 1 - alpha, log_q))
    if name == "srkl":  # KL(Q ‖ (1-α)P + αQ)
        return _xlogx_ratio(log_q, _log_mix(1 - alpha, log_p, alpha, log_q))
    raise ValueError(f"unknown divergence {name!r}; choose one of {DIVERGENCES}")


def _akl_weights(log_p: Tensor, log_q: Tensor, mu: float) -> tuple[Tensor, Tensor]:
    """AKL's detached mixing weights [N], [N] for fkl and rkl (Wu et al. 2024, `get_ratio`).

    Head = buckets in descending order of P while the cumulative P (including the bucket) is <= μ; the
    top bucket is always in (stable sort: ties keep bucket order). g = Σ|P - Q| on head and on the rest.
    When g_head + g_tail = 0 (P = Q) the weights are 1/2, 1/2.
    """
    p, q = log_p.detach().exp(), log_q.detach().exp()
    order = torch.sort(p, dim=-1, descending=True, stable=True).indices
    in_head_sorted = p.gather(1, order).cumsum(-1) <= mu
    in_head_sorted[:, :1] = True
    in_head = torch.zeros_like(in_head_sorted).scatter(1, order, in_head_sorted)
    err = (p - q).abs()
    g_head = (err * in_head).sum(-1)
    g_tail = (err * ~in_head).sum(-1)
    total = g_head + g_tail
    safe = torch.where(total > 0, total, torch.ones_like(total))
    w_head = torch.where(total > 0, g_head / safe, torch.full_like(total, 0.5))
    w_tail = torch.where(total > 0, g_tail / safe, torch.full_like(total, 0.5))
    return w_head, w_tail


def divergence(
    name: str, log_p: Tensor, log_q: Tensor, *, lam: float = 0.9, alpha: float = 0.1, mu: float = 0.5
) -> Tensor:
    """D(P, Q) per position over the given buckets (methods.md §2 table).

    name: fkl | rkl | jsd (λ = lam, DistiLLM form) | tvd | skl (α = alpha) | srkl (α = alpha) | akl (μ = mu).
    log_p [N,B] teacher log-masses, log_q [N,B] student log-masses (-inf = empty bucket) -> [N], float32
    (float64 if an input is). Nothing is renormalised: each divergence is a sum of per-bucket terms on the
    masses given (which is what the "ignore" tail policy relies on).
    rkl (and akl, which contains it) is +inf where a bucket has Q > 0 and P = 0, e.g. a teacher tail that
    rounded to 0 in float32; fkl is +inf where P > 0 and Q = 0. Such a bucket passes no gradient; the
    gradient is never NaN, also from rows whose value is +inf.
    """
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence {name!r}; choose one of {DIVERGENCES}")
    if not (0.0 <= lam <= 1.0 and 0.0 <= alpha <= 1.0 and 0.0 <= mu <= 1.0):
        raise ValueError(f"divergence constants must lie in [0, 1]: lam={lam}, alpha={alpha}, mu={mu}")
    dt = _dtype(log_p, log_q)
    log_p, log_q = log_p.to(dt), log_q.to(dt)
    if name == "akl":
        w_head, w_tail = _akl_weights(log_p, log_q, mu)
        fkl = _xlogx_ratio(log_p, log_q).sum(-1)
        rkl = _xlogx_ratio(log_q, log_p).sum(-1)
        return w_head * fkl + w_tail * rkl
    return _summands(name, log_p, log_q, lam, alpha).sum(-1)


def hellinger(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Hellinger distance (1/√2)·‖√P - √Q‖₂ per position: log_p, log_q [N,B] -> [N] in [0, 1]."""
    dt = _dtype(log_p, log_q)
    sq = ((0.5 * log_p.to(dt)).exp() - (0.5 * log_q.to(dt)).exp()).square().sum(-1)
    pos = sq > 0  # sqrt'(0) = inf: keep identical rows out of the gradient
    return torch.where(pos, sq.masked_fill(~pos, 1.0).sqrt(), torch.zeros_like(sq)) / math.sqrt(2.0)


def teacher_log_buckets(topk_logprobs: Tensor, tail_beta: Tensor, beta: Tensor) -> Tensor:
    """Tempered teacher log-masses on K + 1 buckets, normalised by construction.

    topk_logprobs [N,K] (log p over the full vocabulary, T = 1), tail_beta [N] = T(beta) = log sum of p^beta
    over the ids outside the top-K (`temperature.tail_log_partition_at`; log r at beta = 1, -inf when the
    teacher has no tail), beta [N] = 1/T -> [N,K+1]: head beta log p_i - A, tail T(beta) - A, with
    A = logaddexp(lse_K(beta log p), T(beta)); so the K + 1 masses sum to one at every temperature, and
    the tail is -inf only when the cache says the teacher has none. Teacher data: detached.
    """
    dt = _dtype(topk_logprobs, tail_beta, beta)
    head = beta.detach().to(dt)[:, None] * topk_logprobs.detach().to(dt)
    tail = tail_beta.detach().to(dt)[:, None]
    log_a = _logaddexp(torch.logsumexp(head, dim=-1, keepdim=True), tail)
    return torch.cat([head, tail], dim=1) - log_a


def _student_log_masses(
    logits: Tensor, temperature: Tensor, ids: Tensor, valid: Tensor | None, vocab_size: int
) -> tuple[Tensor, Tensor]:
    """Student log q^T on given ids and on everything else among the teacher's V ids.

    logits [N,Vs] (Vs >= V; columns >= V, a padded student head, are left out: neither distribution has
    them), temperature [N], ids [N,M] distinct per row, valid bool [N,M] or None (all valid)
    -> log q^T(ids) [N,M] (-inf where not valid), log of the remaining mass [N] (-inf if none remains).
    Memory: one [N,V] tensor (logits/T, masked in place and kept for logsumexp's backward). The full
    normaliser is logaddexp(logsumexp(picked), logsumexp(rest)), so no second [N,V] pass is needed.
    """
    dt = _dtype(logits, temperature)
    t = temperature.to(dt)[:, None]
    logits = logits[:, :vocab_size]
    # Padding points at the row's first id: masked anyway, and never at a real token it would hide.
    safe_ids = ids if valid is None else torch.where(valid, ids, ids[:, :1])
    picked = logits.gather(1, safe_ids) / t  # type promotion: bf16 / f32 -> f32, no extra copy
    if valid is not None:
        picked = picked.masked_fill(~valid, NEG_INF)
    z = logits / t  # [N,V], the one full-size copy
    z.scatter_(1, safe_ids, NEG_INF)
    has_rest = z.amax(dim=-1) > NEG_INF
    # Rows with nothing left: logsumexp's backward would be exp(-inf - -inf) = NaN; compute on zeros instead.
    z.masked_fill_(~has_rest[:, None], 0.0)
    rest = torch.where(has_rest, torch.logsumexp(z, dim=-1), torch.full_like(has_rest, NEG_INF, dtype=dt))
    log_total = _logaddexp(torch.logsumexp(picked, dim=-1), rest)
    return picked - log_total[:, None], rest - log_total


def student_log_buckets(logits: Tensor, topk_ids: Tensor, temperature: Tensor, vocab_size: int) -> Tensor:
    """Student log-masses on K + 1 buckets at temperature T, over the teacher's V ids.

    logits [N,Vs] (Vs >= V: ids >= V, a padded student head, belong to no bucket), topk_ids [N,K] int64,
    temperature [N], vocab_size V (the teacher's, from the cache) -> [N,K+1]: log softmax(z)[ids] with
    z = logits[:, :V] / T, last column the exact log of the mass outside the K ids (-inf when K = V).
    Differentiable w.r.t. logits.
    """
    head, rest = _student_log_masses(logits, temperature, topk_ids, None, vocab_size)
    return torch.cat([head, rest[:, None]], dim=1)


def kd_divergence(
    name: str,
    logits: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    tail_beta: Tensor,
    beta: Tensor,
    temperature: Tensor,
    vocab_size: int,
    tail: str = "bucket",
    **constants: float,
) -> Tensor:
    """Per-position KD divergence D(teacher^T, student^T) under a tail policy -> [N].

    logits [N,Vs] (student; ids >= vocab_size are outside both distributions), topk_ids [N,K],
    topk_logprobs [N,K], tail_beta [N] = T(beta) (the teacher's tail power sum, log r at T = 1), beta [N],
    temperature [N] (= 1/beta), vocab_size the teacher's V (from the cache: never the student's head);
    constants: lam, alpha, mu (see `divergence`).
    tail:
      "bucket"  K + 1 buckets (methods.md §2). (The tail estimated from cached draws, `--tail sampled`, is
                `sampled.sampled_tail_divergence`.)
      "renorm"  P and Q renormalised over the K ids, tail dropped: D(P_K/ΣP_K, Q_K/ΣQ_K) over K buckets.
      "ignore"  the divergence's per-bucket terms summed over the K ids only, with the full-vocabulary
                (un-renormalised) P_i, Q_i:
                  fkl  Σ_K P_i log(P_i/Q_i)          rkl  Σ_K Q_i log(Q_i/P_i)
                  jsd  Σ_K λ Q_i log(Q_i/M_i) + (1-λ) P_i log(P_i/M_i),  M_i = (1-λ)P_i + λQ_i
                  skl  Σ_K P_i log(P_i/M_i),  M_i = αP_i + (1-α)Q_i
                  srkl Σ_K Q_i log(Q_i/M_i),  M_i = (1-α)P_i + αQ_i
                  tvd  ½ Σ_K |P_i - Q_i|
                  akl  w_h·fkl_K + w_t·rkl_K, the head/rest split and g's taken over the K ids only.
                These can be negative (fkl_K < 0 when Q puts more mass on K than P).
    """
    if tail not in TAIL_POLICIES:
        raise ValueError(f"unknown tail policy {tail!r}; choose one of {TAIL_POLICIES}")
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence {name!r}; choose one of {DIVERGENCES}")
    if logits.shape[1] < vocab_size:
        raise ValueError(f"the student has {logits.shape[1]} logits per row, the teacher's vocabulary {vocab_size}")
    k = topk_ids.shape[1]
    if tail == "renorm":
        dt = _dtype(logits, topk_logprobs, beta, temperature)
        log_p = torch.log_softmax(beta.detach().to(dt)[:, None] * topk_logprobs.detach().to(dt), dim=-1)
        log_q = torch.log_softmax(logits.gather(1, topk_ids) / temperature.to(dt)[:, None], dim=-1)
        return divergence(name, log_p, log_q, **constants)
    log_p = teacher_log_buckets(topk_logprobs, tail_beta, beta)
    log_q = student_log_buckets(logits, topk_ids, temperature, vocab_size)
    if tail == "ignore":
        return divergence(name, log_p[:, :k], log_q[:, :k], **constants)
    return divergence(name, log_p, log_q, **constants)


@torch.no_grad()
def bucket_kd_grad(name: str, z: Tensor, topk_ids: Tensor, log_p: Tensor, beta: Tensor, scale: Tensor,
                   vocab_size: int, **constants: float) -> tuple[Tensor, Tensor]:
    """D on the K + 1 buckets per row and the gradient of Σ_r scale_r·D_r w.r.t. the logits, in closed form.

    z [N,Vs] float32 student logits (detached), topk_ids [N,K], log_p [N,K+1] the teacher's tempered buckets
    (`teacher_log_buckets`), beta [N] = 1/T, scale [N] -> (D [N], grad [N,V] float32 for columns < V; columns
    >= V, a padded student head, get none). Equal to autograd through `kd_divergence(tail="bucket")`.
    (`closed_form_grad` does the work; this is its K + 1 bucket case.)
    """
    log_p64 = log_p.to(torch.float64)

    def d_of(log_q_head: Tensor, _draws: Tensor | None, log_q_tail: Tensor) -> Tensor:
        return divergence(name, log_p64, torch.cat([log_q_head, log_q_tail[:, None]], dim=1), **constants)

    d, grad, _ = closed_form_grad(z, topk_ids, beta, scale, vocab_size, d_of)
    return d, grad


@torch.no_grad()
def closed_form_grad(z: Tensor, topk_ids: Tensor, beta: Tensor, scale: Tensor, vocab_size: int,
                     d_of: Callable[[Tensor, Tensor | None, Tensor], Tensor], draw_ids: Tensor | None = None,
                     draw_valid: Tensor | None = None, ce_scale: float = 0.0, target_ids: Tensor | None = None
                     ) -> tuple[Tensor, Tensor, Tensor | None]:
    """A divergence per row and the gradient of Σ_r scale_r·D_r (+ ce_scale·Σ_r CE_r) w.r.t. the logits, in closed
    form, for any D that depends on the student only through its log-masses at temperature 1/beta on the K cached
    ids, on S drawn ids outside them, and outside the K ids (the tail).

    z [N,Vs] float32 student logits (detached), topk_ids [N,K], beta [N], scale [N]; d_of(log_q_head [N,K] float64,
    log_q_draw [N,S] float64 (-inf at pads) or None, log_q_tail [N] float64) -> D [N] (differentiable);
    draw_ids [N,S] (any id at pads) with draw_valid [N,S]. ce_scale != 0 fuses the cross-entropy against
    target_ids [N] over all Vs ids (a padded head's too) into the same pass: every beta must then be 1 (CE is at
    T = 1), and the student's softmax is the one the divergence uses. Returns (D [N], grad, CE [N] or None); grad
    is [N,V] float32 (columns >= V get no KD gradient), or [N,Vs] with CE fused.

    Why: with s = beta·z and g = ∂(Σ scale·D)/∂log Q (autograd on the small float64 tensors), G = Σ g,
        head id k: ∂/∂s_k = g_k − q_k·G;  tail id j: q_j·(g_tail/Q_tail − G) (+ g_j for a drawn id j).
    Autograd through the [N,V] masked logsumexp makes ~15 passes over [N,V] (divide, scatter, masked_fill,
    logsumexp and their backwards, the index/gather backwards' zero-filled copies); this makes 6, and CE fused
    adds none (softmax_j = e_j·e^(mt − lse) on the tail). The tail is summed relative to its own maximum (the K ids
    masked to -inf first), as `student_log_buckets` does, so a confident student's tiny tail mass neither
    underflows nor cancels.
    """
    n, k = topk_ids.shape
    fuse = ce_scale != 0.0
    width = z.shape[1] if fuse else vocab_size
    b = beta.to(torch.float32)[:, None]
    e = z[:, :width] * b  # [N,width] s = z/T, the one full-size buffer; becomes the gradient in place
    tail = e[:, :vocab_size] if width > vocab_size else e
    head = tail.gather(1, topk_ids)  # [N,K] s at the cached ids
    tail.scatter_(1, topk_ids, NEG_INF)
    mt = tail.amax(dim=-1)  # the tail's maximum; -inf when K = V
    has_rest = mt > NEG_INF
    mt0 = torch.where(has_rest, mt, torch.zeros_like(mt))
    # CE over the padded ids too (as the student's own loss): their log-sum, read before `e` changes
    lse_pad = torch.logsumexp(e[:, vocab_size:], dim=-1).to(torch.float64) if width > vocab_size else None
    tail.sub_(mt0[:, None]).exp_()  # tail: exp(s_j - mt) in (0, 1]; head and an empty tail: 0
    tail_sum = tail.sum(dim=-1)  # >= 1 where has_rest
    # The bucket-level math is on [N, K+1] only, so it runs in float64: the head's g_k - q_k·G and the tail's
    # g_tail/Q_tail - G are differences of nearly equal terms where the student is close to the teacher
    # (rkl's "+1" in Q(log Q/P + 1)); float64 keeps them to the precision of the float32 logits.
    f64 = torch.float64
    mt64, has = mt0.to(f64), has_rest
    tail64 = tail_sum.to(f64)
    head64 = head.to(f64)
    b64 = beta.to(f64)
    log_tail = torch.where(has, tail64.log() + mt64, torch.full_like(mt64, NEG_INF))
    log_total = _logaddexp(torch.logsumexp(head64, dim=-1), log_tail)
    lq_head = head64 - log_total[:, None]
    lq_tail = log_tail - log_total
    lq_draw = None
    if draw_ids is not None:
        lq_draw = (z.gather(1, draw_ids).to(f64) * b64[:, None] - log_total[:, None]).masked_fill(~draw_valid, NEG_INF)
    with torch.enable_grad():
        leaves = [lq_head.requires_grad_(), lq_tail.requires_grad_()] + ([lq_draw.requires_grad_()] if draw_ids is not None else [])
        d = d_of(lq_head, lq_draw, lq_tail)
        s64 = scale.to(f64)
        weighted = torch.where(s64 > 0, s64 * d.masked_fill(s64 <= 0, 0.0), torch.zeros_like(d))
        grads = torch.autograd.grad(weighted.sum(), leaves, allow_unused=True)
    g_head, g_tail, *g_draw = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves)]
    g_sum = g_head.sum(-1) + g_tail + (g_draw[0].sum(-1) if g_draw else 0.0)
    # tail ids: beta·(e_j/tail_sum·g_tail − e_j·exp(mt − log_total)·G); head ids: beta·(g_k − q_k·G)
    coeff = b64 * torch.where(has, g_tail / tail64 - g_sum * (mt64 - log_total).exp(), torch.zeros_like(g_sum))
    head_grad = b64[:, None] * (g_head - g_sum[:, None] * lq_head.exp())
    ce = None
    if fuse:  # beta = 1: CE's softmax - onehot from the same exps (softmax_j = e_j·exp(mt − lse) on the tail)
        lse = log_total if lse_pad is None else _logaddexp(log_total, lse_pad)
        coeff = coeff + ce_scale * torch.where(has, (mt64 - lse).exp(), torch.zeros_like(lse))
        head_grad = head_grad + ce_scale * (head64 - lse[:, None]).exp()
        ce = (lse - z.gather(1, target_ids[:, None]).squeeze(1).to(f64)).to(torch.float32)
        if lse_pad is not None:
            e[:, vocab_size:].sub_(lse.to(torch.float32)[:, None]).exp_().mul_(ce_scale)
    tail.mul_(coeff.to(torch.float32)[:, None])
    if g_draw:  # a drawn id is a bucket of its own inside the tail: its g_j on top of the tail's share
        tail.scatter_add_(1, draw_ids, (b64[:, None] * g_draw[0]).masked_fill(~draw_valid, 0.0).to(torch.float32))
    tail.scatter_(1, topk_ids, head_grad.to(torch.float32))
    if fuse:
        e.scatter_add_(1, target_ids[:, None], torch.full((n, 1), -ce_scale, dtype=e.dtype, device=e.device))
    return d.detach(), e, ce


def weighted_kd_loss(per_position: Tensor, weight: Tensor, temperature: Tensor | None = None) -> Tensor:
    """kd_loss = Σ_t w_t·T_t²·D_t / Σ_t w_t (methods.md §5), a scalar; 0 when no weight is positive.

    per_position [N] divergences, weight [N] >= 0, temperature [N] or None (T = 1). Positions with w = 0
    are excluded with where(), so a non-finite D there cannot reach the value.
    """
    dt = _dtype(per_position, weight)
    d, w = per_position.to(dt), weight.detach().to(dt)
    scale = w if temperature is None else w * temperature.detach().to(dt).square()
    used = w > 0
    terms = torch.where(used, scale * d.masked_fill(~used, 0.0), torch.zeros_like(d))
    total_w = w.sum()
    return terms.sum() / torch.where(total_w > 0, total_w, torch.ones_like(total_w))
