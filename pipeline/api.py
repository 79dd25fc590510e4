"""The public API for training with a kdcache cache in your own trainer (docs/api.md).

    from pipeline.api import KDCollator, KDExampleDataset, KDLoss, KDLossConfig, student_target_logits

    ds = KDExampleDataset("runs/demo/prepared", "runs/demo/cache")          # map-style; or KDIterableDataset
    loader = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True, collate_fn=KDCollator())
    kd = KDLoss.from_cache(ds.cache, KDLossConfig(gate="topk", latf=True, idts=True, total_steps=1000))
    for batch in loader:
        out = kd(student_target_logits(model, batch), batch)
        out.loss.backward(); opt.step(); opt.zero_grad()     # out.metrics: kd_loss, ce_loss, tar, ...

Exported names (everything else in `pipeline` may change without notice):

- `KDExampleDataset(data, cache, fields=None)`: map-style torch dataset of examples with targets
- `KDIterableDataset(data, cache, seed=0, shuffle=True, rank=0, world=1)`: one epoch per iter, in
  `kdcache train`'s order; `set_epoch(e)`
- `KDCollator(pad_token_id=0)`: examples -> a batch dict in `MicroBatch`'s layout
- `KDLoss(config, vocab_size, temperatures, top_k)`, `KDLoss.from_cache(cache, config)`: the loss
  module; `end_step()`, `state_dict()` / `load_state_dict()`
- `KDLossConfig`: its typed settings (the KD options of `kdcache train`, plus total_steps, seed, rank)
- `KDOutput`: (loss, metrics) of one call
- `student_target_logits(model, batch)`, `gather_target_logits(logits, batch)`: the student's logits
  at the batch's target positions
- `as_microbatch(batch)`: a collator batch as a `MicroBatch`; `move_batch(batch, device)`
- `to_hf_iterable(ds)`: a `KDExampleDataset` as a `datasets.IterableDataset` (TRL wants one)
- `open_inputs(data, cache)`: open and cross-check prepared data and a cache
- `save_student(model, out, data)`: `save_pretrained` plus the data's tokenizer, written under a
  temporary name and renamed
- `KD_FIELDS`, `IGNORE_INDEX`, `KdError`, `open_cache`
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from pipeline.cache import open_cache
from pipeline.errors import KdError
from pipeline.interop.datasets import (IGNORE_INDEX, KDCollator, KDExampleDataset, KDIterableDataset, as_microbatch,
                                 move_batch, open_inputs, to_hf_iterable)
from pipeline.losses.objective import KD_FIELDS
from pipeline.interop.loss_module import KDLoss, KDLossConfig, KDOutput, gather_target_logits, student_target_logits

__all__ = ["KDExampleDataset", "KDIterableDataset", "KDCollator", "KDLoss", "KDLossConfig", "KDOutput",
           "student_target_logits", "gather_target_logits", "as_microbatch", "move_batch", "open_inputs",
           "to_hf_iterable", "save_student",
           "KD_FIELDS", "IGNORE_INDEX", "KdError", "open_cache"]


def save_student(model: Any, out: str | Path, data: str | Path) -> Path:
    """Write `model.save_pretrained` and the tokenizer the prepared `data` was made with into `out`.

    Written to a fresh temporary directory beside `out` and renamed, so `out` is never half a model.
    `out` must not exist yet (this function never deletes a directory it did not create).
    """
    import tempfile

    from pipeline.models import load_tokenizer
    from pipeline.data.prepare import prepared_meta

    out = Path(out)
    if out.exists():
        raise KdError(f"{out} already exists; choose a new output directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        model.save_pretrained(tmp)
        load_tokenizer(prepared_meta(data)["tokenizer"]["name"]).save_pretrained(tmp)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
