"""One small metrics logger: JSONL always, TensorBoard when it is installed."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class MetricsLog:
    """Appends one JSON object per optimizer step to `OUT/metrics.jsonl`."""

    def __init__(self, out: Path, resume_step: int | None = None, tensorboard: bool = True):
        self.path = out / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            # Drop steps after the checkpoint we resume from: they will be recomputed identically.
            keep = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in keep))
        elif resume_step is None:
            self.path.write_text("")
        self._f = self.path.open("a")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(out / "tensorboard"))
            except Exception:  # tensorboard not installed: JSONL is the record
                self._tb = None

    def write(self, row: dict[str, Any]) -> None:
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()
