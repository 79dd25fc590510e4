"""Tests for pipeline.losses.gate (SpecKD propose-and-verify) on small hand-computed cases."""

import math

import pytest
import torch

from pipeline.losses.gate import GateResult, propose, speckd_gate, teacher_prob_of, token_acceptance_rate

V = 5  # teacher vocabulary; the student has Vs = 6 (id 5 is padding)


def _case():
    logits = torch.tensor(
        [
            [0.0, 3.0, 0.0, 1.0, 0.0, 0.0],  # greedy 1: in the top-K
            [1.0, 0.0, 0.0, 0.0, 2.0, 0.0],  # greedy 4: outside the top-K
            [0.0, 0.0, 0.0, 0.0, 0.0, 5.0],  # greedy 5: a padded id (>= V)
        ]
    )
    p = torch.tensor([[0.1, 0.6, 0.05, 0.2], [0.5, 0.1, 0.3, 0.05], [0.7, 0.1, 0.1, 0.05]])
    ids = torch.tensor([[3, 1], [0, 2], [0, 1]])
    lp = torch.stack([p[0, [3, 1]], p[1, [0, 2]], p[2, [0, 1]]]).log()  # [[0.2, 0.6], [0.5, 0.3], [0.7, 0.1]]
    return logits, ids, lp


def _tail(lp):
    """The cached tail mass log r = log(1 - sum of the head) of these hand-built rows."""
    return torch.log1p(-lp.exp().sum(-1))


def test_propose_greedy_and_seeded_sample():
    logits, _, _ = _case()
    assert propose(logits).tolist() == [1, 4, 5]
    a = propose(logits, "sample", torch.Generator().manual_seed(0))
    b = propose(logits, "sample", torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.dtype == torch.int64
    one_hot = torch.tensor([[0.0, -math.inf, -math.inf], [-math.inf, -math.inf, 0.0]])
    assert propose(one_hot, "sample", torch.Generator().manual_seed(1)).tolist() == [0, 2]
    with pytest.raises(ValueError, match="proposal mode"):
        propose(logits, "beam")


def test_sampled_proposal_follows_the_student_distribution():
    """Frequencies of 200,000 seeded draws against softmax(logits) in float64 (chi-square; every live id's
    expected count >= 24), on a confident row, a near-uniform row and a row with zero-probability ids (never
    drawn)."""
    v = 6
    rows = torch.tensor([[6.0, 0.0, -1.0, 2.0, 0.5, -3.0],
                         [0.01, 0.0, -0.01, 0.02, 0.0, 0.01],
                         [1.0, -math.inf, 0.0, -math.inf, 2.0, -0.5]])
    n = 200_000
    draws = propose(rows.repeat_interleave(n, 0), "sample", torch.Generator().manual_seed(3)).view(3, n)
    p = torch.softmax(rows.double(), -1)
    for i in range(3):
        counts = torch.bincount(draws[i], minlength=v).double()
        expected = p[i] * n
        assert counts[expected == 0].sum() == 0
        live = expected > 0
        chi2 = float(((counts[live] - expected[live]) ** 2 / expected[live]).sum())
        # 99.9% point of chi-square with <= 5 degrees of freedom is 20.5: fails only on a wrong sampler.
        assert chi2 < 20.5, (i, chi2, counts.tolist(), expected.tolist())


def test_teacher_prob_of_head_tail_and_padded_id():
    _, ids, lp = _case()
    p = teacher_prob_of(torch.tensor([1, 4, 5]), ids, lp, _tail(lp), V)
    assert p[0].item() == pytest.approx(0.6)
    assert p[1].item() == pytest.approx((1 - 0.8) / (V - 2))  # tail spread evenly: r/(V-K)
    assert p[2].item() == 0.0  # id 5 >= V: a padded id the teacher cannot emit
    # r comes from the cache, not from 1 - sum(head): a head that (rounded) sums above 1 keeps its r.
    over = teacher_prob_of(torch.tensor([4]), ids[:1], torch.log(torch.tensor([[0.7, 0.4]])),
                           torch.tensor([math.log(0.03)]), V)
    assert over.item() == pytest.approx(0.03 / (V - 2))
    full = teacher_prob_of(torch.tensor([2]), torch.tensor([[1, 0]]), torch.log(torch.tensor([[0.6, 0.4]])),
                           torch.tensor([-math.inf]), 2)
    assert full.item() == 0.0  # V == K: no tail (id 2 is a padded student id)


def test_topk_rule_accept_reject_and_gate_k():
    logits, ids, lp = _case()
    res = speckd_gate(logits, ids, lp, _tail(lp), V, rule="topk")
    assert isinstance(res, GateResult)
    assert res.accepted.tolist() == [True, False, False]
    assert res.weight.tolist() == [1.0, 0.0, 0.0] and res.weight.dtype == torch.float32
    assert res.proposal.tolist() == [1, 4, 5]
    # gate_k = 1: row 0's proposal (id 1) is the teacher's 2nd id, so it is rejected.
    assert speckd_gate(logits, ids, lp, _tail(lp), V, rule="topk", gate_k=1).accepted.tolist() == [False, False, False]
    res = speckd_gate(logits, ids, lp, _tail(lp), V, rule="topk", reject_weight=0.25)
    assert res.weight.tolist() == [1.0, 0.25, 0.25]
    with pytest.raises(ValueError, match="gate_k"):
        speckd_gate(logits, ids, lp, _tail(lp), V, rule="topk", gate_k=3)


def test_threshold_rule():
    logits, ids, lp = _case()
    # p(ŷ) = 0.6, 0.2/3, and 0 for row 2's padded proposal (id 5 >= V): no threshold accepts it
    def accepted(tau):
        return speckd_gate(logits, ids, lp, _tail(lp), V, rule="threshold", threshold=tau).accepted.tolist()

    assert accepted(0.5) == [True, False, False]
    assert accepted(0.06) == [True, True, False]
    assert accepted(1e-30) == [True, True, False]
    assert accepted(0.6) == [True, False, False]  # p >= τ: equality accepts
    with pytest.raises(ValueError, match="threshold"):
        speckd_gate(logits, ids, lp, _tail(lp), V, rule="threshold")


def test_spec_rule_reproduces_hand_calculation():
    logits, ids, lp = _case()
    q = torch.softmax(logits, -1)[torch.arange(3), torch.tensor([1, 4, 5])]
    p = torch.tensor([0.6, 0.2 / 3, 0.2 / 3])
    seed = 1234
    u = torch.rand(3, generator=torch.Generator().manual_seed(seed))
    want = [float(u[i]) < min(1.0, float(p[i] / q[i])) for i in range(3)]
    res = speckd_gate(logits, ids, lp, _tail(lp), V, rule="spec", generator=torch.Generator().manual_seed(seed))
    assert res.accepted.tolist() == want
    # Row 0: q(1) = e^3 / (e^3 + e + 4) = 0.7466 > p = 0.6, so acceptance needs u < 0.8036.
    assert float(p[0] / q[0]) == pytest.approx(0.6 * (math.exp(3) + math.e + 4) / math.exp(3), rel=1e-6)
    # p/q >= 1 always accepts; p = 0 never does.
    half = torch.log(torch.tensor([[0.5, 0.5], [0.5, 0.5]]))
    g = torch.Generator().manual_seed(0)
    always = speckd_gate(torch.zeros(2, 4), torch.tensor([[0, 1], [2, 3]]), half, torch.full((2,), -math.inf), 4,
                         rule="spec", generator=g)
    assert always.accepted.tolist() == [True, False]  # row 1: ŷ = 0 is in the tail, r = 0


def test_spec_rule_with_sampled_proposal_is_seeded():
    logits, ids, lp = _case()
    kw = dict(rule="spec", proposal="sample")
    a = speckd_gate(logits, ids, lp, _tail(lp), V, generator=torch.Generator().manual_seed(7), **kw)
    b = speckd_gate(logits, ids, lp, _tail(lp), V, generator=torch.Generator().manual_seed(7), **kw)
    assert torch.equal(a.accepted, b.accepted) and torch.equal(a.proposal, b.proposal)
    # Order of draws: N proposals first, then N uniforms.
    g = torch.Generator().manual_seed(7)
    y = a.proposal
    torch.rand(3, generator=g, dtype=torch.float64)  # the proposals' draws come first
    u = torch.rand(3, generator=g)
    # p(ŷ) by hand from the rows of _case (head value, else r / (V - K), 0 for a padded id)
    head = {0: {3: 0.2, 1: 0.6}, 1: {0: 0.5, 2: 0.3}, 2: {0: 0.7, 1: 0.1}}
    p = torch.tensor([head[i].get(int(y[i]), 0.2 / (V - 2) if int(y[i]) < V else 0.0) for i in range(3)])
    q = torch.softmax(logits, -1).gather(1, y[:, None]).squeeze(1)
    assert torch.equal(a.proposal, y)
    assert a.accepted.tolist() == (u < (p / q).clamp(max=1)).tolist()


def test_unknown_rule_and_bfloat16_logits():
    logits, ids, lp = _case()
    with pytest.raises(ValueError, match="gate rule"):
        speckd_gate(logits, ids, lp, _tail(lp), V, rule="oracle")
    g = torch.Generator().manual_seed(0)
    res = speckd_gate(logits.bfloat16(), ids, lp.bfloat16(), _tail(lp).bfloat16(), V, rule="spec", generator=g)
    assert res.accepted.dtype == torch.bool and res.weight.dtype == torch.float32


def test_empty_batch():
    res = speckd_gate(torch.zeros(0, 6), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2), torch.zeros(0), V,
                      rule="spec",
                      proposal="sample", generator=torch.Generator().manual_seed(0))
    assert res.accepted.shape == res.weight.shape == res.proposal.shape == (0,)


def test_token_acceptance_rate():
    acc = torch.tensor([True, False, True, True])
    mask = torch.tensor([True, True, True, False])
    assert token_acceptance_rate(acc, mask) == pytest.approx(2 / 3)
    assert token_acceptance_rate(acc) == pytest.approx(3 / 4)
    assert token_acceptance_rate(acc, torch.zeros(4, dtype=torch.bool)) == 0.0


def test_sampled_proposal_does_not_depend_on_its_block_size(monkeypatch):
    """The CDF is built a block of rows at a time (bounded memory at a large vocabulary); the uniforms are all
    drawn first, so the draws are the same whatever the block."""
    import pipeline.losses.gate as gate

    logits = torch.randn(37, 11, generator=torch.Generator().manual_seed(4))
    whole = propose(logits, "sample", torch.Generator().manual_seed(9))
    monkeypatch.setattr(gate, "_CDF_ELEMENTS", 11 * 4)  # 4 rows per block, the last one partial
    assert torch.equal(propose(logits, "sample", torch.Generator().manual_seed(9)), whole)
