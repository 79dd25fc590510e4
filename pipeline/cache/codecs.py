"""The value codecs of cache format 3: tiny classes, each mapping floats to small unsigned integers
and back with a stated error. `pipeline.cache.schema` composes them into the row codec.

Every codec is a pure function of its parameters (recorded in the cache metadata), works on numpy
arrays of any shape, and is tested by a round trip (`tests/cache/test_cache_codecs.py`).
"""

from __future__ import annotations

import numpy as np

U16_MAX = np.iinfo(np.uint16).max


class LogCode:
    """A log-probability x <= 0 as a uint16 code round(-x / step); `NEG_INF_CODE` is -inf.

    Absolute error <= step / 2 for x >= -(U16_MAX - 1 - reserved) * step; values below clamp there.
    Absolute error in log space is relative error in probability: step 2^-10 keeps r within 4.9e-4.
    `reserved` codes at the top are left for callers that multiplex flags into the same integer.
    """

    NEG_INF_CODE = U16_MAX

    def __init__(self, step: float, reserved: int = 0):
        if not step > 0:
            raise ValueError(f"LogCode step must be positive, got {step}")
        self.step = float(step)
        self.max_code = U16_MAX - 1 - reserved

    @property
    def min_value(self) -> float:
        """The most negative finite value representable (smaller ones clamp to it)."""
        return -self.max_code * self.step

    def encode(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        neg_inf = np.isneginf(x)
        codes = np.rint(np.clip(-np.where(neg_inf, 0.0, x), 0.0, None) / self.step)
        codes = np.minimum(codes, self.max_code).astype(np.uint16)
        codes[neg_inf] = self.NEG_INF_CODE
        return codes

    def decode(self, codes: np.ndarray) -> np.ndarray:
        c = np.asarray(codes)
        out = c.astype(np.float64) * -self.step
        out[c == self.NEG_INF_CODE] = -np.inf
        return out


class SplitCode:
    """The head/tail split of a row as the logit l = log(r / (1 - r)) in a uint16 code.

    Coding the logit (not log r) keeps BOTH masses to a relative step / 2: d log r = (1 - r) dl and
    d log(1 - r) = -r dl. Coding log r alone loses the head of a near-uniform row (r -> 1: 1 - r is a
    few K/V, and a 2^-10 error in log r became a 0.03-nat error in every head log-prob, measured).
    Codes run from l = `hi` downwards: step `fine` down to `mid`, then step `coarse` until the codes run
    out. Defaults: r and 1 - r to a relative 4.9e-4 for r/(1-r) in [e^-40, e^14] (r >= 4e-18; the head
    mass 1 - r >= 8e-7, i.e. K = 1 at V up to 1.2M ids), to 2e-3 for r down to ~e^-80 (about 2e-35,
    float32's own floor is 1.2e-38); smaller r clamps there. `NEG_INF_CODE` is r = 0 (K = V).
    """

    NEG_INF_CODE = U16_MAX

    def __init__(self, fine: float = 2.0**-10, coarse: float = 2.0**-8, hi: float = 14.0, mid: float = -40.0):
        if not (fine > 0 and coarse > 0 and hi > mid):
            raise ValueError(f"SplitCode needs fine, coarse > 0 and hi > mid, got {fine}, {coarse}, {hi}, {mid}")
        self.fine, self.coarse, self.hi, self.mid = float(fine), float(coarse), float(hi), float(mid)
        self.n_fine = int(round((hi - mid) / fine))
        if self.n_fine >= U16_MAX - 1:
            raise ValueError("SplitCode's fine range needs fewer than 65534 codes")
        self.lo = mid - (U16_MAX - 1 - self.n_fine) * coarse  # the smallest logit represented

    def encode(self, log_r: np.ndarray) -> np.ndarray:
        """log r [...] (<= 0; -inf for r = 0) -> uint16 codes of log r - log(1 - r)."""
        x = np.asarray(log_r, dtype=np.float64)
        zero = np.isneginf(x)
        with np.errstate(divide="ignore", invalid="ignore"):
            logit = np.where(zero, 0.0, x - log1mexp(np.minimum(x, -1e-300)))
        logit = np.clip(logit, self.lo, self.hi)
        fine = np.rint((self.hi - logit) / self.fine)
        coarse = self.n_fine + np.rint((self.mid - logit) / self.coarse)
        codes = np.where(logit >= self.mid, np.minimum(fine, self.n_fine), np.minimum(coarse, U16_MAX - 1))
        return np.where(zero, self.NEG_INF_CODE, codes).astype(np.uint16)

    def decode(self, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint16 codes -> (log r, log(1 - r)), float64; (-inf, 0) for r = 0."""
        c = np.asarray(codes).astype(np.float64)
        logit = np.where(c <= self.n_fine, self.hi - c * self.fine, self.mid - (c - self.n_fine) * self.coarse)
        zero = c == self.NEG_INF_CODE
        log_r = np.where(zero, -np.inf, -np.logaddexp(0.0, -logit))  # log sigmoid(l)
        log_head = np.where(zero, 0.0, -np.logaddexp(0.0, logit))  # log sigmoid(-l)
        return log_r, log_head


def log1mexp(x: np.ndarray) -> np.ndarray:
    """log(1 - e^x) for x <= 0 (float64; -inf at x = 0, 0 at x = -inf), accurate on both sides of -log 2."""
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        near = x > -np.log(2.0)
        return np.where(near, np.log(-np.expm1(np.where(near, x, -1.0))), np.log1p(-np.exp(np.where(near, -1.0, x))))


class GapCode:
    """The head of a row as gaps to its top-1, d_i = log p_1 - log p_i (i = 2..K, non-decreasing),
    quantised to round(d_i / step) and stored as differences of consecutive codes.

    [n, K-1] float -> [n, K-1] uint16. The integer codes are differenced (lossless), not the gaps, so
    errors do not accumulate: every gap is within step / 2. Code differences of a sorted head are small
    numbers that compress well; a gap of +inf (p_i = 0) clamps to the largest code.
    """

    def __init__(self, step: float):
        if not step > 0:
            raise ValueError(f"GapCode step must be positive, got {step}")
        self.step = float(step)

    def encode(self, gaps: np.ndarray) -> np.ndarray:
        g = np.asarray(gaps, dtype=np.float64)
        codes = np.minimum(np.rint(np.clip(np.nan_to_num(g, posinf=np.inf), 0.0, None) / self.step), U16_MAX)
        codes = np.maximum.accumulate(codes, axis=-1)  # a sorted head has sorted codes; float noise must not break it
        prev = np.concatenate([np.zeros(codes.shape[:-1] + (1,)), codes[..., :-1]], axis=-1)
        return (codes - prev).astype(np.uint16)

    def decode(self, deltas: np.ndarray) -> np.ndarray:
        return np.cumsum(np.asarray(deltas, dtype=np.int64), axis=-1).astype(np.float64) * self.step


class UnitCode:
    """u in [0, 1] as an unsigned integer round(u * (2^bits - 1)); uint8 up to 8 bits, else uint16.

    Absolute error <= 1 / (2 * (2^bits - 1)). Values outside [0, 1] clamp (callers normalise by
    bounds that hold for the exact value but may be crossed by rounding elsewhere).
    """

    def __init__(self, bits: int):
        if not 1 <= bits <= 16:
            raise ValueError(f"UnitCode bits must lie in [1, 16], got {bits}")
        self.bits = int(bits)
        self.scale = float((1 << self.bits) - 1)
        self.dtype = np.dtype(np.uint8) if self.bits <= 8 else np.dtype(np.uint16)

    def encode(self, u: np.ndarray) -> np.ndarray:
        u = np.nan_to_num(np.asarray(u, dtype=np.float64), nan=0.0)
        return np.rint(np.clip(u, 0.0, 1.0) * self.scale).astype(self.dtype)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        return np.asarray(codes, dtype=np.float64) / self.scale


class TargetCode:
    """The target token of a row in one uint16: its rank in the head (0..K-1) when the head holds it,
    else K + a `LogCode` of its log-probability; U16_MAX is a target of probability 0.

    Most targets of a trained teacher are in its top-K, so most rows cost a small rank (which also
    checks, per row, that the cache and the data agree); the rest keep their exact-to-step/2 log p.
    """

    def __init__(self, k: int, step: float):
        if not 1 <= k < U16_MAX // 2:
            raise ValueError(f"TargetCode needs 1 <= K < {U16_MAX // 2}, got {k}")
        self.k = int(k)
        self.log = LogCode(step, reserved=k)

    def encode(self, rank: np.ndarray, logprob: np.ndarray) -> np.ndarray:
        """rank [n] int (-1: not in the head), logprob [n] float (used where rank < 0) -> [n] uint16."""
        rank = np.asarray(rank, dtype=np.int64)
        lp = np.asarray(logprob, dtype=np.float64)
        outside = self.k + self.log.encode(np.where(rank < 0, lp, 0.0)).astype(np.int64)
        outside = np.where(np.isneginf(lp), U16_MAX, outside)
        return np.where(rank >= 0, rank, outside).astype(np.uint16)

    def decode(self, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[n] uint16 -> (rank [n] int64, -1 where not in the head; log p [n] float64, NaN where in the head)."""
        c = np.asarray(codes).astype(np.int64)
        in_head = c < self.k
        lp = np.where(c == U16_MAX, -np.inf, (c - self.k) * -self.log.step)
        return np.where(in_head, c, -1), np.where(in_head, np.nan, lp)
