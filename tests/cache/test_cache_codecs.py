"""Format 3's value codecs and row codec: round trips within their stated bounds, against float64 truth.

    .venv/bin/python -m pytest tests/cache/test_cache_codecs.py -q
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.cache.codecs import GapCode, LogCode, SplitCode, TargetCode, UnitCode
from pipeline.cache.schema import PRESETS, CodecParams, RowCodec
from pipeline.teacher.stats import distribution_stats

RNG = np.random.default_rng(0)


def test_log_code_round_trip_clamp_and_minus_inf():
    c = LogCode(2.0**-8)
    x = -RNG.uniform(0, 200, 10_000)
    got = c.decode(c.encode(x))
    assert np.abs(got - x).max() <= c.step / 2 + 1e-12
    assert c.decode(c.encode(np.array([-np.inf, 0.0, -1e9])))[0] == -np.inf
    assert c.decode(c.encode(np.array([-1e9])))[0] == pytest.approx(c.min_value)
    reserved = LogCode(0.01, reserved=7)
    assert int(reserved.encode(np.array([-1e9]))[0]) == 65535 - 1 - 7


def test_split_code_keeps_both_masses_relative():
    c = SplitCode()
    # log r across confident (r -> 0), balanced and near-uniform (r -> 1) rows
    log_r = np.concatenate([-RNG.uniform(1e-9, 1e-3, 2000), -RNG.uniform(1e-3, 40, 5000), -RNG.uniform(40, 80, 2000),
                            [np.log1p(-1e-6), -1e-12]])
    dec_r, dec_head = c.decode(c.encode(log_r))
    r = np.exp(log_r)
    logit = log_r - np.log(-np.expm1(log_r))
    fine = (logit >= c.mid) & (logit <= c.hi)
    coarse = (logit < c.mid) & (logit >= c.lo)
    # d log r = (1 - r) dl and d log(1 - r) = -r dl: both masses to a relative step/2, in either region
    assert np.all(np.abs(dec_r - log_r)[fine] <= (1 - r[fine]) * c.fine / 2 + 1e-12)
    assert np.all(np.abs(dec_head - np.log1p(-r))[fine] <= r[fine] * c.fine / 2 + 1e-12)
    assert np.all(np.abs(dec_r - log_r)[coarse] <= c.coarse / 2 + 1e-12)
    # beyond hi (1 - r below e^-14) the logit clamps: log r stays within 1e-6 (r ~ 1), log(1 - r) does not
    beyond = logit > c.hi
    assert np.all(np.abs(dec_r - log_r)[beyond] < 1e-6)
    assert c.decode(c.encode(np.array([-np.inf]))) == (-np.inf, 0.0)
    # codes are monotone in r: a larger tail never decodes smaller
    order = np.argsort(log_r)
    assert np.all(np.diff(c.decode(c.encode(log_r[order]))[0]) >= 0)


def test_gap_code_each_gap_within_half_a_step_and_sorted():
    c = GapCode(0.02)
    gaps = np.sort(RNG.exponential(2.0, (1000, 15)), axis=1)
    codes = c.encode(gaps)
    assert codes.dtype == np.uint16
    dec = c.decode(codes)
    assert np.abs(dec - gaps).max() <= c.step / 2 + 1e-9
    assert np.all(np.diff(dec, axis=1) >= 0)
    # float noise that un-sorts a head by 1e-9 is absorbed, and +inf (p = 0) clamps to the largest code
    bumped = c.decode(c.encode(np.array([[0.5, 0.5 - 1e-9, np.inf]])))
    assert bumped[0, 1] >= bumped[0, 0] and bumped[0, 2] == pytest.approx(65535 * c.step)


@pytest.mark.parametrize("bits", [1, 4, 8, 12, 16])
def test_unit_code(bits):
    c = UnitCode(bits)
    u = RNG.uniform(0, 1, 5000)
    assert np.abs(c.decode(c.encode(u)) - u).max() <= 0.5 / ((1 << bits) - 1) + 1e-12
    assert c.dtype == (np.uint8 if bits <= 8 else np.uint16)
    assert c.decode(c.encode(np.array([-0.5, 1.5, np.nan]))).tolist() == [0.0, 1.0, 0.0]


def test_target_code_rank_or_logprob():
    c = TargetCode(8, 2.0**-8)
    rank = np.array([0, 7, -1, -1, -1])
    lp = np.array([np.nan, np.nan, -3.3, -200.0, -np.inf])
    dec_rank, dec_lp = c.decode(c.encode(rank, lp))
    assert dec_rank.tolist() == [0, 7, -1, -1, -1]
    assert np.isnan(dec_lp[:2]).all()
    assert abs(dec_lp[2] + 3.3) <= c.log.step / 2 and dec_lp[4] == -np.inf
    assert abs(dec_lp[3] + 200.0) <= c.log.step / 2


# ---- the row codec on adversarial rows, against float64 full-softmax truth ------------------------
def adversarial_logits(v: int, seed: int = 0) -> torch.Tensor:
    """[R, V] float64 logits: confident (p_1 -> 1, r down to ~e^-60), near-uniform, tiny tails (r < 1e-8),
    Zipf-like, and ordinary Gaussian rows."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for boost in (8.0, 20.0, 40.0, 70.0):  # confident: r ~ V e^-boost
        z = torch.randn(v, generator=g, dtype=torch.float64)
        z[int(torch.randint(v, (1,), generator=g))] += boost
        rows.append(z)
    rows.append(torch.zeros(v, dtype=torch.float64))  # exactly uniform
    rows.append(1e-3 * torch.randn(v, generator=g, dtype=torch.float64))  # near-uniform
    ranks = torch.arange(1, v + 1, dtype=torch.float64)
    rows.append(-1.3 * ranks.log()[torch.randperm(v, generator=g)])  # Zipf
    for scale in (1.0, 3.0, 6.0):
        rows.append(scale * torch.randn(v, generator=g, dtype=torch.float64))
    z = torch.randn(v, generator=g, dtype=torch.float64) - 30.0
    z[:8] = torch.linspace(0.0, -3.0, 8, dtype=torch.float64)  # a head of 8 and a tail < 1e-8 below it
    rows.append(z)
    return torch.stack(rows)


def truth(logits: torch.Tensor, k: int, temps) -> dict[str, np.ndarray]:
    logp = torch.log_softmax(logits, -1)
    srt, _ = logp.sort(-1, descending=True)
    rest = srt[:, k:]
    betas = torch.tensor([1.0 / t for t in temps], dtype=torch.float64)
    log_r = torch.logsumexp(rest, -1) if rest.shape[1] else torch.full((logits.shape[0],), -math.inf, dtype=torch.float64)
    return {"head": srt[:, :k].numpy(), "log_r": log_r.numpy(), "entropy": (-(logp.exp() * logp).sum(-1)).numpy(),
            "A": torch.logsumexp(betas[None, :, None] * logp[:, None, :], -1).numpy()}


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("v", [64, 5000])
def test_row_codec_against_float64(preset, v):
    temps = (0.5, 0.7, 1.4, 2.0)
    params = CodecParams(vocab_size=v, temperatures=temps, **PRESETS[preset])
    codec = RowCodec(params)
    logits = adversarial_logits(v)
    tgt = torch.randint(0, v, (logits.shape[0],), generator=torch.Generator().manual_seed(1))
    st = distribution_stats(logits.float(), tgt, params.top_k, torch.tensor(params.betas, dtype=torch.float32))
    rows = codec.decode(codec.encode({n: t.numpy() for n, t in st.items()}, tgt.numpy()))
    want = truth(logits, params.top_k, temps)
    head = rows["topk_logprobs"].astype(np.float64)
    log_r = rows["tail_logprob"].astype(np.float64)
    # buckets sum to one on every row (float32 output)
    assert np.abs(np.logaddexp(np.logaddexp.reduce(head, axis=1), log_r)).max() < 1e-6
    assert np.isfinite(log_r).all() and (log_r < 0).all()  # every row has a tail, however confident
    assert np.abs(head - want["head"]).max() <= params.head_step + params.tail_step + 2e-5
    fine = want["log_r"] - np.log(-np.expm1(want["log_r"])) >= -40
    assert np.abs(log_r - want["log_r"])[fine].max() < 1e-3
    assert np.abs(log_r - want["log_r"]).max() < 2.1e-3
    assert np.abs(rows["entropy"] - want["entropy"]).max() < 2 * params.head_step * (1 + want["entropy"].max())
    assert np.abs(rows["log_partition"] - want["A"]).max() < 0.01
    # decoding a subset of fields gives the same values
    part = codec.decode(codec.encode({n: t.numpy() for n, t in st.items()}, tgt.numpy()), ("tail_logprob", "entropy"))
    assert set(part) == {"tail_logprob", "entropy"}
    assert np.array_equal(part["entropy"], rows["entropy"]) and np.array_equal(part["tail_logprob"], rows["tail_logprob"])


def test_k_equals_v_rows_have_no_tail():
    v = 16
    params = CodecParams(vocab_size=v, temperatures=(0.5, 2.0), top_k=v)
    codec = RowCodec(params)
    logits = adversarial_logits(v)
    tgt = torch.zeros(logits.shape[0], dtype=torch.int64)
    st = distribution_stats(logits.float(), tgt, v, torch.tensor(params.betas, dtype=torch.float32))
    rows = codec.decode(codec.encode({n: t.numpy() for n, t in st.items()}, tgt.numpy()))
    assert np.isneginf(rows["tail_logprob"]).all() and np.isneginf(rows["tail_log_partition"]).all()
    assert np.abs(np.logaddexp.reduce(rows["topk_logprobs"].astype(np.float64), axis=1)).max() < 1e-6
    want = truth(logits, v, (0.5, 2.0))
    assert np.abs(rows["log_partition"] - want["A"]).max() < 2 * params.head_step


@pytest.mark.parametrize("k", [1, 2, 8, 32])
def test_decoded_head_is_the_normalised_gap_code(k):
    """RowCodec._head (written out for speed) against its definition: log p_i = log(1 - r) - d_i minus the
    logsumexp of -d over the head, with d = GapCode.decode and d_1 = 0, in float64."""
    c = RowCodec(CodecParams(top_k=k, vocab_size=1000, temperatures=(1.0,), head_step=0.02))
    codes = RNG.integers(0, 300, size=(500, k - 1)).astype(np.uint16) if k > 1 else None
    log_head = -RNG.exponential(1.0, 500)
    rel = np.zeros((500, k))
    if k > 1:
        rel[:, 1:] = -GapCode(0.02).decode(codes)
    want = rel + (log_head - np.log(np.exp(rel).sum(1)))[:, None]
    got = c._head(codes, log_head)
    assert got.shape == (500, k) and np.abs(got - want).max() < 1e-12


def test_draw_log_probs_round_trip_and_caches_without_them():
    """tail_shares: log π_j = log p_j − log r of each draw as a LogCode of step draw_step (pads: its -inf code);
    decoded as tail_logprobs = log r + log π_j within draw_step/2 + the split code's error. A cache whose codec
    record has no draw_step (written before draws had log-probs) has no such array, reads as before, and refuses
    the field with one line; a cache without draws records no draw_step, so its record is unchanged."""
    from pipeline.errors import KdError

    v, k, s = 300, 8, 6
    z = adversarial_logits(v)
    tgt = torch.zeros(z.shape[0], dtype=torch.int64)
    p = CodecParams(top_k=k, vocab_size=v, temperatures=(0.5, 2.0), tail_samples=s)
    st = distribution_stats(z, tgt, k, torch.tensor(p.betas, dtype=torch.float32), s, torch.Generator().manual_seed(0))
    stats = {n: x.numpy() for n, x in st.items()}
    codec = RowCodec(p)
    raw = codec.encode(stats, tgt.numpy())
    assert raw["tail_shares"].dtype == np.uint16 and raw["tail_shares"].shape == (z.shape[0], s)
    pad = stats["tail_ids"] < 0
    assert np.all(raw["tail_shares"][pad] == LogCode.NEG_INF_CODE)
    dec = codec.decode(raw)
    logp = torch.log_softmax(z.double(), -1).numpy()
    want = np.take_along_axis(logp, np.where(pad, 0, stats["tail_ids"]), 1)
    assert np.all(np.isneginf(dec["tail_logprobs"][pad]))
    assert np.abs(dec["tail_logprobs"][~pad] - want[~pad]).max() <= p.draw_step / 2 + 2e-3
    # the share itself (what weighs a draw) to draw_step/2 + float32 rounding
    share = dec["tail_logprobs"] - dec["tail_logprob"][:, None]
    assert np.abs(share[~pad] - stats["tail_logshares"][~pad]).max() <= p.draw_step / 2 + 1e-5
    # an older cache: its codec record lacks draw_step
    meta = p.to_meta()
    assert meta["draw_step"] == p.draw_step
    old = CodecParams.from_meta({n: x for n, x in meta.items() if n != "draw_step"})
    assert old.tail_samples == s and not old.draw_logprobs
    old_codec = RowCodec(old)
    old_raw = old_codec.encode(stats, tgt.numpy())
    assert "tail_shares" not in old_raw and set(old_raw) == set(raw) - {"tail_shares"}
    old_dec = old_codec.decode(old_raw)
    assert "tail_logprobs" not in old_dec and np.array_equal(old_dec["tail_ids"], dec["tail_ids"])
    with pytest.raises(KdError, match="carry no log-probs") as e:
        old_codec.decode(old_raw, ("tail_logprobs",))
    assert "\n" not in str(e.value)
    assert "draw_step" not in CodecParams(top_k=k, vocab_size=v, temperatures=(0.5, 2.0)).to_meta()
