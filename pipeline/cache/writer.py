"""Committing one shard of the cache: write under tmp/, checksum every file, rename into shards/.

The rename is the commit. A reader (or a resumed run) sees a shard either complete with its
`_COMMIT.json` or not at all; a run killed mid-write leaves only a `tmp/` directory, which the
next run deletes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cache import layout
from pipeline.cache.schema import FORMAT_VERSION, CodecParams, stored_arrays
from pipeline.identity import file_sha256, write_json


def _compressors(clevel: int, itemsize: int, shuffle: str) -> list[Any]:
    from zarr.codecs import BloscCodec, Crc32cCodec

    return [BloscCodec(cname="zstd", clevel=clevel, shuffle=shuffle, typesize=itemsize), Crc32cCodec()]


def targets_sha256(target_ids: np.ndarray) -> str:
    """The alignment hash of a shard: sha256 of its rows' target ids as little-endian int64, in row order.

    Target ids are not stored (they are the prepared data's tokens); a reader recomputes this from the
    data it is given and refuses data that is not the data the shard was computed from.
    """
    return hashlib.sha256(np.ascontiguousarray(target_ids, dtype="<i8").tobytes()).hexdigest()


def write_shard(cache: Path, index: int, arrays: dict[str, np.ndarray], info: dict[str, Any],
                params: CodecParams, chunk_rows: int) -> dict[str, Any]:
    """Write `arrays` (encoded: `schema.RowCodec.encode`) as shard `index` and commit it.

    `info` (examples, row range, dtype and device it was computed with, targets_sha256) goes into the
    commit record with the format version, the row count and the sha256 of every file. Returns the
    record. Arrays are chunked by `chunk_rows` rows, each array one Zarr shard file, so a cache shard
    is a handful of files however many rows it holds.
    """
    import zarr

    specs = stored_arrays(params)
    missing = [s.name for s in specs if s.name not in arrays]
    if missing:
        raise ValueError(f"shard {index}: arrays {missing} missing for this codec")
    n = len(arrays["topk_ids"])
    tmp = layout.tmp_shard_dir(cache, index, uuid.uuid4().hex[:8])
    tmp.mkdir(parents=True)
    try:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        chunk = max(1, min(chunk_rows, n))
        for spec in specs:
            a = np.ascontiguousarray(arrays[spec.name], dtype=spec.dtype(params))
            if a.shape[1:] != spec.row_shape(params):
                raise ValueError(f"shard {index}: {spec.name} rows have shape {a.shape[1:]}, "
                                 f"the schema says {spec.row_shape(params)}")
            chunks = (chunk,) + a.shape[1:]
            shards = (chunk * max(1, -(-n // chunk)),) + a.shape[1:]
            z = root.create_array(spec.name, shape=a.shape, dtype=a.dtype, chunks=chunks, shards=shards,
                                  compressors=_compressors(params.clevel, a.dtype.itemsize, spec.shuffle),
                                  fill_value=0)
            if n:
                z[...] = a
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        per_array = {s.name: sum(p.stat().st_size for p in files if p.relative_to(tmp).parts[0] == s.name)
                     for s in specs}
        record = {"format_version": FORMAT_VERSION, **info, "rows": n,
                  "files": {str(p.relative_to(tmp)): file_sha256(p) for p in files},
                  "bytes": sum(p.stat().st_size for p in files), "array_bytes": per_array}
        write_json(tmp / layout.COMMIT_FILENAME, record)
        _fsync_tree(tmp)
        final = layout.shard_dir(cache, index)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():  # an uncommitted leftover (no _COMMIT.json): never a committed shard
            shutil.rmtree(final)
        os.replace(tmp, final)
        return record
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_tree(root: Path) -> None:
    """Flush the shard's files before the rename, so a power loss cannot commit empty files."""
    for p in root.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
