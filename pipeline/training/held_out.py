"""Held-out evaluation during training, and the best checkpoint it keeps.

    kdcache train --cache runs/demo/cache --student-config configs/models/demo_student.json --out runs/kd \
        --eval-every 50 --eval-data runs/demo/prepared/heldout --eval-cache runs/demo/cache_heldout \
        --best-metric fkl_to_teacher

Every `eval_every` optimizer steps, and at the last step, rank 0 scores the student on the held-out
split with `score` below (the very figures `kdcache eval` writes: ce and ppl, and with
the split's cache teacher_top1_agreement and fkl_to_teacher), logs them in that step's metrics row
as `eval_<figure>`, and when `best_metric` improved writes the model to OUT/best (a `save_pretrained`
directory with the tokenizer and best.json, written under a temporary name and swapped in).
The best value and its step are part of the checkpoint state, so a resumed run keeps comparing
against the best of the steps before the interruption.

Scoring switches the model to eval mode and back and draws no random numbers, so a run with
held-out evaluation trains exactly the weights of one without (tested).
"""

from __future__ import annotations

import logging
import math
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from pipeline.data.stream import CacheStream
from pipeline.errors import KdError
from pipeline.head import head_spec
from pipeline.losses.divergences import divergence, student_log_buckets, teacher_log_buckets
from pipeline.models import model_vocab_size
from pipeline.training.student import TargetLogits
from pipeline.identity import describe_tokenizer, same_tokenizer, write_json

log = logging.getLogger(__name__)

# The figure best/ is chosen by, and whether lower or higher is better.
BEST_METRICS = {"ce": "min", "fkl_to_teacher": "min", "teacher_top1_agreement": "max"}
BEST_DIR = "best"
BEST_RECORD = "best.json"
EVAL_FIELDS = ("topk_ids", "topk_logprobs", "tail_logprob")  # the cache fields eval reads
ROW_CHUNK_ELEMENTS = 1 << 25  # float64 logits per metrics chunk: 256 MiB


# ---- per-position metrics ------------------------------------------------------------------
def bucket_fkl(logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
               tail_logprob: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Forward KL(P || Q) on the K + 1 buckets at T = 1 (methods.md §2), per row, in float64.

    logits [N, Vs] student; topk_ids [N, K], topk_logprobs [N, K] (log p over the full vocabulary) and
    tail_logprob [N] (log r) from the cache; vocab_size the teacher's V. Q head = the student's
    probabilities of the K ids, Q tail = the rest of the teacher's V ids (masked logsumexp, exact in
    log space), both normalised over the student's WHOLE head: the mass a padded student head (Vs > V)
    puts on ids the teacher cannot emit is a real divergence (P has none there), so it is counted, not
    renormalised away (KL(P || Q) = KL(P || Q restricted to V) - log Q(V)). Returns [N] float64.
    """
    ones = torch.ones(logits.shape[0], dtype=torch.float64, device=logits.device)
    z = logits.double()
    log_p = teacher_log_buckets(topk_logprobs.double(), tail_logprob.double(), ones)
    log_q = student_log_buckets(z, topk_ids, ones, vocab_size)
    fkl = divergence("fkl", log_p, log_q)
    if z.shape[1] > vocab_size:  # - log Q(V): the student's mass on its padded ids
        fkl = fkl + (torch.logsumexp(z, dim=-1) - torch.logsumexp(z[:, :vocab_size], dim=-1))
    return fkl


class Totals:
    """Running sums of the per-target metrics (float64 on the host)."""

    def __init__(self, vocab_size: int | None = None) -> None:
        self.vocab_size = vocab_size  # the teacher's V (from the cache)
        self.targets = 0
        self.nll = 0.0
        self.agree = 0
        self.fkl = 0.0

    def add(self, logits: torch.Tensor, target_ids: torch.Tensor, cache: dict[str, torch.Tensor] | None) -> None:
        """logits [N, Vs] float32 at the targets; target_ids [N]; cache rows of the same N targets."""
        n, v = logits.shape
        step = max(1, ROW_CHUNK_ELEMENTS // max(v, 1))
        for a in range(0, n, step):
            z = logits[a: a + step]
            zd = z.double()
            self.nll += float((zd.logsumexp(-1) - zd.gather(1, target_ids[a: a + step, None]).squeeze(1)).sum())
            if cache is not None:
                ids = cache["topk_ids"][a: a + step]
                self.agree += int((z.argmax(-1) == ids[:, 0]).sum())
                self.fkl += float(bucket_fkl(zd, ids, cache["topk_logprobs"][a: a + step],
                                             cache["tail_logprob"][a: a + step], self.vocab_size).sum())
        self.targets += n

    def result(self, with_cache: bool) -> dict[str, Any]:
        ce = self.nll / max(self.targets, 1)
        out: dict[str, Any] = {"targets": self.targets, "ce": ce, "ppl": math.exp(ce) if ce < 700 else float("inf")}
        if with_cache:
            out["teacher_top1_agreement"] = self.agree / max(self.targets, 1)
            out["fkl_to_teacher"] = self.fkl / max(self.targets, 1)
        return out


# ---- the figures over a whole split ---------------------------------------------------------
def score(model: Any, ds: Any, cache: Any | None, batch_size: int, device: torch.device, autocast: Any = None,
          progress: bool = False) -> dict[str, Any]:
    """ce, ppl (and with `cache`: teacher_top1_agreement, fkl_to_teacher) of `model` over every target of `ds`.

    The figures of eval.json (`kdcache eval`) and of training's held-out evaluation (`HeldOut` below).
    `model` is used as it is (put it in eval mode first); `autocast` wraps the forward passes.
    """
    stream = CacheStream(ds, cache, batch_size, shuffle=False, fields=EVAL_FIELDS)
    n_batches = stream.batches_in_epoch(0)
    net = TargetLogits(model)
    head = head_spec(model, model_vocab_size(model))
    chunk = max(1, ROW_CHUNK_ELEMENTS // model_vocab_size(model))
    totals = Totals(cache.vocab_size if cache is not None else None)
    batches = iter(stream)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_batches, desc="eval", unit="batch", leave=False)
    try:
        for _ in range(n_batches):
            mb = next(batches).to(device)
            with torch.no_grad(), autocast or nullcontext():
                hidden = net.hidden(mb.input_ids, mb.attention_mask, mb.tgt_b, mb.tgt_t)
                # The head runs a chunk of rows at a time: no [N, V] logits tensor (V = 151,936 x 16k targets
                # would be 10 GB per copy).
                for a in range(0, hidden.shape[0], chunk):
                    part = {k: v[a: a + chunk] for k, v in mb.cache.items()} if mb.cache is not None else None
                    totals.add(head.logits(hidden[a: a + chunk], fp32=False), mb.target_ids[a: a + chunk], part)
            if bar is not None:
                bar.update(1)
    finally:
        batches.close()  # stops the stream's reader threads now, not at garbage collection
        if bar is not None:
            bar.close()
    return totals.result(cache is not None)


class HeldOut:
    """The held-out split (and its cache) a training run scores itself on."""

    def __init__(self, data: str, cache_path: str, batch_size: int, model: Any, train_tokenizer: dict[str, Any]):
        from pipeline.cache import open_cache
        from pipeline.data.prepare import load_prepared, prepared_meta
        from pipeline.training.student import check_inputs

        self.cache = open_cache(cache_path) if cache_path else None
        self.data = data or (self.cache.meta["data"]["path"] if self.cache is not None else "")
        if not self.data:
            raise KdError("held-out evaluation needs --eval-data (a `kdcache prepare` output of the held-out split)")
        self.meta = prepared_meta(self.data)
        if not same_tokenizer(self.meta["tokenizer"], train_tokenizer):
            raise KdError(f"--eval-data {self.data} was prepared with {describe_tokenizer(self.meta['tokenizer'])}, "
                          f"the training data with {describe_tokenizer(train_tokenizer)}: prepare both with one tokenizer")
        self.ds = load_prepared(self.data)
        check_inputs(model, self.meta, self.cache)  # the cache: complete, the split's own, same tokenizer
        self.batch_size = batch_size

    def score(self, model: Any, device: torch.device, autocast: Any) -> dict[str, Any]:
        """The held-out figures of `model` now (eval mode for the pass, then back to what it was)."""
        was_training = model.training
        model.eval()
        try:
            return score(model, self.ds, self.cache, self.batch_size, device, autocast=autocast)
        finally:
            model.train(was_training)


class Best:
    """The best held-out value so far and its step; `state_dict` goes into every checkpoint."""

    def __init__(self, metric: str):
        if metric not in BEST_METRICS:
            raise KdError(f"best_metric must be one of {', '.join(BEST_METRICS)}, got {metric!r}")
        self.metric, self.value, self.step = metric, None, None

    def improves(self, value: float) -> bool:
        """True when `value` beats the best so far (the first finite value always does)."""
        if value is None or not math.isfinite(value):
            return False
        if self.value is None:
            return True
        return value < self.value if BEST_METRICS[self.metric] == "min" else value > self.value

    def update(self, value: float, step: int) -> None:
        self.value, self.step = float(value), int(step)

    def state_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "value": self.value, "step": self.step}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if not state or state.get("metric") != self.metric:  # no evaluation before, or another metric
            return
        self.value, self.step = state.get("value"), state.get("step")


def write_best(out: Path, model: Any, tokenizer: Any | None, record: dict[str, Any]) -> Path:
    """OUT/best: the model, its tokenizer and best.json, written under best.tmp and swapped in."""
    from pipeline.training.checkpoint import replace_dir

    tmp = out / (BEST_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    write_json(tmp / BEST_RECORD, record)
    return replace_dir(tmp, out / BEST_DIR)
