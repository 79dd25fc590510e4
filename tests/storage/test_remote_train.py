"""`kdcache train --out URL`: a run kept on an object store (memory://, and file:// for a real kill -9).

Truth is the same run trained on a local disk without interruption: a URL run interrupted anywhere in its
uploads, or killed, and re-run (on a fresh machine: nothing local is kept) ends with the same weights and the
same metrics rows, bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import fsspec
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from pipeline.errors import CorruptionError, KdError
from pipeline.storage import Store, store_for
from pipeline.training.config import TrainConfig
from pipeline.training.trainer import train
from stages.cli import main

pytestmark = pytest.mark.usefixtures("torch_one_thread")

STUDENT = {"model_type": "gpt2", "n_embd": 16, "n_layer": 1, "n_head": 2, "n_positions": 128,
           "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1}


@pytest.fixture(scope="module")
def cache_dir(student_cache) -> Path:
    return student_cache


@pytest.fixture(scope="module")
def common(tmp_path_factory, prepared_dir, cache_dir, vocab_size) -> dict:
    """A run that uses every RNG stream a resume must restore: dropout, shuffling, the sampled gate, LATF."""
    p = tmp_path_factory.mktemp("student") / "student.json"
    p.write_text(json.dumps({**STUDENT, "vocab_size": vocab_size}))
    return dict(data=str(prepared_dir), cache=str(cache_dir), student_config=str(p), max_steps=6, batch_size=4,
                save_every=2, gate="spec", proposal="sample", latf=True, latf_warmup=0.2, idts=True, seed=5,
                lr=3e-3, eval_every=3, eval_data=str(prepared_dir))


@pytest.fixture(scope="module")
def straight(tmp_path_factory, common) -> Path:
    """The uninterrupted run on a local disk."""
    out = tmp_path_factory.mktemp("straight") / "kd"
    assert train(TrainConfig(out=str(out), **common))["finished"]
    return out


def _url() -> str:
    return f"memory://kd-{uuid.uuid4().hex[:8]}/runs/kd"


def _rows(text: str) -> list[dict]:
    return [{k: v for k, v in json.loads(ln).items() if k not in ("tokens_per_s", "eval_seconds")}
            for ln in text.splitlines()]


def _same_run(url: str, straight: Path) -> None:
    s = store_for(url)
    with fsspec.open(f"{url}/final/model.safetensors", "rb") as f:
        from safetensors.torch import load

        a = load(f.read())
    b = load_file(straight / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _rows(s.read_bytes("metrics.jsonl").decode()) == _rows((straight / "metrics.jsonl").read_text())
    assert json.loads(s.read_bytes("best/best.json")) == json.loads((straight / "best" / "best.json").read_text())


class _Killed(BaseException):
    """The process dies here (BaseException: nothing catches it on the way out)."""


def _kill_at(monkeypatch, n: int) -> list[str]:
    """Make the n-th write to any store (an upload, a PUT, a delete) die before it happens."""
    done: list[str] = []
    for name in ("put_file", "write_bytes", "delete"):
        real = getattr(Store, name)

        def wrapped(self, *a, _real=real, _name=name, **k):
            if len(done) == n:
                raise _Killed()
            done.append(f"{_name} {a[1] if _name == 'put_file' else a[0]}")
            return _real(self, *a, **k)

        monkeypatch.setattr(Store, name, wrapped)
    return done


def test_a_url_run_interrupted_anywhere_in_its_uploads_ends_as_the_uninterrupted_run(monkeypatch, common,
                                                                                     straight):
    """Uninterrupted at a URL first (it counts the writes), then the same run cut at writes spread over the
    whole run: inside a checkpoint's files, at its commit record, among the loose files, inside final/, while
    older checkpoints are deleted. Each re-run continues from what the URL holds and ends as `straight`."""
    url = _url()
    with monkeypatch.context() as m:
        writes = _kill_at(m, 10**9)
        assert train(TrainConfig(out=url, **common))["finished"]
    _same_run(url, straight)
    listing = sorted(store_for(url).sizes())
    assert [n for n in listing if n.startswith("checkpoints/")] and ".kdcache/lease.json" not in listing
    assert sorted({n.split("/")[1] for n in listing if n.startswith("checkpoints/")}) == ["step_000004",
                                                                                      "step_000006"]  # keep 2
    # Cut points: inside the second checkpoint's files, config.yaml, final/'s record, a pruning deletion.
    marks = [next(i for i, w in enumerate(writes) if w.startswith("put_file checkpoints/step_000004/")),
             next(i for i, w in enumerate(writes) if w == "put_file config.yaml"),
             next(i for i, w in enumerate(writes) if w.startswith("write_bytes final/_COMMIT")),
             next(i for i, w in enumerate(writes) if w.startswith("delete") and "step_000002" in w)]
    for n in marks:
        cut = _url()
        with monkeypatch.context() as m:
            _kill_at(m, n)
            with pytest.raises(_Killed):
                train(TrainConfig(out=cut, **common))
        # This process lives on, so its lease would refuse the re-run; a dead launch's is taken over (the kill -9
        # test below, tests/storage/test_remote_safety.py).
        store_for(cut).delete([".kdcache/lease.json"])
        assert train(TrainConfig(out=cut, **common))["finished"], writes[n]
        _same_run(cut, straight)
    # Finished: the same command has nothing to do, says where the run is, downloads no weights and takes no
    # lease (nothing is written: a finished run is told from what it uploaded last).
    fetched, written = [], []
    real_get, real_write = Store.get_file, Store.write_bytes
    monkeypatch.setattr(Store, "get_file", lambda self, rel, local: (fetched.append(rel), real_get(self, rel, local)))
    monkeypatch.setattr(Store, "write_bytes", lambda self, rel, data, create=False: (
        written.append(rel), real_write(self, rel, data, create=create)))
    res = CliRunner().invoke(main, ["train", "--out", url, *_args(common)])
    assert res.exit_code == 0 and f"train: {url}/final is complete for these settings (6 steps)" in res.output
    assert fetched == [] and written == []


def _args(common: dict) -> list[str]:
    out = []
    for k, v in common.items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            out.append(flag)
        else:
            out += [flag, str(v)]
    return out


def test_a_url_holding_other_files_is_refused_before_any_work(common):
    url = _url()
    s = store_for(url)
    s.write_bytes("notes.txt", b"mine")
    res = CliRunner().invoke(main, ["train", "--out", url, *_args(common)])
    assert res.exit_code != 0 and "notes.txt is not a file `kdcache train` writes" in res.output
    assert "Traceback" not in res.output and sorted(s.sizes()) == ["notes.txt"]  # no lease, nothing else


def test_other_settings_refused_then_overwrite_replaces_only_the_old_run(common, straight):
    url = _url()
    assert not train(TrainConfig(out=url, stop_after=4, **common))["finished"]
    s = store_for(url)
    s.write_bytes("eval/eval.json", b"{}")  # an evaluation of the old model, kept inside the run
    old4 = s.read_bytes("checkpoints/step_000004/_COMMIT.json")
    with pytest.raises(KdError, match=f"{url} holds a training run made differently: config changed \\(lr"):
        train(TrainConfig(out=url, **{**common, "lr": 1e-3}))
    assert train(TrainConfig(out=url, overwrite=True, **{**common, "lr": 1e-3}))["finished"]
    names = sorted(s.sizes())
    assert "eval/eval.json" not in names  # it described the old model
    assert [n.split("/")[1] for n in names if n.endswith("_COMMIT.json") and n.startswith("checkpoints")] == [
        "step_000004", "step_000006"]  # the old run's step 2 gone, its step 4 replaced:
    assert s.read_bytes("checkpoints/step_000004/_COMMIT.json") != old4
    assert "lr: 0.001" in s.read_bytes("config.yaml").decode()


def test_a_damaged_checkpoint_at_the_url_is_named_never_trained_on(common):
    url = _url()
    assert not train(TrainConfig(out=url, stop_after=4, **common))["finished"]
    s = store_for(url)
    rel = "checkpoints/step_000004/model.safetensors"
    data = bytearray(s.read_bytes(rel))
    data[len(data) // 2] ^= 0x01
    s.write_bytes(rel, bytes(data))
    with pytest.raises(CorruptionError, match=f"{rel}: checksum mismatch on arrival"):
        train(TrainConfig(out=url, **common))


def _kdcache() -> list[str]:
    exe = Path(sys.executable).with_name("kdcache")
    return [str(exe)] if exe.exists() else [sys.executable, "-c", "from stages.cli import main; main()"]


@pytest.mark.slow  # --runslow (22 s): two processes; the cut points above and the lease tests cover what it checks
def test_kill_9_of_a_run_at_a_file_url_then_the_same_command(tmp_path, common, straight):
    """A real kill -9 of `kdcache train --out file://...` once a checkpoint is committed there (the lease and a
    staging directory are left behind), then the same command: the run continues and ends as `straight`."""
    url = f"file://{tmp_path}/bucket/kd"
    cmd = [*_kdcache(), "train", "--out", url, *_args(common)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KDCACHE_STAGING": str(tmp_path / "staging")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    commit = tmp_path / "bucket" / "kd" / "checkpoints" / "step_000002" / "_COMMIT.json"
    deadline = time.monotonic() + 120
    try:
        while not commit.is_file():
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint committed in time"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert (tmp_path / "bucket" / "kd" / ".kdcache" / "lease.json").is_file()  # the dead launch's
    assert not (tmp_path / "bucket" / "kd" / "final").exists()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "continuing from checkpoint step" in res.stdout + res.stderr  # the dead launch's lease taken over
    _same_run(url, straight)
    assert not list((tmp_path / "staging" / "kdcache-staging").iterdir())  # the dead launch's copy went too


def test_a_second_launch_on_the_same_url_is_refused(common):
    """Another machine's launch holds the URL (its lease renewed a moment ago): refused, one line, its lease kept."""
    url = _url()
    s = store_for(url)
    holder = {"run_id": "f" * 32, "stage": "train", "host": "other-node", "pid": 4242, "started_s": time.time(),
              "heartbeat": time.time()}
    s.write_bytes(".kdcache/lease.json", json.dumps(holder).encode())
    res = CliRunner().invoke(main, ["train", "--out", url, *_args(common)])
    assert res.exit_code != 0 and "another `kdcache train` (run ffffffff, other-node pid 4242)" in res.output
    assert sorted(s.sizes()) == [".kdcache/lease.json"] and "Traceback" not in res.output


def test_a_finished_run_at_a_url_is_evaluated_and_trained_on_from_there(tmp_path, monkeypatch, common,
                                                                        prepared_dir, cache_dir, straight):
    """`eval --model URL`, `teacher --model URL` and `train --student URL` load the run's final/ through a
    checked local copy: the scores and cache of the same model on a local disk; a flipped byte in final/ is
    named, never loaded."""
    monkeypatch.setenv("KDCACHE_LOCAL_CACHE", str(tmp_path / "copies"))
    url = _url()
    assert train(TrainConfig(out=url, **common))["finished"]
    scores = {}
    for name, model in (("url", url), ("local", str(straight))):
        res = CliRunner().invoke(main, ["eval", "--model", model, "--data", str(prepared_dir), "--cache",
                                        str(cache_dir), "--out", str(tmp_path / name), "--device", "cpu"])
        assert res.exit_code == 0, res.output
        scores[name] = {k: v for k, v in json.loads((tmp_path / name / "eval.json").read_text()).items()
                        if k not in ("model", "seconds", "tokens_per_s")}
    assert scores["url"] == scores["local"]
    # As a teacher: the cache records the URL, and holds the bytes the same model on a local disk gives.
    from pipeline.cache import layout

    sums = {}
    for name, model in (("url", url), ("local", str(straight))):
        res = CliRunner().invoke(main, ["teacher", "--data", str(prepared_dir), "--model", model, "--out",
                                        str(tmp_path / f"cache-{name}"), "--shard-rows", "400", "--device", "cpu"])
        assert res.exit_code == 0, res.output
        c = tmp_path / f"cache-{name}"
        sums[name] = {i: layout.read_commit(c, i)["files"] for i in layout.committed_shards(c)}
    assert sums["url"] == sums["local"]
    assert layout.read_meta(tmp_path / "cache-url")["teacher"]["model"] == url
    follow = {**common, "student_config": "", "max_steps": 2, "eval_every": 0}
    assert train(TrainConfig(out=str(tmp_path / "next"), student=f"{url}/final", **follow))["finished"]
    record = json.loads((tmp_path / "next" / "kdcache_train.json").read_text())
    assert record["inputs"]["student"] is not None  # a retrained base retrains this student
    s = store_for(url)
    data = bytearray(s.read_bytes("final/model.safetensors"))
    data[100] ^= 0x01
    s.write_bytes("final/model.safetensors", bytes(data))
    s.write_bytes("final/_COMMIT.json", s.read_bytes("final/_COMMIT.json") + b" ")  # a new commit: fetched again
    res = CliRunner().invoke(main, ["eval", "--model", url, "--data", str(prepared_dir), "--out",
                                    str(tmp_path / "bad"), "--device", "cpu"])
    assert res.exit_code != 0 and "final/model.safetensors: checksum mismatch on arrival" in res.output
    assert "Traceback" not in res.output
