"""Exact temperature rescaling of the cached teacher: interpolating the tail's log-partition.

At temperature T (beta = 1/T) the teacher is p^T_j = p_j^beta / sum_k p_k^beta. On the cached support that
needs, per row, only the tail's power sum T(beta) = log sum_{j outside K} p_j^beta: the head's share is
exact from the cached head, and

    log p^T_i = beta log p_i - A(beta),   log r^T = T(beta) - A(beta),   A(beta) = logaddexp(lse_K(beta log p), T(beta)).

The cache stores the tail's shape, not A: with r the tail mass and pi = p / r the renormalised tail,
T(beta) = beta log r + A_pi(beta), A_pi(beta) = log sum pi^beta. A_pi is convex, and three things about it
are exact and free: A_pi(0) = log(V - K), A_pi(1) = 0, A_pi'(1) = -H(pi). The cache adds A_pi at the grid
temperatures T_g (format 3, `pipeline/cache/schema.py`). Between knots: a cubic Hermite spline with
PCHIP slopes (weighted harmonic mean of neighbouring secants; scipy's one-sided three-point rule at the
ends).

What is interpolated is R(beta) = A_pi(beta) / (1 - beta), the tail's Renyi entropy: monotone, with
R(0) = log(V - K) and R(1) = H(pi) exact, so PCHIP (which preserves monotone data) fits it closely and
A_pi = (1 - beta) R is exact at beta = 1.

Why the tail: a confident teacher's A bends sharply where the bulk starts to outweigh the top token,
between two grid knots, while the tail is a smooth bulk; and the tail's statistics never come from a
difference "A - head", which cancels catastrophically when the tail is 1e-6 of the mass (measured on
format 2, which stored A in float16: errors 0.09-0.22 nats through its real codecs).

Measured with `pipeline.teacher.fidelity.measure_interpolation_error` (max |A - A_exact| over the rows, at 301 temperatures across
the IDTS range [e^-0.5, e^0.5], through the REAL codec: float32 statistics -> encode -> decode ->
interpolate; exact A in float64): see the table printed by

    .venv/bin/python -m pipeline.teacher.fidelity             # ~1 min on 2 CPU cores

and docs/methods.md, which records it with the date.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

# The cache's default temperature grid. 1.2 and 1.65 were added to (0.5, 0.7, 1.4, 2) when a real LLM
# (SmolLM2-135M-Instruct, V = 49,152) re-tempered with 0.0157 nats of error in the IDTS range and 0.0268 over
# [0.5, 2]; with them 0.0038 and 0.0086 (`bench/tempering.py --model runs/real_llm/teacher`, docs/methods.md).
# A cache records its own grid: caches made with another one read as before.
DEFAULT_GRID_TEMPERATURES = (0.5, 0.7, 1.2, 1.4, 1.65, 2.0)
SCHEMES = ("pchip", "bessel", "linear")
IDTS_RANGE = (math.exp(-0.5), math.exp(0.5))  # T_base = 1, c = 0.5 (methods.md §4)


def _work(x: Tensor) -> Tensor:
    """Upcast to float32 (float64 stays float64, so references can run in double)."""
    return x if x.dtype == torch.float64 else x.to(torch.float32)


def grid_range(grid_temperatures: Sequence[float]) -> tuple[float, float]:
    """Temperature range covered by the grid and the exact knot T = 1."""
    temps = [float(t) for t in grid_temperatures] + [1.0]
    return min(temps), max(temps)


def check_temperature_range(temps: Tensor | float | Sequence[float], grid_temperatures: Sequence[float]) -> None:
    """Raise ValueError if any temperature lies outside the cached grid's range.

    The range is [min T_g, max T_g] extended to include T = 1, where everything is known exactly.
    temps: a float, a sequence or a tensor of any shape.
    """
    lo, hi = grid_range(grid_temperatures)
    t = torch.as_tensor(temps, dtype=torch.float64).reshape(-1)
    bad = (t < lo * (1 - 1e-6)) | (t > hi * (1 + 1e-6)) | torch.isnan(t)
    if bool(bad.any()):
        first = float(t[bad][0])
        raise ValueError(
            f"temperature {first:g} is outside the cached log-partition grid range [{lo:g}, {hi:g}] "
            f"(grid temperatures {tuple(float(g) for g in grid_temperatures)})"
        )


def _pchip_slopes(h: Tensor, delta: Tensor) -> Tensor:
    """PCHIP knot slopes (Fritsch-Butland weighted harmonic mean, scipy's edge rule).

    h [M-1] knot spacings, delta [N,M-1] secants -> d [N,M].
    """
    d = torch.zeros(delta.shape[0], delta.shape[1] + 1, dtype=delta.dtype, device=delta.device)
    if delta.shape[1] == 1:
        return d + delta[:, :1]
    h0, h1 = h[:-1], h[1:]
    w1, w2 = 2 * h1 + h0, h1 + 2 * h0
    d0, d1 = delta[:, :-1], delta[:, 1:]
    same_sign = (d0 * d1) > 0
    # Harmonic mean only where both secants share a sign; elsewhere 1s stand in so nothing divides by 0.
    safe0 = torch.where(same_sign, d0, torch.ones_like(d0))
    safe1 = torch.where(same_sign, d1, torch.ones_like(d1))
    interior = (w1 + w2) / (w1 / safe0 + w2 / safe1)
    d[:, 1:-1] = torch.where(same_sign, interior, torch.zeros_like(interior))
    d[:, 0] = _pchip_edge(h[0], h[1], delta[:, 0], delta[:, 1])
    d[:, -1] = _pchip_edge(h[-1], h[-2], delta[:, -1], delta[:, -2])
    return d


def _pchip_edge(h0: Tensor, h1: Tensor, m0: Tensor, m1: Tensor) -> Tensor:
    """One-sided three-point end slope, limited so it keeps the sign of the end secant (scipy)."""
    d = ((2 * h0 + h1) * m0 - h0 * m1) / (h0 + h1)
    d = torch.where(torch.sign(d) != torch.sign(m0), torch.zeros_like(d), d)
    overshoot = (torch.sign(m0) != torch.sign(m1)) & (d.abs() > 3 * m0.abs())
    return torch.where(overshoot, 3 * m0, d)


def _bessel_slopes(h: Tensor, delta: Tensor) -> Tensor:
    """Bessel (parabolic) knot slopes: the derivative of the parabola through three knots. [N,M]."""
    d = torch.zeros(delta.shape[0], delta.shape[1] + 1, dtype=delta.dtype, device=delta.device)
    if delta.shape[1] == 1:
        return d + delta[:, :1]
    h0, h1 = h[:-1], h[1:]
    d[:, 1:-1] = (h1 * delta[:, :-1] + h0 * delta[:, 1:]) / (h0 + h1)
    d[:, 0] = ((2 * h[0] + h[1]) * delta[:, 0] - h[0] * delta[:, 1]) / (h[0] + h[1])
    d[:, -1] = ((2 * h[-1] + h[-2]) * delta[:, -1] - h[-1] * delta[:, -2]) / (h[-1] + h[-2])
    return d


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - e^x) for x < 0, accurate on both sides of -log 2 (Mächler's split)."""
    near = x > -math.log(2.0)
    # where() on the inputs too, so the branch not taken cannot produce NaN/inf in a gradient.
    a = torch.log(-torch.expm1(torch.where(near, x, torch.full_like(x, -1.0))))
    b = torch.log1p(-torch.exp(torch.where(near, torch.full_like(x, -1.0), x)))
    return torch.where(near, a, b)


def _hermite(b: Tensor, xs: Tensor, ys: Tensor, slope_one: Tensor | None, one: int, scheme: str) -> Tensor:
    """Evaluate the per-row interpolant of knots (xs [M], ys [N,M]) at b [N] -> [N].

    slope_one [N] or None: an exact slope at knot `one`, projected onto the interval between the
    neighbouring secants (where the slope of any convex function lies), so float32 noise in it cannot
    bend the curve the wrong way; None leaves the scheme's own slope there.
    """
    h = xs[1:] - xs[:-1]  # [M-1]
    delta = (ys[:, 1:] - ys[:, :-1]) / h  # [N,M-1]
    # Interval k holds β in [xs[k], xs[k+1]]; clamp so β = max knot uses the last interval.
    k = (torch.searchsorted(xs, b, right=True) - 1).clamp(0, xs.numel() - 2)[:, None]  # [N,1]
    y0, y1 = ys.gather(1, k).squeeze(1), ys.gather(1, k + 1).squeeze(1)
    hk = h[k.squeeze(1)]
    t = (b - xs[k.squeeze(1)]) / hk
    if scheme == "linear":
        return y0 + t * (y1 - y0)
    slopes = _pchip_slopes(h, delta) if scheme == "pchip" else _bessel_slopes(h, delta)
    if slope_one is not None:
        lo = delta[:, one - 1] if one > 0 else torch.full_like(slope_one, -math.inf)
        hi = delta[:, one] if one < delta.shape[1] else torch.full_like(slope_one, math.inf)
        slopes[:, one] = torch.maximum(torch.minimum(slope_one, hi), lo)
    d0, d1 = slopes.gather(1, k).squeeze(1), slopes.gather(1, k + 1).squeeze(1)
    t2, t3 = t * t, t * t * t
    h00, h10, h01, h11 = 2 * t3 - 3 * t2 + 1, t3 - 2 * t2 + t, -2 * t3 + 3 * t2, t3 - t2
    return h00 * y0 + h10 * hk * d0 + h01 * y1 + h11 * hk * d1


def _renyi_knots(grid_betas: Tensor, a_tail: Tensor, h_tail: Tensor, log_n_tail: float, use_zero: bool
                 ) -> tuple[Tensor, Tensor]:
    """Knots of the tail's Renyi entropy R(b) = A_pi(b) / (1 - b): xs [M] ascending, ys [N, M].

    grid_betas [G] (a grid entry at b = 1 is dropped: R(1) = H(pi) is exact), a_tail [N, G] = A_pi(b_g),
    h_tail [N] = H(pi); with `use_zero` the exact knot R(0) = log(V - K) is added.
    """
    betas = grid_betas.detach().to(torch.float64).cpu().tolist()
    pairs = sorted([(bv, g) for g, bv in enumerate(betas) if bv != 1.0] + [(1.0, -1)] + ([(0.0, -2)] if use_zero else []))
    xs = torch.tensor([bv for bv, _ in pairs], dtype=a_tail.dtype, device=a_tail.device)
    cols = []
    for bv, g in pairs:
        if g == -1:
            cols.append(h_tail[:, None])
        elif g == -2:
            cols.append(torch.full_like(h_tail[:, None], log_n_tail))
        else:
            cols.append(a_tail[:, g: g + 1] / (1.0 - bv))
    return xs, torch.cat(cols, dim=1)


def tail_log_partition_at(
    beta: Tensor,
    grid_betas: Tensor,
    tail_log_partition: Tensor,
    tail_logprob: Tensor,
    tail_entropy: Tensor,
    n_tail: int,
    *,
    scheme: str = "pchip",
    use_zero_knot: bool = True,
) -> Tensor:
    """T(beta) = log sum_{j outside K} p_j^beta per row, interpolated from the cache.

    beta [N] (1/T per row); grid_betas [G]; tail_log_partition [N, G] = T(beta_g); tail_logprob [N] = log r;
    tail_entropy [N] = H(pi); n_tail = V - K. Returns [N] float32 (float64 for float64 inputs), -inf on
    rows without a tail. beta on a grid knot returns the stored knot; beta = 1 returns log r exactly.
    Detached (teacher data). Raises ValueError for a beta outside the grid's range.

    What is interpolated is the tail's Renyi entropy R(b) = A_pi(b) / (1 - b), A_pi(b) = T(b) - b log r:
    R is non-increasing in b, equals H(pi) at b = 1 and log(V - K) at b = 0, and PCHIP keeps it monotone;
    A_pi = (1 - b) R then inherits an error that vanishes at the exact knot b = 1. Measured through the
    real codec (reference distributions, V = 32k, IDTS range): max |A error| 0.0055 against 0.0130 for
    PCHIP on A_pi itself with the exact slope -H(pi) at b = 1.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown interpolation scheme {scheme!r}; choose one of {SCHEMES}")
    t_grid = _work(tail_log_partition.detach())
    dt = t_grid.dtype
    b = beta.detach().to(dt).reshape(-1)
    log_r = tail_logprob.detach().to(dt).reshape(-1)
    h = tail_entropy.detach().to(dt).reshape(-1)
    gb = grid_betas.detach().to(dt).to(t_grid.device)
    lo_t, hi_t = grid_range((1.0 / gb).tolist()) if gb.numel() else (1.0, 1.0)
    outside = (b < 1.0 / hi_t * (1 - 1e-6)) | (b > 1.0 / lo_t * (1 + 1e-6)) | torch.isnan(b)
    if bool(outside.any()):
        raise ValueError(
            f"temperature {1.0 / float(b[outside][0]):g} is outside the cached log-partition grid range "
            f"[{lo_t:g}, {hi_t:g}] (grid temperatures {tuple(round(1.0 / float(x), 6) for x in gb.tolist())})"
        )
    has_tail = torch.isfinite(log_r)
    safe_r = torch.where(has_tail, log_r, torch.zeros_like(log_r))
    a_tail = torch.where(has_tail[:, None], t_grid - gb[None, :] * safe_r[:, None], torch.zeros_like(t_grid))
    log_n = math.log(n_tail) if n_tail > 1 else 0.0
    xs, ys = _renyi_knots(gb, a_tail, h, log_n, use_zero_knot)
    renyi = _hermite(b.clamp(min=float(xs[0]), max=float(xs[-1])), xs, ys, None, 0, scheme)
    out = b * safe_r + (1.0 - b) * renyi
    # Knots come back bit-exact: the stored value, not a re-evaluated polynomial.
    if gb.numel():
        hit = b[:, None] == gb[None, :]
        exact = torch.where(hit, t_grid, torch.zeros_like(t_grid)).sum(1)
        out = torch.where(hit.any(1), exact, out)
    out = torch.where(b == 1.0, safe_r, out)
    return torch.where(has_tail, out, torch.full_like(out, -math.inf))


def log_partition_at(beta: Tensor, topk_logprobs: Tensor, tail_log_partition_beta: Tensor) -> Tensor:
    """A(beta) = log sum_all p^beta from the head and the tail's T(beta): [N] each, topk_logprobs [N, K]."""
    dt = _work(topk_logprobs).dtype
    head = torch.logsumexp(beta.detach().to(dt)[:, None] * topk_logprobs.detach().to(dt), dim=-1)
    return torch.logaddexp(head, tail_log_partition_beta.detach().to(dt))
