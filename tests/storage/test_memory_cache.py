"""A teacher cache on an object store (fsspec's memory:// file system: the same code path as s3:// without
a server): commit without rename, resume after a kill mid-upload, the lease, foreign objects, the mirror
the student reads through (sha256 on arrival, LRU), and URLs refused where only local paths work."""

from __future__ import annotations

import json

import fsspec
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import one_line_error
from pipeline.cache import layout, open_cache, packing
from pipeline.errors import CorruptionError, KdError
from pipeline.storage import Store, store_for
from stages.cli import main
from tests.storage.packed import flip_member_byte, pack_key, stored_sums


@pytest.fixture
def mem_url(request):
    """A fresh memory:// prefix (removed afterwards)."""
    url = f"memory://kdtest/{request.node.name}"
    yield url
    fs = fsspec.filesystem("memory")
    if fs.exists(f"/kdtest/{request.node.name}"):
        fs.rm(f"/kdtest/{request.node.name}", recursive=True)


def _teacher(args, out):
    return CliRunner().invoke(main, ["teacher", *args, "--out", str(out)])


def test_remote_cache_equals_local_and_reads_the_same_rows(teacher_args, llama_cache, mem_url, tmp_path,
                                                          torch_one_thread):
    res = _teacher(teacher_args, mem_url)
    assert res.exit_code == 0, res.output
    assert stored_sums(mem_url) == stored_sums(llama_cache)  # the same bytes, shard by shard
    store = store_for(mem_url)
    assert json.loads(store.read_bytes("kdcache.json"))["shards"] == json.loads(
        (llama_cache / "kdcache.json").read_text())["shards"]
    assert not any(rel.startswith(".kdcache/lease") for rel in store.sizes())  # the lease went with the run
    local, remote = open_cache(llama_cache), open_cache(mem_url, local_cache=tmp_path / "mirror", prefetch=2)
    n = local.num_rows
    for a, b in [(0, 7), (50, 130), (n - 9, n)]:
        x, y = local.read(a, b), remote.read(a, b)
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert remote.verify() == []
    res = CliRunner().invoke(main, ["inspect", mem_url, "--verify"])
    assert res.exit_code == 0, res.output


def test_kill_mid_upload_then_rerun_gives_the_same_cache(teacher_args, llama_cache, mem_url, monkeypatch, tmp_path,
                                                         torch_one_thread):
    """A run stopped half-way through uploading a shard leaves its files without a commit record: never read,
    and replaced by the re-run, whose cache is byte-identical to an uninterrupted one."""
    calls = {"n": 0}
    real = Store.write_bytes

    def dying_write(self, rel, data, create=False):
        if rel.endswith(layout.COMMIT_FILENAME):
            calls["n"] += 1
            if calls["n"] == 2:  # the second shard's zip is up, its commit record not yet
                raise KeyboardInterrupt
        return real(self, rel, data, create=create)

    monkeypatch.setattr(Store, "write_bytes", dying_write)
    res = _teacher(teacher_args, mem_url)
    assert res.exit_code == 130, res.output
    monkeypatch.setattr(Store, "write_bytes", real)
    store = store_for(mem_url)
    committed = layout.committed_shards(mem_url)
    half = [rel for rel in store.sizes("shards") if rel.endswith("shard.zip")
            and int(rel.split("/")[1][len("shard_"):]) not in committed]
    assert half and len(committed) < 3  # some shard's files are there without its commit record
    cache = open_cache(mem_url, local_cache=store.url.replace("memory://", "/tmp/") + "-mirror-unused")
    assert sum(cache.committed()) == len(committed)
    res = _teacher(teacher_args, mem_url)
    assert res.exit_code == 0, res.output
    assert stored_sums(mem_url) == stored_sums(llama_cache)
    assert sorted(store.sizes()) == sorted(  # one zip and one record per shard, the plan: nothing else
        [*(f"{layout.SHARDS_DIR}/{layout.shard_name(i)}/{name}" for i in layout.committed_shards(llama_cache)
           for name in ("shard.zip", "_COMMIT.json")),
         "kdcache.json", "kdcache.sha256", "index.parquet", "config.yaml"])
    for i in layout.committed_shards(llama_cache):  # each zip: the bytes an uninterrupted upload leaves
        packing.pack(layout.shard_dir(llama_cache, i), list(layout.read_commit(llama_cache, i)["files"]),
                     tmp_path / f"{i}.zip")
        assert store.read_bytes(pack_key(i)) == (tmp_path / f"{i}.zip").read_bytes()


def test_flipped_byte_is_found_by_verify_and_by_the_reader(teacher_args, mem_url, tmp_path, torch_one_thread):
    assert _teacher(teacher_args, mem_url).exit_code == 0
    store = store_for(mem_url)
    file = next(r for r in layout.read_commit(mem_url, 3)["files"] if r.startswith("head_gaps/c/"))
    store.write_bytes(pack_key(3), flip_member_byte(store.read_bytes(pack_key(3)), file))
    res = CliRunner().invoke(main, ["inspect", mem_url, "--verify"])
    assert res.exit_code != 0
    assert f"shard_00003: file {file} checksum mismatch" in res.output
    cache = open_cache(mem_url, local_cache=tmp_path / "m")
    s = cache.shards[3]
    with pytest.raises(CorruptionError, match=f"shard_00003: file {file} checksum mismatch"):
        cache.read(s["row_start"], s["row_start"] + 4)
    assert not list((tmp_path / "m").glob("*/shards/shard_00003"))  # the damaged bytes were not kept
    cache.read(cache.shards[2]["row_start"], cache.shards[2]["row_stop"])  # the other shards still read


def test_mirror_downloads_each_shard_once_and_evicts_least_recently_used(teacher_args, mem_url, tmp_path,
                                                                         torch_one_thread):
    assert _teacher(teacher_args, mem_url).exit_code == 0
    cache = open_cache(mem_url, local_cache=tmp_path / "m", prefetch=0)
    total = sum(size for rel, size in store_for(mem_url).sizes().items() if rel.endswith("shard.zip"))
    recs = cache.commit_records().values()  # zip adds only its headers: about 100 bytes per member
    assert 0 < total - sum(r["bytes"] for r in recs) <= 128 * sum(len(r["files"]) for r in recs)
    cache.read(0, cache.num_rows)
    cache.read(0, cache.num_rows)  # a second epoch: nothing remote
    assert cache.mirror.bytes_downloaded == total
    again = open_cache(mem_url, local_cache=tmp_path / "m", prefetch=0)  # another process, same local cache
    again.read(0, again.num_rows)
    assert again.mirror.bytes_downloaded == 0
    biggest = max(r["bytes"] for r in cache.commit_records().values())
    small = open_cache(mem_url, local_cache=tmp_path / "s", local_cache_gb=2.5 * biggest / 2**30, prefetch=0)
    ref = open_cache(mem_url, local_cache=tmp_path / "m")
    for i, s in enumerate(small.shards):
        got = small.read(s["row_start"], s["row_stop"])
        assert small.mirror.held_bytes() <= 2.5 * biggest
        np.testing.assert_array_equal(got["topk_logprobs"], ref.read(s["row_start"], s["row_stop"])["topk_logprobs"])
    held = sorted(int(p.name[6:]) for p in (small.path / "shards").iterdir())
    assert held == list(range(len(small.shards)))[-len(held):] and len(held) < len(small.shards)
    s0 = small.shards[0]
    small.read(s0["row_start"], s0["row_stop"])  # evicted earlier: fetched again, and right
    assert small.mirror.bytes_downloaded == total + store_for(mem_url).sizes()[pack_key(0)]


def test_prefetch_fetches_ahead_in_the_hinted_order(teacher_args, mem_url, tmp_path, torch_one_thread):
    assert _teacher(teacher_args, mem_url).exit_code == 0
    cache = open_cache(mem_url, local_cache=tmp_path / "m", prefetch=3)
    order = [5, 1, 8, 2, 0]
    cache.prefetch_order(order)
    s = cache.shards[5]
    cache.read(s["row_start"], s["row_start"] + 1)
    cache.mirror.close()  # waits for the prefetch tasks
    assert {i for i in range(len(cache.shards)) if cache.mirror.has(i)} == {5, 1, 8, 2}


def test_foreign_objects_and_live_leases_refuse_the_teacher(teacher_args, mem_url, torch_one_thread):
    store = store_for(mem_url)
    store.write_bytes("notes.txt", b"mine")
    res = _teacher(teacher_args, mem_url)
    assert res.exit_code == 1
    assert "notes.txt is not a file `kdcache teacher` writes" in one_line_error(res)
    assert store.read_bytes("notes.txt") == b"mine" and sorted(store.sizes()) == ["notes.txt"]
    store.delete(["notes.txt"])
    import os
    import socket

    lease = {"run_id": "f" * 32, "host": socket.gethostname(), "pid": os.getpid(), "started": 0, "heartbeat": 0}
    store.write_bytes(".kdcache/lease.json", json.dumps(lease).encode())
    res = _teacher(teacher_args, mem_url)
    assert res.exit_code == 1 and "another `kdcache teacher` (run ffffffff" in one_line_error(res)
    lease["pid"] = 2**22 + 12345  # a process that is gone: its lease is taken over
    store.write_bytes(".kdcache/lease.json", json.dumps(lease).encode())
    res = _teacher(teacher_args, mem_url)
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("cmd", [
    ["prepare", "--data", "s3://bucket/corpus.jsonl", "--tokenizer", "t", "--out", "prep"],
    ["train", "--cache", "memory://kdtest/nothing", "--out", "run", "--student-config", "gs://bucket/c.json"],
])
def test_urls_where_only_local_paths_work_are_refused_at_once(cmd, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(main, cmd)
    assert res.exit_code == 1, res.output
    line = one_line_error(res)
    assert ("object-store URLs are read and written only for prepared data, teacher caches, training runs, "
            "evaluations, reports and exports") in line
    assert list(tmp_path.iterdir()) == []  # no local folder named after the URL


def test_store_errors_are_one_line_naming_the_url_without_secrets(monkeypatch):
    from pipeline import storage

    monkeypatch.setenv("KDCACHE_STORAGE_OPTIONS", "{}")  # configure() exports its options: restored afterwards
    storage.configure({"secret": "hunter2-very-secret"})
    try:
        s = Store("memory://kdtest/errs", retries=3, backoff=0.001)
        boom = {"n": 0}

        def flaky(*a, **k):
            boom["n"] += 1
            raise ConnectionError("connection reset, secret=hunter2-very-secret")

        monkeypatch.setattr(s.fs, "cat_file", flaky)
        with pytest.raises(KdError) as e:
            s.read_bytes("x")
        assert boom["n"] == 3
        assert "memory://kdtest/errs/x" in str(e.value) and "hunter2" not in str(e.value)
        assert "after 3 tries" in str(e.value)
    finally:
        storage.configure(None)
