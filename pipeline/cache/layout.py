"""Where things live in a cache directory, and what makes a shard committed.

    CACHE/kdcache.json             metadata (written last when planning: its presence = plan complete)
    CACHE/index.parquet            one row per example: sequence_id, row_start, row_count, shard
    CACHE/config.yaml              the resolved `kdcache teacher` config
    CACHE/shards/shard_00012/      one Zarr v3 group per shard, present only once committed
    CACHE/shards/shard_00012/_COMMIT.json   rows, examples, dtype/device it was computed with,
                                   the target-id hash, sha256 of every file: the commit record
    CACHE/tmp/shard_00012.<id>/    a shard being written; removed on restart

This module is the one place that knows these names: the writer, the reader, the teacher stage,
`inspect` and `report` all go through it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from pipeline.errors import CorruptionError, KdError
from pipeline.identity import read_json

META_FILENAME = "kdcache.json"
INDEX_FILENAME = "index.parquet"
CONFIG_FILENAME = "config.yaml"
COMMIT_FILENAME = "_COMMIT.json"
SHARDS_DIR = "shards"
TMP_DIR = "tmp"


def shard_name(i: int) -> str:
    """Zero-padded shard directory name: shard_00012."""
    return f"shard_{i:05d}"


def shard_dir(cache: Path, i: int) -> Path:
    """Directory of committed shard `i`."""
    return Path(cache) / SHARDS_DIR / shard_name(i)


def is_committed(cache: Path, i: int) -> bool:
    """A shard exists for readers only once its commit record is in place (written before the rename)."""
    return (shard_dir(cache, i) / COMMIT_FILENAME).is_file()


def read_commit(cache: Path, i: int) -> dict[str, Any]:
    """The commit record of shard `i`; a missing or malformed one is an error naming the shard."""
    p = shard_dir(cache, i) / COMMIT_FILENAME
    if not p.is_file():
        raise KdError(f"{Path(cache)}: {shard_name(i)} is not committed (the cache is incomplete; "
                      "re-run `kdcache teacher` to finish it)")
    try:
        return read_json(p, f"{shard_name(i)} commit record")
    except KdError as e:
        raise CorruptionError(f"{shard_name(i)}: {e}") from None


def tmp_shard_dir(cache: Path, i: int, token: str) -> Path:
    """A private directory for writing shard `i` (token: unique per attempt)."""
    return Path(cache) / TMP_DIR / f"{shard_name(i)}.{token}"


def clean_tmp(cache: Path, index: int | None = None) -> None:
    """Remove leftovers of killed writes (all of them, or only those of shard `index`)."""
    tmp = Path(cache) / TMP_DIR
    if not tmp.is_dir():
        return
    prefix = shard_name(index) + "." if index is not None else ""
    for p in tmp.iterdir():
        if p.name.startswith(prefix):
            shutil.rmtree(p, ignore_errors=True)
