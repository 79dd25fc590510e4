"""Restart and execution modes of `kdcache teacher`: kill -9 then re-run, complete re-runs, changed
settings, and `--workers 2` (Dask) — every one must give the bytes of one uninterrupted process.

    .venv/bin/python -m pytest tests/teacher/test_teacher_restart.py -q

The reference is the session fixture `llama_cache` (conftest.py): the same options, one process.
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
import pytest
from click.testing import CliRunner

from pipeline.cache import layout as fmt
from pipeline.cache import open_cache

from conftest import free_port
from pipeline.cache.schema import stored_arrays
from stages.cli import main

pytestmark = pytest.mark.usefixtures("torch_one_thread")

KDCACHE = Path(sys.executable).parent / "kdcache"


def assert_same_cache(a: Path, b: Path) -> None:
    """Bitwise equality of every stored array, the row index and the shard plan."""
    ca, cb = open_cache(a), open_cache(b)
    assert ca.complete and cb.complete
    assert ca.meta["shards"] == cb.meta["shards"] and ca.meta["codec"] == cb.meta["codec"]
    ra, rb = ca.read_raw(0, ca.num_rows), cb.read_raw(0, cb.num_rows)
    assert set(ra) == set(rb) == {s.name for s in stored_arrays(ca.params)}
    for name in ra:
        assert ra[name].dtype == rb[name].dtype and np.array_equal(ra[name], rb[name]), name
    assert ca.index.equals(cb.index)


def commit_times(cache: Path) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in (cache / fmt.SHARDS_DIR).glob(f"*/{fmt.COMMIT_FILENAME}")}


def invoke(*args):
    return CliRunner().invoke(main, ["teacher", *[str(a) for a in args]])


def test_kill_9_then_rerun_gives_identical_cache(tmp_path, teacher_args, llama_cache):
    out = tmp_path / "cache"
    cmd = [str(KDCACHE) if KDCACHE.exists() else sys.executable, *([] if KDCACHE.exists() else
           ["-c", "from stages.cli import main; main()"]), "teacher", *teacher_args, "--out", str(out), "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = out / fmt.SHARDS_DIR / fmt.shard_name(0) / fmt.COMMIT_FILENAME
    deadline = time.monotonic() + 300
    try:
        while not first.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no shard committed in time"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    planned = len(open_cache(out).shards)
    killed_state = commit_times(out)
    assert 1 <= len(killed_state) < planned, "the kill did not land mid-run"
    # What a kill inside write_shard leaves: a half-written tmp dir (deleted on restart).
    junk = out / fmt.TMP_DIR / f"{fmt.shard_name(planned - 1)}.deadbeef"
    junk.mkdir(parents=True, exist_ok=True)
    (junk / "topk_ids").write_bytes(b"half")

    res = invoke(*teacher_args, "--out", out)  # the same command again
    assert res.exit_code == 0, res.output
    assert f"{planned - len(killed_state)} shard(s) written, {len(killed_state)} already committed" in res.output
    assert_same_cache(out, llama_cache)
    now = commit_times(out)
    assert all(now[k] == v for k, v in killed_state.items())  # committed shards were not redone
    assert not list((out / fmt.TMP_DIR).iterdir()) if (out / fmt.TMP_DIR).exists() else True


def test_complete_cache_rerun_does_nothing(tmp_path, teacher_args, llama_cache):
    out = tmp_path / "cache"
    shutil.copytree(llama_cache, out)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    res = invoke(*teacher_args, "--out", out)
    assert res.exit_code == 0, res.output
    assert "already complete" in res.output and "nothing to do" in res.output
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


def test_other_settings_refused_unless_overwrite(tmp_path, teacher_args, llama_cache, gpt2_dir):
    out = tmp_path / "cache"
    shutil.copytree(llama_cache, out)
    res = invoke(*teacher_args, "--out", out, "--top-k", 5)
    assert res.exit_code == 1 and "Traceback" not in res.output
    errs = [ln for ln in res.output.splitlines() if "error:" in ln]
    assert len(errs) == 1 and "top_k 6 -> 5" in errs[0] and "--overwrite" in errs[0]
    args = list(teacher_args)
    args[args.index("--model") + 1] = str(gpt2_dir)
    res = invoke(*args, "--out", out)
    assert res.exit_code == 1 and "weights_sha256" in res.output
    assert_same_cache(out, llama_cache)  # refusals touched nothing
    res = invoke(*teacher_args, "--out", out, "--top-k", 8, "--overwrite")
    assert res.exit_code == 0, res.output
    assert open_cache(out).k == 8 and open_cache(out).complete


def test_resume_after_losing_shards(tmp_path, teacher_args, llama_cache):
    """Shards deleted (or never committed) are recomputed; a directory without its commit record is
    treated as uncommitted and replaced."""
    out = tmp_path / "cache"
    shutil.copytree(llama_cache, out)
    shutil.rmtree(out / fmt.SHARDS_DIR / fmt.shard_name(1))
    (out / fmt.SHARDS_DIR / fmt.shard_name(3) / fmt.COMMIT_FILENAME).unlink()
    res = invoke(*teacher_args, "--out", out)
    assert res.exit_code == 0 and "2 shard(s) written" in res.output, res.output
    assert_same_cache(out, llama_cache)


def test_dask_two_workers_identical(tmp_path, teacher_args, llama_cache):
    out = tmp_path / "cache"
    res = invoke(*teacher_args, "--out", out, "--workers", 2)
    assert res.exit_code == 0, res.output
    assert_same_cache(out, llama_cache)


def test_thread_count_does_not_change_bytes(tmp_path, teacher_args, llama_cache):
    """What makes --workers (1 torch thread each) equal one process (all cores): the statistics run
    single-threaded per block whatever the pool size, and the forward pass gives the same bits."""
    import dataclasses

    import torch

    from pipeline.teacher.runner import TeacherConfig, init_cache, shard_job, worker_threads
    from pipeline.teacher.stats import distribution_stats
    from pipeline.teacher.worker import compute_shard

    g = torch.Generator().manual_seed(0)
    z = torch.randn(37, 5000, generator=g) * 4
    t = torch.randint(0, 5000, (37,), generator=g)
    betas = torch.tensor([2.0, 1 / 0.7, 1 / 1.4, 0.5])
    runs = [distribution_stats(z, t, 16, betas, tail_samples=3, generator=torch.Generator().manual_seed(1),
                               block_rows=5, threads=n) for n in (1, 2, 3)]
    assert all(torch.equal(r[k], runs[0][k]) for r in runs[1:] for k in runs[0])

    opts = dict(zip(teacher_args[::2], teacher_args[1::2]))
    cfg = TeacherConfig(data=opts["--data"], model=opts["--model"], out=str(tmp_path / "c"), shard_rows=60,
                        tail_samples=4, device="cpu", dtype="float32")
    cache, meta = init_cache(cfg)
    job = shard_job(cfg, meta, cache, meta["shards"][1])
    outs = []
    for n in (1, 2):
        outs.append(compute_shard(dataclasses.replace(job, threads=n))[0])
    torch.set_num_threads(1)
    ref = open_cache(llama_cache).read_raw(meta["shards"][1]["row_start"], meta["shards"][1]["row_stop"])
    assert all(np.array_equal(o[k], ref[k]) for o in outs for k in ref)
    assert worker_threads(TeacherConfig(workers=2)) == max(1, len(os.sched_getaffinity(0)) // 2)
    assert worker_threads(TeacherConfig(workers=2, threads=3)) == 3 and worker_threads(TeacherConfig()) == 0


@pytest.mark.slow
def test_torchrun_two_ranks_identical(tmp_path, teacher_args, llama_cache):
    """Under torchrun (two gloo ranks), ranks take shards round-robin and the cache equals one process's. Slow
    (--runslow): the default run covers the same round-robin under torchrun writing to S3
    (tests/storage/test_s3_server.py) and torchrun's shared local lock in tests/teacher/test_teacher_parallel.py."""
    import os
    import subprocess
    import sys

    out = tmp_path / "torchrun"
    torchrun = Path(sys.executable).with_name("torchrun")
    kdcache = Path(sys.executable).with_name("kdcache")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", str(free_port()), str(kdcache), "teacher",
                           *teacher_args, "--out", str(out)], capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_cache(llama_cache, out)
    import re

    written = [int(n) for n in re.findall(r"teacher: (\d+) shard\(s\) written", proc.stdout)]
    total = len(json.loads((out / "kdcache.json").read_text())["shards"])
    assert len(written) == 2 and all(n >= 1 for n in written) and sum(written) == total, proc.stdout


def test_recorded_revision_reaches_the_weights(tmp_path, teacher_args, monkeypatch):
    """The revision recorded in kdcache.json is the one the workers load weights at."""
    import transformers

    seen = []
    original = transformers.AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.append(kwargs.get("revision"))
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    import pipeline.teacher.worker as teacher_worker

    teacher_worker._MODEL.clear()
    res = invoke(*teacher_args, "--out", tmp_path / "c", "--set", "revision=v1.2")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "c" / "kdcache.json").read_text())["teacher"]["revision"] == "v1.2"
    assert seen and set(seen) == {"v1.2"}
    teacher_worker._MODEL.clear()
