"""The end of a finished `kdcache train` run: OUT/final and, with --push-to-hub, its upload.

OUT/final is a Hugging Face model directory: the weights, the student's own tokenizer, kdcache_train.json
(the settings digest and inputs, and what the model card says) and the model card of
`pipeline.training.model_card`. It is written under final.tmp and swapped in, so it is complete or absent.
`--push-to-hub OWNER/NAME` uploads it (`pipeline.training.hub`): what can be checked without the network is
checked before training starts (`check_push`), and re-running a finished command pushes again.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from pipeline.training.checkpoint import replace_dir
from pipeline.training.config import TrainConfig
from pipeline.training.state import IGNORED_KEYS, settings_digest, train_inputs

FINAL_DIR = "final"


def save_final(out: Path, cfg: TrainConfig, model: Any, tokenizer: Any | None, *, steps: int, tokens_seen: int,
               data_path: str, prepared_meta: dict[str, Any], cache: Any | None,
               held_out_last: dict[str, Any] | None, weights: dict[str, torch.Tensor] | None = None) -> None:
    """Write OUT/final from `model` (or `weights`, the gathered full state under FSDP) after `steps` steps.

    Its kdcache_train.json carries the settings digest and inputs, so a student started from this
    model (`init_from`) is retrained when this one is retrained with other settings, and what the
    card says (`pipeline.training.model_card`: `cache` is the run's cache, recorded when distilling;
    `held_out_last` the latest held-out figures, if any).
    """
    from pipeline.training.model_card import card_record, write_card

    tmp = out / f"{FINAL_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    # weights: the gathered full state under FSDP (a copy: save_pretrained edits the dict it is given)
    model.save_pretrained(tmp, state_dict=dict(weights) if weights is not None else None)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    record = {"steps": steps, "data": data_path, "cache": cfg.cache,
              "tokenizer": prepared_meta["tokenizer"], "settings_sha256": settings_digest(cfg),
              "inputs": train_inputs(cfg),
              **card_record(cfg, IGNORED_KEYS, steps, tokens_seen, cache if cfg.distills else None, prepared_meta,
                            held_out_last)}
    (tmp / "kdcache_train.json").write_text(json.dumps(record, indent=2))
    write_card(tmp, out.resolve().name)
    replace_dir(tmp, out / FINAL_DIR)


def check_push(repo: str) -> None:
    """Refuse, before any training, a --push-to-hub that cannot succeed (repo id, token; no network)."""
    from pipeline.training.hub import check_can_push

    check_can_push(repo)


def push_final(out: Path, repo: str) -> str:
    """Upload OUT/final to the Hub repo `repo` (see `pipeline.training.hub`); returns its URL."""
    from pipeline.training.hub import push

    return push(out / FINAL_DIR, repo, f"kdcache train: {out.resolve().name}")
