"""The column layouts `kdcache export` writes: kdcache's own, axolotl's KD plugin's and DistillKit's.

Each layout turns a batch of (input_ids [L], loss_mask [L], cache rows of the n targets) into Arrow
columns, one row per example. Targets are the positions t >= 1 with loss_mask[t] != 0, in order; the
cache holds one row per target, the teacher's distribution over the token at t (predicted from t - 1),
as log p at T = 1 (the teacher's plain softmax) over its full vocabulary.

What the readers do with the columns, and where it was read (axolotl-ai-cloud/axolotl main at 067b021,
2026-07-24; arcee-ai/DistillKit main at a61c2e7, 2026-03-14; their code is not copied here):
- axolotl, `src/axolotl/integrations/kd/`: `AxolotlKDTrainer.compute_loss` (trainer.py) pops `labels`,
  `target_token_ids`, `target_logprobs`, `target_mask` from each batch and keeps them through
  `_set_signature_columns_if_needed`; `DataCollatorForKD` (collator.py) takes each row as Python lists,
  pads them to [B, L, K] with log-prob -1e9, id 0, mask 0 and makes float / long / int tensors (so any
  integer or bool Arrow type reads the same); the fused loss (kernels/liger.py) flattens hidden states and
  target rows together with no shift, shifts only the labels for its CE (`true_labels[:, 1:]`), applies
  `target_mask.to(torch.bool)` per (row, k), divides the student's logits by `kd_temperature` and takes the
  teacher's log-probs as given ("already temp-scaled and normalized"). So row j must be the distribution
  over input_ids[j + 1] at T = kd_temperature, with one mask value per (row, k) (the collator slices each
  mask row like its log-prob row); a row without teacher data may be empty (the collator pads it). The
  rescaling to `kd_temperature` and renormalisation over the K ids is done by
  its dataset strategy (chat_template.py) for raw logprob datasets; a pre-tokenized dataset
  (`_is_dataset_already_tokenized` in utils/data/wrappers.py: input_ids, attention_mask and labels
  present) skips it, so this export's log-probs (T = 1, full vocabulary) reach the loss as written.
  There is no alignment setting in this code.
- DistillKit, `distillkit/`: `LogprobCompressor.decompress_to_sparse` (compression/compressor.py) returns
  `row["token_ids"], row["top_values"]` unchanged when a batch has both, but the compressor is built from
  `teacher.logprob_compressor` (or `legacy_logit_compression`) and reads its `d` even then (main.py
  `create_signal_source`); `OfflineSignalSource` (signals.py) marks them as log-probs at generation
  temperature 1.0; the sparse losses (lossfuncs/common.py, kl.py) gather the student's logits at position j
  with teacher row j, masked with `labels[j] >= 0` (trainer.py), unshifted; its vLLM capture (sample_logits_vllm.py,
  `temperature=1.0`) drops the first prompt position, so row j describes token j + 1 and a sequence of L
  tokens has L - 1 rows; `pack_logits.py` truncates input_ids / labels to the row count and packs rows to
  one length for `dataset.prepacked: true`, whose collator (`collate_packed_batch`, main.py) makes every
  column a tensor with `torch.tensor` of Python lists (int64 / float32 whatever the Arrow type; every row
  must hold K entries, so padded rows are written in full); the
  Trainer keeps token_ids / top_values only with `training_args.remove_unused_columns: false`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

LOGPROB_PAD = -1e9  # axolotl's pad value for target_logprobs (collator.py); finite, so 0 * pad is 0, not NaN
IGNORE_INDEX = -100
LOGPROB_TEMPERATURE = 1.0  # the cache's head log-probs are the teacher's softmax at T = 1

# What a cache row holds (`Cache.read`'s fields; target_ids are the data's tokens, written as input_ids /
# labels by every layout) and why a layout that leaves a field out loses nothing it could use.
TAIL_SAMPLE_FIELDS = ("tail_ids", "tail_counts")
CACHE_FIELDS = ("topk_ids", "topk_logprobs", "tail_logprob", "target_logprobs", "target_rank", "entropy",
                "log_partition", "tail_entropy", "tail_log_partition") + TAIL_SAMPLE_FIELDS
DROP_WHY = {
    "tail_logprob": "log of the teacher's mass outside the top K (the (K + 1)-th bucket)",
    "target_logprobs": "log p of the actual token",
    "target_rank": "the actual token's rank in the head (it follows from topk_ids and the labels)",
    "entropy": "the teacher's entropy",
    "log_partition": "A(1/T) of the head on the cache's temperature grid T = {grid} (exact rescaling to T != 1)",
    "tail_entropy": "the entropy of the tail (with tail_log_partition, the tail's rescaling to T != 1)",
    "tail_log_partition": "the tail's log power sums on the cache's temperature grid T = {grid}",
    "tail_ids": "{s} ids drawn from the tail per row (`--tail-samples`, for `kdcache train --tail sampled`)",
    "tail_counts": "how often each of those ids was drawn",
}


@dataclass(frozen=True)
class Layout:
    name: str
    feature_types: dict[str, tuple[str, int]]  # column -> (arrow value type, nesting depth 1 or 2)
    columns: dict[str, str]  # column -> what it holds (recorded in kdcache_export.json)
    alignment: str
    keeps: tuple[str, ...]  # the cache fields written (CACHE_FIELDS order); the rest are dropped
    drop_notes: dict[str, str]  # field -> what this reader does without it (added to DROP_WHY)
    build: Callable[[np.ndarray, np.ndarray, dict[str, np.ndarray], np.ndarray], dict[str, Any]] = field(repr=False)
    # How the depth-2 columns store their rows: "list" (lists of K), "fixed" (fixed-size lists of K: no
    # per-row offsets) or "empty-pad" (lists, rows without teacher data empty: the builder's "_has" says which).
    rows: str = "list"

    def features(self, k: int) -> Any:
        import datasets

        def seq(t: str, depth: int) -> Any:
            f = datasets.Value(t)
            if depth == 2:
                f = datasets.Sequence(f, length=k if self.rows == "fixed" else -1)
            return datasets.Sequence(f)  # a list column (datasets >= 4 prints it as List)

        return datasets.Features({c: seq(t, d) for c, (t, d) in self.feature_types.items()})

    def dropped(self, temperatures: list[float], tail_samples: int) -> dict[str, str]:
        """{cache field: what it was and why this layout leaves it out}, for every field not written."""
        grid = ", ".join(f"{t:g}" for t in temperatures)
        out = {}
        for f in CACHE_FIELDS:
            if f in self.keeps or (f in TAIL_SAMPLE_FIELDS and not tail_samples):
                continue
            why = DROP_WHY[f].format(grid=grid, s=tail_samples)
            out[f] = f"{why}; {self.drop_notes[f]}" if f in self.drop_notes else why
        return out


def _labels(ids: np.ndarray, pos: np.ndarray, dtype: Any = np.int64) -> np.ndarray:
    labels = np.full(len(ids), IGNORE_INDEX, dtype=dtype)
    labels[pos] = ids[pos]
    return labels


def _rows_by_position(length: int, pos: np.ndarray, rows: dict[str, np.ndarray], k: int) -> tuple:
    """[length, K] int32 ids / float32 log-probs and a has-row flag, row j holding the cache row of target j + 1."""
    ids = np.zeros((length, k), dtype=np.int32)
    lps = np.full((length, k), LOGPROB_PAD, dtype=np.float32)
    has = np.zeros(length, dtype=bool)
    ids[pos - 1] = rows["topk_ids"]
    lps[pos - 1] = rows["topk_logprobs"]
    has[pos - 1] = True
    return ids, lps, has


def _own(ids: np.ndarray, mask: np.ndarray, rows: dict[str, np.ndarray], pos: np.ndarray) -> dict[str, Any]:
    return {"input_ids": ids.astype(np.int32), "loss_mask": mask.astype(np.int8), "labels": _labels(ids, pos),
            "target_positions": pos.astype(np.int32), "topk_ids": rows["topk_ids"].astype(np.int32),
            "topk_logprobs": rows["topk_logprobs"].astype(np.float32),
            "tail_logprob": rows["tail_logprob"].astype(np.float32),
            "target_logprobs": rows["target_logprobs"].astype(np.float32)}


def _axolotl(ids: np.ndarray, mask: np.ndarray, rows: dict[str, np.ndarray], pos: np.ndarray) -> dict[str, Any]:
    k = rows["topk_ids"].shape[1]
    tids, tlps, has = _rows_by_position(len(ids), pos, rows, k)
    # The collator pads every row shorter than the batch's longest with log-prob -1e9, id 0, mask 0 and slices
    # each mask row like its log-prob row: rows without teacher data are written empty ("empty-pad"), the
    # others with K ids, K log-probs and K mask values (bool: 1 bit each).
    return {"input_ids": ids.astype(np.int32), "attention_mask": np.ones(len(ids), dtype=np.int8),
            "labels": _labels(ids, pos, np.int32), "target_token_ids": tids, "target_logprobs": tlps,
            "target_mask": np.repeat(has[:, None], k, axis=1), "_has": has, "_padded_rows": int((~has).sum())}


def _distillkit(ids: np.ndarray, mask: np.ndarray, rows: dict[str, np.ndarray], pos: np.ndarray) -> dict[str, Any]:
    k = rows["topk_ids"].shape[1]
    n_rows = max(len(ids) - 1, 0)
    tids, tlps, has = _rows_by_position(n_rows, pos, rows, k)
    labels = _labels(ids, pos, np.int32)
    # DistillKit trains row j when labels[j] >= 0. A target j whose successor is not a target (the end of
    # an inner trained span) would have it train on a padding row: its label is dropped instead.
    j = np.arange(n_rows)
    orphan = (labels[:n_rows] != IGNORE_INDEX) & ~has
    labels[j[orphan]] = IGNORE_INDEX
    return {"input_ids": ids.astype(np.int32), "labels": labels, "token_ids": tids, "top_values": tlps,
            "_padded_rows": int((~has).sum()), "_dropped_labels": int(orphan.sum())}


OWN = Layout(
    "hf-datasets",
    {"input_ids": ("int32", 1), "loss_mask": ("int8", 1), "labels": ("int64", 1), "target_positions": ("int32", 1),
     "topk_ids": ("int32", 2), "topk_logprobs": ("float32", 2), "tail_logprob": ("float32", 1),
     "target_logprobs": ("float32", 1)},
    {"input_ids": "[L] the prepared tokens", "loss_mask": "[L] the prepared loss mask",
     "labels": "[L] input_ids[t] at targets t, -100 elsewhere (label t is predicted from position t - 1)",
     "target_positions": "[n] the targets t >= 1 with loss_mask[t] != 0, ascending",
     "topk_ids": "[n][K] the teacher's top-K ids for the token at target_positions[i], descending p",
     "topk_logprobs": "[n][K] log p of those ids at T = 1, normalised over the full vocabulary",
     "tail_logprob": "[n] log of the teacher's mass outside the top K at T = 1 (-inf when K = V)",
     "target_logprobs": "[n] log p of the actual token at T = 1"},
    "per target: row i of topk_* / tail_logprob / target_logprobs describes input_ids[target_positions[i]]",
    ("topk_ids", "topk_logprobs", "tail_logprob", "target_logprobs"),
    {f: "train at T != 1 from the cache itself (pipeline.api), not from an export"
     for f in ("log_partition", "tail_entropy", "tail_log_partition")},
    _own)

AXOLOTL = Layout(
    "axolotl",
    {"input_ids": ("int32", 1), "attention_mask": ("int8", 1), "labels": ("int32", 1),
     "target_token_ids": ("int32", 2), "target_logprobs": ("float32", 2), "target_mask": ("bool", 2)},
    {"input_ids": "[L]", "attention_mask": "[L] ones", "labels": "[L] input_ids[t] at targets, -100 elsewhere",
     "target_token_ids": "[L][K or 0] row j: the teacher's top-K ids for input_ids[j + 1]; empty where row j "
                         "holds no teacher data (labels[j + 1] == -100, and the last row): axolotl's collator "
                         "pads it with id 0, log-prob -1e9, mask 0",
     "target_logprobs": "[L][K or 0] log p at T = 1 over the full vocabulary (not renormalised over K); "
                        "empty where target_token_ids is",
     "target_mask": "[L][K or 0] true (K times) where row j holds teacher data; empty where target_token_ids is"},
    "row j <-> input_ids[j + 1] (axolotl's loss pairs hidden state j with target row j and label j + 1)",
    ("topk_ids", "topk_logprobs"),
    {"tail_logprob": "axolotl's loss has no tail bucket", "target_logprobs": "axolotl does not read it"},
    _axolotl, rows="empty-pad")

DISTILLKIT = Layout(
    "distillkit",
    {"input_ids": ("int32", 1), "labels": ("int32", 1), "token_ids": ("int32", 2), "top_values": ("float32", 2)},
    {"input_ids": "[L]",
     "labels": "[L] input_ids[t] at targets, -100 elsewhere and at targets t < L - 1 whose t + 1 is not a target",
     "token_ids": "[L - 1][K] row j: the teacher's top-K ids for input_ids[j + 1]; 0 on padded rows",
     "top_values": "[L - 1][K] log p at T = 1 over the full vocabulary; -1e9 on padded rows"},
    "row j <-> input_ids[j + 1]; L - 1 rows (DistillKit's vLLM capture layout, before pack_logits)",
    ("topk_ids", "topk_logprobs"),
    {"tail_logprob": "DistillKit stores no tail: `missing_probability_handling: symmetric_uniform` rebuilds it "
                     "as 1 - the sum of the K probabilities (exact here: the log-probs are over the full vocabulary)",
     "target_logprobs": "DistillKit does not read it"},
    _distillkit, rows="fixed")

LAYOUTS = {lay.name: lay for lay in (OWN, AXOLOTL, DISTILLKIT)}


def columns_of(layout: Layout, examples: list[tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]]) -> tuple:
    """({column: Arrow array over the batch}, {padded_rows, dropped_labels}) for a batch of
    (input_ids [L], loss_mask [L], decoded cache rows [n, ...]) examples."""
    import pyarrow as pa

    from pipeline.errors import KdError

    built = []
    k = 0
    for ids, mask, rows in examples:
        ids = ids.astype(np.int64)
        k = rows["topk_ids"].shape[1]
        pos = (np.nonzero(np.asarray(mask)[1:])[0] + 1).astype(np.int64)
        built.append(layout.build(ids, mask, rows, pos))
    stats = {"padded_rows": sum(b.pop("_padded_rows", 0) for b in built),
             "dropped_labels": sum(b.pop("_dropped_labels", 0) for b in built)}
    has = np.concatenate([b.pop("_has") for b in built]) if layout.rows == "empty-pad" else None
    cols = {}
    for c, (t, depth) in layout.feature_types.items():
        parts = [b[c] for b in built]
        outer = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int32)
        flat = np.concatenate(parts) if parts else np.zeros((0, k) if depth == 2 else 0)
        if flat.size >= 2**31:  # Arrow list offsets are int32 in the list types datasets uses
            raise KdError(f"an export batch of {len(examples)} examples holds {flat.size} values in {c}: "
                          "use a smaller batch_examples")
        arrow_type = pa.from_numpy_dtype(np.dtype(t))
        if depth == 2:
            width = flat.shape[1] if flat.ndim == 2 else k
            if layout.rows == "fixed":
                inner = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), type=arrow_type), width)
            else:
                widths = np.full(flat.shape[0], width, dtype=np.int64) if has is None else np.where(has, width, 0)
                kept = flat if has is None else flat[has]
                inner = pa.ListArray.from_arrays(np.concatenate([[0], np.cumsum(widths)]).astype(np.int32),
                                                 pa.array(kept.reshape(-1), type=arrow_type))
            cols[c] = pa.ListArray.from_arrays(outer, inner)
        else:
            cols[c] = pa.ListArray.from_arrays(outer, pa.array(flat.reshape(-1), type=arrow_type))
    return cols, stats
