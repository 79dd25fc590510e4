"""Every arm of a seed reads the same batches: CE only without a cache, CE only with a cache attached
(`--loss none`), CE read through the cache (`--ce-weight 1`) and KD, from caches chunked differently: the epoch
plan is a function of the prepared data, the seed and the batch settings alone (`pipeline.data.epoch_plan`).

    .venv/bin/python -m pytest tests/training/test_same_batches.py -q
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.cache import open_cache
from pipeline.cache.rows import target_counts
from pipeline.data import epoch_plan
from pipeline.data.prepare import load_prepared
from pipeline.data.stream import CacheStream
from pipeline.errors import KdError
from pipeline.training.config import TrainConfig
from pipeline.training.trainer import Trainer
from stages.cli import main

STUDENT = {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
           "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 128,
           "tie_word_embeddings": True}


def make_cache(out: Path, prepared: Path, model: Path, **layout) -> Path:
    from pipeline.teacher.runner import TeacherConfig, run_teacher

    run_teacher(TeacherConfig(data=str(prepared), model=str(model), out=str(out), device="cpu", dtype="float32",
                              **layout))
    return out


@pytest.fixture(scope="module")
def caches(tmp_path_factory, prepared_dir, llama_dir, torch_one_thread) -> dict[str, Path]:
    """Three caches of one data: teacher defaults (one chunk here), small shards and chunks, and the plan's own
    grid for this data (where the plan's blocks are exactly the cache's chunks)."""
    root = tmp_path_factory.mktemp("same")
    block, shard = epoch_plan.block_grid(int(target_counts(load_prepared(prepared_dir))[0].sum()))
    return {"default": make_cache(root / "default", prepared_dir, llama_dir),
            "small": make_cache(root / "small", prepared_dir, llama_dir, shard_rows=50, chunk_rows=16),
            "grid": make_cache(root / "grid", prepared_dir, llama_dir, shard_rows=shard, chunk_rows=block)}


@pytest.fixture(scope="module")
def student(tmp_path_factory, vocab_size) -> str:
    p = tmp_path_factory.mktemp("student") / "student.json"
    p.write_text(json.dumps({**STUDENT, "vocab_size": vocab_size}))
    return str(p)


def batches(cfg: TrainConfig, n: int) -> list[tuple[list[int], str, int]]:
    """(examples, sha256 of input_ids, target count) of the first n micro-batches the trainer of `cfg` reads."""
    it = iter(Trainer(cfg).stream)
    out = []
    for _ in range(n):
        mb = next(it)
        out.append((mb.examples, hashlib.sha256(mb.input_ids.numpy().tobytes()).hexdigest(), mb.num_targets))
    return out


@pytest.mark.parametrize("settings", [{"batch_tokens": 120, "seed": 3}, {"batch_size": 7, "seed": 1}])
def test_every_arm_of_a_seed_reads_the_same_batches(tmp_path, prepared_dir, caches, student, settings, llama_dir,
                                                    torch_one_thread):
    """Into the second epoch, CE only without a cache, CE only with one attached, CE through the cache and KD
    from three caches chunked differently read the same examples in the same micro-batches in the same order."""
    common = dict(data=str(prepared_dir), student_config=student, max_steps=1, **settings)
    arms = {"ce, no cache": {"loss": "none"},
            "ce, cache attached": {"loss": "none", "cache": str(caches["small"])},
            "ce through the cache": {"loss": "fkl", "ce_weight": 1.0, "cache": str(caches["default"])},
            **{f"kd, {name} cache": {"loss": "fkl", "cache": str(c)} for name, c in caches.items()},
            "kd gated": {"loss": "rkl", "gate": "topk", "gate_k": 3, "cache": str(caches["small"])},
            "kd online (no cache)": {"loss": "fkl", "online_teacher": str(llama_dir)}}
    per_epoch = Trainer(TrainConfig(out=str(tmp_path / "n"), **common, loss="none")).stream.batches_in_epoch(0)
    n = per_epoch + 3
    got = {arm: batches(TrainConfig(out=str(tmp_path / f"a{i}"), **common, **over), n)
           for i, (arm, over) in enumerate(arms.items())}
    want = got["ce, no cache"]
    assert len({tuple(ex) for ex, _, _ in want[:per_epoch]}) == per_epoch  # distinct batches: a real order
    for arm, seen in got.items():
        assert seen == want, arm
    # ... and another seed reads another order.
    other = batches(TrainConfig(out=str(tmp_path / "o"), **{**common, "seed": settings["seed"] + 1}, loss="none"), n)
    assert [ex for ex, _, _ in other] != [ex for ex, _, _ in want]


def test_ce_without_a_cache_trains_as_ce_through_the_cache(tmp_path, prepared_dir, caches, student):
    """`kdcache train --loss none` without a cache and `--cache C --ce-weight 1` (KD at weight 0): same tokens,
    and the same cross-entropy at every step (the same init, batches and gradient), to float tolerance."""
    runner = CliRunner()
    common = ["--data", str(prepared_dir), "--student-config", student, "--max-steps", "3", "--batch-tokens", "150",
              "--seed", "4", "--device", "cpu"]
    for name, extra in (("nocache", ["--loss", "none"]), ("cached", ["--cache", str(caches["small"]),
                                                                      "--ce-weight", "1"])):
        res = runner.invoke(main, ["train", *common, "--out", str(tmp_path / name), *extra])
        assert res.exit_code == 0, res.output
    rows = {name: [json.loads(ln) for ln in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("nocache", "cached")}
    assert [r["tokens_seen"] for r in rows["nocache"]] == [r["tokens_seen"] for r in rows["cached"]]
    a = torch.tensor([r["ce_loss"] for r in rows["nocache"]])
    b = torch.tensor([r["ce_loss"] for r in rows["cached"]])
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert "tar" in rows["cached"][0] and "tar" not in rows["nocache"][0]  # the second one did read the cache


def test_the_grid_is_a_default_cache_s_chunks(prepared_dir, caches):
    """The plan's grid is `kdcache teacher`'s default chunking (scaled down only for data of under 64 blocks): with
    a cache chunked so, the plan's blocks are its chunks, exactly the blocks of plan version 1, so a checkpoint
    made before keeps its order; a no-cache checkpoint of version 1 (runs of 256 examples) is refused."""
    from pipeline.teacher.runner import TeacherConfig

    assert (epoch_plan.BLOCK_ROWS, epoch_plan.BLOCK_SHARD_ROWS) == (TeacherConfig().chunk_rows,
                                                                     TeacherConfig().shard_rows)
    assert epoch_plan.block_grid(10**7) == (8192, 65536) and epoch_plan.block_grid(64 * 8192) == (8192, 65536)
    assert epoch_plan.block_grid(64 * 8192 - 1) == (4096, 32768)
    ds = load_prepared(prepared_dir)
    grid = CacheStream(ds, open_cache(caches["grid"]), batch_size=4, seed=0)
    assert len(grid.blocks) > 8 and grid._same_as_legacy()
    state = {**grid.state_dict(), "cursor": 4}
    del state["plan"]  # a version 1 checkpoint
    grid.load_state_dict(state)
    assert grid.cursor == 4
    small = CacheStream(ds, open_cache(caches["small"]), batch_size=4, seed=0)
    nocache = CacheStream(ds, None, batch_size=4, seed=0)
    assert not small._same_as_legacy() and not nocache._same_as_legacy()
    for s in (small, nocache):
        with pytest.raises(KdError, match=r"earlier kdcache.*other blocks.*--overwrite"):
            s.load_state_dict(state)
        s.load_state_dict({**state, "plan": epoch_plan.PLAN_VERSION})  # this version's: taken as it is


def test_shard_starts_match_the_teachers_shards():
    """`shard_starts` (vectorised) cuts where `kdcache teacher`'s plan_shards does, zero-row examples included."""
    from pipeline.teacher.runner import plan_shards

    rng = np.random.default_rng(0)
    for shard_rows in (1, 7, 50, 400):
        counts = rng.integers(0, 30, 300) * (rng.random(300) > 0.2)
        want = [s["row_start"] for s in plan_shards(counts, shard_rows)]
        assert epoch_plan.shard_starts(counts, shard_rows).tolist() == want, shard_rows
    assert epoch_plan.shard_starts(np.zeros(0, np.int64), 8).tolist() == [0]


def test_blocks_across_cache_shards_read_and_check_every_shard(tmp_path, tokenizer_dir, llama_dir, torch_one_thread):
    """Blocks of several examples that straddle shards of a cache chunked otherwise than the plan's grid: every
    row a micro-batch gathers is the cache's row of its example, and every shard a block touches is checked
    (alignment hash; with --follow, its commit) before it is read."""
    from conftest import make_pairs

    from pipeline.data.prepare import PrepareConfig, prepare
    from pipeline.losses.objective import KD_FIELDS

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_pairs(200, seed=5)))
    prepare(PrepareConfig(data=str(data), tokenizer=str(tokenizer_dir), out=str(tmp_path / "prep"), max_length=64))
    cache = open_cache(make_cache(tmp_path / "cache", tmp_path / "prep", llama_dir, shard_rows=45, chunk_rows=16,
                                 tail_samples=0))  # no draws: the rows it compares are the K + 1 buckets
    ds = load_prepared(tmp_path / "prep")
    s = CacheStream(ds, cache, batch_size=6, seed=2)
    shard_of = cache.shard_of_row
    spans = [b for b in s.blocks if shard_of(int(s.row_start[b[0]])) != shard_of(int(s.row_start[b[-1]]
                                                                                       + s.row_count[b[-1]] - 1))]
    assert spans and all(len(b) > 1 for b in spans)  # the case under test exists
    checked: set[int] = set()
    real_check, real_read = CacheStream._check_shard, cache.read
    s._check_shard = lambda i: (real_check(s, i), checked.add(i))  # type: ignore[method-assign]

    def read(a, b, *args):  # the reader's reads (on its threads): every shard of the range checked first
        assert set(range(shard_of(a), shard_of(b - 1) + 1)) <= checked, (a, b)
        return real_read(a, b, *args)

    cache.read = read  # type: ignore[method-assign]
    fields = tuple(f for f in KD_FIELDS if f != "target_rank")
    it = iter(s)
    for _ in range(s.batches_in_epoch(0)):
        mb = next(it)
        want = [cache.read(int(s.row_start[e]), int(s.row_start[e] + s.row_count[e]), fields) for e in mb.examples]
        for k in fields:
            assert np.array_equal(mb.cache[k].numpy(), np.concatenate([w[k] for w in want])), k
    assert checked == set(range(len(cache.shards)))
