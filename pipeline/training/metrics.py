"""One small metrics logger: OUT/metrics.jsonl always, plus the trackers `--report-to` names.

    kdcache train ... --report-to tensorboard        # OUT/tensorboard  (pip install 'kdcache[tensorboard]')
    kdcache train ... --report-to wandb              # OUT/wandb, offline (pip install 'kdcache[wandb]')

and, when asked (`kdcache train` at a terminal), a progress bar whose postfix is each row's loss, TAR and
throughput.

metrics.jsonl is the record the other stages read (the report's curves, where a re-run continues),
so it is written whatever the trackers are. A tracker asked for explicitly must be installed: its
absence is a one-line error before training starts, naming the extra that provides it.

W&B runs offline unless WANDB_MODE says otherwise (training machines often have no network; the
run directory is complete without it): `wandb sync OUT/wandb/offline-run-*` uploads it later, and
WANDB_MODE=online logs live. WANDB_PROJECT names the project (default: kdcache).

`step_row` builds the metrics of one optimizer step from its sums: `kdcache train`'s rows and the metrics
of `pipeline.interop.loss_module.KDLoss` both come from it, so the two report the same numbers.
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


def step_row(ce_sum: Any, kd_numerator: Any, kd_denominator: float, targets: float, *, alpha: float,
             distills: bool = True, lr: float | None = None, accepted: float = 0, kept: float = 0,
             temps: Any = None, latf: Any = None) -> dict[str, Any]:
    """The metrics of one optimizer step (or one `KDLoss` call), from the step's sums over its `targets`
    target positions: ce_sum Σ CE, kd_numerator Σ w T² D, kd_denominator Σ w, accepted (the gate's),
    kept (rows in the KD loss), temps [kept] their temperatures, alpha the weight of CE, latf the LATF
    whose focus ratio this step used (None: no LATF), lr the learning rate (`kdcache train`'s rows only).

    Keys, in order: loss, kd_loss, ce_loss[, lr][, tar, focus_ratio, temp_mean, temp_min, temp_max,
    kept_fraction when distilling]; the temp_ keys are None when no row is kept. The sums may be floats or
    0-dim tensors: each loss is divided in the sums' own type (KDLoss reports its float32 loss as it is).
    """
    ce_loss = float(ce_sum / max(targets, 1))
    # No KD weight: 0 * numerator, the value of KDLoss's KD term then (a signed zero; the trainer's sum is +0.0).
    kd_loss = float(kd_numerator / kd_denominator) if kd_denominator > 0 else float(kd_numerator * 0.0)
    row = {"loss": alpha * ce_loss + (1 - alpha) * kd_loss if distills else ce_loss,
           "kd_loss": kd_loss, "ce_loss": ce_loss}
    if lr is not None:
        row["lr"] = lr
    if distills:
        t = temps.detach().float() if temps is not None else None
        some = t is not None and t.numel() > 0
        row.update({"tar": accepted / targets if targets else 0.0, "focus_ratio": latf.ratio if latf else 1.0,
                    "temp_mean": float(t.mean()) if some else None,
                    "temp_min": float(t.min()) if some else None,
                    "temp_max": float(t.max()) if some else None,
                    "kept_fraction": kept / targets if targets else 0.0})
    return row


class MetricsLog:
    """Appends one JSON object per optimizer step to `OUT/metrics.jsonl` and mirrors numbers to trackers
    (and to a progress bar of `bar` = (total, initial) steps)."""

    def __init__(self, out: Path, resume_step: int | None = None, report_to: tuple[str, ...] | list[str] = (),
                 run_config: dict[str, Any] | None = None, bar: tuple[int, int] | None = None):
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
        self._bar = None
        if bar is not None:
            from tqdm import tqdm

            self._bar = tqdm(total=bar[0], initial=bar[1], desc="train", unit="step", leave=False)

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
        if self._bar is not None:
            post = {"loss": f"{row['loss']:.3f}"}
            if "tar" in row:
                post["tar"] = f"{row['tar']:.2f}"
            post["tok/s"] = f"{row['tokens_per_s']:.0f}"
            self._bar.set_postfix(post)
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._f.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
