"""One launch per remote output: a lease object under `URL/.kdcache/`, renewed while the launch runs.

A local output has its lock file (`pipeline.ownership`); an object store has no atomic create-if-absent through
every fsspec backend and no process to ask, so a launch writes `.kdcache/lease.json` (run id, host, pid, start,
last heartbeat; `lease.replica-r.json` for a teacher's `--replica r`) and renews it while it runs. A second
launch is refused with one line naming the holder. The lease of a process that is gone is taken over: on the
same host when its pid is dead, from another host once its heartbeat is older than `LEASE_TTL_S`. After
writing its lease a launch reads it back after a pause and gives way if another launch's lease replaced it.
"""

from __future__ import annotations

import json
import re
import threading
import time
from typing import Any

from pipeline import records
from pipeline.errors import KdError
from pipeline.records import RECORDS_DIR
from pipeline.storage.store import store_for

LEASE_TTL_S = 600.0  # a lease not renewed for this long is a dead launch's (other hosts)
HEARTBEAT_S = 60.0  # how often a running launch renews its lease
SETTLE_S = 1.0  # pause between writing a lease and reading it back (a racing launch's write lands first)
LEASE_FILE = re.compile(re.escape(RECORDS_DIR) + r"/lease(\.replica-\d+)?\.json")  # the lease objects' names


class Lease:
    """A launch's hold on a remote output (`with Lease(url, "teacher") as lease: ...; lease.check()`): `stage`
    is the command that holds it, named in every refusal.

    `conflicts(name, holder)`: whether another lease object excludes this one (replica rules, as for local
    locks). Taking it: the lease object is created only if absent (S3's If-None-Match, fsspec's "create"
    mode); a dead holder's is deleted and created again; after `SETTLE_S` every lease is read back, so of two
    launches racing for one object the overwritten one gives way, and of two conflicting objects created at
    once the later-started one (then the larger run id) gives way. While held it is renewed every
    `HEARTBEAT_S`, after reading it back: if another launch has taken it (this one's renewals failed for
    longer than `LEASE_TTL_S`), `check()` stops the run with one line before its next unit of work (a shard, a
    checkpoint).
    """

    def __init__(self, url: str, stage: str, name: str = "lease.json", extra: dict[str, Any] | None = None,
                 conflicts: Any = None):
        self.store = store_for(url)
        self.rel = f"{RECORDS_DIR}/{name}"
        self.name, self.stage = name, stage
        self.conflicts = conflicts or (lambda other_name, holder: False)
        self.body = {**records.holder_info(stage, extra), "started_s": time.time()}
        self.lost: str | None = None  # why the lease was lost (set by the heartbeat)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _holders(self) -> dict[str, dict[str, Any]]:
        out = {}
        for name in self.store.listdir(RECORDS_DIR):
            if not LEASE_FILE.fullmatch(f"{RECORDS_DIR}/{name}"):
                continue
            try:
                out[name] = json.loads(self.store.read_bytes(f"{RECORDS_DIR}/{name}"))
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
        return KdError(f"{self.store.uri(f'{RECORDS_DIR}/{name}')}: another `kdcache {self.stage}` (run "
                       f"{str(holder.get('run_id', '?'))[:8]}, {holder.get('host')} pid {holder.get('pid')}) is "
                       f"writing this output; wait for it, or delete the lease if that launch is gone (it expires "
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
            raise KdError(f"{self.store.uri(self.rel)}: another `kdcache {self.stage}` took this output at the same "
                          f"moment (run {str(back.get('run_id', '?'))[:8]}, {back.get('host')}); one launch per output")
        block = self._blocking(self._holders())
        if block is not None and (block[1].get("started_s", 0), str(block[1].get("run_id"))) < (
                self.body["started_s"], self.body["run_id"]):
            self.store.delete([self.rel])  # a conflicting launch started first: it keeps the output
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
                                 f"{self.stage}` (run {str(back.get('run_id', '?'))[:8]}, {back.get('host')}) after it "
                                 "could not be renewed; stopped (what it committed is kept)")
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
