"""The cache writer (`pipeline/cache/writer.py`: `CacheWriter`): the plan's files in order, kdcache.json last;
the row index against an expectation computed here from the prepared data alone; and a cache written by
the writer from the teacher cache's own arrays is byte-identical to it, file by file.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/cache/test_cache_writer.py -q
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.cache import layout, open_cache
from pipeline.cache.writer import CacheWriter
from pipeline.errors import KdError
from conftest import CACHE_SHARD_ROWS

pytestmark = pytest.mark.usefixtures("torch_one_thread")

PLAN_FILES = (layout.INDEX_FILENAME, layout.CONFIG_FILENAME, layout.CHECKSUMS_FILENAME, layout.META_FILENAME)
RECORD_KEYS = ("index", "example_start", "example_stop", "row_start", "row_stop", "dtype", "device", "targets_sha256")


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def expected_index(prepared: Path, shard_rows: int) -> dict[str, list[int]]:
    """The row index from the prepared data alone, with plain Python: an example's rows are its positions
    t >= 1 whose loss_mask is set; a shard closes once it holds >= shard_rows rows."""
    import datasets

    masks = datasets.load_from_disk(str(prepared))["loss_mask"]
    counts = [sum(1 for t, m in enumerate(mask) if t >= 1 and m) for mask in masks]
    starts, shard, total, in_shard, shards = [], [], 0, 0, 0
    for c in counts:
        starts.append(total)
        shard.append(shards)
        total += c
        in_shard += c
        if in_shard >= shard_rows:
            shards, in_shard = shards + 1, 0
    return {"sequence_id": list(range(len(counts))), "row_start": starts, "row_count": counts, "shard": shard}


def test_plan_writes_kdcache_json_last_and_the_index_from_the_data(tmp_path, llama_cache, prepared_dir, monkeypatch):
    from pipeline.teacher.runner import TeacherConfig  # what `plan` saves as config.yaml (any dataclass)

    meta = json.loads((llama_cache / layout.META_FILENAME).read_text())
    want = expected_index(prepared_dir, CACHE_SHARD_ROWS)
    counts = np.asarray(want["row_count"], dtype=np.int64)
    cfg = TeacherConfig(**_config_of(llama_cache))

    order: list[str] = []
    real = Path.replace

    def recording(self, target):  # every file of the plan is committed by a rename
        order.append(Path(target).name)
        return real(self, target)

    monkeypatch.setattr(Path, "replace", recording)
    out = tmp_path / "c"
    w = CacheWriter(out, meta, counts)
    assert not w.planned
    w.plan(cfg)
    monkeypatch.undo()
    assert order == list(PLAN_FILES), order  # kdcache.json last: its presence means the plan is complete
    assert w.planned and w.mismatch() == []

    index = pq.read_table(out / layout.INDEX_FILENAME)
    assert index.schema.names == ["sequence_id", "row_start", "row_count", "shard"]
    assert [str(t) for t in index.schema.types] == ["int64", "int64", "int64", "int32"]
    assert index.to_pydict() == want
    assert int(counts.sum()) == meta["num_rows"] and len(counts) == meta["num_examples"]
    # The teacher stage plans through the same writer: the same bytes, file by file.
    for name in PLAN_FILES:
        assert sha(out / name) == sha(llama_cache / name), name


def _config_of(cache: Path) -> dict:
    import yaml

    return yaml.safe_load((cache / layout.CONFIG_FILENAME).read_text())


def test_a_plan_killed_before_kdcache_json_is_not_planned(tmp_path, llama_cache, monkeypatch):
    import pipeline.cache.writer as writer

    meta = json.loads((llama_cache / layout.META_FILENAME).read_text())
    counts = pq.read_table(llama_cache / layout.INDEX_FILENAME)["row_count"].to_numpy()

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(writer, "write_json", killed)
    w = CacheWriter(tmp_path / "c", meta, counts)
    with pytest.raises(KeyboardInterrupt):
        w.plan()
    assert (tmp_path / "c" / layout.INDEX_FILENAME).is_file() and not w.planned
    with pytest.raises(KdError, match="kdcache.json"):
        CacheWriter.open(tmp_path / "c")


def test_shards_written_by_the_writer_are_byte_identical(tmp_path, llama_cache):
    """Re-encode nothing: the teacher cache's stored arrays, committed again through `CacheWriter.open`,
    give the same files (sha256 of each) and the same commit records."""
    src = open_cache(llama_cache)
    out = tmp_path / "c"
    out.mkdir()
    for name in PLAN_FILES:
        (out / name).write_bytes((llama_cache / name).read_bytes())
    w = CacheWriter.open(out)
    for i, s in enumerate(src.shards):
        rec = layout.read_commit(llama_cache, i)
        got = w.write_shard(i, src.read_raw(s["row_start"], s["row_stop"]), {k: rec[k] for k in RECORD_KEYS})
        assert got == rec
    assert not any((out / layout.TMP_DIR).iterdir())
    # (.kdcache/ holds the teacher stage's ownership records, not the cache: the writer alone writes none)
    files = sorted(p.relative_to(llama_cache) for p in llama_cache.rglob("*")
                   if p.is_file() and layout.RECORDS_DIR not in p.relative_to(llama_cache).parts)
    assert files == sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert all(sha(out / f) == sha(llama_cache / f) for f in files)
    assert open_cache(out).verify(check_data=True) == []


def test_reader_takes_a_dataset_or_a_directory(tmp_path, llama_cache, prepared_dir):
    import datasets

    want = open_cache(llama_cache).read(0, 50, fields=("target_ids",))["target_ids"]  # the recorded data
    ds = datasets.load_from_disk(str(prepared_dir))
    assert np.array_equal(open_cache(llama_cache, data=ds).read(0, 50, fields=("target_ids",))["target_ids"], want)
    c = open_cache(llama_cache)
    c.attach_data(str(prepared_dir))
    assert np.array_equal(c.target_ids(0, 50), want)
    c.attach_data(tmp_path / "gone")
    with pytest.raises(KdError, match=f"prepared data not found: {tmp_path / 'gone'}"):
        c.target_ids(0, 50)
    (tmp_path / "empty").mkdir()
    with pytest.raises(KdError, match="cannot load prepared data"):
        open_cache(llama_cache, data=tmp_path / "empty").target_ids(0, 50)
