"""Local directories of remote outputs: staging directories (files on their way to a store) and the root of
local copies (files on their way from one).

Each is `KDCACHE_STAGING (or the temp dir)/kdcache-staging/WHAT.PID.RANDOM`; an entry whose process is gone
(what a kill -9 left) is removed the next time one is made.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Callable, TypeVar

from pipeline import records
from pipeline.errors import KdError

if TYPE_CHECKING:
    from pipeline.storage.store import Store

R = TypeVar("R")


ENV_ROOT = "KDCACHE_LOCAL_CACHE"


def default_root() -> Path:
    """Where local copies of remote things live (a cache's shards, prepared data, a run's model; `--local-cache`
    overrides it for a cache): $KDCACHE_LOCAL_CACHE, else ~/.cache/kdcache/remote."""
    return Path(os.environ.get(ENV_ROOT) or Path.home() / ".cache" / "kdcache" / "remote")


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
            if d.is_dir() and not d.is_symlink():
                shutil.rmtree(d, ignore_errors=True)
            else:
                d.unlink(missing_ok=True)


def entry_alive(name: str) -> bool:
    """Is the process that made the local entry `WHAT.PID.RANDOM` still running (on this host)?"""
    try:
        pid = int(name.split(".")[-2])
    except (ValueError, IndexError):
        return False
    return bool(records.holder_alive({"host": socket.gethostname(), "pid": pid}))


def rmtree_quiet(p: Path) -> None:
    shutil.rmtree(p, ignore_errors=True)


def refuse_foreign(store: "Store", ours: Callable[[str], bool], stage: str) -> dict[str, int]:
    """What is under an --out URL (relative name -> size), after refusing with one line the first object the stage
    `stage` ("eval") does not write (`ours`): nothing kdcache did not write is ever replaced."""
    there = store.sizes()
    alien = sorted(rel for rel in there if not ours(rel))
    if alien:
        raise KdError(f"{store.uri(alien[0])} is not a file `kdcache {stage}` writes: --out must be a new prefix or "
                      f"a `kdcache {stage}` output (nothing is replaced that kdcache did not write); choose another "
                      "--out")
    return there


def publish(url: str, stage: str, names: tuple[str, ...], make: Callable[[Path], R]) -> R:
    """A small output of fixed file `names` at `url` (an evaluation, a report): anything else there refuses
    first; `make(local)` writes it in a fresh local staging directory; every file it wrote is uploaded, the
    last of `names` last (the stage's record: a URL holding it holds a whole output), and the stage's files
    it did not write this time are deleted from the URL. Returns what `make` returned."""
    from pipeline.storage.store import store_for

    store = store_for(url)
    there = refuse_foreign(store, lambda rel: rel in names, stage)
    local = staging_dir(stage) / PurePosixPath(store.url).name
    try:
        result = make(local)
        made = [n for n in names if (local / n).is_file()]
        for n in sorted(made, key=lambda n: n == names[-1]):
            store.put_file(local / n, n)
        store.delete(sorted(rel for rel in there if rel not in made))
    finally:
        rmtree_quiet(local.parent)
    return result


def local_copy(root: Path, key: str, done: Callable[[Path], bool], fill: Callable[[Path], None]) -> Path:
    """`root/key`, a local copy of something remote made once per machine (prepared data, a run's model):
    `fill(tmp)` writes it into an empty directory under root/tmp, which then becomes root/key whole, so
    `done(root/key)` (its marker is there) never sees half a copy. Processes of one machine share it: one
    fills it under an flock, the others wait and use it; what a killed fill left is removed by the next."""
    import fcntl
    import uuid

    final = root / key
    if done(final):
        return final
    (root / "tmp").mkdir(parents=True, exist_ok=True)
    fd = os.open(root / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another process of this machine may be filling it
        if not done(final):
            remove_dead_entries(root / "tmp")
            tmp = root / "tmp" / f"{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
            try:
                fill(tmp)
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    finally:
        os.close(fd)
    return final
