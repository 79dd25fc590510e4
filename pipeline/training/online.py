"""The online reference: the teacher's full distribution computed for each micro-batch, instead of read from a cache.

Every offline cache approximates one thing: distillation from the teacher's whole distribution, online. This is
that arm, for benchmarks (`kdcache run`: a student with `online: true`; the teacher and the student share one
device, which kdcache never does otherwise). The teacher's rows are handed to the student's loss as cache rows
with K = V: every id in the head, sorted by descending probability, and no tail (r = 0, so the tail's entropy and
power sums are empty). The loss code is the cached arms' own, so gate, LATF, IDTS, SE-KD and every divergence run
unchanged on the exact distribution: K + 1 buckets with K = V are the dense softmax (methods.md §2).

Memory: rows of one micro-batch are [N, V] (ids int64 + log-probs float32: 12 bytes per id), the size of the
student's own logits for those targets; fine at benchmark scale, not meant for V = 150k micro-batches of 16k
targets.
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.errors import KdError
from pipeline.head import check_head, head_spec
from pipeline.identity import describe_tokenizer, same_tokenizer, tokenizer_identity
from pipeline.losses.temperature import DEFAULT_GRID_TEMPERATURES
from pipeline.models import input_device, load_causal_lm, own_tokenizer, resolve_model_path


class OnlineTeacher:
    """A teacher model run on each micro-batch; `rows` gives what the cache would hold, exactly, with K = V.

    vocab_size: the data tokenizer's V (the teacher's padded head rows beyond it are excluded, as the teacher stage
    does); temperatures: the grid the temperature checks use (the teacher stage's default grid: the same IDTS and
    --temperature range a default cache allows).
    """

    tail_samples = 0

    def __init__(self, model: str, device: torch.device, data_tokenizer: dict[str, Any], dtype: torch.dtype = torch.float32):
        path = resolve_model_path(model)
        own = own_tokenizer(path)
        if own is not None:
            ident = tokenizer_identity(own, path)
            if not same_tokenizer(ident, data_tokenizer):
                raise KdError(f"online teacher {model} has tokenizer {describe_tokenizer(ident)}, the data "
                              f"{describe_tokenizer(data_tokenizer)}: prepare the data with the teacher's tokenizer")
        self.model = load_causal_lm(path, device, dtype)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.vocab_size = int(data_tokenizer["vocab_size"])
        self.head = head_spec(self.model, self.vocab_size)
        check_head(self.model, self.head, input_device(self.model))
        self.k = self.vocab_size
        self.temperatures = list(DEFAULT_GRID_TEMPERATURES)
        self.name = model

    @torch.no_grad()
    def rows(self, input_ids: torch.Tensor, tgt_b: torch.Tensor, tgt_t: torch.Tensor,
             target_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """The N target rows of a right-padded micro-batch (input_ids [B, L]; tgt_b, tgt_t, target_ids [N]) as
        cache rows with K = V: topk_ids [N, V] int64 and topk_logprobs [N, V] float32 (descending), tail_logprob [N]
        = -inf, tail_entropy [N] = 0, tail_log_partition [N, G] = -inf, target_rank [N] (the target's rank)."""
        hidden = self.model.base_model(input_ids=input_ids).last_hidden_state[tgt_b, tgt_t - 1]
        logp = torch.log_softmax(self.head.logits(hidden), dim=-1)
        lp, ids = logp.sort(dim=-1, descending=True, stable=True)
        n, g = ids.shape[0], len(self.temperatures)
        rank = (ids == target_ids[:, None]).int().argmax(dim=1)
        return {"topk_ids": ids, "topk_logprobs": lp, "tail_logprob": torch.full((n,), -torch.inf, device=lp.device),
                "tail_entropy": torch.zeros(n, device=lp.device),
                "tail_log_partition": torch.full((n, g), -torch.inf, device=lp.device), "target_rank": rank}
