"""The column layouts `kdcache export` writes: kdcache's own, axolotl's KD plugin's and DistillKit's.

Each layout turns a batch of (input_ids [L], loss_mask [L], cache rows of the n targets) into Arrow
columns, one row per example. Targets are the positions t >= 1 with loss_mask[t] != 0, in order; the
cache holds one row per target, the teacher's distribution over the token at t (predicted from t - 1).

What the peers read, and where it was read (their code is not copied here):
- axolotl, `src/axolotl/integrations/kd/` (axolotl-ai-cloud/axolotl): the KD trainer pops `labels`,
  `target_token_ids`, `target_logprobs`, `target_mask` from each batch (trainer.py); `DataCollatorForKD`
  (collator.py) pads them per sequence to [L][K] with log-prob -1e9, id 0, mask 0 and makes tensors
  float / long / int; the fused loss (kernels/liger.py) pairs hidden state j with target row j and
  shifts the labels by one, so row j is the distribution over input_ids[j + 1]. The offline and
  online producers pin that contract: "target row j is the teacher distribution over input_ids[j + 1],
  masked by labels[j + 1]", the last row and uncovered rows padding with mask 0 (the KD README's
  "Target alignment" and the producer-alignment tests). Older axolotl datasets put row j on token j;
  newer collators read those with `kd_prepared_targets_alignment: legacy`; ours is the current one.
  Its producers (dataset strategy, online collator) renormalise the K log-probs and rescale them to
  `kd_temperature` before the loss; a pre-tokenized dataset such as this export skips them.
- DistillKit, arcee-ai/DistillKit `distillkit/`: `LogprobCompressor.decompress_to_sparse`
  (compression/compressor.py) returns `row["token_ids"], row["top_values"]` unchanged when a row has
  both; `OfflineSignalSource` marks them as log-probs; the sparse losses (lossfuncs/common.py, kl.py)
  gather the student's logits at position j with teacher row j and mask with `labels[j] >= 0`, unshifted;
  its vLLM capture (sample_logits_vllm.py) drops the first prompt position, so row j describes token
  j + 1 and a sequence of L tokens has L - 1 rows, and `pack_logits.py` truncates input_ids / labels
  to the row count before packing; the capture schema (sample_common.py) stores input_ids as uint64.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

LOGPROB_PAD = -1e9  # axolotl's pad value for target_logprobs (collator.py); finite, so 0 * pad is 0, not NaN
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Layout:
    name: str
    feature_types: dict[str, tuple[str, int]]  # column -> (arrow value type, nesting depth 1 or 2)
    columns: dict[str, str]  # column -> what it holds (recorded in kdcache_export.json)
    alignment: str
    dropped: str
    build: Callable[[np.ndarray, np.ndarray, dict[str, np.ndarray], np.ndarray], dict[str, Any]] = field(repr=False)

    def features(self) -> Any:
        import datasets

        def seq(t: str, depth: int) -> Any:
            f = datasets.Value(t)
            for _ in range(depth):
                f = datasets.Sequence(f)  # a list column (datasets >= 4 prints it as List)
            return f

        return datasets.Features({c: seq(t, d) for c, (t, d) in self.feature_types.items()})


def _labels(ids: np.ndarray, pos: np.ndarray) -> np.ndarray:
    labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
    labels[pos] = ids[pos]
    return labels


def _rows_by_position(length: int, pos: np.ndarray, rows: dict[str, np.ndarray], k: int) -> tuple:
    """[length, K] ids / log-probs and a has-row flag, row j holding the cache row of target j + 1."""
    ids = np.zeros((length, k), dtype=np.int64)
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
    return {"input_ids": ids.astype(np.int64), "attention_mask": np.ones(len(ids), dtype=np.int64),
            "labels": _labels(ids, pos), "target_token_ids": tids, "target_logprobs": tlps,
            "target_mask": np.repeat(has.astype(np.int64)[:, None], k, axis=1),
            "_padded_rows": int((~has).sum())}


def _distillkit(ids: np.ndarray, mask: np.ndarray, rows: dict[str, np.ndarray], pos: np.ndarray) -> dict[str, Any]:
    k = rows["topk_ids"].shape[1]
    n_rows = max(len(ids) - 1, 0)
    tids, tlps, has = _rows_by_position(n_rows, pos, rows, k)
    labels = _labels(ids, pos)
    # DistillKit trains row j when labels[j] >= 0. A target j whose successor is not a target (the end of
    # an inner trained span) would have it train on a padding row: its label is dropped instead.
    j = np.arange(n_rows)
    orphan = (labels[:n_rows] != IGNORE_INDEX) & ~has
    labels[j[orphan]] = IGNORE_INDEX
    return {"input_ids": ids.astype(np.uint64), "labels": labels, "token_ids": tids, "top_values": tlps,
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
     "topk_logprobs": "[n][K] log p of those ids, normalised over the full vocabulary",
     "tail_logprob": "[n] log of the teacher's mass outside the top K (-inf when K = V)",
     "target_logprobs": "[n] log p of the actual token"},
    "per target: row i of topk_* / tail_logprob / target_logprobs describes input_ids[target_positions[i]]",
    "the tail statistics for temperature rescaling (tail_entropy, tail_log_partition), entropy and tail draws",
    _own)

AXOLOTL = Layout(
    "axolotl",
    {"input_ids": ("int64", 1), "attention_mask": ("int64", 1), "labels": ("int64", 1),
     "target_token_ids": ("int64", 2), "target_logprobs": ("float32", 2), "target_mask": ("int64", 2)},
    {"input_ids": "[L]", "attention_mask": "[L] ones", "labels": "[L] input_ids[t] at targets, -100 elsewhere",
     "target_token_ids": "[L][K] row j: the teacher's top-K ids for input_ids[j + 1]; 0 on padded rows",
     "target_logprobs": "[L][K] log p over the full vocabulary (not renormalised over K); -1e9 on padded rows",
     "target_mask": "[L][K] 1 where row j holds teacher data (labels[j + 1] != -100), else 0; the last row 0"},
    "row j <-> input_ids[j + 1] (axolotl's current kd_prepared_targets_alignment)",
    "the tail mass (axolotl's loss has no tail bucket; its own producers renormalise the teacher's K log-probs, "
    "this export keeps them over the full vocabulary), the temperature statistics, entropy and tail draws",
    _axolotl)

DISTILLKIT = Layout(
    "distillkit",
    {"input_ids": ("uint64", 1), "labels": ("int64", 1), "token_ids": ("int64", 2), "top_values": ("float32", 2)},
    {"input_ids": "[L] (uint64, as DistillKit's capture schema)",
     "labels": "[L] input_ids[t] at targets, -100 elsewhere and at targets t < L - 1 whose t + 1 is not a target",
     "token_ids": "[L - 1][K] row j: the teacher's top-K ids for input_ids[j + 1]; 0 on padded rows",
     "top_values": "[L - 1][K] log p over the full vocabulary; -1e9 on padded rows"},
    "row j <-> input_ids[j + 1]; L - 1 rows (DistillKit's vLLM capture layout, before pack_logits)",
    "the tail mass (DistillKit's missing_probability_handling rebuilds it as 1 - sum of the K), the "
    "temperature statistics, entropy and tail draws",
    _distillkit)

LAYOUTS = {lay.name: lay for lay in (OWN, AXOLOTL, DISTILLKIT)}


def columns_of(layout: Layout, examples: list[tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]]) -> tuple:
    """({column: Arrow array over the batch}, {padded_rows, dropped_labels}) for a batch of
    (input_ids [L], loss_mask [L], decoded cache rows [n, ...]) examples."""
    import pyarrow as pa

    built = []
    for ids, mask, rows in examples:
        ids = ids.astype(np.int64)
        pos = (np.nonzero(np.asarray(mask)[1:])[0] + 1).astype(np.int64)
        built.append(layout.build(ids, mask, rows, pos))
    stats = {"padded_rows": sum(b.pop("_padded_rows", 0) for b in built),
             "dropped_labels": sum(b.pop("_dropped_labels", 0) for b in built)}
    cols = {}
    from pipeline.errors import KdError

    for c, (t, depth) in layout.feature_types.items():
        parts = [b[c] for b in built]
        outer = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int32)
        flat = np.concatenate(parts) if parts else np.zeros(0)
        if flat.size >= 2**31:  # Arrow list offsets are int32 in the list types datasets uses
            raise KdError(f"an export batch of {len(examples)} examples holds {flat.size} values in {c}: "
                          "use a smaller batch_examples")
        if depth == 2:
            width = flat.shape[1] if flat.ndim == 2 else 0
            inner = pa.ListArray.from_arrays(np.arange(0, flat.shape[0] * width + 1, max(width, 1),
                                                       dtype=np.int32)[: flat.shape[0] + 1],
                                             pa.array(flat.reshape(-1), type=pa.from_numpy_dtype(np.dtype(t))))
            cols[c] = pa.ListArray.from_arrays(outer, inner)
        else:
            cols[c] = pa.ListArray.from_arrays(outer, pa.array(flat.reshape(-1), type=pa.from_numpy_dtype(np.dtype(t))))
    return cols, stats
