"""Streaming the cache, joined to its sequences, as training micro-batches.

The unit of reading is a *block*: the examples whose first cache row falls in one Zarr chunk of
one shard, so each block is one contiguous row range that decodes from (about) one chunk. An
epoch's order is a pure function of (seed, epoch): blocks are permuted, then the examples of each
window of `buffer_blocks` consecutive blocks are shuffled together (the shuffle buffer). The
reader's position is therefore just (epoch, cursor), which every checkpoint stores; resuming
replays nothing and skips nothing.

Blocks are read and decoded on background threads (`prefetch` blocks ahead; zarr's blosc
decompression releases the GIL), so in steady state the student never waits on the disk.
Under DDP each rank takes every `world`-th block of the epoch's permutation (disjoint reads) and
all ranks stop at the same micro-batch count.
Without a cache (plain cross-entropy training) blocks are runs of `block_examples` examples.
"""

from __future__ import annotations

import math
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from pipeline.batching import pad_right, target_counts, target_positions
from pipeline.errors import KdError


@dataclass
class MicroBatch:
    """One micro-batch of whole sequences.

    input_ids [B, L] int64 (right-padded), attention_mask [B, L]; target positions as parallel
    vectors tgt_b [N], tgt_t [N] (position t is predicted from the hidden state at t - 1), ordered
    by sequence then position (the cache's row order); target_ids [N]; `cache` holds the cache
    rows of those N targets as tensors (topk_ids [N, K], topk_logprobs [N, K], entropy [N],
    log_partition [N, G], target_ids [N], ...) or is None without a cache; `examples` the dataset
    indices of the B sequences.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    tgt_b: torch.Tensor
    tgt_t: torch.Tensor
    target_ids: torch.Tensor
    cache: dict[str, torch.Tensor] | None
    examples: list[int]

    @property
    def num_targets(self) -> int:
        return int(self.tgt_b.numel())

    def to(self, device: torch.device) -> "MicroBatch":
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return MicroBatch(move(self.input_ids), move(self.attention_mask), move(self.tgt_b), move(self.tgt_t),
                          move(self.target_ids), {k: move(v) for k, v in self.cache.items()} if self.cache else None,
                          self.examples)


class CacheStream:
    """Deterministic, resumable micro-batches over prepared data and (optionally) its cache."""

    def __init__(self, data: Any, cache: Any | None, batch_size: int, seed: int = 0, shuffle: bool = True,
                 buffer_blocks: int = 8, prefetch: int = 4, threads: int = 2, rank: int = 0, world: int = 1,
                 block_examples: int = 256, fields: tuple[str, ...] | None = None):
        self.ids_col = data.data.column("input_ids")
        self.mask_col = data.data.column("loss_mask")
        self.n_examples = len(data)
        self.cache = cache
        self.batch_size = batch_size
        self.seed, self.shuffle, self.buffer_blocks = seed, shuffle, max(1, buffer_blocks)
        self.prefetch, self.threads, self.rank, self.world = max(1, prefetch), max(1, threads), rank, world
        self.epoch, self.cursor = 0, 0
        # Cache fields decoded per block (the loss's, by default); target_rank is always read: it
        # checks, per row, that the cache's head agrees with the data's next token.
        from pipeline.kd_loss import KD_FIELDS

        self.fields = tuple(dict.fromkeys((fields or KD_FIELDS) + ("target_rank",)))
        if cache is not None:
            cache.attach_data(data)  # target ids and the shards' alignment hashes come from this data
            idx = cache.index
            self.row_start = np.asarray(idx.column("row_start"), dtype=np.int64)
            self.row_count = np.asarray(idx.column("row_count"), dtype=np.int64)
            if len(self.row_start) != self.n_examples:
                raise KdError(f"the cache indexes {len(self.row_start)} examples but the data has {self.n_examples}")
            self.blocks = self._cache_blocks(cache)
        else:
            self.row_start = self.row_count = None
            self.blocks = [list(range(a, min(a + block_examples, self.n_examples)))
                           for a in range(0, self.n_examples, block_examples)]
        # Sequences without targets contribute nothing; dropping them keeps batch sizes honest.
        has_t = self._has_targets(data)
        self.blocks = [[e for e in b if has_t[e]] for b in self.blocks]
        self.blocks = [b for b in self.blocks if b]
        if not self.blocks:
            raise KdError("no example with a target position to train on")
        if self.batches_in_epoch(0) == 0:
            raise KdError(f"fewer examples per rank than --batch-size {batch_size}")

    # ---- planning -------------------------------------------------------------------------
    def _has_targets(self, data: Any) -> np.ndarray:
        if self.row_count is not None:
            return self.row_count > 0
        return target_counts(data)[0] > 0

    def _cache_blocks(self, cache: Any) -> list[list[int]]:
        chunk = cache.chunk_rows
        shard_start = np.asarray([s["row_start"] for s in cache.shards], dtype=np.int64)
        shard_of = np.searchsorted(shard_start, self.row_start, side="right") - 1
        key = shard_of * (1 << 32) + (self.row_start - shard_start[shard_of]) // chunk
        blocks: dict[int, list[int]] = {}
        for e, k in enumerate(key.tolist()):
            blocks.setdefault(k, []).append(e)
        return [blocks[k] for k in sorted(blocks)]

    def epoch_order(self, epoch: int) -> list[tuple[list[list[int]], list[int]]]:
        """This rank's reading plan for `epoch`: windows of (blocks to read, examples in order)."""
        n = len(self.blocks)
        rng = np.random.default_rng([self.seed, epoch])
        perm = rng.permutation(n) if self.shuffle else np.arange(n)
        mine = [self.blocks[j] for i, j in enumerate(perm.tolist()) if i % self.world == self.rank]
        if not self.shuffle:
            return [([b], list(b)) for b in mine]
        out = []
        for w in range(0, len(mine), self.buffer_blocks):
            window = mine[w: w + self.buffer_blocks]
            flat = np.concatenate([np.asarray(b) for b in window])
            rng.shuffle(flat)
            out.append((window, flat.tolist()))
        return out

    def batches_in_epoch(self, epoch: int) -> int:
        """Micro-batches this epoch yields; under DDP the same on every rank (the smallest share)."""
        n = len(self.blocks)
        rng = np.random.default_rng([self.seed, epoch])
        perm = rng.permutation(n) if self.shuffle else np.arange(n)
        share = [0] * self.world
        for i, j in enumerate(perm.tolist()):
            share[i % self.world] += len(self.blocks[j])
        if self.world == 1:
            return math.ceil(share[0] / self.batch_size)
        return min(share) // self.batch_size

    # ---- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "world": self.world}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("seed") != self.seed or state.get("world") != self.world:
            raise KdError(f"checkpoint reader state was made with seed {state.get('seed')} and {state.get('world')} "
                          f"rank(s); this run has seed {self.seed} and {self.world}")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])

    # ---- reading --------------------------------------------------------------------------
    def read_block(self, block: list[int]) -> dict[int, dict[str, np.ndarray]]:
        """Cache rows of the examples of one block, keyed by example (one contiguous read).

        Public because `pipeline.kd_dataset.KDIterableDataset` reads through it, in this stream's order."""
        if self.cache is None:
            return {}
        a = int(self.row_start[block].min())
        b = int((self.row_start[block] + self.row_count[block]).max())
        # A block lies in one shard; the first read of a shard checks its alignment hash against this data.
        self.cache.shard_target_ids(self.cache.shard_of_row(a))
        rows = self.cache.read(a, b, self.fields)
        return {e: {k: v[self.row_start[e] - a: self.row_start[e] - a + self.row_count[e]] for k, v in rows.items()}
                for e in block}

    def __iter__(self) -> Iterator[MicroBatch]:
        """Micro-batches from the current position on, forever (epoch after epoch)."""
        pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="kdcache-read")
        try:
            while True:
                yield from self._epoch(pool)
                self.epoch += 1
                self.cursor = 0
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _epoch(self, pool: ThreadPoolExecutor) -> Iterator[MicroBatch]:
        windows = self.epoch_order(self.epoch)
        limit = self.batches_in_epoch(self.epoch) * self.batch_size
        # Flatten (window blocks, example order) while tracking which window an example needs.
        sequence: list[tuple[int, int]] = []  # (window index, example)
        for w, (_, examples) in enumerate(windows):
            sequence.extend((w, e) for e in examples)
        sequence = sequence[:limit] if self.world > 1 else sequence
        pending: deque = deque()
        loaded: dict[int, dict[int, dict[str, np.ndarray]]] = {}
        next_w = sequence[self.cursor][0] if self.cursor < len(sequence) else len(windows)

        def submit_until(w_needed: int) -> None:
            nonlocal next_w
            while next_w < len(windows) and (next_w <= w_needed or len(pending) < self.prefetch):
                blocks = windows[next_w][0]
                pending.append((next_w, [pool.submit(self.read_block, b) for b in blocks]))
                next_w += 1

        while self.cursor < len(sequence):
            chunk = sequence[self.cursor: self.cursor + self.batch_size]
            need = chunk[-1][0]
            submit_until(need)
            while pending and pending[0][0] <= need:
                w, futs = pending.popleft()
                merged: dict[int, dict[str, np.ndarray]] = {}
                for f in futs:
                    merged.update(f.result())
                loaded[w] = merged
            submit_until(need)
            rows = [loaded[w].get(e) for w, e in chunk] if self.cache is not None else None
            batch = self._collate([e for _, e in chunk], rows)
            for w in [w for w in loaded if w < chunk[0][0]]:
                del loaded[w]
            self.cursor += len(chunk)
            yield batch

    def _collate(self, examples: list[int], rows: list[dict[str, np.ndarray]] | None) -> MicroBatch:
        seqs = [np.asarray(self.ids_col[e].values, dtype=np.int64) for e in examples]
        targets = [target_positions(self.mask_col[e].values) for e in examples]
        ids, att = pad_right(seqs)
        tgt_b = np.concatenate([np.full(len(t), b) for b, t in enumerate(targets)])
        tgt_t = np.concatenate(targets)
        target_ids = ids[tgt_b, tgt_t]
        cache = None
        if rows is not None:
            cache = {k: torch.from_numpy(np.concatenate([r[k] for r in rows])) for k in rows[0]}
            rank = cache.pop("target_rank")
            in_head = rank >= 0
            head_id = cache["topk_ids"].gather(1, rank.clamp(min=0)[:, None]).squeeze(1)
            if not bool((head_id[in_head] == torch.from_numpy(target_ids)[in_head]).all()):
                row = int(((head_id != torch.from_numpy(target_ids)) & in_head).nonzero()[0, 0])
                bad = examples[int(tgt_b[row])]
                raise KdError(f"cache rows of example {bad} do not match its tokens: the cache was made from "
                              "other data (check --data)")
        return MicroBatch(torch.from_numpy(ids), torch.from_numpy(att), torch.from_numpy(tgt_b),
                          torch.from_numpy(tgt_t), torch.from_numpy(target_ids), cache, examples)
