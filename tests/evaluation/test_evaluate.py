"""Tests for `pipeline.evaluation.evaluate` and `kdcache eval`: every figure against a float64 reference computed
here from the models' own logits, one example at a time (so batching and padding are checked too).

    .venv/bin/python -m pytest tests/evaluation/test_evaluate.py -q
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import make_pairs, save_tiny_model
from pipeline.cache import open_cache
from pipeline.errors import KdError
from pipeline.evaluation.evaluate import (EvalConfig, bucket_fkl, evaluate, score_generations, split_prompt_reference,
                               summary_line)
from pipeline.data.prepare import load_prepared
from pipeline.teacher.runner import TeacherConfig, run_teacher


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run faster on one thread, and far faster on a shared, busy CPU (measured: 25x
    on 2 cores at load 7); restored afterwards so other modules keep their setting."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_cache(data: Path, model: Path, out: Path, top_k: int) -> Path:
    run_teacher(TeacherConfig(data=str(data), model=str(model), out=str(out), top_k=top_k, device="cpu",
                              shard_rows=100, chunk_rows=32))
    return out


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, prepared_dir, llama_dir) -> Path:
    return make_cache(prepared_dir, llama_dir, tmp_path_factory.mktemp("evcache") / "cache", top_k=8)


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, vocab_size, tokenizer_dir) -> Path:
    """A tiny llama (other seed than the teacher) with the data's tokenizer saved beside it."""
    d = save_tiny_model("llama", vocab_size, tmp_path_factory.mktemp("student"), seed=1)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(d)
    return d


def per_example_logits(model_dir: Path, prepared: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [N, V] float64 at every target, target ids [N]) from unpadded single-example forwards."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ds = load_prepared(prepared)
    logits, targets = [], []
    with torch.no_grad():
        for ex in ds:
            ids = torch.tensor(ex["input_ids"], dtype=torch.int64)
            t = torch.nonzero(torch.tensor(ex["loss_mask"])).squeeze(1)
            t = t[t >= 1]
            out = model(input_ids=ids[None]).logits[0].double()
            logits.append(out[t - 1])
            targets.append(ids[t])
    return torch.cat(logits), torch.cat(targets)


def reference_fkl(logits: torch.Tensor, teacher_logp: torch.Tensor, ids: np.ndarray) -> torch.Tensor:
    """Bucket FKL written out plainly from the TEACHER's dense float64 distribution (not from a cache):
    P = (p on the K ids, 1 - their sum), Q = (q on the K ids, 1 - their sum)."""
    q = torch.softmax(logits.double(), -1)
    p = teacher_logp.double().exp()
    out = []
    for i in range(len(q)):
        idx = torch.from_numpy(np.asarray(ids[i]))
        pp = np.append(p[i, idx].numpy(), max(0.0, 1.0 - p[i, idx].sum().item()))
        qq = np.append(q[i, idx].numpy(), max(0.0, 1.0 - q[i, idx].sum().item()))
        out.append(sum(pb * (math.log(pb) - math.log(qb)) for pb, qb in zip(pp, qq) if pb > 0))
    return torch.tensor(out, dtype=torch.float64)


def test_eval_matches_float64_reference(tmp_path, student_dir, prepared_dir, cache_dir, llama_dir):
    # batch size 7 does not divide the 60 examples: the last batch is short and padding varies.
    r = evaluate(EvalConfig(model=str(student_dir), data=str(prepared_dir), cache=str(cache_dir),
                            out=str(tmp_path / "ev"), batch_size=7, device="cpu"))
    logits, targets = per_example_logits(student_dir, prepared_dir)
    rows = open_cache(cache_dir).read(0, open_cache(cache_dir).num_rows)
    assert np.array_equal(rows["target_ids"], targets.numpy())
    ce = torch.nn.functional.cross_entropy(logits, targets).item()
    agree = (logits.argmax(-1).numpy() == rows["topk_ids"][:, 0]).mean()
    teacher_logits, _ = per_example_logits(llama_dir, prepared_dir)
    fkl = reference_fkl(logits, torch.log_softmax(teacher_logits, -1), rows["topk_ids"]).mean().item()
    assert r["targets"] == len(targets)
    assert r["ce"] == pytest.approx(ce, rel=1e-5)
    assert r["ppl"] == pytest.approx(math.exp(ce), rel=1e-5)
    assert r["teacher_top1_agreement"] == pytest.approx(agree, abs=1.0 / len(targets))
    # FKL from the cache against FKL from the dense teacher: the codec's head error (step/2 relative in p) only
    assert r["fkl_to_teacher"] == pytest.approx(fkl, abs=0.01 * (1 + fkl))
    saved = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert saved["ce"] == r["ce"] and saved["fkl_to_teacher"] == r["fkl_to_teacher"]
    assert (tmp_path / "ev" / "config.yaml").is_file()
    assert "eval:" in summary_line(r, str(tmp_path / "ev"))


def test_fkl_with_k_equal_v_is_the_full_vocabulary_kl(tmp_path, student_dir, prepared_dir, llama_dir, vocab_size):
    """K = V: the tail bucket is empty, so the bucket FKL is KL(teacher || student) over the vocabulary
    (up to the cache's 0.02-nat log-prob quantisation)."""
    cache = make_cache(prepared_dir, llama_dir, tmp_path / "cache_full", top_k=vocab_size)
    r = evaluate(EvalConfig(model=str(student_dir), data=str(prepared_dir), cache=str(cache),
                            out=str(tmp_path / "ev"), batch_size=16, device="cpu"))
    s_logits, _ = per_example_logits(student_dir, prepared_dir)
    t_logits, _ = per_example_logits(llama_dir, prepared_dir)
    log_p, log_q = torch.log_softmax(t_logits, -1), torch.log_softmax(s_logits, -1)
    full_kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()
    assert r["fkl_to_teacher"] == pytest.approx(full_kl, abs=0.03)


def test_bucket_fkl_against_dense_reference():
    g = torch.Generator().manual_seed(0)
    n, v, k = 6, 40, 5
    t_logits, s_logits = torch.randn(n, v, generator=g, dtype=torch.float64) * 3, torch.randn(n, v, generator=g) * 3
    log_p = torch.log_softmax(t_logits, -1)
    # K = V with exact log-probs (no tail): the full-vocabulary forward KL.
    ids = log_p.argsort(-1, descending=True)
    full = (log_p.exp() * (log_p - torch.log_softmax(s_logits.double(), -1))).sum(-1)
    got = bucket_fkl(s_logits, ids, log_p.gather(1, ids), torch.full((n,), -math.inf), v)
    assert torch.allclose(got, full, atol=1e-5)
    # K < V: the plain K + 1 bucket formula, from the dense teacher.
    ids_k = ids[:, :k]
    head = log_p.gather(1, ids_k)
    tail = torch.logsumexp(log_p.gather(1, ids[:, k:]), -1)
    ref = reference_fkl(s_logits, log_p, ids_k.numpy())
    assert torch.allclose(bucket_fkl(s_logits, ids_k, head, tail, v), ref, atol=1e-5)
    # Identical distributions: zero.
    same = bucket_fkl(t_logits.float(), ids_k, head, tail, v)
    assert torch.allclose(same, torch.zeros(n, dtype=torch.float64), atol=1e-5)


def test_bucket_fkl_counts_the_mass_on_padded_student_ids():
    """A student head wider than the teacher's V (padded ids): the KL is against the student's whole head. A
    student that puts almost all its mass on padded ids is far from the teacher, however its V-part is shaped."""
    g = torch.Generator().manual_seed(3)
    n, v, pad, k = 5, 30, 10, 4
    log_p = torch.log_softmax(torch.randn(n, v, generator=g, dtype=torch.float64) * 2, -1)
    ids = log_p.argsort(-1, descending=True)[:, :k]
    head, tail = log_p.gather(1, ids), torch.logsumexp(log_p.scatter(1, ids, -math.inf), -1)
    good = torch.cat([log_p.float() + 0.01 * torch.randn(n, v, generator=g), torch.full((n, pad), -30.0)], 1)
    bad = good.clone()
    bad[:, v:] = 8.0  # most of the mass on ids the teacher cannot emit
    for s_logits in (good, bad):
        # Independent float64 reference: K + 1 buckets of the student's softmax over ALL its ids.
        q = torch.softmax(s_logits.double(), -1)
        q_head = q.gather(1, ids)
        in_tail = torch.ones(n, v + pad, dtype=torch.bool).scatter(1, ids, False)
        in_tail[:, v:] = False
        q_tail = (q * in_tail).sum(-1)
        p_head, p_tail = head.exp(), tail.exp()
        ref = (p_head * (head - q_head.log())).sum(-1) + p_tail * (tail - q_tail.log())
        assert torch.allclose(bucket_fkl(s_logits, ids, head, tail, v), ref, atol=1e-9)
    assert float(bucket_fkl(bad, ids, head, tail, v).mean()) > float(bucket_fkl(good, ids, head, tail, v).mean()) + 3


def test_score_generations_by_hand():
    refs = ["the cat sat", "a big dog", "red tree", "one two three four"]
    gens = ["  the cat sat ", "a small dog", "", "four three two one"]
    s = score_generations(refs, gens)
    # ROUGE-L F: exact 1; LCS "a dog" -> P = R = 2/3; empty -> 0; reversed -> LCS 1 of 4 -> 1/4.
    assert [e for e, _ in s["per_example"]] == [1.0, 0.0, 0.0, 0.0]
    assert [rl for _, rl in s["per_example"]] == pytest.approx([1.0, 2 / 3, 0.0, 0.25])
    assert s["exact_match"] == 0.25
    assert s["rouge_l"] == pytest.approx((1 + 2 / 3 + 0 + 0.25) / 4)
    with pytest.raises(ValueError):
        score_generations(["a"], [])


def test_split_prompt_reference():
    ids = np.array([0, 11, 12, 13, 21, 22, 1])
    mask = np.array([0, 0, 0, 0, 1, 1, 1])
    prompt, ref = split_prompt_reference(ids, mask, eos_id=1)
    assert prompt.tolist() == [0, 11, 12, 13] and ref.tolist() == [21, 22]
    _, ref = split_prompt_reference(ids[:-1], mask[:-1], eos_id=1)  # no EOS at the end: nothing dropped
    assert ref.tolist() == [21, 22]


def test_split_prompt_reference_takes_the_last_run_of_targets():
    """Chat data has a run of targets per assistant turn: the reference is the last turn, cut at its EOS
    (a template may close a turn with tokens after it), and the prompt is everything before it."""
    ids = np.array([0, 3, 11, 1, 4, 21, 1, 3, 12, 1, 4, 22, 23, 1, 9])
    mask = np.array([0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1])
    prompt, ref = split_prompt_reference(ids, mask, eos_id=1)
    assert prompt.tolist() == [0, 3, 11, 1, 4, 21, 1, 3, 12, 1, 4] and ref.tolist() == [22, 23]


CONVERSATIONS = [
    [{"role": "user", "content": "what is one plus two"}, {"role": "assistant", "content": "three"},
     {"role": "user", "content": "sort big small"}, {"role": "assistant", "content": "big small red"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"},
     {"role": "assistant", "content": "hello"}],
]


def test_generate_on_chat_data_answers_the_last_assistant_turn(tmp_path, tokenizer_dir, student_dir, monkeypatch):
    """A model that answers each conversation correctly scores exact match 1: so the prompt ends where the
    chat template opens the last assistant turn and the reference is that turn's content."""
    import pipeline.models
    from pipeline.data.prepare import PrepareConfig, prepare

    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS))
    prep = tmp_path / "prep"
    prepare(PrepareConfig(data=str(data), tokenizer=str(tokenizer_dir), out=str(prep), max_length=64))
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    # The oracle: the template's own rendering of the conversation up to the last turn -> its answer.
    answers = {tok.apply_chat_template(c[:-1], tokenize=False, add_generation_prompt=True): c[-1]["content"]
               for c in CONVERSATIONS}
    load = pipeline.models.load_causal_lm

    def load_oracle(*a, **kw):
        model = load(*a, **kw)

        def generate(input_ids, **_):
            answer = answers.get(tok.decode(input_ids[0].tolist(), skip_special_tokens=False), "wrong")
            new = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            return torch.cat([input_ids, torch.tensor([new])], dim=1)

        model.generate = generate
        return model

    monkeypatch.setattr(pipeline.models, "load_causal_lm", load_oracle)
    r = evaluate(EvalConfig(model=str(student_dir), data=str(prep), out=str(tmp_path / "ev"), generate=2,
                            samples=2, device="cpu"))
    assert r["generated"] == 2 and r["exact_match"] == 1.0
    assert [s["reference"] for s in r["samples"]] == ["big small red", "hello"]
    assert "three" in r["samples"][0]["prompt"] and "big small red" not in r["samples"][0]["prompt"]


def test_generation_decodes_the_prepared_prompts(tmp_path, student_dir, prepared_dir):
    r = evaluate(EvalConfig(model=str(student_dir), data=str(prepared_dir), out=str(tmp_path / "ev"),
                            generate=4, samples=2, device="cpu"))
    pairs = make_pairs(60, seed=2)  # what conftest's data_file holds
    assert r["generated"] == 4 and len(r["samples"]) == 2
    for s, p in zip(r["samples"], pairs):
        assert s["prompt"] == p["prompt"] and s["reference"] == p["response"]
        assert isinstance(s["generation"], str)
    assert 0.0 <= r["exact_match"] <= 1.0 and 0.0 <= r["rouge_l"] <= 1.0
    assert "teacher_top1_agreement" not in r


def test_mismatched_cache_is_one_line_error(tmp_path, tokenizer_dir, student_dir, cache_dir):
    from pipeline.data.prepare import PrepareConfig, prepare

    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps(r) + "\n" for r in make_pairs(5, seed=9)))
    prep = tmp_path / "prep_other"
    prepare(PrepareConfig(data=str(other), tokenizer=str(tokenizer_dir), out=str(prep), max_length=64))
    with pytest.raises(KdError, match="other data"):
        evaluate(EvalConfig(model=str(student_dir), data=str(prep), cache=str(cache_dir), out=str(tmp_path / "e"),
                            device="cpu"))


def test_config_validation():
    from pipeline.config import resolve

    with pytest.raises(KdError, match="batch_size"):
        EvalConfig(batch_size=0)
    with pytest.raises(KdError, match="generate"):
        EvalConfig(generate=-1)
    with pytest.raises(KdError, match="unknown config key 'genrate'"):
        resolve(EvalConfig, sets=["genrate=3"])


def test_cli_eval_and_errors(tmp_path, student_dir, prepared_dir, cache_dir):
    from stages.cli import main

    out = tmp_path / "ev"
    runner = CliRunner()
    res = runner.invoke(main, ["eval", "--model", str(student_dir), "--data", str(prepared_dir), "--cache",
                               str(cache_dir), "--out", str(out), "--batch-size", "16", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert res.output.strip().splitlines()[-1].strip().startswith("eval: ")
    assert set(json.loads((out / "eval.json").read_text())) >= {"ce", "ppl", "targets", "teacher_top1_agreement",
                                                                 "fkl_to_teacher"}
    # Missing model: one line, exit 1, no traceback.
    res = runner.invoke(main, ["eval", "--model", str(tmp_path / "nope"), "--data", str(prepared_dir),
                               "--out", str(out), "--device", "cpu"])
    assert res.exit_code == 1
    assert res.output.strip().count("\n") == 0 and "kdcache eval: error: model directory not found" in res.output
    # A training run directory as --out would lose its config.yaml.
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("")
    res = runner.invoke(main, ["eval", "--model", str(student_dir), "--data", str(prepared_dir), "--out", str(run)])
    assert res.exit_code == 1 and "training run directory" in res.output
