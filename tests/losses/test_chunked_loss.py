"""The chunked objective (pipeline/losses/chunked.py) against the unchunked one on full logits: value and
gradient, for every divergence with the gate, LATF and IDTS; and no tensor the size of N x V, ever.

    .venv/bin/python -m pytest tests/losses/test_chunked_loss.py -q
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline.losses.adakd import LATF
from pipeline.cache.schema import CodecParams, RowCodec
from pipeline.losses.chunked import chunked_loss, plan_rows
from pipeline.losses.divergences import DIVERGENCES
from pipeline.losses.chunked import _ChunkedLoss
from pipeline.losses.objective import KD_FIELDS, SAMPLED_FIELDS, kd_terms
from pipeline.losses.sampled import SAMPLED_DIVERGENCES
from pipeline.losses.options import KdOptions
from pipeline.head import HeadSpec
from pipeline.teacher.stats import distribution_stats
from tests.losses import reference as R

GRID = (0.5, 0.7, 1.4, 2.0)


def make_case(n=23, h=12, v=61, pad=5, k=6, seed=0, softcap=None, scale=None, bias=True, with_teacher=False,
              tail_samples=0):
    """A student (hidden states, a padded head with bias/scale/soft-cap) and decoded format-3 cache rows of a
    random teacher over the first V ids (with_teacher: also the teacher's full logits [n, V]; tail_samples: the
    teacher stage's draws too, `objective.SAMPLED_FIELDS`, through the codec)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float32).requires_grad_()
    weight = (0.6 * torch.randn(v + pad, h, generator=g)).requires_grad_()
    b = (0.3 * torch.randn(v + pad, generator=g)).requires_grad_() if bias else None
    head = HeadSpec(weight=weight, bias=b, vocab_size=v + pad, softcap=softcap, scale=scale)
    teacher = 3.0 * torch.randn(n, v, generator=g)
    targets = torch.randint(v, (n,), generator=g)
    params = CodecParams(top_k=k, vocab_size=v, temperatures=GRID, tail_samples=tail_samples)
    st = distribution_stats(teacher, targets, k, torch.tensor(params.betas, dtype=torch.float32), tail_samples,
                            torch.Generator().manual_seed(seed))
    codec = RowCodec(params)
    rows = codec.decode(codec.encode({n_: t.numpy() for n_, t in st.items()}, targets.numpy()))
    fields = KD_FIELDS + (SAMPLED_FIELDS if tail_samples else ())
    cache = {f: torch.from_numpy(rows[f]) for f in fields if f != "target_rank"}
    out = (hidden, head, targets, cache, torch.tensor(params.betas, dtype=torch.float32), v)
    return out + (teacher,) if with_teacher else out


def reference(hidden, head, targets, cache, grid, v, s, ce_scale, kd_scale, latf, gen):
    """The unchunked objective: full logits, `kd_terms`, CE; autograd for the gradients."""
    logits = head.logits(hidden, fp32=False)
    ce = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    terms = kd_terms(logits, cache, s, v, grid, latf, gen)
    return ce_scale * ce + kd_scale * terms.numerator, terms


def grads(loss, hidden, head):
    params = [hidden, head.weight] + ([head.bias] if head.bias is not None else [])
    return torch.autograd.grad(loss, params)


SETTINGS = [
    dict(),
    dict(gate="topk", gate_k=3, reject_weight=0.25),
    dict(gate="spec", proposal="greedy"),
    dict(gate="threshold", gate_threshold=0.02, latf=True, idts=True),
    dict(latf=True, idts=True, temperature=1.2),
]


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("extra", SETTINGS)
def test_chunked_equals_unchunked_value_and_gradient(name, extra):
    hidden, head, targets, cache, grid, v = make_case(seed=zlib.crc32(f"{name}{extra}".encode()) % 1000)
    s = KdOptions(loss=name, **extra)
    ce_scale, kd_scale = 0.3, 0.7 / 5.0
    latf_a, latf_b = LATF(10), LATF(10)
    for latf in (latf_a, latf_b):  # a narrowed focus, so LATF's selection matters
        latf._ratio = 0.6
    want, terms = reference(hidden, head, targets, cache, grid, v, s, ce_scale, kd_scale, latf_a,
                            torch.Generator().manual_seed(4))
    g_want = grads(want, hidden, head)
    plan = plan_rows(hidden.detach(), head, targets, cache, s, v, grid, latf_b, torch.Generator().manual_seed(4), 5)
    got, ce, kd = chunked_loss(hidden, head, targets, cache, plan, s, v, ce_scale, kd_scale, chunk_rows=5)
    assert plan.kept == terms.kept and plan.accepted == terms.accepted
    assert plan.denominator == pytest.approx(terms.denominator, rel=1e-6)
    assert float(kd) == pytest.approx(float(terms.numerator.detach()), rel=1e-5, abs=1e-6)
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5, abs=1e-6)
    for a, b in zip(grads(got, hidden, head), g_want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("extra", SETTINGS)
def test_chunked_on_decoded_rows_equals_the_float64_reference(name, extra):
    """The cases of `test_chunked_equals_unchunked_value_and_gradient` against the float64 reference
    (tests/losses/reference.py) on the same decoded rows instead of the unchunked path: two project paths
    that agree can still share a defect (tests/mutation/run_mutants.py measures which)."""
    hidden, head, targets, cache, grid, v = make_case(seed=zlib.crc32(f"{name}{extra}".encode()) % 1000)
    s = KdOptions(loss=name, **extra)
    ce_scale, kd_scale = 0.3, 0.7 / 5.0
    latf = LATF(10)
    latf._ratio = 0.6
    plan = plan_rows(hidden.detach(), head, targets, cache, s, v, grid, latf, torch.Generator().manual_seed(4), 5)
    got, _, kd = chunked_loss(hidden, head, targets, cache, plan, s, v, ce_scale, kd_scale, chunk_rows=5)
    fields = {**{f: x.double() if x.is_floating_point() else x for f, x in cache.items()}, "betas": grid.double()}
    r_loss, r_plan, r_num, r_grads = reference_loss(hidden, head, targets, fields, v, s, ce_scale, kd_scale, 0.6, 4)
    assert plan.keep.tolist() == r_plan.keep and plan.accepted == r_plan.accepted
    assert plan.denominator == pytest.approx(r_plan.denominator, rel=1e-6)
    assert float(kd) == pytest.approx(float(r_num.detach()), rel=2e-5, abs=1e-6)
    assert float(got.detach()) == pytest.approx(float(r_loss.detach()), rel=2e-5, abs=1e-6)
    for a, b in zip(grads(got, hidden, head), r_grads):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-6)


def reference_kwargs(s: KdOptions, latf_ratio: float | None) -> dict:
    """`KdOptions` as the keyword arguments of `reference.plan`."""
    return dict(gate_rule=s.gate, gate_k=s.gate_k, threshold=s.gate_threshold, reject_weight=s.reject_weight,
                select_ratio=s.select_ratio if s.select != "none" else None, latf_ratio=latf_ratio if s.latf else None,
                idts=s.idts, t_base=s.temperature, idts_c=s.idts_c)


def reference_loss(hidden, head, targets, fields, v, s, ce_scale, kd_scale, latf_ratio, gen_seed, groups=None,
                   teacher_at=None):
    """The chunked loss ce_scale·Σ CE + kd_scale·Σ w·T²·D from tests/losses/reference.py in float64 (a plain
    head: logits = hidden·Wᵀ + b), its plan, Σ w·T²·D and the gradients (hidden, W[, b]) by autograd.
    teacher_at: the reference teacher (default: tempered from the cache fields by the documented PCHIP rule)."""
    h = hidden.detach().double().requires_grad_()
    w = head.weight.detach().double().requires_grad_()
    b = head.bias.detach().double().requires_grad_() if head.bias is not None else None
    logits = h @ w.T + (b if b is not None else 0.0)
    ce = -torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).sum()
    u = torch.rand(hidden.shape[0], generator=torch.Generator().manual_seed(gen_seed)).tolist()  # spec's uniforms
    plan = R.plan(logits.detach(), fields, v, uniforms=u, groups=None if groups is None else groups.tolist(),
                  **reference_kwargs(s, latf_ratio))
    num, _, _ = R.kd_sums(s.loss, logits, plan, teacher_at or R.fields_teacher(fields, v), fields["topk_ids"], v)
    loss = ce_scale * ce + kd_scale * num
    return loss, plan, num, torch.autograd.grad(loss, [h, w] + ([b] if b is not None else []))


SAMPLED_SETTINGS = [
    dict(),  # T = 1: CE fused into the divergence's pass
    dict(gate="topk", gate_k=3, reject_weight=0.25),  # T = 1, some rows masked: CE fused, KD on the kept rows
    dict(gate="threshold", gate_threshold=0.02, latf=True, idts=True),  # per-row temperatures
    dict(temperature=1.4),
]


@pytest.mark.parametrize("name", SAMPLED_DIVERGENCES)
@pytest.mark.parametrize("extra", SAMPLED_SETTINGS)
def test_chunked_sampled_tail_equals_unchunked(name, extra):
    """--tail sampled through the chunked loss's closed form against autograd on full logits (`kd_terms`), with the
    teacher stage's own draws decoded by the codec (their log-probs to draw_step/2), value and gradient."""
    hidden, head, targets, cache, grid, v = make_case(seed=zlib.crc32(f"s{name}{extra}".encode()) % 1000,
                                                      tail_samples=5)
    s = KdOptions(loss=name, tail="sampled", **extra)
    ce_scale, kd_scale = 0.3, 0.7 / 5.0
    latf_a, latf_b = LATF(10), LATF(10)
    for latf in (latf_a, latf_b):
        latf._ratio = 0.6
    want, terms = reference(hidden, head, targets, cache, grid, v, s, ce_scale, kd_scale, latf_a,
                            torch.Generator().manual_seed(4))
    plan = plan_rows(hidden.detach(), head, targets, cache, s, v, grid, latf_b, torch.Generator().manual_seed(4), 5)
    got, ce, kd = chunked_loss(hidden, head, targets, cache, plan, s, v, ce_scale, kd_scale, chunk_rows=5)
    assert plan.kept == terms.kept and 0 < plan.kept
    assert float(kd) == pytest.approx(float(terms.numerator.detach()), rel=1e-5, abs=1e-6)
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5, abs=1e-6)
    for a, b in zip(grads(got, hidden, head), grads(want, hidden, head)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("tail", ["bucket", "sampled"])
@pytest.mark.parametrize("extra", [dict(), dict(gate="topk", gate_k=3, reject_weight=0.0), dict(idts=True)])
def test_one_pass_ce_and_kd_equal_two_passes(tail, extra, monkeypatch):
    """CE from the divergence's own softmax (every row at T = 1) equals CE from a pass of its own: loss, Σ CE,
    Σ w T² D and the gradients, to float32 rounding; padded student ids, masked rows and a soft-capped head
    included. With IDTS (T != 1) both are the two-pass path."""
    hidden, head, targets, cache, grid, v = make_case(seed=11, softcap=4.0, tail_samples=4)
    s = KdOptions(loss="jsd", tail=tail, **extra)
    out = {}
    for fuse in (True, False):
        monkeypatch.setattr(_ChunkedLoss, "fuse_ce", fuse)
        plan = plan_rows(hidden.detach(), head, targets, cache, s, v, grid, None, None, 6)
        loss, ce, kd = chunked_loss(hidden, head, targets, cache, plan, s, v, 0.4, 0.6 / 7, chunk_rows=6)
        out[fuse] = (loss, ce, kd, grads(loss, hidden, head))
    for a, b in zip(out[True][:3], out[False][:3]):
        assert float(a.detach()) == pytest.approx(float(b.detach()), rel=2e-6, abs=1e-7)
    for a, b in zip(out[True][3], out[False][3]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


REFERENCE_SETTINGS = [
    dict(gate="topk", gate_k=3, reject_weight=0.25, select="student_entropy", select_ratio=0.5),
    dict(gate="spec", reject_weight=0.5, latf=True, idts=True),
    dict(gate="threshold", gate_threshold=0.015, reject_weight=0.25, select="student_entropy", select_ratio=0.7,
         latf=True, idts=True, idts_c=0.7, temperature=1.1),
]


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("extra", REFERENCE_SETTINGS)
def test_chunked_equals_the_float64_reference(name, extra):
    """The chunked loss (what `kdcache train` runs) from a dense float64 teacher whose cache fields the reference
    builds itself: value and gradient against autograd through tests/losses/reference.py, with the gate, SE-KD,
    LATF and IDTS on; against the exactly tempered dense teacher too (within the PCHIP interpolation's error)."""
    from tests.losses.test_reference import as_cache, teacher_rows

    n, v, k = 36, 57, 6
    hidden, head, targets, _, grid, _ = make_case(n=n, v=v, k=k, pad=3, seed=zlib.crc32(f"r{name}{extra}".encode()) % 1000)
    logp = teacher_rows(n, v, k, seed=31)
    fields = R.cache_fields(logp, k, GRID)
    cache = as_cache(fields)
    groups = torch.tensor([i // 12 for i in range(n)])
    s = KdOptions(loss=name, **extra)
    ce_scale, kd_scale = 0.3, 0.7 / 5.0
    latf = LATF(10)
    latf._ratio = 0.6
    plan = plan_rows(hidden.detach(), head, targets, cache, s, v, fields["betas"].float(), latf,
                     torch.Generator().manual_seed(4), 5, groups=groups)
    got, _, kd = chunked_loss(hidden, head, targets, cache, plan, s, v, ce_scale, kd_scale, chunk_rows=5)
    want, r_plan, r_num, r_grads = reference_loss(hidden, head, targets, fields, v, s, ce_scale, kd_scale, 0.6, 4,
                                                  groups)
    assert plan.keep.tolist() == r_plan.keep and plan.accepted == r_plan.accepted
    assert 0 < plan.kept < n and any(w < 1 for w, k_ in zip(r_plan.weight, r_plan.keep) if k_)
    assert plan.denominator == pytest.approx(r_plan.denominator, rel=1e-6)
    torch.testing.assert_close(plan.temps[plan.keep].double(),
                               torch.tensor(r_plan.temps, dtype=torch.float64)[torch.tensor(r_plan.keep)], rtol=2e-6, atol=0)
    assert float(kd) == pytest.approx(float(r_num.detach()), rel=2e-5, abs=1e-6)
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=2e-5, abs=1e-6)
    g_got = grads(got, hidden, head)
    for a, b in zip(g_got, r_grads):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-6)
    # the exactly tempered teacher (dense rows): equal to the interpolation's error
    exact, _, exact_num, exact_grads = reference_loss(hidden, head, targets, fields, v, s, ce_scale, kd_scale, 0.6, 4,
                                                      groups, R.dense_teacher(logp, fields["topk_ids"]))
    assert float(kd) == pytest.approx(float(exact_num.detach()), rel=1e-4, abs=1e-5)
    for a, b in zip(g_got, exact_grads):
        torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("head_kw", [dict(softcap=3.0), dict(scale=0.5, bias=False), dict(softcap=2.0, scale=2.0)])
def test_head_transforms_are_differentiated_through(head_kw):
    hidden, head, targets, cache, grid, v = make_case(seed=7, **head_kw)
    s = KdOptions(loss="rkl", gate="topk", gate_k=4, reject_weight=0.5, idts=True)
    want, _ = reference(hidden, head, targets, cache, grid, v, s, 1.0, 1.0, None, None)
    plan = plan_rows(hidden.detach(), head, targets, cache, s, v, grid, None, None, 4)
    got, _, _ = chunked_loss(hidden, head, targets, cache, plan, s, v, 1.0, 1.0, chunk_rows=4)
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    for a, b in zip(grads(got, hidden, head), grads(want, hidden, head)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_ce_only_and_kd_only_scales():
    hidden, head, targets, cache, grid, v = make_case(seed=3)
    s = KdOptions(loss="fkl")
    plan = plan_rows(hidden.detach(), head, targets, cache, s, v, grid, None, None, 6)
    # alpha = 0: no CE gradient and no CE recomputation (its value is the plan's), KD only
    got, ce, kd = chunked_loss(hidden, head, targets, cache, plan, s, v, 0.0, 1.0, chunk_rows=6)
    assert math.isnan(float(ce))
    want, terms = reference(hidden, head, targets, cache, grid, v, s, 0.0, 1.0, None, None)
    assert float(got.detach()) == pytest.approx(float(terms.numerator.detach()), rel=1e-5)
    ce_full = torch.nn.functional.cross_entropy(head.logits(hidden.detach(), fp32=False), targets, reduction="none")
    torch.testing.assert_close(plan.ce_rows, ce_full, rtol=1e-5, atol=1e-5)
    # CE only (no cache): the gradient of the summed cross-entropy
    plan = plan_rows(hidden.detach(), head, targets, None, None, v, None, None, None, 6)
    got, ce, _ = chunked_loss(hidden, head, targets, None, plan, None, v, 1.0, 0.0, chunk_rows=6)
    want = torch.nn.functional.cross_entropy(head.logits(hidden, fp32=False), targets, reduction="sum")
    assert float(ce) == pytest.approx(float(want.detach()), rel=1e-6)
    for a, b in zip(grads(got, hidden, head), grads(want, hidden, head)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_tensor_grows_with_n_times_v():
    # N = 400 rows, V = 3,000: a full [N, V] would be 1.2M elements; chunks of 16 rows never exceed
    # 16 x V, and the head's own [V, H] gradient is the only other large tensor.
    n, h, v, chunk = 400, 8, 3000, 16
    hidden, head, targets, cache, grid, v = make_case(n=n, h=h, v=v, pad=0, k=8, seed=5)
    s = KdOptions(loss="jsd", gate="spec", proposal="sample", latf=True, idts=True)
    with _LargestTensor() as mode:
        plan = plan_rows(hidden.detach(), head, targets, cache, s, v, grid, LATF(10), torch.Generator().manual_seed(0),
                         chunk)
        loss, _, _ = chunked_loss(hidden, head, targets, cache, plan, s, v, 0.5, 0.5, chunk_rows=chunk)
        loss.backward()
    assert mode.largest <= max(chunk * v, v * h, n * 8) * 2, mode.largest
    assert mode.largest < n * v / 4


@pytest.mark.parametrize("name", DIVERGENCES)
def test_closed_form_bucket_gradient_on_adversarial_rows(name):
    """`bucket_kd_grad` (float32, closed form) against autograd through `kd_divergence` in float64 on the rows
    real students produce: confident (tail mass ~1e-52, below float32's normal range), near-uniform, K = V,
    temperatures off 1, a padded student head. Its bucket-level arithmetic is float64, so it matches float64
    autograd to the float32 rounding of its output (autograd in float32 is off by up to 1e-3 of a row's norm
    on rkl/tvd/srkl rows close to the teacher: a difference of nearly equal terms)."""
    from pipeline.losses.divergences import bucket_kd_grad, kd_divergence, teacher_log_buckets

    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    v, pad, k, n = 40, 3, 5, 9
    z = 2.0 * torch.randn(n, v + pad, generator=g, dtype=torch.float64)
    z[0] = -60.0
    z[0, 7] = 60.0  # confident student: its tail is e^-120 relative to the top
    z[1] = 1e-3 * torch.randn(v + pad, generator=g, dtype=torch.float64)  # near-uniform
    teacher = 3.0 * torch.randn(n, v, generator=g, dtype=torch.float64)
    teacher[2, 11] = 40.0  # confident teacher
    lp = torch.log_softmax(teacher, -1)
    top = lp.topk(k, dim=-1)
    t = torch.tensor([1.0, 1.0, 0.61, 1.65, 1.0, 2.0, 0.5, 1.3, 1.0], dtype=torch.float64)
    beta = 1.0 / t
    # the teacher's tempered tail exactly (dense): log Σ_tail p^beta
    tail_beta = torch.logsumexp((beta[:, None] * lp).scatter(1, top.indices, -math.inf), -1)
    scale = torch.rand(n, generator=g, dtype=torch.float64) + 0.1
    zz = z.clone().requires_grad_()
    d_ref = kd_divergence(name, zz, top.indices, top.values, tail_beta, beta, t, v)
    (g_ref,) = torch.autograd.grad((scale * d_ref).sum(), zz)
    log_p = teacher_log_buckets(top.values.float(), tail_beta.float(), beta.float())
    d, grad = bucket_kd_grad(name, z.float(), top.indices, log_p, beta.float(), scale.float(), v)
    torch.testing.assert_close(d.double(), d_ref.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad.double(), g_ref[:, :v], rtol=2e-5, atol=1e-7)
    assert g_ref[:, v:].abs().max() == 0  # the padded ids get no KD gradient either way
    # K = V: no tail bucket at all
    kv = lp.topk(v, dim=-1)
    none = torch.full((n,), -math.inf, dtype=torch.float64)
    zz = z.clone().requires_grad_()
    d_ref = kd_divergence(name, zz, kv.indices, kv.values, none, beta, t, v)
    (g_ref,) = torch.autograd.grad((scale * d_ref).sum(), zz)
    log_p = teacher_log_buckets(kv.values.float(), none.float(), beta.float())
    d, grad = bucket_kd_grad(name, z.float(), kv.indices, log_p, beta.float(), scale.float(), v)
    torch.testing.assert_close(d.double(), d_ref.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad.double(), g_ref[:, :v], rtol=2e-5, atol=1e-7)
