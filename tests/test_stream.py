"""Streaming the cache: complete, deterministic, resumable, rank-disjoint; DDP on two gloo processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.cache import open_cache

from conftest import free_port
from pipeline.prepare import load_prepared
from pipeline.stream import CacheStream


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, prepared_dir, llama_dir) -> Path:
    from pipeline.teacher import TeacherConfig, run_teacher

    out = tmp_path_factory.mktemp("scache") / "cache"
    run_teacher(TeacherConfig(data=str(prepared_dir), model=str(llama_dir), out=str(out), shard_rows=150, chunk_rows=32))
    return out


def take(stream: CacheStream, n: int):
    it = iter(stream)
    return [next(it) for _ in range(n)]


def test_one_epoch_covers_every_example_once(prepared_dir, cache_dir):
    ds, cache = load_prepared(prepared_dir), open_cache(cache_dir)
    s = CacheStream(ds, cache, batch_size=7, seed=1)
    assert len(s.blocks) > 3  # chunk-aligned blocks, several per shard
    n = s.batches_in_epoch(0)
    seen = [e for mb in take(s, n) for e in mb.examples]
    with_targets = [e for e in range(len(ds)) if cache.index.column("row_count")[e].as_py() > 0]
    assert sorted(seen) == with_targets
    assert s.epoch == 0 and s.cursor == len(seen)


def test_rows_are_joined_to_their_sequences(prepared_dir, cache_dir):
    ds, cache = load_prepared(prepared_dir), open_cache(cache_dir)
    for mb in take(CacheStream(ds, cache, batch_size=5, seed=2), 4):
        assert mb.cache["topk_ids"].shape == (mb.num_targets, cache.k)
        # the cache's target ids (from the data, checked against each shard's hash) are the batch's targets
        rows = [cache.read(int(cache.index.column("row_start")[e].as_py()),
                           int(cache.index.column("row_start")[e].as_py() + cache.index.column("row_count")[e].as_py()),
                           ("target_ids",))["target_ids"] for e in mb.examples]
        assert np.array_equal(np.concatenate(rows), mb.target_ids.numpy())
        start = cache.index.column("row_start")[mb.examples[0]].as_py()
        first = cache.read(start, start + 1)
        assert np.array_equal(first["topk_ids"][0], mb.cache["topk_ids"][0].numpy())


def test_order_is_deterministic_per_seed_and_resumes_exactly(prepared_dir, cache_dir):
    ds, cache = load_prepared(prepared_dir), open_cache(cache_dir)
    order = lambda seed: [mb.examples for mb in take(CacheStream(ds, cache, batch_size=4, seed=seed), 20)]  # noqa: E731
    a, b, c = order(0), order(0), order(1)
    assert a == b and a != c
    s = CacheStream(ds, cache, batch_size=4, seed=0)
    take(s, 7)  # crosses into the second epoch (60 examples / 4 = 15 batches) when taken 20 total
    state = s.state_dict()
    resumed = CacheStream(ds, cache, batch_size=4, seed=0)
    resumed.load_state_dict(state)
    assert [mb.examples for mb in take(resumed, 13)] == a[7:20]


def test_ranks_read_disjoint_blocks_and_take_equal_steps(prepared_dir, cache_dir):
    ds, cache = load_prepared(prepared_dir), open_cache(cache_dir)
    r0 = CacheStream(ds, cache, batch_size=3, seed=4, rank=0, world=2)
    r1 = CacheStream(ds, cache, batch_size=3, seed=4, rank=1, world=2)
    n = r0.batches_in_epoch(0)
    assert n == r1.batches_in_epoch(0) > 0
    e0 = {e for mb in take(r0, n) for e in mb.examples}
    e1 = {e for mb in take(r1, n) for e in mb.examples}
    assert e0 and e1 and not (e0 & e1)


def test_ddp_two_gloo_processes(tmp_path, prepared_dir, cache_dir, vocab_size):
    scfg = tmp_path / "student.json"
    scfg.write_text(json.dumps({"model_type": "llama", "vocab_size": vocab_size, "hidden_size": 16,
                                "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                "num_key_value_heads": 1, "max_position_embeddings": 128}))
    torchrun = Path(sys.executable).with_name("torchrun")
    kdcache = Path(sys.executable).with_name("kdcache")
    port = str(free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": port}
    out = tmp_path / "ddp"
    proc = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", port, str(kdcache), "train",
                           "--cache", str(cache_dir), "--student-config", str(scfg), "--out", str(out),
                           "--max-steps", "3", "--batch-size", "4", "--gate", "topk", "--device", "cpu"],
                          capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]  # written once, by rank 0
    assert (out / "final" / "config.json").is_file()
