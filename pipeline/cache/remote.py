"""A cache on an object store: commit without rename, the teacher's lease, what in a prefix is the cache's.

Object stores have no directory rename, so a remote shard is committed by content order instead: its files
are uploaded first, as one object (`shard.zip`: `pipeline.cache.packing`, one request for a reader instead of
one per file), then its `_COMMIT.json` (rows, sha256 of every file) as ONE single-object write, which readers
see whole or not at all. A shard prefix without a commit record is never read; the next teacher run
uploads the shard again over what is there (the same zip bytes: packing is deterministic), then deletes any
other teacher-named file of the shard, so a run killed mid-upload and re-run leaves the same objects as an
uninterrupted run. Planning uploads
index.parquet, config.yaml and kdcache.sha256 before kdcache.json, as on local disks.

One teacher launch per cache: the launcher holds `.kdcache/lease.json` (`lease.replica-r.json` for
`--replica r`; `pipeline.storage.lease`).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any, Callable

from pipeline.cache import layout, packing
from pipeline.errors import KdError
from pipeline.storage import Store
from pipeline.storage.lease import LEASE_FILE
from pipeline.storage.staging import staging_dir

# What the teacher writes under a remote cache: the plan's files, shards' Zarr files and commit records, leases.
_PLAN_FILES = (layout.META_FILENAME, layout.CHECKSUMS_FILENAME, layout.INDEX_FILENAME, layout.CONFIG_FILENAME)
# A shard's files: its pack and record; the per-file layout of earlier writers (still read, and replaced).
_SHARD_FILE = re.compile(r"shards/shard_\d{5,}/(_COMMIT\.json|" + re.escape(packing.PACK_FILENAME)
                         + r"|zarr\.json|[a-z_]+/zarr\.json|[a-z_]+/c(/0)+)")


def is_ours(rel: str) -> bool:
    """Is `rel` (a name under a remote cache) one the teacher writes?"""
    return rel in _PLAN_FILES or bool(_SHARD_FILE.fullmatch(rel)) or bool(LEASE_FILE.fullmatch(rel))


def foreign(store: Store) -> list[str]:
    """Objects under the cache URL that `kdcache teacher` did not write (sorted)."""
    return sorted(rel for rel in store.sizes() if not is_ours(rel))


def unknown_objects(store: Store, planned: dict[str, int], record: Callable[[int], dict[str, Any]],
                    ignore: tuple[str, ...] = ()) -> list[str]:
    """What under a remote cache is not its own (`Cache.unknown_files` of a URL): objects the teacher does not
    write, shards outside the plan (`planned`: shard name -> index), a shard's files its commit record
    (`record(i)`) does not list."""
    out, listed = [], {}
    for rel in sorted(store.sizes()):
        parts = rel.split("/")
        if parts[0] in ignore or (rel.startswith(layout.RECORDS_DIR + "/") and is_ours(rel)):
            continue
        if not is_ours(rel) or (parts[0] == layout.SHARDS_DIR and parts[1] not in planned):
            out.append(rel)
            continue
        if parts[0] == layout.SHARDS_DIR and parts[2] != layout.COMMIT_FILENAME:
            i = planned[parts[1]]
            if i not in listed:
                try:
                    listed[i] = set(record(i).get("files") or ()) | {packing.PACK_FILENAME}
                except KdError:
                    listed[i] = None  # uncommitted or damaged: the shard's own problem line says so
            if listed[i] is not None and "/".join(parts[2:]) not in listed[i]:
                out.append(rel)
    return out


def remove_owned(store: Store, keep_leases: bool = True) -> None:
    """Delete what the teacher wrote under the cache (--overwrite; a plan killed half-way): kdcache.json
    first, so a reader never sees a plan whose shards are going."""
    names = [rel for rel in store.sizes() if is_ours(rel) and not (keep_leases and LEASE_FILE.fullmatch(rel))]
    names.sort(key=lambda rel: (rel != layout.META_FILENAME, rel))
    store.delete(names)


# ---- shards -------------------------------------------------------------------------------
def shard_prefix(i: int) -> str:
    return f"{layout.SHARDS_DIR}/{layout.shard_name(i)}"


def commit_shard(store: Store, index: int, local: Path, record: dict[str, Any]) -> None:
    """Upload the shard written in the local directory `local` (its files, listed in `record`) as one
    `shard.zip`, then its commit record last. A leftover of a killed upload of this shard is overwritten;
    other files of the shard (an earlier writer's per-file layout) are deleted once it is committed."""
    prefix = shard_prefix(index)
    there = store.sizes(prefix)
    mine = (local / layout.COMMIT_FILENAME).read_bytes()
    if f"{prefix}/{layout.COMMIT_FILENAME}" in there:
        # Committed meanwhile by a worker of a launch that died (its orphaned process finished the shard):
        # the same bytes are the same shard; anything else is another launch's, never overwritten.
        if store.read_bytes(f"{prefix}/{layout.COMMIT_FILENAME}") == mine:
            return
        raise KdError(f"{store.uri(prefix)} was committed by another teacher launch with other content "
                      "(one launch per cache: see its lease)")
    stale = [rel for rel in there if _SHARD_FILE.fullmatch(rel)]
    odd = sorted(set(there) - set(stale))
    if odd:
        raise KdError(f"{store.uri(odd[0])}: not a file kdcache teacher writes, inside {layout.shard_name(index)}; "
                      "remove it, or choose another --out")
    packed = staging_dir(f"{layout.shard_name(index)}-pack")  # never beside `local`: it may be a cache's shard
    zip_path = packed / packing.PACK_FILENAME
    try:
        packing.pack(local, sorted(record["files"]), zip_path)
        # A leftover is written over, not deleted first: an orphaned worker of a dead launch may be committing
        # this same shard (the same bytes: packing is deterministic), and must not find it gone under its record.
        store.put_file(zip_path, f"{prefix}/{packing.PACK_FILENAME}")
    finally:
        shutil.rmtree(packed, ignore_errors=True)
    store.write_bytes(f"{prefix}/{layout.COMMIT_FILENAME}", mine)
    keep = {f"{prefix}/{packing.PACK_FILENAME}", f"{prefix}/{layout.COMMIT_FILENAME}"}
    store.delete(sorted(rel for rel in stale if rel not in keep))


def upload_plan(store: Store, local: Path) -> None:
    """Upload the plan written in `local` (index, config, checksums), kdcache.json last."""
    for name in (layout.INDEX_FILENAME, layout.CONFIG_FILENAME, layout.CHECKSUMS_FILENAME, layout.META_FILENAME):
        if (local / name).is_file():
            store.write_bytes(name, (local / name).read_bytes())
