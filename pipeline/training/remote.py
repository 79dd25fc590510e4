"""A training run at an fsspec URL: `kdcache train --out s3://bucket/runs/kd`.

The run trains in a local working directory (a staging directory, `pipeline.storage.staging`, removed at the
end) and the URL follows it unit by unit (`pipeline.storage.synced`): each checkpoint as soon as it is written
(its files, then its `_COMMIT.json`), with metrics.jsonl, the run record and config.yaml, best/ when it
changed; final/ last. Every launch first pulls what the URL holds (the record, config, metrics, the newest
committed checkpoint, best/, final/, each file checked against its commit record), so the same command re-run
after a kill -9, here or on a fresh machine, continues from the newest checkpoint the URL holds, with the
weights of an uninterrupted run; a finished run is skipped (told from its small files and final record alone,
before the lease: nothing downloaded or written); other settings are refused, or start over with
--overwrite (the old run's objects deleted first) or continue with --resume, as on a local disk.

Before any work: anything under the URL that train does not write refuses the run (one line naming it), and
rank 0 takes the URL's lease (`pipeline.storage.lease`: a second launch on the same URL is refused; a launch
whose lease another took stops at its next checkpoint). Every torchrun rank pulls its own copy (ranks of a
multi-node launch share no disk); rank 0 uploads.
"""

from __future__ import annotations

import os
import re
from contextlib import nullcontext
from pathlib import Path, PurePosixPath
from typing import Any, Callable

from pipeline.ownership import TRAIN, claim
from pipeline.storage import store_for
from pipeline.storage.lease import Lease
from pipeline.storage.staging import refuse_foreign, rmtree_quiet, staging_dir
from pipeline.storage.synced import SyncedDir, SyncLayout
from pipeline.training.config import TrainConfig
from pipeline.training.final import FINAL_DIR, check_push, push_final
from pipeline.training.state import RECORD, TrainState, read_state
from pipeline.training.summary import SUMMARY_FILENAME, skipped_summary

# What a run keeps under its URL. config.yaml is uploaded last of the loose files: a URL without it holds no
# run yet (`read_state`: "new"), whatever else a killed first upload left.
LAYOUT = SyncLayout(
    files=("metrics.jsonl", SUMMARY_FILENAME, RECORD, "config.yaml"),
    marker=RECORD,
    units=re.compile(r"checkpoints/step_\d{6}|final|best|tensorboard|wandb"),
    series=re.compile(r"checkpoints/step_\d{6}"),
    last=(FINAL_DIR,),
    nested=re.compile(r"eval/(config\.yaml|eval\.json)"),  # `kdcache eval --out URL/eval` of this run
)


def _peek(synced: SyncedDir, local: Path, cfg: TrainConfig) -> TrainState:
    """The run's state from its small files and final record, pulled into `local` (no weights, nothing written
    to the store)."""
    local.mkdir(parents=True, exist_ok=True)
    synced.pull(local, units=False)
    record = synced.unit_file(FINAL_DIR, RECORD)
    if record is not None:  # what read_state needs to tell a finished run
        (local / FINAL_DIR).mkdir()
        (local / FINAL_DIR / RECORD).write_bytes(record)
    return read_state(local, cfg)


def train_at_url(cfg: TrainConfig, writes: tuple[str, ...], run: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    """`pipeline.training.trainer.train` for an --out URL (see the module docstring). `writes`: what a run
    writes in its directory; `run(local, state, own, on_save)` trains in the local directory `local` and
    returns the summary (the trainer's, passed in: this module is below it)."""
    rank = int(os.environ.get("RANK", "0"))
    synced = SyncedDir(store_for(cfg.out), LAYOUT)
    if rank == 0:
        refuse_foreign(synced.store, LAYOUT.is_ours, "train")
    root = staging_dir("train")
    local = root / (PurePosixPath(synced.store.url).name or "run")  # the model card names the run by it
    try:
        if not (cfg.overwrite or cfg.resume or cfg.push_to_hub):
            # A finished run is told without the lease (read only: final/ is uploaded last, so a run whose final
            # record is there with these settings is done, whoever else looks at it): no lease's settling second.
            state = _peek(synced, root / "peek", cfg)
            if state.kind == "final":
                return skipped_summary(cfg.out, state)
        with (Lease(cfg.out, "train") if rank == 0 else nullcontext()) as lease, \
                (claim(local, TRAIN) if rank == 0 else nullcontext(None)) as own:
            if own is not None:
                own.writing(*writes)  # what the pull brings is the run's, as if this run had written it
            state = _peek(synced, local, cfg)  # again, under the lease: first the small files
            if state.kind == "final" and not (cfg.overwrite or cfg.resume) and not cfg.push_to_hub:
                return skipped_summary(cfg.out, state)
            rmtree_quiet(local / FINAL_DIR)
            synced.pull_units()
            state = read_state(local, cfg)  # with the checkpoints
            if state.kind == "final" and not (cfg.overwrite or cfg.resume):
                summary = skipped_summary(cfg.out, state)
                if cfg.push_to_hub and rank == 0:
                    check_push(cfg.push_to_hub)
                    summary["pushed"] = push_final(local, cfg.push_to_hub)
                return summary

            def upload() -> None:
                lease.check()  # a launch whose lease was taken stops here, before it writes over the other's
                synced.push()

            summary = run(local, state, own, upload if rank == 0 else None)
            if rank == 0:
                upload()  # final/, best/, the summary: what the run wrote after its last checkpoint
            return summary
    finally:
        rmtree_quiet(root)
