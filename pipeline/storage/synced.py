"""`SyncedDir`: an output at a URL, written through a local working directory.

A stage that writes with local tools (torch.save, save_pretrained, tensorboard's writer) works in a local
directory, and the output at the URL follows it by *units*, each visible whole or not at all:

- a loose file (metrics.jsonl, config.yaml): one PUT, which readers see whole or not at all;
- a unit directory (checkpoints/step_000100, final, best): its files uploaded first, then `_COMMIT.json` (each
  file's size and sha256) as one PUT. A unit without a commit record is never pulled; one whose content
  changed (best/ replaced by a better model) loses its record before its files are replaced.

    synced = SyncedDir(store_for(url), TRAIN_LAYOUT)
    synced.pull(local)     # every loose file and committed unit (of a series, the newest), sha256-checked
    ...                    # the stage writes in `local`
    synced.push()          # what changed since, then what `local` no longer has is deleted

Order makes every instant safe to resume from: changed units, then the loose files in `layout.files` order
(the last, config.yaml for a training run, is what makes a directory one), then the `layout.last` units
(final/: its presence ends a run), then stale units (older checkpoints). When the bytes of `layout.marker`
(the record of the settings and inputs) differ from what the URL held, the stage started over: everything of
the old output under the URL goes first, the loose files first of all, so no old checkpoint is ever found
beside the new settings; units found under a URL without that record (a killed first upload's, perhaps of other
settings) are deleted before anything is uploaded.
"""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from pipeline.errors import CorruptionError, KdError
from pipeline.identity import file_sha256
from pipeline.storage.lease import LEASE_FILE
from pipeline.storage.store import Store

COMMIT = "_COMMIT.json"  # a unit's commit record under the URL (never written locally)
UPLOAD_THREADS = 4  # a unit's files go up in parallel (model shards, optimizer state)


@dataclass(frozen=True)
class SyncLayout:
    """What a stage's output holds.

    `files`: loose files, in upload order (the last one makes a directory an output of the stage); `marker`
    (one of them): the record of what the output was made with: other bytes mean the stage started over.
    `units`: the unit directories (a regex on the relative path).
    `series`: units of which a pull takes only the newest (by name: checkpoints). `last`: units uploaded after
    the loose files. `nested`: other stages' files kept inside (eval/), left alone except by a start-over."""

    files: tuple[str, ...]
    marker: str
    units: re.Pattern[str]
    series: re.Pattern[str] | None = None
    last: tuple[str, ...] = ()
    nested: re.Pattern[str] | None = None

    def unit_of(self, rel: str) -> str | None:
        """The unit directory holding `rel` ("checkpoints/step_000004" for its model.safetensors), if any."""
        parts = PurePosixPath(rel).parts
        for i in range(1, len(parts)):
            prefix = "/".join(parts[:i])
            if self.units.fullmatch(prefix):
                return prefix
        return None

    def is_ours(self, rel: str) -> bool:
        """Is `rel` a name the stage writes under its URL (a loose file, inside a unit, nested, the lease)?"""
        return (rel in self.files or self.unit_of(rel) is not None or bool(LEASE_FILE.fullmatch(rel))
                or bool(self.nested and self.nested.fullmatch(rel)))


class SyncedDir:
    """The output `store` (laid out as `layout`) and the local directory it is worked on in (see the module)."""

    def __init__(self, store: Store, layout: SyncLayout):
        self.store, self.layout = store, layout
        self.local: Path | None = None
        # What the URL holds, as far as this process knows: unit -> its commit record's files ({} when only
        # leftovers without a record are there); loose file -> sha256.
        self.units: dict[str, dict[str, Any]] = {}
        self.files: dict[str, str] = {}
        self._sha: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256: hashed once

    # ---- down ------------------------------------------------------------------------------
    def pull(self, local: Path, units: bool = True) -> None:
        """Fill the empty local directory `local` with what the URL holds: every loose file, every committed
        unit (of a series, the newest only), each file checked against its commit record's sha256. `units`
        False: the loose files only (what a stage needs to decide whether there is work; `pull_units` then)."""
        self.local = local
        names = self.store.sizes()
        lay = self.layout
        for rel in names:
            unit = lay.unit_of(rel)
            if unit is not None:
                self.units.setdefault(unit, {})
        for unit in sorted(self.units):
            if f"{unit}/{COMMIT}" in names:
                self.units[unit] = self._read_commit(unit)
        if units:
            self.pull_units()
        for name in lay.files:
            if name in names:
                data = self._read(name)
                if data is None:
                    continue
                dst = local / name
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(data)
                self.files[name] = _sha_bytes(data)

    def pull_units(self) -> None:
        """Download the committed units `pull` found (of a series, the newest only) into the local directory."""
        assert self.local is not None
        committed = {u: files for u, files in self.units.items() if files}
        pulled = set(committed)
        if self.layout.series is not None:
            series = sorted(u for u in committed if self.layout.series.fullmatch(u))
            pulled -= set(series[:-1])
        for unit in sorted(pulled):
            self._download_unit(unit, committed[unit], self.local)

    def unit_file(self, unit: str, rel: str) -> bytes | None:
        """One file of a committed unit, checked against its record (None when the unit or file is not there)."""
        rec = self.units.get(unit, {}).get(rel)
        if rec is None:
            return None
        data = self._read(f"{unit}/{rel}")
        if data is None or _sha_bytes(data) != rec["sha256"]:
            raise CorruptionError(f"{self.store.uri(f'{unit}/{rel}')}: missing or damaged (its {COMMIT} says "
                                  f"otherwise); delete {unit}/ to continue without it")
        return data

    def _read(self, rel: str) -> bytes | None:
        try:
            return self.store.read_bytes(rel)
        except FileNotFoundError:  # deleted since the listing
            return None

    def _read_commit(self, unit: str) -> dict[str, Any]:
        return _parse_commit(self.store, unit, self._read(f"{unit}/{COMMIT}"))

    def _download_unit(self, unit: str, files: dict[str, Any], local: Path) -> None:
        tmp = local / (unit + ".tmp")  # the name the stage itself writes a unit under
        _fetch_unit(self.store, unit, files, tmp)
        os.replace(tmp, local / unit)

    # ---- up --------------------------------------------------------------------------------
    def push(self) -> None:
        """Make the URL hold what the local directory holds (see the module docstring for the order)."""
        if self.local is None:
            raise RuntimeError("pull() first: push() mirrors the directory pull() filled")
        lay, local = self.layout, self.local
        units = {u: self._unit_files(local / u) for u in self._local_units()}
        files = {name: self._hash(local / name) for name in lay.files if (local / name).is_file()}
        if lay.marker in files and self.files.get(lay.marker) not in (None, files[lay.marker]):
            self._start_over()
        elif self.files.get(lay.marker) is None:  # no record there yet: what is there is a killed first upload's,
            for unit in sorted(u for u in self.units if u not in units):  # maybe of other settings: gone first
                self._delete_unit(unit)
        for unit in sorted(u for u in units if u not in lay.last):
            self._push_unit(unit, units[unit])
        for name in lay.files:
            if name in files and self.files.get(name) != files[name]:
                self.store.put_file(local / name, name)
                self.files[name] = files[name]
        for unit in sorted(u for u in units if u in lay.last):
            self._push_unit(unit, units[unit])
        for unit in sorted(u for u in self.units if u not in units):
            self._delete_unit(unit)

    def _local_units(self) -> list[str]:
        assert self.local is not None
        out = []
        for d, dirs, _ in os.walk(self.local):
            rel = Path(d).relative_to(self.local).as_posix()
            if rel != "." and self.layout.units.fullmatch(rel):
                out.append(rel)
                dirs.clear()  # a unit's subdirectories are its files'
        return out

    def _unit_files(self, root: Path) -> dict[str, dict[str, Any]]:
        return {p.relative_to(root).as_posix(): {"size": p.stat().st_size, "sha256": self._hash(p)}
                for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}

    def _hash(self, p: Path) -> str:
        st = p.stat()
        key = (str(p), st.st_size, st.st_mtime_ns)
        if key not in self._sha:
            self._sha[key] = file_sha256(p)
        return self._sha[key]

    def _push_unit(self, unit: str, files: dict[str, dict[str, Any]]) -> None:
        if self.units.get(unit) == files:
            return
        assert self.local is not None
        there = self.store.sizes(unit)
        if f"{unit}/{COMMIT}" in there:  # replaced: no reader may find the old record over new files
            self.store.delete([f"{unit}/{COMMIT}"])
        with ThreadPoolExecutor(max_workers=UPLOAD_THREADS) as pool:
            list(pool.map(lambda rel: self.store.put_file(self.local / unit / rel, f"{unit}/{rel}"), sorted(files)))
        self.store.write_bytes(f"{unit}/{COMMIT}", json.dumps({"files": files}, indent=1, sort_keys=True).encode())
        self.units[unit] = files
        listed = {f"{unit}/{rel}" for rel in files} | {f"{unit}/{COMMIT}"}
        self.store.delete(sorted(rel for rel in there if rel not in listed))  # an earlier content's other files

    def _delete_unit(self, unit: str) -> None:
        names = sorted(self.store.sizes(unit), key=lambda rel: rel != f"{unit}/{COMMIT}")  # the record first
        self.store.delete(names)
        self.units.pop(unit, None)

    def _start_over(self) -> None:
        """Delete everything of the old output under the URL (not the lease): the loose files first, in the
        reverse of their upload order (so the last uploaded, which says the output is one, goes first), then
        the units' commit records, then the rest."""
        lay = self.layout
        names = [rel for rel in self.store.sizes() if lay.is_ours(rel) and not LEASE_FILE.fullmatch(rel)]
        first = {**{name: i for i, name in enumerate(reversed(lay.files))},
                 **{f"{u}/{COMMIT}": len(lay.files) for u in self.units}}
        self.store.delete(sorted(names, key=lambda rel: (first.get(rel, len(lay.files) + 1), rel)))
        self.units.clear()
        self.files.clear()


def _sha_bytes(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _parse_commit(store: Store, unit: str, raw: bytes | None) -> dict[str, Any]:
    """A unit's commit record's files ({rel: {"size", "sha256"}}), checked to be one."""
    try:
        files = json.loads(raw or b"")["files"]
        if not isinstance(files, dict) or not all(
                isinstance(r, dict) and isinstance(r.get("sha256"), str) for r in files.values()):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise CorruptionError(f"{store.uri(f'{unit}/{COMMIT}')} is damaged; delete {unit}/ to continue "
                              "without it") from None
    for rel in files:
        parts = PurePosixPath(rel).parts
        if not parts or rel.startswith("/") or ".." in parts:
            raise CorruptionError(f"{store.uri(f'{unit}/{COMMIT}')} names a file outside {unit}/ ({rel!r})")
    return files


def _fetch_unit(store: Store, unit: str, files: dict[str, Any], dest: Path) -> None:
    """Download the committed unit's `files` into the local directory `dest`, each checked on arrival."""
    for rel, rec in sorted(files.items()):
        dst = dest / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            store.get_file(f"{unit}/{rel}", dst)
        except FileNotFoundError:
            raise CorruptionError(f"{store.uri(f'{unit}/{rel}')} is missing (its unit's {COMMIT} lists "
                                  f"it); delete {unit}/ to continue without it") from None
        if file_sha256(dst) != rec["sha256"]:
            raise CorruptionError(f"{store.uri(f'{unit}/{rel}')}: checksum mismatch on arrival (the "
                                  f"stored copy is damaged); not used: delete {unit}/ to continue without it")


def local_unit(url: str, unit: str) -> Path:
    """The local, checked copy of the committed unit `unit` of the output at `url` (a training run's final/:
    what `eval --model URL`, `teacher --model URL` and `train --student URL` load), downloaded once per machine
    under the local-copy root (`pipeline.storage.staging.default_root`), keyed by the URL and its commit
    record's bytes, so a unit committed again is downloaded again. Processes of one machine share it (flock)."""
    import hashlib

    from pipeline.storage.staging import default_root, local_copy
    from pipeline.storage.store import store_for

    store = store_for(url)
    try:
        raw = store.read_bytes(f"{unit}/{COMMIT}")
    except FileNotFoundError:
        raise KdError(f"{store.uri(unit)}: no committed model there (no {COMMIT}: a `kdcache train --out URL` "
                      "run has one once it finished)") from None
    files = _parse_commit(store, unit, raw)
    key = hashlib.sha256(store.url.encode() + b"\0" + unit.encode() + b"\0" + raw).hexdigest()[:16]
    name = PurePosixPath(unit).name
    copy = local_copy(default_root() / "units", key, lambda d: (d / name).is_dir(),
                      lambda tmp: _fetch_unit(store, unit, files, tmp / name))
    return copy / name
