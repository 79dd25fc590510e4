"""The teacher's tail draws (pipeline/teacher/stats.py `draw_tail`, an inverse-CDF sampler): their distribution, the
log-probs stored with them, and their determinism (blocks, threads, head chunks, the compiled path's sampler).

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/teacher/test_tail_draws.py -q
"""

from __future__ import annotations

import math

import torch

from pipeline.head import HeadSpec
from pipeline.teacher.stats import distribution_stats, rows_from_hidden, sample_tail

BETAS = torch.tensor([2.0, 1 / 0.7, 1 / 1.4, 0.5])


def _chi2_quantile(df: int, z: float = 3.72) -> float:
    """The chi-square quantile at the normal quantile z (3.72: p = 1e-4), Wilson-Hilferty (no scipy here)."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def _rows() -> torch.Tensor:
    """Four teacher rows over V = 30: moderate, confident (tail ~e^-20), flat, and one with impossible ids."""
    g = torch.Generator().manual_seed(2)
    z = 2.0 * torch.randn(4, 30, generator=g)
    z[1, 3] += 25.0
    z[2] = 0.01 * torch.randn(30, generator=g)
    z[3, 10:20] = -math.inf
    return z


def test_draws_follow_the_tail_distribution():
    """60,000 copies of each row, S = 3 draws each: the per-id frequencies against S·n·π (float64 from the logits)
    by chi-square at p = 1e-4; head ids and ids of probability 0 are never drawn; counts sum to S; ids are distinct
    and ascending; the stored log π_j equals log(p_j / r) in float64 to float32 rounding."""
    z, k, s, n = _rows(), 4, 3, 60_000
    big = z.repeat_interleave(n, 0)
    tgt = torch.zeros(big.shape[0], dtype=torch.int64)
    out = distribution_stats(big, tgt, k, BETAS, tail_samples=s, generator=torch.Generator().manual_seed(7))
    ids, counts, shares = out["tail_ids"], out["tail_counts"], out["tail_logshares"]
    assert torch.all(counts.sum(-1) == s)
    live = ids >= 0
    assert torch.all((counts > 0) == live)
    assert torch.all(torch.where(live[:, 1:], ids[:, 1:] > ids[:, :-1], True))  # distinct, ascending, pads last
    assert torch.all(torch.where(live[:, 1:], live[:, :-1], True))
    logp = torch.log_softmax(z.double(), -1)
    for i in range(4):
        rows = slice(i * n, (i + 1) * n)
        top = out["topk_ids"][i * n]
        tail = torch.ones(30, dtype=torch.bool)
        tail[top] = False
        pi = torch.where(tail, logp[i].exp(), torch.zeros_like(logp[i]))
        pi = pi / pi.sum()
        freq = torch.zeros(30, dtype=torch.float64).index_add_(0, ids[rows][live[rows]],
                                                                counts[rows][live[rows]].double())
        expected = pi * s * n
        assert freq[expected == 0].sum() == 0  # the head and impossible ids
        bins = expected > 0
        chi2 = float(((freq[bins] - expected[bins]) ** 2 / expected[bins]).sum())
        assert chi2 < _chi2_quantile(int(bins.sum()) - 1), (i, chi2)
        want = (logp[i] - torch.log(pi.sum() * 0 + logp[i].exp()[tail].sum())).float()  # log p_j - log r
        got_ids = ids[rows][live[rows]]
        torch.testing.assert_close(shares[rows][live[rows]], want[got_ids], rtol=0, atol=2e-6)
        assert torch.all(torch.isneginf(shares[rows][~live[rows]]))


def test_rows_without_a_tail_get_no_draws():
    z = torch.full((2, 8), -math.inf)
    z[0, :3] = torch.tensor([1.0, 0.5, 0.2])  # the tail (ids 3..7) has probability 0
    z[1] = torch.randn(8, generator=torch.Generator().manual_seed(0))
    out = distribution_stats(z, torch.zeros(2, dtype=torch.int64), 3, BETAS, tail_samples=4,
                             generator=torch.Generator().manual_seed(1))
    assert out["tail_ids"][0].tolist() == [-1] * 4 and out["tail_counts"][0].sum() == 0
    assert out["tail_counts"][1].sum() == 4


def test_draws_do_not_depend_on_blocks_threads_head_chunks_or_the_compiled_path():
    """The uniforms are drawn first, in row order, from a CPU generator; each draw is a function of its row and its
    uniform. So the same seed gives the same draws with any block size, thread count or head chunking, and the
    compiled statistics' sampler (`sample_tail`, its own exp pass) gives the eager path's draws."""
    g = torch.Generator().manual_seed(0)
    z = 4 * torch.randn(37, 500, generator=g)
    z[0, 7] += 60.0
    t = torch.randint(0, 500, (37,), generator=g)
    names = ("tail_ids", "tail_counts", "tail_logshares")
    runs = [distribution_stats(z, t, 16, BETAS, tail_samples=5, generator=torch.Generator().manual_seed(1),
                               block_rows=b, threads=n) for b, n in ((5, 1), (5, 2), (37, 1), (3, 3))]
    for r in runs[1:]:
        assert all(torch.equal(r[k], runs[0][k]) for k in names)
    compiled_path = sample_tail(z, runs[0]["topk_ids"], 5, torch.Generator().manual_seed(1))
    for k in names:
        torch.testing.assert_close(compiled_path[k], runs[0][k], rtol=0, atol=1e-6)
    hidden = torch.randn(37, 12, generator=g)
    head = HeadSpec(weight=torch.randn(500, 12, generator=g), bias=None, vocab_size=500)
    chunks = [rows_from_hidden(hidden, t, head, 16, BETAS, c, 5, torch.Generator().manual_seed(3)) for c in (37, 7, 1)]
    for c in chunks[1:]:  # the head's product itself may round differently per chunk (gemv vs gemm): 1e-6
        assert torch.equal(c["tail_ids"], chunks[0]["tail_ids"]) and torch.equal(c["tail_counts"], chunks[0]["tail_counts"])
        torch.testing.assert_close(c["tail_logshares"], chunks[0]["tail_logshares"], rtol=0, atol=1e-5)
    other = distribution_stats(z, t, 16, BETAS, tail_samples=5, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(other["tail_ids"], runs[0]["tail_ids"])
