"""Held-out evaluation during training, and the best checkpoint it keeps.

    kdcache train --cache runs/demo/cache --student-config configs/models/demo_student.json --out runs/kd \
        --eval-every 50 --eval-data runs/demo/prepared/heldout --eval-cache runs/demo/cache_heldout \
        --best-metric fkl_to_teacher

Every `eval_every` optimizer steps, and at the last step, rank 0 scores the student on the held-out
split with `pipeline.evaluate.score` (the very figures `kdcache eval` writes: ce and ppl, and with
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
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import KdError
from pipeline.identity import describe_tokenizer, same_tokenizer, write_json

log = logging.getLogger(__name__)

# The figure best/ is chosen by, and whether lower or higher is better.
BEST_METRICS = {"ce": "min", "fkl_to_teacher": "min", "teacher_top1_agreement": "max"}
BEST_DIR = "best"
BEST_RECORD = "best.json"


class HeldOut:
    """The held-out split (and its cache) a training run scores itself on."""

    def __init__(self, data: str, cache_path: str, batch_size: int, model: Any, train_tokenizer: dict[str, Any]):
        from pipeline.cache import open_cache
        from pipeline.prepare import load_prepared, prepared_meta
        from pipeline.student import check_inputs

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
        from pipeline.evaluate import score

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
    from pipeline.checkpoint import replace_dir

    tmp = out / (BEST_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    write_json(tmp / BEST_RECORD, record)
    return replace_dir(tmp, out / BEST_DIR)
