"""Streaming the cache, joined to its sequences, as training micro-batches.

The unit of reading is a *block*: a run of consecutive examples cut from the prepared data alone
(`epoch_plan.data_blocks`, a grid of target rows), so each block is one contiguous row range of any cache
of that data; with a cache of `kdcache teacher`'s default chunking it is exactly one Zarr chunk of one
shard. What an epoch reads, in which order and cut into which micro-batches is `pipeline.data.epoch_plan`
(blocks permuted, windows of `buffer_blocks` blocks shuffled together, fixed-size or token-budget
batches): a pure function of (the data, the batch settings, seed, epoch), the same with or without a
cache and whichever cache, so a CE-only student and every distilled one of a seed read the same
micro-batches in the same order (tests/training/test_same_batches.py). The reader's position is just
(epoch, cursor), which every checkpoint stores; resuming replays nothing and skips nothing.

Each window is one task on a pool of `threads` threads, `prefetch` windows ahead: read its blocks
(`Cache.read`: zarr-free chunk reads, crc-checked, decoded to float32), then collate every
micro-batch that ends in it (numpy gathers over views of the memory-mapped data, no per-example
Python), so the training loop only takes finished batches. Measured with bench/reader.py (K = 8,
280k rows, micro-batches of ~8k tokens, one thread, 2-core VM shared with other jobs): 3.3-3.8M
rows/s end to end, 3.6x the former reader in the same process (0.9M).

Under DDP each rank takes every `world`-th block of the epoch's order (disjoint reads) and all ranks
stop at the same micro-batch count. Without a cache (plain cross-entropy training) the blocks and the
plan are the same; only the rows are not read.

`follow=True` (`kdcache train --follow`) trains while the teacher is still writing the cache: epoch 0
goes shard by shard in shard order (the plan's grid of shards: contiguous example ranges, as a cache's
shards are), and each cache shard is read only once its commit record exists
(`Cache.wait_committed`, up to `follow_timeout` seconds per shard), so an uncommitted shard is never
opened. The plan does not depend on when shards were committed: a run that followed the teacher and
one started on the finished cache train on the same batches, and resume stays exact.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from pipeline.cache.rows import target_counts
from pipeline.data.epoch_plan import (PLAN_VERSION, EpochPlan, PlanSettings, batches_in_epoch, block_grid, data_blocks,
                                      legacy_blocks, plan_epoch)
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


@dataclass
class _Window:
    """What a window's task produced: its micro-batches (by index in the plan) and, when a later batch
    straddles into the next window (batch_size plans only), its decoded rows for that batch."""

    batches: dict[int, MicroBatch]
    rows: "_Rows | None"


@dataclass
class _Rows:
    """Decoded cache rows of a window: fields [n, ...] and each example's first row in them."""

    examples: np.ndarray  # sorted example indices
    first: np.ndarray  # row offset of each, aligned with `examples`
    fields: dict[str, np.ndarray]


def _ragged_arange(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """concatenate([arange(s, s + c) for s, c in zip(starts, counts)]) without a Python loop."""
    return np.repeat(starts - (np.cumsum(counts) - counts), counts) + np.arange(int(counts.sum()))


class _Ragged:
    """A list column of the prepared data (memory-mapped Arrow) as numpy views of each chunk's offsets and
    values, so that a micro-batch's sequences are gathered by numpy indexing: `ChunkedArray.take` cost
    0.36 ms per call (6% of the stream's time on bench/reader.py)."""

    def __init__(self, col: Any):
        chunks = col.chunks
        self.bounds = np.cumsum([0] + [len(c) for c in chunks])
        self.offsets = [np.asarray(c.offsets) for c in chunks]  # indices into c.values (zero-copy views)
        self.values = [np.asarray(c.values) for c in chunks]

    def take(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(the values of `rows`, concatenated in order [sum of lengths]; their lengths [len(rows)])."""
        chunk = np.searchsorted(self.bounds, rows, side="right") - 1
        local = rows - self.bounds[chunk]
        start, lens = np.empty(len(rows), np.int64), np.empty(len(rows), np.int64)
        groups = [(c, chunk == c) for c in np.unique(chunk).tolist()]
        for c, sel in groups:
            off = self.offsets[c]
            start[sel] = off[local[sel]]
            lens[sel] = off[local[sel] + 1] - start[sel]
        out = np.empty(int(lens.sum()), dtype=self.values[0].dtype)
        first = np.cumsum(lens) - lens
        for c, sel in groups:
            out[_ragged_arange(first[sel], lens[sel])] = self.values[c][_ragged_arange(start[sel], lens[sel])]
        return out, lens


class CacheStream:
    """Deterministic, resumable micro-batches over prepared data and (optionally) its cache."""

    def __init__(self, data: Any, cache: Any | None, batch_size: int, seed: int = 0, shuffle: bool = True,
                 buffer_blocks: int = 8, prefetch: int = 2, threads: int = 2, rank: int = 0, world: int = 1,
                 fields: tuple[str, ...] | None = None, batch_tokens: int = 0,
                 follow: bool = False, follow_timeout: float = 3600.0, poll_seconds: float = 1.0):
        self.ids_col = _Ragged(data.data.column("input_ids"))  # views of the memory-mapped Arrow data
        self.mask_col = _Ragged(data.data.column("loss_mask"))
        self.n_examples = len(data)
        self.cache = cache
        self.batch_size = batch_size
        self.plan_settings = PlanSettings(batch_size=batch_size, batch_tokens=batch_tokens, seed=seed, shuffle=shuffle,
                                          buffer_blocks=buffer_blocks, follow=follow and cache is not None)
        self.seed, self.shuffle = seed, shuffle
        self.prefetch, self.threads, self.rank, self.world = max(1, prefetch), max(1, threads), rank, world
        self.follow, self.follow_timeout, self.poll_seconds = follow and cache is not None, follow_timeout, poll_seconds
        self.epoch, self.cursor = 0, 0
        # Cache fields decoded per block (the loss's, by default); target_rank is always read: it
        # checks, per row, that the cache's head agrees with the data's next token.
        from pipeline.losses.objective import KD_FIELDS

        self.fields = tuple(dict.fromkeys((fields or KD_FIELDS) + ("target_rank",)))
        self.n_targets, self.lengths = target_counts(data)
        if cache is not None:
            cache.attach_data(data)  # target ids and the shards' alignment hashes come from this data
            idx = cache.index
            self.row_start = np.asarray(idx.column("row_start"), dtype=np.int64)
            self.row_count = np.asarray(idx.column("row_count"), dtype=np.int64)
            if len(self.row_start) != self.n_examples:
                raise KdError(f"the cache indexes {len(self.row_start)} examples but the data has {self.n_examples}")
            if not np.array_equal(self.row_count, self.n_targets):
                e = int(np.argmax(self.row_count != self.n_targets))
                raise KdError(f"the cache holds {self.row_count[e]} rows for example {e}, which has "
                              f"{self.n_targets[e]} targets: the cache was made from other data (check --data)")
        else:
            self.row_start = self.row_count = None
        # The plan's blocks come from the data alone (examples without targets in none): the same plan with
        # or without a cache, and whichever cache (`pipeline.data.epoch_plan`).
        self.blocks, self.block_shards = data_blocks(self.n_targets)
        if not self.blocks:
            raise KdError("no example with a target position to train on")
        self._plans: dict[int, EpochPlan] = {}
        self._counts: dict[int, int] = {}
        self._ready: set[int] = set()  # shards whose commit and alignment hash were checked
        self._ready_lock = threading.Lock()
        self._closed = threading.Event()
        if self.batches_in_epoch(0) == 0:
            if self.world > 1 and len(self.blocks) < self.world:
                # Ranks split the data by whole blocks (each rank decodes only its own rows).
                rows = block_grid(int(self.n_targets.sum()))[0]
                raise KdError(f"{self.world} ranks but the data is {len(self.blocks)} block(s) (of {rows} target rows; "
                              "each rank reads whole blocks, so a rank got none): use fewer ranks")
            raise KdError(f"fewer examples per rank than --batch-size {batch_size}: lower --batch-size "
                          f"({self.n_examples} examples over {self.world} rank(s))")

    # ---- planning -------------------------------------------------------------------------
    def plan(self, epoch: int) -> EpochPlan:
        """This rank's plan of `epoch` (`pipeline.data.epoch_plan`), cut to `batches_in_epoch` micro-batches."""
        if epoch not in self._plans:
            p = plan_epoch(self.blocks, self.block_shards, self.lengths, self.plan_settings, epoch, self.rank,
                           self.world)
            n = self.batches_in_epoch(epoch)
            self._plans = {epoch: EpochPlan(p.windows, p.batches[:n], p.spans[:n], p.starts[: n + 1])}
        return self._plans[epoch]

    def batches_in_epoch(self, epoch: int) -> int:
        """Micro-batches this epoch yields; under DDP the same on every rank (the smallest share)."""
        if epoch not in self._counts:
            self._counts[epoch] = batches_in_epoch(self.blocks, self.block_shards, self.lengths, self.plan_settings,
                                                   epoch, self.world)
        return self._counts[epoch]

    # ---- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        s = self.plan_settings
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "world": self.world,
                "batch_tokens": s.batch_tokens, "follow": s.follow, "plan": PLAN_VERSION}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("seed") != self.seed or state.get("world") != self.world:
            raise KdError(f"checkpoint reader state was made with seed {state.get('seed')} and {state.get('world')} "
                          f"rank(s); this run has seed {self.seed} and {self.world}")
        s = self.plan_settings
        if (state.get("batch_tokens", 0), state.get("follow", False)) != (s.batch_tokens, s.follow):
            raise KdError(f"checkpoint reader state was made with batch_tokens {state.get('batch_tokens', 0)} and "
                          f"follow {state.get('follow', False)}; this run has {s.batch_tokens} and {s.follow}: "
                          "the epoch's order differs, resume with the checkpoint's settings")
        if state.get("plan", 1) != PLAN_VERSION and not self._same_as_legacy():
            before = "the cache's chunks" if self.cache is not None else "runs of 256 examples"
            raise KdError(f"checkpoint reader state was made by an earlier kdcache, whose epoch plan cut this data "
                          f"into other blocks ({before}; now a grid of the data's own target rows, the same with "
                          "or without a cache): continuing would repeat some examples and skip others; retrain "
                          "from scratch (--overwrite)")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        plan = self.plan(self.epoch)
        if self.cursor < plan.starts[-1]:
            plan.batch_at(self.cursor)  # refuses a position that is not a micro-batch start of this plan

    def _same_as_legacy(self) -> bool:
        """Whether plan version 1 (`epoch_plan.legacy_blocks`) cut this data into the blocks it has now: true
        for a cache made with `kdcache teacher`'s default chunking over data of 64 blocks or more."""
        layout = None
        if self.cache is not None:
            layout = (self.row_start, np.asarray([s["row_start"] for s in self.cache.shards], dtype=np.int64),
                      self.cache.chunk_rows)
        blocks, shards = legacy_blocks(self.n_targets, layout)
        return (len(blocks) == len(self.blocks) and all(np.array_equal(a, b) for a, b in zip(blocks, self.blocks))
                and (not self.plan_settings.follow or np.array_equal(shards, self.block_shards)))

    # ---- iterating ------------------------------------------------------------------------
    def __iter__(self) -> Iterator[MicroBatch]:
        """Micro-batches from the current position on, forever (epoch after epoch)."""
        pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="kdcache-read")
        self._closed.clear()
        try:
            while True:
                yield from self._epoch(pool)
                self.epoch += 1
                self.cursor = 0
        finally:
            self._closed.set()  # a task waiting for a shard gives up at its next poll
            pool.shutdown(wait=False, cancel_futures=True)

    def _epoch(self, pool: ThreadPoolExecutor) -> Iterator[MicroBatch]:
        plan = self.plan(self.epoch)
        n = len(plan.batches)
        if self.cursor >= plan.starts[-1]:
            return
        i = plan.batch_at(self.cursor)
        first, last = plan.spans[i][0], plan.spans[-1][1]
        if self.cache is not None:  # a remote cache downloads shards ahead in the order this epoch reads them
            self.cache.prefetch_order(self.shard_order(plan, range(first, last + 1)))
        ending: dict[int, list[int]] = {}  # window -> the batches (from i on) that end in it
        keep_rows = set()  # windows whose rows a batch ending in a later window needs
        for j in range(i, n):
            ending.setdefault(plan.spans[j][1], []).append(j)
            keep_rows.update(range(plan.spans[j][0], plan.spans[j][1]))
        futures: dict[int, Future] = {}
        nxt = first

        def submit_until(w_needed: int) -> None:
            nonlocal nxt
            while nxt <= last and (nxt <= w_needed or nxt - w_needed <= self.prefetch):
                futures[nxt] = pool.submit(self._window_task, plan, nxt, ending.get(nxt, []), nxt in keep_rows,
                                           dict(futures))
                nxt += 1

        for j in range(i, n):
            w0, w1 = plan.spans[j]
            submit_until(w1)
            batch = futures[w1].result().batches.pop(j)
            for w in [w for w in futures if w < w0]:
                del futures[w]  # a task that still needs one holds its own reference
            self.cursor = int(plan.starts[j + 1])
            yield batch

    def shard_order(self, plan: EpochPlan, windows: Iterable[int]) -> list[int]:
        """The cache shards the windows `windows` of `plan` read, in that order, in order of first use (what a
        remote cache downloads ahead: `Cache.prefetch_order`)."""
        order: dict[int, None] = {}
        for w in windows:
            for block in plan.windows[w]:
                a = int(self.row_start[block[0]])
                b = int(self.row_start[block[-1]] + self.row_count[block[-1]])
                for shard in range(self.cache.shard_of_row(a), self.cache.shard_of_row(max(a, b - 1)) + 1):
                    order.setdefault(shard)
        return list(order)

    # ---- one window (on a pool thread) ------------------------------------------------------
    def _window_task(self, plan: EpochPlan, w: int, mine: list[int], keep_rows: bool,
                     earlier: dict[int, Future]) -> _Window:
        """Read window `w`'s blocks and collate batches `mine` (those that end in it); a batch that starts
        in an earlier window takes those rows from `earlier` (submitted first: FIFO, no deadlock). The
        rows are kept in the result only when `keep_rows` (a later batch starts in this window)."""
        rows = self._read_window(plan.windows[w]) if self.cache is not None else None
        out = {}
        for j in mine:
            parts = [earlier[x].result().rows for x in range(plan.spans[j][0], w)]
            out[j] = self._collate(plan.batches[j], parts + [rows] if rows is not None else None)
        return _Window(out, rows if keep_rows else None)

    def _read_window(self, blocks: list[np.ndarray]) -> _Rows:
        """Decoded cache rows of a window's blocks, concatenated (one contiguous read per block)."""
        parts, examples, firsts, offset = [], [], [], 0
        for block in blocks:
            a = int(self.row_start[block[0]])
            b = int(self.row_start[block[-1]] + self.row_count[block[-1]])
            for shard in range(self.cache.shard_of_row(a), self.cache.shard_of_row(b - 1) + 1):
                self._check_shard(shard)  # a block spans two shards of a cache chunked otherwise than the grid
            # topk_ids stay as stored (uint16/uint32) until a batch is gathered: widening them to int64 once,
            # per batch, instead of per block and then copying the wide rows, takes 14% off a window at K = 32
            # (3% at K = 8; in-process A/B on the bench/reader.py caches).
            rows = self.cache.read(a, b, tuple(f for f in self.fields if f != "topk_ids"))
            if "topk_ids" in self.fields:
                rows["topk_ids"] = self.cache.read_raw(a, b, ("topk_ids",))["topk_ids"]
            parts.append(rows)
            examples.append(block)
            firsts.append(self.row_start[block] - a + offset)
            offset += b - a
        ex, first = np.concatenate(examples), np.concatenate(firsts)
        order = np.argsort(ex)
        fields = {k: np.concatenate([p[k] for p in parts]) if len(parts) > 1 else parts[0][k] for k in parts[0]}
        return _Rows(ex[order], first[order], fields)

    def read_examples(self, blocks: list[np.ndarray]) -> dict[int, dict[str, np.ndarray]]:
        """The decoded cache rows of the examples of `blocks`, keyed by example (ids int64): the reader of
        `pipeline.interop.datasets.KDIterableDataset`, which walks this stream's plan one example at a time."""
        if self.cache is None:
            return {}
        rows = self._read_window(blocks)
        out = {}
        for e, first in zip(rows.examples.tolist(), rows.first.tolist()):
            n = int(self.row_count[e])
            out[e] = {k: (v[first: first + n].astype(np.int64) if k == "topk_ids" else v[first: first + n])
                      for k, v in rows.fields.items()}
        return out

    def _check_shard(self, shard: int) -> None:
        """Before a shard's first read: with `follow`, wait for its commit; then check its alignment hash."""
        with self._ready_lock:
            if shard in self._ready:
                return
        if self.follow:
            self.cache.wait_committed(shard, self.follow_timeout, self.poll_seconds, self._closed)
        self.cache.shard_target_ids(shard)  # the first read of a shard checks its alignment hash against the data
        with self._ready_lock:
            self._ready.add(shard)

    def _collate(self, examples: np.ndarray, parts: list[_Rows] | None) -> MicroBatch:
        """Pad the sequences of `examples` and gather their cache rows from `parts` (in window order)."""
        flat_ids, lens = self.ids_col.take(examples)
        flat_mask = self.mask_col.take(examples)[0] != 0
        b = np.repeat(np.arange(len(examples)), lens)
        t = np.arange(len(flat_ids)) - np.repeat(np.cumsum(lens) - lens, lens)
        ids = np.zeros((len(examples), int(lens.max())), np.int64)
        att = np.zeros_like(ids)
        ids[b, t] = flat_ids  # int32 in the data
        att[b, t] = 1
        target = flat_mask & (t >= 1)  # position 0 has no context: never a target (batching.target_positions)
        tgt_b, tgt_t, target_ids = b[target], t[target], flat_ids[target].astype(np.int64)
        cache = None
        if parts is not None:
            cache = self._gather(examples, parts)
            assert len(cache["target_rank"]) == len(target_ids), "cache rows and data targets disagree"
            rank = cache.pop("target_rank")
            in_head = rank >= 0
            head_id = np.take_along_axis(cache["topk_ids"], np.maximum(rank, 0)[:, None], 1)[:, 0]
            bad = in_head & (head_id != target_ids)
            if bad.any():
                e = int(examples[tgt_b[int(np.argmax(bad))]])
                raise KdError(f"cache rows of example {e} do not match its tokens: the cache was made from "
                              "other data (check --data)")
            cache = {k: torch.from_numpy(v) for k, v in cache.items()}
        return MicroBatch(torch.from_numpy(ids), torch.from_numpy(att), torch.from_numpy(tgt_b),
                          torch.from_numpy(tgt_t), torch.from_numpy(target_ids), cache, examples.tolist())

    def _gather(self, examples: np.ndarray, parts: list[_Rows]) -> dict[str, np.ndarray]:
        """Rows of `examples`, in order, from the windows in `parts` (a batch's examples are grouped by
        window, in window order: it takes a window's last examples and the next one's first)."""
        out = []
        for p in parts:
            pos = np.minimum(np.searchsorted(p.examples, examples), len(p.examples) - 1)
            here = p.examples[pos] == examples
            if not here.any():
                continue
            idx = _ragged_arange(p.first[pos[here]], self.row_count[examples[here]])
            out.append({k: np.take(v, idx, axis=0).astype(np.int64) if k == "topk_ids" else np.take(v, idx, axis=0)
                        for k, v in p.fields.items()})
        if len(out) == 1:
            return out[0]
        return {k: np.concatenate([o[k] for o in out]) for k in out[0]}
