"""The student's objective from its hidden states and output head, in row chunks: memory flat in V.

At V = 151,936 one float32 [N, V] copy of the student's logits at N = 8 x 8,192 targets is 40 GB, and the
unchunked loss holds several (logits, masked logits for the tail, the CE log-softmax, the logsumexp
backward). Here no [N, V] tensor ever exists:

    pass 1 (`plan_rows`, no grad): per chunk of C rows, the logits -> cross-entropy per row, the gate's
        proposal and log q(ŷ), the student's entropy (SE-KD), the Hellinger difficulty; then over the whole
        micro-batch the gate's verdict, SE-KD's and LATF's selections and IDTS's temperatures (which rank or
        take medians across rows);
    pass 2 (`chunked_loss`, an autograd Function): per chunk, the logits again, the loss
        ce_scale·Σ CE + kd_scale·Σ_kept w T² D, its gradient with respect to the chunk's pre-transform
        logits by local autograd (any divergence, the Gemma-2 soft-cap, Cohere/Granite scaling), then
        grad_hidden = du @ W and grad_W += du^T @ hidden (grad_bias += Σ du): stored for backward, which
        only scales them by the incoming gradient.

Peak memory is one chunk's logits and the divergence's temporaries on them, plus grad_W (the head's own
size), independent of N. The price is a second head product (pass 1) - the technique of Liger-Kernel's
fused linear losses and torchtune's chunked losses, here with the KD composition of methods.md §5.
Value and gradient equal the unchunked path (`objective.kd_terms` on full logits + CE): tests/losses/test_chunked_loss.py.
The scales are known before pass 2 (the trainer computes them from the plan: CE over the step's targets,
KD over the step's Σw), so the stored gradients are the final ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pipeline.head import HeadSpec
from pipeline.losses.adakd import LATF
from pipeline.losses.divergences import closed_form_grad, divergence, teacher_log_buckets
from pipeline.losses.objective import KdPlan, RowSignals, divergence_of_rows, for_batch, plan_kd, sampled_teacher_of
from pipeline.losses.options import KdOptions
from pipeline.losses.sampled import check_sampled, sampled_kd_grad

# Logits per chunk: 2^24 float32 elements (64 MiB) per copy; the divergence holds ~6 copies of its rows.
CHUNK_ELEMENTS = 1 << 24


def auto_chunk_rows(vocab_size: int) -> int:
    """Rows per chunk so that one chunk of logits is about `CHUNK_ELEMENTS` floats."""
    return max(1, CHUNK_ELEMENTS // max(vocab_size, 1))


@dataclass
class RowPlan(KdPlan):
    """Pass 1's decisions for N target rows: the KD plan (`objective.plan_kd`) and ce_rows [N], the cross-entropy
    of each row (nats; the student's full head, padded ids included, as a Hugging Face model's own loss)."""

    ce_rows: Tensor | None = None


@torch.no_grad()
def plan_rows(hidden: Tensor, head: HeadSpec, target_ids: Tensor, cache: dict[str, Tensor] | None,
              s: KdOptions | None, vocab_size: int, grid_betas: Tensor | None, latf: LATF | None,
              generator: torch.Generator | None, chunk_rows: int, groups: Tensor | None = None) -> RowPlan:
    """Pass 1: hidden [N, H] (student, detached), head the student's (all Vs rows), target_ids [N];
    cache rows of the N targets (`objective.KD_FIELDS`) or None for CE only; s the KD options (None: CE
    only); vocab_size the teacher's V; grid_betas [G]; groups [N] the sequence of each row (SE-KD selects per
    sequence). The student's signals are gathered chunk by chunk, then `objective.plan_kd` decides, as on
    full logits."""
    n, dev = hidden.shape[0], hidden.device
    ce = torch.empty(n, dtype=torch.float32, device=dev)
    sig = RowSignals(n, s, dev) if s is not None else None
    for a in range(0, n, chunk_rows):
        b = min(a + chunk_rows, n)
        z = head.logits(hidden[a:b], fp32=False)  # [C, Vs] float32
        lse = torch.logsumexp(z, dim=-1)
        ce[a:b] = lse - z.gather(1, target_ids[a:b, None]).squeeze(1)
        if sig is not None:
            sig.add(a, z, cache, vocab_size, generator, lse)
        del z
    kd = KdPlan.nothing(n, dev) if s is None else plan_kd(sig, cache, s, vocab_size, grid_betas, latf, generator, groups)
    return RowPlan(kd.weight, kd.keep, kd.temps, kd.tail_beta, kd.accepted, ce_rows=ce)


@dataclass
class _LossSpec:
    """Everything pass 2 needs besides the differentiable tensors (a plain bag for the Function)."""

    head: HeadSpec
    target_ids: Tensor
    cache: dict[str, Tensor] | None
    plan: RowPlan
    s: KdOptions | None
    vocab_size: int
    ce_scale: float
    kd_scale: float
    chunk_rows: int
    fuse_ce: bool = False  # set per forward: CE from the divergence's softmax (closed form, every T = 1)


class _ChunkedLoss(torch.autograd.Function):
    """loss = ce_scale·Σ CE + kd_scale·Σ w T² D from hidden [N, H] and the head's weight [Vs, H] / bias [Vs].
    Returns (loss, Σ CE of pass 2 or NaN when not computed, Σ w T² D), the last two non-differentiable."""

    # False sends every chunk through local autograd, the pre-closed-form path: bench/student.py times both.
    closed_form = True
    # False computes CE with its own softmax pass even at T = 1 (the two-pass path, kept to compare: tests, bench).
    fuse_ce = True

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, bias: Tensor | None, spec: _LossSpec):  # noqa: D401
        n = hidden.shape[0]
        plan, head, s = spec.plan, spec.head, spec.s
        grad_h = torch.zeros_like(hidden)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if bias is not None else None
        ce_total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        kd_total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        use_kd = s is not None and spec.kd_scale != 0.0
        # Closed-form gradients (`divergences.closed_form_grad`, softmax - onehot for CE) for the K + 1 bucket and
        # the sampled tails; renorm/ignore take local autograd through the divergence. With CE in the loss and
        # every row at T = 1, CE comes from the divergence's own softmax pass (one pass over each chunk, not two).
        closed = _ChunkedLoss.closed_form and (s is None or s.tail in ("bucket", "sampled"))
        spec.fuse_ce = (closed and use_kd and spec.ce_scale != 0.0 and _ChunkedLoss.fuse_ce
                        and bool((plan.temps == 1.0).all()))
        for a in range(0, n, spec.chunk_rows):
            b = min(a + spec.chunk_rows, n)
            rows = plan.keep[a:b].nonzero().squeeze(1) if use_kd else None
            if spec.ce_scale == 0.0 and (rows is None or rows.numel() == 0):
                continue  # nothing in this chunk has a gradient
            h = hidden[a:b].detach()
            if closed:
                du = _closed_form_grad(head, h, spec, a, b, rows, ce_total, kd_total)
            else:
                du = _autograd_grad(head, h, spec, a, b, rows, ce_total, kd_total)
            grad_h[a:b] = (du.to(weight.dtype) @ weight).to(hidden.dtype)
            grad_w += (du.T.to(h.dtype) @ h).float()
            if grad_b is not None:
                grad_b += du.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b if grad_b is not None else grad_w.new_zeros(0))
        ctx.has_bias = bias is not None
        ctx.weight_dtype = weight.dtype
        if spec.ce_scale == 0.0:
            ce_total = torch.full((), math.nan, device=hidden.device)
        ctx.mark_non_differentiable(ce_total, kd_total)
        loss_value = spec.ce_scale * ce_total.nan_to_num(0.0) + spec.kd_scale * kd_total
        return loss_value, ce_total, kd_total

    @staticmethod
    def backward(ctx: Any, g_loss: Tensor, _g_ce: Tensor, _g_kd: Tensor):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        gh = grad_h * g_loss.to(grad_h.dtype) if ctx.needs_input_grad[0] else None
        gw = (grad_w * g_loss).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        gb = (grad_b * g_loss) if (ctx.has_bias and ctx.needs_input_grad[2]) else None
        return gh, gw, gb, None


def _closed_form_grad(head: HeadSpec, h: Tensor, spec: _LossSpec, a: int, b: int, rows: Tensor | None,
                      ce_total: Tensor, kd_total: Tensor) -> Tensor:
    """∂loss/∂u [C, Vs] of one chunk (u = the head's product) without autograd over [C, Vs]: CE's softmax - onehot
    and the divergence's closed form (K + 1 buckets or the sampled tail); adds the chunk's Σ CE and Σ w T² D to the
    totals. With `spec.fuse_ce` the divergence's pass also gives CE (every row, kept or not, at T = 1)."""
    plan, cache, s = spec.plan, spec.cache, spec.s
    u = head.product(h, fp32=False)  # [C, Vs] float32
    z = head.transform(u)
    grad = None
    kd = rows is not None and rows.numel() > 0
    fused = spec.fuse_ce and kd
    if spec.ce_scale != 0.0 and not fused:
        lse = torch.logsumexp(z, dim=-1)
        tgt = spec.target_ids[a:b]
        ce_total += (lse - z.gather(1, tgt[:, None]).squeeze(1)).sum()
        grad = z.sub(lse[:, None]).exp_().mul_(spec.ce_scale)
        grad.scatter_add_(1, tgt[:, None], torch.full((b - a, 1), -spec.ce_scale, dtype=grad.dtype, device=grad.device))
    if kd:
        whole = fused or rows.numel() == b - a
        g = torch.arange(a, b, device=rows.device) if fused else rows + a  # fused: every row, unkept ones at scale 0
        keep = plan.keep[g]
        t = plan.temps[g]
        beta = 1.0 / t
        # rows the plan does not keep (only when fused, at T = 1) get the T = 1 tail, log r: finite, scale 0
        tail_beta = torch.where(keep, plan.tail_beta[g], cache["tail_logprob"][g].to(plan.tail_beta.dtype))
        scale = spec.kd_scale * plan.weight[g] * t * t
        scale = torch.where(keep, scale, torch.zeros_like(scale))
        zk = z if whole else z[rows]
        tgt = spec.target_ids[a:b] if fused else None
        ce_scale = spec.ce_scale if fused else 0.0
        if s.tail == "sampled":
            check_sampled(s.loss, "tail_logprobs" in cache, t)
            teacher = sampled_teacher_of(cache, g, tail_beta, beta)
            d, gk, ce = sampled_kd_grad(s.loss, zk, cache["topk_ids"][g], teacher, beta, scale, spec.vocab_size,
                                        ce_scale=ce_scale, target_ids=tgt)
        else:
            log_p = teacher_log_buckets(cache["topk_logprobs"][g].float(), tail_beta, beta)
            log_p64 = log_p.to(torch.float64)

            def d_of(log_q_head: Tensor, _draws: Tensor | None, log_q_tail: Tensor) -> Tensor:
                return divergence(s.loss, log_p64, torch.cat([log_q_head, log_q_tail[:, None]], dim=1))

            d, gk, ce = closed_form_grad(zk, cache["topk_ids"][g], beta, scale, spec.vocab_size, d_of,
                                         ce_scale=ce_scale, target_ids=tgt)
        kd_total += torch.where(keep, plan.weight[g] * t * t * d, torch.zeros_like(d)).sum()
        if ce is not None:
            ce_total += ce.sum()
        v = spec.vocab_size
        if grad is None and whole and gk.shape[1] == z.shape[1]:
            grad = gk
        else:
            if grad is None:
                grad = torch.zeros_like(z)
            if whole:
                grad[:, :v] += gk
            else:
                grad[rows, :v] += gk
    return head.transform_backward(u, grad)


def _autograd_grad(head: HeadSpec, h: Tensor, spec: _LossSpec, a: int, b: int, rows: Tensor | None,
                   ce_total: Tensor, kd_total: Tensor) -> Tensor:
    """∂loss/∂u of one chunk by local autograd through the divergence (the renorm/ignore/sampled tails)."""
    plan, cache, s = spec.plan, spec.cache, spec.s
    with torch.enable_grad():
        u = head.product(h, fp32=False).detach().requires_grad_()  # [C, Vs] float32, bias included
        z = head.transform(u)
        loss = z.new_zeros(())
        if spec.ce_scale != 0.0:
            ce = (torch.logsumexp(z, dim=-1) - z.gather(1, spec.target_ids[a:b, None]).squeeze(1)).sum()
            loss = loss + spec.ce_scale * ce
            ce_total += ce.detach()
        if rows is not None and rows.numel():
            g = rows + a
            t = plan.temps[g]
            d = divergence_of_rows(s, z[rows], cache, plan, g, spec.vocab_size)
            kd = (plan.weight[g] * t * t * d).sum()
            loss = loss + spec.kd_scale * kd
            kd_total += kd.detach()
        (du,) = torch.autograd.grad(loss, u)
    return du


def chunked_loss(hidden: Tensor, head: HeadSpec, target_ids: Tensor, cache: dict[str, Tensor] | None,
                 plan: RowPlan, s: KdOptions | None, vocab_size: int, ce_scale: float, kd_scale: float,
                 chunk_rows: int) -> tuple[Tensor, Tensor, Tensor]:
    """Pass 2: (loss, Σ CE, Σ w T² D) with loss differentiable w.r.t. `hidden` and the head's parameters.

    hidden [N, H] the student's hidden states at the targets (with grad), head the student's `HeadSpec`
    over all its Vs rows, plan from `plan_rows`. Σ CE is NaN when ce_scale = 0 (it was not recomputed:
    `plan.ce_rows` has it).
    """
    spec = _LossSpec(head, target_ids, cache, plan, for_batch(s, cache), vocab_size, float(ce_scale), float(kd_scale),
                     chunk_rows)
    weight = head.weight  # all Vs rows: the student's padded ids are in its CE, never in its KD buckets
    return _ChunkedLoss.apply(hidden, weight, head.bias, spec)
