"""The local copy of a remote cache: what a student reads an object-store cache through.

    m = Mirror("s3://bucket/cache", root="/nvme/kdcache", budget_gb=200, prefetch=2)
    local = m.open()        # metadata downloaded; a local directory with the cache's layout
    m.hint([3, 0, 7, ...])  # the order shards will be first needed in (the epoch plan's)
    m.ensure(3)             # shard 3 is local, complete and checked; the next `prefetch` are on their way

A shard is downloaded whole: its one `shard.zip` object (`pipeline.cache.packing`), requested together with
its commit record, unpacked under `tmp/` with every file checked against the sha256 the record lists (a
shard stored file by file, as a cache copied with `aws s3 sync` is: its files, the small ones taken from the
record's `inline`), and renamed into `shards/` only once every file passed, with its `_COMMIT.json` copied
last: a local shard directory is complete or absent, as on the teacher's side. Evicting renames the
directory into `tmp/` before deleting it, so a kill -9 at any point leaves a shard whole or gone.

Several processes may share one copy (torchrun ranks, a held-out evaluation beside training): each shard has
a lock file (`locks/shard_NNNNN.lock`, `flock`), held exclusively to download or evict it and shared while it
is read (`Mirror.reading`), so no process deletes a shard another is reading, and a shard two processes need
is downloaded once. `tmp/` entries carry their process id and are removed by the next `open` only once that
process is gone. A mismatch is a `CorruptionError` naming the shard and file; the
bytes are deleted and never read. Threads download the next `prefetch` shards of the hinted order while
the student reads. When the shards held exceed `budget_gb`, the least recently used are evicted, so a
second epoch reads nothing remote when the cache fits and a cache larger than the disk still streams.

The mirror directory is keyed by the URL and the bytes of its kdcache.json, so a cache rebuilt with other
settings under the same URL never mixes with an old copy; a mirrored shard is trusted across runs on its
local copy's chunk checksums (crc32c, checked on every read) like any local cache.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import threading
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator

from pipeline.cache import layout, packing
from pipeline.errors import CorruptionError, KdError
from pipeline.identity import file_sha256
from pipeline.storage import store_for
from pipeline.storage.staging import default_root, remove_dead_entries

PLAN_FILES = (layout.CHECKSUMS_FILENAME, layout.INDEX_FILENAME, layout.CONFIG_FILENAME)
DOWNLOAD_THREADS = 4  # files of one shard fetched at once (a shard stored file by file)
RECORDS_KEPT = 64  # commit records kept in memory for shards about to be downloaded (a few KB each)


class Mirror:
    """A bounded local copy of the remote cache at `url` (see the module docstring)."""

    def __init__(self, url: str, root: str | Path | None = None, budget_gb: float = 0.0, prefetch: int = 2,
                 on_evict: Callable[[int], None] | None = None):
        self.url = str(url).rstrip("/")
        self.store = store_for(self.url)
        self.root = Path(root) if root else default_root()
        self.budget = int(budget_gb * 2**30) if budget_gb and budget_gb > 0 else None
        self.prefetch = max(0, int(prefetch))
        self.on_evict = on_evict
        self.dir: Path | None = None
        self._path_cache: dict[int, tuple[Path, str, str]] = {}
        # Commit records read from the store for shards not local yet, the most recent RECORDS_KEPT.
        self._records: OrderedDict[int, bytes] = OrderedDict()
        self.bytes_downloaded = 0  # shard bytes fetched by this process (benchmarks: per epoch / cache size)
        self._lock = threading.Lock()
        self._shard_locks: dict[int, threading.Lock] = {}
        self._held: OrderedDict[int, int] = OrderedDict()  # mirrored shard -> bytes, least recently used first
        self._committed: set[int] = set()
        self._order: list[int] = []
        self._position: dict[int, int] = {}
        self._inflight: set[int] = set()
        self._pool: ThreadPoolExecutor | None = None

    # ---- metadata ---------------------------------------------------------------------------
    def open(self) -> Path:
        """Download the cache's metadata into its mirror directory and return that directory."""
        try:
            meta = self.store.read_bytes(layout.META_FILENAME)
        except FileNotFoundError:
            raise KdError(f"cache metadata not found: {self.store.uri(layout.META_FILENAME)}") from None
        key = hashlib.sha256(self.url.encode() + b"\0" + meta).hexdigest()[:16]
        self.dir = self.root / key
        self._path_cache.clear()
        (self.dir / layout.SHARDS_DIR).mkdir(parents=True, exist_ok=True)
        _write(self.dir / layout.META_FILENAME, meta)
        for name in PLAN_FILES:  # small: fetched on every open, so they are the store's current ones
            try:
                _write(self.dir / name, self.store.read_bytes(name))
            except FileNotFoundError:
                (self.dir / name).unlink(missing_ok=True)
        held = []
        for d in (self.dir / layout.SHARDS_DIR).iterdir():
            if d.name.startswith("shard_") and (d / layout.COMMIT_FILENAME).is_file():
                held.append((d.stat().st_mtime, int(d.name[len("shard_"):]), _tree_bytes(d)))
        for _, i, size in sorted(held):
            self._held[i] = size
            self._committed.add(i)
        (self.dir / "locks").mkdir(exist_ok=True)
        remove_dead_entries(self.dir / layout.TMP_DIR)  # downloads and evictions a killed process left
        return self.dir

    def committed(self, i: int) -> bool:
        """Is shard `i` committed in the store (a commit record, once seen, stays)?"""
        if i in self._committed:
            return True
        if self.store.exists(layout.commit_name(i)):
            self._committed.add(i)
            return True
        return False

    def record(self, i: int) -> dict:
        """Shard `i`'s commit record: the local copy's, else the store's (fetched once: a record never changes
        once written, and the download of the shard uses the same bytes)."""
        if self.has(i):
            return layout.read_commit(self.dir, i)
        import json

        try:
            rec = json.loads(self._record_bytes(i))
        except ValueError:
            raise CorruptionError(f"{layout.shard_name(i)}: its commit record in {self.url} is not valid JSON"
                                  ) from None
        if not isinstance(rec, dict):
            raise CorruptionError(f"{layout.shard_name(i)}: its commit record in {self.url} is not a JSON object")
        return rec

    def _record_bytes(self, i: int) -> bytes:
        """Shard `i`'s commit record as stored (a `KdError` if it is not committed); kept in memory until the
        shard is local."""
        with self._lock:
            raw = self._records.get(i)
        if raw is None:
            try:
                raw = self.store.read_bytes(layout.commit_name(i))
            except FileNotFoundError:
                raise KdError(f"{self.url}: {layout.shard_name(i)} is not committed (the cache is incomplete: re-run "
                              "`kdcache teacher` to finish it; a student may train while it runs, with --follow)"
                              ) from None
            with self._lock:
                self._records[i] = raw
                while len(self._records) > RECORDS_KEPT:
                    self._records.popitem(last=False)
                self._committed.add(i)
        return raw

    def committed_all(self, n: int) -> list[bool]:
        """Per planned shard (of `n`): committed? One listing of the store."""
        self._committed |= layout.listed_commits(self.store)
        return [i in self._committed for i in range(n)]

    # ---- shards -----------------------------------------------------------------------------
    def _paths(self, i: int) -> tuple[Path, str, str]:
        """Shard `i`'s local directory, its commit record and its lock file (strings: checked on every read)."""
        got = self._path_cache.get(i)
        if got is None:
            d = self.dir / layout.SHARDS_DIR / layout.shard_name(i)
            got = (d, str(d / layout.COMMIT_FILENAME), str(self.dir / "locks" / f"{layout.shard_name(i)}.lock"))
            self._path_cache[i] = got
        return got

    def local(self, i: int) -> Path:
        return self._paths(i)[0]

    def has(self, i: int) -> bool:
        return os.path.isfile(self._paths(i)[1])

    @contextmanager
    def _flock(self, i: int, mode: int) -> Iterator[bool]:
        """Shard `i`'s lock file held in `mode` (fcntl.LOCK_SH / LOCK_EX, | LOCK_NB): yields whether it was got."""
        fd = os.open(self._paths(i)[2], os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, mode)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)  # releases the lock

    @contextmanager
    def reading(self, i: int) -> Iterator[Path]:
        """Shard `i` local, checked, and kept (no process evicts it) while the block runs."""
        while True:  # called for every read: the lock taken inline, not through _flock
            self.ensure(i)
            d, commit, lock = self._paths(i)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH)
                if os.path.isfile(commit):  # not evicted between the download and the lock
                    yield d
                    return
            finally:
                os.close(fd)  # releases the lock

    def hint(self, order: list[int]) -> None:
        """The order in which shards will first be needed: the first `prefetch` of it start downloading now, and
        `ensure(i)` prefetches the ones after `i` in it."""
        with self._lock:
            self._order = list(dict.fromkeys(order))
            self._position = {s: k for k, s in enumerate(self._order)}
            first = self._order[: self.prefetch]
        if self.prefetch:  # the first shards start now, while the reader sets up and waits for the first
            self._submit(first)

    def ensure(self, i: int, fresh: bool = False) -> Path:
        """Shard `i`'s local directory, downloading and checking it first if needed; `fresh`: download it
        again even if held (`inspect --verify` checks the store, not the copy)."""
        if fresh:
            self.evict(i)
        if not self.has(i):
            with self._lock:
                lock = self._shard_locks.setdefault(i, threading.Lock())
            with lock, self._flock(i, fcntl.LOCK_EX):
                if not self.has(i):
                    self._download(i)
        with self._lock:
            if i in self._held:
                self._held.move_to_end(i)
            else:
                self._held[i] = _tree_bytes(self.local(i))
        self._ahead(i)
        self._evict_over_budget(keep=i)
        return self.local(i)

    def _download(self, i: int) -> None:
        name, prefix = layout.shard_name(i), f"{layout.SHARDS_DIR}/{layout.shard_name(i)}"
        tmp = self.dir / layout.TMP_DIR / f"{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        packed = tmp.with_name(f"{tmp.name}-zip")  # WHAT.PID.RANDOM-zip: removed with tmp/'s dead entries
        try:
            with self._lock:
                raw = self._records.get(i)
            if raw is not None:  # read already (a prefetch, the reader's checks): the zip alone
                found = self._get(f"{prefix}/{packing.PACK_FILENAME}", packed)
            else:  # the record and the zip together: one round trip, not two
                with ThreadPoolExecutor(max_workers=1) as pool:
                    zip_job = pool.submit(self._get, f"{prefix}/{packing.PACK_FILENAME}", packed)
                    try:
                        raw = self._record_bytes(i)
                    finally:
                        found = zip_job.result() if zip_job.exception() is None else False
                zip_job.result()  # a store that kept failing: its one line
            files, inline = self._parse_record(name, raw)
            size = 0
            # Every file is checked against the record; a mismatch or a missing file is raised: the reader evicts and
            # asks once more (Cache.read_raw), which also covers a zip asked for just before its shard was committed.
            if found:
                size += packed.stat().st_size
                packing.unpack(packed, files, tmp, name, self.url)
            else:  # stored file by file (a cache copied so, or a shard of an earlier writer beside packed ones)
                with ThreadPoolExecutor(max_workers=DOWNLOAD_THREADS) as pool:
                    size += sum(pool.map(lambda item: self._fetch_file(name, prefix, tmp, inline, *item),
                                         sorted(files.items())))
            packed.unlink(missing_ok=True)
            _write(tmp / layout.COMMIT_FILENAME, raw)
            final = self.local(i)
            if final.exists():  # a leftover without a commit record (the shard's lock is held: no one reads it)
                self._discard(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            packed.unlink(missing_ok=True)
            raise
        with self._lock:
            self.bytes_downloaded += size
            self._committed.add(i)
            self._records.pop(i, None)  # the local copy holds it now

    def _get(self, rel: str, dst: Path) -> bool:
        """Download object `rel` to `dst` -> whether it exists."""
        try:
            self.store.get_file(rel, dst)
            return True
        except FileNotFoundError:
            return False

    def _parse_record(self, name: str, raw: bytes) -> tuple[dict[str, str], dict[str, str]]:
        """A shard's commit record -> (files: rel -> sha256, inline: rel -> text), its names checked."""
        import json

        try:
            record = json.loads(raw)
            files = dict(record["files"])
            inline = record.get("inline") or {}  # small files carried by the record (writer.write_shard)
            if not isinstance(inline, dict):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise CorruptionError(f"{name}: its commit record in {self.url} is damaged") from None
        for rel in files:  # the record names files inside the shard, nothing else
            parts = PurePosixPath(rel).parts
            if not parts or rel.startswith("/") or ".." in parts or "\\" in rel:
                raise CorruptionError(f"{name}: its commit record in {self.url} names a file outside the shard "
                                      f"({rel!r}); not downloaded")
        return files, inline

    def _fetch_file(self, name: str, prefix: str, tmp: Path, inline: dict[str, str], rel: str, digest: str) -> int:
        """One file of a shard stored file by file, into `tmp`, checked (-> its size)."""
        dst = tmp / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            if isinstance(inline.get(rel), str):
                dst.write_bytes(inline[rel].encode())  # checked below like a downloaded file
            else:
                self.store.get_file(f"{prefix}/{rel}", dst)
        except FileNotFoundError:
            raise CorruptionError(f"{name}: file {rel} is missing from {self.url} (its commit record "
                                  "lists it); rebuild the shard with `kdcache teacher`") from None
        if file_sha256(dst) != digest:
            raise CorruptionError(f"{name}: file {rel} checksum mismatch on arrival from {self.url}: the stored "
                                  "copy is damaged and was not read; delete the shard's objects and re-run "
                                  "`kdcache teacher` to rewrite it")
        return dst.stat().st_size

    def _ahead(self, i: int) -> None:
        if not self.prefetch:
            return
        with self._lock:
            if self._order:
                k = self._position.get(i, -1)
                nxt = self._order[k + 1: k + 1 + self.prefetch] if k >= 0 else []
            else:
                nxt = list(range(i + 1, i + 1 + self.prefetch))
        self._submit(nxt)

    def _submit(self, shards: list[int]) -> None:
        """Download `shards` in the background (those not held or on their way already)."""
        with self._lock:
            nxt = [j for j in shards if j not in self._inflight and j not in self._held]
            if not nxt:
                return
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.prefetch, thread_name_prefix="kdcache-prefetch")
            self._inflight.update(nxt)
        for j in nxt:
            self._pool.submit(self._prefetch_one, j)

    def _prefetch_one(self, j: int) -> None:
        try:
            # Its record first (what the download and the reader's checks use): under --follow a later shard
            # may not be committed yet, which is not an error here.
            if not self.has(j):  # (another process sharing the copy may have fetched it)
                self._record_bytes(j)
            self.ensure_quiet(j)
        except Exception:  # the reader meets the same error, with its message, when it needs the shard
            pass
        finally:
            with self._lock:
                self._inflight.discard(j)

    def ensure_quiet(self, j: int) -> None:
        """Download shard `j` if needed, without prefetching further or evicting (a prefetch task)."""
        if self.has(j):  # (fetched by another process sharing the copy: counted as held here too)
            size = _tree_bytes(self.local(j))
            with self._lock:
                self._held.setdefault(j, size)
                self._records.pop(j, None)
            return
        with self._lock:
            lock = self._shard_locks.setdefault(j, threading.Lock())
        with lock, self._flock(j, fcntl.LOCK_EX):
            if not self.has(j):
                self._download(j)
        with self._lock:
            self._held.setdefault(j, _tree_bytes(self.local(j)))

    def evict(self, i: int, wait: bool = True) -> bool:
        """Delete shard `i`'s local copy; `wait=False`: only if no process is reading it (-> whether evicted)."""
        with self._flock(i, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB) as got:
            if not got:
                return False
            with self._lock:
                self._held.pop(i, None)
            if self.on_evict:
                self.on_evict(i)
            if self.local(i).exists():
                self._discard(self.local(i))
        return True

    def _discard(self, d: Path) -> None:
        """Remove a shard directory: renamed into tmp/ first (atomic), so a kill leaves it whole or gone."""
        gone = self.dir / layout.TMP_DIR / f"evicted.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        gone.parent.mkdir(parents=True, exist_ok=True)
        os.replace(d, gone)
        shutil.rmtree(gone, ignore_errors=True)

    def _evict_over_budget(self, keep: int) -> None:
        if self.budget is None:
            return
        busy: set[int] = set()  # being read (here or by another process): skipped this time
        while True:
            with self._lock:
                total = sum(self._held.values())
                # the shard in use, those being fetched and the next ones the reader needs are never evicted
                spare = [j for j in self._held if j != keep and j not in self._inflight]
                if total <= self.budget or len(spare) <= self.prefetch:
                    return
                victims = [j for j in spare[: len(spare) - self.prefetch] if j not in busy]
                if not victims:
                    return
                victim = victims[0]
            if not self.evict(victim, wait=False):
                busy.add(victim)

    def held_bytes(self) -> int:
        with self._lock:
            return sum(self._held.values())

    def close(self, wait: bool = True) -> None:
        """Stop prefetching (queued downloads are cancelled; `wait`: for the running ones to end)."""
        if self._pool is not None:
            self._pool.shutdown(wait=wait, cancel_futures=True)
            self._pool = None


def _write(p: Path, data: bytes) -> None:
    tmp = p.with_name(f"{p.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, p)


def _tree_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
