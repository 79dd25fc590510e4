"""The distillation options (methods.md §2-5), declared once: `kdcache train`'s `TrainConfig` and the public
`KDLossConfig` both inherit them, so the two accept the same names, defaults and values by construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from pipeline.losses.divergences import DIVERGENCES, TAIL_POLICIES
from pipeline.errors import KdError
from pipeline.losses.gate import PROPOSALS, RULES
from pipeline.losses.sampled import REFUSED
from pipeline.losses.selection import SELECTIONS
from pipeline.losses.temperature import grid_range

# The choices each option takes, from the modules that own them ("none": the option is off).
LOSSES = ("none", *DIVERGENCES)
# sampled: the tail estimated from the cached draws (losses/sampled.py); auto: sampled when the cache's draws can
# serve the loss, else bucket (`KdOptions.resolved_tail`).
TAILS = ("auto", *TAIL_POLICIES, "sampled")
GATES = ("none", *RULES)
__all__ = ["GATES", "LOSSES", "PROPOSALS", "TAILS", "KdOptions", "method_name"]


@dataclass
class KdOptions:
    """What the student's loss does with the cached teacher; `check_kd()` validates them."""

    loss: str = "fkl"  # none (cross-entropy only) | fkl | rkl | jsd | tvd | skl | srkl | akl
    tail: str = "auto"  # auto | bucket | renorm | ignore | sampled (the tail estimated from cached draws)
    gate: str = "none"  # SpecKD verification rule: none | topk | spec | threshold
    proposal: str = "greedy"  # greedy | sample
    gate_k: int = 5  # topk rule: accept when the proposal is among the teacher's top gate_k
    gate_threshold: float = 0.1  # threshold rule: accept when p(proposal) >= this
    reject_weight: float = 0.0  # weight of rejected positions (0 = masked)
    latf: bool = False
    latf_warmup: float = 0.05  # fraction of the run before the reference EMA is taken
    latf_ema_decay: float = 0.99
    latf_epsilon: float = 0.05
    latf_sigma: float = 0.05
    latf_min_ratio: float = 0.1
    idts: bool = False
    idts_c: float = 0.5
    temperature: float = 1.0  # T_base
    select: str = "none"  # SE-KD: none | student_entropy (distil only each sequence's most uncertain positions)
    select_ratio: float = 0.2  # SE-KD: fraction of each sequence's positions kept (the authors' 20%)
    ce_weight: float = 0.0  # alpha: loss = alpha * ce + (1 - alpha) * kd_loss

    def check_kd(self) -> None:
        """One-line `KdError`s for values no run can use."""
        for name, allowed in (("loss", LOSSES), ("tail", TAILS), ("gate", GATES), ("proposal", PROPOSALS),
                              ("select", SELECTIONS)):
            if getattr(self, name) not in allowed:
                raise KdError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if not 0.0 <= self.ce_weight <= 1.0:
            raise KdError(f"ce_weight must be in [0, 1], got {self.ce_weight}")
        if not 0.0 <= self.reject_weight <= 1.0:
            raise KdError(f"reject_weight must be in [0, 1], got {self.reject_weight}")
        if not 0.0 < self.select_ratio <= 1.0:
            raise KdError(f"select_ratio must be in (0, 1], got {self.select_ratio}")
        if self.temperature <= 0:
            raise KdError(f"temperature must be positive, got {self.temperature}")
        if self.gate_k < 1:
            raise KdError(f"gate_k must be at least 1, got {self.gate_k}")
        if self.tail == "sampled" and self.loss in REFUSED:
            raise KdError(f"tail 'sampled' cannot serve loss {self.loss}: {REFUSED[self.loss]}")

    def resolved_tail(self, tail_samples: int, draw_logprobs: bool) -> str:
        """The tail policy the loss uses with a cache of `tail_samples` draws per row: `tail` as given, or for
        auto, sampled when the draws can serve this loss (they carry log-probs, and the loss is not one the
        sampled tail refuses) and bucket otherwise. Why sampled: on K + 1 buckets the tail's gradient follows the
        student's own tail shape (1.40 nats of held-out CE behind online KD on a soft teacher; the draws are
        within the seed noise of it: docs/benchmarks.md)."""
        if self.tail != "auto":
            return self.tail
        ok = tail_samples > 0 and draw_logprobs and self.loss not in REFUSED and self.loss != "none"
        return "sampled" if ok else "bucket"

    def for_cache(self, tail_samples: int, draw_logprobs: bool) -> "KdOptions":
        """A snapshot of these options (a `KdOptions`, whatever subclass `self` is) with the tail policy resolved
        for a cache of `tail_samples` draws per row (`resolved_tail`): what a loss runs with."""
        return KdOptions(**{**self.kd_options(), "tail": self.resolved_tail(tail_samples, draw_logprobs)})

    def check_tail_draws(self, tail_samples: int, draw_logprobs: bool, cache: str = "the cache") -> None:
        """One-line `KdError` when --tail sampled asks more of the cache's draws than they hold: none at all, or
        draws without their log-probs (caches made before they were stored: fkl at T = 1 only)."""
        if self.tail != "sampled" or self.loss == "none":
            return
        if not tail_samples:
            raise KdError(f"tail 'sampled' needs a cache with tail samples; {cache} has none "
                          "(`kdcache teacher --tail-samples S`)")
        if draw_logprobs:
            return
        if self.loss != "fkl" or self.idts or self.temperature != 1.0:
            raise KdError(f"{cache}'s tail draws carry no log-probs (made before they were stored), so they serve fkl "
                          "at T = 1 only, without --idts: re-run `kdcache teacher` to re-temper them, or use --tail bucket")

    def temperature_span(self) -> tuple[float, float]:
        """The lowest and highest temperature the loss uses: T_base, or IDTS's T_base·e^(±c)."""
        if self.idts:
            return self.temperature * math.exp(-self.idts_c), self.temperature * math.exp(self.idts_c)
        return self.temperature, self.temperature

    def check_grid(self, grid_temperatures: list[float] | tuple[float, ...]) -> None:
        """A one-line `KdError` when the loss's temperatures leave the cache's grid range (where re-tempering is
        interpolated; T = 1 is always exact), saying which option to change and to what."""
        lo, hi = self.temperature_span()
        if lo == hi == 1.0:
            return
        g_lo, g_hi = grid_range(grid_temperatures)
        if g_lo * (1 - 1e-6) <= lo and hi <= g_hi * (1 + 1e-6):
            return
        grid = f"the cache's temperature grid [{g_lo:g}, {g_hi:g}]"
        wider = "or cache the teacher with a wider --temperatures grid"
        if not self.idts:
            raise KdError(f"--temperature {self.temperature:g} is outside {grid}: pick one within it, {wider}")
        fit = min(math.log(self.temperature / g_lo), math.log(g_hi / self.temperature))
        cure = f"use --idts-c {math.floor(fit * 100) / 100:g} or less" if fit > 0 else \
            f"use a --temperature within [{g_lo:g}, {g_hi:g}]"
        raise KdError(f"IDTS with --temperature {self.temperature:g} and --idts-c {self.idts_c:g} uses temperatures "
                      f"from {lo:.3g} to {hi:.3g} (T·e^±c), outside {grid}: {cure}, {wider}")

    def kd_options(self) -> dict:
        """These options as a mapping (what a `KDLossConfig` copies from a `TrainConfig`)."""
        return {f.name: getattr(self, f.name) for f in fields(KdOptions)}


def method_name(cfg: dict[str, Any] | None) -> str:
    """A short name of a run's training objective, from its config.yaml mapping.

    "CE only" without a cache (or loss none); "KD fkl/bucket" for plain sparse KD; otherwise the
    switched-on parts joined with " + ", e.g. "SpecKD topk k=5 + LATF + IDTS + fkl". The online reference arm
    (`online_teacher`: the teacher's full distribution, no cache) says "online" where a cached one says its
    tail: "KD fkl online", "LATF + IDTS + rkl online".
    """
    if cfg is None:
        return "—"
    online = bool(cfg.get("online_teacher"))
    if not (cfg.get("cache") or online) or cfg.get("loss", "fkl") == "none":
        return "CE only"
    loss, tail = cfg.get("loss", "fkl"), cfg.get("tail", "bucket")
    parts = []
    gate = cfg.get("gate", "none")
    if gate != "none":
        detail = {"topk": f" k={cfg.get('gate_k', 5)}", "threshold": f" τ={cfg.get('gate_threshold', 0.1):g}"}
        rw = float(cfg.get("reject_weight", 0.0) or 0.0)
        parts.append(f"SpecKD {gate}{detail.get(gate, '')}" + (f" (rejected x{rw:g})" if rw > 0 else ""))
    if cfg.get("select", "none") != "none":
        parts.append(f"SE-KD {float(cfg.get('select_ratio', 0.2)):.0%}")
    if cfg.get("latf"):
        parts.append("LATF")
    if cfg.get("idts"):
        parts.append("IDTS")
    alpha = float(cfg.get("ce_weight", 0.0) or 0.0)
    ce = f" + {alpha:g}·CE" if alpha > 0 else ""
    if not parts:
        return f"KD {loss}{' online' if online else '/' + tail}{ce}"
    return " + ".join(parts) + f" + {loss}" + (" online" if online else f"/{tail}" if tail != "bucket" else "") + ce
