"""Tests for pipeline.temperature: knots exact, documented error bound, range checks."""

import math

import pytest
import torch

from pipeline.temperature import (
    MAX_ABS_ERROR,
    check_temperature_range,
    exact_entropy,
    exact_log_partition,
    log_partition_at,
    measure_interpolation_error,
    reference_distributions,
)

GRID_T = (0.5, 0.7, 1.4, 2.0)


def _grid(logp: torch.Tensor, dtype=torch.float32):
    """Grid betas [G], grid values [N,G], entropy [N] for dense log p [N,V]."""
    betas = torch.tensor([1.0 / t for t in GRID_T], dtype=dtype)
    return betas, exact_log_partition(logp, betas.double()).to(dtype), exact_entropy(logp).to(dtype)


def _random_logp(n, v, scale, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(scale * torch.randn(n, v, generator=g, dtype=torch.float64), -1)


@pytest.mark.parametrize("use_head", [False, True])
def test_knots_are_exact(use_head):
    logp = _random_logp(6, 300, scale=3.0, seed=1)
    betas, values, ent = _grid(logp)
    head = logp.topk(8, -1).values.float() if use_head else None
    for g in range(len(GRID_T)):
        got = log_partition_at(betas[g].repeat(6), betas, values, ent, topk_logprobs=head)
        assert torch.equal(got, values[:, g])
    got = log_partition_at(torch.ones(6), betas, values, ent, topk_logprobs=head)
    assert torch.equal(got, torch.zeros(6))


def test_mixed_betas_per_position_and_grid_containing_one():
    logp = _random_logp(4, 200, scale=2.0, seed=2)
    temps = (0.5, 1.0, 2.0)
    betas = torch.tensor([1 / t for t in temps])
    values = exact_log_partition(logp, betas.double()).float()
    values[:, 1] = 1e-6  # rounding noise at T = 1 is replaced by the exact 0
    ent = exact_entropy(logp).float()
    b = torch.tensor([2.0, 1.0, 0.5, 1.3])
    got = log_partition_at(b, betas, values, ent)
    assert got[0] == values[0, 0] and got[1] == 0.0 and got[2] == values[2, 2]
    exact = exact_log_partition(logp[3:], b[3:].double())[0, 0]
    assert abs(float(got[3]) - float(exact)) < 0.05


def test_uniform_distribution_is_reproduced_off_grid():
    # A(β) = (1-β)·log V is linear: every scheme with the exact slope -H = -log V is exact.
    v = 1000
    logp = torch.full((3, v), -math.log(v), dtype=torch.float64)
    betas, values, ent = _grid(logp, torch.float64)
    b = torch.tensor([0.6, 1.2, 1.9], dtype=torch.float64)
    for scheme in ("pchip", "bessel", "linear"):
        got = log_partition_at(b, betas, values, ent, scheme=scheme)
        assert torch.allclose(got, (1 - b) * math.log(v), atol=1e-12)


def test_error_below_documented_bound_and_pchip_beats_linear():
    # A subset of the documented set (V = 1000, 8000; 31 of the 301 temperatures): its error cannot exceed the
    # documented maximum over the full set.
    kw = dict(vocab_sizes=(1000, 8000), n_temperatures=31)
    direct = measure_interpolation_error("pchip", **kw)
    head = measure_interpolation_error("pchip", topk=20, **kw)
    assert direct < MAX_ABS_ERROR[None]
    assert head < MAX_ABS_ERROR[20]
    assert head < direct < measure_interpolation_error("linear", **kw)


def test_head_exact_scheme_with_tiny_or_empty_tail_is_finite():
    # K = V: the tail is empty; the float32 clamp must keep everything finite and accurate.
    logp = torch.log_softmax(torch.tensor([[9.0, 0.0, -1.0, -2.0], [0.0, 0.1, 0.2, 0.3]], dtype=torch.float64), -1)
    betas, values, ent = _grid(logp)
    b = torch.tensor([0.83, 1.7])
    got = log_partition_at(b, betas, values, ent, topk_logprobs=logp.float())
    exact = torch.stack([exact_log_partition(logp[i : i + 1], b[i : i + 1].double())[0, 0] for i in range(2)])
    assert torch.isfinite(got).all()
    assert torch.allclose(got.double(), exact, atol=1e-5)


def test_bfloat16_inputs_are_upcast():
    logp = reference_distributions(1000)[:4]
    betas, values, ent = _grid(logp)
    b = torch.tensor([0.6, 0.9, 1.1, 1.8])
    vb, eb, bb = values.bfloat16(), ent.bfloat16(), b.bfloat16()
    got = log_partition_at(bb, betas, vb, eb)
    assert got.dtype == torch.float32
    assert torch.equal(got, log_partition_at(bb.float(), betas, vb.float(), eb.float()))
    assert torch.allclose(got, log_partition_at(b, betas, values, ent), atol=0.05)


def test_out_of_range_raises_naming_temperature_and_range():
    logp = reference_distributions(1000)[:2]
    betas, values, ent = _grid(logp)
    with pytest.raises(ValueError, match=r"temperature 2\.5 .*\[0\.5, 2\]"):
        log_partition_at(torch.tensor([1.0, 0.4]), betas, values, ent)
    with pytest.raises(ValueError, match=r"temperature 0\.4"):
        log_partition_at(torch.tensor([2.5, 1.0]), betas, values, ent)
    with pytest.raises(ValueError, match="scheme"):
        log_partition_at(torch.tensor([1.0, 1.0]), betas, values, ent, scheme="cubic")


def test_check_temperature_range():
    check_temperature_range([0.5, 1.0, 2.0, 0.61, 1.65], GRID_T)
    check_temperature_range(torch.tensor([[0.7, 1.4]]), GRID_T)
    check_temperature_range(1.0, (1.4, 2.0))  # T = 1 is an exact knot, always in range
    for bad in (0.49, 2.01, float("nan")):
        with pytest.raises(ValueError, match=r"outside the cached log-partition grid range \[0\.5, 2\]"):
            check_temperature_range(torch.tensor([1.0, bad]), GRID_T)


def test_empty_input():
    betas = torch.tensor([1 / t for t in GRID_T])
    got = log_partition_at(torch.zeros(0), betas, torch.zeros(0, 4), torch.zeros(0))
    assert got.shape == (0,)
