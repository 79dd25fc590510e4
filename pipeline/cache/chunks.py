"""Stored arrays read straight from their shard files: the fast path under `Cache.read_raw`.

Why not zarr-python for the hot path: a `zarr.Array[a:b]` call costs ~0.6 ms however small (its
asyncio loop and codec pipeline), against 0.2 ms to decompress a 500 KB chunk; a block of 8,192 rows
reads six arrays, so zarr alone capped the reader near 1.3M rows/s on one thread, and more threads did
not help (every call goes through zarr's one I/O loop; measured 2 threads slower than 1). The stream
needs >= 2M rows/s per process (bench/reader.py).

What is read is exactly the layout `writer.write_shard` writes (docs/cache-format.md): one Zarr v3
array per stored field, chunked along rows only, all its chunks in ONE shard file `c/0[/0...]` with the
`sharding_indexed` codec, inner codecs bytes (little endian) -> blosc -> crc32c and an index of
(offset, nbytes) uint64 pairs at the end, itself followed by its crc32c. A chunk whose values all equal
the fill value is not stored (offset = nbytes = 2^64 - 1). `open_array` checks the array's zarr.json
against that layout and returns None for anything else, and the caller falls back to zarr; so a cache
written by other means still reads, only slower. Integrity is zarr's: the index and every chunk are
checked against their crc32c before use, so a flipped byte fails the read (`ValueError`, which
`Cache.read_raw` reports naming the shard).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

EMPTY = 2**64 - 1  # offset and length of a chunk that was not stored (all fill value)


def _crc32c(data: Any) -> int:
    import google_crc32c  # zarr's own crc32c implementation (a dependency of zarr)

    return int(google_crc32c.value(data))


def _checked(data: bytes, what: str) -> np.ndarray:
    """`data` less its trailing crc32c (a uint8 view, no copy), after checking it."""
    if len(data) < 4:
        raise ValueError(f"{what}: {len(data)} bytes, too short for its checksum")
    body = np.frombuffer(data, dtype=np.uint8)[:-4]
    if _crc32c(body) != int.from_bytes(data[-4:], "little"):
        raise ValueError(f"{what}: checksum mismatch")
    return body


def _layout(meta: dict[str, Any], dtype: np.dtype, row_shape: tuple[int, ...]) -> int | None:
    """Rows per chunk when `meta` (an array's zarr.json) is the layout this module reads, else None."""
    try:
        shape, ndim = meta["shape"], 1 + len(row_shape)
        if (meta.get("zarr_format"), meta.get("node_type")) != (3, "array") or len(shape) != ndim:
            return None
        if np.dtype(meta["data_type"]) != dtype or meta.get("fill_value") != 0 or meta.get("storage_transformers"):
            return None
        if tuple(shape[1:]) != row_shape or meta["chunk_grid"]["name"] != "regular":
            return None
        outer = meta["chunk_grid"]["configuration"]["chunk_shape"]
        if outer[0] < shape[0] or tuple(outer[1:]) != row_shape:  # one shard file holds every row
            return None
        enc = meta["chunk_key_encoding"]
        if enc["name"] != "default" or enc.get("configuration", {}).get("separator", "/") != "/":
            return None
        (codec,) = meta["codecs"]
        conf = codec["configuration"]
        if codec["name"] != "sharding_indexed" or conf.get("index_location", "end") != "end":
            return None
        inner = conf["chunk_shape"]
        if tuple(inner[1:]) != row_shape or outer[0] % inner[0]:
            return None
        names = [c["name"] for c in conf["codecs"]]
        little = all(c.get("configuration", {}).get("endian", "little") == "little"
                     for c in conf["codecs"] + conf["index_codecs"] if c["name"] == "bytes")
        if names != ["bytes", "blosc", "crc32c"] or [c["name"] for c in conf["index_codecs"]] != ["bytes", "crc32c"]:
            return None
        if not little and dtype.itemsize > 1:
            return None
        return int(inner[0])
    except (KeyError, TypeError, ValueError):
        return None


class ShardArray:
    """One stored array of one shard: `a[start:stop]` -> numpy rows, decoded chunk by chunk.

    Thread-safe (nothing is mutated after opening). The file is opened per chunk read, not held: a
    reader keeps every shard it has read, and a cache of thousands of shards would exhaust descriptors.
    """

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype, chunk_rows: int, outer_rows: int,
                 must_exist: bool = False):
        self.shape, self.dtype, self.chunk_rows = shape, np.dtype(dtype).newbyteorder("<"), chunk_rows
        self.row_shape, self.name = shape[1:], path.name
        self.chunk_bytes = chunk_rows * int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        n_chunks = outer_rows // chunk_rows
        self.file = path / "c" / "/".join(["0"] * len(shape))
        if not self.file.is_file():  # nothing stored: every chunk is fill value, unless the commit record lists it
            if must_exist:
                raise ValueError(f"{path.name}: shard file {self.file.relative_to(path.parent)} is missing")
            self.index = np.full((n_chunks, 2), EMPTY, dtype=np.uint64)
            return
        with open(self.file, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            index_bytes = n_chunks * 16 + 4
            if size < index_bytes:
                raise ValueError(f"{path.name}: shard file of {size} bytes is shorter than its index")
            body = _checked(os.pread(f.fileno(), index_bytes, size - index_bytes), f"{path.name} index")
        self.index = body.view("<u8").reshape(n_chunks, 2)
        stored = self.index[:, 0] != EMPTY
        if np.any(self.index[stored, 0] + self.index[stored, 1] > size - index_bytes):
            raise ValueError(f"{path.name}: shard index points past the end of the file")

    def _chunk(self, j: int) -> np.ndarray:
        """Chunk j as [chunk_rows, *row_shape] (a full chunk: the last one is padded with fill)."""
        import numcodecs.blosc

        off, nbytes = (int(x) for x in self.index[j])
        if off == EMPTY:
            return np.zeros((self.chunk_rows,) + self.row_shape, dtype=self.dtype)
        with open(self.file, "rb", buffering=0) as f:
            data = os.pread(f.fileno(), nbytes, off)
        if len(data) != nbytes:
            raise ValueError(f"{self.name}: chunk {j} truncated ({len(data)} of {nbytes} bytes)")
        out = np.empty(self.chunk_bytes, dtype=np.uint8)
        numcodecs.blosc.decompress(_checked(data, f"{self.name} chunk {j}"), out)  # releases the GIL
        return out.view(self.dtype).reshape((self.chunk_rows,) + self.row_shape)

    def __getitem__(self, rows: slice) -> np.ndarray:
        a, b, step = rows.indices(self.shape[0])
        if step != 1:
            raise IndexError("ShardArray reads contiguous row ranges only")
        if b <= a:
            return np.zeros((0,) + self.row_shape, dtype=self.dtype)
        c = self.chunk_rows
        j0, j1 = a // c, (b - 1) // c
        if j0 == j1:
            return self._chunk(j0)[a - j0 * c: b - j0 * c]
        return np.concatenate([self._chunk(j)[max(a, j * c) - j * c: min(b, (j + 1) * c) - j * c]
                               for j in range(j0, j1 + 1)])


def open_array(path: Path, dtype: np.dtype, row_shape: tuple[int, ...], files: set[str] | None = None
               ) -> ShardArray | None:
    """The fast reader of the array stored at `path` (a directory with zarr.json), or None when its
    layout is not the one this module reads (the caller then uses zarr). `files`: the shard's file list
    (relative paths, from its commit record): a listed file that is gone is an error, not fill values."""
    try:
        meta = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError):
        return None
    chunk_rows = _layout(meta, np.dtype(dtype), tuple(row_shape))
    if chunk_rows is None:
        return None
    outer = int(meta["chunk_grid"]["configuration"]["chunk_shape"][0])
    rel = f"{path.name}/c/" + "/".join(["0"] * len(meta["shape"]))
    return ShardArray(path, tuple(meta["shape"]), np.dtype(dtype), chunk_rows, outer, rel in (files or ()))
