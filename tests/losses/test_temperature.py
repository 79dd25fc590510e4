"""Tests for pipeline.losses.temperature: the tail's power sum T(beta) between grid knots, against float64 truth.

    .venv/bin/python -m pytest tests/losses/test_temperature.py -q
"""

import math

import pytest
import torch

from pipeline.cache.schema import PRESETS, CodecParams
from pipeline.losses.temperature import (
    DEFAULT_GRID_TEMPERATURES,
    check_temperature_range,
    log_partition_at,
    tail_log_partition_at,
)
from pipeline.teacher.fidelity import exact_log_partition, measure_interpolation_error, reference_distributions

GRID_T = DEFAULT_GRID_TEMPERATURES


def _tail_stats(logp: torch.Tensor, k: int, temps=GRID_T):
    """Exact float64 cache quantities of dense log p [N, V]: grid betas [G], top-K log p [N, K],
    T(beta_g) [N, G], log r [N], H(pi) [N]."""
    betas = torch.tensor([1.0 / t for t in temps], dtype=torch.float64)
    srt = logp.sort(-1, descending=True).values
    head, rest = srt[:, :k], srt[:, k:]
    t_grid = exact_log_partition(rest, betas)
    log_r = torch.logsumexp(rest, -1)
    pi = rest - log_r[:, None]
    h = -(pi.exp() * pi).sum(-1)
    return betas, head, t_grid, log_r, h


def _random_logp(n, v, scale, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(scale * torch.randn(n, v, generator=g, dtype=torch.float64), -1)


def test_knots_and_t1_are_exact():
    logp = _random_logp(6, 300, scale=3.0, seed=1)
    betas, _, t_grid, log_r, h = _tail_stats(logp, 8)
    f = lambda x: x.float()  # noqa: E731
    for g in range(len(GRID_T)):
        got = tail_log_partition_at(f(betas[g].repeat(6)), f(betas), f(t_grid), f(log_r), f(h), 292)
        assert torch.equal(got, f(t_grid[:, g]))
    got = tail_log_partition_at(torch.ones(6), f(betas), f(t_grid), f(log_r), f(h), 292)
    assert torch.equal(got, f(log_r))


def test_off_grid_matches_the_exact_tail_partition():
    # Interpolation alone (exact float64 knots): the tail's power sum, and A built from it, at temperatures
    # between knots across [0.5, 2], against the dense float64 truth.
    logp = torch.cat([_random_logp(8, 2000, scale=s, seed=2) for s in (1.0, 3.0, 6.0)])
    k = 8
    betas, head, t_grid, log_r, h = _tail_stats(logp, k)
    temps = torch.linspace(0.5, 2.0, 61, dtype=torch.float64)
    n, nb = logp.shape[0], temps.numel()
    b = (1.0 / temps).repeat(n)
    rep = lambda x: x.repeat_interleave(nb, 0)  # noqa: E731
    got_t = tail_log_partition_at(b, betas, rep(t_grid), rep(log_r), rep(h), 2000 - k)
    rest = logp.sort(-1, descending=True).values[:, k:]
    want_t = exact_log_partition(rest, 1.0 / temps).reshape(-1)
    got_a = log_partition_at(b, rep(head), got_t)
    want_a = exact_log_partition(logp, 1.0 / temps).reshape(-1)
    assert (got_a - want_a).abs().max() < 5e-3
    assert ((got_t - want_t).abs() / (1 + want_t.abs())).max() < 2e-2


@pytest.mark.parametrize("scheme", ["pchip", "linear", "bessel"])
def test_uniform_tail_is_reproduced_off_grid(scheme):
    # A uniform tail has Renyi entropy log(V - K) at every beta: every scheme reproduces it exactly.
    v, k = 1000, 4
    logp = torch.log_softmax(torch.cat([torch.full((3, k), 5.0), torch.zeros(3, v - k)], 1).double(), -1)
    betas, _, t_grid, log_r, h = _tail_stats(logp, k)
    b = torch.tensor([0.6, 1.2, 1.9], dtype=torch.float64)
    got = tail_log_partition_at(b, betas, t_grid, log_r, h, v - k, scheme=scheme)
    assert torch.allclose(got, b * log_r + (1 - b) * math.log(v - k), atol=1e-12)


@pytest.mark.parametrize("preset", ["default", "hifi"])
def test_error_through_the_real_codec_is_below_0_01(preset):
    # float32 statistics -> format-3 encode -> decode -> interpolate, against float64 A, over the IDTS range
    # (the target: 0.01 nats). Reference distributions: Gaussian, Zipf and LLM-like peaked rows.
    for v in (1000, 8000):
        params = CodecParams(vocab_size=v, temperatures=GRID_T, **PRESETS[preset])
        err = measure_interpolation_error(params, logp=reference_distributions(v), n_temperatures=41)
        assert err["max"] < 0.01, (v, err)
    linear = measure_interpolation_error(params, logp=reference_distributions(8000), n_temperatures=41, scheme="linear")
    assert err["max"] < linear["max"]


def test_tiny_and_empty_tails_are_finite_or_minus_inf():
    logp = torch.log_softmax(torch.tensor([[60.0, 0.0, -1.0, -2.0, -3.0], [0.0, 0.1, 0.2, 0.3, 0.4]],
                                          dtype=torch.float64), -1)
    betas, head, t_grid, log_r, h = _tail_stats(logp, 2)
    assert log_r[0] < -55  # r ~ 1e-26: a confident row
    b = torch.tensor([0.83, 1.6], dtype=torch.float64)
    got = tail_log_partition_at(b, betas, t_grid, log_r, h, 3)
    want = exact_log_partition(logp.sort(-1, descending=True).values[:, 2:], b)
    assert torch.isfinite(got).all()
    assert torch.allclose(got, torch.stack([want[0, 0], want[1, 1]]), atol=1e-6)
    # No tail at all (K = V): -inf, never NaN.
    none = tail_log_partition_at(b, betas, torch.full((2, len(betas)), -math.inf, dtype=torch.float64),
                                 torch.full((2,), -math.inf, dtype=torch.float64), torch.zeros(2, dtype=torch.float64), 0)
    assert torch.equal(none, torch.full((2,), -math.inf, dtype=torch.float64))


def test_bfloat16_inputs_are_upcast():
    logp = reference_distributions(1000)[:4]
    betas, _, t_grid, log_r, h = _tail_stats(logp, 8)
    b = torch.tensor([0.6, 0.9, 1.1, 1.8])
    args = [x.bfloat16() for x in (t_grid, log_r, h)]
    got = tail_log_partition_at(b.bfloat16(), betas.float(), *args, 992)
    assert got.dtype == torch.float32
    # against float64 arithmetic on the same (rounded) inputs: nothing is computed in bf16
    want = tail_log_partition_at(b.bfloat16().double(), betas, *[x.double() for x in args], 992)
    assert torch.allclose(got.double(), want, atol=1e-5, rtol=1e-6)


def test_out_of_range_raises_naming_temperature_and_range():
    logp = reference_distributions(1000)[:2]
    betas, _, t_grid, log_r, h = _tail_stats(logp, 8)
    with pytest.raises(ValueError, match=r"temperature 0\.4 .*\[0\.5, 2\]"):
        tail_log_partition_at(torch.tensor([1.0, 2.5], dtype=torch.float64), betas, t_grid, log_r, h, 992)
    with pytest.raises(ValueError, match=r"temperature 2\.5"):
        tail_log_partition_at(torch.tensor([0.4, 1.0], dtype=torch.float64), betas, t_grid, log_r, h, 992)
    with pytest.raises(ValueError, match="scheme"):
        tail_log_partition_at(torch.ones(2, dtype=torch.float64), betas, t_grid, log_r, h, 992, scheme="cubic")


def test_check_temperature_range():
    check_temperature_range([0.5, 1.0, 2.0, 0.61, 1.65], GRID_T)
    check_temperature_range(torch.tensor([[0.7, 1.4]]), GRID_T)
    check_temperature_range(1.0, (1.4, 2.0))  # T = 1 is an exact knot, always in range
    for bad in (0.49, 2.01, float("nan")):
        with pytest.raises(ValueError, match=r"outside the cached log-partition grid range \[0\.5, 2\]"):
            check_temperature_range(torch.tensor([1.0, bad]), GRID_T)


def test_empty_input():
    betas = torch.tensor([1 / t for t in GRID_T])
    got = tail_log_partition_at(torch.zeros(0), betas, torch.zeros(0, len(betas)), torch.zeros(0), torch.zeros(0), 10)
    assert got.shape == (0,)


# ---- through the real codec, against the float64 reference (tests/losses/reference.py) --------------------------

def _own_rows(v: int, seed: int = 0) -> torch.Tensor:
    """Teacher rows made here (not pipeline.teacher.fidelity's): Laplace and Gaussian logits of several scales,
    Zipf-like rows, and peaked rows (one or two tokens boosted by 4-14 nats). log p [30, v], float64."""
    g = torch.Generator().manual_seed(1000 + seed + v)
    rows = []
    for scale in (0.4, 1.0, 2.5, 4.0, 7.0):
        rows.append(scale * torch.randn(v, generator=g, dtype=torch.float64))
        u = torch.rand(v, generator=g, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
        rows.append(scale * torch.sign(u - 0.5) * torch.log1p(-2 * (u - 0.5).abs()))  # Laplace
    ranks = torch.arange(1, v + 1, dtype=torch.float64)
    for s in (0.7, 1.0, 1.3, 1.7, 2.2):
        rows.append((-s * ranks.log())[torch.randperm(v, generator=g)])
    for boost in (4.0, 6.0, 8.0, 10.0, 12.0, 14.0):
        z = 1.5 * torch.randn(v, generator=g, dtype=torch.float64)
        z[int(torch.randint(v, (1,), generator=g))] += boost
        rows.append(z.clone())
        z[int(torch.randint(v, (1,), generator=g))] += boost - 1.0
        rows.append(z)
    rows += [2.0 * torch.randn(v, generator=g, dtype=torch.float64) for _ in range(3)]
    return torch.log_softmax(torch.stack(rows), dim=-1)


@pytest.mark.parametrize("stats_from", ["reference", "teacher"])
@pytest.mark.parametrize("preset", ["default", "hifi"])
def test_decoded_then_interpolated_a_against_the_reference(preset, stats_from):
    """The rows and the truth are the test's: float64 dense rows, A(β) = log Σ p^β by the reference. What is
    measured is the project's: statistics (the reference's exact float64 ones, or the teacher stage's
    `distribution_stats` on float32 logits) -> format-3 encode -> decode -> `tail_log_partition_at` ->
    `log_partition_at`, over the IDTS range. The decoded fields are also held to the documented bounds
    (docs/cache-format.md): head log-probs within head_step + fine/2, log r within 4.9e-4."""
    import numpy as np

    from pipeline.cache.schema import RowCodec
    from pipeline.teacher.stats import distribution_stats
    from tests.losses import reference as R

    for v in (1000, 6000):
        logp = _own_rows(v)
        params = CodecParams(vocab_size=v, temperatures=GRID_T, **PRESETS[preset])
        k = params.top_k
        exact = R.cache_fields(logp, k, GRID_T)
        targets = torch.arange(logp.shape[0]) * 7 % v
        if stats_from == "reference":
            stats = {"topk_ids": exact["topk_ids"], "topk_logprobs": exact["topk_logprobs"],
                     "tail_logprob": exact["tail_logprob"], "tail_entropy": exact["tail_entropy"],
                     "tail_shape": exact["tail_shape"], "target_logprobs": logp.gather(1, targets[:, None])[:, 0]}
        else:
            stats = distribution_stats(logp.float(), targets, k, torch.tensor(params.betas, dtype=torch.float32))
        codec = RowCodec(params)
        dec = codec.decode(codec.encode({n: x.numpy() for n, x in stats.items()}, targets.numpy()))
        assert np.array_equal(dec["topk_ids"], exact["topk_ids"].numpy())
        head_err = np.abs(dec["topk_logprobs"] - exact["topk_logprobs"].numpy()).max()
        assert head_err <= params.head_step + params.tail_step / 2 + 1e-5, head_err
        assert np.abs(dec["tail_logprob"] - exact["tail_logprob"].numpy()).max() <= 4.9e-4 + 1e-5
        temps = torch.exp(torch.linspace(-0.5, 0.5, 41, dtype=torch.float64))
        n, nb = logp.shape[0], temps.numel()
        b = (1.0 / temps).repeat(n)
        rep = lambda f: torch.from_numpy(dec[f]).repeat_interleave(nb, 0)  # noqa: E731
        t_beta = tail_log_partition_at(b.float(), torch.tensor(params.betas, dtype=torch.float32),
                                       rep("tail_log_partition"), rep("tail_logprob"), rep("tail_entropy"), v - k)
        got = log_partition_at(b.float(), rep("topk_logprobs"), t_beta).double()
        truth = R.log_partition(logp.repeat_interleave(nb, 0), b)
        err = (got - truth).abs()
        assert err.max() < 0.01, (v, float(err.max()))  # the documented bound (measured here: 0.0016-0.0033)
        assert err.mean() < 1e-3, (v, float(err.mean()))  # measured: 0.00014-0.00045
        # on the grid's knots and at T = 1 the decoded A is the codec's alone
        for t in (1.0,) + tuple(GRID_T):
            bb = torch.full((n,), 1.0 / t)
            a = log_partition_at(bb, torch.from_numpy(dec["topk_logprobs"]),
                                 tail_log_partition_at(bb, torch.tensor(params.betas, dtype=torch.float32),
                                                       *(torch.from_numpy(dec[f]) for f in
                                                         ("tail_log_partition", "tail_logprob", "tail_entropy")),
                                                       v - k))
            assert (a.double() - R.log_partition(logp, bb.double())).abs().max() < 0.01
