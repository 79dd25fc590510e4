"""The loss mathematics against the float64 references of tests/losses/reference.py (written from
docs/methods.md, no pipeline import): every divergence on K + 1 buckets, the SpecKD gate, LATF, IDTS, SE-KD
and the composed loss Σ w·T²·D / Σ w with its gradient, from dense teacher rows whose cache fields the
reference builds itself. This file is the fast subset of the mutation check (tests/mutation/run_mutants.py).

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/losses/test_reference.py -q
"""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.losses.adakd import LATF, idts_temperatures
from pipeline.losses.divergences import DIVERGENCES, divergence, hellinger, kd_divergence, weighted_kd_loss
from pipeline.losses.gate import speckd_gate
from pipeline.losses.objective import kd_terms
from pipeline.losses.options import KdOptions
from pipeline.losses.selection import select_top_entropy, student_entropy
from pipeline.losses.temperature import tail_log_partition_at
from tests.losses import reference as R

GRID = (0.5, 0.7, 1.4, 2.0)
F64 = torch.float64


def teacher_rows(n: int, v: int, k: int, seed: int, tail_scale: float = 0.5) -> torch.Tensor:
    """Dense teacher log p [n, v], float64: K peaked ids (logits 2.5·N(0,1) + 3) at random places over a tail
    of logits tail_scale·N(0,1). A tail this even keeps the documented PCHIP interpolation of T(β) within
    ~1e-6 of the exact power sum, so the loss at any temperature has an exact dense truth."""
    g = torch.Generator().manual_seed(seed)
    z = tail_scale * torch.randn(n, v, generator=g, dtype=F64)
    z[:, :k] = 2.5 * torch.randn(n, k, generator=g, dtype=F64) + 3.0
    perm = torch.argsort(torch.rand(n, v, generator=g), dim=1)
    return torch.log_softmax(z.gather(1, perm), dim=-1)


def student_logits(logp: torch.Tensor, pad: int, seed: int, padded_argmax: int = 0) -> torch.Tensor:
    """float32 student logits [n, V + pad]: a noisy copy of the teacher (so some greedy proposals are in the
    teacher's head and some are not), padded ids low except on the first `padded_argmax` rows."""
    g = torch.Generator().manual_seed(seed)
    n, v = logp.shape
    z = 0.7 * logp.float() + 1.5 * torch.randn(n, v, generator=g)
    out = torch.cat([z, torch.full((n, pad), -4.0) + torch.randn(n, pad, generator=g)], dim=1)
    out[:padded_argmax, v] = 30.0
    return out


def as_cache(fields: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reference's float64 cache fields as the reader gives them (float32, ids int64)."""
    return {f: (x if x.dtype == torch.int64 else x.float()) for f, x in fields.items()
            if f in ("topk_ids", "topk_logprobs", "tail_logprob", "tail_entropy", "tail_log_partition")}


def case(n=40, v=57, k=6, pad=3, seed=0, padded_argmax=0):
    logp = teacher_rows(n, v, k, seed)
    fields = R.cache_fields(logp, k, GRID)
    return logp, fields, student_logits(logp, pad, seed + 1, padded_argmax)


# ---- the reference itself ------------------------------------------------------------------------------------

def test_reference_tempering_and_interpolation_agree_with_the_dense_truth():
    logp, fields, _ = case()
    n = logp.shape[0]
    ids = fields["topk_ids"]
    for t in (1.0, 0.5, 0.7, 1.4, 2.0):  # T = 1 and the grid knots: the cache fields are exact there
        temp = torch.full((n,), t, dtype=F64)
        tp = R.pchip_tail_power_sum(fields, 1.0 / temp, 57)
        torch.testing.assert_close(tp, R.tail_power_sum(logp, ids, 1.0 / temp), rtol=0, atol=1e-12)
        torch.testing.assert_close(R.teacher_buckets_from_fields(fields, temp, tp), R.teacher_buckets(logp, ids, temp),
                                   rtol=0, atol=1e-12)
    temp = torch.exp(torch.linspace(-0.5, 0.5, n, dtype=F64))  # off the grid: the interpolation's error
    a = torch.logaddexp(torch.logsumexp(fields["topk_logprobs"] / temp[:, None], -1),
                        R.pchip_tail_power_sum(fields, 1.0 / temp, 57))
    assert (a - R.log_partition(logp, 1.0 / temp)).abs().max() < 5e-6
    assert torch.allclose(R.teacher_buckets(logp, ids, temp).sum(-1), torch.ones(n, dtype=F64))


# ---- §2 divergences on K + 1 buckets --------------------------------------------------------------------------

@pytest.mark.parametrize("temp", [1.0, 0.7, 1.31, 0.62])
@pytest.mark.parametrize("name", DIVERGENCES)
def test_divergence_value_and_gradient_match_the_reference(name, temp):
    logp, fields, z = case(n=16, seed=3)
    n, v = logp.shape
    t = torch.full((n,), temp, dtype=F64)
    beta = 1.0 / t
    tail = tail_log_partition_at(beta, fields["betas"], fields["tail_log_partition"], fields["tail_logprob"],
                                 fields["tail_entropy"], v - 6)
    x = z.double().requires_grad_()
    got = kd_divergence(name, x, fields["topk_ids"], fields["topk_logprobs"], tail, beta, t, v)
    (g_got,) = torch.autograd.grad(got.sum(), x)
    y = z.double().requires_grad_()
    rows = torch.arange(n)
    # the exact tempered teacher; and the teacher tempered from the cache fields by the documented PCHIP rule
    # (equal on the grid and at T = 1, within the interpolation's ~1e-6 between knots)
    exact = R.dense_teacher(logp, fields["topk_ids"])(rows, t)
    pchip = R.fields_teacher(fields, v)(rows, t)
    want = R.divergence(name, pchip, R.student_buckets(y, fields["topk_ids"], v, t))
    (g_want,) = torch.autograd.grad(want.sum(), y)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g_got, g_want, rtol=1e-9, atol=1e-12)
    y = z.double().requires_grad_()
    want = R.divergence(name, exact, R.student_buckets(y, fields["topk_ids"], v, t))
    (g_want,) = torch.autograd.grad(want.sum(), y)
    on_grid = temp in (1.0,) + GRID
    # between knots the interpolated tail is ~1e-6 off in A, ~1e-5 in its own log-mass (rkl's tail gradient)
    tol = dict(rtol=1e-9, atol=1e-12) if on_grid else dict(rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(g_got, g_want, **tol)
    assert g_got[:, v:].abs().max() == 0  # a padded head's ids are in no bucket


def test_akl_head_boundary_and_ties_by_hand():
    """AKL's head is the buckets in descending P while the cumulative P <= μ = 0.5, ties in bucket order: dyadic
    masses make a cumulative sum land on μ exactly (0.25 + 0.25), which random rows never do."""
    uniform = torch.tensor([[0.25, 0.25, 0.25, 0.25]], dtype=F64)  # head {0, 1}: 0.25 + 0.25 = μ
    tied = torch.tensor([[0.25, 0.125, 0.125, 0.25, 0.25]], dtype=F64)  # three 0.25s: the first two in order
    for pp, head in ((uniform, {0, 1}), (tied, {0, 3})):
        q = torch.softmax(torch.linspace(-1.0, 1.0, pp.shape[1], dtype=F64), -1)[None]
        err = (pp - q).abs()[0].tolist()
        g_head = sum(err[j] for j in head)
        w_head = g_head / sum(err)
        want = w_head * R.kl(pp, q) + (1 - w_head) * R.kl(q, pp)
        torch.testing.assert_close(R.divergence("akl", pp, q), want, rtol=1e-14, atol=0)
        torch.testing.assert_close(divergence("akl", pp.log(), q.log()), want, rtol=1e-12, atol=0)


def test_hellinger_and_weighted_loss_match_the_reference():
    logp, fields, z = case(n=12, seed=5)
    t = torch.ones(12, dtype=F64)
    p = R.teacher_buckets(logp, fields["topk_ids"], t)
    q = R.student_buckets(z.double(), fields["topk_ids"], 57, t)
    torch.testing.assert_close(hellinger(p.log(), q.log()), R.hellinger(p, q), rtol=1e-12, atol=1e-14)
    d = torch.rand(12, dtype=F64) + 0.1
    w = torch.tensor([1.0, 0.25, 0.0, 1.0, 0.5, 0.0, 1.0, 1.0, 0.25, 0.25, 1.0, 0.0], dtype=F64)
    temps = torch.exp(torch.linspace(-0.5, 0.5, 12, dtype=F64))
    got = weighted_kd_loss(d, w, temps)
    keep = w > 0
    want = R.kd_loss((w * temps ** 2 * d)[keep].sum(), float(w[keep].sum()))
    assert float(got) == pytest.approx(float(want), rel=1e-12)


# ---- §3 gate ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rule, kw", [("topk", dict(gate_k=3)), ("topk", dict()), ("threshold", dict(threshold=0.015)),
                                      ("threshold", dict(threshold=0.2)), ("spec", dict())])
def test_gate_matches_the_reference(rule, kw):
    _, fields, z = case(n=60, seed=7, padded_argmax=2)
    cache = as_cache(fields)
    g = torch.Generator().manual_seed(11)
    got = speckd_gate(z, cache["topk_ids"], cache["topk_logprobs"], cache["tail_logprob"], 57, rule=rule,
                      reject_weight=0.25, generator=g, **kw)
    # greedy proposals draw nothing: the spec rule's N uniforms are the stream's first draws (gate.py)
    u = torch.rand(60, generator=torch.Generator().manual_seed(11)).tolist()
    want = R.gate(z, fields, 57, rule, reject_weight=0.25, uniforms=u, **kw)
    assert got.proposal.tolist() == want.proposal
    assert got.accepted.tolist() == want.accepted
    assert got.weight.tolist() == pytest.approx(want.weight)
    # the case exercises every branch of p(ŷ): head ids, tail ids (r/(V-K)) and padded ids (0)
    ids = fields["topk_ids"].tolist()
    where = ["head" if y in ids[i] else "tail" if y < 57 else "pad" for i, y in enumerate(want.proposal)]
    assert {"head", "tail", "pad"} <= set(where)
    assert 0 < sum(want.accepted) < 60


# ---- §4 LATF, IDTS; §4b SE-KD -----------------------------------------------------------------------------------

@pytest.mark.parametrize("ratio", [0.3, 0.55, 1.0])
def test_latf_and_idts_match_the_reference(ratio):
    g = torch.Generator().manual_seed(int(ratio * 100))
    s = torch.rand(31, generator=g)
    s[3] = 0.0  # IDTS: T_base·e^c
    s[7] = s[8]  # a tie: the lower index is kept first
    eligible = torch.rand(31, generator=g) > 0.2
    latf = LATF(10, initial_ratio=ratio, min_ratio=min(0.1, ratio))
    keep = latf.select(s, eligible)
    want_keep = R.latf_keep(s.tolist(), eligible.tolist(), ratio)
    assert keep.tolist() == want_keep
    for t_base, c in ((1.0, 0.5), (1.3, 0.8)):
        temps = idts_temperatures(s, keep, t_base=t_base, c=c)
        want = R.idts_temperatures(s.tolist(), want_keep, t_base, c)
        assert temps.tolist() == pytest.approx(want, rel=1e-6)
    # even and odd counts of kept rows: the median of each
    for n_kept in (6, 7):
        k = torch.zeros(31, dtype=torch.bool)
        k[:n_kept] = True
        assert idts_temperatures(s, k).tolist() == pytest.approx(R.idts_temperatures(s.tolist(), k.tolist()), rel=1e-6)


@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_sekd_matches_the_reference(ratio):
    _, _, z = case(n=45, seed=13)
    groups = torch.tensor([i // 9 for i in range(45)])
    eligible = torch.rand(45, generator=torch.Generator().manual_seed(2)) > 0.3
    ent = student_entropy(z)
    want_ent = R.student_entropy(z)
    assert ent.tolist() == pytest.approx(want_ent, rel=1e-5, abs=1e-6)
    keep = select_top_entropy(ent, eligible, groups, ratio)
    assert keep.tolist() == R.sekd_keep(want_ent, eligible.tolist(), groups.tolist(), ratio)


# ---- §5 the composed loss -------------------------------------------------------------------------------------

SETTINGS = {
    "plain": (dict(), dict()),
    "T1.3": (dict(temperature=1.3), dict(t_base=1.3)),
    "topk+sekd": (dict(gate="topk", gate_k=3, reject_weight=0.25, select="student_entropy", select_ratio=0.5),
                  dict(gate_rule="topk", gate_k=3, reject_weight=0.25, select_ratio=0.5)),
    "spec+latf+idts": (dict(gate="spec", reject_weight=0.5, latf=True, idts=True),
                       dict(gate_rule="spec", reject_weight=0.5, latf_ratio=0.6, idts=True)),
    "threshold+sekd+latf+idts": (
        dict(gate="threshold", gate_threshold=0.015, reject_weight=0.25, select="student_entropy", select_ratio=0.7,
             latf=True, idts=True, idts_c=0.7, temperature=1.1),
        dict(gate_rule="threshold", threshold=0.015, reject_weight=0.25, select_ratio=0.7, latf_ratio=0.6,
             idts=True, idts_c=0.7, t_base=1.1)),
}


def reference_plan(z, fields, v, ref_kw, gen_seed, groups):
    u = torch.rand(z.shape[0], generator=torch.Generator().manual_seed(gen_seed)).tolist()
    return R.plan(z, fields, v, uniforms=u, groups=None if groups is None else groups.tolist(), **ref_kw)


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("name", DIVERGENCES)
def test_kd_terms_match_the_reference(name, setting):
    """`objective.kd_terms` (what KDLoss runs) against the reference composition, value and gradient: the
    teacher exactly tempered from its dense rows, and from the cache fields by the documented PCHIP rule."""
    opts, ref_kw = SETTINGS[setting]
    logp, fields, z = case(n=36, seed=17, padded_argmax=1)
    v = logp.shape[1]
    groups = torch.tensor([i // 12 for i in range(36)])
    latf = LATF(10)
    latf._ratio = 0.6  # a narrowed focus: the selection matters
    x = z.clone().requires_grad_()
    s = KdOptions(loss=name, **opts)
    got = kd_terms(x, as_cache(fields), s, v, fields["betas"].float(), latf, torch.Generator().manual_seed(4), groups)
    plan = reference_plan(z, fields, v, ref_kw, 4, groups if "sekd" in setting else None)
    assert got.kept == sum(plan.keep) and got.accepted == plan.accepted
    assert 0 < got.kept
    assert got.denominator == pytest.approx(plan.denominator, rel=1e-6)
    torch.testing.assert_close(got.temps.double(), torch.tensor(plan.temps, dtype=F64)[torch.tensor(plan.keep)],
                               rtol=2e-6, atol=0)
    y = z.double().requires_grad_()
    num, den, _ = R.kd_sums(name, y, plan, R.fields_teacher(fields, v), fields["topk_ids"], v)
    num_dense, _, _ = R.kd_sums(name, z.double(), plan, R.dense_teacher(logp, fields["topk_ids"]), fields["topk_ids"], v)
    assert float(got.numerator.detach()) == pytest.approx(float(num.detach()), rel=2e-5, abs=1e-6)
    assert float(got.numerator.detach()) == pytest.approx(float(num_dense), rel=1e-4, abs=1e-5)
    loss = got.numerator / got.denominator
    want = R.kd_loss(num, den)
    assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=2e-5, abs=1e-6)
    (g_got,) = torch.autograd.grad(loss, x)
    (g_want,) = torch.autograd.grad(want, y)
    torch.testing.assert_close(g_got.double(), g_want, rtol=1e-4, atol=1e-7)


def test_nothing_kept_gives_zero():
    logp, fields, z = case(n=8, seed=19)
    s = KdOptions(loss="fkl", gate="threshold", gate_threshold=2.0)  # nothing has p >= 2
    got = kd_terms(z.clone().requires_grad_(), as_cache(fields), s, 57, fields["betas"].float(), None, None)
    plan = R.plan(z, fields, 57, gate_rule="threshold", threshold=2.0)
    assert got.kept == 0 == sum(plan.keep) and got.denominator == 0.0 == plan.denominator
    num, den, _ = R.kd_sums("fkl", z.double(), plan, R.dense_teacher(logp, fields["topk_ids"]), fields["topk_ids"], 57)
    assert float(got.numerator.detach()) == 0.0 == float(R.kd_loss(num, den))


def test_no_other_temperature_than_the_plans():
    """T² is the plan's temperature squared: with T_base = 2 (a grid knot, exact) the loss is 4x the divergence
    at T = 2 averaged over the rows, against the dense truth."""
    logp, fields, z = case(n=10, seed=23)
    got = kd_terms(z.clone(), as_cache(fields), KdOptions(loss="fkl", temperature=2.0), 57, fields["betas"].float(),
                   None, None)
    t = torch.full((10,), 2.0, dtype=F64)
    d = R.divergence("fkl", R.teacher_buckets(logp, fields["topk_ids"], t),
                     R.student_buckets(z.double(), fields["topk_ids"], 57, t))
    assert float(got.numerator) / got.denominator == pytest.approx(float(4.0 * d.mean()), rel=1e-5)
    assert math.isclose(got.denominator, 10.0)
