"""Token-budget batches with length bucketing.

Examples are sorted by length and packed greedily so that `longest x count <= batch_tokens`:
padding waste stays small (similar lengths share a batch) and memory is bounded by the budget,
not by a fixed batch size that the longest example would blow up.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def token_budget_batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Group indices of `lengths` into batches whose padded size is at most `batch_tokens`.

    An example longer than the budget gets a batch of its own. Deterministic: ties in length keep
    index order, so the same inputs always give the same batches (and the same numerics).
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    longest = 0
    for i in order:
        new_longest = max(longest, lengths[i])
        if cur and new_longest * (len(cur) + 1) > batch_tokens:
            batches.append(cur)
            cur, new_longest = [], lengths[i]
        cur.append(i)
        longest = new_longest
    if cur:
        batches.append(cur)
    return batches


def target_positions(loss_mask: Sequence[int] | np.ndarray) -> np.ndarray:
    """Target positions of one example: t >= 1 with loss_mask[t] != 0 (token t is predicted from the
    tokens before it, so position 0 is never a target). The cache holds one row per such t, in order."""
    m = np.asarray(loss_mask)
    return np.nonzero(m[1:])[0] + 1


def pad_right(seqs: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token sequences: (input_ids [B, L] int64 padded with 0, attention_mask [B, L] int64)."""
    width = max(len(s) for s in seqs)
    ids = np.zeros((len(seqs), width), np.int64)
    att = np.zeros((len(seqs), width), np.int64)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = s
        att[b, : len(s)] = 1
    return ids, att


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
