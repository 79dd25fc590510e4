"""A cache on an object store: commit without rename, the teacher's lease, what in a prefix is the cache's.

Object stores have no directory rename, so a remote shard is committed by content order instead: its array
files are uploaded first, then its `_COMMIT.json` (rows, sha256 of every file) as ONE single-object write,
which readers see whole or not at all. A shard prefix without a commit record is never read; the next
teacher run deletes what is there (only files named as the writer names them) and uploads the shard again,
so a run killed mid-upload and re-run leaves the same bytes as an uninterrupted run. Planning uploads
index.parquet, config.yaml and kdcache.sha256 before kdcache.json, as on local disks.

One teacher launch per cache: the launcher writes `.kdcache/lease.json` (run id, host, pid, start, last
heartbeat; `lease.replica-r.json` for `--replica r`) and renews it while it runs. A second launch is refused
with one line naming the holder. The lease of a process that is gone is taken over: on the same host when
its pid is dead, from another host once its heartbeat is older than `LEASE_TTL_S`. Object stores have no
atomic create-if-absent in fsspec, so after writing its lease a launch reads it back after a pause and
gives way if another launch's lease replaced it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pipeline import records
from pipeline.cache import layout
from pipeline.errors import KdError
from pipeline.storage import Store, store_for

LEASE_TTL_S = 600.0  # a lease not renewed for this long is a dead launch's (other hosts)
HEARTBEAT_S = 60.0  # how often a running launch renews its lease
SETTLE_S = 1.0  # pause between writing a lease and reading it back (a racing launch's write lands first)
UPLOAD_THREADS = 4  # a shard's files are uploaded in parallel (one per stored array)

# What the teacher writes under a remote cache: the plan's files, shards' Zarr files and commit records, leases.
_PLAN_FILES = (layout.META_FILENAME, layout.CHECKSUMS_FILENAME, layout.INDEX_FILENAME, layout.CONFIG_FILENAME)
_SHARD_FILE = re.compile(r"shards/shard_\d{5,}/(_COMMIT\.json|zarr\.json|[a-z_]+/zarr\.json|[a-z_]+/c(/0)+)")
_LEASE_FILE = re.compile(re.escape(layout.RECORDS_DIR) + r"/lease(\.replica-\d+)?\.json")


def is_ours(rel: str) -> bool:
    """Is `rel` (a name under a remote cache) one the teacher writes?"""
    return rel in _PLAN_FILES or bool(_SHARD_FILE.fullmatch(rel)) or bool(_LEASE_FILE.fullmatch(rel))


def foreign(store: Store) -> list[str]:
    """Objects under the cache URL that `kdcache teacher` did not write (sorted)."""
    return sorted(rel for rel in store.sizes() if not is_ours(rel))


def remove_owned(store: Store, keep_leases: bool = True) -> None:
    """Delete what the teacher wrote under the cache (--overwrite; a plan killed half-way): kdcache.json
    first, so a reader never sees a plan whose shards are going."""
    names = [rel for rel in store.sizes() if is_ours(rel) and not (keep_leases and _LEASE_FILE.fullmatch(rel))]
    names.sort(key=lambda rel: (rel != layout.META_FILENAME, rel))
    store.delete(names)


# ---- shards -------------------------------------------------------------------------------
def shard_prefix(i: int) -> str:
    return f"{layout.SHARDS_DIR}/{layout.shard_name(i)}"


def commit_shard(store: Store, index: int, local: Path, record: dict[str, Any]) -> None:
    """Upload the shard written in the local directory `local` (its files, listed in `record`), then its
    commit record last. Leftovers of a killed upload of this shard are overwritten; files of the shard that
    the record does not list are deleted once it is committed."""
    prefix = shard_prefix(index)
    there = store.sizes(prefix)
    mine = (local / layout.COMMIT_FILENAME).read_bytes()
    if f"{prefix}/{layout.COMMIT_FILENAME}" in there:
        # Committed meanwhile by a worker of a launch that died (its orphaned process finished the shard):
        # the same bytes are the same shard; anything else is another launch's, never overwritten.
        if store.read_bytes(f"{prefix}/{layout.COMMIT_FILENAME}") == mine:
            return
        raise KdError(f"{store.uri(prefix)} was committed by another teacher launch with other content "
                      "(one launch per cache: see its lease)")
    stale = [rel for rel in there if _SHARD_FILE.fullmatch(rel)]
    odd = sorted(set(there) - set(stale))
    if odd:
        raise KdError(f"{store.uri(odd[0])}: not a file kdcache teacher writes, inside {layout.shard_name(index)}; "
                      "remove it, or choose another --out")
    files = sorted(record["files"])
    # Leftovers are written over, not deleted first: an orphaned worker of a dead launch may be committing this
    # same shard (the same bytes), and must not find files gone under its commit record.
    with ThreadPoolExecutor(max_workers=UPLOAD_THREADS) as pool:
        list(pool.map(lambda rel: store.put_file(local / rel, f"{prefix}/{rel}"), files))
    store.write_bytes(f"{prefix}/{layout.COMMIT_FILENAME}", mine)
    listed = {f"{prefix}/{rel}" for rel in files}
    store.delete(sorted(rel for rel in stale if rel not in listed and not rel.endswith(layout.COMMIT_FILENAME)))


def upload_plan(store: Store, local: Path) -> None:
    """Upload the plan written in `local` (index, config, checksums), kdcache.json last."""
    for name in (layout.INDEX_FILENAME, layout.CONFIG_FILENAME, layout.CHECKSUMS_FILENAME, layout.META_FILENAME):
        if (local / name).is_file():
            store.write_bytes(name, (local / name).read_bytes())


def staging_dir(what: str) -> Path:
    """A fresh local directory for files on their way to a store (under KDCACHE_STAGING or the temp dir),
    named with this process's id: what a killed process left there is removed here, once it is gone."""
    import tempfile

    root = Path(os.environ.get("KDCACHE_STAGING") or tempfile.gettempdir()) / "kdcache-staging"
    root.mkdir(parents=True, exist_ok=True)
    remove_dead_entries(root)
    return Path(tempfile.mkdtemp(prefix=f"{what}.{os.getpid()}.", dir=root))


def remove_dead_entries(root: Path) -> None:
    """Delete the `WHAT.PID.RANDOM` entries of `root` whose process is gone (what a kill -9 left)."""
    for d in root.iterdir() if root.is_dir() else ():
        if not entry_alive(d.name):
            shutil.rmtree(d, ignore_errors=True)


def entry_alive(name: str) -> bool:
    """Is the process that made the local entry `WHAT.PID.RANDOM` still running (on this host)?"""
    try:
        pid = int(name.split(".")[-2])
    except (ValueError, IndexError):
        return False
    return bool(records.holder_alive({"host": socket.gethostname(), "pid": pid}))


# ---- the lease ----------------------------------------------------------------------------
class Lease:
    """The teacher launch's hold on a remote cache (`with Lease(url) as lease: ...; lease.check()`).

    `conflicts(name, holder)`: whether another lease object excludes this one (replica rules, as for local
    locks). Taking it: the lease object is created only if absent (S3's If-None-Match, fsspec's "create"
    mode); a dead holder's is deleted and created again; after `SETTLE_S` every lease is read back, so of two
    launches racing for one object the overwritten one gives way, and of two conflicting objects created at
    once the later-started one (then the larger run id) gives way. While held it is renewed every
    `HEARTBEAT_S`, after reading it back: if another launch has taken it (this one's renewals failed for
    longer than `LEASE_TTL_S`), `check()` stops the run with one line before its next shard.
    """

    def __init__(self, url: str, name: str = "lease.json", extra: dict[str, Any] | None = None,
                 conflicts: Any = None):
        self.store = store_for(url)
        self.rel = f"{layout.RECORDS_DIR}/{name}"
        self.name = name
        self.conflicts = conflicts or (lambda other_name, holder: False)
        self.body = {**records.holder_info("teacher", extra), "started_s": time.time()}
        self.lost: str | None = None  # why the lease was lost (set by the heartbeat)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _holders(self) -> dict[str, dict[str, Any]]:
        out = {}
        for name in self.store.listdir(layout.RECORDS_DIR):
            if not _LEASE_FILE.fullmatch(f"{layout.RECORDS_DIR}/{name}"):
                continue
            try:
                out[name] = json.loads(self.store.read_bytes(f"{layout.RECORDS_DIR}/{name}"))
            except FileNotFoundError:
                continue
            except ValueError:
                out[name] = {}
        return out

    @staticmethod
    def _live(holder: dict[str, Any]) -> bool:
        alive = records.holder_alive(holder) if holder.get("pid") is not None else False
        if alive is not None:  # this host: its process (pid and start time) decides
            return alive
        return time.time() - float(holder.get("heartbeat") or holder.get("started_s") or 0) < LEASE_TTL_S

    def _refuse(self, name: str, holder: dict[str, Any]) -> KdError:
        return KdError(f"{self.store.uri(f'{layout.RECORDS_DIR}/{name}')}: another `kdcache teacher` (run "
                       f"{str(holder.get('run_id', '?'))[:8]}, {holder.get('host')} pid {holder.get('pid')}) is "
                       f"writing this cache; wait for it, or delete the lease if that launch is gone (it expires "
                       f"{LEASE_TTL_S:.0f} s after its last heartbeat)")

    def _blocking(self, holders: dict[str, dict[str, Any]]) -> tuple[str, dict[str, Any]] | None:
        for name, holder in sorted(holders.items()):
            if name != self.name and self.conflicts(name, holder) and self._live(holder):
                return name, holder
        return None

    def __enter__(self) -> "Lease":
        holders = self._holders()
        if (block := self._blocking(holders)) is not None:
            raise self._refuse(*block)
        if self.name in holders:
            if self._live(holders[self.name]):
                raise self._refuse(self.name, holders[self.name])
            self.store.delete([self.rel])  # a dead launch's lease: taken over
        try:
            self.store.write_bytes(self.rel, self._text(), create=True)
        except FileExistsError:  # created a moment ago by a racing launch
            raise self._refuse(self.name, self._read() or {}) from None
        time.sleep(SETTLE_S)
        back = self._read() or {}
        if back.get("run_id") != self.body["run_id"]:
            raise KdError(f"{self.store.uri(self.rel)}: another `kdcache teacher` took this cache at the same moment "
                          f"(run {str(back.get('run_id', '?'))[:8]}, {back.get('host')}); one launch per cache")
        block = self._blocking(self._holders())
        if block is not None and (block[1].get("started_s", 0), str(block[1].get("run_id"))) < (
                self.body["started_s"], self.body["run_id"]):
            self.store.delete([self.rel])  # a conflicting launch started first: it keeps the cache
            raise self._refuse(*block)
        self._thread = threading.Thread(target=self._beat, name="kdcache-lease", daemon=True)
        self._thread.start()
        return self

    def check(self) -> None:
        """Stop (one line) if the lease was lost to another launch."""
        if self.lost:
            raise KdError(self.lost)

    def _text(self) -> bytes:
        return json.dumps({**self.body, "heartbeat": time.time()}).encode()

    def _read(self) -> dict[str, Any] | None:
        try:
            d = json.loads(self.store.read_bytes(self.rel))
            return d if isinstance(d, dict) else {}
        except FileNotFoundError:
            return None
        except ValueError:
            return {}

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                back = self._read()
                if back is not None and back.get("run_id") != self.body["run_id"]:
                    self.lost = (f"{self.store.uri(self.rel)}: this launch's lease was taken by another `kdcache "
                                 f"teacher` (run {str(back.get('run_id', '?'))[:8]}, {back.get('host')}) after it "
                                 "could not be renewed; stopped (committed shards are kept)")
                    return
                self.store.write_bytes(self.rel, self._text())
            except KdError:
                pass  # the next beat retries; the lease is only at risk after LEASE_TTL_S

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            back = self._read()
            if back and back.get("run_id") == self.body["run_id"]:
                self.store.delete([self.rel])
        except KdError:
            pass


def rmtree_quiet(p: Path) -> None:
    shutil.rmtree(p, ignore_errors=True)
