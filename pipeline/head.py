"""The output head of any causal LM: final hidden states -> logits, as the model's own forward computes them.

Both stages use it: the teacher applies it to target rows only (`pipeline.teacher.stats`), the student's
chunked loss applies it a row chunk at a time (`pipeline.losses.chunked`), so neither ever holds a
[tokens, V] logits tensor. `check_head` proves on a few tokens that it matches the model's `forward`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.errors import KdError


@dataclass
class HeadSpec:
    """How to turn final hidden states into the teacher's logits.

    weight: [V_model, H] output embedding; bias: [V_model] or None; vocab_size: ids kept in the
    distribution (the tokenizer's size: rows beyond it are padding the model can never be asked to
    emit, masked to -inf); softcap / scale: Gemma-2-style final logit soft-capping and the logit scaling of
    Cohere (x logit_scale), Granite (/ logits_scaling) and Falcon-H1 (x lm_head_multiplier), applied as the
    model's own forward would (docs/families.md: every family tested).
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    vocab_size: int
    softcap: float | None = None
    scale: float | None = None

    def logits(self, hidden: torch.Tensor, fp32: bool = True) -> torch.Tensor:
        """[C, H] hidden states -> [C, vocab_size] float32 logits: `transform(product(hidden))`.

        fp32=True (the teacher pass): a bf16/fp16 head is multiplied into float32 logits instead of
        rounding them to 16 bits (at |z| ~ 20 a bf16 logit is off by up to 0.06 nats, more than the
        cache's codec error). On CUDA that is `mm(..., out_dtype=float32)`: the same tensor-core
        product, only the output kept in float32, at no extra memory. Elsewhere the head is upcast in
        slices of `_UPCAST_ROWS` ids, so the float32 copy never exceeds one slice.
        fp32=False (the student, under autocast): the plain product in the working dtype, then float32.
        """
        return self.transform(self.product(hidden, fp32))

    def product(self, hidden: torch.Tensor, fp32: bool = True) -> torch.Tensor:
        """[C, H] -> [C, vocab_size] float32: hidden @ W.T + bias, before any scaling or soft-capping."""
        w = self.weight[: self.vocab_size]
        if not fp32 or (w.dtype == torch.float32 and hidden.dtype == torch.float32):
            z = (hidden @ w.T).float()
        else:
            z = _fp32_product(hidden, w)
        if self.bias is not None:
            z = z + self.bias[: self.vocab_size].float()
        return z

    def transform(self, z: torch.Tensor) -> torch.Tensor:
        """The model's own logit transform on a product: Cohere/Granite scaling, then Gemma-2 soft-capping."""
        if self.scale is not None:
            z = z * self.scale
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    def transform_backward(self, u: torch.Tensor, grad_z: torch.Tensor) -> torch.Tensor:
        """The gradient w.r.t. the product u [C, V] given the gradient w.r.t. transform(u) [C, V]: the chain rule
        of `transform` (scaling, then soft-capping), in place on grad_z."""
        if self.softcap is not None:
            t = torch.tanh((u * self.scale if self.scale is not None else u) / self.softcap)
            grad_z.mul_(1.0 - t.square_())
        if self.scale is not None:
            grad_z.mul_(self.scale)
        return grad_z


_UPCAST_ROWS = 16384  # head rows upcast at a time off CUDA: 16384 x H x 4 bytes (256 MiB at H = 4096)


def _fp32_product(hidden: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """hidden [C, H] @ w[V, H].T with float32 output from 16-bit inputs (see `HeadSpec.logits`)."""
    if hidden.is_cuda and hidden.dtype == w.dtype:
        try:
            return torch.mm(hidden, w.T, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):  # torch without mm.dtype for this pair
            pass
    h = hidden.float()
    out = torch.empty((h.shape[0], w.shape[0]), dtype=torch.float32, device=h.device)
    for a in range(0, w.shape[0], _UPCAST_ROWS):
        torch.mm(h, w[a: a + _UPCAST_ROWS].float().T, out=out[:, a: a + _UPCAST_ROWS])
    return out


def head_spec(model, vocab_size: int) -> HeadSpec:
    """The output head of a Hugging Face causal LM, restricted to `vocab_size` ids."""
    head = model.get_output_embeddings()
    cfg = model.config
    if head is None or getattr(head, "weight", None) is None:
        raise KdError(f"{type(model).__name__} has no output embedding matrix: cannot cache its distributions")
    if head.weight.shape[0] < vocab_size:
        raise KdError(f"the model's output head has {head.weight.shape[0]} rows but the tokenizer has "
                      f"{vocab_size} ids: the model cannot score every token (wrong tokenizer?)")
    softcap = getattr(cfg, "final_logit_softcapping", None)
    scale = getattr(cfg, "logit_scale", None)  # Cohere: logits * scale
    if getattr(cfg, "logits_scaling", None):  # Granite: logits / logits_scaling
        scale = (scale or 1.0) / float(cfg.logits_scaling)
    if getattr(cfg, "lm_head_multiplier", None) not in (None, 1.0):  # Falcon-H1: logits * lm_head_multiplier
        scale = (scale or 1.0) * float(cfg.lm_head_multiplier)
    return HeadSpec(weight=head.weight, bias=getattr(head, "bias", None), vocab_size=vocab_size,
                    softcap=float(softcap) if softcap else None, scale=float(scale) if scale else None)


@torch.no_grad()
def check_head(model, head: HeadSpec, device: torch.device) -> float:
    """Compare `head` applied to the final hidden states with the model's own logits on 8 tokens.

    The teacher pass bypasses `model.forward`'s head to apply it to target rows only; a family whose
    forward transforms logits in a way `head_spec` does not know would be cached wrongly and
    silently. Returns the max abs difference; raises `KdError` when it is not rounding-sized.
    """
    n = min(8, head.vocab_size)
    ids = (torch.arange(n, device=device) * 7919 % head.vocab_size)[None]
    ref = model(input_ids=ids).logits[0, :, : head.vocab_size].float()
    ours = head.logits(model.base_model(input_ids=ids).last_hidden_state[0])
    finite = torch.isfinite(ref) & torch.isfinite(ours)
    if not bool(finite.all()):
        return float("nan")  # non-finite logits are reported per example by the caller
    diff = float((ref - ours).abs().max())
    tol = (1e-3 if ref.dtype == torch.float32 and head.weight.dtype == torch.float32 else 5e-2) * (1 + float(ref.abs().max()))
    if diff > tol:
        raise KdError(f"{type(model).__name__}: logits from its output head differ from its forward pass by {diff:.3g} "
                      "(an unsupported logit transform); this model family is not supported by the teacher pass")
    return diff
