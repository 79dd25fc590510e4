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
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

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
    commit record last. Leftovers of a killed upload of this shard are deleted first."""
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
    store.delete(stale)
    files = sorted(record["files"])
    with ThreadPoolExecutor(max_workers=UPLOAD_THREADS) as pool:
        list(pool.map(lambda rel: store.put_file(local / rel, f"{prefix}/{rel}"), files))
    store.write_bytes(f"{prefix}/{layout.COMMIT_FILENAME}", mine)


def upload_plan(store: Store, local: Path) -> None:
    """Upload the plan written in `local` (index, config, checksums), kdcache.json last."""
    for name in (layout.INDEX_FILENAME, layout.CONFIG_FILENAME, layout.CHECKSUMS_FILENAME, layout.META_FILENAME):
        if (local / name).is_file():
            store.write_bytes(name, (local / name).read_bytes())


def staging_dir(what: str) -> Path:
    """A fresh local directory for files on their way to a store (under KDCACHE_STAGING or the temp dir)."""
    import tempfile

    root = Path(os.environ.get("KDCACHE_STAGING") or tempfile.gettempdir()) / "kdcache-staging"
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{what}.", dir=root))


# ---- the lease ----------------------------------------------------------------------------
class Lease:
    """The teacher launch's hold on a remote cache (`with Lease(url): ...`)."""

    def __init__(self, url: str, name: str = "lease.json", extra: dict[str, Any] | None = None,
                 conflicts: Any = None):
        self.store = store_for(url)
        self.rel = f"{layout.RECORDS_DIR}/{name}"
        self.conflicts = conflicts or (lambda other_name, holder: False)
        self.body = {"run_id": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
                     "started": time.time(), "command": "kdcache teacher", **(extra or {})}
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

    def _live(self, holder: dict[str, Any]) -> bool:
        if holder.get("host") == socket.gethostname():
            pid = holder.get("pid")
            if not isinstance(pid, int):
                return False
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                return True
            return True
        return time.time() - float(holder.get("heartbeat") or holder.get("started") or 0) < LEASE_TTL_S

    def __enter__(self) -> "Lease":
        mine = self.rel.rsplit("/", 1)[-1]
        for name, holder in self._holders().items():
            if (name == mine or self.conflicts(name, holder)) and self._live(holder):
                raise KdError(f"{self.store.uri(f'{layout.RECORDS_DIR}/{name}')}: another `kdcache teacher` "
                              f"(run {holder.get('run_id', '?')[:8]}, {holder.get('host')} pid {holder.get('pid')}) "
                              f"is writing this cache; wait for it, or delete the lease if that launch is gone "
                              f"(it expires {LEASE_TTL_S:.0f} s after its last heartbeat)")
        self._write()
        time.sleep(SETTLE_S)
        try:
            back = json.loads(self.store.read_bytes(self.rel))
        except (FileNotFoundError, ValueError):
            back = {}
        if back.get("run_id") != self.body["run_id"]:
            raise KdError(f"{self.store.uri(self.rel)}: another `kdcache teacher` took this cache at the same moment "
                          f"(run {str(back.get('run_id', '?'))[:8]}, {back.get('host')}); one launch per cache")
        self._thread = threading.Thread(target=self._beat, name="kdcache-lease", daemon=True)
        self._thread.start()
        return self

    def _write(self) -> None:
        self.store.write_bytes(self.rel, json.dumps({**self.body, "heartbeat": time.time()}).encode())

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._write()
            except KdError:
                pass  # the next beat retries; a lost lease is only a risk after LEASE_TTL_S

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            back = json.loads(self.store.read_bytes(self.rel))
            if back.get("run_id") == self.body["run_id"]:
                self.store.delete([self.rel])
        except (FileNotFoundError, ValueError, KdError):
            pass


def rmtree_quiet(p: Path) -> None:
    shutil.rmtree(p, ignore_errors=True)
