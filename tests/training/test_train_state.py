"""Re-running the same `kdcache train` command continues an interrupted run (Ctrl-C, a second Ctrl-C
mid-step, a time limit), says how many steps are redone, and ends with the weights of a run that was
never interrupted; other settings are refused naming the keys.

    .venv/bin/python -m pytest tests/training/test_train_state.py -q
"""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from pipeline.training.trainer import Trainer
from pipeline.training.state import read_state
from stages.cli import main

pytestmark = pytest.mark.usefixtures("torch_one_thread")

STUDENT_GPT2 = {"model_type": "gpt2", "n_embd": 24, "n_layer": 2, "n_head": 2, "n_positions": 128,
                "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1}  # dropout: RNG state must resume too
STEPS = 8


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, prepared_dir, llama_dir) -> Path:
    from pipeline.teacher.runner import TeacherConfig, run_teacher

    out = tmp_path_factory.mktemp("cache") / "cache"
    run_teacher(TeacherConfig(data=str(prepared_dir), model=str(llama_dir), out=str(out), shard_rows=200,
                              chunk_rows=64, top_k=8, device="cpu"))
    return out


@pytest.fixture(scope="module")
def args(tmp_path_factory, cache_dir, vocab_size) -> list[str]:
    """`kdcache train` options less --out: sampled gate, LATF and IDTS, so every piece of state matters."""
    scfg = tmp_path_factory.mktemp("student") / "student.json"
    scfg.write_text(json.dumps({**STUDENT_GPT2, "vocab_size": vocab_size}))
    return ["train", "--cache", str(cache_dir), "--student-config", str(scfg), "--max-steps", str(STEPS),
            "--batch-size", "4", "--gate", "spec", "--proposal", "sample", "--latf", "--latf-warmup", "0.25",
            "--idts", "--seed", "5", "--lr", "3e-3", "--device", "cpu"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, args) -> Path:
    out = tmp_path_factory.mktemp("straight") / "run"
    res = CliRunner().invoke(main, [*args, "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out


def same_run(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    rows = lambda p: [{k: v for k, v in json.loads(ln).items() if k != "tokens_per_s"}  # noqa: E731
                      for ln in (p / "metrics.jsonl").read_text().splitlines()]
    assert rows(a) == rows(b)


@pytest.fixture
def sigint_guard():
    """If the trainer failed to take over SIGINT, the signal the tests send must fail the test, not
    stop pytest (which treats KeyboardInterrupt as the user aborting the session)."""
    received = []
    previous = signal.signal(signal.SIGINT, lambda *a: received.append(True))
    yield received
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_checkpoints_the_step_and_the_same_command_continues(tmp_path, args, straight, monkeypatch,
                                                                     sigint_guard, caplog):
    step_fn = Trainer.train_step

    def train_step(self, mbs, apply=True):
        row = step_fn(self, mbs, apply)
        if self.step == 2:  # the step being computed is step 3: Ctrl-C arrives in the middle of it
            os.kill(os.getpid(), signal.SIGINT)
        return row

    monkeypatch.setattr(Trainer, "train_step", train_step)
    out = tmp_path / "run"
    res = CliRunner().invoke(main, [*args, "--out", str(out)])
    assert res.exit_code == 130, res.output
    assert "kdcache train: interrupted at step 3 of 8; saved a checkpoint there: re-run the same command to " \
           "continue (no steps redone)" in res.output and "Traceback" not in res.output
    assert not sigint_guard, "the trainer did not handle SIGINT itself"
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_000003"] and not (out / "final").exists()

    computed = []

    def counting_step(self, mbs, apply=True):
        computed.append(self.step + 1)
        return step_fn(self, mbs, apply)

    monkeypatch.setattr(Trainer, "train_step", counting_step)
    with caplog.at_level(logging.INFO, logger="pipeline.training.trainer"):
        res = CliRunner().invoke(main, [*args, "--out", str(out)])  # the same command, no --resume
    assert res.exit_code == 0, res.output
    assert "train: 8/8 steps" in res.output and computed == [4, 5, 6, 7, 8]
    assert "continuing from checkpoint step 3 of 8; no steps redone" in caplog.text
    same_run(out, straight)


def test_forced_interrupt_mid_step_says_how_many_steps_are_redone(tmp_path, args, straight, monkeypatch, caplog):
    """A KeyboardInterrupt inside a step (a second Ctrl-C) cannot be checkpointed: the run continues from
    the newest checkpoint, and both the interrupt and the re-run say how many steps that redoes."""
    step_fn = Trainer.train_step

    def train_step(self, mbs, apply=True):
        if self.step == 4:
            raise KeyboardInterrupt  # during step 5, after the step-3 checkpoint
        return step_fn(self, mbs, apply)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    out = tmp_path / "run"
    res = CliRunner().invoke(main, [*args, "--out", str(out), "--save-every", "3"])
    assert res.exit_code == 130, res.output
    assert ("interrupted during step 5 of 8; the newest checkpoint is step 3: re-run the same command to continue "
            "from it (1 step(s) redone)") in res.output
    monkeypatch.setattr(Trainer, "train_step", step_fn)
    with caplog.at_level(logging.INFO, logger="pipeline.training.trainer"):
        res = CliRunner().invoke(main, [*args, "--out", str(out), "--save-every", "3"])
    assert res.exit_code == 0, res.output
    assert "continuing from checkpoint step 3 of 8; the previous run had reached step 4: 1 step(s) redone" \
        in caplog.text
    same_run(out, straight)


def test_time_limited_slices_then_done(tmp_path, args, straight, caplog):
    """--stop-after N repeated (a job with a time limit): each slice continues; a finished run does nothing."""
    out = tmp_path / "run"
    runner = CliRunner()
    for expect in ("3/8", "6/8", "8/8"):
        res = runner.invoke(main, [*args, "--out", str(out), "--stop-after", "3"])
        assert res.exit_code == 0 and f"train: {expect} steps" in res.output, res.output
    same_run(out, straight)
    res = runner.invoke(main, [*args, "--out", str(out)])
    assert res.exit_code == 0 and "final is complete for these settings (8 steps); nothing to do" in res.output


def test_other_settings_are_refused_naming_them_and_overwrite_retrains(tmp_path, args, straight):
    out = tmp_path / "run"
    runner = CliRunner()
    res = runner.invoke(main, [*args, "--out", str(out), "--stop-after", "2"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, [*args, "--out", str(out), "--lr", "1e-3", "--max-steps", "4"])
    assert res.exit_code == 1, res.output
    err = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(err) == 1 and "config changed (lr 0.003 -> 0.001, max_steps 8 -> 4)" in err[0]
    assert "--overwrite" in err[0] and "--resume" in err[0]
    res = runner.invoke(main, [*args, "--out", str(out), "--lr", "1e-3", "--max-steps", "4", "--overwrite"])
    assert res.exit_code == 0 and "train: 4/4 steps" in res.output, res.output


def test_state_follows_the_inputs_not_only_the_config(tmp_path, args, straight, cache_dir):
    """A rebuilt cache under an unchanged config makes the run 'changed', naming the input."""
    import shutil

    from pipeline.config import resolve
    from pipeline.training.config import TrainConfig

    run = tmp_path / "run"
    shutil.copytree(straight, run)
    cfg = resolve(TrainConfig, None, [], {"out": str(run), "cache": str(cache_dir), "student_config": args[4],
                                          "max_steps": STEPS, "batch_size": 4, "gate": "spec", "proposal": "sample",
                                          "latf": True, "latf_warmup": 0.25, "idts": True, "seed": 5, "lr": 3e-3,
                                          "device": "cpu"})
    assert read_state(run, cfg).kind == "final"
    record = json.loads((run / "kdcache_train.json").read_text())
    record["inputs"]["cache"] = "0" * 64  # as if made from a cache since rebuilt
    (run / "kdcache_train.json").write_text(json.dumps(record))
    state = read_state(run, cfg)
    assert state.kind == "changed" and state.why() == "inputs changed (teacher cache)"


def test_ctrl_c_does_not_checkpoint_non_finite_weights(tmp_path, args, monkeypatch, sigint_guard):
    step_fn = Trainer.train_step

    def train_step(self, mbs, apply=True):
        row = step_fn(self, mbs, apply)
        if self.step == 2:  # step 3 diverged, and the user pressed Ctrl-C
            with torch.no_grad():
                next(self.model.parameters()).fill_(float("nan"))
            os.kill(os.getpid(), signal.SIGINT)
        return row

    monkeypatch.setattr(Trainer, "train_step", train_step)
    out = tmp_path / "run"
    res = CliRunner().invoke(main, [*args, "--out", str(out), "--save-every", "2"])
    assert res.exit_code == 130, res.output
    assert ("interrupted at step 3 of 8; its weights are not finite, so it was not checkpointed; the newest "
            "checkpoint is step 2: re-run the same command to continue from it (1 step(s) redone)") in res.output
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_000002"]
