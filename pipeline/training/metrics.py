"""One small metrics logger: OUT/metrics.jsonl always, plus the trackers `--report-to` names.

    kdcache train ... --report-to tensorboard        # OUT/tensorboard  (pip install 'kdcache[tensorboard]')
    kdcache train ... --report-to wandb              # OUT/wandb, offline (pip install 'kdcache[wandb]')

metrics.jsonl is the record the other stages read (the report's curves, where a re-run continues),
so it is written whatever the trackers are. A tracker asked for explicitly must be installed: its
absence is a one-line error before training starts, naming the extra that provides it.

W&B runs offline unless WANDB_MODE says otherwise (training machines often have no network; the
run directory is complete without it): `wandb sync OUT/wandb/offline-run-*` uploads it later, and
WANDB_MODE=online logs live. WANDB_PROJECT names the project (default: kdcache).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from pipeline.errors import KdError

log = logging.getLogger(__name__)

REPORTERS = ("none", "jsonl", "tensorboard", "wandb")
_PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}  # reporter: (module, extra)


def check_reporters(report_to: list[str]) -> None:
    """Refuse trackers whose package is missing (one line naming the extra)."""
    for name in report_to:
        if name not in _PACKAGES:
            continue
        module, extra = _PACKAGES[name]
        try:
            __import__(module)
        except ImportError:
            raise KdError(f"--report-to {name} needs the {module} package: pip install 'kdcache[{extra}]' "
                          "(or drop it: OUT/metrics.jsonl is always written)") from None


class MetricsLog:
    """Appends one JSON object per optimizer step to `OUT/metrics.jsonl` and mirrors numbers to trackers."""

    def __init__(self, out: Path, resume_step: int | None = None, report_to: tuple[str, ...] | list[str] = (),
                 run_config: dict[str, Any] | None = None):
        check_reporters(list(report_to))
        self.path = out / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            # Drop steps after the checkpoint we resume from: they will be recomputed identically.
            keep = []
            for ln in self.path.read_text().splitlines():
                try:
                    if ln.strip() and json.loads(ln)["step"] <= resume_step:
                        keep.append(ln)
                except (ValueError, KeyError, TypeError):  # a torn last line of a killed run
                    continue
            self.path.write_text("".join(ln + "\n" for ln in keep))
        elif resume_step is None:
            self.path.write_text("")
        self._f = self.path.open("a")
        self._tb = self._wandb = None
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(out / "tensorboard"))
        if "wandb" in report_to:
            import wandb

            # quiet: W&B's run summary would bury the stage's own summary line (the JSONL has it all).
            self._wandb = wandb.init(dir=str(out), project=os.environ.get("WANDB_PROJECT", "kdcache"),
                                     mode=os.environ.get("WANDB_MODE", "offline"), name=out.resolve().name,
                                     config=run_config or {}, settings=wandb.Settings(quiet=True))

    def write(self, row: dict[str, Any]) -> None:
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()
        numbers = {k: v for k, v in row.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for k, v in numbers.items():
                self._tb.add_scalar(k, v, row["step"])
        if self._wandb is not None:
            self._wandb.log(numbers, step=row["step"])

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
