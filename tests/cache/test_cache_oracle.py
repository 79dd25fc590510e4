"""Every cached quantity against a float64 full-softmax reference from the model's own forward pass.

    .venv/bin/python -m pytest tests/cache/test_cache_oracle.py -q

The reference runs each example alone, unpadded, through the model and computes methods.md §1 in
float64 from its final hidden states and output head (so a bf16 teacher is compared with exact
arithmetic on its own bf16 weights): log_softmax over the tokenizer's ids, top-K, the tail mass r, the
entropy, A(beta) for each grid temperature. Rows are compared in the cache's order: dataset order, then
position order. Tolerances follow from the codec (pipeline/cache/schema.py): head log-probs within
head_step (own gap step/2 + the normalisation's step/2), log r within tail_step/2 (relative 1e-3 in r),
plus float32 arithmetic.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.cache import open_cache
from pipeline.cache.schema import PRESETS
from pipeline.data.prepare import load_prepared
from pipeline.teacher.runner import TeacherConfig, run_teacher
from stages.cli import main

from conftest import save_tiny_model

pytestmark = pytest.mark.usefixtures("torch_one_thread")

K, S = 16, 6
TEMPS = [0.5, 0.7, 1.4, 2.0, 3.0]  # 0.7 / 1.4 share a power (b = 2 x b'); 3.0 takes the generic path


@torch.no_grad()
def reference(model_dir, prepared, vocab: int, dtype=torch.float32) -> dict[str, np.ndarray]:
    """Float64 statistics of every target row, in dataset then position order."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    w = model.get_output_embeddings().weight.double()[:vocab]
    ds = load_prepared(prepared)
    logps, tgts = [], []
    for ids, mask in zip(ds["input_ids"], ds["loss_mask"]):
        t = np.nonzero(np.asarray(mask))[0]
        t = t[t >= 1]
        if not len(t):
            continue
        hidden = model.base_model(input_ids=torch.tensor([ids])).last_hidden_state[0].double()
        logps.append(torch.log_softmax(hidden[t - 1] @ w.T, dim=-1))  # ids past the tokenizer are masked
        tgts.append(torch.tensor(ids)[t])
    logp, tgt = torch.cat(logps), torch.cat(tgts)
    srt, order = logp.sort(-1, descending=True)
    rest = srt[:, K:]
    p = logp.exp()
    betas = torch.tensor([1.0 / t for t in TEMPS], dtype=torch.float64)
    return {"logp": logp.numpy(), "topk_ids": order[:, :K].numpy(), "topk_logprobs": srt[:, :K].numpy(),
            "tail_logprob": torch.logsumexp(rest, -1).numpy(), "entropy": (-(p * logp).sum(-1)).numpy(),
            "log_partition": torch.logsumexp(betas[None, :, None] * logp[:, None, :], -1).numpy(),
            "tail_log_partition": torch.logsumexp(betas[None, :, None] * rest[:, None, :], -1).numpy(),
            "target_ids": tgt.numpy(), "target_logprobs": logp.gather(1, tgt[:, None]).squeeze(1).numpy()}


def make_cache(out, model_dir, prepared, **kw):
    settings = dict(top_k=K, temperatures=TEMPS, tail_samples=S, shard_rows=200, batch_tokens=512, device="cpu",
                    dtype="float32")
    settings.update(kw)
    run_teacher(TeacherConfig(data=str(prepared), model=str(model_dir), out=str(out), **settings))
    return open_cache(out)


def check_against_reference(c, ref, head_tol: float | None = None) -> None:
    rows = c.read(0, c.num_rows)
    p = c.params
    n = len(ref["target_ids"])
    assert c.num_rows == n
    # targets: exact ids, in order (from the prepared data, checked against each shard's hash)
    np.testing.assert_array_equal(rows["target_ids"], ref["target_ids"])
    # top-K ids: a true top-K under the reference (ties within float32 noise may swap order)
    lp_at = np.take_along_axis(ref["logp"], rows["topk_ids"], axis=1)
    assert np.all(np.abs(lp_at - ref["topk_logprobs"][:, : p.top_k]) <= 1e-5)
    assert np.mean(rows["topk_ids"] == ref["topk_ids"][:, : p.top_k]) > 0.99
    assert all(len(set(r)) == p.top_k for r in rows["topk_ids"].tolist())
    # head log-probs: each gap within head_step/2, the top-1 from the normalisation within another head_step/2
    tol = head_tol if head_tol is not None else p.head_step + p.tail_step + 2e-5
    err = np.abs(rows["topk_logprobs"].astype(np.float64) - lp_at)
    assert err.max() <= tol, err.max()
    # the tail mass r: stored in log space from the full-vocabulary logits, relative error < 1e-3
    rest_lse = np.log(np.clip(1.0 - np.exp(lp_at).sum(1), 1e-300, None))  # only for rows where it is well defined
    exact_log_r = ref["tail_logprob"] if p.top_k == K else rest_lse
    fine = exact_log_r >= -40.0  # the split code's fine range (relative 4.9e-4); 2e-3 below (pipeline/cache/codecs.py)
    log_r_err = np.abs(rows["tail_logprob"].astype(np.float64) - exact_log_r)
    assert log_r_err[fine].max(initial=0) < 1e-3 and log_r_err[~fine].max(initial=0) < 2.1e-3
    # the K + 1 buckets are a distribution on every row: logsumexp = 0 within 1e-6
    lse = np.logaddexp(np.logaddexp.reduce(rows["topk_logprobs"].astype(np.float64), axis=1),
                       rows["tail_logprob"].astype(np.float64))
    assert np.abs(lse).max() < 1e-6
    # entropy (derived from head, r and the tail's entropy) and the log-partition at the knots
    assert np.abs(rows["entropy"] - ref["entropy"]).max() < 2 * p.head_step * (1 + ref["entropy"].max()), \
        np.abs(rows["entropy"] - ref["entropy"]).max()
    assert np.abs(rows["log_partition"] - ref["log_partition"]).max() < 0.01
    # target log-probs: from the head (within the head tolerance) or stored (target_step / 2)
    assert np.abs(rows["target_logprobs"] - ref["target_logprobs"]).max() <= max(tol, p.target_step / 2 + 1e-5)
    assert c.temperatures == TEMPS


def check_a_at_one(c, ref) -> None:
    """A(1) = 0 exactly, and A'(1) = -H(p): the slope of the interpolated A at T = 1 is the entropy."""
    from pipeline.losses.temperature import log_partition_at, tail_log_partition_at

    rows = c.read(0, c.num_rows)
    n = c.num_rows
    grid = torch.tensor([1.0 / t for t in c.temperatures], dtype=torch.float64)

    def a_at(beta: float) -> torch.Tensor:
        b = torch.full((n,), beta, dtype=torch.float64)
        t = tail_log_partition_at(b, grid, *(torch.from_numpy(rows[f]).double() for f in
                                             ("tail_log_partition", "tail_logprob", "tail_entropy")), c.params.n_tail)
        return log_partition_at(b, torch.from_numpy(rows["topk_logprobs"]).double(), t)

    assert a_at(1.0).abs().max() < 1e-6
    eps = 1e-4
    slope = (a_at(1 + eps) - a_at(1 - eps)) / (2 * eps)
    assert np.abs(slope.numpy() + ref["entropy"]).max() < 2 * c.params.head_step * (1 + ref["entropy"].max())


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
    check_a_at_one(c, ref)
    assert c.meta["masked_model_ids"] == 0


def test_confident_teacher_keeps_its_tail(tmp_path, prepared_dir, vocab_size):
    # Head weights x 30 on top of the fixture's x 8: most rows have p_1 -> 1 (r down to ~1e-30), the case
    # format 2 broke (its quantised head summed above 1 and emptied the tail).
    d = save_tiny_model("llama", vocab_size, tmp_path / "confident", seed=5)
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(d)
    with torch.no_grad():
        m.get_output_embeddings().weight.mul_(30.0)
    m.save_pretrained(d)
    ref = reference(d, prepared_dir, vocab_size)
    c = make_cache(tmp_path / "cache", d, prepared_dir)
    assert np.mean(ref["tail_logprob"] < math.log(1e-4)) > 0.5 and ref["tail_logprob"].min() < math.log(1e-8)
    check_against_reference(c, ref)
    check_a_at_one(c, ref)
    assert np.isfinite(c.read(0, c.num_rows)["tail_logprob"]).all()


def test_bf16_teacher_statistics_are_float32(tmp_path, prepared_dir, llama_dir, vocab_size):
    # The teacher runs in bf16; its logits for the statistics are float32 products of its bf16 hidden states
    # and head (not logits rounded to bf16). Reference: float64 arithmetic on the same bf16 weights.
    # batch_tokens=1 puts every example in a batch of its own, as the reference runs it: batched bf16 forward
    # passes (other shapes, padding) differ at bf16 noise in the hidden states, before any head is applied.
    ref = reference(llama_dir, prepared_dir, vocab_size, dtype=torch.bfloat16)
    # A fine head step (0.005) makes the comparison tight enough to catch logits rounded to bf16 (below).
    c = make_cache(tmp_path / "cache", llama_dir, prepared_dir, dtype="bfloat16", batch_tokens=1, head_step=0.005)
    assert {r["dtype"] for r in c.commit_records().values()} == {"bfloat16"}
    check_against_reference(c, ref)
    # What rounding the logits to bf16 would have cost on the same rows: above the tolerance checked above,
    # so the check would catch a head that rounds (this tiny model's logits are ~5; an LLM's ~20-30, worse).
    z = torch.from_numpy(ref["logp"])
    rounded = torch.log_softmax(z.bfloat16().double(), -1)
    assert (rounded - z).abs().max() > c.params.head_step + c.params.tail_step + 2e-5


def test_k_equals_v(tmp_path, prepared_dir, llama_dir, vocab_size):
    c = make_cache(tmp_path / "cache", llama_dir, prepared_dir, top_k=vocab_size, tail_samples=0)
    ref = reference(llama_dir, prepared_dir, vocab_size)
    rows = c.read(0, c.num_rows)
    assert np.all(np.isneginf(rows["tail_logprob"]))
    lse = np.logaddexp.reduce(rows["topk_logprobs"].astype(np.float64), axis=1)
    assert np.abs(lse).max() < 1e-6
    assert np.abs(rows["entropy"] - ref["entropy"]).max() < 2 * c.params.head_step * (1 + ref["entropy"].max())


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
    # each draw's log p over the full vocabulary (what re-tempers the draws): within draw_step/2 + the tail mass's
    # error of the float64 oracle; -inf at pads
    lps = c.read(0, c.num_rows, fields=("tail_logprobs",))["tail_logprobs"]
    want = np.take_along_axis(ref["logp"], np.where(pad, 0, ids), axis=1)
    assert c.params.draw_step == PRESETS["default"]["draw_step"] and np.all(np.isneginf(lps[pad]))
    assert np.abs(lps[~pad] - want[~pad]).max() <= c.params.draw_step / 2 + 1e-3
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


def test_compiled_statistics_equal_the_eager_ones():
    # The fused (torch.compile) statistics, the CUDA default, against the hand-blocked eager path on CPU:
    # the same formulas, so equal to float32 rounding; adversarial rows included (confident, uniform, -inf).
    from pipeline.teacher.stats import compiled_stats, distribution_stats

    g = torch.Generator().manual_seed(0)
    z = 3 * torch.randn(40, 500, generator=g)
    z[0, 7] += 60.0  # r ~ e^-55
    z[1] = 0.0  # uniform
    z[2, :250] = -math.inf  # half the vocabulary impossible
    tgt = torch.randint(250, 500, (40,), generator=g)
    betas = torch.tensor([1.0 / t for t in TEMPS])
    eager = distribution_stats(z, tgt, 8, betas, threads=1)
    fused = compiled_stats(z, tgt, 8, betas)
    assert torch.equal(eager["topk_ids"], fused["topk_ids"])
    for name in ("topk_logprobs", "tail_logprob", "tail_entropy", "tail_shape", "target_logprobs", "log_normaliser"):
        torch.testing.assert_close(fused[name], eager[name], rtol=1e-5, atol=2e-5, msg=name)
