"""`kdcache export`: a cache and its prepared data as a Hugging Face dataset in the layout another tool reads.

    kdcache export runs/demo/cache --format axolotl --out runs/demo/export-axolotl

One row per example, saved with `datasets.Dataset.save_to_disk` (read back with `load_from_disk`).
Log-probs are the cache's: log p of the teacher at T = 1 (its plain softmax) normalised over its FULL
vocabulary (decoded, float32), never renormalised over the K cached ids nor rescaled to another
temperature. Every cache field a format leaves out is named, with why, in the summary line and in
OUT/kdcache_export.json ("dropped"); what each reader needs is in docs/api.md ("Export"). The layouts, in
brief (L tokens, n targets, K cached ids; "row j" describes the token input_ids[j + 1], i.e. what the
model predicts from position j):

- hf-datasets (kdcache's own): input_ids, loss_mask, labels; per target: target_positions [n],
  topk_ids [n][K], topk_logprobs [n][K], tail_logprob [n] (log of the mass outside the top K, so the
  K + 1 buckets are complete), target_logprobs [n].
- axolotl (its KD plugin, `axolotl/integrations/kd`): input_ids int32, attention_mask int8, labels
  int32, target_token_ids int32 / target_logprobs float32 / target_mask bool [L][K or 0]; row j <->
  input_ids[j + 1]; row j is empty where labels[j + 1] == -100 and on the last row (axolotl's collator
  pads it with id 0, log-prob -1e9, mask 0), else K ids, K log-probs and K true mask values.
- distillkit (its raw top-k rows, what `LogprobCompressor.decompress_to_sparse` returns as-is for a
  row with `token_ids` and `top_values`): input_ids int32, labels int32, token_ids int32 / top_values
  float32 [L - 1][K] (fixed-size lists), row j <-> input_ids[j + 1], as DistillKit's vLLM capture lays
  them out before `pack_logits`.

Both readers turn every column into tensors from Python lists (int64 / float32 / int whatever the Arrow
type; pipeline/interop/export_layouts.py cites where), so the narrowest exact types are written.

The dataset is built in a staging directory inside --out (`.kdcache/`) and its files renamed into place,
kdcache_export.json last; `--overwrite` replaces only what an earlier export wrote (its manifest:
`pipeline.ownership`).
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np

from pipeline.config import save_config, to_dict
from pipeline.errors import KdError
from pipeline.interop.export_layouts import LAYOUTS, LOGPROB_TEMPERATURE, columns_of
from pipeline.identity import write_json
from pipeline.ownership import EXPORT, MANIFEST_FILENAME, STATE_DIR, Output, claim
from pipeline.storage import is_url, store_for

log = logging.getLogger(__name__)

FORMATS = tuple(LAYOUTS)
META_FILENAME = "kdcache_export.json"
# Decoded per batch: what the layouts use, plus the data's tokens and the rank that checks them.
FIELDS = ("topk_ids", "topk_logprobs", "tail_logprob", "target_logprobs", "target_rank", "target_ids")


@dataclass
class ExportConfig:
    """Settings of `kdcache export`."""

    URL_FIELDS: ClassVar[tuple[str, ...]] = ("cache", "data", "out")  # may be an fsspec URL (pipeline.storage)

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
    if not cfg.cache:
        raise KdError("no cache given (kdcache export CACHE)")
    if not cfg.out:
        raise KdError("no output directory given (--out DIR)")
    if is_url(cfg.out):
        return _export_to_url(cfg, on_examples, on_plan)
    # Before any work: the lock, and every file in OUT checked to be export's (never replace anything else).
    with claim(cfg.out, EXPORT) as own:
        return _export(cfg, own, on_examples, on_plan)


# What an export uploads: the dataset's files, its config and record, its manifest (nothing else is its own).
_OURS = re.compile(r"data-\d{5}-of-\d{5}\.arrow|dataset_info\.json|state\.json|config\.yaml|"
                   + re.escape(META_FILENAME) + "|" + re.escape(f"{STATE_DIR}/{MANIFEST_FILENAME}"))


def _export_to_url(cfg: ExportConfig, on_examples: Callable[[int], None] | None,
                   on_plan: Callable[[int], None] | None) -> dict[str, Any]:
    """--out at a URL: anything there but an export's own files refuses first; the export is written in a local
    staging directory, then uploaded with its manifest before and kdcache_export.json last (the old record
    deleted first), as prepared data is: `datasets.load_from_disk(URL, storage_options=...)` reads it."""
    from pipeline.data.remote import upload_dataset_dir
    from pipeline.storage.staging import refuse_foreign, rmtree_quiet, staging_dir

    store = store_for(cfg.out)
    there = refuse_foreign(store, lambda rel: bool(_OURS.fullmatch(rel)), "export")
    if META_FILENAME in there and not cfg.overwrite:
        raise KdError(f"{cfg.out} already holds an export; pass --overwrite to replace it")
    local = staging_dir("export") / "export"
    try:
        with claim(str(local), EXPORT) as own:
            summary = _export(cfg, own, on_examples, on_plan, local)
        upload_dataset_dir(local, store, META_FILENAME, lambda rel: bool(_OURS.fullmatch(rel)))
    finally:
        rmtree_quiet(local.parent)
    return summary


def _export(cfg: ExportConfig, own: Output, on_examples: Callable[[int], None] | None,
            on_plan: Callable[[int], None] | None, write_to: Path | None = None) -> dict[str, Any]:
    """The export, written to `write_to` (default --out; a staging directory for a URL, while the record and
    config.yaml name --out)."""
    import datasets

    from pipeline.interop.datasets import check_alignment, open_inputs

    out = Path(write_to or cfg.out)
    if (out / META_FILENAME).exists() and not cfg.overwrite:
        raise KdError(f"{out} already holds an export; pass --overwrite to replace it")
    data, cache = open_inputs(cfg.data or None, cfg.cache)
    if cache.vocab_size >= 2**31:
        raise KdError(f"teacher vocabulary {cache.vocab_size} does not fit the int32 id columns")
    layout = LAYOUTS[cfg.format]
    features = layout.features(cache.k)
    schema = features.arrow_schema
    starts = np.asarray(cache.index.column("row_start"), dtype=np.int64)
    counts = np.asarray(cache.index.column("row_count"), dtype=np.int64)
    ids_col, mask_col = data.data.column("input_ids"), data.data.column("loss_mask")
    if on_plan:
        on_plan(len(data))
    t0 = time.perf_counter()
    staging = own.staging()  # inside OUT/.kdcache: a killed export's leftovers go with the next claim
    tmp, rows_file = staging / "dataset", staging / "rows.arrow"
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
        data_bytes = sum(p.stat().st_size for p in tmp.glob("data-*.arrow"))
        summary = {"kind": "kdcache-export", "format": cfg.format, "out": str(cfg.out), "cache": str(cache.path),
                   "data": cfg.data or str(cache.meta["data"]["path"]),
                   **stats, "top_k": cache.k, "vocab_size": cache.vocab_size,
                   "logprob_temperature": LOGPROB_TEMPERATURE,
                   "logprobs": "log p of the teacher at T = 1 (its plain softmax), normalised over its full "
                               "vocabulary: not renormalised over the K ids, not rescaled to another temperature",
                   "teacher": cache.meta.get("teacher"), "tokenizer": cache.meta.get("tokenizer"),
                   "alignment": layout.alignment, "columns": layout.columns,
                   "dropped": layout.dropped(cache.temperatures, cache.tail_samples),
                   "data_bytes": data_bytes, "bytes_per_target_row": data_bytes / max(stats["target_rows"], 1),
                   "seconds": time.perf_counter() - t0, "config": to_dict(cfg)}
        write_json(tmp / META_FILENAME, summary)
        save_config(cfg, tmp / "config.yaml")
        own.remove_owned()  # only what an earlier export wrote (`claim` refused anything else)
        own.move_in(tmp, last=(META_FILENAME,))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return summary


def summary_line(s: dict[str, Any]) -> str:
    """One line for the end of `kdcache export`: what was written, at which temperature, and every cache
    field left out (why each is in kdcache_export.json)."""
    extra = f", {s['dropped_labels']} labels dropped (see docs/api.md)" if s.get("dropped_labels") else ""
    dropped = ", ".join(s["dropped"]) or "nothing"
    return (f"export: {s['examples']} examples, {s['target_rows']} target rows (K = {s['top_k']}, log-probs at "
            f"T = {s['logprob_temperature']:g}) as {s['format']}, {s['bytes_per_target_row']:.0f} bytes/row, "
            f"in {s['seconds']:.1f}s{extra} -> {s['out']}; dropped: {dropped}")
