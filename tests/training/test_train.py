"""Student stage: normalisation over the step, exact resume, several students from one cache, checks."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.errors import KdError
from pipeline.training.trainer import Trainer, train
from pipeline.training.config import TrainConfig
from stages.cli import main
from conftest import reseal_cache

STUDENT_LLAMA = {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                 "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 128,
                 "tie_word_embeddings": True}
STUDENT_GPT2 = {"model_type": "gpt2", "n_embd": 24, "n_layer": 2, "n_head": 2, "n_positions": 128,
                "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1}


@pytest.fixture(scope="module")
def cache_dir(student_cache) -> Path:
    return student_cache


def student_config(tmp_path: Path, vocab_size: int, base: dict, name: str = "student.json", **over) -> str:
    p = tmp_path / name
    p.write_text(json.dumps({**base, "vocab_size": vocab_size, **over}))
    return str(p)


def grads(trainer: Trainer) -> list[torch.Tensor]:
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
            for p in trainer.model.parameters()]


@pytest.mark.parametrize("settings", [
    {"loss": "fkl"},  # pure KD, unnormalised sums then one division
    {"loss": "rkl", "gate": "topk", "gate_k": 3, "ce_weight": 0.3},  # mixed alpha: the pre-pass path
    {"loss": "jsd", "gate": "threshold", "gate_threshold": 0.02, "reject_weight": 0.25},
    {"loss": "fkl", "select": "student_entropy", "select_ratio": 0.3},  # SE-KD selects per sequence
    {"loss": "none"},  # plain cross-entropy
])
def test_microbatch_split_does_not_change_the_gradient(tmp_path, prepared_dir, cache_dir, vocab_size, settings):
    """One micro-batch of 8 sequences and two of 4 give the same gradient (gate weights are per position,
    SE-KD's selection per sequence; LATF and IDTS are per-micro-batch statistics by definition, so they
    are left out here)."""
    scfg = student_config(tmp_path, vocab_size, STUDENT_LLAMA)
    common = dict(data=str(prepared_dir), cache=str(cache_dir), student_config=scfg, shuffle=False, seed=3,
                  max_steps=4, **settings)
    one = Trainer(TrainConfig(out=str(tmp_path / "a"), batch_size=8, grad_accum=1, **common))
    two = Trainer(TrainConfig(out=str(tmp_path / "b"), batch_size=4, grad_accum=2, **common))
    two.model.load_state_dict(one.model.state_dict())
    mb8 = next(iter(one.stream))
    it = iter(two.stream)
    mb4 = [next(it), next(it)]
    assert mb8.examples == mb4[0].examples + mb4[1].examples
    one.train_step([mb8], apply=False)
    two.train_step(mb4, apply=False)
    g1, g2 = grads(one), grads(two)
    assert sum(float(g.abs().sum()) for g in g1) > 0
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-7)


def test_resume_gives_the_same_weights(tmp_path, prepared_dir, cache_dir, vocab_size):
    """2N steps straight == N steps, stop, resume, N steps (sampled gate, LATF, IDTS, dropout, shuffle)."""
    scfg = student_config(tmp_path, vocab_size, STUDENT_GPT2)
    common = dict(data=str(prepared_dir), cache=str(cache_dir), student_config=scfg, max_steps=8, batch_size=4,
                  gate="spec", proposal="sample", latf=True, latf_warmup=0.25, idts=True, seed=5, lr=3e-3)
    straight = train(TrainConfig(out=str(tmp_path / "straight"), **common))
    assert straight["finished"]
    half = train(TrainConfig(out=str(tmp_path / "resumed"), stop_after=4, **common))
    assert not half["finished"] and half["steps"] == 4
    assert not (tmp_path / "resumed" / "final").exists()
    rest = train(TrainConfig(out=str(tmp_path / "resumed"), resume=True, **common))
    assert rest["finished"] and rest["steps"] == 8
    from safetensors.torch import load_file

    a = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = lambda p: [{k: v for k, v in json.loads(ln).items() if k != "tokens_per_s"}  # noqa: E731
                      for ln in (p / "metrics.jsonl").read_text().splitlines()]
    assert rows(tmp_path / "straight") == rows(tmp_path / "resumed")


def test_two_students_of_different_architecture_from_one_cache(tmp_path, prepared_dir, cache_dir, vocab_size):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    runner = CliRunner()
    methods = {"llama": ["--gate", "topk", "--latf", "--idts"], "gpt2": ["--gate", "spec", "--tail", "sampled"]}
    for name, base in (("llama", STUDENT_LLAMA), ("gpt2", STUDENT_GPT2)):
        scfg = student_config(tmp_path, vocab_size + 7, base, name=f"{name}.json")  # padded vocabulary is fine
        res = runner.invoke(main, ["train", "--cache", str(cache_dir), "--student-config", scfg,
                                   "--out", str(tmp_path / name), "--max-steps", "3", "--batch-size", "4",
                                   *methods[name]])
        assert res.exit_code == 0, res.output
        assert "train: 3/3 steps" in res.output
        final = tmp_path / name / "final"
        model = AutoModelForCausalLM.from_pretrained(final)
        tok = AutoTokenizer.from_pretrained(final)
        assert model.config.model_type == name and len(tok) == vocab_size
        metrics = [json.loads(ln) for ln in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics] == [1, 2, 3]
        for key in ("loss", "kd_loss", "ce_loss", "tar", "focus_ratio", "temp_mean", "temp_min", "temp_max",
                    "kept_fraction", "tokens_per_s", "lr"):
            assert key in metrics[0], key
        assert all(np.isfinite(m["loss"]) for m in metrics)


def test_kd_terms_match_dense_kl_when_k_equals_v():
    """Plain sparse KD (no gate/LATF/IDTS, T = 1) with K = V is the mean full-vocabulary forward KL."""
    from pipeline.losses.objective import kd_terms
    from pipeline.losses.options import KdOptions

    torch.manual_seed(0)
    n, v = 6, 11
    t_logits = torch.randn(n, v, dtype=torch.float64) * 2
    s_logits = torch.randn(n, v, dtype=torch.float64, requires_grad=True)
    logp = torch.log_softmax(t_logits, -1)
    lp, ids = torch.topk(logp, v, dim=-1)
    temps = torch.tensor([0.5, 2.0])
    cache = {"topk_ids": ids, "topk_logprobs": lp.float(), "tail_logprob": torch.full((n,), -math.inf),
             "tail_entropy": torch.zeros(n), "tail_log_partition": torch.full((n, 2), -math.inf)}
    terms = kd_terms(s_logits.float(), cache, KdOptions(loss="fkl"), v, 1.0 / temps, None, None)
    dense = (logp.exp() * (logp - torch.log_softmax(s_logits, -1))).sum(-1)
    assert terms.denominator == n and terms.kept == n
    torch.testing.assert_close(terms.numerator.double() / n, dense.mean(), rtol=1e-5, atol=1e-6)


def test_all_masked_step_is_zero_and_finite(tmp_path, prepared_dir, cache_dir, vocab_size):
    """A gate that rejects everything (threshold 1.0, reject weight 0) gives kd_loss 0 and no NaN."""
    scfg = student_config(tmp_path, vocab_size, STUDENT_LLAMA)
    t = Trainer(TrainConfig(data=str(prepared_dir), cache=str(cache_dir), student_config=scfg, out=str(tmp_path / "m"),
                            gate="threshold", gate_threshold=1.0, max_steps=2, batch_size=4, grad_accum=2))
    it = iter(t.stream)
    row = t.train_step([next(it), next(it)])
    assert row["kd_loss"] == 0.0 and row["tar"] == 0.0 and row["kept_fraction"] == 0.0
    assert all(torch.isfinite(p).all() for p in t.model.parameters())


def test_checks_before_training(tmp_path, prepared_dir, cache_dir, vocab_size):
    runner = CliRunner()
    small = student_config(tmp_path, vocab_size - 5, STUDENT_LLAMA, name="small.json")
    res = runner.invoke(main, ["train", "--cache", str(cache_dir), "--student-config", small, "--out", str(tmp_path / "x")])
    assert res.exit_code == 1 and "output ids" in res.output and "Traceback" not in res.output
    # The line names the tokenizer the data was made with and what to do, not only two sizes.
    assert f"{vocab_size - 5} output ids, fewer than the {vocab_size}" in res.output
    assert "the tokenizer the data was prepared with" in res.output and "prepare the data with" in res.output
    # A cache whose tokenizer differs from the data's.
    bad = tmp_path / "bad_cache"
    shutil.copytree(cache_dir, bad)
    meta = json.loads((bad / "kdcache.json").read_text())
    meta["tokenizer"]["vocab_sha256"] = "0" * 64
    (bad / "kdcache.json").write_text(json.dumps(meta))
    reseal_cache(bad)  # a cache made that way, not a damaged one
    ok = student_config(tmp_path, vocab_size, STUDENT_LLAMA)
    res = runner.invoke(main, ["train", "--cache", str(bad), "--data", str(prepared_dir), "--student-config", ok,
                               "--out", str(tmp_path / "y")])
    assert res.exit_code == 1 and "tokenizer mismatch" in res.output
    # An incomplete cache.
    inc = tmp_path / "inc_cache"
    shutil.copytree(cache_dir, inc)
    (inc / "shards" / "shard_00001" / "_COMMIT.json").unlink()
    res = runner.invoke(main, ["train", "--cache", str(inc), "--data", str(prepared_dir), "--student-config", ok,
                               "--out", str(tmp_path / "z")])
    assert res.exit_code == 1 and "incomplete" in res.output
    # The cache's recorded data path is gone.
    moved = tmp_path / "moved_cache"
    shutil.copytree(cache_dir, moved)
    meta = json.loads((moved / "kdcache.json").read_text())
    meta["data"]["path"] = str(tmp_path / "nowhere")
    (moved / "kdcache.json").write_text(json.dumps(meta))
    reseal_cache(moved)
    res = runner.invoke(main, ["train", "--cache", str(moved), "--student-config", ok, "--out", str(tmp_path / "w")])
    assert res.exit_code == 1 and "is gone" in res.output and "--data" in res.output


def test_corrupted_chunk_stops_training_naming_the_shard(tmp_path, prepared_dir, cache_dir, vocab_size):
    bad = tmp_path / "corrupt"
    shutil.copytree(cache_dir, bad)
    chunk = next(p for p in sorted((bad / "shards" / "shard_00000" / "head_gaps").rglob("*"))
                 if p.is_file() and p.name != "zarr.json")
    data = bytearray(chunk.read_bytes())
    data[len(data) // 3] ^= 0xFF
    chunk.write_bytes(bytes(data))
    ok = student_config(tmp_path, vocab_size, STUDENT_LLAMA)
    res = CliRunner().invoke(main, ["train", "--cache", str(bad), "--data", str(prepared_dir), "--student-config", ok,
                                    "--out", str(tmp_path / "run"), "--max-steps", "40", "--batch-size", "8",
                                    "--save-every", "1000"])
    assert res.exit_code == 1, res.output
    assert "shard_00000" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "run" / "final").exists()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_plain_ce_training_without_cache(tmp_path, prepared_dir, vocab_size):
    scfg = student_config(tmp_path, vocab_size, STUDENT_LLAMA)
    common = dict(data=str(prepared_dir), student_config=scfg, out=str(tmp_path / "ce"), batch_size=16, lr=1e-2)
    s = train(TrainConfig(epochs=1, **common))
    assert s["finished"] and s["steps"] == 4  # 60 examples / 16 per step, last one partial
    rows = [json.loads(ln) for ln in (tmp_path / "ce" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["ce_loss"] < rows[0]["ce_loss"]
    assert "tar" not in rows[0]
    # The same settings again: nothing to do; other settings: refused, naming the changed keys.
    again = train(TrainConfig(epochs=1, **common))
    assert again.get("skipped") and again["steps"] == 4
    with pytest.raises(KdError, match=r"made differently: config changed \(epochs 1 -> 0.0, max_steps 0 -> 1\); "
                                      "pass --overwrite"):
        train(TrainConfig(max_steps=1, **common))


def test_ranking_buckets_give_the_exact_hellinger_difficulty_to_3e_4():
    """The cheap tail used to rank positions for LATF/IDTS matches the exact masked-logsumexp tail."""
    from pipeline.losses.divergences import hellinger, student_log_buckets, teacher_log_buckets
    from pipeline.losses.objective import ranking_log_buckets

    torch.manual_seed(1)
    n, v, k = 64, 5000, 32
    for scale in (0.5, 3.0, 12.0):  # flat to very peaked students (tail mass down to ~1e-30)
        logits = torch.randn(n, v) * scale
        lp, ids = torch.topk(torch.log_softmax(torch.randn(n, v) * 3, -1), k)
        log_p = teacher_log_buckets(lp, torch.log1p(-lp.double().exp().sum(-1)).float(), torch.ones(n))
        exact = hellinger(log_p, student_log_buckets(logits, ids, torch.ones(n), v))
        cheap = hellinger(log_p, ranking_log_buckets(logits, ids, v))
        assert torch.isfinite(cheap).all()
        assert (exact - cheap).abs().max() < 3e-4, scale
    ids_all = torch.arange(8).expand(4, 8)  # K = V: no tail at all
    assert torch.isfinite(ranking_log_buckets(torch.randn(4, 8), ids_all, 8)).all()


def test_student_head_matches_the_models_own_logits_granite_scaling():
    """TargetLogits applies the head exactly as the model's forward does, including Granite's
    logits_scaling (which a hand-written scale/soft-cap path had missed)."""
    from transformers import AutoModelForCausalLM, GraniteConfig

    from pipeline.training.student import TargetLogits

    torch.manual_seed(0)
    cfg = GraniteConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, logits_scaling=4.0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(0, 40, (2, 7))
    att = torch.ones_like(ids)
    tb, tt = torch.tensor([0, 0, 1]), torch.tensor([1, 6, 3])
    ours = TargetLogits(model)(ids, att, tb, tt)
    ref = model(input_ids=ids, attention_mask=att).logits[tb, tt - 1].float()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_non_finite_loss_stops_naming_the_step_and_rows_and_saves_nothing(tmp_path, prepared_dir, cache_dir,
                                                                          vocab_size):
    # A student whose head holds a NaN: its first step's losses are NaN. Training must stop with one line
    # naming the step and the cache rows, and write neither final/ nor a checkpoint from that state.
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(student_config(tmp_path, vocab_size, STUDENT_LLAMA))
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        model.get_output_embeddings().weight[3, 0] = math.nan
    model.save_pretrained(tmp_path / "nan_student")
    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["train", "--cache", str(cache_dir), "--student", str(tmp_path / "nan_student"),
                                    "--out", str(out), "--max-steps", "5", "--batch-size", "4", "--save-every", "1"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    err = [ln for ln in res.output.splitlines() if "error:" in ln]
    assert len(err) == 1 and "step 1: non-finite" in err[0] and "cache rows" in err[0], res.output
    assert "stopped without saving" in err[0]
    assert not (out / "final").exists() and not (out / "checkpoints").exists()


def test_kd_options_without_a_cache_are_refused(tmp_path, prepared_dir, vocab_size):
    """Without --cache there is nothing to distil: a KD option would be ignored (plain CE), so it is refused,
    naming each option, before anything is written."""
    ok = student_config(tmp_path, vocab_size, STUDENT_LLAMA)
    for extra, named in ((["--gate", "topk"], "--gate"), (["--latf", "--idts"], "--latf, --idts"),
                         (["--temperature", "2"], "--temperature"), (["--select", "student_entropy"], "--select")):
        out = tmp_path / "nocache"
        res = CliRunner().invoke(main, ["train", "--data", str(prepared_dir), "--student-config", ok, "--out",
                                        str(out), "--max-steps", "1", *extra])
        assert res.exit_code == 1 and "Traceback" not in res.output, res.output
        assert f"error: {named} shape" in res.output and "--cache" in res.output, res.output
        assert not out.exists()


def test_temperatures_outside_the_grid_name_the_option_and_its_limit(tmp_path, cache_dir, vocab_size):
    """--idts-c 3 once said 'temperature 0.0497871 is outside the grid': now the line names IDTS's span, the
    grid, and the largest --idts-c that fits."""
    from pipeline.cache import open_cache

    lo, hi = min(open_cache(cache_dir).temperatures), max(open_cache(cache_dir).temperatures)
    ok = student_config(tmp_path, vocab_size, STUDENT_LLAMA)
    base = ["train", "--cache", str(cache_dir), "--student-config", ok, "--out", str(tmp_path / "t")]
    res = CliRunner().invoke(main, [*base, "--idts", "--idts-c", "3"])
    fit = math.floor(min(math.log(1 / lo), math.log(hi)) * 100) / 100
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    assert f"uses temperatures from {math.exp(-3):.3g} to {math.exp(3):.3g}" in res.output, res.output
    assert f"grid [{lo:g}, {hi:g}]" in res.output and f"use --idts-c {fit:g} or less" in res.output, res.output
    res = CliRunner().invoke(main, [*base, "--temperature", "9"])
    assert res.exit_code == 1 and "--temperature 9 is outside the cache's temperature grid" in res.output
    assert not (tmp_path / "t" / "final").exists()


def test_gate_k_is_checked_against_the_cache(tmp_path, cache_dir, vocab_size):
    from pipeline.cache import open_cache

    k = open_cache(cache_dir).k
    ok = student_config(tmp_path, vocab_size, STUDENT_LLAMA)
    res = CliRunner().invoke(main, ["train", "--cache", str(cache_dir), "--student-config", ok, "--out",
                                    str(tmp_path / "g"), "--gate", "topk", "--gate-k", str(k + 1)])
    assert res.exit_code == 1 and f"gate_k {k + 1} exceeds the cache's K = {k}" in res.output
    assert not (tmp_path / "g" / "final").exists()


def test_gate_draws_differ_per_rank_and_the_trainer_uses_them(tmp_path, prepared_dir, cache_dir, vocab_size):
    from pipeline.losses.objective import gate_generator

    a = torch.rand(64, generator=gate_generator(3, 0))
    b = torch.rand(64, generator=gate_generator(3, 1))
    assert not torch.equal(a, b)
    assert torch.equal(a, torch.rand(64, generator=gate_generator(3, 0)))
    t = Trainer(TrainConfig(cache=str(cache_dir), student_config=student_config(tmp_path, vocab_size, STUDENT_LLAMA),
                            out=str(tmp_path / "r"), max_steps=1, seed=3, gate="spec"))
    assert torch.equal(t.gen.get_state(), gate_generator(3, 0).get_state())


def test_mixed_dtype_shards_are_refused(tmp_path, prepared_dir, cache_dir, vocab_size):
    mixed = tmp_path / "mixed"
    shutil.copytree(cache_dir, mixed)
    rec_path = mixed / "shards" / "shard_00001" / "_COMMIT.json"
    rec = json.loads(rec_path.read_text())
    rec["dtype"] = "bfloat16"
    rec_path.write_text(json.dumps(rec))
    ok = student_config(tmp_path, vocab_size, STUDENT_LLAMA)
    res = CliRunner().invoke(main, ["train", "--cache", str(mixed), "--data", str(prepared_dir), "--student-config", ok,
                                    "--out", str(tmp_path / "m")])
    assert res.exit_code == 1 and "different dtypes" in res.output and "Traceback" not in res.output


def test_out_of_memory_is_one_line_naming_the_batch_setting(tmp_path, prepared_dir, cache_dir, vocab_size):
    # A real allocation failure: the process may use 3 GB of address space, training needs more (a student
    # whose 4 layers of hidden size 2048 hold 1.1 GB of weights, then gradients and AdamW state).
    import os
    import subprocess
    import sys

    big = student_config(tmp_path, vocab_size, STUDENT_LLAMA, name="big.json", hidden_size=2048,
                         intermediate_size=8192, num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=16)
    kdcache = Path(sys.executable).with_name("kdcache")
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30)); "
            "from stages.cli import main; sys.argv = sys.argv[1:]; main()")
    proc = subprocess.run([sys.executable, "-c", code, str(kdcache), "train", "--cache", str(cache_dir),
                           "--student-config", big, "--out", str(tmp_path / "oom"), "--max-steps", "2",
                           "--batch-size", "60", "--device", "cpu"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert len(lines) == 1 and "out of memory" in lines[0] and "--batch-size" in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "oom" / "final").exists()


@pytest.mark.parametrize("kind", ["llama", "gpt2", "qwen2"])
def test_hidden_states_at_targets_do_not_need_the_attention_mask(tmp_path, kind, vocab_size):
    # Right padding + causal attention: a position never attends to the padding after it, so the forward
    # without a mask (SDPA's causal kernels) gives the masked forward's hidden states at every valid position.
    from transformers import AutoModelForCausalLM

    from conftest import save_tiny_model
    from pipeline.data.batching import pad_right
    from pipeline.training.student import target_hidden

    model = AutoModelForCausalLM.from_pretrained(save_tiny_model(kind, vocab_size, tmp_path / kind)).eval()
    g = np.random.default_rng(0)
    seqs = [g.integers(1, vocab_size, n) for n in (30, 17, 5, 22)]
    ids, att = (torch.from_numpy(a) for a in pad_right(seqs))
    tb = torch.cat([torch.full((len(s) - 1,), b) for b, s in enumerate(seqs)])
    tt = torch.cat([torch.arange(1, len(s)) for s in seqs])
    with torch.no_grad():
        masked = model.base_model(input_ids=ids, attention_mask=att).last_hidden_state[tb, tt - 1]
        ours = target_hidden(model, ids, att, tb, tt)
    torch.testing.assert_close(ours, masked, rtol=0, atol=1e-6)
