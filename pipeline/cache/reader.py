"""Reading a teacher cache: `open_cache(path)` and `Cache.read(start, stop)`.

This is the contract every later stage (and any other training tool) uses:

    from pipeline.cache import open_cache
    c = open_cache("runs/demo/cache")
    rows = c.read(0, 1024)          # dict of decoded numpy arrays, one row per target position
    rows["topk_logprobs"]           # [n, K] float32, log p over the full vocabulary

Rows are global: row r of the cache is the r-th target position of the prepared dataset, in
dataset order then position order; `c.index` maps each example to its rows.
"""

from __future__ import annotations

import bisect
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.cache import format as fmt
from pipeline.errors import CorruptionError, KdError
from pipeline.identity import file_sha256, read_json


class Cache:
    """A teacher cache on disk. Thread-safe for concurrent `read` calls."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.meta = read_json(self.path / fmt.META_FILENAME, "cache metadata (kdcache.json)")
        if self.meta.get("format_version") != fmt.FORMAT_VERSION:
            raise KdError(f"{self.path}: cache format version {self.meta.get('format_version')} is not supported "
                          f"(this kdcache reads version {fmt.FORMAT_VERSION})")
        self.shards: list[dict[str, Any]] = self.meta["shards"]
        self._starts = [s["row_start"] for s in self.shards]
        self._groups: dict[int, Any] = {}
        self._lock = threading.Lock()
        self._index = None

    # ---- metadata -------------------------------------------------------------------------
    @property
    def num_rows(self) -> int:
        return int(self.meta["num_rows"])

    @property
    def k(self) -> int:
        return int(self.meta["top_k"])

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def temperatures(self) -> list[float]:
        return [float(t) for t in self.meta["temperatures"]]

    @property
    def tail_samples(self) -> int:
        return int(self.meta.get("tail_samples", 0))

    @property
    def index(self) -> Any:
        """pyarrow Table: sequence_id, row_start, row_count, shard (one row per example)."""
        if self._index is None:
            import pyarrow.parquet as pq

            p = self.path / fmt.INDEX_FILENAME
            if not p.is_file():
                raise KdError(f"{self.path}: row index {fmt.INDEX_FILENAME} is missing")
            self._index = pq.read_table(p)
        return self._index

    def committed(self) -> list[bool]:
        """Per planned shard: is it committed?"""
        return [(self._shard_path(i) / fmt.COMMIT_FILENAME).is_file() for i in range(len(self.shards))]

    @property
    def complete(self) -> bool:
        return all(self.committed())

    def bytes_on_disk(self) -> int:
        """Everything under the cache directory (metadata, index, shards, leftovers)."""
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())

    # ---- rows -----------------------------------------------------------------------------
    def _shard_path(self, i: int) -> Path:
        return self.path / fmt.SHARDS_DIR / fmt.shard_name(i)

    def _group(self, i: int) -> Any:
        import zarr

        with self._lock:
            g = self._groups.get(i)
            if g is None:
                p = self._shard_path(i)
                if not (p / fmt.COMMIT_FILENAME).is_file():
                    raise KdError(f"{self.path}: {fmt.shard_name(i)} is not committed (the cache is incomplete; "
                                  "re-run `kdcache teacher` to finish it)")
                try:
                    g = zarr.open_group(str(p), mode="r")
                except Exception as e:
                    raise CorruptionError(f"{fmt.shard_name(i)}: cannot open ({type(e).__name__}: {e})") from None
                self._groups[i] = g
            return g

    def shard_of_row(self, row: int) -> int:
        return bisect.bisect_right(self._starts, row) - 1

    def read_raw(self, start: int, stop: int, names: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        """Rows [start, stop) as stored (encoded), concatenated across shards."""
        if not 0 <= start <= stop <= self.num_rows:
            raise IndexError(f"rows [{start}, {stop}) outside the cache's {self.num_rows} rows")
        names = names or self.array_names()
        parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
        row = start
        while row < stop:
            i = self.shard_of_row(row)
            s = self.shards[i]
            a, b = row - s["row_start"], min(stop, s["row_stop"]) - s["row_start"]
            g = self._group(i)
            for n in names:
                try:
                    parts[n].append(np.asarray(g[n][a:b]))
                except Exception as e:  # zarr raises ValueError on crc mismatch, others on truncation
                    raise CorruptionError(f"{fmt.shard_name(i)}: {n} rows {a}-{b} unreadable "
                                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
            row = s["row_stop"]
        if start == stop:
            return {n: np.zeros((0,) + self._row_shape(n), dtype=self._dtype(n)) for n in names}
        return {n: np.concatenate(v) if len(v) > 1 else v[0] for n, v in parts.items()}

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Rows [start, stop), decoded: ids int64, log-probs and scalars float32."""
        return decode_rows(self.read_raw(start, stop))

    def array_names(self) -> tuple[str, ...]:
        return fmt.ARRAYS + (fmt.TAIL_ARRAYS if self.tail_samples else ())

    def _row_shape(self, name: str) -> tuple[int, ...]:
        return {"topk_ids": (self.k,), "topk_logprobs": (self.k,), "log_partition": (len(self.temperatures),),
                "tail_ids": (self.tail_samples,), "tail_counts": (self.tail_samples,)}.get(name, ())

    def _dtype(self, name: str) -> np.dtype:
        if name in ("topk_ids", "target_ids"):
            return fmt.id_dtype(self.vocab_size)
        return {"topk_logprobs": np.dtype(np.uint16), "tail_ids": np.dtype(np.int32),
                "tail_counts": np.dtype(np.uint16)}.get(name, np.dtype(np.float16))

    # ---- integrity ------------------------------------------------------------------------
    def verify(self, on_shard: Callable[[int], None] | None = None) -> list[str]:
        """Check every shard: committed, file checksums, and every chunk decodes (crc32c).

        Returns one problem line per bad shard (empty when the cache is sound).
        """
        problems = []
        for i, s in enumerate(self.shards):
            name = fmt.shard_name(i)
            p = self._shard_path(i)
            try:
                if not (p / fmt.COMMIT_FILENAME).is_file():
                    problems.append(f"{name}: not committed")
                    continue
                rec = read_json(p / fmt.COMMIT_FILENAME, f"{name} commit record")
                for rel, digest in rec["files"].items():
                    f = p / rel
                    if not f.is_file():
                        problems.append(f"{name}: file {rel} missing")
                        break
                    if file_sha256(f) != digest:
                        problems.append(f"{name}: file {rel} checksum mismatch")
                        break
                else:
                    if rec["rows"] != s["row_stop"] - s["row_start"]:
                        problems.append(f"{name}: holds {rec['rows']} rows, plan says {s['row_stop'] - s['row_start']}")
                    else:
                        self.read_raw(s["row_start"], s["row_stop"])
            except (CorruptionError, KdError) as e:
                problems.append(str(e) if str(e).startswith(name) else f"{name}: {e}")
            finally:
                if on_shard:
                    on_shard(i)
        return problems


def decode_rows(raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Encoded arrays -> the contract's dtypes (see `format`)."""
    out = {}
    for n, a in raw.items():
        if n in ("topk_ids", "target_ids", "tail_ids"):
            out[n] = a.astype(np.int64)
        elif n == "topk_logprobs":
            out[n] = fmt.decode_logprobs(a)
        elif n == "tail_counts":
            out[n] = a.astype(np.int64)
        else:
            out[n] = a.astype(np.float32)
    return out


def open_cache(path: str | Path) -> Cache:
    """Open a teacher cache directory (a `KdError` if it is not one)."""
    p = Path(path)
    if not p.is_dir():
        raise KdError(f"cache not found: {p}")
    return Cache(p)
