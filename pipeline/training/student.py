"""Building the student and the checks that must pass before training starts."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from pipeline.errors import KdError
from pipeline.identity import describe_tokenizer, same_tokenizer, tokenizer_identity
from pipeline.models import (input_device, load_causal_lm, load_tokenizer, local_model, model_vocab_size,
                             own_tokenizer)
from pipeline.head import check_head, head_spec
from pipeline.losses.adakd import LATF
from pipeline.losses.chunked import RowPlan, auto_chunk_rows, chunked_loss, plan_rows
from pipeline.losses.options import KdOptions

log = logging.getLogger(__name__)


def build_student(student: str, student_config: str, device: torch.device, seed: int) -> Any:
    """Load `student` (directory or hub id) or build one from scratch from a transformers config file."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if student:
        model = load_causal_lm(local_model(student), device, torch.float32)
    elif student_config:
        p = Path(student_config)
        if not p.exists():
            raise KdError(f"student config not found: {p}")
        try:
            cfg = AutoConfig.from_pretrained(str(p))
        except (OSError, ValueError, KeyError) as e:
            raise KdError(f"cannot read student config {p}: {str(e).splitlines()[0]}") from None
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg).to(device)
    else:
        raise KdError("no student given: pass --student PATH_OR_ID or --student-config CONFIG.json")
    return model.train()


def student_tokenizer(student: str, data_tok: dict[str, Any]) -> Any | None:
    """The tokenizer the trained student is saved with: its own, or the data's for a student built from a config.

    A student that carries a tokenizer must carry the very one the data (and so the cache) was made
    with: same sha256 of every (token, id) pair, else a one-line `KdError` naming both. Its own files
    are kept (chat template, special-token roles), not replaced by the data's. A hub student whose
    tokenizer cannot be loaded, or data whose tokenizer is gone, gives None: the model is saved
    without one (logged).
    """
    if student:
        student = local_model(student)
        try:
            own = own_tokenizer(student)
        except KdError as e:
            if Path(student).expanduser().exists():
                raise
            log.warning("student %s: no loadable tokenizer (%s); final/ gets the data's", student, e)
            own = None
        if own is not None:
            ident = tokenizer_identity(own, student)
            if not same_tokenizer(ident, data_tok):
                raise KdError(f"the student's tokenizer {describe_tokenizer(ident)} is not the one the data and cache "
                              f"were made with, {describe_tokenizer(data_tok)}: the cached ids would mean other "
                              "tokens to it; prepare the data with the student's tokenizer or pick another student")
            return own
    try:
        return load_tokenizer(data_tok["name"])
    except KdError as e:
        log.warning("the data's tokenizer cannot be loaded (%s): the student is saved without one", e)
        return None


class TargetLogits(torch.nn.Module):
    """Student forward that applies the output head only at target positions.

    forward(input_ids [B, L], attention_mask [B, L], tgt_b [N], tgt_t [N]) -> logits [N, Vs], the
    prediction of token t from the prefix before it. Skipping the head elsewhere saves B*L*Vs
    memory; wrapping this module (not the bare model) in DDP keeps gradient sync on its forward.
    """

    def __init__(self, model: Any):
        super().__init__()
        self.model = model

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, tgt_b: torch.Tensor,
               tgt_t: torch.Tensor) -> torch.Tensor:
        """[N, H]: the final hidden state that predicts each target (for a head applied in chunks)."""
        return target_hidden(self.model, input_ids, attention_mask, tgt_b, tgt_t)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, tgt_b: torch.Tensor,
                tgt_t: torch.Tensor) -> torch.Tensor:
        # The same head transform as the teacher pass (bias, Cohere/Granite scaling, Gemma soft-cap),
        # over every row of the (possibly padded) student head. Built per call: it only holds references.
        hidden = target_hidden(self.model, input_ids, attention_mask, tgt_b, tgt_t)
        return head_spec(self.model, model_vocab_size(self.model)).logits(hidden, fp32=False)


def target_hidden(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, tgt_b: torch.Tensor,
                  tgt_t: torch.Tensor) -> torch.Tensor:
    """Final hidden states [N, H] at the N targets: token t is predicted from position t - 1 (input_ids,
    attention_mask [B, L]; tgt_b, tgt_t [N]).

    The mask is not passed to the model: rows are right-padded and attention is causal, so no target's
    position attends to the padding after it (the same hidden states bitwise, tests/training/test_train.py), and
    without a mask SDPA can use its causal flash / memory-efficient kernels. `attention_mask` stays in the
    signature for callers that pad otherwise: a mask on the CPU is checked to be right padding (on a GPU the
    check would cost a host sync per micro-batch; kdcache's collators always pad on the right)."""
    left_padded = (attention_mask is not None and attention_mask.device.type == "cpu"
                   and not bool((attention_mask.cummin(dim=1).values == attention_mask).all()))
    if left_padded:
        out = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    else:
        out = model.base_model(input_ids=input_ids).last_hidden_state
    return out[tgt_b, tgt_t - 1]


def check_inputs(model: Any, prepared_meta: dict[str, Any], cache: Any | None, follow: bool = False) -> None:
    """Refuse mismatched student/cache/data before any step (each a one-line `KdError`). With `follow`
    the cache may still be incomplete (`kdcache train --follow` waits for each shard's commit)."""
    vs = model_vocab_size(model)
    tok = prepared_meta["tokenizer"]
    if vs < int(tok["vocab_size"]):
        who = getattr(model, "name_or_path", "") or type(model).__name__
        raise KdError(f"the student {who} has {vs} output ids, fewer than the {tok['vocab_size']} of the tokenizer the "
                      f"data was prepared with, {describe_tokenizer(tok)}: it was made for another tokenizer; prepare "
                      "the data with the student's tokenizer, or pick a student of this one")
    if cache is None:
        return
    if not follow and not cache.complete:
        missing = sum(1 for ok in cache.committed() if not ok)
        raise KdError(f"cache {cache.path} is incomplete ({missing} shard(s) not committed); finish `kdcache teacher` first, or train alongside it with --follow")
    cache.check_consistent()  # one dtype and one format across shards
    if vs < cache.vocab_size:
        raise KdError(f"the student has {vs} output ids but the cache holds ids up to {cache.vocab_size - 1}")
    if not same_tokenizer(cache.meta["tokenizer"], tok):
        raise KdError(f"tokenizer mismatch: the cache was made with {cache.meta['tokenizer']['name']} "
                      f"(sha256 {cache.meta['tokenizer']['vocab_sha256'][:12]}), the data with {tok['name']} "
                      f"(sha256 {tok['vocab_sha256'][:12]})")
    if cache.meta["data"]["fingerprint"] != prepared_meta["fingerprint"]:
        raise KdError(f"the cache was made from other data than {prepared_meta.get('data', 'this dataset')} "
                      "(fingerprints differ); pass the prepared data the cache was made from")


def check_student_head(model: Any) -> None:
    """The student's loss applies `head_spec` to its hidden states a chunk at a time, never its `forward`'s
    logits: refuse (one line) a family whose forward transforms logits in a way head_spec does not know, as the
    teacher's pass does, instead of training it against the wrong distribution. Eval mode, so dropout is off."""
    was = model.training
    model.eval()
    try:
        check_head(model, head_spec(model, model_vocab_size(model)), input_device(model))
    finally:
        model.train(was)


class StudentObjective(torch.nn.Module):
    """The student and its loss as one module: what DDP and FSDP wrap, so the head's parameters are used
    inside a forward (FSDP2 gathers a sharded head only there).

    forward(input_ids [B, L], attention_mask [B, L], tgt_b [N], tgt_t [N], target_ids [N], cache, scales)
    -> (loss or None, plan, Σ CE, Σ w T² D). `scales(plan) -> (ce_scale, kd_scale)` is called between the
    passes (the trainer normalises over the whole step, across micro-batches and ranks); scales=None runs
    pass 1 only (the trainer's pre-pass that counts Σw before any gradient).
    """

    def __init__(self, model: Any, settings: KdOptions | None, vocab_size: int | None,
                 grid_betas: Tensor | None, latf: LATF | None, generator: torch.Generator | None,
                 chunk_rows: int = 0):
        super().__init__()
        self.model = model
        self.settings, self.vocab_size, self.grid_betas = settings, vocab_size, grid_betas
        self.latf, self.generator = latf, generator
        self._head = lambda: head_spec(self.model, model_vocab_size(self.model))
        check_student_head(model)
        self.chunk_rows = chunk_rows or auto_chunk_rows(model_vocab_size(model))

    def forward(self, input_ids: Tensor, attention_mask: Tensor, tgt_b: Tensor, tgt_t: Tensor, target_ids: Tensor,
                cache: dict[str, Tensor] | None, scales: Callable[[RowPlan], tuple[float, float]] | None = None):
        h = target_hidden(self.model, input_ids, attention_mask, tgt_b, tgt_t)
        head = self._head()  # built per call: it only holds references (FSDP swaps the parameters)
        plan = plan_rows(h.detach(), head, target_ids, cache, self.settings, self.vocab_size or head.vocab_size,
                         self.grid_betas, self.latf, self.generator, self.chunk_rows, groups=tgt_b)
        if scales is None:
            return None, plan, None, None
        ce_scale, kd_scale = scales(plan)
        loss, ce, kd = chunked_loss(h, head, target_ids, cache, plan, self.settings,
                                    self.vocab_size or head.vocab_size, ce_scale, kd_scale, self.chunk_rows)
        return loss, plan, ce, kd
