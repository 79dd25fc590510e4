"""The sampled tail (pipeline/losses/sampled.py) at any temperature: its expected value and gradient against the
dense float64 divergence over the whole vocabulary, by averaging over many independent draw sets; its variance
against the documented formula; its closed-form gradient against autograd; and every refusal's one line.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/losses/test_sampled_tail.py -q

The draws here are made by the test (numpy's multinomial from π = p/r on the tail, exact float64 log-probs), not
by the teacher stage (tests/teacher/test_tail_draws.py tests that sampler), so what is measured is the estimator.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.errors import KdError
from pipeline.losses.divergences import kd_divergence
from pipeline.losses.options import KdOptions
from pipeline.losses.sampled import (
    REFUSED,
    SAMPLED_DIVERGENCES,
    sampled_kd_grad,
    sampled_tail_divergence,
    sampled_teacher,
)
from tests.losses import reference as R

F64 = torch.float64
V, PAD, K, S, M = 40, 3, 4, 8, 3000  # teacher vocabulary, padded student ids, head, draws per row, draw sets


def _case(seed: int = 0):
    """Three dense teacher rows (peaked, moderate, flat: r from ~0.01 to ~0.9) and a student with a padded head."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(3, V, generator=g, dtype=F64) * torch.tensor([[4.0], [2.0], [0.7]], dtype=F64)
    z[0, 5] += 6.0
    logp = torch.log_softmax(z, -1)
    student = z + 1.5 * torch.randn(3, V, generator=g, dtype=F64)
    logits = torch.cat([student, torch.randn(3, PAD, generator=g, dtype=F64)], 1)
    return logp, logits


def _draw_sets(logp: torch.Tensor, topk_ids: torch.Tensor, m: int, seed: int):
    """m independent draw sets of S draws per row from π = p / r on the tail: tail_ids / tail_counts /
    tail_logprobs [m·N, S] (row i of set j is row j·N + i), distinct ids ascending, -1 / 0 / -inf pads."""
    rng = np.random.default_rng(seed)
    n = logp.shape[0]
    ids = np.full((m, n, S), -1, np.int64)
    counts = np.zeros((m, n, S), np.int64)
    for i in range(n):
        tail = np.setdiff1d(np.arange(V), topk_ids[i].numpy())
        pi = np.exp(logp[i, tail].numpy())
        pi /= pi.sum()
        c = rng.multinomial(S, pi, size=m)  # [m, n_tail]
        first = np.argsort(c == 0, axis=1, kind="stable")[:, :S]  # the drawn ids first, ascending
        cnt = np.take_along_axis(c, first, 1)
        ids[:, i] = np.where(cnt > 0, tail[first], -1)
        counts[:, i] = cnt
    ids, counts = torch.from_numpy(ids.reshape(m * n, S)), torch.from_numpy(counts.reshape(m * n, S))
    lps = logp.repeat(m, 1).gather(1, ids.clamp(min=0)).masked_fill(ids < 0, -math.inf)
    return ids, counts, lps


def _estimate(name, logp, logits, temps, ids, counts, lps, drop_weights=False):
    """The sampled-tail D per row and its gradient w.r.t. the logits, for draw sets given as rows: logp, logits and
    temps [N, ...] are the dense rows each draw set belongs to. drop_weights: the planted defect (the tail split by
    the T = 1 counts at every temperature, as if the draws came from p^T)."""
    f = R.cache_fields(logp, K, [0.5, 2.0])
    beta = 1.0 / temps
    tail_beta = R.tail_power_sum(logp, f["topk_ids"], beta)  # exact T(β): the estimator is what is under test
    x = logits.clone().requires_grad_()
    if drop_weights:  # no log-probs: the loss then takes the T = 1 split; told T = 1, it does not refuse
        d = sampled_tail_divergence(name, x, f["topk_ids"], f["topk_logprobs"], tail_beta, beta,
                                    torch.ones_like(temps), V, ids, counts)
    else:
        d = sampled_tail_divergence(name, x, f["topk_ids"], f["topk_logprobs"], tail_beta, beta, temps, V, ids,
                                    counts, tail_logprob=f["tail_logprob"], tail_logprobs=lps)
    (grad,) = torch.autograd.grad(d.sum(), x)
    return d.detach(), grad


def _rep(x: torch.Tensor, m: int) -> torch.Tensor:
    return x.repeat(m, *([1] * (x.dim() - 1)))


def _exact_moments(name, logp, logits, temps, drop_weights=False):
    """The exact mean and single-draw variance of the estimate and of its gradient. The estimate is linear in the
    counts (D̂ = const + Σ_j c_j·φ_j / S), so with S draws of π its mean is Σ_j π_j·(the estimate when every draw
    is j) and its variance (1/S)·Var_π of that: one draw set per tail id j of each row, all S draws on j.
    Returns (value mean [N], value variance [N], gradient mean [N, Vs], gradient variance [N, Vs]) for S draws."""
    n = logp.shape[0]
    topk = R.cache_fields(logp, K, [1.0])["topk_ids"]
    tails = [np.setdiff1d(np.arange(V), topk[i].numpy()) for i in range(n)]
    nt = len(tails[0])
    ids = torch.full((nt, n, S), -1, dtype=torch.int64)
    counts = torch.zeros((nt, n, S), dtype=torch.int64)
    for i in range(n):
        ids[:, i, 0] = torch.from_numpy(tails[i])
        counts[:, i, 0] = S
    ids, counts = ids.view(nt * n, S), counts.view(nt * n, S)
    lps = _rep(logp, nt).gather(1, ids.clamp(min=0)).masked_fill(ids < 0, -math.inf)
    d, g = _estimate(name, _rep(logp, nt), _rep(logits, nt), _rep(temps, nt), ids, counts, lps, drop_weights)
    d, g = d.view(nt, n), g.view(nt, n, -1)
    pi = torch.stack([torch.softmax(logp[i, tails[i]], -1) for i in range(n)], 1)  # [nt, n]
    mean_d, mean_g = (pi * d).sum(0), (pi[:, :, None] * g).sum(0)
    var_d = (pi * (d - mean_d) ** 2).sum(0) / S
    var_g = (pi[:, :, None] * (g - mean_g) ** 2).sum(0) / S
    return mean_d, var_d, mean_g, var_g


def _dense(name, logp, logits, temps):
    """D(p^T, q^T) over the whole vocabulary and its gradient w.r.t. the logits (ids >= V in neither), float64."""
    x = logits.clone().requires_grad_()
    p = torch.softmax(logp / temps[:, None], -1)
    q = torch.softmax(x[:, :V] / temps[:, None], -1)
    d = R.divergence(name, p, q)
    (grad,) = torch.autograd.grad(d.sum(), x)
    return d.detach(), grad


TEMPERATURES = {"T=0.5": (0.5, 0.5, 0.5), "T=1": (1.0, 1.0, 1.0), "T=2": (2.0, 2.0, 2.0),
                "per-row (IDTS)": (0.62, 1.0, 1.6)}


@pytest.mark.parametrize("temps", TEMPERATURES, ids=list(TEMPERATURES))
@pytest.mark.parametrize("name", SAMPLED_DIVERGENCES)
def test_expected_value_and_gradient_are_exactly_the_dense_ones(name, temps):
    """The estimate is linear in the draw counts, so its expectation is a finite sum over the tail ids: equal to
    the float64 full-vocabulary divergence and gradient to rounding (3 rows x 43 logits, padded ids included)."""
    logp, logits = _case()
    temps = torch.tensor(TEMPERATURES[temps], dtype=F64)
    mean_d, _, mean_g, _ = _exact_moments(name, logp, logits, temps)
    d_want, g_want = _dense(name, logp, logits, temps)
    torch.testing.assert_close(mean_d, d_want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(mean_g, g_want, rtol=1e-9, atol=1e-12)
    assert torch.all(mean_g[:, V:] == 0)  # a padded student id is in neither distribution


@pytest.mark.parametrize("temps", TEMPERATURES, ids=list(TEMPERATURES))
@pytest.mark.parametrize("name", SAMPLED_DIVERGENCES)
def test_average_over_draw_sets_is_within_the_monte_carlo_noise(name, temps):
    """3,000 independent draw sets of S = 8 (numpy's multinomial): the mean estimate and mean gradient are within
    4.5 standard errors of the dense float64 ones, on every row and logit; the standard error is the exact one
    (`_exact_moments`: an id too rare to be drawn here still counts in it). Largest z-score over the 20 cases: ~3."""
    logp, logits = _case()
    temps = torch.tensor(TEMPERATURES[temps], dtype=F64)
    f = R.cache_fields(logp, K, [1.0])
    ids, counts, lps = _draw_sets(logp, f["topk_ids"], M, seed=1)
    d, g = _estimate(name, _rep(logp, M), _rep(logits, M), _rep(temps, M), ids, counts, lps)
    _, var_d, _, var_g = _exact_moments(name, logp, logits, temps)
    d_want, g_want = _dense(name, logp, logits, temps)
    z_d = (d.view(M, 3).mean(0) - d_want).abs() / ((var_d / M).sqrt() + 1e-12)
    z_g = (g.view(M, 3, -1).mean(0) - g_want).abs() / ((var_g / M).sqrt() + 1e-12)
    print(f"max z {name} {temps.tolist()}: value {float(z_d.max()):.2f}, gradient {float(z_g.max()):.2f}")
    assert float(z_d.max()) < 4.5 and float(z_g.max()) < 4.5, (float(z_d.max()), float(z_g.max()))


def test_planted_defects_are_resolved():
    """Both tests above fail for what they are there to catch: the importance weights dropped (the tail split by
    the T = 1 counts, measured wrong by 0.56-0.93 in bucket TVD at T = 2), and the K + 1 bucket tail (no draws)."""
    logp, logits = _case()
    temps = torch.tensor(TEMPERATURES["T=2"], dtype=F64)
    _, g_want = _dense("fkl", logp, logits, temps)
    _, _, mean_g, var_g = _exact_moments("fkl", logp, logits, temps, drop_weights=True)
    se = (var_g / M).sqrt() + 1e-12
    assert float(((mean_g - g_want).abs() / se).max()) > 10
    f = R.cache_fields(logp, K, [0.5, 2.0])
    x = logits.clone().requires_grad_()
    b = kd_divergence("fkl", x, f["topk_ids"], f["topk_logprobs"], R.tail_power_sum(logp, f["topk_ids"], 1 / temps),
                      1 / temps, temps, V)
    (g_bucket,) = torch.autograd.grad(b.sum(), x)
    _, _, _, var_g = _exact_moments("fkl", logp, logits, temps)
    assert float(((g_bucket - g_want).abs() / ((var_g / M).sqrt() + 1e-12)).max()) > 10


@pytest.mark.parametrize("beta", [0.5, 1.0, 2.0])
def test_variance_of_the_tail_mass_matches_the_formula(beta):
    """Var[Σ_j P̂_j] = (r^T)²/S·(e^(A_π(2β−1) − 2A_π(β)) − 1) (docs/methods.md): the empirical variance over the
    draw sets within 15% (its own standard error here is ~5%)."""
    logp, _ = _case()
    f = R.cache_fields(logp, K, [0.5, 2.0])
    m = 4000
    ids, counts, lps = _draw_sets(logp, f["topk_ids"], m, seed=5)
    b = torch.full((m * 3,), beta, dtype=F64)
    tail_beta = R.tail_power_sum(_rep(logp, m), _rep(f["topk_ids"], m), b)
    t = sampled_teacher(_rep(f["topk_logprobs"], m), _rep(f["tail_logprob"], m), tail_beta, b, ids, counts, lps)
    mass = t.log_pw.exp().sum(-1).view(m, 3)
    log_r = f["tail_logprob"]

    def a_pi(bb: float) -> torch.Tensor:  # A_π(β) = T(β) − β log r, exactly from the dense rows
        return R.tail_power_sum(logp, f["topk_ids"], torch.full((3,), bb, dtype=F64)) - bb * log_r

    r_t = t.log_p_tail.exp().view(m, 3)[0]
    want = r_t ** 2 / S * (torch.exp(a_pi(2 * beta - 1) - 2 * a_pi(beta)) - 1)
    assert torch.allclose(mass.mean(0), r_t, rtol=0.05)
    if beta == 1.0:  # Σ P̂_j = r exactly at T = 1
        assert torch.allclose(mass.var(0), torch.zeros(3, dtype=F64), atol=1e-20) and float(want.abs().max()) < 1e-15
    else:
        assert torch.allclose(mass.var(0), want, rtol=0.15), (mass.var(0), want)


@pytest.mark.parametrize("name", SAMPLED_DIVERGENCES)
def test_closed_form_gradient_equals_autograd(name):
    """`sampled_kd_grad` (the chunked loss's path) against autograd through `sampled_tail_divergence`, float32 logits, on rows
    at several temperatures with a weight per row, and with cross-entropy fused at T = 1."""
    logp, logits = _case(seed=3)
    m = 4
    f = R.cache_fields(logp, K, [0.5, 2.0])
    ids, counts, lps = _draw_sets(logp, f["topk_ids"], m, seed=9)
    scale = torch.linspace(0.0, 2.0, 3 * m, dtype=torch.float32)
    targets = torch.arange(3 * m) % (V + PAD)
    for temps in ((0.6, 1.0, 1.7), (1.0, 1.0, 1.0)):
        t = _rep(torch.tensor(temps, dtype=F64), m)
        beta = 1 / t
        tail_beta = R.tail_power_sum(_rep(logp, m), _rep(f["topk_ids"], m), beta).float()
        z = _rep(logits, m).float()
        x = z.clone().requires_grad_()
        d = sampled_tail_divergence(name, x, _rep(f["topk_ids"], m), _rep(f["topk_logprobs"], m).float(), tail_beta,
                                    beta.float(), t.float(), V, ids, counts,
                                    tail_logprob=_rep(f["tail_logprob"], m).float(), tail_logprobs=lps.float())
        ce_scale = 0.3 if temps == (1.0, 1.0, 1.0) else 0.0
        ce = torch.nn.functional.cross_entropy(x, targets, reduction="none")
        (want,) = torch.autograd.grad((scale * d).sum() + ce_scale * ce.sum(), x)
        teacher = sampled_teacher(_rep(f["topk_logprobs"], m).float(), _rep(f["tail_logprob"], m).float(), tail_beta,
                                  beta.float(), ids, counts, lps.float())
        got_d, got, got_ce = sampled_kd_grad(name, z, _rep(f["topk_ids"], m), teacher, beta.float(), scale, V,
                                             ce_scale=ce_scale, target_ids=targets)
        torch.testing.assert_close(got_d.float(), d.detach(), rtol=1e-5, atol=1e-6)
        width = got.shape[1]
        torch.testing.assert_close(got, want[:, :width], rtol=1e-4, atol=1e-6)
        if ce_scale:
            assert width == V + PAD
            torch.testing.assert_close(got_ce, ce.detach(), rtol=1e-5, atol=1e-6)
        else:
            assert width == V and got_ce is None and torch.all(want[:, V:] == 0)


def test_refusals_are_one_line_with_the_reason():
    """rkl and akl are refused at the options (before training) and in the loss, each with its reason."""
    for name in REFUSED:
        with pytest.raises(KdError) as e:
            KdOptions(loss=name, tail="sampled").check_kd()
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"tail 'sampled' cannot serve loss {name}: ") and "--tail bucket" in msg
    assert "weighted by the student" in REFUSED["rkl"] and "ratio" in REFUSED["akl"]
    for name in SAMPLED_DIVERGENCES:  # admitted with IDTS and any temperature
        KdOptions(loss=name, tail="sampled", idts=True, temperature=1.3).check_kd()
    # a cache whose draws carry no log-probs: fkl at T = 1 only, said before training
    old = KdOptions(loss="fkl", tail="sampled")
    old.check_tail_draws(8, draw_logprobs=False)
    for opts in (KdOptions(loss="fkl", tail="sampled", idts=True), KdOptions(loss="fkl", tail="sampled", temperature=2),
                 KdOptions(loss="tvd", tail="sampled")):
        with pytest.raises(KdError, match="carry no log-probs") as e:
            opts.check_tail_draws(8, draw_logprobs=False, cache="runs/c")
        assert "\n" not in str(e.value) and str(e.value).startswith("runs/c's tail draws")
        opts.check_tail_draws(8, draw_logprobs=True)
    with pytest.raises(KdError, match="needs a cache with tail samples"):
        old.check_tail_draws(0, draw_logprobs=False)
