"""`kdcache export`: a cache and its prepared data as a Hugging Face dataset in the layout another tool reads.

    kdcache export runs/demo/cache --format axolotl --out runs/demo/export-axolotl

One row per example, saved with `datasets.Dataset.save_to_disk` (read back with `load_from_disk`).
Log-probs are the cache's: log p normalised over the teacher's FULL vocabulary (decoded, float32),
never renormalised over the K cached ids. What each format keeps and drops is in docs/api.md
("Export"); the layouts, in brief (L tokens, n targets, K cached ids; "row j" describes the token
input_ids[j + 1], i.e. what the model predicts from position j):

- hf-datasets (kdcache's own): input_ids, loss_mask, labels; per target: target_positions [n],
  topk_ids [n][K], topk_logprobs [n][K], tail_logprob [n] (log of the mass outside the top K, so the
  K + 1 buckets are complete), target_logprobs [n].
- axolotl (its KD plugin, `axolotl/integrations/kd`): input_ids, attention_mask, labels,
  target_token_ids / target_logprobs / target_mask [L][K]; row j <-> input_ids[j + 1], target_mask[j]
  = 0 where labels[j + 1] == -100 and on the last row; padded rows hold ids 0 and log-prob -1e9.
- distillkit (its raw top-k rows, what `LogprobCompressor.decompress_to_sparse` returns as-is for a
  row with `token_ids` and `top_values`): input_ids, labels, token_ids / top_values [L - 1][K],
  row j <-> input_ids[j + 1], as DistillKit's vLLM capture lays them out before `pack_logits`.

The dataset is built under a temporary name beside --out and renamed into place; `--overwrite`
replaces only what an earlier export wrote (`pipeline.ownership.EXPORT`).
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.config import save_config, to_dict
from pipeline.errors import KdError
from pipeline.interop.export_layouts import LAYOUTS, columns_of
from pipeline.identity import write_json
from pipeline.ownership import EXPORT, refuse_foreign, remove_owned

log = logging.getLogger(__name__)

FORMATS = tuple(LAYOUTS)
META_FILENAME = "kdcache_export.json"
# Decoded per batch: what the layouts use, plus the data's tokens and the rank that checks them.
FIELDS = ("topk_ids", "topk_logprobs", "tail_logprob", "target_logprobs", "target_rank", "target_ids")


@dataclass
class ExportConfig:
    """Settings of `kdcache export`."""

    cache: str = ""
    format: str = "hf-datasets"  # hf-datasets | distillkit | axolotl
    out: str = ""
    data: str = ""  # prepared data; default: the one the cache records
    batch_examples: int = 512  # examples decoded and written at a time (bounds memory)
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise KdError(f"format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.batch_examples < 1:
            raise KdError(f"batch_examples must be at least 1, got {self.batch_examples}")


def export(cfg: ExportConfig, on_examples: Callable[[int], None] | None = None,
           on_plan: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Write the cache at `cfg.cache` joined to its prepared data into `cfg.out` in `cfg.format`.

    `on_plan(examples)` is called once the inputs are checked, `on_examples(n)` after every n examples
    written (the stage's progress bar). Returns a summary (also written to OUT/kdcache_export.json).
    """
    import datasets

    from pipeline.interop.datasets import check_alignment, open_inputs

    if not cfg.cache:
        raise KdError("no cache given (kdcache export CACHE)")
    if not cfg.out:
        raise KdError("no output directory given (--out DIR)")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise KdError(f"--out {out} is a file, not a directory")
    if (out / META_FILENAME).exists() and not cfg.overwrite:
        raise KdError(f"{out} already holds an export; pass --overwrite to replace it")
    refuse_foreign(out, EXPORT)  # before any work: never replace a directory holding files export did not write
    data, cache = open_inputs(cfg.data or None, cfg.cache)
    if cache.vocab_size >= 2**31:
        raise KdError(f"teacher vocabulary {cache.vocab_size} does not fit the int32 id columns")
    layout = LAYOUTS[cfg.format]
    features = layout.features()
    schema = features.arrow_schema
    starts = np.asarray(cache.index.column("row_start"), dtype=np.int64)
    counts = np.asarray(cache.index.column("row_count"), dtype=np.int64)
    ids_col, mask_col = data.data.column("input_ids"), data.data.column("loss_mask")
    if on_plan:
        on_plan(len(data))
    t0 = time.perf_counter()
    tmp = out.with_name(out.name + ".tmp-export")
    rows_file = out.with_name(out.name + ".tmp-export-rows.arrow")
    shutil.rmtree(tmp, ignore_errors=True)  # both names are ours: a killed export's leftovers
    rows_file.unlink(missing_ok=True)
    stats = {"examples": 0, "target_rows": 0, "padded_rows": 0, "dropped_labels": 0}
    try:
        import pyarrow as pa

        with pa.OSFile(str(rows_file), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            for a in range(0, len(data), cfg.batch_examples):
                b = min(a + cfg.batch_examples, len(data))
                r0, r1 = int(starts[a]), int(starts[b - 1] + counts[b - 1])
                rows = cache.read(r0, r1, FIELDS)
                examples = []
                for e in range(a, b):
                    lo, hi = int(starts[e]) - r0, int(starts[e] + counts[e]) - r0
                    mine = {k: v[lo:hi] for k, v in rows.items()}
                    check_alignment(mine, mine["target_ids"], e)
                    examples.append((np.asarray(ids_col[e].values), np.asarray(mask_col[e].values), mine))
                batch, batch_stats = columns_of(layout, examples)
                for k, v in batch_stats.items():
                    stats[k] += v
                stats["examples"] += b - a
                stats["target_rows"] += r1 - r0
                writer.write_table(pa.Table.from_arrays(list(batch.values()), names=list(batch)).cast(schema))
                if on_examples:
                    on_examples(b - a)
        ds = datasets.Dataset.from_file(str(rows_file))
        ds.save_to_disk(str(tmp))
        del ds
        rows_file.unlink()
        summary = {"kind": "kdcache-export", "format": cfg.format, "out": str(out), "cache": str(cache.path),
                   "data": cfg.data or str(cache.meta["data"]["path"]),
                   **stats, "top_k": cache.k, "vocab_size": cache.vocab_size, "temperatures": cache.temperatures,
                   "teacher": cache.meta.get("teacher"), "tokenizer": cache.meta.get("tokenizer"),
                   "alignment": layout.alignment, "columns": layout.columns, "dropped": layout.dropped,
                   "seconds": time.perf_counter() - t0, "config": to_dict(cfg)}
        write_json(tmp / META_FILENAME, summary)
        save_config(cfg, tmp / "config.yaml")
        if out.exists():  # only what an earlier export wrote; anything else refuses (nothing deleted)
            remove_owned(out, EXPORT)
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        rows_file.unlink(missing_ok=True)
        raise
    return summary


def summary_line(s: dict[str, Any]) -> str:
    """One line for the end of `kdcache export`."""
    extra = f", {s['dropped_labels']} labels dropped (see docs/api.md)" if s.get("dropped_labels") else ""
    return (f"export: {s['examples']} examples, {s['target_rows']} target rows (K = {s['top_k']}) as {s['format']} "
            f"in {s['seconds']:.1f}s{extra} -> {s['out']}")
