"""The end of `kdcache train` in words and numbers: train_summary.json (written by the trainer, read by
`kdcache report`), the summary of a run that had nothing to do, and the one line the command prints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.training.state import TrainState

SUMMARY_FILENAME = "train_summary.json"  # the end-of-run summary, read by `kdcache report`


def skipped_summary(out: str | Path, state: TrainState) -> dict[str, Any]:
    """The summary of a run that had nothing to do (OUT/final is complete for its settings)."""
    steps = state.final_steps or state.reached_step
    return {"out": str(out), "steps": steps, "total_steps": steps, "finished": True, "skipped": True,
            "last": {}, "seconds": 0.0, "tokens_per_s": 0.0}


def summary_line(s: dict[str, Any]) -> str:
    """One line for the end of `kdcache train`."""
    if s.get("skipped"):
        pushed = f"; pushed to {s['pushed']}" if s.get("pushed") else ""
        return f"train: {s['out']}/final is complete for these settings ({s['steps']} steps); nothing to do{pushed}"
    last = s["last"]
    parts = [f"train: {s['steps']}/{s['total_steps']} steps in {s['seconds']:.1f}s ({s['tokens_per_s']:,.0f} tok/s)"]
    if last:
        parts.append(f"loss {last['loss']:.4f}")
        if "tar" in last:
            parts.append(f"TAR {last['tar']:.3f}")
    b = s.get("best")
    if b and b.get("value") is not None:
        parts.append(f"best held-out {b['metric']} {b['value']:.4f} at step {b['step']}")
    parts.append(f"-> {s['out']}/{'final' if s['finished'] else 'checkpoints'}")
    if s.get("pushed"):
        parts.append(f"pushed to {s['pushed']}")
    return ", ".join(parts)
