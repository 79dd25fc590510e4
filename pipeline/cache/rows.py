"""Which positions of the prepared data are cache rows, and the hash that ties a shard to them.

Row r of a cache is the r-th target position of the prepared dataset, in dataset order then position
order; position t (t >= 1) of an example is a target when `loss_mask[t] != 0` (docs/cache-format.md,
"Rows"). Everything here reads a prepared `datasets.Dataset` (columns `input_ids` and `loss_mask`)
through Arrow; the cache never imports the data stage that made it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipeline.errors import KdError


def target_positions(loss_mask: Sequence[int] | np.ndarray) -> np.ndarray:
    """Target positions of one example: t >= 1 with loss_mask[t] != 0 (token t is predicted from the
    tokens before it, so position 0 is never a target). The cache holds one row per such t, in order."""
    m = np.asarray(loss_mask)
    return np.nonzero(m[1:])[0] + 1


def target_counts(ds: Any) -> tuple[np.ndarray, np.ndarray]:
    """(targets per example, length per example) of a prepared dataset, via Arrow (no Python loop).

    A target is a position t >= 1 with loss_mask[t] != 0; empty examples have 0 of both.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    col = ds.with_format("arrow")["loss_mask"]  # respects a select() view, unlike ds.data
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks else pa.array([], type=pa.list_(pa.int8()))
    lengths = np.asarray(pc.list_value_length(col).fill_null(0), dtype=np.int64)
    flat = np.asarray(pc.list_flatten(col)) != 0  # relative to the (possibly sliced) array, as lengths are
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    cs = np.concatenate([[0], np.cumsum(flat, dtype=np.int64)])
    first = np.zeros(len(lengths), dtype=np.int64)
    nonempty = lengths > 0
    first[nonempty] = flat[offsets[:-1][nonempty]]
    return cs[offsets[1:]] - cs[offsets[:-1]] - first, lengths


def target_ids_of(ds: Any, start: int, stop: int) -> np.ndarray:
    """Target ids of examples [start, stop) of a prepared dataset, in cache row order (example, then
    position): the tokens at positions t >= 1 with loss_mask[t] != 0. Vectorised through Arrow."""
    import pyarrow as pa
    import pyarrow.compute as pc

    view = ds.select(range(start, stop)).with_format("arrow")
    ids, mask = view["input_ids"], view["loss_mask"]
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks() if ids.num_chunks else pa.array([], type=pa.list_(pa.int64()))
        mask = mask.combine_chunks() if mask.num_chunks else pa.array([], type=pa.list_(pa.int8()))
    lengths = np.asarray(pc.list_value_length(ids).fill_null(0), dtype=np.int64)
    flat_ids = np.asarray(pc.list_flatten(ids), dtype=np.int64)
    flat_mask = np.asarray(pc.list_flatten(mask)) != 0
    first = np.zeros(len(flat_ids), dtype=bool)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    first[starts[lengths > 0]] = True  # position 0 of each example has no context: never a target
    return flat_ids[flat_mask & ~first]


def targets_sha256(target_ids: np.ndarray) -> str:
    """The alignment hash of a shard: sha256 of its rows' target ids as little-endian int64, in row order.

    Target ids are not stored (they are the prepared data's tokens); a reader recomputes this from the
    data it is given and refuses data that is not the data the shard was computed from.
    """
    return hashlib.sha256(np.ascontiguousarray(target_ids, dtype="<i8").tobytes()).hexdigest()


def load_dataset_dir(path: str | Path) -> Any:
    """The `datasets.Dataset` saved at `path` (a prepared-data directory), or a one-line `KdError` naming
    the path when it is missing or unreadable."""
    p = Path(path)
    if not p.is_dir():
        raise KdError(f"prepared data not found: {p}")
    import datasets

    datasets.disable_progress_bars()
    try:
        return datasets.load_from_disk(str(p))
    except Exception as e:  # an empty or damaged Arrow directory fails deep inside datasets
        msg = str(e).splitlines()[0] if str(e) else ""
        raise KdError(f"cannot load prepared data {p}: {type(e).__name__}: {msg}") from None
