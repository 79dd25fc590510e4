"""Token-budget batches with length bucketing.

Examples are sorted by length and packed greedily so that `longest x count <= batch_tokens`:
padding waste stays small (similar lengths share a batch) and memory is bounded by the budget,
not by a fixed batch size that the longest example would blow up.
"""

from __future__ import annotations

from typing import Sequence

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


def pad_right(seqs: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token sequences: (input_ids [B, L] int64 padded with 0, attention_mask [B, L] int64)."""
    width = max(len(s) for s in seqs)
    ids = np.zeros((len(seqs), width), np.int64)
    att = np.zeros((len(seqs), width), np.int64)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = s
        att[b, : len(s)] = 1
    return ids, att
