"""`kdcache train --follow`: training alongside a running `kdcache teacher` (a second process).

    .venv/bin/python -m pytest tests/training/test_follow.py -q
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from click.testing import CliRunner

from pipeline.cache import layout, open_cache
from pipeline.cache import reader as cache_reader
from pipeline.losses.objective import KD_FIELDS
from pipeline.training.trainer import Trainer
from pipeline.training.config import TrainConfig
from stages.cli import main

STUDENT = {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
           "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 128,
           "tie_word_embeddings": True}


def teacher_command(prepared_dir: Path, llama_dir: Path, out: Path) -> list[str]:
    kdcache = Path(sys.executable).with_name("kdcache")
    return [str(kdcache), "teacher", "--data", str(prepared_dir), "--model", str(llama_dir), "--out", str(out),
            "--shard-rows", "40", "--chunk-rows", "16", "--device", "cpu", "--dtype", "float32"]


def student_config(tmp_path: Path, vocab_size: int) -> str:
    p = tmp_path / "student.json"
    p.write_text(json.dumps({**STUDENT, "vocab_size": vocab_size}))
    return str(p)


def wait_for(pred, timeout: float, what: str) -> None:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def test_train_follows_a_running_teacher(tmp_path, prepared_dir, llama_dir, vocab_size, monkeypatch):
    """The teacher runs in a second process and is paused after its first commit; training starts on that
    partial cache and resumes the teacher only when it must wait for an uncommitted shard. Training
    never opens an uncommitted shard, every row it trains on is the finished cache's row, and the weights
    equal those of the same command run on the finished cache."""
    cache = tmp_path / "cache"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    teacher = subprocess.Popen(teacher_command(prepared_dir, llama_dir, cache), env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    paused = False
    try:
        wait_for(lambda: layout.is_committed(cache, 0), 180, "the teacher's first shard")
        teacher.send_signal(signal.SIGSTOP)
        paused = True
        n_shards = len(json.loads((cache / layout.META_FILENAME).read_text())["shards"])
        at_start = sum(layout.is_committed(cache, i) for i in range(n_shards))
        assert at_start < n_shards, "the teacher finished before it could be paused: nothing to follow"

        opened, waits = [], []
        real_open, real_wait = cache_reader.open_array, cache_reader.Cache.wait_committed

        def spy_open(path, *a, **k):  # every shard file the reader opens, and whether it was committed then
            opened.append((path.parent.name, (path.parent / layout.COMMIT_FILENAME).is_file()))
            return real_open(path, *a, **k)

        def spy_wait(self, i, *a, **k):
            nonlocal paused
            waits.append((i, layout.is_committed(self.path, i)))
            if paused and not waits[-1][1]:  # the reader needs a shard that is not there: let the teacher go on
                teacher.send_signal(signal.SIGCONT)
                paused = False
            return real_wait(self, i, *a, **k)

        monkeypatch.setattr(cache_reader, "open_array", spy_open)
        monkeypatch.setattr(cache_reader.Cache, "wait_committed", spy_wait)
        trained = []
        real_step = Trainer.train_step

        def spy_step(self, mbs, apply=True):
            trained.extend((mb.examples, {k: v.clone() for k, v in mb.cache.items()}) for mb in mbs)
            return real_step(self, mbs, apply)

        monkeypatch.setattr(Trainer, "train_step", spy_step)
        common = dict(cache=str(cache), student_config=student_config(tmp_path, vocab_size), follow=True,
                      batch_tokens=120, gate="topk", seed=2, device="cpu")
        t = Trainer(TrainConfig(out=str(tmp_path / "followed"), **common))
        t.stream.poll_seconds = 0.05
        summary = t.run()
        assert summary["finished"] and summary["steps"] == t.stream.batches_in_epoch(0)
    finally:
        if paused:
            teacher.send_signal(signal.SIGCONT)
        _, err = teacher.communicate(timeout=300)
    assert teacher.returncode == 0, err[-2000:]

    assert any(not ok for _, ok in waits), "training never waited for a shard"
    assert opened and all(ok for _, ok in opened), [name for name, ok in opened if not ok]
    assert len({name for name, _ in opened}) == n_shards
    final = open_cache(cache)
    assert final.complete
    fields = tuple(f for f in KD_FIELDS if f != "target_rank")
    seen = []
    for examples, rows in trained:
        want = [final.read(final.index.column("row_start")[e].as_py(),
                           final.index.column("row_start")[e].as_py() + final.index.column("row_count")[e].as_py(),
                           fields) for e in examples]
        for k in fields:
            assert np.array_equal(rows[k].numpy(), np.concatenate([w[k] for w in want])), k
        seen += examples
    assert sorted(seen) == [e for e in range(len(final.index)) if final.index.column("row_count")[e].as_py() > 0]

    monkeypatch.undo()
    again = Trainer(TrainConfig(out=str(tmp_path / "finished"), **common))
    again.run()
    from safetensors.torch import load_file

    a = load_file(tmp_path / "followed" / "final" / "model.safetensors")
    b = load_file(tmp_path / "finished" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_follow_gives_up_on_a_shard_that_never_comes(tmp_path, llama_cache, vocab_size):
    cache = tmp_path / "cache"
    shutil.copytree(llama_cache, cache)
    (layout.shard_dir(cache, 3) / layout.COMMIT_FILENAME).unlink()  # as if the teacher died before shard 3
    args = ["train", "--cache", str(cache), "--student-config", student_config(tmp_path, vocab_size),
            "--out", str(tmp_path / "run"), "--max-steps", "50", "--batch-size", "4", "--no-shuffle"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1 and "incomplete" in res.output and "--follow" in res.output
    res = CliRunner().invoke(main, args + ["--follow", "--follow-timeout", "1"])
    assert res.exit_code == 1, res.output
    line = [ln for ln in res.output.splitlines() if "error" in ln]
    assert len(line) == 1 and "shard_00003" in line[0] and "--follow-timeout" in line[0], res.output
    assert "Traceback" not in res.output
