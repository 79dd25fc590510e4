"""Torch datasets over (prepared data + teacher cache) for other trainers, and the collator that batches them.

    from pipeline.api import KDExampleDataset, KDCollator
    ds = KDExampleDataset("runs/demo/prepared", "runs/demo/cache")
    ex = ds[0]            # one example with the cache rows of its target positions
    batch = KDCollator()([ds[0], ds[1]])   # the layout of `pipeline.data.stream.MicroBatch`, as a dict

An *example* (what both datasets yield) is a dict:
    example           int, the example's index in the prepared data
    input_ids         [L] int64, the sequence
    labels            [L] int64, input_ids[t] at target positions t, -100 elsewhere (the Hugging Face
                      causal-LM convention: label t is predicted from the hidden state at t - 1)
    target_positions  [n] int64, the targets t >= 1 with loss_mask[t] != 0, ascending
    cache             dict of the n cache rows of those targets, in the same order: `KD_FIELDS`
                      (topk_ids [n, K] int64, topk_logprobs [n, K], tail_logprob [n], tail_entropy [n],
                      tail_log_partition [n, G], target_rank [n] int64), plus, when the cache has tail
                      draws (unless `fields` says otherwise), tail_ids/tail_counts [n, S] and tail_logprobs [n, S]

Examples without a target position are left out (as `kdcache train` leaves them out): `ds.examples`
maps a dataset index to its prepared-data index. Every read checks, per shard, the cache's hash of
the data's target tokens and, per row, that the head's id at `target_rank` is the data's token, so
a cache joined to other data fails with one line instead of training on misaligned rows.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from pipeline.cache.rows import target_positions
from pipeline.data.batching import pad_right
from pipeline.errors import KdError
from pipeline.losses.objective import KD_FIELDS, kd_fields

IGNORE_INDEX = -100  # label of a position that is not a target (PyTorch's and Hugging Face's default)


def open_inputs(data: Any, cache: Any) -> tuple[Any, Any]:
    """(prepared `datasets.Dataset`, `Cache`) from paths or objects, checked to belong together.

    `data` may be omitted (None or "") when the cache records where its prepared data lives. With a
    path, the tokenizer and the data fingerprint are compared with the cache's record (one-line
    `KdError`s); a `Dataset` object is checked row by row through the shards' alignment hashes.
    """
    from pipeline.cache import Cache, open_cache
    from pipeline.identity import same_tokenizer
    from pipeline.data.prepare import load_prepared, prepared_meta
    from pipeline.storage import is_url

    c = cache if isinstance(cache, Cache) else open_cache(cache)
    if not c.complete:
        missing = sum(1 for ok in c.committed() if not ok)
        raise KdError(f"cache {c.where} is incomplete ({missing} shard(s) not committed); finish `kdcache teacher` first")
    c.check_consistent()
    if data is None or data == "":
        data = (c.meta.get("data") or {}).get("path", "")
        if not data or not (is_url(data) or Path(data).is_dir()):
            raise KdError(f"the cache's prepared data {data or '(unrecorded)'} is gone; pass the prepared data it "
                          "was made from")
    if isinstance(data, (str, Path)):
        meta = prepared_meta(data)
        if not same_tokenizer(c.meta["tokenizer"], meta["tokenizer"]):
            raise KdError(f"tokenizer mismatch: the cache was made with {c.meta['tokenizer']['name']}, the data "
                          f"{data} with {meta['tokenizer']['name']}")
        if c.meta["data"]["fingerprint"] != meta["fingerprint"]:
            raise KdError(f"the cache {c.where} was made from other data than {data} (fingerprints differ)")
        data = load_prepared(data)
    if len(c.index) != len(data):
        raise KdError(f"the cache indexes {len(c.index)} examples but the data has {len(data)}")
    c.attach_data(data)  # target ids and the shards' alignment hashes come from this data
    return data, c


def check_alignment(rows: dict[str, np.ndarray], targets: np.ndarray, example: int) -> None:
    """Refuse rows whose head id at `target_rank` is not the data's token (the cache was made from other data).

    rows: decoded cache rows with topk_ids [n, K] and target_rank [n]; targets [n] the data's tokens.
    """
    rank = rows["target_rank"]
    in_head = rank >= 0
    head_id = np.take_along_axis(rows["topk_ids"], np.maximum(rank, 0)[:, None], 1)[:, 0]
    if not np.array_equal(head_id[in_head], targets[in_head]):
        raise KdError(f"cache rows of example {example} do not match its tokens: the cache was made from other data "
                      "(check the prepared data)")


def make_example(example: int, ids: np.ndarray, mask: np.ndarray, rows: dict[str, np.ndarray]) -> dict[str, Any]:
    """One example dict (see the module docstring) from the prepared columns and its decoded cache rows."""
    ids = np.asarray(ids, dtype=np.int64)
    pos = target_positions(mask).astype(np.int64)
    n = len(pos)
    if any(len(v) != n for v in rows.values()):
        raise KdError(f"example {example} has {n} target positions but the cache holds "
                      f"{len(next(iter(rows.values())))} rows for it: not the data this cache was made from")
    check_alignment(rows, ids[pos], example)
    labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
    labels[pos] = ids[pos]
    return {"example": int(example), "input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
            "target_positions": torch.from_numpy(pos),
            "cache": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in rows.items()}}


def _fields(fields: Sequence[str] | None, cache: Any) -> tuple[str, ...]:
    """The cache fields each example carries: `fields`, by default what a default `KDLoss` of this cache reads
    (with the tail draws when the cache has them: `--tail auto` trains on them)."""
    if not fields:
        fields = kd_fields("sampled", cache.params.draw_logprobs) if cache.tail_samples else KD_FIELDS
    # target_rank is always read: it is how every row is checked against the data's token.
    return tuple(dict.fromkeys(tuple(fields) + ("target_rank",)))


class KDExampleDataset(torch.utils.data.Dataset):
    """Map-style dataset: `ds[i]` is the i-th example with a target position, with its cache rows.

    Reads decode whole Zarr chunks; the last `keep_chunks` decoded chunk ranges are kept, so reading
    examples in (or near) dataset order decodes each chunk once. Under a `DataLoader` with workers,
    each worker keeps its own.
    """

    def __init__(self, data: Any, cache: Any, fields: Sequence[str] | None = None, keep_chunks: int = 4):
        self.data, self.cache = open_inputs(data, cache)
        self.fields = _fields(fields, self.cache)
        idx = self.cache.index
        self.row_start = np.asarray(idx.column("row_start"), dtype=np.int64)
        self.row_count = np.asarray(idx.column("row_count"), dtype=np.int64)
        self.examples = np.nonzero(self.row_count > 0)[0]
        if len(self.examples) == 0:
            raise KdError(f"{self.cache.path}: no example has a target position")
        self.ids_col = self.data.data.column("input_ids")
        self.mask_col = self.data.data.column("loss_mask")
        self.keep_chunks = max(1, keep_chunks)
        # (shard, first chunk, last chunk) -> (first row, decoded rows), least recently used first
        self._chunks: OrderedDict[tuple[int, int, int], tuple[int, dict[str, np.ndarray]]] = OrderedDict()
        self._checked: set[int] = set()

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        e = int(self.examples[i])
        return make_example(e, self.ids_col[e].values, self.mask_col[e].values, self.rows(e))

    def rows(self, e: int) -> dict[str, np.ndarray]:
        """Decoded cache rows of prepared example `e` (arrays [n, ...])."""
        a, n = int(self.row_start[e]), int(self.row_count[e])
        shard = self.cache.shard_of_row(a)
        if shard not in self._checked:  # the shard's hash of the data's target tokens, once per shard
            self.cache.shard_target_ids(shard)
            self._checked.add(shard)
        s = self.cache.shards[shard]
        chunk = self.cache.chunk_rows
        c0, c1 = (a - s["row_start"]) // chunk, (a + n - 1 - s["row_start"]) // chunk
        key = (shard, c0, c1)
        hit = self._chunks.get(key)
        if hit is None:
            lo = s["row_start"] + c0 * chunk
            hit = (lo, self.cache.read(lo, min(s["row_start"] + (c1 + 1) * chunk, s["row_stop"]), self.fields))
            self._chunks[key] = hit
            while len(self._chunks) > self.keep_chunks:
                self._chunks.popitem(last=False)
        else:
            self._chunks.move_to_end(key)
        lo, block = hit
        return {k: v[a - lo: a - lo + n] for k, v in block.items()}


class KDIterableDataset(torch.utils.data.IterableDataset):
    """Iterable dataset: one epoch of examples per `iter()`, in the order `kdcache train` reads them.

    The reading plan is `pipeline.data.stream.CacheStream`'s (chunk-aligned blocks, shuffled with a buffer
    of `buffer_blocks` blocks; a pure function of (seed, epoch)), so with one process and no
    DataLoader workers the examples come in exactly the trainer's order. Call `set_epoch(e)` before
    each epoch (Hugging Face's Trainer does). Under DDP pass rank/world: ranks read disjoint blocks
    and get the same number of examples. DataLoader workers split each epoch's windows of blocks
    between them (every example is still read once per epoch; the interleaving differs).
    """

    def __init__(self, data: Any, cache: Any, seed: int = 0, shuffle: bool = True, buffer_blocks: int = 8,
                 rank: int = 0, world: int = 1, fields: Sequence[str] | None = None):
        from pipeline.data.stream import CacheStream

        self.data, self.cache = open_inputs(data, cache)
        # batch_size 1: the stream's per-rank example count is then exactly what every rank may yield.
        self.stream = CacheStream(self.data, self.cache, batch_size=1, seed=seed, shuffle=shuffle,
                                  buffer_blocks=buffer_blocks, rank=rank, world=world, fields=_fields(fields, self.cache))
        self.ids_col = self.data.data.column("input_ids")
        self.mask_col = self.data.data.column("loss_mask")
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        """Examples in the current epoch on this rank."""
        return self.stream.batches_in_epoch(self.epoch)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        plan = self.stream.plan(self.epoch)
        ending: dict[int, list[np.ndarray]] = {}  # window -> the (one-example) batches whose rows it holds
        for batch, (_, last) in zip(plan.batches, plan.spans):
            ending.setdefault(last, []).append(batch)
        mine = [w for w in range(len(plan.windows)) if w % workers == worker and w in ending]
        self.cache.prefetch_order(self.stream.shard_order(plan, mine))  # a remote cache fetches ahead in this order
        for w in mine:
            rows = self.stream.read_examples(plan.windows[w])
            for batch in ending[w]:
                for e in batch.tolist():
                    yield make_example(e, self.ids_col[e].values, self.mask_col[e].values, rows[e])


class KDCollator:
    """Pads a list of examples into one batch with the layout of `pipeline.data.stream.MicroBatch`, as a dict:

        input_ids [B, L] int64 (right-padded with `pad_token_id`), attention_mask [B, L] int64,
        labels [B, L] int64 (-100 at padding and non-targets), tgt_b [N], tgt_t [N] (target position t
        of sequence b, predicted from the hidden state at t - 1; ordered by sequence then position),
        target_ids [N], cache: {field: [N, ...]} the examples' cache rows concatenated in that order
        (target_rank is checked, then dropped, as the stream does), examples: [B] prepared indices.

    Every value but `examples` is a tensor, so Hugging Face's Trainer moves the batch to its device.
    """

    def __init__(self, pad_token_id: int = 0):
        self.pad_token_id = int(pad_token_id)

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if not examples:
            raise KdError("KDCollator got an empty list of examples")
        seqs = [np.asarray(ex["input_ids"], dtype=np.int64) for ex in examples]
        ids, att = pad_right(seqs)
        ids[att == 0] = self.pad_token_id
        labels = np.full(ids.shape, IGNORE_INDEX, dtype=np.int64)
        for b, ex in enumerate(examples):
            labels[b, : len(seqs[b])] = np.asarray(ex["labels"])
        pos = [np.asarray(ex["target_positions"], dtype=np.int64) for ex in examples]
        tgt_b = np.concatenate([np.full(len(p), b, dtype=np.int64) for b, p in enumerate(pos)])
        tgt_t = np.concatenate(pos)
        keys = [k for k in examples[0]["cache"] if k != "target_rank"]
        for ex in examples[1:]:
            if set(ex["cache"]) != set(examples[0]["cache"]):
                raise KdError(f"examples {examples[0]['example']} and {ex['example']} carry different cache fields")
        cache = {k: torch.cat([torch.as_tensor(ex["cache"][k]) for ex in examples]) for k in keys}
        return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(att),
                "labels": torch.from_numpy(labels), "tgt_b": torch.from_numpy(tgt_b), "tgt_t": torch.from_numpy(tgt_t),
                "target_ids": torch.from_numpy(ids[tgt_b, tgt_t]), "cache": cache,
                "examples": [int(ex["example"]) for ex in examples]}


def as_microbatch(batch: dict[str, Any]) -> Any:
    """The collator's dict as a `pipeline.data.stream.MicroBatch` (the kdcache trainer's own type)."""
    from pipeline.data.stream import MicroBatch

    return MicroBatch(batch["input_ids"], batch["attention_mask"], batch["tgt_b"], batch["tgt_t"],
                      batch["target_ids"], batch["cache"], list(batch["examples"]))


def move_batch(batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """The collator's dict with every tensor (the cache rows too) on `device`."""
    move = lambda v: v.to(device, non_blocking=True) if torch.is_tensor(v) else v  # noqa: E731
    return {k: ({f: move(t) for f, t in v.items()} if isinstance(v, dict) else move(v)) for k, v in batch.items()}


def to_hf_iterable(ds: KDExampleDataset) -> Any:
    """`ds` as a `datasets.IterableDataset` (for trainers that accept only Hugging Face datasets, e.g. TRL's
    SFTTrainer), yielding the same example dicts as plain Python lists in dataset order; shuffle it with
    its `.shuffle(seed, buffer_size)`, which Trainer re-seeds every epoch. Lists of float32 values come
    back bit-exact through `KDCollator` (a Python float holds a float32 exactly)."""
    import datasets

    def examples(indices: list[int]) -> Iterator[dict[str, Any]]:
        for i in indices:
            ex = ds[i]
            yield {"example": ex["example"], "input_ids": ex["input_ids"].tolist(), "labels": ex["labels"].tolist(),
                   "target_positions": ex["target_positions"].tolist(),
                   "cache": {k: v.tolist() for k, v in ex["cache"].items()}}

    return datasets.IterableDataset.from_generator(examples, gen_kwargs={"indices": list(range(len(ds)))})
