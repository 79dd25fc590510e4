"""SE-KD position selection (pipeline/losses/selection.py) against dense float64 references: the student's
entropy, the per-sequence top-fraction rule (ties, round-off, gate eligibility), and the KD loss it selects
in both the full-logits and the chunked objective.

    .venv/bin/python -m pytest tests/losses/test_selection.py -q
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.losses.chunked import chunked_loss, plan_rows
from pipeline.losses.gate import speckd_gate
from pipeline.losses.objective import kd_terms
from pipeline.losses.options import KdOptions
from pipeline.losses.selection import select_top_entropy, student_entropy
from tests.losses.test_chunked_loss import make_case


def dense_entropy(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    logq = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    q = np.exp(logq)
    return -(q * np.where(q > 0, logq, 0.0)).sum(axis=1)


def reference_keep(entropy, eligible, groups, ratio):
    """Per group, in plain Python: sort eligible rows by (-entropy, index), keep the first ceil(ratio*n)."""
    keep = [False] * len(entropy)
    for g in sorted(set(groups)):
        rows = [i for i in range(len(entropy)) if groups[i] == g and eligible[i]]
        quota = max(1, math.ceil(len(rows) * ratio - 1e-9)) if rows else 0
        for i in sorted(rows, key=lambda i: (-entropy[i], i))[:quota]:
            keep[i] = True
    return keep


@pytest.mark.parametrize("vocab", [2, 50, 4099])
def test_student_entropy_matches_float64(vocab):
    g = torch.Generator().manual_seed(vocab)
    logits = 4.0 * torch.randn(64, vocab, generator=g)
    logits[0] = 0.0  # uniform: log V
    logits[1, 0] = 80.0  # confident: ~0, and no NaN from 0 * log 0
    logits[2] = -1e4  # huge negative logits, uniform again
    got = student_entropy(logits).double().numpy()
    want = dense_entropy(logits.numpy())
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    assert got[0] == pytest.approx(math.log(vocab), rel=1e-5) and abs(got[1]) < 1e-5


@pytest.mark.parametrize("ratio", [0.2, 0.3, 0.5, 1.0, 0.05])
@pytest.mark.parametrize("seed", range(4))
def test_selection_per_sequence_matches_reference(ratio, seed):
    rng = np.random.default_rng(seed)
    n = 97
    groups = np.sort(rng.integers(0, 7, n))  # rows of a micro-batch come sequence by sequence
    rng.shuffle(groups) if seed % 2 else None  # ... but the rule must not depend on it
    entropy = np.round(rng.random(n) * 4, 1)  # rounded: many exact ties, broken by row index
    eligible = rng.random(n) > 0.25
    keep = select_top_entropy(torch.tensor(entropy, dtype=torch.float32), torch.tensor(eligible),
                              torch.tensor(groups), ratio)
    assert keep.tolist() == reference_keep(entropy.astype(np.float32).tolist(), eligible.tolist(),
                                           groups.tolist(), ratio)


def test_selection_counts_by_hand():
    # one sequence of 10 eligible rows at ratio 0.3: (0.1*3)*10 rounds to 3.0000000000000004 -> still 3 kept
    ent = torch.tensor([0.5, 2.0, 2.0, 0.1, 3.0, 0.2, 2.0, 0.0, 0.3, 0.4])
    keep = select_top_entropy(ent, torch.ones(10, dtype=torch.bool), None, 0.1 * 3)
    assert keep.nonzero().squeeze(1).tolist() == [1, 2, 4]  # 3.0, then the tie 2.0 at rows 1, 2 before row 6
    # a sequence whose only eligible row has the lowest entropy still gets it (at least one per sequence)
    elig = torch.tensor([False, False, False, True, False, False, False, False, False, False])
    assert select_top_entropy(ent, elig, None, 0.2).nonzero().squeeze(1).tolist() == [3]
    # nothing eligible -> nothing kept; empty input -> empty
    assert not select_top_entropy(ent, torch.zeros(10, dtype=torch.bool), None, 0.2).any()
    assert select_top_entropy(ent[:0], torch.zeros(0, dtype=torch.bool), None, 0.2).numel() == 0
    with pytest.raises(ValueError):
        select_top_entropy(ent, torch.ones(10, dtype=torch.bool), None, 0.0)


def dense_fkl(teacher_logits: np.ndarray, student_logits: np.ndarray, topk_ids: np.ndarray) -> np.ndarray:
    """KL(p || q) on the K + 1 buckets in float64 from the FULL teacher distribution (not the cache)."""
    v = teacher_logits.shape[1]
    lp = teacher_logits - np.log(np.exp(teacher_logits - teacher_logits.max(1, keepdims=True)).sum(1, keepdims=True)) \
        - teacher_logits.max(1, keepdims=True)
    zs = student_logits[:, :v].astype(np.float64)
    lq = zs - zs.max(1, keepdims=True)
    lq = lq - np.log(np.exp(lq).sum(1, keepdims=True))
    out = []
    for i in range(teacher_logits.shape[0]):
        p_head, q_head = np.exp(lp[i, topk_ids[i]]), np.exp(lq[i, topk_ids[i]])
        p = np.append(p_head, 1.0 - p_head.sum())
        q = np.append(q_head, 1.0 - q_head.sum())
        out.append(float((p * (np.log(p) - np.log(q))).sum()))
    return np.array(out)


def test_selected_kd_loss_equals_dense_reference_full_and_chunked():
    hidden, head, targets, cache, grid, v, teacher = make_case(n=40, seed=11, with_teacher=True)
    groups = torch.tensor([0] * 9 + [1] * 14 + [2] * 3 + [3] * 14)
    s = KdOptions(loss="fkl", select="student_entropy", select_ratio=0.2)
    logits = head.logits(hidden, fp32=False)
    # the reference: entropy and selection in float64 / plain Python, FKL from the full teacher in float64
    ent = dense_entropy(logits.detach().numpy())
    keep = reference_keep(ent.tolist(), [True] * 40, groups.tolist(), 0.2)
    assert sum(keep) == 2 + 3 + 1 + 3
    rows = [i for i in range(40) if keep[i]]
    want = dense_fkl(teacher.numpy().astype(np.float64), logits.detach().numpy(), cache["topk_ids"].numpy())[rows]

    terms = kd_terms(logits, cache, s, v, grid, None, None, groups=groups)
    assert terms.kept == len(rows) and terms.denominator == len(rows)
    # the cache stores the head to 0.04-nat steps and the tail mass to ~2^-10 in logit: loss within 1e-2 rel
    assert float(terms.numerator.detach()) / terms.denominator == pytest.approx(want.mean(), rel=1e-2)

    plan = plan_rows(hidden.detach(), head, targets, cache, s, v, grid, None, None, 7, groups=groups)
    assert plan.keep.nonzero().squeeze(1).tolist() == rows
    _, _, kd = chunked_loss(hidden, head, targets, cache, plan, s, v, 0.0, 1.0, chunk_rows=7)
    assert float(kd) == pytest.approx(float(terms.numerator.detach()), rel=1e-5)


def test_selection_composes_after_the_gate():
    hidden, head, targets, cache, grid, v = make_case(n=30, seed=5)
    groups = torch.tensor([0] * 15 + [1] * 15)
    logits = head.logits(hidden, fp32=False).detach()
    gated = kd_terms(logits, cache, KdOptions(gate="topk", gate_k=2), v, grid, None, None)
    both = kd_terms(logits, cache, KdOptions(gate="topk", gate_k=2, select="student_entropy", select_ratio=0.5),
                    v, grid, None, None, groups=groups)
    # among each sequence's accepted positions, half (rounded up) by entropy
    g = speckd_gate(logits, cache["topk_ids"], cache["topk_logprobs"].float(), cache["tail_logprob"].float(), v,
                    rule="topk", gate_k=2)
    n_acc = [int(g.accepted[:15].sum()), int(g.accepted[15:].sum())]
    assert gated.kept == sum(n_acc)
    assert both.kept == sum(math.ceil(n / 2) for n in n_acc if n)
