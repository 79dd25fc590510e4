"""A teacher larger than one device: tensor parallel under torchrun, layers spread by device_map, and
replicas as independent launches sharing one cache — each against the single-process cache.

    .venv/bin/python -m pytest tests/teacher/test_teacher_parallel.py -q

On CPU with gloo, as on GPUs with NCCL, tensor parallelism changes only the order of float sums (the
row-parallel layers all-reduce partial products): the cache equals the single-device one up to that. The
statistics come from full-vocabulary float32 logits (the vocabulary-sharded head is gathered once), so the
tolerance is the codec's rounding of values that moved by ~1e-6: a code may land one step over.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cache import open_cache
from stages.cli import main

from conftest import free_port

pytestmark = pytest.mark.usefixtures("torch_one_thread")
KDCACHE = Path(sys.executable).with_name("kdcache")


def teacher_args(prepared_dir, llama_dir):
    return ["--data", str(prepared_dir), "--model", str(llama_dir), "--shard-rows", "200", "--device", "cpu",
            "--dtype", "float32"]


@pytest.fixture(scope="module")
def single(tmp_path_factory, prepared_dir, llama_dir):
    out = tmp_path_factory.mktemp("single") / "cache"
    res = CliRunner().invoke(main, ["teacher", *teacher_args(prepared_dir, llama_dir), "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out


def close_caches(a: Path, b: Path) -> None:
    """b equals a up to float-summation-order effects: the same rows, the same top-K sets (order may swap on
    near-ties), head log-probs within one head step, the tail mass within one split step."""
    ca, cb = open_cache(a), open_cache(b)
    assert cb.complete and ca.num_rows == cb.num_rows and ca.meta["shards"] == cb.meta["shards"]
    ra, rb = ca.read(0, ca.num_rows), cb.read(0, cb.num_rows)
    assert np.array_equal(ra["target_ids"], rb["target_ids"])
    same_set = [set(x) == set(y) for x, y in zip(ra["topk_ids"].tolist(), rb["topk_ids"].tolist())]
    assert np.mean(same_set) > 0.99
    p = ca.params
    rows = np.array(same_set)
    diff = np.abs(np.sort(ra["topk_logprobs"][rows], 1) - np.sort(rb["topk_logprobs"][rows], 1))
    assert diff.max() <= p.head_step + 1e-4, diff.max()
    assert np.abs(ra["tail_logprob"] - rb["tail_logprob"]).max() <= 2 * p.tail_step + 1e-5
    assert np.abs(ra["entropy"] - rb["entropy"]).max() < 0.02


def test_tensor_parallel_teacher_equals_one_process(tmp_path, prepared_dir, llama_dir, single):
    out = tmp_path / "tp"
    port = str(free_port())
    proc = subprocess.run([str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2",
                           "--master_port", port, str(KDCACHE), "teacher", *teacher_args(prepared_dir, llama_dir),
                           "--parallel", "tp", "--out", str(out)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": port})
    assert proc.returncode == 0, proc.stderr[-3000:]
    close_caches(single, out)
    recs = open_cache(out).commit_records()
    assert len(recs) == len(open_cache(single).shards)  # every shard once: rank 0 commits, rank 1 only computes


def test_replicas_are_independent_launches_sharing_one_cache(tmp_path, prepared_dir, llama_dir, single):
    out = tmp_path / "replicas"
    args = ["teacher", *teacher_args(prepared_dir, llama_dir), "--out", str(out), "--replicas", "2"]
    res = CliRunner().invoke(main, [*args, "--replica", "1"])
    assert res.exit_code == 0, res.output
    c = open_cache(out)
    assert [ok for ok in c.committed()] == [i % 2 == 1 for i in range(len(c.shards))]
    res = CliRunner().invoke(main, [*args, "--replica", "0"])
    assert res.exit_code == 0, res.output
    a, b = open_cache(single), open_cache(out)
    ra, rb = a.read_raw(0, a.num_rows), b.read_raw(0, b.num_rows)
    assert all(np.array_equal(ra[n], rb[n]) for n in ra)  # no parallel reduction: bitwise the same
    res = CliRunner().invoke(main, [*args, "--replica", "2"])
    assert res.exit_code == 1 and "replica must lie in [0, replicas = 2)" in res.output


def test_device_map_teacher(tmp_path, prepared_dir, llama_dir, single):
    pytest.importorskip("accelerate")
    out = tmp_path / "dm"
    res = CliRunner().invoke(main, ["teacher", *teacher_args(prepared_dir, llama_dir), "--parallel", "device_map",
                                    "--out", str(out)])
    assert res.exit_code == 0, res.output
    close_caches(single, out)


def test_tensor_parallel_outside_torchrun_is_one_line(tmp_path, prepared_dir, llama_dir):
    res = CliRunner().invoke(main, ["teacher", *teacher_args(prepared_dir, llama_dir), "--parallel", "tp",
                                    "--out", str(tmp_path / "c")])
    assert res.exit_code == 1 and "needs torchrun" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "c").exists()  # refused before planning
