"""What a shared local copy, a racing launch, a lost lease or a hostile record must not do (memory:// stores).

Processes sharing one local copy are modelled by several `Mirror`s of one directory in this process: their
shard locks are `flock`s on separately opened files, which exclude each other exactly as across processes.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import socket
import threading
import time
import zipfile
from pathlib import Path

import fsspec
import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cache import layout, open_cache, remote
from pipeline.cache.mirror import Mirror
from pipeline.data.prepare import load_prepared
from pipeline.data.stream import CacheStream
from pipeline.errors import CorruptionError, KdError
from pipeline.storage import Store, parse_storage_options, store_for
from pipeline.storage import lease as lease_mod
from pipeline.storage.lease import Lease
from stages.cli import main
from tests.storage.packed import flip_member_byte, member_sums, pack_key


@pytest.fixture(scope="module")
def mem_cache(teacher_args):
    """A finished cache of the tiny llama on memory:// (made once for this module)."""
    url = "memory://kdtest-safety/cache"
    res = CliRunner().invoke(main, ["teacher", *teacher_args, "--out", url])
    assert res.exit_code == 0, res.output
    yield url
    fsspec.filesystem("memory").rm("/kdtest-safety", recursive=True)


def test_mirrors_sharing_a_directory_download_each_shard_once(mem_cache, tmp_path):
    mirrors = [Mirror(mem_cache, tmp_path, prefetch=0) for _ in range(4)]
    for m in mirrors:
        m.open()
    errors: list[BaseException] = []

    def fetch(m: Mirror) -> None:
        try:
            for i in (0, 1, 2):
                m.ensure(i)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=fetch, args=(m,)) for m in mirrors]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    sizes = store_for(mem_cache).sizes()
    assert sum(m.bytes_downloaded for m in mirrors) == sum(
        sizes[pack_key(i)] for i in (0, 1, 2))  # once each, whoever fetched it
    late = Mirror(mem_cache, tmp_path, prefetch=0)
    late.open()  # another process opening the copy keeps what the others hold, and their downloads
    assert all(late.has(i) for i in (0, 1, 2))


def test_a_shard_being_read_is_not_evicted_by_another_process(mem_cache, tmp_path):
    reader, other = Mirror(mem_cache, tmp_path, prefetch=0), Mirror(mem_cache, tmp_path, prefetch=0)
    reader.open(), other.open()
    with reader.reading(0) as d:
        assert other.evict(0, wait=False) is False  # held shared by the reader
        assert (d / layout.COMMIT_FILENAME).is_file()
    assert other.evict(0, wait=False) is True and not reader.has(0)


def test_eviction_over_budget_skips_shards_in_use(mem_cache, tmp_path):
    biggest = max(layout.read_commit(mem_cache, i)["bytes"] for i in range(3))
    pinned = Mirror(mem_cache, tmp_path, prefetch=0)
    pinned.open()
    small = Mirror(mem_cache, tmp_path, budget_gb=1.5 * biggest / 2**30, prefetch=0)
    with pinned.reading(0):
        small.open()  # finds shard 0 in the shared copy: its least recently used
        small.ensure(1)
        small.ensure(2)  # over budget: 0 is least recently used but read elsewhere, so 1 goes
        assert small.has(0) and not small.has(1) and small.has(2)


def test_what_a_killed_process_left_in_tmp_is_removed_once_it_is_gone(mem_cache, tmp_path):
    m = Mirror(mem_cache, tmp_path, prefetch=0)
    d = m.open()
    dead = d / "tmp" / f"evicted.{2**22 + 4321}.abcd1234"  # a kill -9 between the rename and the delete
    live = d / "tmp" / f"shard_00001.{os.getpid()}.abcd1234"  # a download in progress elsewhere
    for x in (dead, live):
        (x / "topk_ids").mkdir(parents=True)
        (x / "topk_ids" / "zarr.json").write_text("{}")
    dead_zip = d / "tmp" / f"shard_00001.{2**22 + 4321}.abcd1234-zip"  # a download's zip, killed before unpacking
    live_zip = d / "tmp" / f"shard_00002.{os.getpid()}.abcd1234-zip"
    for z in (dead_zip, live_zip):
        z.write_bytes(b"PK")
    Mirror(mem_cache, tmp_path, prefetch=0).open()
    assert not dead.exists() and live.exists() and not dead_zip.exists() and live_zip.exists()


def test_a_damaged_local_copy_is_fetched_again_and_a_damaged_store_copy_is_named(mem_cache, tmp_path):
    cache = open_cache(mem_cache, local_cache=tmp_path / "m", prefetch=0)
    s = cache.shards[1]
    want = cache.read(s["row_start"], s["row_stop"])["topk_logprobs"]
    chunk = sorted((cache.mirror.local(1) / "head_gaps").rglob("c/*"))[0]
    while chunk.is_dir():
        chunk = sorted(chunk.iterdir())[0]
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    fresh = open_cache(mem_cache, local_cache=tmp_path / "m", prefetch=0)  # a later run on the damaged copy
    np.testing.assert_array_equal(fresh.read(s["row_start"], s["row_stop"])["topk_logprobs"], want)
    assert fresh.mirror.bytes_downloaded == store_for(mem_cache).sizes()[pack_key(1)]


def test_a_commit_record_naming_files_outside_the_shard_is_refused(mem_cache, tmp_path):
    url = "memory://kdtest-safety/hostile"
    fs = fsspec.filesystem("memory")
    fs.copy("/kdtest-safety/cache", "/kdtest-safety/hostile", recursive=True)
    rec = json.loads(fs.cat_file(f"/kdtest-safety/hostile/{layout.commit_name(0)}"))
    rec["files"]["../../../escape.txt"] = "0" * 64
    fs.pipe_file(f"/kdtest-safety/hostile/{layout.commit_name(0)}", json.dumps(rec).encode())
    m = Mirror(url, tmp_path, prefetch=0)
    m.open()
    with pytest.raises(CorruptionError, match="names a file outside the shard"):
        m.ensure(0)
    assert not list(tmp_path.rglob("escape.txt"))


def test_an_interrupted_upload_is_completed_without_deleting_first(mem_cache, tmp_path):
    """A re-upload writes over the leftovers and commits; stray files of the shard (an earlier writer's per-file
    layout) go only after the commit."""
    url = "memory://kdtest-safety/reupload"
    store = store_for(url)
    local = open_cache(mem_cache, local_cache=tmp_path / "m", prefetch=0)
    local.mirror.ensure(0)
    rec = layout.read_commit(mem_cache, 0)
    prefix = remote.shard_prefix(0)
    part = next(rel for rel in sorted(rec["files"]) if "/c/" in rel)
    store.write_bytes(pack_key(0), b"half")  # a killed upload's partial zip
    store.write_bytes(f"{prefix}/{part}", b"half")  # an earlier writer's per-file leftover
    store.write_bytes(f"{prefix}/old_array/zarr.json", b"{}")  # a teacher-named file the record does not list
    deleted: list[str] = []
    real_delete = store.delete
    store.delete = lambda rels: (deleted.extend(rels), real_delete(rels))  # type: ignore[method-assign]
    committed_before_delete = []
    real_write = store.write_bytes

    def write(rel, data, create=False):
        real_write(rel, data, create=create)
        if rel.endswith(layout.COMMIT_FILENAME):
            committed_before_delete.append(not deleted)

    store.write_bytes = write  # type: ignore[method-assign]
    try:
        remote.commit_shard(store, 0, local.mirror.local(0), rec)
    finally:
        del store.delete, store.write_bytes
    assert committed_before_delete == [True]
    assert deleted == sorted([f"{prefix}/{part}", f"{prefix}/old_array/zarr.json"])
    assert layout.read_commit(url, 0) == rec and member_sums(store.read_bytes(pack_key(0))) == rec["files"]
    _rm("reupload")


def test_a_zip_asked_for_before_its_record_is_asked_for_again_once(mem_cache, tmp_path, monkeypatch):
    """A shard's record and zip are requested together; a zip that does not match the record (a leftover replaced
    between the two requests) or was not there yet is fetched once more (the reader's one retry), and read; one
    that still does not match is refused and not kept."""
    stale = store_for(mem_cache).read_bytes(pack_key(1))  # another zip: what a replaced leftover is to the checks
    real = Store.get_file
    asked: list[str] = []

    def get_file(self, rel, local, always=False):
        asked.append(rel)
        if rel == pack_key(2) and (always or asked.count(rel) == 1):
            Path(local).write_bytes(stale)
            return
        real(self, rel, local)

    monkeypatch.setattr(Store, "get_file", get_file)
    cache = open_cache(mem_cache, local_cache=tmp_path / "m", prefetch=0)
    s = cache.shards[2]
    got = cache.read(s["row_start"], s["row_stop"])["topk_logprobs"]
    assert asked.count(pack_key(2)) == 2
    monkeypatch.setattr(Store, "get_file", real)
    want = open_cache(mem_cache, local_cache=tmp_path / "m2", prefetch=0).read(s["row_start"], s["row_stop"])
    np.testing.assert_array_equal(got, want["topk_logprobs"])
    # Not there yet when asked for (committed between the two requests), and no per-file objects: asked again.
    asked.clear()

    def not_yet(self, rel, local):
        asked.append(rel)
        if rel == pack_key(2) and asked.count(rel) == 1:
            raise FileNotFoundError(rel)
        real(self, rel, local)

    monkeypatch.setattr(Store, "get_file", not_yet)
    cache = open_cache(mem_cache, local_cache=tmp_path / "m4", prefetch=0)
    np.testing.assert_array_equal(cache.read(s["row_start"], s["row_stop"])["topk_logprobs"], want["topk_logprobs"])
    assert asked.count(pack_key(2)) == 2
    monkeypatch.setattr(Store, "get_file", lambda self, rel, local: get_file(self, rel, local, always=True))
    cache = open_cache(mem_cache, local_cache=tmp_path / "m3", prefetch=0)
    with pytest.raises(CorruptionError, match="shard_00002: "):
        cache.read(s["row_start"], s["row_stop"])
    assert not list((tmp_path / "m3").glob("*/shards/shard_00002"))


def test_a_cache_copied_from_a_store_by_a_sync_tool_reads_as_the_store(mem_cache, tmp_path, monkeypatch):
    """`aws s3 sync s3://bucket/cache DIR` copies the packed shards as they are: DIR opens (read as a file:// store,
    through a local copy), reads the store's rows, verifies, and a flipped byte in a zip is named."""
    monkeypatch.setenv("KDCACHE_LOCAL_CACHE", str(tmp_path / "copies"))
    copy = tmp_path / "synced"
    fsspec.filesystem("memory").get("/kdtest-safety/cache", str(copy), recursive=True)
    assert not list(copy.glob("shards/*/*/zarr.json"))  # packed, as on the store
    local, remote_ = open_cache(copy), open_cache(mem_cache, local_cache=tmp_path / "m")
    for k, v in remote_.read(0, remote_.num_rows).items():
        np.testing.assert_array_equal(local.read(0, local.num_rows)[k], v)
    res = CliRunner().invoke(main, ["inspect", str(copy), "--verify"])
    assert res.exit_code == 0, res.output
    (copy / pack_key(1)).write_bytes(flip_member_byte((copy / pack_key(1)).read_bytes(), "head_gaps/c/0/0"))
    res = CliRunner().invoke(main, ["inspect", str(copy), "--verify"])
    assert res.exit_code != 0 and "shard_00001: file head_gaps/c/0/0 checksum mismatch" in res.output


def test_verify_names_objects_a_remote_cache_does_not_know(mem_cache, tmp_path, monkeypatch):
    """`inspect --verify` of a URL: every object is the teacher's (plan, packed shards, their records) or named:
    a foreign object, a shard outside the plan, a teacher-named file its shard's record does not list."""
    url = "memory://kdtest-safety/strays"
    fsspec.filesystem("memory").copy("/kdtest-safety/cache", "/kdtest-safety/strays", recursive=True)
    store = store_for(url)
    n = len(json.loads(store.read_bytes("kdcache.json"))["shards"])
    strays = ["notes.txt", f"shards/{layout.shard_name(n + 3)}/shard.zip", "shards/shard_00001/old_array/zarr.json"]
    for rel in strays:
        store.write_bytes(rel, b"x")
    monkeypatch.setenv("KDCACHE_LOCAL_CACHE", str(tmp_path / "m"))
    res = CliRunner().invoke(main, ["inspect", url, "--verify"])
    assert res.exit_code == 1
    named = sorted(line.split()[1].rstrip(":") for line in res.output.splitlines() if line.startswith("BAD "))
    assert named == sorted(strays), res.output
    _rm("strays")


def test_a_store_that_keeps_failing_mid_epoch_stops_the_read_with_one_line(mem_cache, tmp_path, monkeypatch):
    """A shard's zip that cannot be fetched (connection reset, every try): one line naming its URL and the tries,
    nothing half-downloaded left in the local copy, and the next read, the store back, gets the shard."""
    cache = open_cache(mem_cache, local_cache=tmp_path / "m", prefetch=0)
    store = cache.mirror.store
    monkeypatch.setattr(store, "backoff", 0.001)
    real = store.fs.get_file

    def reset(rpath, lpath, **kw):
        if rpath.endswith("shard.zip"):
            raise ConnectionResetError("connection reset by peer")
        return real(rpath, lpath, **kw)

    monkeypatch.setattr(store.fs, "get_file", reset)
    s = cache.shards[1]
    with pytest.raises(KdError) as e:
        cache.read(s["row_start"], s["row_stop"])
    msg = str(e.value)
    assert f"{mem_cache}/{pack_key(1)}" in msg and f"after {store.retries} tries" in msg and "\n" not in msg
    assert not isinstance(e.value, CorruptionError)
    assert not cache.mirror.has(1) and not list((cache.path / layout.TMP_DIR).iterdir())
    monkeypatch.setattr(store.fs, "get_file", real)
    np.testing.assert_array_equal(cache.read(s["row_start"], s["row_stop"])["topk_logprobs"],
                                  open_cache(mem_cache, local_cache=tmp_path / "m2").read(
                                      s["row_start"], s["row_stop"])["topk_logprobs"])


def _rm(name: str) -> None:
    fs = fsspec.filesystem("memory")
    if fs.exists(f"/kdtest-safety/{name}"):
        fs.rm(f"/kdtest-safety/{name}", recursive=True)


# ---- the lease -------------------------------------------------------------------------------
def _holder(**kw):
    return {"run_id": "e" * 32, "host": "elsewhere", "pid": 1, "started_s": time.time(), "heartbeat": time.time(),
            **kw}


def test_of_two_conflicting_launches_created_together_the_later_gives_way(monkeypatch):
    monkeypatch.setattr(lease_mod, "SETTLE_S", 0.0)
    url = "memory://kdtest-safety/race"
    store = store_for(url)
    lease = Lease(url, "teacher", conflicts=lambda name, holder: name.startswith("lease.replica-"))
    real_write = store.write_bytes

    def write(rel, data, create=False):  # a replica launch's lease lands at the same moment as ours
        real_write(rel, data, create=create)
        if rel == ".kdcache/lease.json":
            real_write(".kdcache/lease.replica-0.json", json.dumps(_holder(started_s=time.time() - 5)).encode())

    monkeypatch.setattr(lease.store, "write_bytes", write)
    with pytest.raises(KdError, match="another `kdcache teacher` \\(run eeeeeeee"):
        lease.__enter__()
    assert sorted(store.listdir(".kdcache")) == ["lease.replica-0.json"]  # ours withdrawn, theirs kept
    _rm("race")


def test_a_lease_created_meanwhile_is_never_overwritten(monkeypatch):
    monkeypatch.setattr(lease_mod, "SETTLE_S", 0.0)
    url = "memory://kdtest-safety/create"
    store = store_for(url)
    lease = Lease(url, "teacher")
    real_list = store.listdir
    # The other launch writes its lease between our look and our write.
    monkeypatch.setattr(lease.store, "listdir", lambda rel="": (
        real_list(rel), store.write_bytes(".kdcache/lease.json", json.dumps(_holder()).encode()))[0])
    with pytest.raises(KdError, match="run eeeeeeee"):
        lease.__enter__()
    assert json.loads(store.read_bytes(".kdcache/lease.json"))["run_id"] == "e" * 32
    _rm("create")


def test_a_lease_lost_to_another_launch_stops_the_run(monkeypatch):
    monkeypatch.setattr(lease_mod, "SETTLE_S", 0.0)
    monkeypatch.setattr(lease_mod, "HEARTBEAT_S", 0.02)
    url = "memory://kdtest-safety/lost"
    store = store_for(url)
    with Lease(url, "teacher") as lease:
        lease.check()
        store.write_bytes(".kdcache/lease.json", json.dumps(_holder()).encode())  # taken over meanwhile
        deadline = time.monotonic() + 5
        while lease.lost is None and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(KdError, match="lease was taken by another `kdcache teacher` \\(run eeeeeeee"):
            lease.check()
    assert json.loads(store.read_bytes(".kdcache/lease.json"))["run_id"] == "e" * 32  # theirs is left alone
    _rm("lost")


def test_a_same_host_lease_whose_pid_was_reused_is_taken_over(monkeypatch):
    monkeypatch.setattr(lease_mod, "SETTLE_S", 0.0)
    url = "memory://kdtest-safety/reused"
    store = store_for(url)
    # this very process's pid, but another start time: the launch that held it is gone
    store.write_bytes(".kdcache/lease.json", json.dumps(_holder(host=socket.gethostname(), pid=os.getpid(),
                                                                 pid_start="1")).encode())
    with Lease(url, "teacher") as lease:
        assert json.loads(store.read_bytes(".kdcache/lease.json"))["run_id"] == lease.body["run_id"]
    _rm("reused")


# ---- options and errors ----------------------------------------------------------------------
def test_storage_option_values_are_kept_as_typed():
    got = parse_storage_options(["key=0x1F", "secret=abc #x", "token=123456", "anon=true", "use_ssl=False",
                                 "client_kwargs.region_name=eu-west-1"])
    assert got == {"key": "0x1F", "secret": "abc #x", "token": "123456", "anon": True, "use_ssl": False,
                   "client_kwargs": {"region_name": "eu-west-1"}}


@pytest.mark.parametrize("items, says", [
    (["secret:wJalrXUtnFEMI"], "expects KEY=VALUE"),
    (["a=1", "a.b=2"], "'a' was given a value"),
    (["a.b=2", "a=1"], "it holds keys"),
    (["a..b=1"], "an empty part"),
])
def test_bad_storage_options_are_one_line_without_the_value(items, says):
    with pytest.raises(KdError, match=says) as e:
        parse_storage_options(items)
    assert "wJalr" not in str(e.value)


def test_errors_no_retry_can_cure_are_not_retried(monkeypatch):
    s = Store("memory://kdtest-safety/errs", retries=4, backoff=0.001)
    calls = {"n": 0}

    def bad(*a, **k):
        calls["n"] += 1
        raise TypeError("AioSession.__init__() got an unexpected keyword argument 'foo'")

    monkeypatch.setattr(s.fs, "cat_file", bad)
    with pytest.raises(KdError, match="unexpected keyword argument 'foo'") as e:
        s.read_bytes("x")
    assert calls["n"] == 1 and "tries" not in str(e.value)


def test_one_request_per_shard_and_the_per_file_layout_still_reads(mem_cache, prepared_dir, tmp_path, monkeypatch):
    """A remote shard is one object (its zip): a reader makes one request for it beside the commit record, whoever
    needs the record first (the prefetch, the stream's checks of the rows' targets). A cache
    copied to the store file by file (`aws s3 sync` of a local cache) reads the same, its small zarr.json files
    taken from the commit record instead of one request each, and an inline text that does not match its sha256
    is never used."""
    rec = layout.read_commit(mem_cache, 2)
    inline = rec["inline"]
    assert inline and set(inline) == {r for r in rec["files"] if r.endswith("zarr.json")}
    fetched: list[str] = []
    real = Store._call
    monkeypatch.setattr(Store, "_call", lambda self, rel, fn: (fetched.append(rel), real(self, rel, fn))[1])
    cache = open_cache(mem_cache, local_cache=tmp_path / "m", prefetch=0)
    s = cache.shards[2]
    want = cache.read(s["row_start"], s["row_stop"])["topk_logprobs"]
    assert sorted(r for r in fetched if "shard_00002" in r) == [layout.commit_name(2), pack_key(2)]  # once each
    fetched.clear()
    data = load_prepared(prepared_dir)  # the student's path: the rows' targets checked against the record first
    cache = open_cache(mem_cache, data=data, local_cache=tmp_path / "m1", prefetch=1)
    stream = CacheStream(data, cache, 4, seed=0, threads=1)
    list(itertools.islice(iter(stream), stream.batches_in_epoch(0)))
    for i in range(len(cache.shards)):
        assert sorted(r for r in fetched if layout.shard_name(i) in r) == [layout.commit_name(i), pack_key(i)]

    # The same shard stored file by file: the zip's members as objects, no zip.
    url = "memory://kdtest-safety/perfile"
    fs = fsspec.filesystem("memory")
    fs.copy("/kdtest-safety/cache", "/kdtest-safety/perfile", recursive=True)
    store = store_for(url)
    with zipfile.ZipFile(io.BytesIO(store.read_bytes(pack_key(2)))) as z:
        for rel in z.namelist():
            store.write_bytes(f"shards/shard_00002/{rel}", z.read(rel))
    store.delete([pack_key(2)])
    fetched.clear()
    c = open_cache(url, local_cache=tmp_path / "m2", prefetch=0)
    np.testing.assert_array_equal(c.read(s["row_start"], s["row_stop"])["topk_logprobs"], want)
    assert sorted(r.split("shard_00002/")[1] for r in fetched if "shard_00002/" in r) == sorted(
        ["_COMMIT.json", "shard.zip", *(set(rec["files"]) - set(inline))])  # no zip: the arrays alone
    # A record whose inline text was altered (its "files" digests kept): named, not read.
    bad = json.loads(store.read_bytes(layout.commit_name(2)))
    key = sorted(bad["inline"])[0]
    bad["inline"][key] = bad["inline"][key].replace('"', "'", 1)
    store.write_bytes(layout.commit_name(2), json.dumps(bad).encode())
    c = open_cache(url, local_cache=tmp_path / "m3", prefetch=0)
    with pytest.raises(CorruptionError, match=f"shard_00002: file {key} checksum mismatch on arrival"):
        c.read(c.shards[2]["row_start"], c.shards[2]["row_stop"])
    _rm("perfile")
