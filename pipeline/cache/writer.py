"""Writing a cache: the one place that puts files into a cache directory.

    w = CacheWriter(path, meta, counts)       # the planning process: metadata and rows per example
    if w.planned: diff = w.mismatch()         # a cache already there: what differs from `meta`
    else: w.plan(config)                      # index.parquet, config.yaml, kdcache.sha256, then kdcache.json last
    w = CacheWriter.open(path)                # any process, once planned: reads kdcache.json
    w.write_shard(i, arrays, info)            # commit one shard (any order, any process)

Planning writes `kdcache.json` last, so its presence means the plan is complete. A shard is written
under tmp/, every file checksummed into `_COMMIT.json`, fsynced and renamed into shards/: the rename is
the commit. A reader (or a resumed run) sees a shard either complete with its `_COMMIT.json` or not at
all; a run killed mid-write leaves only a `tmp/` directory, which the next run deletes (`clean_tmp`).

`path` may be an fsspec URL (s3://, gs://, ...): files are then written in a local staging directory and
uploaded, a shard's `_COMMIT.json` last (`pipeline.cache.remote`: object stores have no rename).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.cache import layout
from pipeline.cache.layout import read_meta
from pipeline.cache.schema import FORMAT_VERSION, CodecParams, stored_arrays
from pipeline.config import save_config
from pipeline.errors import Change
from pipeline.identity import file_sha256, json_text, write_json
from pipeline.storage import is_url, store_for


class CacheWriter:
    """The writer of one cache directory (in the manner of mosaicml/streaming's writers).

    `meta` is the cache's metadata (`kdcache.json`: at least `codec` and `chunk_rows` to write shards,
    the whole of it and `counts`, the target rows per example, to `plan`). The object holds no open
    files: one per process, shared by threads; `open` makes one from a planned cache on disk.
    """

    def __init__(self, path: str | Path, meta: dict[str, Any], counts: np.ndarray | None = None):
        self.url = str(path).rstrip("/") if is_url(path) else None  # a cache on an object store
        self.path = Path(path) if self.url is None else None
        self.meta = meta
        self.counts = counts
        self.params = CodecParams.from_meta(meta["codec"])
        self.chunk_rows = int(meta["chunk_rows"])

    @classmethod
    def open(cls, path: str | Path) -> "CacheWriter":
        """The writer of the planned cache at `path`, for committing its shards (a `KdError` if unplanned)."""
        return cls(path, read_meta(path))

    @property
    def planned(self) -> bool:
        """Is the plan complete on disk (its `kdcache.json` written)?"""
        if self.url is not None:
            return store_for(self.url).exists(layout.META_FILENAME)
        return (self.path / layout.META_FILENAME).is_file()

    def mismatch(self) -> list[str]:
        """What differs between the planned cache on disk and this writer's metadata ([] if nothing)."""
        return mismatch(read_meta(self.url or self.path), self.meta)

    def plan(self, config: Any = None, on_file: Callable[[Path], None] | None = None) -> None:
        """Write the plan: `index.parquet`, `config.yaml` (the resolved `config`, when given), `kdcache.sha256`
        (the sha256 of those and of kdcache.json) and `kdcache.json` last, each atomically (temporary file +
        rename): its presence means the plan is complete, so a run killed while planning leaves no
        `kdcache.json` and is planned again. `on_file(path)` is called for each file once written (the
        stage records it as its own)."""
        if self.counts is None:
            raise ValueError("planning a cache needs the target rows per example (counts)")
        if self.url is not None:  # written locally, then uploaded with kdcache.json last
            from pipeline.cache import remote
            from pipeline.storage.staging import rmtree_quiet, staging_dir

            local = staging_dir("plan")
            try:
                self._plan(local, config, None)
                remote.upload_plan(store_for(self.url), local)
            finally:
                rmtree_quiet(local)
            return
        self._plan(self.path, config, on_file)

    def _plan(self, path: Path, config: Any, on_file: Callable[[Path], None] | None) -> None:
        done = on_file or (lambda p: None)
        path.mkdir(parents=True, exist_ok=True)
        write_index(path, self.counts, self.meta["shards"])
        done(path / layout.INDEX_FILENAME)
        sums = {layout.INDEX_FILENAME: file_sha256(path / layout.INDEX_FILENAME)}
        if config is not None:
            save_config(config, path / layout.CONFIG_FILENAME)
            done(path / layout.CONFIG_FILENAME)
            sums[layout.CONFIG_FILENAME] = file_sha256(path / layout.CONFIG_FILENAME)
        meta = {**self.meta, "checksums": layout.CHECKSUMS_FILENAME}
        # The checksums of the final bytes, written before kdcache.json appears: a planned cache always has them.
        layout.write_checksums(path, {layout.META_FILENAME: hashlib.sha256(json_text(meta).encode()).hexdigest(),
                                      **sums})
        done(path / layout.CHECKSUMS_FILENAME)
        write_json(path / layout.META_FILENAME, meta)  # written last: the plan is complete
        done(path / layout.META_FILENAME)

    def clean_tmp(self, index: int | None = None) -> None:
        """Remove leftovers of killed writes (all of them, or only those of shard `index`). On an object store
        a shard's leftovers are replaced when it is uploaded again (`remote.commit_shard`)."""
        if self.path is not None:
            layout.clean_tmp(self.path, index)

    def write_shard(self, index: int, arrays: dict[str, np.ndarray], info: dict[str, Any]) -> dict[str, Any]:
        """Write and commit shard `index` (see the module function `write_shard`); returns its commit record."""
        return write_shard(self.url or self.path, index, arrays, info, self.params, self.chunk_rows)


def write_index(cache: Path, counts: np.ndarray, shards: list[dict[str, int]]) -> None:
    """index.parquet: sequence_id, row_start, row_count, shard — one row per example."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    shard_of = np.zeros(len(counts), np.int32)
    for s in shards:
        shard_of[s["example_start"]: s["example_stop"]] = s["index"]
    table = pa.table({"sequence_id": np.arange(len(counts), dtype=np.int64), "row_start": starts,
                      "row_count": counts.astype(np.int64), "shard": shard_of})
    tmp = cache / (layout.INDEX_FILENAME + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(cache / layout.INDEX_FILENAME)


def mismatch(old: dict[str, Any], new: dict[str, Any]) -> list[Change]:
    """Name what differs between a stored cache's metadata and the requested one ([] if nothing)."""
    diffs = []
    # Codec settings are compared as resolved (a preset's K, not the 0 that asks for it).
    ok_, nk = old.get("codec") or {}, new["codec"]
    for key in sorted(set(ok_) | set(nk)):
        if ok_.get(key) != nk.get(key):
            diffs.append(Change(key, ok_.get(key), nk.get(key)))
    codec_keys = set(nk) | {"preset"}
    oc, nc = old.get("config_identity") or {}, new["config_identity"]
    for key in sorted(set(oc) | set(nc)):
        if key not in codec_keys and oc.get(key) != nc.get(key):
            diffs.append(Change(key, oc.get(key), nc.get(key)))
    ot, nt = old.get("teacher") or {}, new["teacher"]
    for key in ("weights_sha256", "dtype", "revision", "model_vocab_size"):
        if ot.get(key) != nt.get(key):
            diffs.append(Change(f"teacher {key}", ot.get(key), nt.get(key)))
    if (old.get("data") or {}).get("fingerprint") != new["data"]["fingerprint"]:
        diffs.append(Change("data fingerprint", (old.get("data") or {}).get("fingerprint"), new["data"]["fingerprint"],
                            text="prepared data fingerprint"))
    if old.get("format_version") != new["format_version"]:  # a format-2 cache with the same settings
        diffs.append(Change("format version", old.get("format_version"), new["format_version"],
                            text=f"format version {old.get('format_version')} -> {new['format_version']}"))
    return diffs


def _compressors(clevel: int, itemsize: int, shuffle: str) -> list[Any]:
    from zarr.codecs import BloscCodec, Crc32cCodec

    return [BloscCodec(cname="zstd", clevel=clevel, shuffle=shuffle, typesize=itemsize), Crc32cCodec()]


INLINE_MAX_BYTES = 4096  # a Zarr metadata file this small is copied into the shard's commit record


def write_shard(cache: str | Path, index: int, arrays: dict[str, np.ndarray], info: dict[str, Any],
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
    url = str(cache) if is_url(cache) else None
    if url is not None:
        from pipeline.cache import remote
        from pipeline.storage.staging import staging_dir

        tmp = staging_dir(layout.shard_name(index))
    else:
        tmp = layout.tmp_shard_dir(Path(cache), index, uuid.uuid4().hex[:8])
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
                  "bytes": sum(p.stat().st_size for p in files), "array_bytes": per_array,
                  # Zarr's small metadata files, also inside the record: a reader of a remote cache stored file
                  # by file (copied there by a sync tool) gets them with it instead of one request each (checked
                  # against "files" all the same). kdcache's own uploads pack the shard (cache.packing).
                  "inline": {str(p.relative_to(tmp)): p.read_text() for p in files
                             if p.name == "zarr.json" and p.stat().st_size <= INLINE_MAX_BYTES}}
        write_json(tmp / layout.COMMIT_FILENAME, record)
        if url is not None:  # uploaded, its commit record last; the staging copy goes
            remote.commit_shard(store_for(url), index, tmp, record)
            shutil.rmtree(tmp, ignore_errors=True)
            return record
        _fsync_tree(tmp)
        final = layout.shard_dir(Path(cache), index)
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
