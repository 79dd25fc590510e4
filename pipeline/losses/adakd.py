"""AdaKD (Xie et al., AAAI 2026): loss-driven token focusing (LATF) and inverse-difficulty temperatures (IDTS).

Difficulty of a position is the Hellinger distance between teacher and student on the K + 1 buckets at
T = 1, detached (`pipeline.losses.divergences.hellinger`). methods.md §4 fixes the rules; choices made here:
- LATF keeps ceil(r·n) of the n eligible positions; r·n is reduced by 1e-9 before the ceiling so float
  round-off ((0.1·3)·10 = 3.0000000000000004) cannot keep one position too many. Ties in difficulty keep the
  lower index.
- The reference is taken once, at the end of update number max(1, ceil(warmup_fraction·total_steps)),
  so that step never changes r; the rule applies from the next update on. A non-finite loss is a ValueError.
- IDTS uses the true median (mean of the two middle values for an even count); m = 0 gives T_base
  everywhere (all selected positions already match) and positions not selected get T_base.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from pipeline.losses.selection import keep_top_fraction


class LATF:
    """Loss-driven adaptive token focusing: keep the hardest fraction r of eligible positions.

    r starts at initial_ratio and stays in [min_ratio, max_ratio]. `update` is called once per optimizer
    step with that step's KD loss; `select` once per micro-batch.
    """

    def __init__(
        self,
        total_steps: int,
        warmup_fraction: float = 0.05,
        ema_decay: float = 0.99,
        epsilon: float = 0.05,
        sigma: float = 0.05,
        min_ratio: float = 0.1,
        max_ratio: float = 1.0,
        initial_ratio: float = 1.0,
    ) -> None:
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if not 0.0 <= warmup_fraction <= 1.0:
            raise ValueError(f"warmup_fraction must lie in [0, 1], got {warmup_fraction}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1), got {ema_decay}")
        if epsilon < 0.0 or not 0.0 <= sigma < 1.0:
            raise ValueError(f"need epsilon >= 0 and 0 <= sigma < 1, got epsilon={epsilon}, sigma={sigma}")
        if not 0.0 < min_ratio <= initial_ratio <= max_ratio <= 1.0:
            raise ValueError(
                f"need 0 < min_ratio <= initial_ratio <= max_ratio <= 1, got "
                f"{min_ratio}, {initial_ratio}, {max_ratio}"
            )
        self.total_steps = total_steps
        self.warmup_steps = max(1, math.ceil(warmup_fraction * total_steps))
        self.ema_decay, self.epsilon, self.sigma = ema_decay, epsilon, sigma
        self.min_ratio, self.max_ratio = min_ratio, max_ratio
        self._ratio = float(initial_ratio)
        self._ema: float | None = None
        self._ref: float | None = None
        self._step = 0

    @property
    def ratio(self) -> float:
        """Current focus ratio r."""
        return self._ratio

    @property
    def ema(self) -> float | None:
        """EMA of the KD loss (None before the first update)."""
        return self._ema

    @property
    def ref(self) -> float | None:
        """Reference loss (None until the warm-up has ended)."""
        return self._ref

    @property
    def step(self) -> int:
        """Number of updates seen."""
        return self._step

    def update(self, kd_loss: float) -> float:
        """Feed one optimizer step's KD loss; returns the new ratio.

        EMA ← loss on the first call, else decay·EMA + (1-decay)·loss. At the end of warm-up ref ← EMA.
        Afterwards: EMA < ref·(1-ε): r ← max(r·(1-σ), min), ref ← EMA;
        EMA > ref·(1+ε): r ← min(r·(1+σ), max), ref ← EMA; else unchanged.
        """
        loss = float(kd_loss)
        if not math.isfinite(loss):
            raise ValueError(f"LATF.update got a non-finite KD loss {loss} at step {self._step + 1}")
        self._step += 1
        if self._ema is None:
            self._ema = loss
        else:
            self._ema = self.ema_decay * self._ema + (1.0 - self.ema_decay) * loss
        if self._ref is None:
            if self._step >= self.warmup_steps:
                self._ref = self._ema
            return self._ratio
        if self._ema < self._ref * (1.0 - self.epsilon):
            self._ratio = max(self._ratio * (1.0 - self.sigma), self.min_ratio)
            self._ref = self._ema
        elif self._ema > self._ref * (1.0 + self.epsilon):
            self._ratio = min(self._ratio * (1.0 + self.sigma), self.max_ratio)
            self._ref = self._ema
        return self._ratio

    def select(self, difficulty: Tensor, eligible: Tensor) -> Tensor:
        """Keep the ceil(r·n) hardest of the n eligible positions.

        difficulty [N] float, eligible bool [N] -> keep bool [N] (a subset of eligible). Ties keep the
        lower index. No host sync: the count stays on the device.
        """
        return keep_top_fraction(difficulty, eligible, self._ratio)

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-able state: enough, with the same constructor arguments, to resume exactly."""
        return {"step": self._step, "ratio": self._ratio, "ema": self._ema, "ref": self._ref}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        missing = {"step", "ratio", "ema", "ref"} - set(state)
        if missing:
            raise ValueError(f"LATF state is missing {sorted(missing)}")
        self._step = int(state["step"])
        self._ratio = float(state["ratio"])
        self._ema = None if state["ema"] is None else float(state["ema"])
        self._ref = None if state["ref"] is None else float(state["ref"])


def _true_median(values: Tensor, selected: Tensor) -> Tensor:
    """Median of values[selected] (mean of the two middle ones for an even count) as a 0-d tensor.

    values [N] float, selected bool [N]; NaN if nothing is selected. No host sync.
    """
    n = selected.sum()
    ordered = torch.sort(values.masked_fill(~selected, math.inf)).values
    lo = ((n - 1) // 2).clamp_min(0)
    hi = (n // 2).clamp(max=values.shape[0] - 1)
    mid = 0.5 * (ordered[lo] + ordered[hi])
    return torch.where(n > 0, mid, torch.full_like(mid, math.nan))


@torch.no_grad()
def idts_temperatures(difficulty: Tensor, selected: Tensor, t_base: float = 1.0, c: float = 0.5) -> Tensor:
    """Inverse-difficulty temperatures T_t = t_base·exp(-c·tanh(log(s_t/m))), m = median s over selected.

    difficulty [N] float, selected bool [N] -> T [N] float32, detached, in (t_base·e^-c, t_base·e^c):
    hard positions (s > m) get a low T, easy ones a high T; s = 0 gives t_base·e^c. m = 0 and
    unselected positions give t_base.
    """
    if difficulty.shape[0] == 0:
        return torch.zeros(0, dtype=torch.float32, device=difficulty.device)
    s = difficulty.detach().to(torch.float32)
    m = _true_median(s, selected)
    temps = t_base * torch.exp(-c * torch.tanh(torch.log(s / m)))  # s = 0: log 0 = -inf, tanh = -1
    use = selected & (m > 0)
    return torch.where(use, temps, torch.full_like(temps, t_base))
