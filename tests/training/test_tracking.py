"""Tracking and held-out evaluation during training: --report-to, --eval-every, OUT/best and its resume.

    .venv/bin/python -m pytest tests/training/test_tracking.py -q

The truths here are independent of the trainer: `kdcache eval` of the saved models for the held-out
figures, the metrics log for which step was best, TensorBoard's and W&B's own readers for what the
trackers received.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from pipeline.ownership import TRAIN, scan
from pipeline.training.trainer import train
from pipeline.training.config import TrainConfig
from stages.cli import main

pytestmark = pytest.mark.usefixtures("torch_one_thread")

STUDENT = {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
           "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 128,
           "tie_word_embeddings": True}
FIGURES = ("ce", "ppl", "teacher_top1_agreement", "fkl_to_teacher")


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def rows(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, prepared_dir, llama_dir, tokenizer_dir, vocab_size) -> dict[str, str]:
    """A training cache, a held-out split with its own cache, a student config."""
    from conftest import make_pairs

    from pipeline.teacher.runner import TeacherConfig, run_teacher

    root = tmp_path_factory.mktemp("tracking")
    src = root / "heldout.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in make_pairs(12, seed=9)))
    res = invoke("prepare", "--data", src, "--tokenizer", tokenizer_dir, "--out", root / "heldout", "--max-length", 64)
    assert res.exit_code == 0, res.output
    for data, out in ((prepared_dir, root / "cache"), (root / "heldout", root / "heldout_cache")):
        run_teacher(TeacherConfig(data=str(data), model=str(llama_dir), out=str(out), top_k=8, shard_rows=200,
                                  device="cpu"))
    student = root / "student.json"
    student.write_text(json.dumps({**STUDENT, "vocab_size": vocab_size}))
    return {"cache": str(root / "cache"), "eval_data": str(root / "heldout"), "eval_cache": str(root / "heldout_cache"),
            "student_config": str(student)}


def config(setup: dict[str, str], out: Path, **over) -> TrainConfig:
    keys = dict(cache=setup["cache"], student_config=setup["student_config"], max_steps=8, batch_size=8, lr=0.05,
                seed=1, device="cpu", eval_every=2, eval_data=setup["eval_data"], eval_cache=setup["eval_cache"],
                best_metric="fkl_to_teacher")
    return TrainConfig(out=str(out), **{**keys, **over})


@pytest.fixture(scope="module")
def straight(tmp_path_factory, setup) -> Path:
    out = tmp_path_factory.mktemp("runs") / "straight"
    s = train(config(setup, out))
    assert s["finished"] and s["best"]["step"] is not None
    return out


def kdcache_eval(model: Path, setup: dict[str, str], out: Path) -> dict:
    res = invoke("eval", "--model", model, "--data", setup["eval_data"], "--cache", setup["eval_cache"], "--out", out,
                 "--device", "cpu")
    assert res.exit_code == 0, res.output
    return json.loads((out / "eval.json").read_text())


def test_held_out_figures_are_kdcache_evals_and_best_is_the_logged_optimum(tmp_path, straight, setup):
    log = rows(straight)
    evaluated = [r for r in log if "eval_ce" in r]
    assert [r["step"] for r in evaluated] == [2, 4, 6, 8]
    assert all("eval_ce" not in r for r in log if r["step"] % 2)
    # The last row's figures are those `kdcache eval` gives for final/ (the same weights).
    ev = kdcache_eval(straight / "final", setup, tmp_path / "final_eval")
    for k in FIGURES:
        assert evaluated[-1][f"eval_{k}"] == pytest.approx(ev[k], rel=1e-5, abs=1e-7), k
    # best/ is the logged minimum of fkl_to_teacher, and it is that step's model.
    best_row = min(evaluated, key=lambda r: r["eval_fkl_to_teacher"])
    record = json.loads((straight / "best" / "best.json").read_text())
    assert record["step"] == best_row["step"] and record["metric"] == "fkl_to_teacher"
    assert record["value"] == pytest.approx(best_row["eval_fkl_to_teacher"])
    ev_best = kdcache_eval(straight / "best", setup, tmp_path / "best_eval")
    assert ev_best["fkl_to_teacher"] == pytest.approx(best_row["eval_fkl_to_teacher"], rel=1e-5)
    assert scan(straight, TRAIN)[1] == []
    # A loadable model directory with its tokenizer.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(straight / "best")
    AutoTokenizer.from_pretrained(straight / "best")


def test_held_out_evaluation_does_not_change_training(tmp_path, straight, setup):
    from safetensors.torch import load_file

    plain = tmp_path / "plain"
    train(config(setup, plain, eval_every=0))
    a, b = load_file(straight / "final" / "model.safetensors"), load_file(plain / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "tokens_per_s" and not k.startswith("eval_")}  # noqa: E731
                        for r in rs]
    assert strip(rows(straight)) == strip(rows(plain))
    assert not (plain / "best").exists()


@pytest.mark.parametrize("metric, better", [("ce", min), ("teacher_top1_agreement", max)])
def test_best_metric_direction(tmp_path, straight, setup, metric, better):
    """The same trajectory (training is independent of evaluation), another metric: its own optimum."""
    out = tmp_path / metric
    train(config(setup, out, best_metric=metric))
    evaluated = [r for r in rows(out) if f"eval_{metric}" in r]
    want = better(evaluated, key=lambda r: r[f"eval_{metric}"])  # ties: the first reaching it (min/max do the same)
    assert json.loads((out / "best" / "best.json").read_text())["step"] == want["step"]


def test_best_survives_a_resume(tmp_path, straight, setup):
    from safetensors.torch import load_file

    from pipeline.training.checkpoint import latest_checkpoint, load_state

    out = tmp_path / "resumed"
    half = train(config(setup, out, stop_after=5))
    assert not half["finished"]
    evaluated = [r for r in rows(out) if "eval_fkl_to_teacher" in r]
    first = min(evaluated, key=lambda r: r["eval_fkl_to_teacher"])
    state = load_state(latest_checkpoint(out))["best"]
    assert state["step"] == first["step"] and state["value"] == pytest.approx(first["eval_fkl_to_teacher"])
    train(config(setup, out))  # the same command again: continues
    assert (json.loads((out / "best" / "best.json").read_text())
            == json.loads((straight / "best" / "best.json").read_text()))
    a, b = load_file(straight / "best" / "model.safetensors"), load_file(out / "best" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_best_is_kept_when_later_steps_are_worse(tmp_path, setup):
    """A learning rate warming up to far too much: held-out CE gets worse after an early minimum, and best/ stays
    there across the resume (the value is restored from the checkpoint, not re-set by the first evaluation after)."""
    out = tmp_path / "overshoot"
    settings = dict(lr=2.0, warmup=8, schedule="constant", max_grad_norm=0.0, best_metric="ce")
    train(config(setup, out, stop_after=4, **settings))
    train(config(setup, out, **settings))
    evaluated = [r for r in rows(out) if "eval_ce" in r]
    best = min(evaluated, key=lambda r: r["eval_ce"])
    assert best["step"] <= 4 < evaluated[-1]["step"], [r["eval_ce"] for r in evaluated]  # the case under test
    assert json.loads((out / "best" / "best.json").read_text())["step"] == best["step"]


def test_eval_settings_are_checked_before_training(tmp_path, setup, other_prepared):
    base = ["train", "--cache", setup["cache"], "--student-config", setup["student_config"], "--max-steps", 2,
            "--device", "cpu"]
    cases = [(["--eval-every", 2], "--eval-every needs --eval-data"),
             (["--eval-every", 2, "--eval-data", setup["eval_data"], "--best-metric", "fkl_to_teacher"],
              "needs --eval-cache"),
             (["--eval-every", 2, "--eval-data", other_prepared], "prepare both with one tokenizer"),
             (["--report-to", "tensorbored"], "report_to must be"),
             (["--eval-every", 2, "--eval-data", setup["eval_data"], "--eval-cache", setup["cache"]],
              "other data")]
    for i, (extra, message) in enumerate(cases):
        out = tmp_path / f"r{i}"
        res = invoke(*base, "--out", out, *extra)
        lines = [ln for ln in res.output.splitlines() if ln.strip()]
        assert res.exit_code == 1 and len(lines) == 1 and message in lines[0], (extra, res.output)
        assert not out.exists()


@pytest.fixture(scope="module")
def other_prepared(tmp_path_factory, data_file) -> Path:
    """The same records prepared with another tokenizer."""
    from pipeline.data.bpe_tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("other")
    train_tokenizer([f"zebra quartz {i} jumping fox vexed nymph {i * 7}" for i in range(300)], root / "tok",
                    vocab_size=300)
    res = invoke("prepare", "--data", data_file, "--tokenizer", root / "tok", "--out", root / "prepared")
    assert res.exit_code == 0, res.output
    return root / "prepared"


# ---- trackers ----------------------------------------------------------------------------------

def test_default_writes_jsonl_only(straight):
    assert (straight / "metrics.jsonl").is_file()
    assert not (straight / "tensorboard").exists() and not (straight / "wandb").exists()


def test_tensorboard_requested_without_the_package_is_one_line(tmp_path, setup, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # what an environment without it looks like to import
    out = tmp_path / "tb"
    res = invoke("train", "--cache", setup["cache"], "--student-config", setup["student_config"], "--out", out,
                 "--max-steps", 2, "--device", "cpu", "--report-to", "tensorboard")
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 1 and len(lines) == 1, res.output
    assert "pip install 'kdcache[tensorboard]'" in lines[0] and not out.exists()


def test_tensorboard_receives_every_logged_number(tmp_path, setup):
    pytest.importorskip("tensorboard", reason="the [tensorboard] extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    train(config(setup, out, max_steps=4, report_to=["tensorboard"]))
    assert scan(out, TRAIN)[1] == []
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    for key in ("loss", "kd_loss", "eval_fkl_to_teacher", "tokens_seen"):
        want = [(r["step"], r[key]) for r in rows(out) if key in r]
        got = [(e.step, e.value) for e in acc.Scalars(key)]
        assert [s for s, _ in got] == [s for s, _ in want], key
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6), key


def _wandb_history(run_file: Path) -> list[dict]:
    """History records of an offline .wandb file: LevelDB-log framing (32 KiB blocks, 7-byte record headers
    after a 7-byte file header), each record a wandb protobuf `Record`."""
    from wandb.proto import wandb_internal_pb2 as pb

    buf, pos, block = run_file.read_bytes(), 7, 32768
    assert buf[:4] == b":W&B"
    out, part = [], b""
    while pos + 7 <= len(buf):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        n, kind = int.from_bytes(buf[pos + 4: pos + 6], "little"), buf[pos + 6]
        if kind == 0 and n == 0:  # block padding
            pos += left
            continue
        part += buf[pos + 7: pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # a full record, or the last fragment of one
            rec = pb.Record()
            rec.ParseFromString(part)
            part = b""
            if rec.WhichOneof("record_type") == "history":
                out.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
    return out


def test_wandb_offline_run_holds_the_metrics(tmp_path, setup, monkeypatch):
    pytest.importorskip("wandb", reason="the [wandb] extra is not installed")
    monkeypatch.delenv("WANDB_MODE", raising=False)  # kdcache's default: offline
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))
    out = tmp_path / "wb"
    train(config(setup, out, max_steps=4, report_to=["wandb", "tensorboard"] if _has("tensorboard") else ["wandb"]))
    # W&B's service process writes the offline file asynchronously, even after run.finish(); the CLI's exit
    # waits for it, here teardown does (under load the file was still its bare header when read).
    import wandb

    wandb.teardown()
    assert scan(out, TRAIN)[1] == []  # wandb/, tensorboard/, best/ are train's own: --overwrite may remove them
    files = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    history = {int(h["_step"]): h for h in _wandb_history(files[0])}
    assert sorted(history) == [r["step"] for r in rows(out)], (sorted(history), files[0].stat().st_size)
    for r in rows(out):
        for key in ("loss", "kd_loss", "lr", "tokens_seen", "eval_ce"):
            if key in r:
                assert history[r["step"]][key] == pytest.approx(r[key], rel=1e-6), (r["step"], key)


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
