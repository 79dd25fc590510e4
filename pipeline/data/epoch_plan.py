"""The reading plan of one epoch: which blocks a rank reads, grouped into windows, cut into micro-batches.

A plan is a pure function of (the blocks, the examples' lengths, `PlanSettings`, epoch, rank, world),
so a reader's position is just (epoch, cursor = examples consumed so far this epoch), and resuming
replays nothing and skips nothing. The blocks come from the prepared data alone (`data_blocks`: runs of
consecutive examples cut on a grid of target rows), never from a cache: for one seed and one set of batch
settings, a student trained on cross-entropy without a cache, one that reads a cache for CE only and every
distilled one (from any cache of that data) read the same examples in the same micro-batches in the same
order. The grid is the one a cache made with `kdcache teacher`'s default --shard-rows and --chunk-rows has,
so with such a cache each block is one chunk of rows to decode (any other cache reads the same rows, a block
then spanning parts of two chunks). The steps:

1. Block order: a permutation of the blocks drawn from `default_rng([seed, epoch])`. With `follow`,
   epoch 0 is *shard-major* instead (the grid's shards in order, each shard's blocks permuted; a cache's
   shards are contiguous example ranges in the same order): the run can start before the teacher has
   finished, reading each cache shard once it is committed, and the order still does not depend on when
   shards were committed (`pipeline.data.stream`).
2. Ranks: block i of that order goes to rank i % world (disjoint reads).
3. Windows: `buffer_blocks` consecutive blocks of a rank (never two of the grid's shards in one with
   `follow`'s epoch 0); the examples of a window are shuffled together (the shuffle buffer).
4. Micro-batches, one of two ways:
   - `batch_tokens = 0`: the shuffled examples, concatenated across windows, cut every `batch_size`
     (the original plan, kept as it was so older checkpoints resume exactly).
   - `batch_tokens > 0`: length bucketing inside each window: its examples sorted longest first (ties in
     shuffled order) and cut greedily so that count x longest <= batch_tokens (an example longer than the
     budget is a batch of its own), then the window's batches shuffled. Padding at the same tokens per
     micro-batch (bench/padding.py): demo corpus 48.5% (64 sequences) -> 0.7% (1,100 tokens); stdlib
     real text 46.0% (16 sequences) -> 2.2% (1,645 tokens), 39.0% (8) -> 1.0% (823). It grows when a
     window holds few examples per length range (uniform lengths 32-512, 240 per window: 10.6%).
Under DDP every rank takes the same number of micro-batches: the smallest rank's (`batches_in_epoch`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.errors import KdError

# The block grid: `kdcache teacher`'s default --chunk-rows and --shard-rows (tests/training/test_same_batches.py
# checks they still are), halved together while the data has fewer than MIN_BLOCKS blocks (small data:
# enough blocks to shuffle, and to give every DDP rank some).
BLOCK_ROWS = 8192
BLOCK_SHARD_ROWS = 65536
MIN_BLOCKS = 64
# Version of the plan in a reader's checkpoint state: 2 = blocks from the data (`data_blocks`); before, a
# cache's chunks, or runs of 256 examples without a cache (`legacy_blocks`).
PLAN_VERSION = 2


@dataclass(frozen=True)
class PlanSettings:
    """How an epoch is planned (the reader's part of `TrainConfig`)."""

    batch_size: int = 8  # sequences per micro-batch when batch_tokens = 0
    batch_tokens: int = 0  # > 0: padded tokens per micro-batch, length-bucketed within each window
    seed: int = 0
    shuffle: bool = True
    buffer_blocks: int = 8  # blocks whose examples are shuffled (and bucketed) together
    follow: bool = False  # epoch 0 shard by shard, in shard order

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.batch_tokens < 0 or self.buffer_blocks < 1:
            raise KdError(f"batch_size and buffer_blocks must be >= 1 and batch_tokens >= 0, got {self.batch_size}, "
                          f"{self.buffer_blocks} and {self.batch_tokens}")


@dataclass
class EpochPlan:
    """One rank's plan of one epoch.

    windows[w]: the blocks (arrays of example indices) read together; batches[i]: the examples of
    micro-batch i [B] int64, in order; spans[i] = (first, last) window holding its examples' rows
    (first < last only with batch_tokens = 0, where a batch may straddle windows); starts[i]: examples
    consumed before batch i (the reader's cursor there); starts[-1] is the epoch's total.
    """

    windows: list[list[np.ndarray]]
    batches: list[np.ndarray]
    spans: list[tuple[int, int]]
    starts: np.ndarray

    def batch_at(self, cursor: int) -> int:
        """Index of the micro-batch that starts at `cursor` examples into the epoch."""
        i = int(np.searchsorted(self.starts, cursor))
        if i >= len(self.starts) or self.starts[i] != cursor:
            raise KdError(f"the reader position ({cursor} examples into the epoch) is not the start of a "
                          "micro-batch of this run's plan: were batch_size/batch_tokens changed? resume with the "
                          "settings the checkpoint was made with")
        return i


def block_grid(total_rows: int) -> tuple[int, int]:
    """(rows per block, rows per shard) of the plan's grid for data of `total_rows` target rows."""
    block, shard = BLOCK_ROWS, BLOCK_SHARD_ROWS
    while block > 1 and total_rows < MIN_BLOCKS * block:
        block, shard = block // 2, shard // 2
    return block, shard


def shard_starts(counts: np.ndarray, shard_rows: int) -> np.ndarray:
    """First row of each shard when examples with `counts` target rows are cut into contiguous shards of about
    `shard_rows` rows: a shard ends at the first example that brings it to `shard_rows` (`kdcache teacher`'s
    plan_shards, without a Python loop over examples)."""
    cum = np.cumsum(np.asarray(counts, dtype=np.int64))
    starts, base = [0], 0
    while len(cum):
        last = int(np.searchsorted(cum, base + shard_rows, side="left"))  # the example that fills the shard
        if last + 1 >= len(cum):
            break
        base = int(cum[last])
        starts.append(base)
    return np.asarray(starts, dtype=np.int64)


def data_blocks(counts: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """The plan's blocks from the data alone: `counts` [n_examples] target rows per example -> (blocks: example
    indices, ascending, of the examples with targets whose first row falls in one cell of the `block_grid`;
    each block's shard of that grid [n_blocks]). Examples without targets are in no block."""
    counts = np.asarray(counts, dtype=np.int64)
    block_rows, shard_rows = block_grid(int(counts.sum()))
    blocks, shards = chunk_blocks(np.cumsum(counts) - counts, shard_starts(counts, shard_rows), block_rows)
    return _with_targets(blocks, shards, counts > 0)


def legacy_blocks(counts: np.ndarray, cache_layout: tuple[np.ndarray, np.ndarray, int] | None,
                  block_examples: int = 256) -> tuple[list[np.ndarray], np.ndarray]:
    """The blocks of plan version 1 (checkpoints made before `PLAN_VERSION` 2): with a cache, its chunks
    (cache_layout = (each example's first row, each shard's first row, chunk_rows)); without, runs of
    `block_examples` examples. Used only to tell whether such a checkpoint's plan is this one."""
    counts = np.asarray(counts, dtype=np.int64)
    if cache_layout is not None:
        blocks, shards = chunk_blocks(*cache_layout)
    else:
        blocks = [np.arange(a, min(a + block_examples, len(counts))) for a in range(0, len(counts), block_examples)]
        shards = np.zeros(len(blocks), dtype=np.int64)
    return _with_targets(blocks, shards, counts > 0)


def _with_targets(blocks: list[np.ndarray], shards: np.ndarray, has_t: np.ndarray
                  ) -> tuple[list[np.ndarray], np.ndarray]:
    """Blocks without their examples that have no target (they contribute nothing; dropping them keeps
    batch sizes honest), empty blocks dropped."""
    kept = [(b[has_t[b]], int(s)) for b, s in zip(blocks, shards)]
    return [b for b, _ in kept if len(b)], np.asarray([s for b, s in kept if len(b)], dtype=np.int64)


def chunk_blocks(row_start: np.ndarray, shard_row_starts: np.ndarray, chunk_rows: int
                 ) -> tuple[list[np.ndarray], np.ndarray]:
    """The examples whose first row falls in one chunk of one shard, in row order (a cache's chunks, or the
    cells of the plan's grid).

    row_start [n_examples]: each example's first row; shard_row_starts [n_shards]. Returns the
    blocks (example indices, ascending) and each block's shard [n_blocks].
    """
    if not len(row_start):
        return [], np.zeros(0, dtype=np.int64)
    shard_of = np.searchsorted(shard_row_starts, row_start, side="right") - 1
    key = shard_of * (1 << 32) + (row_start - shard_row_starts[shard_of]) // chunk_rows
    order = np.argsort(key, kind="stable")
    blocks = np.split(order, np.flatnonzero(np.diff(key[order])) + 1)
    return blocks, np.asarray([shard_of[b[0]] for b in blocks], dtype=np.int64)


def block_order(block_shards: np.ndarray, s: PlanSettings, epoch: int,
                rng: np.random.Generator) -> np.ndarray:
    """The epoch's order of block indices (step 1 of the module docstring)."""
    n = len(block_shards)
    if not s.shuffle:
        return np.arange(n)
    if not (s.follow and epoch == 0):
        return rng.permutation(n)
    parts = []
    for shard in np.unique(block_shards):  # ascending shard index; blocks are already grouped by shard
        idx = np.flatnonzero(block_shards == shard)
        parts.append(idx[rng.permutation(len(idx))])
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def plan_epoch(blocks: list[np.ndarray], block_shards: np.ndarray, lengths: np.ndarray, s: PlanSettings,
               epoch: int, rank: int = 0, world: int = 1) -> EpochPlan:
    """This rank's plan for `epoch`, before the DDP cut to the smallest rank's batch count.

    blocks: example indices per block; block_shards [n_blocks]: the shard of each block (blocks of one
    shard adjacent, in shard order); lengths [n_examples]: tokens per example.
    """
    rng = np.random.default_rng([s.seed, epoch])
    order = block_order(block_shards, s, epoch, rng)
    mine = order[rank::world] if world > 1 else order
    by_shard = s.follow and epoch == 0
    windows: list[list[np.ndarray]] = []
    for run in (np.split(mine, np.flatnonzero(np.diff(block_shards[mine])) + 1) if by_shard and len(mine) else [mine]):
        per = 1 if not s.shuffle else s.buffer_blocks
        windows.extend([[blocks[j] for j in run[w: w + per]] for w in range(0, len(run), per)])
    examples = []
    for win in windows:
        flat = np.concatenate(win)
        if s.shuffle:
            rng.shuffle(flat)
        examples.append(flat)
    batches: list[np.ndarray] = []
    spans: list[tuple[int, int]] = []
    if s.batch_tokens:
        for w, flat in enumerate(examples):
            cut = _bucketed(flat, lengths, s.batch_tokens)
            if s.shuffle:
                cut = [cut[i] for i in rng.permutation(len(cut))]
            batches.extend(cut)
            spans.extend([(w, w)] * len(cut))
    else:
        flat = np.concatenate(examples) if examples else np.zeros(0, np.int64)
        window_of = np.repeat(np.arange(len(examples)), [len(e) for e in examples])
        for a in range(0, len(flat), s.batch_size):
            batches.append(flat[a: a + s.batch_size])
            spans.append((int(window_of[a]), int(window_of[min(a + s.batch_size, len(flat)) - 1])))
    starts = np.concatenate([[0], np.cumsum([len(b) for b in batches])]).astype(np.int64)
    return EpochPlan(windows, batches, spans, starts)


def _bucketed(examples: np.ndarray, lengths: np.ndarray, budget: int) -> list[np.ndarray]:
    """Cut `examples` (in their current order) into longest-first batches of count x longest <= budget.

    Sorted descending, a batch's longest is its first example, so its size is known at once:
    max(1, budget // length). Ties keep the incoming (shuffled) order, so equal lengths mix.
    """
    ex = examples[np.argsort(-lengths[examples], kind="stable")]
    lens = lengths[ex]
    out, i = [], 0
    while i < len(ex):
        c = max(1, budget // max(int(lens[i]), 1))
        out.append(ex[i: i + c])
        i += c
    return out


def batches_in_epoch(blocks: list[np.ndarray], block_shards: np.ndarray, lengths: np.ndarray, s: PlanSettings,
                     epoch: int, world: int = 1) -> int:
    """Micro-batches every rank takes in `epoch`: its own count with one rank; under DDP the smallest
    rank's (with batch_size, only full batches, as before token budgets existed)."""
    if world == 1:
        return len(plan_epoch(blocks, block_shards, lengths, s, epoch).batches)
    if not s.batch_tokens:
        rng = np.random.default_rng([s.seed, epoch])
        order = block_order(block_shards, s, epoch, rng)
        sizes = np.asarray([len(blocks[j]) for j in order], dtype=np.int64)
        return int(min(sizes[r::world].sum() for r in range(world)) // s.batch_size)
    return min(len(plan_epoch(blocks, block_shards, lengths, s, epoch, r, world).batches) for r in range(world))
