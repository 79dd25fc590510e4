"""How faithful the cache is to its teacher: dense float64 references and the re-tempering measurement.

`measure_interpolation_error` runs teacher rows through the teacher's own statistics, the real codec
(encode -> decode) and the student side's interpolation (`pipeline.losses.temperature`), and compares
A(beta) with the float64 truth; `python -m pipeline.teacher.fidelity` prints the table that
docs/methods.md records.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from pipeline.cache.schema import PRESETS, CodecParams, RowCodec
from pipeline.losses.temperature import (DEFAULT_GRID_TEMPERATURES, IDTS_RANGE, log_partition_at,
                                         tail_log_partition_at)
from pipeline.teacher.stats import distribution_stats


def exact_log_partition(logp: Tensor, betas: Tensor, chunk: int = 16) -> Tensor:
    """Dense reference: logp [D,V] (log p over the full vocabulary), betas [B] -> A [D,B] = log Σ p^β.

    Chunked over β so the [D,chunk,V] intermediate stays small; shifted by max log p by hand, which is
    2x faster than torch.logsumexp on CPU float64.
    """
    top = logp.max(dim=-1, keepdim=True).values  # [D,1]
    shifted = logp - top
    parts = []
    for i in range(0, betas.numel(), chunk):
        b = betas[None, i : i + chunk]  # [1,chunk]
        parts.append((b[:, :, None] * shifted[:, None, :]).exp_().sum(-1).log_() + b * top)
    return torch.cat(parts, dim=1)


def exact_entropy(logp: Tensor) -> Tensor:
    """Dense reference: logp [D,V] -> H(p) [D]."""
    return -(logp.exp() * logp).sum(-1)


def reference_distributions(vocab_size: int, seed: int = 0) -> Tensor:
    """The measurement's distributions for one V: log p [37,V], float64.

    Gaussian logits (scales 0.5-8), Zipf p ∝ rank^-s (s 0.8-2, shuffled ids), and LLM-like peaked rows
    (Gaussian logits of scale 2 with one token boosted by 3-15 nats: top-1 p up to 0.9995).
    """
    g = torch.Generator().manual_seed(seed + vocab_size)
    rows = []
    for scale in (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0):
        for _ in range(2):
            rows.append(scale * torch.randn(vocab_size, generator=g, dtype=torch.float64))
    ranks = torch.arange(1, vocab_size + 1, dtype=torch.float64)
    for s in (0.8, 0.9, 1.0, 1.1, 1.2, 1.35, 1.5, 1.75, 2.0):
        perm = torch.randperm(vocab_size, generator=g)
        rows.append((-s * ranks.log())[perm])
    for boost in (3.0, 5.0, 7.0, 9.0, 11.0, 13.0, 15.0, 10.0, 6.0, 4.0):
        z = 2.0 * torch.randn(vocab_size, generator=g, dtype=torch.float64)
        z[int(torch.randint(vocab_size, (1,), generator=g))] += boost
        rows.append(z)
    return torch.log_softmax(torch.stack(rows), dim=-1)


def measure_interpolation_error(
    params=None,
    rows: dict[str, np.ndarray] | None = None,
    logp: Tensor | None = None,
    scheme: str = "pchip",
    use_zero_knot: bool = True,
    temp_range: tuple[float, float] = IDTS_RANGE,
    n_temperatures: int = 301,
    vocab_size: int = 8000,
    seed: int = 0,
) -> dict[str, float]:
    """Max and mean |A(beta) - A_exact(beta)| through the real codec, over `temp_range`.

    The teacher rows are `logp` [D, V] (float64 log-probabilities; default `reference_distributions`).
    Their statistics are computed by the teacher's own code (`distribution_stats` on float32 logits),
    encoded and decoded by `RowCodec(params)` (default: the "default" preset), and A is interpolated
    from the DECODED values, as a training run sees them. Returns {"max", "mean", "rows"}.
    """
    if logp is None:
        logp = reference_distributions(vocab_size, seed)
    d, v = logp.shape
    if params is None:
        params = CodecParams(vocab_size=v, temperatures=DEFAULT_GRID_TEMPERATURES, **PRESETS["default"])
    codec = RowCodec(params)
    betas = torch.tensor(params.betas, dtype=torch.float32)
    tgt = torch.zeros(d, dtype=torch.int64)
    st = distribution_stats(logp.float(), tgt, params.top_k, betas)
    dec = codec.decode(codec.encode({k: x.numpy() for k, x in st.items()}, tgt.numpy()))
    temps = torch.linspace(temp_range[0], temp_range[1], n_temperatures, dtype=torch.float64)
    exact = exact_log_partition(logp, 1.0 / temps)  # [D, B]
    nb = temps.numel()
    b = (1.0 / temps).float().repeat(d)
    rep = lambda name: torch.from_numpy(dec[name]).repeat_interleave(nb, 0)  # noqa: E731
    t_beta = tail_log_partition_at(b, torch.tensor(params.betas, dtype=torch.float32), rep("tail_log_partition"),
                                   rep("tail_logprob"), rep("tail_entropy"), params.n_tail, scheme=scheme,
                                   use_zero_knot=use_zero_knot)
    got = log_partition_at(b, rep("topk_logprobs"), t_beta)
    err = (got.double() - exact.reshape(-1)).abs()
    return {"max": float(err.max()), "mean": float(err.mean()), "rows": d}


if __name__ == "__main__":
    print("| V | preset | pchip max | pchip mean | linear max |")
    print("|---|---|---|---|---|")
    for v in (1000, 8000, 32000, 65536):
        logp = reference_distributions(v)
        for preset, p in PRESETS.items():
            params = CodecParams(vocab_size=v, temperatures=DEFAULT_GRID_TEMPERATURES, **p)
            e = measure_interpolation_error(params, logp=logp)
            lin = measure_interpolation_error(params, logp=logp, scheme="linear")
            print(f"| {v:,} | {preset} | {e['max']:.4f} | {e['mean']:.5f} | {lin['max']:.4f} |", flush=True)
