"""Committing one shard of the cache: write under tmp/, checksum every file, rename into shards/.

The rename is the commit. A reader (or a resumed run) sees a shard either complete with its
`_COMMIT.json` or not at all; a run killed mid-write leaves only a `tmp/` directory, which the
next run deletes.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cache import format as fmt
from pipeline.identity import file_sha256, write_json


def _compressors(clevel: int, itemsize: int) -> list[Any]:
    from zarr.codecs import BloscCodec, Crc32cCodec

    return [BloscCodec(cname="zstd", clevel=clevel, shuffle="shuffle", typesize=itemsize), Crc32cCodec()]


def shard_dir(cache: Path, index: int) -> Path:
    return cache / fmt.SHARDS_DIR / fmt.shard_name(index)


def is_committed(cache: Path, index: int) -> bool:
    return (shard_dir(cache, index) / fmt.COMMIT_FILENAME).is_file()


def clean_tmp(cache: Path, index: int | None = None) -> None:
    """Remove leftovers of killed writes (all of them, or only those of shard `index`)."""
    tmp = cache / fmt.TMP_DIR
    if not tmp.is_dir():
        return
    prefix = fmt.shard_name(index) + "." if index is not None else ""
    for p in tmp.iterdir():
        if p.name.startswith(prefix):
            shutil.rmtree(p, ignore_errors=True)


def write_shard(cache: Path, index: int, arrays: dict[str, np.ndarray], info: dict[str, Any],
                chunk_rows: int, clevel: int) -> dict[str, Any]:
    """Write `arrays` (already encoded: see `format`) as shard `index` and commit it.

    `info` (examples, row range) is stored in the commit record. Returns that record.
    Arrays are chunked by `chunk_rows` rows and gathered into one Zarr shard file per array, so a
    cache shard is a handful of files however many rows it holds.
    """
    import zarr

    n = len(arrays["entropy"])
    tmp = cache / fmt.TMP_DIR / f"{fmt.shard_name(index)}.{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        chunk = max(1, min(chunk_rows, n))
        for name, a in arrays.items():
            a = np.ascontiguousarray(a)
            chunks = (chunk,) + a.shape[1:]
            shards = (chunk * max(1, -(-n // chunk)),) + a.shape[1:]
            z = root.create_array(name, shape=a.shape, dtype=a.dtype, chunks=chunks, shards=shards,
                                  compressors=_compressors(clevel, a.dtype.itemsize), fill_value=0)
            if n:
                z[...] = a
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        record = {**info, "rows": n, "files": {str(p.relative_to(tmp)): file_sha256(p) for p in files},
                  "bytes": sum(p.stat().st_size for p in files)}
        write_json(tmp / fmt.COMMIT_FILENAME, record)
        _fsync_tree(tmp)
        final = shard_dir(cache, index)
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
