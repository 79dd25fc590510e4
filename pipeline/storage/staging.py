"""Local directories of remote outputs: staging directories (files on their way to a store) and the root of
local copies (files on their way from one).

Each is `KDCACHE_STAGING (or the temp dir)/kdcache-staging/WHAT.PID.RANDOM`; an entry whose process is gone
(what a kill -9 left) is removed the next time one is made.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

from pipeline import records


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
            shutil.rmtree(d, ignore_errors=True)


def entry_alive(name: str) -> bool:
    """Is the process that made the local entry `WHAT.PID.RANDOM` still running (on this host)?"""
    try:
        pid = int(name.split(".")[-2])
    except (ValueError, IndexError):
        return False
    return bool(records.holder_alive({"host": socket.gethostname(), "pid": pid}))


def rmtree_quiet(p: Path) -> None:
    shutil.rmtree(p, ignore_errors=True)
