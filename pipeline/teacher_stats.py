"""What the teacher pass computes per target position (methods.md §1), from its final hidden states.

Everything is float32 over the full vocabulary, on the model's device, before anything is
truncated. The output head is applied only to the hidden states of target positions and only
`chunk_rows` rows at a time, so peak memory is a few [chunk_rows, V] float32 buffers however
large batch x length x V would be (a 7B Llama at 8k tokens x 32k vocab would need 1 GiB per
logits copy otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class HeadSpec:
    """How to turn final hidden states into the teacher's logits.

    weight: [V_model, H] output embedding; bias: [V_model] or None; vocab_size: ids kept in the
    distribution (the tokenizer's size: rows beyond it are padding the model can never be asked to
    emit, masked to -inf); softcap / scale: Gemma-2-style final logit soft-capping and Cohere-style
    logit scaling, applied as the model's own forward would.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    vocab_size: int
    softcap: float | None = None
    scale: float | None = None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[C, H] hidden states -> [C, vocab_size] float32 logits."""
        z = hidden @ self.weight[: self.vocab_size].T
        if self.bias is not None:
            z = z + self.bias[: self.vocab_size]
        z = z.float()
        if self.scale is not None:
            z = z * self.scale
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z


def head_spec(model, vocab_size: int) -> HeadSpec:
    """The output head of a Hugging Face causal LM, restricted to `vocab_size` ids."""
    head = model.get_output_embeddings()
    cfg = model.config
    softcap = getattr(cfg, "final_logit_softcapping", None)
    scale = getattr(cfg, "logit_scale", None)
    return HeadSpec(weight=head.weight, bias=getattr(head, "bias", None), vocab_size=vocab_size,
                    softcap=float(softcap) if softcap else None, scale=float(scale) if scale else None)


class NonFiniteLogits(Exception):
    """Raised with the row (within the call) whose logits hold NaN or inf."""

    def __init__(self, row: int):
        super().__init__(row)
        self.row = row


@torch.no_grad()
def distribution_stats(logits: torch.Tensor, target_ids: torch.Tensor, k: int, betas: torch.Tensor,
                       tail_samples: int = 0, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Cached quantities of C next-token distributions.

    logits [C, V] float32; target_ids [C] int64; betas [G] float32 (1/T for the grid).
    Returns topk_ids [C, K] int64, topk_logprobs [C, K], entropy [C], log_partition [C, G],
    target_logprobs [C], and with tail_samples = S > 0: tail_ids [C, S] int64 (-1 pads),
    tail_counts [C, S] int64 — S draws from p restricted to ids outside the top-K.
    """
    logp = torch.log_softmax(logits, dim=-1)  # [C, V]
    top_lp, top_ids = torch.topk(logp, k, dim=-1, sorted=True)
    # entr(p) = -p log p with entr(0) = 0: exact for ids whose probability underflows.
    entropy = torch.special.entr(logp.exp()).sum(-1)
    # A(beta) = log sum_j p_j^beta, one logsumexp per grid point; G is small (4).
    log_partition = torch.stack([torch.logsumexp(logp * b, dim=-1) for b in betas.tolist()], dim=-1)
    out = {
        "topk_ids": top_ids,
        "topk_logprobs": top_lp,
        "entropy": entropy,
        "log_partition": log_partition,
        "target_logprobs": logp.gather(1, target_ids[:, None]).squeeze(1),
    }
    if tail_samples:
        out.update(sample_tail(logp, top_ids, tail_samples, generator))
    return out


def sample_tail(logp: torch.Tensor, top_ids: torch.Tensor, s: int,
                generator: torch.Generator | None) -> dict[str, torch.Tensor]:
    """S draws per row from p restricted to ids outside the top-K, as sorted (id, count) pairs.

    logp [C, V]; top_ids [C, K]. Rows whose tail mass is zero (K = V, or underflow) get no draws.
    """
    v = logp.shape[1]
    tail_logp = logp.scatter(1, top_ids, float("-inf"))
    has_tail = torch.isfinite(tail_logp).any(-1)
    probs = torch.softmax(tail_logp.masked_fill(~has_tail[:, None], 0.0), dim=-1)
    draws = torch.multinomial(probs, s, replacement=True, generator=generator)  # [C, S]
    # Count draws per id ([C, V], the size of the logits we already hold); at most S ids are
    # non-zero, so the top-S counts hold all of them. Sorting by id makes the layout canonical.
    counts_full = torch.zeros_like(logp, dtype=torch.int64).scatter_add_(1, draws, torch.ones_like(draws))
    counts, ids = torch.topk(counts_full, s, dim=-1)
    ids = torch.where((counts > 0) & has_tail[:, None], ids, torch.full_like(ids, v))
    ids, order = torch.sort(ids, dim=-1)
    counts = counts.gather(1, order)
    pad = ids == v
    ids = ids.masked_fill(pad, -1)
    counts = counts.masked_fill(pad, 0)
    return {"tail_ids": ids, "tail_counts": counts}


@torch.no_grad()
def rows_from_hidden(hidden: torch.Tensor, target_ids: torch.Tensor, head: HeadSpec, k: int, betas: torch.Tensor,
                     chunk_rows: int, tail_samples: int = 0,
                     generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Apply the head to R target hidden states [R, H] in chunks; returns the stats of all R rows.

    Raises `NonFiniteLogits(row)` for the first row whose logits are not all finite.
    """
    parts: list[dict[str, torch.Tensor]] = []
    for a in range(0, hidden.shape[0], chunk_rows):
        z = head.logits(hidden[a: a + chunk_rows])
        finite = torch.isfinite(z).all(-1)
        if not bool(finite.all()):
            raise NonFiniteLogits(a + int((~finite).nonzero()[0, 0]))
        parts.append(distribution_stats(z, target_ids[a: a + chunk_rows], k, betas, tail_samples, generator))
    if not parts:
        raise ValueError("rows_from_hidden needs at least one row")
    return {n: torch.cat([p[n] for p in parts]) for n in parts[0]}


def auto_chunk_rows(vocab_size: int, budget_bytes: int = 256 << 20) -> int:
    """Rows per head chunk so ~4 float32 [rows, V] temporaries fit in `budget_bytes`."""
    return max(1, min(4096, budget_bytes // (16 * vocab_size)))
