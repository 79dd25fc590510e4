"""Which files in an output directory each stage wrote, so replacing an output deletes only those.

    from pipeline.ownership import TRAIN, remove_owned
    remove_owned(Path("runs/kd"), TRAIN)   # refuses, naming e.g. notes.txt, if anything else is there

Every stage that replaces or removes earlier output (`prepare`/`teacher`/`train`/`export --overwrite`, a
re-run of `eval` or `report`) goes through `remove_owned` or `refuse_foreign`. The rule is:

- an entry is *owned* when its path inside the output matches one of the stage's patterns
  (fnmatch on the POSIX relative path; a matching directory is owned with all it holds, because
  kdcache names it: `checkpoints/step_000040`, `shards/shard_00003`, `final`);
- a *container* (`checkpoints`, `shards`, the run's `eval`) is a directory some pattern reaches
  into: its entries are judged one by one, and it is removed only once it is empty;
- anything else is *foreign*, and its presence refuses the whole operation before anything is
  deleted, with the first foreign file named (`notes.txt`, `sub/thesis.tex`). A user who keeps
  notes inside a run directory loses nothing; they move the file or choose another --out.

Symlinks are never followed: an owned name that is a link is unlinked, not its target.
The lists below must name everything a stage writes: `tests/test_ownership.py` runs every stage
and checks that its real output holds no foreign entry, so a new file cannot be forgotten here.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from pipeline.cache import layout as cache_layout
from pipeline.errors import KdError


@dataclass(frozen=True)
class Layout:
    """What one stage writes into its output directory."""

    stage: str  # the command, for messages
    what: str  # "a training run directory": how the messages call such a directory
    markers: tuple[str, ...]  # files only this stage writes; one present identifies the directory
    owned: tuple[str, ...]  # fnmatch patterns on relative POSIX paths

    def owns(self, rel: str) -> bool:
        return any(fnmatchcase(rel, pat) for pat in self.owned)

    def reaches_into(self, rel: str) -> bool:
        """True when `rel` is a directory some pattern looks inside (a container)."""
        return any(pat.startswith(rel + "/") for pat in self.owned)


def _atomic(*names: str) -> tuple[str, ...]:
    """Each name plus the `.tmp` it is written under before the rename (see identity.write_json)."""
    return tuple(n for name in names for n in (name, name + ".tmp"))


PREPARE = Layout("prepare", "a prepared-data directory", ("kdcache_prepare.json",),
                 # datasets' save_to_disk writes data-NNNNN-of-NNNNN.arrow, dataset_info.json, state.json
                 _atomic("kdcache_prepare.json", "config.yaml")
                 + ("dataset_info.json", "state.json", "data-*.arrow", "cache-*.arrow"))
TEACHER = Layout("teacher", "a teacher cache", (cache_layout.META_FILENAME,),
                 _atomic(cache_layout.META_FILENAME, cache_layout.INDEX_FILENAME, "config.yaml")
                 + (f"{cache_layout.SHARDS_DIR}/shard_[0-9]*", cache_layout.TMP_DIR))
EVAL = Layout("eval", "an eval output directory", ("eval.json",), _atomic("eval.json", "config.yaml"))
# The run's eval/ (where `kdcache run` and the README put it) describes the model being replaced,
# so retraining removes it with the run; anything else in eval/ still refuses.
# metrics.jsonl also marks one: runs made before kdcache_train.json existed have only that.
# final/ and best/ are swapped in from NAME.tmp, the old one moving aside to NAME.old (checkpoint.replace_dir).
TRAIN = Layout("train", "a training run directory", ("kdcache_train.json", "metrics.jsonl"),
               _atomic("kdcache_train.json", "config.yaml", "train_summary.json")
               + ("metrics.jsonl", "checkpoints/step_[0-9]*", "final", "final.tmp", "final.old", "best", "best.tmp",
                  "best.old", "tensorboard", "wandb")
               + tuple(f"eval/{p}" for p in EVAL.owned))
# loss.png: the single mixed-loss curve of reports made before losses.png; listed so a re-run removes it.
REPORT_PLOTS = ("heldout.png", "losses.png", "loss.png", "tar.png", "focus_ratio.png", "temperatures.png",
                "cache_entropy.png", "cache_tail_mass.png")
REPORT = Layout("report", "a report directory", ("report.md",), _atomic("report.md", "config.yaml") + REPORT_PLOTS)
# An export is a save_to_disk directory like prepared data, marked by its own record.
EXPORT = Layout("export", "an export directory", ("kdcache_export.json",),
                _atomic("kdcache_export.json", "config.yaml") + ("dataset_info.json", "state.json", "data-*.arrow"))

LAYOUTS = (PREPARE, TEACHER, TRAIN, EVAL, REPORT, EXPORT)


def scan(root: Path, layout: Layout) -> tuple[list[Path], list[str]]:
    """(owned paths, foreign relative paths) under `root`, both sorted; a missing root has neither.

    A foreign directory is reported by its first file (`sub/thesis.tex`), or as `sub/` when empty,
    so the message names something the user can find.
    """
    owned: list[Path] = []
    foreign: list[str] = []

    def visit(d: Path, prefix: str) -> None:
        for p in sorted(d.iterdir()):
            rel = prefix + p.name
            if layout.owns(rel):
                owned.append(p)
            elif p.is_dir() and not p.is_symlink() and layout.reaches_into(rel):
                visit(p, rel + "/")
            else:
                foreign.append(_first_file(p, rel))

    if root.is_dir():
        visit(root, "")
    return owned, foreign


def _first_file(p: Path, rel: str) -> str:
    if p.is_symlink() or not p.is_dir():
        return rel
    for q in sorted(p.rglob("*")):
        if q.is_file() or q.is_symlink():
            return f"{rel}/{q.relative_to(p).as_posix()}"
    return rel + "/"


def identify(root: Path) -> Layout | None:
    """The stage whose marker file `root` holds (None: not a kdcache output, or empty)."""
    return next((lay for lay in LAYOUTS if any((root / m).is_file() for m in lay.markers)), None)


def refuse_foreign(root: Path, layout: Layout) -> None:
    """Raise a one-line `KdError` if `root` holds anything `layout`'s stage did not write."""
    if root.exists() and not root.is_dir():
        raise KdError(f"--out {root} is a file, not a directory")
    _, foreign = scan(root, layout)
    if not foreign:
        return
    other = identify(root)
    if other is not None and other is not layout:
        hint = f": use --out {root / 'eval'}" if layout is EVAL and other is TRAIN else ": choose another --out"
        raise KdError(f"{root} is {other.what}, not {layout.what}{hint} (nothing was changed)")
    more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
    what = f"holds {foreign[0]}{more}, which `kdcache {layout.stage}` did not write"
    if other is None:  # no marker at all: say what the directory is not
        what = f"is not {layout.what} (it {what})"
    raise KdError(f"{root} {what}: move it away or choose another --out (nothing was changed)")


def remove_owned(root: Path, layout: Layout) -> None:
    """Delete what `layout`'s stage wrote in `root`, leaving `root` itself; refuses (deleting
    nothing) when anything foreign is there. Containers left empty are removed too."""
    refuse_foreign(root, layout)
    owned, _ = scan(root, layout)
    for p in owned:
        if p.is_symlink() or not p.is_dir():
            p.unlink(missing_ok=True)
        else:
            shutil.rmtree(p)
    # Deepest first, so checkpoints/ goes after its last step_ directory; only empty ones.
    containers = sorted({q for p in owned for q in p.relative_to(root).parents if q != Path(".")},
                        key=lambda q: len(q.parts), reverse=True)
    for rel in containers:
        d = root / rel
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()
