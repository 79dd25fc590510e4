"""Reading a teacher cache: `open_cache(path)` and `Cache.read(start, stop)`.

This is the contract every later stage (and any other training tool) uses:

    from pipeline.cache import open_cache
    c = open_cache("runs/demo/cache")
    rows = c.read(0, 1024)          # dict of decoded numpy arrays, one row per target position
    rows["topk_logprobs"]           # [n, K] float32, log p over the full vocabulary
    rows["tail_logprob"]            # [n] float32, log of the mass outside the top-K (-inf only if K = V)
    # logsumexp over the K + 1 buckets (topk_logprobs, tail_logprob) is 0 on every row, within 1e-6

Fields (`schema.DECODED`; `read(a, b, fields=(...))` decodes only those): topk_ids [n, K] int64,
topk_logprobs [n, K], tail_logprob [n], entropy [n], log_partition [n, G] = A(1/T_g), tail_entropy [n],
tail_log_partition [n, G], target_logprobs [n], target_rank [n] int64 (-1: outside the head),
target_ids [n] int64, and with tail samples tail_ids / tail_counts [n, S] int64.

Target ids are not stored in the shards: they are the prepared data's tokens. `read` takes them from
the prepared data the cache records (or the one given to `open_cache(path, data=...)`), and checks
them against each shard's alignment hash, so a cache is never joined to other data silently.

Rows are global: row r of the cache is the r-th target position of the prepared dataset, in
dataset order then position order; `c.index` maps each example to its rows.

`open_cache("s3://bucket/cache", local_cache=DIR, local_cache_gb=G, prefetch=N)` reads a cache on an object
store through a bounded local copy (`pipeline.cache.mirror.Mirror`): shards are downloaded whole, checked
against their commit records' sha256 as they arrive, `N` ahead of the reader, least recently used evicted.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.cache import layout, packing
from pipeline.cache.chunks import open_array
from pipeline.cache.rows import load_dataset_dir, target_ids_of, targets_sha256
from pipeline.cache.schema import DECODED, FORMAT_VERSION, CodecParams, RowCodec, stored_arrays
from pipeline.errors import CorruptionError, KdError
from pipeline.identity import file_sha256
from pipeline.storage import is_url

# What `read` decodes by default: the whole contract.
CONTRACT_FIELDS = ("topk_ids", "topk_logprobs", "tail_logprob", "entropy", "log_partition", "tail_entropy",
                   "tail_log_partition", "target_logprobs", "target_rank", "target_ids")


class Cache:
    """A teacher cache on disk. Thread-safe for concurrent `read` calls."""

    def __init__(self, path: str | Path, data: Any = None, strict: bool = True, local_cache: str | Path | None = None,
                 local_cache_gb: float = 0.0, prefetch: int = 2):
        """`strict`: a damaged `kdcache.json`, `index.parquet` or `kdcache.sha256` raises a `CorruptionError`
        naming the file; without it (`inspect --verify`) they are listed in `metadata_problems` instead,
        and the cache opens when its metadata still parses. `path` may be an fsspec URL: the cache is
        then read through a local copy (`local_cache` directory, at most `local_cache_gb` GiB of shards,
        `prefetch` shards ahead; `pipeline.cache.mirror`)."""
        self.url = str(path).rstrip("/") if is_url(path) else None
        self.mirror = None
        self._mirror_args = (local_cache, local_cache_gb, prefetch)
        if self.url is not None:
            from pipeline.cache.mirror import Mirror

            self.mirror = Mirror(self.url, local_cache, local_cache_gb, prefetch, on_evict=self._forget)
            self.path = self.mirror.open()
        else:
            self.path = Path(path)
        self.metadata_problems: list[str] = []
        self.checksummed = False  # False: a cache written before kdcache.sha256 existed (shards checked only)
        self.meta = self._read_meta(strict)
        version = self.meta.get("format_version")
        if version != FORMAT_VERSION:
            raise KdError(f"{self.where} is a format-{version} cache; this kdcache reads format {FORMAT_VERSION} "
                          f"(exact tail mass and temperature statistics): re-run `kdcache teacher` to rebuild it")
        self.params = CodecParams.from_meta(self.meta["codec"])
        self.codec = RowCodec(self.params)
        self.shards: list[dict[str, Any]] = self.meta["shards"]
        self._starts = [s["row_start"] for s in self.shards]
        self._groups: dict[int, Any] = {}
        self._targets: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()
        self._index = None
        self._data = data
        self._first_commit: dict[str, Any] | None = None  # the reference of `wait_committed`'s checks

    def _read_meta(self, strict: bool) -> dict[str, Any]:
        """kdcache.json, checked (with index.parquet) against kdcache.sha256 when the cache has one: both are
        small, so every open checks them."""
        import json

        meta_path = self.path / layout.META_FILENAME
        if not meta_path.is_file():
            raise KdError(f"cache metadata (kdcache.json) not found: {meta_path}")
        problems = self.metadata_problems
        sums = None
        try:
            sums = layout.read_checksums(self.path)
        except CorruptionError as e:
            problems.append(str(e))
        raw = meta_path.read_bytes()
        if sums is not None and hashlib.sha256(raw).hexdigest() != sums[layout.META_FILENAME]:
            problems.append(_damaged(meta_path))
        try:
            meta = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            if problems:  # e.g. truncated: its checksum says more than the parser
                raise CorruptionError(problems[-1]) from None
            raise KdError(f"cache metadata (kdcache.json) is not valid JSON: {meta_path} ({e})") from None
        if not isinstance(meta, dict):
            raise KdError(f"cache metadata (kdcache.json) must hold a JSON object: {meta_path}")
        if meta.get("format_version") != FORMAT_VERSION:  # refused whatever else (the caller's one line)
            return meta
        if strict and problems:
            raise CorruptionError(problems[0])
        if sums is None and meta.get("checksums") and not problems:
            problems.append(f"{self.path / layout.CHECKSUMS_FILENAME} is missing (kdcache.json says the cache has "
                            "one): restore it, or rebuild the cache with `kdcache teacher` into a new --out")
        self.checksummed = sums is not None
        for name, digest in (sums or {}).items():
            if name in (layout.META_FILENAME, layout.CONFIG_FILENAME):  # the config is checked by `verify`
                continue
            f = self.path / name
            if not f.is_file():
                problems.append(f"{f} is missing (kdcache.sha256 records it): restore it, or delete the cache's "
                                "files and re-run `kdcache teacher`")
            elif file_sha256(f) != digest:
                problems.append(_damaged(f))
        if strict and problems:
            raise CorruptionError(problems[0])
        return meta

    @property
    def where(self) -> str:
        """The cache's URL or directory, for messages."""
        return self.url or str(self.path)

    def _forget(self, i: int) -> None:
        """The mirror evicted shard `i`: its open arrays point at deleted files."""
        with self._lock:
            self._groups.pop(i, None)

    def __getstate__(self) -> dict[str, Any]:
        """Picklable (DataLoader workers started with spawn): open arrays, the lock and decoded target ids
        are per process and reopened lazily; the data is passed on as given (a path or a dataset). A remote
        cache's mirror is reopened in the new process (same local directory)."""
        state = dict(self.__dict__)
        state.update(_groups={}, _targets={}, _lock=None, _index=None, mirror=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        if self.url is not None:
            from pipeline.cache.mirror import Mirror

            self.mirror = Mirror(self.url, *self._mirror_args, on_evict=self._forget)
            self.mirror.open()

    def _is_committed(self, i: int) -> bool:
        return self.mirror.committed(i) if self.mirror is not None else layout.is_committed(self.path, i)

    def _commit(self, i: int) -> dict[str, Any]:
        """Shard `i`'s commit record (from the store for a remote cache)."""
        if self.mirror is not None:
            return self.mirror.record(i)
        return layout.read_commit(self.path, i)

    def prefetch_order(self, shards: list[int]) -> None:
        """The order shards will first be read in (the epoch plan's): a remote cache fetches ahead in it."""
        if self.mirror is not None:
            self.mirror.hint(shards)

    # ---- metadata -------------------------------------------------------------------------
    @property
    def num_rows(self) -> int:
        return int(self.meta["num_rows"])

    @property
    def k(self) -> int:
        return self.params.top_k

    @property
    def vocab_size(self) -> int:
        """The teacher's vocabulary V (the tokenizer's ids; a padded model head's extra rows excluded)."""
        return self.params.vocab_size

    @property
    def temperatures(self) -> list[float]:
        return list(self.params.temperatures)

    @property
    def tail_samples(self) -> int:
        return self.params.tail_samples

    @property
    def chunk_rows(self) -> int:
        return int(self.meta["chunk_rows"])

    @property
    def index(self) -> Any:
        """pyarrow Table: sequence_id, row_start, row_count, shard (one row per example)."""
        if self._index is None:
            import pyarrow.parquet as pq

            p = self.path / layout.INDEX_FILENAME
            if not p.is_file():
                raise KdError(f"{self.where}: row index {layout.INDEX_FILENAME} is missing")
            try:
                index = pq.read_table(p)
            except Exception as e:  # pyarrow raises ArrowInvalid / OSError on truncated or foreign bytes
                raise CorruptionError(f"{p} is unreadable ({_first_line(e)}): restore it, or rebuild the cache "
                                      "with `kdcache teacher`") from None
            missing = [c for c in ("sequence_id", "row_start", "row_count", "shard") if c not in index.column_names]
            if missing or index.num_rows != int(self.meta["num_examples"]):
                what = f"lacks column(s) {missing}" if missing else (
                    f"has {index.num_rows} rows, kdcache.json says {self.meta['num_examples']} examples")
                raise CorruptionError(f"{p} {what}: restore it, or rebuild the cache with `kdcache teacher`")
            self._index = index
        return self._index

    def committed(self) -> list[bool]:
        """Per planned shard: is it committed?"""
        if self.mirror is not None:
            return self.mirror.committed_all(len(self.shards))
        done = set(layout.committed_shards(self.path))
        return [i in done for i in range(len(self.shards))]

    @property
    def complete(self) -> bool:
        return all(self.committed())

    def commit_records(self) -> dict[int, dict[str, Any]]:
        """Commit records of the committed shards, by shard index."""
        return {i: self._commit(i) for i, ok in enumerate(self.committed()) if ok}

    def check_consistent(self) -> dict[str, Any]:
        """Refuse a cache whose committed shards were computed in different dtypes or formats.

        Returns {"dtype", "device"} of the shards (the first shard's device; devices may differ).
        """
        recs = self.commit_records()
        dtypes = {r.get("dtype") for r in recs.values()}
        if len(dtypes) > 1:
            by = {d: [layout.shard_name(i) for i, r in recs.items() if r.get("dtype") == d][:2] for d in dtypes}
            raise KdError(f"{self.where} mixes shards computed in different dtypes ({by}); re-run "
                          "`kdcache teacher` with one --dtype (--overwrite) so every row has the same precision")
        bad = [layout.shard_name(i) for i, r in recs.items() if r.get("format_version") != FORMAT_VERSION]
        if bad:
            raise KdError(f"{self.where}: {bad[0]} is not format {FORMAT_VERSION}; re-run `kdcache teacher` --overwrite")
        first = next(iter(recs.values()), {})
        return {"dtype": first.get("dtype"), "device": first.get("device")}

    def wait_committed(self, i: int, timeout: float, poll: float = 1.0, stop: threading.Event | None = None) -> None:
        """Block until shard `i` is committed, for a reader that trains while the teacher still writes
        (`kdcache train --follow`); then check it against the shards committed before it (format, dtype).

        Polls the commit record every `poll` seconds: the commit is an atomic rename, so the shard's
        files are never read before it. Gives up after `timeout` seconds (a `KdError` naming the shard)
        or when `stop` is set.
        """
        waited = 0.0
        while not self._is_committed(i):
            if waited >= timeout:
                raise KdError(f"{self.where}: {layout.shard_name(i)} is still not committed after waiting {timeout:.0f} s "
                              f"(--follow-timeout); {sum(self.committed())} of {len(self.shards)} shards are: is "
                              "`kdcache teacher` still running? Re-run the same command once it progresses")
            if stop is None:
                time.sleep(poll)
            elif stop.wait(poll):
                raise KdError(f"stopped while waiting for {layout.shard_name(i)} to be committed")
            waited += poll
        rec = self._commit(i)
        with self._lock:
            first = self._first_commit = self._first_commit or rec
        if rec.get("format_version") != FORMAT_VERSION or rec.get("dtype") != first.get("dtype"):
            raise KdError(f"{self.where}: {layout.shard_name(i)} was committed as format {rec.get('format_version')}, "
                          f"{rec.get('dtype')} while earlier shards are format {first.get('format_version')}, "
                          f"{first.get('dtype')}: one cache holds one precision; re-run `kdcache teacher` --overwrite")

    def bytes_on_disk(self) -> int:
        """Everything under the cache directory (metadata, index, shards, leftovers; a remote cache: its objects)."""
        if self.mirror is not None:
            return sum(self.mirror.store.sizes().values())
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())

    def array_bytes(self) -> dict[str, int]:
        """Bytes on disk per stored array, summed over the committed shards (from their commit records)."""
        total = {s.name: 0 for s in stored_arrays(self.params)}
        for rec in self.commit_records().values():
            for name, b in (rec.get("array_bytes") or {}).items():
                total[name] = total.get(name, 0) + int(b)
        return total

    # ---- rows -----------------------------------------------------------------------------
    def _group(self, i: int, local: bool = False) -> Any:
        """Shard `i`'s open arrays; `local`: the caller made sure a remote cache's shard is local (`reading`)."""
        import zarr

        if self.mirror is not None and not local:  # downloaded (and checked) first; touches its LRU entry
            self.mirror.ensure(i)
        with self._lock:
            g = self._groups.get(i)
            if g is None:
                p = layout.shard_dir(self.path, i)
                if not layout.is_committed(self.path, i):
                    raise KdError(f"{self.where}: {layout.shard_name(i)} is not committed (the cache is incomplete; "
                                  "re-run `kdcache teacher` to finish it)")
                try:  # opened once per shard; zarr only for a layout the fast reader does not know
                    files = set(layout.read_commit(self.path, i).get("files") or ())
                    g = {s.name: (open_array(p / s.name, s.dtype(self.params), s.row_shape(self.params), files)
                                  or zarr.open_array(str(p / s.name), mode="r")) for s in stored_arrays(self.params)}
                except Exception as e:
                    raise CorruptionError(f"{layout.shard_name(i)}: cannot open "
                                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
                self._groups[i] = g
            return g

    def shard_of_row(self, row: int) -> int:
        return bisect.bisect_right(self._starts, row) - 1

    def read_raw(self, start: int, stop: int, names: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        """Rows [start, stop) as stored (encoded), concatenated across shards."""
        if not 0 <= start <= stop <= self.num_rows:
            raise IndexError(f"rows [{start}, {stop}) outside the cache's {self.num_rows} rows")
        specs = {s.name: s for s in stored_arrays(self.params)}
        names = names or tuple(specs)
        parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
        row = start
        while row < stop:
            i = self.shard_of_row(row)
            s = self.shards[i]
            a, b = row - s["row_start"], min(stop, s["row_stop"]) - s["row_start"]
            try:
                got = self._read_shard(i, a, b, names)
            except CorruptionError:
                if self.mirror is None:
                    raise
                self.mirror.evict(i)  # a damaged local copy: downloaded (and checked on arrival) again, once
                got = self._read_shard(i, a, b, names)
            for n in names:
                parts[n].append(got[n])
            row = s["row_stop"]
        if start == stop:
            return {n: np.zeros((0,) + specs[n].row_shape(self.params), dtype=specs[n].dtype(self.params))
                    for n in names}
        return {n: np.concatenate(v) if len(v) > 1 else v[0] for n, v in parts.items()}

    def _read_shard(self, i: int, a: int, b: int, names: tuple[str, ...]) -> dict[str, np.ndarray]:
        """Rows [a, b) of shard `i` (shard-relative), as stored."""
        out = {}
        with self.mirror.reading(i) if self.mirror is not None else contextlib.nullcontext():
            g = self._group(i, local=True)  # a remote cache's shard: local, checked, not evicted while read
            for n in names:
                try:
                    out[n] = np.asarray(g[n][a:b])
                except FileNotFoundError:
                    raise CorruptionError(f"{layout.shard_name(i)}: {n} file missing") from None
                except Exception as e:  # zarr raises ValueError on crc mismatch, others on truncation
                    raise CorruptionError(f"{layout.shard_name(i)}: {n} rows {a}-{b} unreadable ({type(e).__name__}: "
                                          f"{str(e).splitlines()[0] if str(e) else ''})") from None
        return out

    def read(self, start: int, stop: int, fields: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        """Rows [start, stop), decoded (see the module docstring); `fields` limits what is decoded."""
        if fields is None:
            fields = CONTRACT_FIELDS + (("tail_ids", "tail_counts") if self.tail_samples else ())
        unknown = [f for f in fields if f not in DECODED and f != "target_ids"]
        if unknown:
            raise KdError(f"unknown cache field(s) {unknown}; fields are {', '.join(CONTRACT_FIELDS)}")
        coded = tuple(f for f in fields if f != "target_ids")
        out = self.codec.decode(self.read_raw(start, stop, self.codec.stored_fields(coded)), coded)
        if "target_ids" in fields:
            out["target_ids"] = self.target_ids(start, stop)
        return out

    def decode(self, raw: dict[str, np.ndarray], fields: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        """Decode arrays from `read_raw` (e.g. read on another thread)."""
        return self.codec.decode(raw, fields)

    # ---- target ids from the prepared data -------------------------------------------------
    def attach_data(self, data: Any) -> None:
        """Use `data` (a prepared `datasets.Dataset`, or its directory, opened with
        `datasets.load_from_disk` when first needed) for target ids."""
        with self._lock:
            self._data = data
            self._targets.clear()

    def _dataset(self) -> Any:
        if self._data is None:
            path = (self.meta.get("data") or {}).get("path", "")
            if not path or not Path(path).is_dir():
                raise KdError(f"{self.where}: target ids come from the prepared data the cache was made from, "
                              f"and {path or 'its recorded path'} is gone; pass it with open_cache(path, data=DIR)")
            self._data = path
        if isinstance(self._data, (str, Path)):
            self._data = load_dataset_dir(self._data)
        return self._data

    def shard_target_ids(self, i: int) -> np.ndarray:
        """Target ids of shard `i`'s rows, from the data, checked against the shard's alignment hash."""
        with self._lock:
            hit = self._targets.get(i)
        if hit is not None:
            return hit
        s = self.shards[i]
        ds = self._dataset()
        if len(ds) < s["example_stop"]:
            raise KdError(f"{layout.shard_name(i)}: the data has {len(ds)} examples, the cache indexes "
                          f"{self.meta['num_examples']}: not the data this cache was made from")
        t = target_ids_of(ds, s["example_start"], s["example_stop"])
        rec = self._commit(i)
        if len(t) != s["row_stop"] - s["row_start"] or targets_sha256(t) != rec.get("targets_sha256"):
            raise KdError(f"{layout.shard_name(i)}: the data's tokens do not match the cache's rows "
                          "(other data than the cache was made from; check --data)")
        with self._lock:
            self._targets[i] = t
        return t

    def target_ids(self, start: int, stop: int) -> np.ndarray:
        """Target ids of rows [start, stop) (int64)."""
        parts, row = [], start
        while row < stop:
            i = self.shard_of_row(row)
            s = self.shards[i]
            t = self.shard_target_ids(i)
            parts.append(t[row - s["row_start"]: min(stop, s["row_stop"]) - s["row_start"]])
            row = s["row_stop"]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    # ---- integrity ------------------------------------------------------------------------
    def verify(self, on_shard: Callable[[int], None] | None = None, check_data: bool = False,
               ignore: tuple[str, ...] = (layout.RECORDS_DIR,)) -> list[str]:
        """Check every file of the cache: kdcache.json, index.parquet and config.yaml against kdcache.sha256 (when
        the cache has one) and the index's shape; every shard committed, its format, its files' checksums, every
        chunk decoding (crc32c), and with `check_data` its target ids against the prepared data; and any file the
        cache does not know (its top-level entries named in `ignore` excepted: the output's ownership records,
        which `pipeline.ownership.check_records` judges).
        Returns one problem line per bad file or shard, each starting with its name relative to the cache."""
        problems = [self._relative(p) for p in Cache(self.path, strict=False).metadata_problems]
        sums = None
        try:
            sums = layout.read_checksums(self.path)
        except CorruptionError:
            pass  # already a problem above
        conf = self.path / layout.CONFIG_FILENAME
        if sums is not None and layout.CONFIG_FILENAME in sums:
            if not conf.is_file():
                problems.append(f"{layout.CONFIG_FILENAME}: missing (kdcache.sha256 records it)")
            elif file_sha256(conf) != sums[layout.CONFIG_FILENAME]:
                problems.append(self._relative(_damaged(conf)))
        try:
            self.index
        except KdError as e:
            problems.append(self._relative(str(e)))
        dtypes: dict[str, str] = {}
        for i, s in enumerate(self.shards):
            name = layout.shard_name(i)
            p = layout.shard_dir(self.path, i)
            try:
                if self.mirror is not None:  # the store's copy is checked: downloaded again, sha256 on arrival
                    if not self.mirror.committed(i):
                        problems.append(f"{name}: not committed")
                        continue
                    self.mirror.ensure(i, fresh=True)
                if not layout.is_committed(self.path, i):
                    problems.append(f"{name}: not committed")
                    continue
                rec = layout.read_commit(self.path, i)
                if rec.get("format_version") != FORMAT_VERSION:
                    problems.append(f"{name}: format {rec.get('format_version')}, not {FORMAT_VERSION}")
                    continue
                dtypes.setdefault(str(rec.get("dtype")), name)
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
                        if check_data:
                            self.shard_target_ids(i)
            except (CorruptionError, KdError) as e:
                problems.append(str(e) if str(e).startswith(name) else f"{name}: {e}")
            finally:
                if on_shard:
                    on_shard(i)
        if len(dtypes) > 1:
            problems.append(f"shards computed in different dtypes: {dtypes}")
        return problems + [f"{rel}: not a file of this cache (`kdcache teacher` did not write it)"
                           for rel in self.unknown_files(ignore)]

    def unknown_files(self, ignore: tuple[str, ...] = (layout.RECORDS_DIR,)) -> list[str]:
        """Files under the cache directory that are none of its own (relative POSIX paths; a foreign directory
        is named by its first file). Shards being written (tmp/shard_NNNNN.<token>/) are the writer's."""
        known = {layout.META_FILENAME, layout.CHECKSUMS_FILENAME, layout.INDEX_FILENAME, layout.CONFIG_FILENAME}
        planned = {layout.shard_name(i): i for i in range(len(self.shards))}
        if self.mirror is not None:
            from pipeline.cache.remote import unknown_objects

            return unknown_objects(self.mirror.store, planned, self._commit, ignore)
        out: list[str] = []
        for p in sorted(self.path.iterdir()):
            if p.name in ignore or (p.name in known and p.is_file() and not p.is_symlink()):
                continue
            if p.name == layout.SHARDS_DIR and p.is_dir() and not p.is_symlink():
                for d in sorted(p.iterdir()):
                    rel = f"{layout.SHARDS_DIR}/{d.name}"
                    if d.name not in planned or not d.is_dir() or d.is_symlink():
                        out.append(_first_file(d, rel))
                    elif (d / layout.COMMIT_FILENAME).is_file():
                        try:
                            listed = set(layout.read_commit(self.path, planned[d.name]).get("files") or ())
                        except KdError:
                            continue  # a damaged record: the shard's own problem line says so
                        listed.add(layout.COMMIT_FILENAME)
                        out += [f"{rel}/{f.relative_to(d).as_posix()}" for f in sorted(d.rglob("*"))
                                if not f.is_dir() and f.relative_to(d).as_posix() not in listed]
                    else:
                        out.append(_first_file(d, rel))
            elif p.name == layout.TMP_DIR and p.is_dir() and not p.is_symlink():
                out += [_first_file(d, f"{layout.TMP_DIR}/{d.name}") for d in sorted(p.iterdir())
                        if not layout.is_tmp_shard(d.name)]
            else:
                out.append(_first_file(p, p.name))
        return out

    def _relative(self, line: str) -> str:
        """A problem line naming a file by its full path, with the path made relative to the cache."""
        return line.replace(str(self.path) + "/", "", 1)


def _damaged(f: Path) -> str:
    return (f"{f} is damaged or was edited: its sha256 differs from the one {layout.CHECKSUMS_FILENAME} records "
            "(restore it, or rebuild the cache with `kdcache teacher` into a new --out)")


def _first_line(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _first_file(p: Path, rel: str) -> str:
    """`rel` for a file; for a directory, its first file (`sub/notes.txt`), or `rel/` when it holds none."""
    if p.is_symlink() or not p.is_dir():
        return rel
    for q in sorted(p.rglob("*")):
        if not q.is_dir():
            return f"{rel}/{q.relative_to(p).as_posix()}"
    return rel + "/"


def open_cache(path: str | Path, data: Any = None, strict: bool = True, local_cache: str | Path | None = None,
               local_cache_gb: float = 0.0, prefetch: int = 2) -> Cache:
    """Open a teacher cache directory or URL (a `KdError` if it is not one; a `CorruptionError` naming the file
    if kdcache.json or index.parquet fails its checksum). `data`: the prepared data (a directory or a
    `datasets.Dataset`) for target ids, when not at the path the cache records. `strict=False`: see `Cache`.
    `local_cache`, `local_cache_gb`, `prefetch`: how a cache on an object store is read (`Cache`), and a local
    directory copied from one as it is (its shards packed: `pipeline.cache.packing`)."""
    remote = dict(local_cache=local_cache, local_cache_gb=local_cache_gb, prefetch=prefetch)
    if is_url(path):
        return Cache(path, data, strict=strict, **remote)
    p = Path(path)
    if not p.is_dir():
        raise KdError(f"cache not found: {p}")
    if packing.holds_packed_shards(p):  # copied from an object store as it is: read as one, unpacked into a local copy
        return Cache(p.resolve().as_uri(), data, strict=strict, **remote)
    return Cache(p, data, strict=strict)
