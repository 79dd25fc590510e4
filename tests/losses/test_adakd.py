"""Tests for pipeline.losses.adakd: LATF schedule and selection, IDTS temperatures, by hand."""

import json
import math

import pytest
import torch

from pipeline.losses.adakd import LATF, idts_temperatures


def test_latf_hand_sequence():
    latf = LATF(total_steps=40, ema_decay=0.5)  # warm-up: ceil(0.05·40) = 2 updates
    assert latf.warmup_steps == 2 and latf.ratio == 1.0 and latf.ema is None and latf.ref is None
    expected = [
        # loss, ema, ref, ratio
        (10.0, 10.0, None, 1.0),  # first value initialises the EMA
        (10.0, 10.0, 10.0, 1.0),  # end of warm-up: ref = EMA, r unchanged
        (8.0, 9.0, 9.0, 0.95),  # 9 < 10·0.95 = 9.5: narrow, ref = 9
        (8.0, 8.5, 8.5, 0.9025),  # 8.5 < 9·0.95 = 8.55: narrow again
        (8.5, 8.5, 8.5, 0.9025),  # within ±5 %: unchanged
        (12.0, 10.25, 10.25, 0.9025 * 1.05),  # 10.25 > 8.5·1.05 = 8.925: widen
        (20.0, 15.125, 15.125, 0.9025 * 1.05 * 1.05),
        (40.0, 27.5625, 27.5625, 1.0),  # clamped at 1.0
    ]
    for loss, ema, ref, ratio in expected:
        latf.update(loss)
        assert latf.ema == pytest.approx(ema)
        assert (latf.ref is None) if ref is None else latf.ref == pytest.approx(ref)
        assert latf.ratio == pytest.approx(ratio)


def test_latf_warmup_is_respected_and_default_decay():
    latf = LATF(total_steps=100)  # warm-up 5 updates, decay 0.99
    for loss in (10.0, 1.0, 1.0, 1.0):  # big drops during warm-up change nothing
        latf.update(loss)
        assert latf.ratio == 1.0 and latf.ref is None
    latf.update(1.0)
    ema = 10.0
    for _ in range(4):
        ema = 0.99 * ema + 0.01 * 1.0
    assert latf.ref == pytest.approx(ema) and latf.ratio == 1.0
    assert LATF(total_steps=3).warmup_steps == 1  # ceil(0.15) = 1
    assert LATF(total_steps=10, warmup_fraction=0.0).warmup_steps == 1


def test_latf_clamps_at_min_ratio():
    latf = LATF(total_steps=20, ema_decay=0.0)  # EMA = last loss
    latf.update(1.0)  # warm-up ends at step 1 (ceil(1.0) = 1): ref = 1
    loss = 1.0
    for n in range(1, 60):
        loss *= 0.5
        latf.update(loss)
        assert latf.ratio == pytest.approx(max(0.95**n, 0.1))
    assert latf.ratio == 0.1


def test_latf_select_keeps_hardest_with_ties_by_index():
    d = torch.tensor([0.1, 0.5, 0.5, 0.9, 0.3, 0.7])
    eligible = torch.tensor([True, True, True, False, True, True])
    latf = LATF(total_steps=10, initial_ratio=0.5)  # ceil(0.5·5) = 3
    assert latf.select(d, eligible).tolist() == [False, True, True, False, False, True]
    latf = LATF(total_steps=10, initial_ratio=0.3)  # ceil(1.5) = 2: the tie at 0.5 keeps index 1
    assert latf.select(d, eligible).tolist() == [False, True, False, False, False, True]
    latf = LATF(total_steps=10)
    assert latf.select(d, eligible).tolist() == eligible.tolist()
    assert latf.select(d, torch.zeros(6, dtype=torch.bool)).tolist() == [False] * 6
    assert latf.select(torch.zeros(0), torch.zeros(0, dtype=torch.bool)).shape == (0,)


def test_latf_select_count_is_robust_to_round_off():
    r = 0.1 * 3  # 0.30000000000000004
    latf = LATF(total_steps=10, initial_ratio=r)
    assert r * 10 > 3  # 3.0000000000000004: a naive ceil would keep 4
    keep = latf.select(torch.arange(10.0), torch.ones(10, dtype=torch.bool))
    assert keep.sum() == 3 and keep[7:].all()
    latf = LATF(total_steps=10, min_ratio=0.1, initial_ratio=0.1)
    assert latf.select(torch.rand(7), torch.ones(7, dtype=torch.bool)).sum() == 1  # ceil(0.7) = 1


def test_latf_state_dict_round_trip_resumes_exactly():
    losses = [5.0, 4.0, 3.0, 3.5, 2.0, 6.0, 1.0, 1.2, 0.8, 5.0, 0.5]
    a = LATF(total_steps=40, ema_decay=0.7)
    for x in losses[:5]:
        a.update(x)
    state = json.loads(json.dumps(a.state_dict()))
    b = LATF(total_steps=40, ema_decay=0.7)
    b.load_state_dict(state)
    for x in losses[5:]:
        a.update(x)
        b.update(x)
        assert (a.ratio, a.ema, a.ref, a.step) == (b.ratio, b.ema, b.ref, b.step)
    fresh = LATF(total_steps=40)
    fresh.load_state_dict(json.loads(json.dumps(LATF(total_steps=40).state_dict())))
    assert fresh.ema is None and fresh.ref is None and fresh.ratio == 1.0


def test_latf_rejects_bad_arguments():
    with pytest.raises(ValueError, match="total_steps"):
        LATF(total_steps=0)
    with pytest.raises(ValueError, match="min_ratio"):
        LATF(total_steps=10, initial_ratio=0.05)
    with pytest.raises(ValueError, match="non-finite"):
        LATF(total_steps=10).update(float("nan"))
    with pytest.raises(ValueError, match="missing"):
        LATF(total_steps=10).load_state_dict({"ratio": 0.5})


def _idts(s, m, t_base=1.0, c=0.5):
    return t_base * math.exp(-c * math.tanh(math.log(s / m))) if s > 0 else t_base * math.exp(c)


def test_idts_even_count_median_by_hand():
    d = torch.tensor([0.2, 0.4, 0.0, 0.8, 0.6, 1.0])
    sel = torch.tensor([True, True, True, True, False, False])
    t = idts_temperatures(d, sel)
    m = 0.3  # selected 0, 0.2, 0.4, 0.8: mean of the two middle values
    want = [_idts(0.2, m), _idts(0.4, m), math.exp(0.5), _idts(0.8, m), 1.0, 1.0]
    assert t.tolist() == pytest.approx(want, rel=1e-6)
    assert t[2].item() == pytest.approx(math.exp(0.5), rel=1e-6)  # s = 0: tanh(-inf) = -1
    assert t.dtype == torch.float32 and not t.requires_grad


def test_idts_odd_count_t_base_and_range():
    d = torch.tensor([0.1, 0.3, 0.9], requires_grad=True)
    t = idts_temperatures(d, torch.ones(3, dtype=torch.bool), t_base=2.0, c=0.5)
    assert t.tolist() == pytest.approx([_idts(0.1, 0.3, 2.0), 2.0, _idts(0.9, 0.3, 2.0)], rel=1e-6)
    assert not t.requires_grad
    # Every value against the formula written out per element, with the median from the statistics module
    # (1000 values: an even count, so the mean of the two middle ones), over a subset selection.
    import statistics

    s = torch.rand(1000, generator=torch.Generator().manual_seed(0))
    sel = torch.rand(1000, generator=torch.Generator().manual_seed(1)) < 0.7
    t = idts_temperatures(s, sel, t_base=1.3, c=0.4)
    m = statistics.median(s[sel].tolist())
    want = [_idts(x, m, 1.3, 0.4) if keep else 1.3 for x, keep in zip(s.tolist(), sel.tolist())]
    assert t.tolist() == pytest.approx(want, rel=1e-5)
    order = torch.argsort(s[sel])
    assert (t[sel][order].diff() <= 1e-7).all()  # harder -> lower temperature, monotonically


def test_idts_zero_median_and_nothing_selected():
    d = torch.tensor([0.0, 0.0, 0.5])
    assert idts_temperatures(d, torch.ones(3, dtype=torch.bool)).tolist() == [1.0, 1.0, 1.0]
    assert idts_temperatures(d, torch.zeros(3, dtype=torch.bool), t_base=1.5).tolist() == [1.5, 1.5, 1.5]
    assert idts_temperatures(torch.zeros(0), torch.zeros(0, dtype=torch.bool)).shape == (0,)
