"""Where things live in a cache directory, and what makes a shard committed.

    CACHE/kdcache.json             metadata (written last when planning: its presence = plan complete)
    CACHE/kdcache.sha256           sha256 of kdcache.json, index.parquet and config.yaml (`sha256sum -c` reads it)
    CACHE/index.parquet            one row per example: sequence_id, row_start, row_count, shard
    CACHE/config.yaml              the resolved `kdcache teacher` config
    CACHE/shards/shard_00012/      one Zarr v3 group per shard, present only once committed
    CACHE/shards/shard_00012/_COMMIT.json   rows, examples, dtype/device it was computed with,
                                   the target-id hash, sha256 of every file: the commit record
    CACHE/tmp/shard_00012.<id>/    a shard being written; removed on restart

This module is the one place that knows these names: the writer, the reader, the teacher stage,
`inspect` and `report` all go through it. `cache` may be an fsspec URL where the functions below say so
(a cache on an object store: `pipeline.cache.remote`).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

from pipeline import records
from pipeline.errors import CorruptionError, KdError
from pipeline.identity import read_json
from pipeline.storage import is_url, store_for

META_FILENAME = "kdcache.json"
INDEX_FILENAME = "index.parquet"
CONFIG_FILENAME = "config.yaml"
CHECKSUMS_FILENAME = "kdcache.sha256"  # sha256sum lines for the planned files; kdcache.json names it ("checksums")
COMMIT_FILENAME = "_COMMIT.json"
SHARDS_DIR = "shards"
TMP_DIR = "tmp"
# Every kdcache output's own records (manifest, locks: `pipeline.records`, judged by `pipeline.ownership`).
RECORDS_DIR = records.RECORDS_DIR


def shard_name(i: int) -> str:
    """Zero-padded shard directory name: shard_00012."""
    return f"shard_{i:05d}"


def shard_dir(cache: Path, i: int) -> Path:
    """Directory of committed shard `i`."""
    return Path(cache) / SHARDS_DIR / shard_name(i)


def commit_name(i: int) -> str:
    """The commit record of shard `i`, relative to the cache: shards/shard_00012/_COMMIT.json."""
    return f"{SHARDS_DIR}/{shard_name(i)}/{COMMIT_FILENAME}"


def is_committed(cache: str | Path, i: int) -> bool:
    """A shard exists for readers only once its commit record is in place (written before the rename;
    on an object store, uploaded after the shard's files). `cache`: a directory or a URL."""
    if is_url(cache):
        return store_for(str(cache)).exists(commit_name(i))
    return (shard_dir(cache, i) / COMMIT_FILENAME).is_file()


def committed_shards(cache: str | Path) -> list[int]:
    """Indices of the committed shards, sorted (one listing: a directory or a URL)."""
    if is_url(cache):
        return sorted(listed_commits(store_for(str(cache))))
    root = Path(cache) / SHARDS_DIR
    if not root.is_dir():
        return []
    out = []
    for d in root.iterdir():
        m = re.fullmatch(r"shard_(\d{5,})", d.name)
        if m and (d / COMMIT_FILENAME).is_file():
            out.append(int(m.group(1)))
    return sorted(out)


def listed_commits(store: Any) -> set[int]:
    """Indices of the shards whose commit record is in an object store (`Store`): one recursive listing."""
    out = set()
    for rel in store.sizes(SHARDS_DIR):
        parts = rel.split("/")
        m = re.fullmatch(r"shard_(\d{5,})", parts[1]) if len(parts) == 3 else None
        if m and parts[2] == COMMIT_FILENAME:
            out.add(int(m.group(1)))
    return out


def read_commit(cache: str | Path, i: int) -> dict[str, Any]:
    """The commit record of shard `i`; a missing or malformed one is an error naming the shard.
    `cache`: a directory or a URL."""
    if is_url(cache):
        import json

        store = store_for(str(cache))
        try:
            rec = json.loads(store.read_bytes(commit_name(i)))
        except FileNotFoundError:
            raise KdError(f"{cache}: {shard_name(i)} is not committed (the cache is incomplete; "
                          "re-run `kdcache teacher` to finish it)") from None
        except ValueError:
            raise CorruptionError(f"{shard_name(i)}: its commit record is not valid JSON") from None
        if not isinstance(rec, dict):
            raise CorruptionError(f"{shard_name(i)}: its commit record is not a JSON object")
        return rec
    p = shard_dir(cache, i) / COMMIT_FILENAME
    if not p.is_file():
        raise KdError(f"{Path(cache)}: {shard_name(i)} is not committed (the cache is incomplete; "
                      "re-run `kdcache teacher` to finish it)")
    try:
        return read_json(p, f"{shard_name(i)} commit record")
    except KdError as e:
        raise CorruptionError(f"{shard_name(i)}: {e}") from None


def read_meta(cache: str | Path) -> dict[str, Any]:
    """A cache's kdcache.json, local or remote (a `KdError` when it is missing or not JSON)."""
    if is_url(cache):
        import json

        store = store_for(str(cache))
        try:
            meta = json.loads(store.read_bytes(META_FILENAME))
        except FileNotFoundError:
            raise KdError(f"cache metadata not found: {store.uri(META_FILENAME)}") from None
        except ValueError:
            raise KdError(f"cache metadata is not valid JSON: {store.uri(META_FILENAME)}") from None
        if not isinstance(meta, dict):
            raise KdError(f"cache metadata must hold a JSON object: {store.uri(META_FILENAME)}")
        return meta
    return read_json(Path(cache) / META_FILENAME, "cache metadata")


def write_checksums(cache: Path, sums: dict[str, str]) -> None:
    """CACHE/kdcache.sha256 (atomically): one `sha256sum` line per {file name: sha256} (the planner hashes
    kdcache.json's bytes before writing it, so the checksums are in place before the plan is complete)."""
    p = Path(cache) / CHECKSUMS_FILENAME
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text("".join(f"{digest}  {name}\n" for name, digest in sums.items()))
    tmp.replace(p)


_SUM_LINE = re.compile(r"([0-9a-f]{64}) [ *](\S.*)")


def read_checksums(cache: Path) -> dict[str, str] | None:
    """{file name: sha256} from CACHE/kdcache.sha256; None when the cache has none (made before it existed).
    A malformed file is a `CorruptionError` naming it."""
    p = Path(cache) / CHECKSUMS_FILENAME
    if not p.is_file():
        return None
    try:
        lines = p.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CorruptionError(f"{p}: unreadable ({type(e).__name__})") from None
    sums = {}
    for n, line in enumerate(lines, 1):
        m = _SUM_LINE.fullmatch(line.strip())
        if not m:
            raise CorruptionError(f"{p}:{n}: not a sha256sum line (the checksum file is damaged)")
        sums[m.group(2)] = m.group(1)
    if META_FILENAME not in sums:
        raise CorruptionError(f"{p}: holds no checksum of {META_FILENAME} (the checksum file is damaged)")
    return sums


def tmp_shard_dir(cache: Path, i: int, token: str) -> Path:
    """A private directory for writing shard `i` (token: unique per attempt)."""
    return Path(cache) / TMP_DIR / f"{shard_name(i)}.{token}"


_TMP_SHARD = re.compile(r"shard_(\d{5,})\.\w+")


def is_tmp_shard(name: str) -> bool:
    """Is `name` (an entry of CACHE/tmp/) a shard being written (`shard_00012.<token>`)?"""
    return _TMP_SHARD.fullmatch(name) is not None


def clean_tmp(cache: Path, index: int | None = None) -> None:
    """Remove leftovers of killed writes (all of them, or only those of shard `index`); only entries named
    as the writer names them (`is_tmp_shard`): anything else under tmp/ is not the writer's to delete."""
    tmp = Path(cache) / TMP_DIR
    if not tmp.is_dir():
        return
    prefix = shard_name(index) + "." if index is not None else ""
    for p in tmp.iterdir():
        if p.name.startswith(prefix) and is_tmp_shard(p.name):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
