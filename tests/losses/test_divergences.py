"""Tests for pipeline.losses.divergences against dense float64 references written from methods.md §2."""

import math

import pytest
import torch

from pipeline.losses.divergences import (
    DIVERGENCES,
    divergence,
    hellinger,
    kd_divergence,
    student_log_buckets,
    teacher_log_buckets,
    weighted_kd_loss,
)
from pipeline.losses.sampled import sampled_tail_divergence
from pipeline.losses.temperature import tail_log_partition_at

LAM, ALPHA, MU = 0.9, 0.1, 0.5


# ---- independent references: dense probability vectors p, q [N,B], all entries > 0 ----------------
def _kl(a, b):
    return (a * (a.log() - b.log())).sum(-1)


def ref_divergence(name, p, q):
    """methods.md §2 table, on strictly positive probability vectors (no -inf handling needed)."""
    if name == "fkl":
        return _kl(p, q)
    if name == "rkl":
        return _kl(q, p)
    if name == "jsd":
        m = (1 - LAM) * p + LAM * q
        return LAM * _kl(q, m) + (1 - LAM) * _kl(p, m)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if name == "skl":
        return _kl(p, ALPHA * p + (1 - ALPHA) * q)
    if name == "srkl":
        return _kl(q, (1 - ALPHA) * p + ALPHA * q)
    if name == "akl":
        qd = q.detach()
        out = []
        for i in range(p.shape[0]):  # a per-row loop on purpose: independent of the vectorised code
            order = sorted(range(p.shape[1]), key=lambda j: -float(p[i, j]))
            cum, head = 0.0, set()
            for rank, j in enumerate(order):
                cum += float(p[i, j])
                if rank == 0 or cum <= MU:
                    head.add(j)
            gh = sum(abs(float(p[i, j] - qd[i, j])) for j in head)
            gt = sum(abs(float(p[i, j] - qd[i, j])) for j in range(p.shape[1]) if j not in head)
            out.append(gh / (gh + gt) * _kl(p[i], q[i]) + gt / (gh + gt) * _kl(q[i], p[i]))
        return torch.stack(out)
    raise AssertionError(name)


def _case(n=5, v=12, seed=0, t_scale=2.0, s_scale=1.5):
    g = torch.Generator().manual_seed(seed)
    logp = torch.log_softmax(t_scale * torch.randn(n, v, generator=g, dtype=torch.float64), -1)
    logits = (s_scale * torch.randn(n, v, generator=g, dtype=torch.float64)).requires_grad_()
    return logp, logits


def _cache(logp, k, temp):
    """What the cache gives for a dense teacher log p [N,V] at temperature temp, computed exactly here:
    top-K ids/log-probs and the tail's power sum T(β) = log Σ_{j∉K} p_j^β (-inf when K = V)."""
    lp, ids = logp.sort(-1, descending=True)
    n = logp.shape[0]
    beta = torch.full((n,), 1.0 / temp, dtype=logp.dtype)
    rest = beta[:, None] * lp[:, k:]
    tail = torch.logsumexp(rest, -1) if rest.shape[1] else torch.full((n,), -math.inf, dtype=logp.dtype)
    return ids[:, :k], lp[:, :k], tail, beta, torch.full((n,), temp, dtype=logp.dtype)


def _dense(logp, logits, temp):
    p = torch.softmax(logp / temp, -1)
    q = torch.softmax(logits / temp, -1)
    return p, q


def _grad(value, logits):
    (g,) = torch.autograd.grad(value.sum(), logits)
    return g


# ---- K = V: equal to the full-vocabulary value, value and gradient --------------------------------
@pytest.mark.parametrize("temp", [1.0, 0.83, 1.7])
@pytest.mark.parametrize("name", DIVERGENCES)
def test_k_equals_v_matches_dense(name, temp):
    logp, logits = _case()
    ids, lp, a, beta, t = _cache(logp, logp.shape[1], temp)
    got = kd_divergence(name, logits, ids, lp, a, beta, t, logp.shape[1])
    p, q = _dense(logp, logits, temp)
    want = ref_divergence(name, p, q)
    assert got.dtype == torch.float64
    assert torch.allclose(got, want, atol=1e-10, rtol=1e-9)
    assert torch.allclose(_grad(got, logits), _grad(want, logits), atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_k_equals_v_float32_inputs(name):
    logp, logits = _case(seed=3)
    ids, lp, a, beta, t = _cache(logp, logp.shape[1], 0.83)
    x = logits.detach().float().requires_grad_()
    got = kd_divergence(name, x, ids, lp.float(), a.float(), beta.float(), t.float(), logp.shape[1])
    p, q = _dense(logp, logits, 0.83)
    want = ref_divergence(name, p, q)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), want, atol=2e-5, rtol=1e-4)
    assert torch.allclose(_grad(got, x).double(), _grad(want, logits), atol=2e-5, rtol=1e-3)


# ---- K < V: K + 1 buckets -------------------------------------------------------------------------
def _bucket_reference(logp, logits, ids, temp):
    """Independent K+1 buckets: gather the dense tempered p, q; the tail as 1 - Σ head (float64)."""
    p, q = _dense(logp, logits, temp)
    ph, qh = p.gather(1, ids), q.gather(1, ids)
    return torch.cat([ph, 1 - ph.sum(-1, keepdim=True)], 1), torch.cat([qh, 1 - qh.sum(-1, keepdim=True)], 1)


@pytest.mark.parametrize("temp", [1.0, 0.83])
@pytest.mark.parametrize("name", DIVERGENCES)
def test_k_less_than_v_matches_bucket_reference(name, temp):
    logp, logits = _case(n=6, v=40, seed=5)
    ids, lp, a, beta, t = _cache(logp, 7, temp)
    got = kd_divergence(name, logits, ids, lp, a, beta, t, logp.shape[1])
    pb, qb = _bucket_reference(logp, logits, ids, temp)
    want = ref_divergence(name, pb, qb)
    assert torch.allclose(got, want, atol=1e-10, rtol=1e-9)
    assert torch.allclose(_grad(got, logits), _grad(want, logits), atol=1e-10, rtol=1e-8)
    if name != "akl":  # the f-divergences obey data processing: buckets are a lower bound
        p, q = _dense(logp, logits, temp)
        assert (got <= ref_divergence(name, p, q) + 1e-12).all()


def test_fkl_bucket_is_lower_bound_of_dense():
    logp, logits = _case(n=8, v=300, seed=7, t_scale=3.0)
    for k in (1, 5, 50, 299):
        ids, lp, a, beta, t = _cache(logp, k, 1.0)
        got = kd_divergence("fkl", logits, ids, lp, a, beta, t, logp.shape[1])
        p, q = _dense(logp, logits, 1.0)
        assert (got <= _kl(p, q) + 1e-12).all()


def test_teacher_and_student_buckets_shapes_and_normalisation():
    logp, logits = _case(n=4, v=30, seed=9)
    ids, lp, a, beta, t = _cache(logp, 5, 0.7)
    lp_b = teacher_log_buckets(lp.float(), a.float(), beta.float())
    lq_b = student_log_buckets(logits.detach().bfloat16(), ids, t.float(), 30)
    assert lp_b.shape == lq_b.shape == (4, 6)
    assert lp_b.dtype == lq_b.dtype == torch.float32
    assert torch.allclose(lp_b.exp().sum(-1), torch.ones(4), atol=1e-5)
    assert torch.allclose(lq_b.exp().sum(-1), torch.ones(4), atol=1e-5)
    # the tempered teacher buckets are p^T coarse-grained: compare with the dense float64 truth
    p = torch.softmax(logp / 0.7, -1)
    want = torch.cat([p.gather(1, ids), 1 - p.gather(1, ids).sum(-1, keepdim=True)], 1)
    assert torch.allclose(lp_b.double().exp(), want, atol=1e-6)


def test_teacher_tail_comes_from_the_cache_not_from_the_head():
    # A confident row: the head holds 1 - 1e-12 of the mass. The tail bucket is exactly the stored r, at
    # T = 1 and re-tempered, never -inf and never negative; only K = V (tail -inf) empties it.
    lp = torch.tensor([[math.log1p(-1e-12) - 1e-30, -40.0], [math.log(0.5), math.log(0.5)]], dtype=torch.float64)
    tail = torch.tensor([math.log(1e-12) + 1e-30, -math.inf], dtype=torch.float64)
    out = teacher_log_buckets(lp, tail, torch.ones(2, dtype=torch.float64))
    assert out[0, 2].item() == pytest.approx(math.log(1e-12), abs=1e-9)
    assert out[1, 2] == -math.inf and not torch.isnan(out).any()
    assert torch.allclose(torch.logsumexp(out, -1), torch.zeros(2, dtype=torch.float64), atol=1e-12)


def test_padded_student_vocab_is_outside_both_distributions():
    # Vs = V + 3 with finite logits on the padded ids (a Qwen-style head), K = V: both tails are empty and
    # every divergence is the full-vocabulary value over the teacher's V ids, finite, rkl included.
    logp, logits = _case(n=3, v=10, seed=11)
    pad = torch.randn(3, 3, dtype=torch.float64)
    big = torch.cat([logits.detach(), pad], 1).requires_grad_()
    ids, lp, a, beta, t = _cache(logp, 10, 1.0)
    q = torch.softmax(big[:, :10], -1)
    for name in DIVERGENCES:
        got = kd_divergence(name, big, ids, lp, a, beta, t, 10)
        want = ref_divergence(name, logp.exp(), q)
        assert torch.allclose(got, want, atol=1e-10), name
        g = _grad(got, big)
        assert torch.isfinite(g).all() and torch.equal(g[:, 10:], torch.zeros_like(g[:, 10:])), name


# ---- tail policies on a hand-built case -----------------------------------------------------------
P5 = [0.5, 0.3, 0.1, 0.06, 0.04]
Q5 = [0.4, 0.2, 0.2, 0.1, 0.1]


def _hand_case():
    lp = torch.log(torch.tensor([P5], dtype=torch.float64))
    logits = torch.log(torch.tensor([Q5], dtype=torch.float64)).requires_grad_()
    ids = torch.tensor([[0, 1]])
    one = torch.ones(1, dtype=torch.float64)
    return logits, ids, lp[:, :2], torch.log(torch.tensor([0.2], dtype=torch.float64)), one, one, 5


def test_renorm_by_hand():
    args = _hand_case()
    p = [0.5 / 0.8, 0.3 / 0.8]
    q = [0.4 / 0.6, 0.2 / 0.6]
    fkl = sum(a * math.log(a / b) for a, b in zip(p, q))
    rkl = sum(b * math.log(b / a) for a, b in zip(p, q))
    tvd = 0.5 * sum(abs(a - b) for a, b in zip(p, q))
    assert kd_divergence("fkl", *args, tail="renorm").item() == pytest.approx(fkl, rel=1e-12)
    assert kd_divergence("rkl", *args, tail="renorm").item() == pytest.approx(rkl, rel=1e-12)
    assert kd_divergence("tvd", *args, tail="renorm").item() == pytest.approx(tvd, rel=1e-12)
    pt, qt = torch.tensor([p], dtype=torch.float64), torch.tensor([q], dtype=torch.float64)
    for name in DIVERGENCES:
        got = kd_divergence(name, *args, tail="renorm")
        assert got.item() == pytest.approx(ref_divergence(name, pt, qt).item(), rel=1e-10)


def test_ignore_by_hand():
    args = _hand_case()
    p, q = P5[:2], Q5[:2]
    fkl = sum(a * math.log(a / b) for a, b in zip(p, q))
    rkl = sum(b * math.log(b / a) for a, b in zip(p, q))
    m = [(1 - LAM) * a + LAM * b for a, b in zip(p, q)]
    jsd = sum(LAM * b * math.log(b / c) + (1 - LAM) * a * math.log(a / c) for a, b, c in zip(p, q, m))
    m = [ALPHA * a + (1 - ALPHA) * b for a, b in zip(p, q)]
    skl = sum(a * math.log(a / c) for a, c in zip(p, m))
    m = [(1 - ALPHA) * a + ALPHA * b for a, b in zip(p, q)]
    srkl = sum(b * math.log(b / c) for b, c in zip(q, m))
    tvd = 0.5 * sum(abs(a - b) for a, b in zip(p, q))
    # akl over the K ids: P = 0.5 (cum 0.5 <= μ: head), 0.3 (cum 0.8: rest); g_h = 0.1, g_t = 0.1.
    akl = 0.5 * fkl + 0.5 * rkl
    want = dict(fkl=fkl, rkl=rkl, jsd=jsd, skl=skl, srkl=srkl, tvd=tvd, akl=akl)
    for name in DIVERGENCES:
        assert kd_divergence(name, *args, tail="ignore").item() == pytest.approx(want[name], rel=1e-12)


def test_bucket_by_hand():
    args = _hand_case()
    p, q = [0.5, 0.3, 0.2], [0.4, 0.2, 0.4]
    fkl = sum(a * math.log(a / b) for a, b in zip(p, q))
    assert kd_divergence("fkl", *args).item() == pytest.approx(fkl, rel=1e-12)


def test_unknown_names_raise():
    args = _hand_case()
    with pytest.raises(ValueError, match="unknown divergence 'kl'"):
        kd_divergence("kl", *args)
    with pytest.raises(ValueError, match="unknown tail policy"):
        kd_divergence("fkl", *args, tail="drop")


# ---- sampled tail -----------------------------------------------------------------------------------
def _sampled_case():
    # Tail probabilities proportional to integer counts: the sampled split is then exact, so the
    # sampled-tail fkl equals the dense fkl (value and gradient).
    head = [0.4, 0.25, 0.15]
    counts = [1, 2, 3, 4, 10]  # Σ = 20, tail mass 0.2 -> p_j = 0.01·c_j
    p = torch.tensor([head + [0.01 * c for c in counts]], dtype=torch.float64)
    logits = torch.randn(1, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64).requires_grad_()
    ids = torch.tensor([[0, 1, 2]])
    # Shuffled sample order plus two padding slots.
    tail_ids = torch.tensor([[7, 3, -1, 5, 4, 6, -1]])
    tail_counts = torch.tensor([[10, 1, 0, 3, 2, 4, 0]], dtype=torch.int32)
    one = torch.ones(1, dtype=torch.float64)
    return p, logits, ids, p.log()[:, :3], torch.log(torch.tensor([0.2], dtype=torch.float64)), one, one, tail_ids, tail_counts


def test_sampled_tail_with_exact_counts_equals_dense_fkl():
    p, logits, ids, lp, a, beta, t, tail_ids, tail_counts = _sampled_case()
    got = sampled_tail_divergence("fkl", logits, ids, lp, a, beta, t, 8, tail_ids, tail_counts)
    want = _kl(p, torch.softmax(logits, -1))
    assert torch.allclose(got, want, atol=1e-12)
    assert torch.allclose(_grad(got, logits), _grad(want, logits), atol=1e-12)


def test_sampled_tail_by_hand_and_empty_samples():
    p, logits, ids, lp, a, beta, t, _, _ = _sampled_case()
    tail_ids = torch.tensor([[3, 6], [-1, -1]])
    tail_counts = torch.tensor([[1, 3], [0, 0]], dtype=torch.int32)
    logits2 = torch.cat([logits.detach(), logits.detach()]).requires_grad_()
    two = lambda x: torch.cat([x, x])  # noqa: E731
    args = (two(ids), two(lp), two(a), two(beta), two(t))
    got = sampled_tail_divergence("fkl", logits2, *args, 8, tail_ids, tail_counts)
    q = torch.softmax(logits.detach(), -1)[0]
    pb = [0.4, 0.25, 0.15, 0.2 * 1 / 4, 0.2 * 3 / 4]
    qb = [q[0], q[1], q[2], q[3], q[6]]
    want0 = sum(x * math.log(x / float(y)) for x, y in zip(pb, qb))  # remainder bucket: P = 0
    plain = kd_divergence("fkl", logits, ids, lp, a, beta, t, 8)  # no samples: plain K + 1 buckets
    assert got[0].item() == pytest.approx(want0, rel=1e-12)
    assert got[1].item() == pytest.approx(plain.item(), rel=1e-12)
    assert torch.isfinite(_grad(got, logits2)).all()


def test_sampled_tail_without_draw_logprobs_only_for_fkl_at_t1():
    """Draws without their log-probs (caches made before they were stored) serve fkl at T = 1 only; rkl and akl
    are refused whatever the cache holds (tests/losses/test_sampled_tail.py has the estimators and the rest)."""
    _, logits, ids, lp, a, beta, t, tail_ids, tail_counts = _sampled_case()
    for name in ("rkl", "akl"):
        with pytest.raises(ValueError, match=f"a sampled tail cannot serve {name}: "):
            sampled_tail_divergence(name, logits, ids, lp, a, beta, t, 8, tail_ids, tail_counts)
    with pytest.raises(ValueError, match="serves jsd only with its draws' log-probs"):
        sampled_tail_divergence("jsd", logits, ids, lp, a, beta, t, 8, tail_ids, tail_counts)
    # Re-tempering T = 1 draws by their counts is wrong (bucket TVD 0.56-0.93 at T = 2, measured): refused.
    with pytest.raises(ValueError, match="re-tempered with its draws' log-probs, which these cache rows lack"):
        sampled_tail_divergence("fkl", logits, ids, lp, a, beta * 0.5, t * 2.0, 8, tail_ids, tail_counts)


# ---- -inf buckets, empty inputs, dtypes -------------------------------------------------------------
@pytest.mark.parametrize("name", DIVERGENCES)
def test_minus_inf_buckets_give_no_nan(name):
    ninf = -math.inf
    # Row 0: both tails empty. Row 1: a bucket with P = 0 and Q = 0. Row 2: P = 0, Q > 0 in one bucket
    # where the divergence stays finite for fkl-like ones. Row 3: P = Q.
    log_p = torch.tensor([[math.log(0.7), math.log(0.3), ninf], [math.log(0.5), ninf, math.log(0.5)],
                          [math.log(0.6), math.log(0.4), ninf], [math.log(0.2), math.log(0.8), ninf]])
    log_q = torch.tensor([[math.log(0.4), math.log(0.6), ninf], [math.log(0.3), ninf, math.log(0.7)],
                          [math.log(0.5), math.log(0.3), math.log(0.2)], [math.log(0.2), math.log(0.8), ninf]])
    log_q.requires_grad_()
    d = divergence(name, log_p, log_q)
    assert not torch.isnan(d).any()
    (g,) = torch.autograd.grad(d[:2].sum() + d[3], log_q)
    assert not torch.isnan(g).any() and torch.isfinite(g).all()
    assert d[3].item() == pytest.approx(0.0, abs=1e-7)
    if name in ("fkl", "jsd", "tvd", "skl", "srkl"):
        assert torch.isfinite(d).all()


@pytest.mark.parametrize("name", DIVERGENCES)
def test_k_equals_v_gradients_finite_with_masked_student_ids(name):
    # The student's padded ids have logit -inf: K = V leaves no student mass outside K. The value must not
    # depend on how a CPU rounds a tail that is exactly empty: the teacher's V is passed, not inferred.
    logp, logits = _case(n=3, v=6, seed=13)
    big = torch.cat([logits.detach(), torch.full((3, 2), -math.inf, dtype=torch.float64)], 1).requires_grad_()
    ids, lp, a, beta, t = _cache(logp, 6, 0.83)
    d = kd_divergence(name, big, ids, lp, a, beta, t, 6)
    g = _grad(d, big)
    assert torch.isfinite(d).all() and torch.isfinite(g).all()
    p, q = _dense(logp, logits.detach(), 0.83)
    assert torch.allclose(d.detach(), ref_divergence(name, p, q), atol=1e-10)


@pytest.mark.parametrize("tail", ["bucket", "renorm", "ignore"])
def test_empty_batch(tail):
    logits = torch.zeros(0, 10, requires_grad=True)
    ids = torch.zeros(0, 3, dtype=torch.long)
    z = torch.zeros(0)
    for name in DIVERGENCES:
        d = kd_divergence(name, logits, ids, torch.zeros(0, 3), z, z, z, 10, tail)
        assert d.shape == (0,)
        loss = weighted_kd_loss(d, z, z)
        assert loss.item() == 0.0
        loss.backward()
        assert logits.grad is None or not torch.isnan(logits.grad).any()


def test_weighted_kd_loss_all_masked_and_by_hand():
    logp, logits = _case(n=4, v=12, seed=15)
    ids, lp, a, beta, t = _cache(logp, 5, 1.0)
    d = kd_divergence("fkl", logits, ids, lp, a, beta, t, 12)
    loss = weighted_kd_loss(d, torch.zeros(4, dtype=torch.float64))
    assert loss.item() == 0.0
    g = _grad(loss, logits)
    assert torch.equal(g, torch.zeros_like(g))
    w = torch.tensor([1.0, 0.0, 0.5, 1.0], dtype=torch.float64)
    temps = torch.tensor([0.8, 1.0, 1.2, 1.5], dtype=torch.float64)
    want = (w * temps**2 * d).sum() / w.sum()
    assert torch.allclose(weighted_kd_loss(d, w, temps), want)
    # A non-finite divergence on a masked position does not reach the value.
    d2 = d.detach().clone()
    d2[1] = math.inf
    assert torch.isfinite(weighted_kd_loss(d2, w, temps))


def test_bfloat16_inputs():
    # bf16 student logits and a bf16-rounded head: the result is float32 and matches the float64 value of
    # the same (rounded) inputs, i.e. nothing is computed in bf16.
    logp, logits = _case(n=4, v=50, seed=17)
    ids, lp, a, beta, t = _cache(logp, 8, 0.83)
    x = logits.detach().bfloat16().requires_grad_()
    d = kd_divergence("jsd", x, ids, lp.bfloat16(), a.float(), beta.float(), t.float(), 50)
    x64 = x.detach().double().requires_grad_()
    ref = kd_divergence("jsd", x64, ids, lp.bfloat16().double(), a.float().double(), beta, t, 50)
    assert d.dtype == torch.float32
    assert torch.allclose(d.double(), ref, atol=1e-5, rtol=1e-5)
    g = _grad(d, x)
    assert g.dtype == torch.bfloat16 and torch.isfinite(g.float()).all()
    g_ref = _grad(ref, x64)
    assert torch.allclose(g.double(), g_ref, atol=2e-2 * float(g_ref.abs().max()))


def test_hellinger():
    p = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.8, 0.0]], dtype=torch.float64)
    q = torch.tensor([[0.4, 0.4, 0.2], [0.2, 0.8, 0.0]], dtype=torch.float64)
    lq = q.log().requires_grad_()
    h = hellinger(p.log(), lq)
    pairs = zip([0.5, 0.3, 0.2], [0.4, 0.4, 0.2])
    want0 = math.sqrt(sum((math.sqrt(a) - math.sqrt(b)) ** 2 for a, b in pairs)) / math.sqrt(2)
    assert h[0].item() == pytest.approx(want0, rel=1e-12)
    assert h[1].item() == 0.0
    (g,) = torch.autograd.grad(h.sum(), lq)
    assert not torch.isnan(g).any()
    disjoint = hellinger(torch.log(torch.tensor([[1.0, 0.0]])), torch.log(torch.tensor([[0.0, 1.0]])))
    assert disjoint.item() == pytest.approx(1.0)


def test_student_buckets_keep_one_full_size_copy():
    # Memory: autograd may keep the caller's logits and exactly one new [N,Vs] tensor (logits/T, masked).
    n, vs = 4, 1000
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(n, vs).to(dtype).requires_grad_()
        ptrs = set()

        def pack(t):
            if t.numel() == n * vs:
                ptrs.add(t.data_ptr())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            student_log_buckets(x, torch.randint(0, vs, (n, 5)), torch.full((n,), 0.8), vs)
        assert len(ptrs - {x.data_ptr()}) == 1


def test_with_interpolated_tail_partition():
    # The intended composition: T(β) interpolated from the tail's grid statistics instead of the dense value.
    logp, logits = _case(n=6, v=400, seed=19, t_scale=3.0)
    k = 20
    ids, lp, tail, beta, t = _cache(logp, k, 0.83)
    grid_b = torch.tensor([2.0, 1 / 0.7, 1 / 1.4, 0.5], dtype=torch.float64)
    rest = logp.sort(-1, descending=True).values[:, k:]
    grid = torch.logsumexp(grid_b[None, :, None] * rest[:, None, :], -1)
    log_r = torch.logsumexp(rest, -1)
    pi = rest - log_r[:, None]
    h_tail = -(pi.exp() * pi).sum(-1)
    t_interp = tail_log_partition_at(beta, grid_b, grid, log_r, h_tail, 400 - k)
    a_exact = torch.logsumexp(beta[:, None] * logp, -1)
    a_interp = torch.logaddexp(torch.logsumexp(beta[:, None] * lp, -1), t_interp)
    assert torch.allclose(a_interp, a_exact, atol=5e-3)
    got = kd_divergence("fkl", logits, ids, lp, t_interp, beta, t, 400)
    want = kd_divergence("fkl", logits, ids, lp, tail, beta, t, 400)
    assert torch.allclose(got, want, atol=5e-3)
