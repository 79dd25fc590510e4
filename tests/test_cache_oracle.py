"""Every cached quantity against a float64 full-softmax reference from the model's own forward pass.

    .venv/bin/python -m pytest tests/test_cache_oracle.py -q

The reference runs each example alone, unpadded, through `model(input_ids).logits` in float64
(the teacher pass batches with padding and applies the head itself to target rows only), and
computes methods.md §1 directly: log_softmax over the tokenizer's ids, top-K, entropy, A(beta) for
each grid temperature. Rows are compared in the cache's order: dataset order, then position order.
Tolerances are the format's promises: 0.02 nats on top-K log-probs, float16 rounding (2^-11
relative) on the scalars, plus float32 arithmetic (1e-5).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.cache import open_cache
from pipeline.prepare import load_prepared
from pipeline.teacher import TeacherConfig, run_teacher
from stages.cli import main

from conftest import save_tiny_model

pytestmark = pytest.mark.usefixtures("torch_one_thread")

K, S = 16, 6
TEMPS = [0.5, 0.7, 1.4, 2.0, 3.0]  # 0.7 / 1.4 share a power (b = 2 x b'); 3.0 takes the generic path
F16 = 2.0**-11


def reference(model_dir, prepared, vocab: int) -> dict[str, np.ndarray]:
    """Float64 statistics of every target row, in dataset then position order."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ds = load_prepared(prepared)
    out: dict[str, list] = {k: [] for k in ("logp", "target_ids")}
    with torch.no_grad():
        for ids, mask in zip(ds["input_ids"], ds["loss_mask"]):
            t = np.nonzero(np.asarray(mask))[0]
            t = t[t >= 1]
            if not len(t):
                continue
            logits = model(input_ids=torch.tensor([ids])).logits[0].double()
            logp = torch.log_softmax(logits[:, :vocab], dim=-1)  # ids past the tokenizer are masked
            out["logp"].append(logp[t - 1])
            out["target_ids"].append(torch.tensor(ids)[t])
    logp = torch.cat(out["logp"])
    top_lp, top_ids = logp.topk(K, dim=-1)
    p = logp.exp()
    return {"logp": logp.numpy(), "topk_ids": top_ids.numpy(), "topk_logprobs": top_lp.numpy(),
            "entropy": (-(p * logp).sum(-1)).numpy(),
            "log_partition": torch.stack([torch.logsumexp(logp / T, -1) for T in TEMPS], -1).numpy(),
            "target_ids": torch.cat(out["target_ids"]).numpy(),
            "target_logprobs": logp.gather(1, torch.cat(out["target_ids"])[:, None]).squeeze(1).numpy()}


def make_cache(out, model_dir, prepared, **kw):
    cfg = TeacherConfig(data=str(prepared), model=str(model_dir), out=str(out), top_k=K, temperatures=TEMPS,
                        tail_samples=S, shard_rows=200, batch_tokens=512, device="cpu", dtype="float32", **kw)
    run_teacher(cfg)
    return open_cache(out)


def check_against_reference(c, ref) -> None:
    rows = c.read(0, c.num_rows)
    n = len(ref["target_ids"])
    assert c.num_rows == n
    # targets: exact ids, in order
    np.testing.assert_array_equal(rows["target_ids"], ref["target_ids"])
    # top-K log-probs: quantised to <= 0.02 nats, normalised over the full vocabulary
    err = np.abs(rows["topk_logprobs"].astype(np.float64) - ref["topk_logprobs"])
    assert err.max() <= 0.02, err.max()
    # top-K ids: a true top-K under the reference (ties within float32 noise may swap order)
    lp_at = np.take_along_axis(ref["logp"], rows["topk_ids"], axis=1)
    assert np.all(np.abs(lp_at - ref["topk_logprobs"]) <= 1e-5)
    assert np.mean(rows["topk_ids"] == ref["topk_ids"]) > 0.99
    assert all(len(set(r)) == K for r in rows["topk_ids"].tolist())
    # scalars: float16 rounding of float32 values
    for name in ("entropy", "log_partition", "target_logprobs"):
        got, want = rows[name].astype(np.float64), ref[name]
        bad = np.abs(got - want) > F16 * np.abs(want) + 2e-5
        assert not bad.any(), (name, got[bad][:5], want[bad][:5])
    # log_partition columns follow the recorded grid; A(1) would be 0 and -A'(1) = H (spot check by sign)
    assert c.temperatures == TEMPS
    assert np.all(rows["log_partition"][:, TEMPS.index(0.5)] <= 1e-3) and np.all(rows["log_partition"][:, -1] >= -1e-3)


@pytest.fixture(scope="module")
def caches(tmp_path_factory, prepared_dir, llama_dir, gpt2_dir, qwen2_tied_dir, vocab_size):
    out = {}
    for name, d in (("llama", llama_dir), ("gpt2", gpt2_dir), ("qwen2-tied", qwen2_tied_dir)):
        out[name] = (make_cache(tmp_path_factory.mktemp(name) / "cache", d, prepared_dir),
                     reference(d, prepared_dir, vocab_size))
    return out


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2-tied"])
def test_cache_matches_float64_reference(caches, family):
    c, ref = caches[family]
    check_against_reference(c, ref)
    assert c.meta["masked_model_ids"] == 0


def test_qwen2_fixture_is_tied(qwen2_tied_dir):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(qwen2_tied_dir)
    assert m.get_output_embeddings().weight.data_ptr() == m.get_input_embeddings().weight.data_ptr()


def test_row_order_and_index(caches, prepared_dir):
    c, ref = caches["llama"]
    idx = c.index.to_pydict()
    ds = load_prepared(prepared_dir)
    assert idx["sequence_id"] == list(range(len(ds)))
    all_targets = c.read(0, c.num_rows)["target_ids"]
    start = 0
    for e, (ids, mask) in enumerate(zip(ds["input_ids"], ds["loss_mask"])):
        n = int(np.count_nonzero(np.asarray(mask)[1:]))
        assert idx["row_start"][e] == start and idx["row_count"][e] == n
        # the example's rows hold its next tokens, in position order
        want = np.asarray(ids)[1:][np.asarray(mask)[1:] == 1]
        np.testing.assert_array_equal(all_targets[start: start + n], want)
        start += n
    # reads that start and stop inside shards agree with the whole
    for a, b in ((0, 1), (150, 450), (c.num_rows - 3, c.num_rows)):
        np.testing.assert_array_equal(c.read(a, b)["target_ids"], all_targets[a:b])
    assert len(c.shards) > 2  # reads above crossed shard boundaries


def test_tail_samples(caches, tmp_path, prepared_dir, llama_dir):
    c, ref = caches["llama"]
    rows = c.read(0, c.num_rows)
    ids, counts = rows["tail_ids"], rows["tail_counts"]
    assert ids.shape == counts.shape == (c.num_rows, S)
    assert np.all(counts.sum(1) == S)
    pad = ids == -1
    assert np.all(counts[pad] == 0) and np.all(counts[~pad] > 0)
    for r in range(c.num_rows):
        real = ids[r][~pad[r]]
        assert not set(real.tolist()) & set(rows["topk_ids"][r].tolist())  # all outside the top-K
        assert np.all(np.diff(real) > 0) and real.min() >= 0 and real.max() < c.vocab_size
        assert np.all(ref["logp"][r, real] > -np.inf)
    # deterministic for a seed (a fresh run, other batch/chunk sizes), different for another seed
    again = make_cache(tmp_path / "again", llama_dir, prepared_dir, head_chunk_rows=7)
    raw0, raw1 = c.read_raw(0, c.num_rows), again.read_raw(0, c.num_rows)
    assert all(np.array_equal(raw0[n], raw1[n]) for n in raw0)
    other = make_cache(tmp_path / "other", llama_dir, prepared_dir, seed=1)
    assert not np.array_equal(other.read(0, c.num_rows)["tail_ids"], ids)
    # the draws follow the tail: the most likely tail id is drawn more often than a median one
    tail_p = np.exp(ref["logp"]).copy()
    np.put_along_axis(tail_p, rows["topk_ids"], 0.0, axis=1)
    drawn = np.zeros_like(tail_p)
    np.put_along_axis(drawn, np.where(pad, 0, ids), np.where(pad, 0, counts), axis=1)
    top = tail_p.argmax(1)
    assert drawn[np.arange(len(top)), top].mean() > S / (c.vocab_size - K) * 1.5


def test_padded_vocab_is_masked_and_recorded(tmp_path, prepared_dir, vocab_size):
    model_dir = save_tiny_model("llama", vocab_size + 13, tmp_path / "padded", seed=3)
    c = make_cache(tmp_path / "cache", model_dir, prepared_dir)
    check_against_reference(c, reference(model_dir, prepared_dir, vocab_size))
    assert c.vocab_size == vocab_size
    assert c.meta["masked_model_ids"] == 13 and c.meta["teacher"]["model_vocab_size"] == vocab_size + 13
    assert json.loads((tmp_path / "cache" / "kdcache.json").read_text())["masked_model_ids"] == 13


def test_model_smaller_than_tokenizer_is_one_line(tmp_path, prepared_dir, vocab_size):
    model_dir = save_tiny_model("llama", vocab_size - 10, tmp_path / "small")
    res = CliRunner().invoke(main, ["teacher", "--data", str(prepared_dir), "--model", str(model_dir),
                                    "--out", str(tmp_path / "cache")])
    assert res.exit_code == 1
    errs = [ln for ln in res.output.splitlines() if "error:" in ln]
    assert len(errs) == 1 and f"{vocab_size - 10} output ids" in errs[0] and str(vocab_size) in errs[0]
    assert "Traceback" not in res.output and not (tmp_path / "cache").exists()
