"""What each stage owns in its output directory, by record, and who is writing it now.

    from pipeline.ownership import TRAIN, claim
    with claim(Path("runs/kd"), TRAIN) as own:   # the lock, then every file checked against the manifest
        own.remove_owned()                        # --overwrite: only recorded, unchanged files go
        own.writing("metrics.jsonl", "final")     # declared before writing them (a kill -9 leaves them ours)
        ...                                       # leaving the block records what was written and unlocks

**Ownership by record.** Every stage keeps `OUT/.kdcache/manifest.json`: each file it wrote with its size,
sha256 and mtime, written atomically and updated as the stage writes. A file in OUT (at any depth) that the
manifest does not list, or that changed since (size or sha256 differ; the sha256 is recomputed only when
size or mtime differ), is *foreign* whatever its name, and its presence refuses the stage before anything
is written or deleted, with and without --overwrite, naming the file (`notes.txt`, `sub/thesis.tex`,
`config.yaml`). Besides the recorded files a stage owns:

- the paths it declared it is `writing` (metrics.jsonl while a run appends to it, checkpoints/, final.tmp):
  theirs while it runs and after a kill -9, until its re-run records what they hold (`X.tmp` and `X.old`,
  the names files are written under before a rename, go with `X`);
- *trees* whose content carries its own record: a cache's `shards/shard_NNNNN/` is the teacher's when its
  `_COMMIT.json` lists exactly the files there with their total size (their sha256 are checked by
  `inspect --verify`; one whose record is gone, when it holds only Zarr's files, which the writer replaces),
  and `tmp/shard_NNNNN.<token>/` is a shard being written;
- *nested outputs*: a training run's `eval/` is a `kdcache eval` output judged by its own manifest, removed
  with the run it describes when everything in it is eval's;
- `.kdcache/` itself (the manifest, the locks, staging directories; their files: `pipeline.records`).

A file that appears inside a path being written while the stage runs is recorded with it when the stage
ends; `kdcache eval` refreshing a run's model card (final/README.md) records the new card in the run's
manifest (`amend`).

**Older outputs** (no manifest): adopted once, by the name patterns kdcache used before manifests, only when
the directory holds the stage's marker file and it parses as that stage's record (`kdcache_prepare.json` of
kind kdcache-prepared, a cache's `kdcache.json`, ...), and each small file's content is what the stage
writes (a config.yaml is a YAML mapping with an `out` key, a JSON file an object, report.md a kdcache
report). Everything else is foreign. A directory without a valid marker adopts nothing.

**One writer per output.** `OUT/.kdcache/lock.json`, created atomically (a hard link of a complete file, so
never torn), holds the run id, host, pid (and its start time, against pid reuse), command and start time;
it is removed when the stage ends, also on an error or Ctrl-C. A second writer is refused with one line
naming the holder; a lock whose process is gone (same host) is taken over with a message; a lock from
another host is never taken over (the line says how to remove it if it is stale). The teacher's replicas
(`--replica r --replicas R`) each hold `lock.replica-r.json`, which conflicts with lock.json, with
another replica count and with a second launch of the same index; torchrun ranks and Dask workers of one
launch share its lock (rank 0 / the launcher holds it).

Symlinks are never followed: an owned name that is a link is unlinked, not its target.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Callable

from pipeline.cache import layout as cache_layout
from pipeline.errors import KdError
from pipeline.records import (LOCK_FILENAME, MANIFEST_FILENAME, RECORDS_DIR, Lock, Manifest, file_record,
                              unchanged)

__all__ = ["Layout", "Lock", "Manifest", "Output", "claim", "judge", "scan", "refuse_foreign", "remove_owned",
           "check_records", "amend", "LAYOUTS", "PREPARE", "TEACHER", "TRAIN", "EVAL", "REPORT", "EXPORT",
           "REPORT_PLOTS", "STATE_DIR", "LOCK_FILENAME", "MANIFEST_FILENAME"]

STATE_DIR = RECORDS_DIR  # ".kdcache": the manifest, the locks, staging directories, in every output


@dataclass(frozen=True)
class Layout:
    """What one stage writes into its output directory."""

    stage: str  # the command, for messages
    what: str  # "a training run directory": how the messages call such a directory
    markers: tuple[str, ...]  # files only this stage writes; one present identifies the directory
    legacy: tuple[str, ...]  # fnmatch patterns of what the stage wrote before manifests (migration only)
    trees: tuple[tuple[str, str], ...] = ()  # (directory, "commit" | "scratch"): content with its own record
    nested: tuple[tuple[str, str], ...] = ()  # (directory, stage): another stage's output the stage removes with its own

    def owns(self, rel: str) -> bool:
        """Did the stage write `rel` by the name patterns of outputs made before manifests?"""
        return any(fnmatchcase(rel, pat) for pat in self.legacy)

    def reaches_into(self, rel: str) -> bool:
        return any(pat.startswith(rel + "/") for pat in self.legacy)

    def tree(self, rel: str) -> str | None:
        return dict(self.trees).get(rel)

    def nested_stage(self, rel: str) -> str | None:
        return dict(self.nested).get(rel)


def _atomic(*names: str) -> tuple[str, ...]:
    """Each name plus the `.tmp` it is written under before the rename (see identity.write_json)."""
    return tuple(n for name in names for n in (name, name + ".tmp"))


PREPARE = Layout("prepare", "a prepared-data directory", ("kdcache_prepare.json",),
                 # datasets' save_to_disk writes data-NNNNN-of-NNNNN.arrow, dataset_info.json, state.json
                 _atomic("kdcache_prepare.json", "config.yaml")
                 + ("dataset_info.json", "state.json", "data-*.arrow", "cache-*.arrow"))
TEACHER = Layout("teacher", "a teacher cache", (cache_layout.META_FILENAME,),
                 _atomic(cache_layout.META_FILENAME, cache_layout.INDEX_FILENAME, "config.yaml",
                         cache_layout.CHECKSUMS_FILENAME)
                 + (f"{cache_layout.SHARDS_DIR}/shard_[0-9]*", cache_layout.TMP_DIR),
                 trees=((cache_layout.SHARDS_DIR, "commit"), (cache_layout.TMP_DIR, "scratch")))
EVAL = Layout("eval", "an eval output directory", ("eval.json",), _atomic("eval.json", "config.yaml"))
# The run's eval/ (where `kdcache run` and the README put it) describes the model being replaced,
# so retraining removes it with the run; anything else in eval/ still refuses.
# metrics.jsonl also marks one: runs made before kdcache_train.json existed have only that.
# final/ and best/ are swapped in from NAME.tmp, the old one moving aside to NAME.old (checkpoint.replace_dir).
TRAIN = Layout("train", "a training run directory", ("kdcache_train.json", "metrics.jsonl"),
               _atomic("kdcache_train.json", "config.yaml", "train_summary.json")
               + ("metrics.jsonl", "checkpoints/step_[0-9]*", "final", "final.tmp", "final.old", "best", "best.tmp",
                  "best.old", "tensorboard", "wandb")
               + tuple(f"eval/{p}" for p in EVAL.legacy),
               nested=(("eval", "eval"),))
# loss.png: the single mixed-loss curve of reports made before losses.png; listed so a re-run removes it.
REPORT_PLOTS = ("heldout.png", "losses.png", "loss.png", "tar.png", "focus_ratio.png", "temperatures.png",
                "cache_entropy.png", "cache_tail_mass.png")
REPORT = Layout("report", "a report directory", ("report.md",), _atomic("report.md", "config.yaml") + REPORT_PLOTS)
# An export is a save_to_disk directory like prepared data, marked by its own record.
EXPORT = Layout("export", "an export directory", ("kdcache_export.json",),
                _atomic("kdcache_export.json", "config.yaml") + ("dataset_info.json", "state.json", "data-*.arrow"))

LAYOUTS = (PREPARE, TEACHER, TRAIN, EVAL, REPORT, EXPORT)
_BY_STAGE = {lay.stage: lay for lay in LAYOUTS}

# What the marker file of an output made before manifests must hold to be adopted (by stage).
_LEGACY_KINDS = {"prepare": ("kdcache_prepare.json", "kdcache-prepared"),
                 "teacher": (cache_layout.META_FILENAME, "kdcache-teacher-cache"),
                 "train": ("kdcache_train.json", "kdcache-train-run"),
                 "export": ("kdcache_export.json", "kdcache-export")}


# ---- judging a directory -----------------------------------------------------------------------------

@dataclass
class Verdict:
    """What `judge` found: the owned entries (paths, removable) and the foreign ones ((rel, why) pairs;
    why is "new" for a file the stage did not write, "changed" for one changed since it was recorded)."""

    owned: list[Path]
    foreign: list[tuple[str, str]]
    manifest: Manifest | None


def _first_file(p: Path, rel: str) -> str:
    if p.is_symlink() or not p.is_dir():
        return rel
    for q in sorted(p.rglob("*")):
        if q.is_file() or q.is_symlink():
            return f"{rel}/{q.relative_to(p).as_posix()}"
    return rel + "/"


def _files_under(d: Path) -> list[str]:
    return sorted(q.relative_to(d).as_posix() for q in d.rglob("*") if not q.is_dir() or q.is_symlink())


_ZARR_FILE = re.compile(r"(zarr\.json|[a-z_]+/zarr\.json|[a-z_]+/c(/\d+)+)")


def _commit_dir_ok(d: Path) -> bool:
    """A committed shard directory: its `_COMMIT.json` lists exactly the files it holds, with their total size."""
    if d.is_symlink() or not re.fullmatch(r"shard_\d{5,}", d.name):
        return False
    rec_path = d / cache_layout.COMMIT_FILENAME
    if not rec_path.exists():  # a shard whose record was lost: the writer replaces it, if it is only Zarr's files
        return all(_ZARR_FILE.fullmatch(f) for f in _files_under(d))
    try:
        rec = json.loads(rec_path.read_text())
        listed = set(rec["files"])
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        return False
    present = set(_files_under(d)) - {cache_layout.COMMIT_FILENAME}
    if present != listed:
        return False
    return "bytes" not in rec or sum((d / f).stat().st_size for f in listed) == rec["bytes"]


def _legacy_file_ok(p: Path, rel: str) -> bool:
    """Is the content of an unrecorded file of an older output what the stage writes there?"""
    name = p.name
    if p.is_symlink():
        return False
    try:
        if name in ("config.yaml", "config.yaml.tmp"):
            import yaml

            d = yaml.safe_load(p.read_text())
            return isinstance(d, dict) and "out" in d
        if name.endswith(".json") and p.is_file():
            return isinstance(json.loads(p.read_text()), dict)
        if name == "report.md":
            return p.read_text(errors="replace").startswith("# kdcache report")
    except (OSError, ValueError, UnicodeDecodeError, Exception):  # yaml errors included
        return False
    return True


def _legacy_marker_ok(root: Path, layout: Layout) -> bool:
    """Does `root`, which has no manifest, hold `layout`'s marker with the content that stage writes?"""
    try:
        if layout.stage in _LEGACY_KINDS:
            name, kind = _LEGACY_KINDS[layout.stage]
            p = root / name
            if p.is_file() and not p.is_symlink():
                d = json.loads(p.read_text())
                if isinstance(d, dict) and (d.get("kind") == kind or (layout is TEACHER and "format_version" in d)):
                    return True
            if layout is TRAIN:  # runs made before kdcache_train.json existed: metrics.jsonl rows
                m = root / "metrics.jsonl"
                first = m.read_text().splitlines()[:1] if m.is_file() and not m.is_symlink() else []
                return bool(first) and "step" in json.loads(first[0])
            return False
        if layout is EVAL:
            p = root / "eval.json"
            return p.is_file() and not p.is_symlink() and "ce" in json.loads(p.read_text())
        if layout is REPORT:
            p = root / "report.md"
            return p.is_file() and not p.is_symlink() and p.read_text(errors="replace").startswith("# kdcache report")
    except (OSError, ValueError, UnicodeDecodeError, TypeError):
        return False
    return False


def _adopt_legacy(root: Path, layout: Layout) -> Manifest:
    """The manifest of an output made before manifests: the files matching the old patterns whose content
    checks out, when its marker does (else an empty one). Nothing is hashed yet: entries are marked
    `writing` until `Output.settle` records them (a read-only check hashes nothing)."""
    man = Manifest(root, layout.stage, adopted=True)
    if not _legacy_marker_ok(root, layout):
        return man

    def visit(d: Path, prefix: str) -> None:
        for p in sorted(d.iterdir()):
            rel = prefix + p.name
            if not prefix and p.name == STATE_DIR:
                continue
            tree = layout.tree(rel)
            if tree or layout.nested_stage(rel):
                continue  # judged by their own records
            if layout.owns(rel):
                if p.is_dir() and not p.is_symlink():
                    man.writing.append(rel)
                elif _legacy_file_ok(p, rel):
                    man.writing.append(rel)
            elif p.is_dir() and not p.is_symlink() and layout.reaches_into(rel):
                visit(p, rel + "/")

    visit(root, "")
    return man


def judge(root: Path, layout: Layout, manifest: Manifest | None = None) -> Verdict:
    """Every entry of `root` (recursively) as owned by `layout`'s stage or foreign (see the module docstring).
    `manifest`: the one to judge by (default: root's own, or the adoption of an older output)."""
    root = Path(root)
    if manifest is None and root.is_dir():
        manifest = Manifest.load(root)
        if manifest is None:
            manifest = _adopt_legacy(root, layout)
    owned: list[Path] = []
    foreign: list[tuple[str, str]] = []
    if not root.is_dir() or manifest is None:
        return Verdict(owned, foreign, manifest)
    # Another stage's records make nothing this stage's own.
    mine = manifest if manifest.stage == layout.stage else Manifest(root, layout.stage)

    def visit(d: Path, prefix: str) -> None:
        for p in sorted(d.iterdir()):
            rel = prefix + p.name
            is_dir = p.is_dir() and not p.is_symlink()
            if not prefix and p.name == STATE_DIR and is_dir:
                continue
            nested = layout.nested_stage(rel)
            if mine.is_writing(rel):
                owned.append(p)
            elif not is_dir:
                rec = mine.files.get(rel)
                if rec is None:
                    foreign.append((rel, "new"))
                elif unchanged(p, rec):
                    owned.append(p)
                else:
                    foreign.append((rel, "changed"))
            elif layout.tree(rel) == "commit":
                for s in sorted(p.iterdir()):
                    if _commit_dir_ok(s) or mine.is_writing(f"{rel}/{s.name}"):
                        owned.append(s)
                    else:
                        foreign.append((_first_file(s, f"{rel}/{s.name}"), "new"))
            elif layout.tree(rel) == "scratch":
                for s in sorted(p.iterdir()):
                    if cache_layout.is_tmp_shard(s.name):
                        owned.append(s)
                    else:
                        foreign.append((_first_file(s, f"{rel}/{s.name}"), "new"))
            elif nested and ((p / STATE_DIR / MANIFEST_FILENAME).is_file()
                             or _legacy_marker_ok(p, _BY_STAGE[nested])):
                inner = judge(p, _BY_STAGE[nested])  # by its own records; another stage's make nothing its own
                if inner.foreign:
                    foreign.extend((f"{rel}/{r}", why) for r, why in inner.foreign)
                else:
                    owned.append(p)
            elif mine.reaches_into(rel):
                visit(p, rel + "/")
            else:
                foreign.append((_first_file(p, rel), "new"))

    visit(root, "")
    return Verdict(owned, foreign, manifest)


def scan(root: Path, layout: Layout) -> tuple[list[Path], list[str]]:
    """(owned paths, foreign relative paths) under `root`, both sorted; a missing root has neither."""
    v = judge(root, layout)
    return sorted(v.owned), sorted(r for r, _ in v.foreign)


def identify(root: Path) -> Layout | None:
    """The stage whose output `root` is (its manifest, else a marker file; None: not a kdcache output)."""
    try:
        man = Manifest.load(root)
    except KdError:
        man = None
    if man is not None and man.stage in _BY_STAGE:
        return _BY_STAGE[man.stage]
    return next((lay for lay in LAYOUTS if any((root / m).is_file() for m in lay.markers)), None)


def refusal(root: Path, layout: Layout, v: Verdict) -> KdError:
    """The one line refusing `root` for `layout`'s stage, naming the first foreign file."""
    other = identify(root)
    if other is not None and other is not layout:
        hint = f": use --out {root / 'eval'}" if layout is EVAL and other is TRAIN else ": choose another --out"
        return KdError(f"{root} is {other.what}, not {layout.what}{hint} (nothing was changed)")
    rel, why = v.foreign[0]
    more = f" and {len(v.foreign) - 1} more" if len(v.foreign) > 1 else ""
    if why == "changed":
        what = (f"holds {rel}{more}, which `kdcache {layout.stage}` wrote but which was changed since (its size or "
                f"sha256 differ from {STATE_DIR}/{MANIFEST_FILENAME})")
    else:
        what = f"holds {rel}{more}, which `kdcache {layout.stage}` did not write"
    if other is None and (v.manifest is None or v.manifest.adopted):  # no record at all: say what it is not
        what = f"is not {layout.what} (it {what})"
    return KdError(f"{root} {what}: move it away or choose another --out (nothing was changed)")


def refuse_foreign(root: Path, layout: Layout) -> None:
    """Raise a one-line `KdError` if `root` holds anything `layout`'s stage did not write (read-only)."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise KdError(f"--out {root} is a file, not a directory")
    v = judge(root, layout)
    if v.foreign:
        raise refusal(root, layout, v)


def check_records(root: Path, layout: Layout, new_files: bool = True) -> list[str]:
    """Problems of `root`'s ownership records, for `inspect --verify`: a damaged manifest, one of another
    stage, recorded files changed since, and (`new_files`) files the stage did not write; one line each,
    starting with the file. [] when all is well or the output has no manifest (made before manifests)."""
    where = f"{STATE_DIR}/{MANIFEST_FILENAME}"
    try:
        man = Manifest.load(root)
    except KdError as e:
        return [f"{where}: {str(e).replace(str(Manifest.path_of(root)) + ' ', '', 1)}"]
    if man is None:
        return []
    if man.stage != layout.stage:
        return [f"{where}: records a `kdcache {man.stage}` output, not `kdcache {layout.stage}`'s"]
    return [f"{rel}: changed since `kdcache {layout.stage}` wrote it (its size or sha256 differ from {where})"
            if why == "changed" else f"{rel}: not written by `kdcache {layout.stage}`"
            for rel, why in judge(root, layout, man).foreign if new_files or why == "changed"]


def _remove(paths: list[Path], root: Path) -> None:
    for p in paths:
        if p.is_symlink() or not p.is_dir():
            p.unlink(missing_ok=True)
        else:
            shutil.rmtree(p)
    # Containers left empty, deepest first (checkpoints/ after its last step_ directory); never root itself.
    dirs = sorted({q for p in paths for q in p.relative_to(root).parents if q != Path(".")},
                  key=lambda q: len(q.parts), reverse=True)
    for rel in dirs:
        d = root / rel
        if d.is_dir() and not d.is_symlink() and not any(d.iterdir()):
            d.rmdir()


def remove_owned(root: Path, layout: Layout) -> None:
    """Delete what `layout`'s stage owns in `root`, leaving `root` and its records; refuses (deleting nothing)
    when anything foreign is there. Without the lock: stages use `Output.remove_owned`."""
    root = Path(root)
    v = judge(root, layout)
    if v.foreign:
        raise refusal(root, layout, v)
    _remove(v.owned, root)
    if v.manifest is not None and Manifest.path_of(root).is_file():
        Manifest(root, layout.stage).save()


# ---- a stage's hold on its output ----------------------------------------------------------------------

class Output:
    """A stage's claim on its output directory: its lock, its manifest and the check that nothing foreign is
    there. Use as a context manager (`claim`); leaving it records what the stage wrote and releases the lock."""

    def __init__(self, root: Path, layout: Layout, lock_name: str = LOCK_FILENAME,
                 lock_extra: dict[str, Any] | None = None,
                 conflicts: Callable[[str, dict[str, Any]], bool] | None = None):
        self.root, self.layout = Path(root), layout
        self.lock = Lock(self.root, layout.stage, lock_name, lock_extra, conflicts)
        self.manifest: Manifest | None = None
        self._created: list[Path] = []

    # -- entering and leaving --
    def __enter__(self) -> "Output":
        if self.root.exists() and not self.root.is_dir():
            raise KdError(f"--out {self.root} is a file, not a directory")
        for d in [*reversed(self.root.parents), self.root, self.root / STATE_DIR]:
            if not d.exists():
                d.mkdir(exist_ok=True)
                self._created.append(d)
        try:
            self.lock.acquire()
            self.check()
        except BaseException:
            self._leave(settle=False)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._leave(settle=True)

    def _leave(self, settle: bool) -> None:
        try:
            if settle and self.manifest is not None and self.root.is_dir():
                self.settle()
        finally:
            self.lock.release()
            for d in reversed(self._created):  # what was made only to hold the lock, if still empty
                try:
                    d.rmdir()
                except OSError:
                    break
            state = self.root / STATE_DIR
            if state.is_dir() and not any(state.iterdir()):
                state.rmdir()

    def check(self) -> None:
        """Refuse (one line, nothing changed) when anything in the output is foreign; loads the manifest."""
        v = judge(self.root, self.layout)
        if v.manifest is not None and v.manifest.stage != self.layout.stage and not v.manifest.adopted:
            other = _BY_STAGE.get(v.manifest.stage)
            raise KdError(f"{self.root} is {other.what if other else 'another stage output'}, not {self.layout.what}"
                          + (f": use --out {self.root / 'eval'}" if self.layout is EVAL and other is TRAIN
                             else ": choose another --out") + " (nothing was changed)")
        if v.foreign:
            raise refusal(self.root, self.layout, v)
        self.manifest = v.manifest or Manifest(self.root, self.layout.stage)
        staging = self.root / STATE_DIR
        for s in staging.glob("staging-*"):  # a killed stage's half-written files (we hold the lock)
            shutil.rmtree(s, ignore_errors=True)

    # -- what the stage writes --
    def writing(self, *rels: str) -> None:
        """Declare paths (relative to the output) about to be written: owned from now on, even after a kill."""
        new = [r for r in rels if r not in self.manifest.writing]
        if new:
            self.manifest.writing += new
            self.manifest.save()

    def record(self, *rels: str) -> None:
        """Record the files at (or under) `rels` as written now, and stop treating `rels` as being written."""
        for rel in rels:
            self._record_under(rel)
        self.manifest.writing = [w for w in self.manifest.writing if w not in rels]
        self.manifest.save()

    def _record_under(self, rel: str) -> None:
        p = self.root / rel
        for key in [k for k in self.manifest.files if k == rel or k.startswith(rel + "/")]:
            if not (self.root / key).is_file() or (self.root / key).is_symlink():
                del self.manifest.files[key]
        if p.is_symlink() or p.is_file():
            if p.is_file() and not p.is_symlink():
                self.manifest.files[rel] = file_record(p, self.manifest.files.get(rel))
        elif p.is_dir():
            for q in sorted(p.rglob("*")):
                if q.is_file() and not q.is_symlink():
                    k = q.relative_to(self.root).as_posix()
                    self.manifest.files[k] = file_record(q, self.manifest.files.get(k))

    def settle(self) -> None:
        """Record what exists under every path being written, forget recorded files that are gone."""
        man = self.manifest
        for w in list(man.writing):
            for name in (w, w + ".tmp", w + ".old"):
                self._record_under(name)
        man.files = {k: r for k, r in man.files.items() if (self.root / k).is_file()}
        man.writing = []
        if man.files or Manifest.path_of(self.root).is_file():
            man.save()

    def remove_owned(self) -> None:
        """Delete everything the stage owns in the output (--overwrite, a replaced plan); the lock is held and
        `check` passed, so nothing else is there. Records are cleared."""
        v = judge(self.root, self.layout, self.manifest)
        if v.foreign:  # changed while we hold the lock: someone outside kdcache
            raise refusal(self.root, self.layout, v)
        _remove(v.owned, self.root)
        self.manifest.files, self.manifest.writing = {}, []
        self.manifest.save()

    def staging(self) -> Path:
        """A private directory inside the output's state directory, for files renamed into place later."""
        d = self.root / STATE_DIR / f"staging-{self.layout.stage}-{self.lock.info['run_id'][:8]}"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        return d

    def move_in(self, staged: Path, last: tuple[str, ...] = ()) -> list[str]:
        """Rename every file of `staged` into the output (the names in `last` last: a marker), declaring each
        before the rename; returns the names moved."""
        names = sorted((p.name for p in staged.iterdir()), key=lambda n: (n in last, n))
        self.writing(*names)
        for n in names:
            os.replace(staged / n, self.root / n)
        shutil.rmtree(staged, ignore_errors=True)
        return names


def claim(root: str | Path, layout: Layout, *, lock_name: str = LOCK_FILENAME,
          lock_extra: dict[str, Any] | None = None,
          conflicts: Callable[[str, dict[str, Any]], bool] | None = None) -> Output:
    """Hold `root` for `layout`'s stage: `with claim(out, TRAIN) as own: ...` (see `Output`)."""
    return Output(Path(root), layout, lock_name, lock_extra, conflicts)


def amend(path: Path) -> None:
    """After a stage rewrote a file of *another* output (`kdcache eval` refreshing a run's model card): record
    the new content in that output's manifest, when the file was recorded there (never adopts a new one)."""
    path = Path(path)
    for root in path.parents:
        mp = Manifest.path_of(root)
        if mp.is_file():
            try:
                man = Manifest.load(root)
            except KdError:
                return
            rel = path.relative_to(root).as_posix()
            if rel in man.files and path.is_file():
                man.files[rel] = file_record(path)
                man.save()
            return

