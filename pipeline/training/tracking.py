"""What a `kdcache train` run tracks besides its weights, carried through every checkpoint so a resumed run
counts on: tokens seen, time spent stepping and evaluating, the held-out figures (`pipeline.training.held_out`)
and the best of them so far. The run's summary (`pipeline.training.summary`) is made of these totals."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from pipeline.training.held_out import Best, HeldOut, write_best


class RunTracker:
    """The run's counts and held-out record; `state_dict()` is the tail of the trainer's checkpoint state."""

    def __init__(self, held_out: HeldOut | None, best_metric: str, eval_every: int, eval_cache: str):
        self.held_out, self.eval_every, self.eval_cache = held_out, eval_every, eval_cache or None
        self.best = Best(best_metric)
        self.held_out_last: dict[str, Any] | None = None  # the latest held-out figures, for the model card
        self.tokens_seen, self.train_seconds, self.eval_seconds = 0, 0.0, 0.0  # over the whole run, resumes included

    def add_step(self, tokens: int, seconds: float) -> None:
        self.tokens_seen += tokens
        self.train_seconds += seconds

    def due(self, step: int, total: int) -> bool:
        """Whether the held-out split is scored after `step`: every eval_every steps and at the last."""
        return self.held_out is not None and (step % self.eval_every == 0 or step == total)

    def evaluate(self, out: Path, model: Any, tokenizer: Any | None, device: torch.device, autocast: Any,
                 step: int) -> dict[str, Any]:
        """Score the held-out split now; keep OUT/best when `best_metric` improved. Returns the row's eval_ keys."""
        t0 = time.perf_counter()
        figures = self.held_out.score(model, device, autocast)
        value = figures.get(self.best.metric)
        if self.best.improves(value):
            self.best.update(value, step)
            write_best(out, model, tokenizer,
                       {"step": step, "metric": self.best.metric, "value": value, "figures": figures,
                        "data": self.held_out.data, "cache": self.eval_cache})
        self.held_out_last = {"step": step, "data": self.held_out.data, "cache": self.eval_cache, **figures}
        self.eval_seconds += time.perf_counter() - t0
        return {f"eval_{k}": v for k, v in figures.items() if k != "targets"}  # a count, the same every time

    def totals(self) -> dict[str, Any]:
        """Throughput and counts over the whole run (resumes included): total tokens / total step time."""
        return {"tokens_seen": self.tokens_seen, "seconds": self.train_seconds,
                "tokens_per_s": self.tokens_seen / self.train_seconds if self.train_seconds > 0 else 0.0,
                "eval_seconds": self.eval_seconds, "best": self.best.state_dict() if self.held_out else None}

    def state_dict(self) -> dict[str, Any]:
        return {"tokens_seen": self.tokens_seen, "train_seconds": self.train_seconds, "eval_seconds": self.eval_seconds,
                "best": self.best.state_dict(), "held_out_last": self.held_out_last}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        """From a checkpoint's trainer state; checkpoints written before these were recorded resume their counts
        from 0."""
        self.tokens_seen = int(st.get("tokens_seen", 0))
        self.train_seconds, self.eval_seconds = float(st.get("train_seconds", 0.0)), float(st.get("eval_seconds", 0.0))
        self.best.load_state_dict(st.get("best"))
        self.held_out_last = st.get("held_out_last")
