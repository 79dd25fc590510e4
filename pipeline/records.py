"""The two records every kdcache output keeps in OUT/.kdcache/: the manifest of the files its stage wrote, and
the lock of the process writing it now. Files, hashes and process ids only; which stage owns what, and the
rules for judging a directory, are `pipeline.ownership`'s.

    man = Manifest.load(root)            # None: the output has none (made before manifests)
    man.files["config.yaml"]             # {"size", "sha256", "mtime_ns"}
    lock = Lock(root, "train"); lock.acquire(); ...; lock.release()

manifest.json: {"kind": "kdcache-manifest", "version": 1, "stage": "train", "files": {relative path: {size,
sha256, mtime_ns}}, "writing": [relative paths being written]}; written atomically, unchanged bytes not
rewritten. lock.json: {"run_id", "stage", "host", "pid", "pid_start" (the process's start time in clock ticks,
against pid reuse), "command", "started"}; created as a hard link of a complete file (never torn).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from pipeline.errors import KdError
from pipeline.identity import file_sha256

log = logging.getLogger("pipeline.ownership")  # one logger for the messages of ownership and its records

RECORDS_DIR = ".kdcache"  # in every output: the manifest, the locks, staging directories
MANIFEST_FILENAME = "manifest.json"
LOCK_FILENAME = "lock.json"
MANIFEST_VERSION = 1


# ---- the manifest ------------------------------------------------------------------------------------

def file_record(p: Path, old: dict[str, Any] | None = None) -> dict[str, Any]:
    """{size, sha256, mtime_ns} of file `p`; the sha256 of `old` is kept when size and mtime are unchanged and the
    mtime is over 2 s old (a rewrite within one tick of a coarse clock could keep both: then it is hashed)."""
    st = p.lstat()
    if (old and old.get("size") == st.st_size and old.get("mtime_ns") == st.st_mtime_ns
            and time.time_ns() - st.st_mtime_ns > 2_000_000_000):
        return dict(old)
    return {"size": st.st_size, "sha256": file_sha256(p), "mtime_ns": st.st_mtime_ns}


def unchanged(p: Path, rec: dict[str, Any]) -> bool:
    """Is file `p` the one `rec` describes? Size first, then mtime (unchanged: no hashing), then sha256."""
    if p.is_symlink() or not p.is_file():
        return False
    st = p.stat()
    if st.st_size != rec.get("size"):
        return False
    if st.st_mtime_ns == rec.get("mtime_ns"):
        return True
    return file_sha256(p) == rec.get("sha256")


def _writing_covers(w: str, rel: str) -> bool:
    return any(rel == n or rel.startswith(n + "/") for n in (w, w + ".tmp", w + ".old"))


class Manifest:
    """OUT/.kdcache/manifest.json: the files one stage wrote in OUT, and the paths it is writing."""

    def __init__(self, root: Path, stage: str, files: dict[str, dict[str, Any]] | None = None,
                 writing: list[str] | None = None, adopted: bool = False):
        self.root, self.stage = Path(root), stage
        self.files: dict[str, dict[str, Any]] = dict(files or {})
        self.writing: list[str] = list(writing or [])
        self.adopted = adopted  # made now from an output written before manifests (not on disk yet)

    @staticmethod
    def path_of(root: Path) -> Path:
        return Path(root) / RECORDS_DIR / MANIFEST_FILENAME

    @classmethod
    def load(cls, root: Path) -> "Manifest | None":
        """The manifest of `root` (None: it has none); a damaged one is a one-line `KdError` naming it."""
        p = cls.path_of(root)
        if not p.is_file():
            return None
        try:
            d = json.loads(p.read_text())
            if not isinstance(d, dict) or not isinstance(d.get("files"), dict):
                raise ValueError("not a manifest")
            return cls(root, str(d.get("stage")), d["files"], list(d.get("writing") or []))
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise KdError(f"{p} is damaged ({type(e).__name__}): kdcache cannot tell which files in {root} are its "
                          "own; move the directory's files you want to keep elsewhere and delete it") from None

    def save(self) -> None:
        """Write atomically (a private temporary name: replica launches may save at once)."""
        p = self.path_of(self.root)
        p.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"kind": "kdcache-manifest", "version": MANIFEST_VERSION, "stage": self.stage,
                           "files": dict(sorted(self.files.items())), "writing": sorted(set(self.writing))}, indent=1)
        self.adopted = False
        try:
            if p.read_text() == text:  # unchanged: a re-run that did nothing leaves every file as it was
                return
        except (OSError, UnicodeDecodeError):
            pass
        tmp = p.with_name(f"{p.name}.{os.getpid()}.{uuid.uuid4().hex[:6]}.tmp")
        tmp.write_text(text)
        os.replace(tmp, p)

    def is_writing(self, rel: str) -> bool:
        return any(_writing_covers(w, rel) for w in self.writing)

    def reaches_into(self, rel: str) -> bool:
        """Does anything recorded or being written lie under directory `rel`?"""
        pre = rel + "/"
        return any(f.startswith(pre) for f in self.files) or any(w.startswith(pre) for w in self.writing)


# ---- the lock ----------------------------------------------------------------------------------------

def _proc_start(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks) of process `pid` from /proc (None where there is no /proc)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], fields[19]


def _alive(holder: dict[str, Any]) -> bool | None:
    """Is the lock holder's process running? None: it ran on another host (cannot tell from here)."""
    if holder.get("host") != socket.gethostname():
        return None
    try:
        pid = int(holder["pid"])
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: alive
    except (KeyError, TypeError, ValueError):
        return False
    st = _proc_start(pid)
    if st is not None:
        if st[0] in ("Z", "X"):  # killed, not yet reaped
            return False
        if holder.get("pid_start") and holder["pid_start"] != st[1]:  # the pid was reused
            return False
    return True


def holder_alive(holder: dict[str, Any]) -> bool | None:
    """Is the process a lock or lease record names running? None: another host's (cannot tell from here)."""
    return _alive(holder)


def holder_info(stage: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """This process as a lock or lease holder: run_id, stage, host, pid, pid_start, command, started."""
    return _lock_info(stage, extra or {})


def _read_lock(p: Path) -> dict[str, Any] | None:
    try:
        d = json.loads(p.read_text())
        return d if isinstance(d, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, UnicodeDecodeError):
        return {}


def _describe(holder: dict[str, Any]) -> str:
    where = "this host" if holder.get("host") == socket.gethostname() else f"host {holder.get('host')}"
    cmd = holder.get("command") or f"kdcache {holder.get('stage')}"
    return f"`{cmd}` (pid {holder.get('pid')} on {where}, started {holder.get('started')})"


def _lock_info(stage: str, extra: dict[str, Any]) -> dict[str, Any]:
    st = _proc_start(os.getpid())
    argv = [Path(sys.argv[0]).name, *sys.argv[1:]] if sys.argv and sys.argv[0] else [f"kdcache {stage}"]
    return {"run_id": uuid.uuid4().hex, "stage": stage, "host": socket.gethostname(), "pid": os.getpid(),
            "pid_start": st[1] if st else None, "command": " ".join(argv)[:300],
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), **extra}


class Lock:
    """One writer's lock file in OUT/.kdcache/ (see the module docstring)."""

    def __init__(self, root: Path, stage: str, name: str = LOCK_FILENAME, extra: dict[str, Any] | None = None,
                 conflicts: Callable[[str, dict[str, Any]], bool] | None = None):
        self.root, self.stage, self.name = Path(root), stage, name
        self.path = self.root / RECORDS_DIR / name
        self.info = _lock_info(stage, extra or {})
        self.conflicts = conflicts
        self.held = False

    def acquire(self) -> None:
        d = self.path.parent
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f"{self.name}.{self.info['run_id'][:12]}.tmp"
        tmp.write_text(json.dumps(self.info, indent=1))
        try:
            for _ in range(5):
                try:
                    os.link(tmp, self.path)  # atomic, and the lock file is complete from its first instant
                    self.held = True
                    break
                except FileExistsError:
                    self._refuse_or_take_over(self.path)
                except OSError:  # a file system without hard links: exclusive create
                    try:
                        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                    except FileExistsError:
                        self._refuse_or_take_over(self.path)
                        continue
                    with os.fdopen(fd, "w") as f:
                        f.write(tmp.read_text())
                    self.held = True
                    break
            else:
                raise KdError(f"{self.root}: could not take the lock {self.path} (it keeps changing hands)")
        finally:
            tmp.unlink(missing_ok=True)
        if self.conflicts is not None:  # other lock names that exclude this one (teacher replicas)
            for other in sorted(d.glob("lock*.json")):
                if other.name == self.name:
                    continue
                holder = _read_lock(other)
                if holder is None or not self.conflicts(other.name, holder):
                    continue
                if _alive(holder) is False:
                    continue  # a dead holder's lock excludes nothing
                self.release()
                raise KdError(f"{self.root} is being written by {_describe(holder)}, which conflicts with this "
                              f"launch; wait for it to finish, or if that process is gone, delete {other}")

    def _refuse_or_take_over(self, p: Path) -> None:
        holder = _read_lock(p)
        if holder is None:
            return  # released meanwhile: try again
        alive = _alive(holder) if holder else False
        if alive is None:
            raise KdError(f"{self.root} is locked by {_describe(holder)}; if that run is gone, delete {p} "
                          "and re-run")
        if alive:
            raise KdError(f"{self.root} is being written by {_describe(holder)}; wait for it to finish (one "
                          f"writer per output), or if that process is gone, delete {p}")
        # The holder died without releasing (kill -9, power loss): take over, once, under a guard so two
        # processes doing the same cannot both succeed.
        import fcntl

        with open(p.parent / "guard", "a") as g:
            fcntl.flock(g, fcntl.LOCK_EX)
            try:
                if _read_lock(p) == holder:
                    p.unlink()
                    if holder:
                        log.warning("%s: taking over the lock of %s, which is no longer running", self.root,
                                    _describe(holder))
                    else:
                        log.warning("%s: taking over an unreadable lock %s", self.root, p)
            finally:
                fcntl.flock(g, fcntl.LOCK_UN)

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        if (_read_lock(self.path) or {}).get("run_id") == self.info["run_id"]:
            self.path.unlink(missing_ok=True)
