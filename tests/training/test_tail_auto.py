"""`--tail auto` (the default): the student uses the cache's tail draws when they can serve its loss, K + 1 buckets
otherwise, and says which it used (train_summary.json, the model card's record, the report's method name).

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/training/test_tail_auto.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.losses.options import KdOptions
from pipeline.teacher.runner import TeacherConfig, run_teacher
from pipeline.training.config import TrainConfig
from pipeline.training.trainer import Trainer, train
from test_train import STUDENT_LLAMA, grads, student_config


@pytest.mark.parametrize("opts, draws, logprobs, want", [
    ({}, 4, True, "sampled"),
    ({}, 0, False, "bucket"),  # a compact cache: no draws
    ({}, 4, False, "bucket"),  # draws made before their log-probs were stored serve fkl at T = 1 only: not chosen
    ({"loss": "rkl"}, 4, True, "bucket"),  # a loss the sampled tail refuses (losses/sampled.py REFUSED)
    ({"loss": "akl"}, 4, True, "bucket"),
    ({"loss": "jsd", "idts": True}, 4, True, "sampled"),
    ({"tail": "bucket"}, 4, True, "bucket"),  # an explicit policy is kept
    ({"tail": "renorm"}, 0, False, "renorm"),
])
def test_resolved_tail(opts, draws, logprobs, want):
    assert KdOptions(**opts).resolved_tail(draws, logprobs) == want


@pytest.fixture(scope="module")
def compact_cache(tmp_path_factory, prepared_dir, llama_dir) -> Path:
    out = tmp_path_factory.mktemp("compact") / "cache"
    run_teacher(TeacherConfig(data=str(prepared_dir), model=str(llama_dir), out=str(out), preset="compact",
                              shard_rows=200, chunk_rows=64))
    return out


def _gradient(tmp_path: Path, prepared_dir: Path, cache: str, scfg: str, name: str, **opts) -> list[torch.Tensor]:
    t = Trainer(TrainConfig(data=str(prepared_dir), cache=cache, student_config=scfg, out=str(tmp_path / name),
                            shuffle=False, seed=5, batch_size=4, max_steps=2, **opts))
    t.train_step([next(iter(t.stream))], apply=False)
    return grads(t)


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_auto_trains_on_the_draws_when_the_cache_has_them(tmp_path, prepared_dir, llama_cache, compact_cache,
                                                          vocab_size):
    """On a cache with draws, the default gives the gradient of --tail sampled bit for bit, and not that of
    --tail bucket; on a compact cache (no draws), that of --tail bucket; with rkl, bucket."""
    scfg = student_config(tmp_path, vocab_size, STUDENT_LLAMA)
    cache, compact = str(llama_cache), str(compact_cache)
    auto = _gradient(tmp_path, prepared_dir, cache, scfg, "auto")
    sampled = _gradient(tmp_path, prepared_dir, cache, scfg, "sampled", tail="sampled")
    bucket = _gradient(tmp_path, prepared_dir, cache, scfg, "bucket", tail="bucket")
    assert _same(auto, sampled) and not _same(auto, bucket)
    assert _same(_gradient(tmp_path, prepared_dir, compact, scfg, "c_auto"),
                 _gradient(tmp_path, prepared_dir, compact, scfg, "c_bucket", tail="bucket"))
    assert _same(_gradient(tmp_path, prepared_dir, cache, scfg, "rkl_auto", loss="rkl"),
                 _gradient(tmp_path, prepared_dir, cache, scfg, "rkl_bucket", loss="rkl", tail="bucket"))


def test_the_run_records_the_tail_it_used(tmp_path, prepared_dir, llama_cache, vocab_size):
    """train_summary.json and final/kdcache_train.json say `sampled`; config.yaml keeps `auto` (a re-run with the
    same settings is the same run); the report names the method with the policy used."""
    from pipeline.evaluation.report import collect_run

    scfg = student_config(tmp_path, vocab_size, STUDENT_LLAMA)
    out = tmp_path / "run"
    s = train(TrainConfig(data=str(prepared_dir), cache=str(llama_cache), student_config=scfg, out=str(out),
                          batch_size=4, max_steps=2))
    assert s["tail"] == "sampled"
    assert json.loads((out / "train_summary.json").read_text())["tail"] == "sampled"
    assert json.loads((out / "final" / "kdcache_train.json").read_text())["config"]["tail"] == "sampled"
    assert "tail: auto" in (out / "config.yaml").read_text()
    assert collect_run(str(out))["method"] == "KD fkl/sampled"
    again = train(TrainConfig(data=str(prepared_dir), cache=str(llama_cache), student_config=scfg, out=str(out),
                              batch_size=4, max_steps=2))
    assert again.get("skipped")


def test_a_run_saved_with_the_old_default_tail_is_the_same_run_where_auto_picks_buckets(
        tmp_path, prepared_dir, llama_cache, compact_cache, vocab_size):
    """Runs made before --tail auto was the default saved `tail: bucket`. Under today's default (auto) such a run
    is unchanged (kept, not retrained) on a cache without draws and when nothing is distilled, and changed, named
    as such, on a cache with draws (where auto trains otherwise)."""
    from pipeline.training.state import read_state

    scfg = student_config(tmp_path, vocab_size, STUDENT_LLAMA)
    common = dict(data=str(prepared_dir), student_config=scfg, batch_size=4, max_steps=1)
    for name, over, kind in (("compact", dict(cache=str(compact_cache)), "final"),
                             ("ce", dict(cache=str(llama_cache), loss="none"), "final"),
                             ("draws", dict(cache=str(llama_cache)), "changed")):
        out = tmp_path / name
        train(TrainConfig(out=str(out), tail="bucket", **common, **over))  # what the old default saved
        state = read_state(out, TrainConfig(out=str(out), **common, **over))
        assert state.kind == kind, (name, state.changes)
        if kind == "changed":
            assert state.changes == ["tail 'bucket' -> 'sampled'"]
