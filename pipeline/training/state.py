"""What a training run directory already holds, compared with the run about to start.

`kdcache train` and `kdcache run` decide from `read_state` whether to start, continue, skip or refuse,
so re-running the same command after Ctrl-C, `kill -9` or a time limit continues the run:

    new      nothing there, or leftovers of a run killed before it saved its settings: start at step 0
    partial  same settings and inputs, no final/: continue from the newest checkpoint
    final    same settings and inputs, final/ written: nothing to do
    changed  other settings or inputs (`changes` names them): refused unless --overwrite (retrain)
             or --resume (continue with the new settings, as before this module existed)

"Same settings" ignores keys that do not change the weights (`IGNORED_KEYS`). The inputs are the
prepared data's fingerprint, the teacher cache's metadata and, for a student started from another
kdcache run's final/ (`init_from`), that run's record: a student is retrained when the cache under
it was rebuilt even though its own config did not change. They are recorded in OUT/kdcache_train.json,
the first file a run writes (so a directory without it holds nothing of ours but leftovers).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.training.checkpoint import complete_checkpoints
from pipeline.config import changes, digest, to_dict
from pipeline.errors import KdError
from pipeline.identity import read_json

RECORD = "kdcache_train.json"
# Keys that say how to run, not what to compute: changing them never makes a run "other".
# (tensorboard: the switch --report-to replaced, still in configs saved before it.)
IGNORED_KEYS = ("resume", "overwrite", "stop_after", "save_every", "read_threads", "report_to", "push_to_hub",
                "tensorboard", "follow_timeout")
_INPUT_NAMES = {"data": "prepared data", "cache": "teacher cache", "student": "init_from model"}


@dataclass
class TrainState:
    """See the module docstring; steps are optimizer steps."""

    kind: str  # new | partial | final | changed
    changes: list[str] = field(default_factory=list)  # config keys: "max_steps 300 -> 12"
    inputs_changed: list[str] = field(default_factory=list)  # "teacher cache", ...
    checkpoint_step: int | None = None  # newest complete checkpoint
    reached_step: int = 0  # last step in metrics.jsonl: how far the previous run got
    final_steps: int | None = None  # steps of final/, when written

    def why(self) -> str:
        """'config changed (max_steps 300 -> 12)', 'inputs changed (teacher cache)', or both."""
        parts = []
        if self.changes:
            parts.append(f"config changed ({', '.join(self.changes)})")
        if self.inputs_changed:
            parts.append(f"inputs changed ({', '.join(self.inputs_changed)})")
        return "; ".join(parts)


def settings_digest(cfg: Any) -> str:
    """sha256 of the settings that determine the weights (the config less `IGNORED_KEYS` and `out`)."""
    d = to_dict(cfg)
    return digest({k: v for k, v in d.items() if k not in (*IGNORED_KEYS, "out")})


def train_inputs(cfg: Any) -> dict[str, str | None]:
    """Fingerprints of what a run reads besides its config: prepared data, cache, starting model.

    Missing inputs raise the same one-line errors training would (prepared data not found, ...).
    """
    from pipeline.cache import layout
    from pipeline.data.prepare import prepared_meta
    from pipeline.models import local_model

    cache_meta = layout.read_meta(cfg.cache) if cfg.cache else None
    data = cfg.data or (cache_meta or {}).get("data", {}).get("path", "")
    record = Path(local_model(cfg.student)) / RECORD if cfg.student else None
    return {"data": prepared_meta(data)["fingerprint"] if data else None,
            "cache": digest(cache_meta) if cache_meta is not None else None,
            "student": digest(json.loads(record.read_text())) if record is not None and record.is_file() else None}


def write_record(out: Path, cfg: Any) -> None:
    """OUT/kdcache_train.json: marks the directory as a training run and records its inputs."""
    from pipeline.identity import write_json

    write_json(out / RECORD, {"kind": "kdcache-train-run", "settings_sha256": settings_digest(cfg),
                              "inputs": train_inputs(cfg)})


def _defaults(cls: type) -> dict[str, Any]:
    """{field: default} of a config dataclass (fields without one are left out)."""
    import dataclasses

    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return to_dict(out)


def _last_step(metrics: Path) -> int:
    step = 0
    if metrics.is_file():
        for ln in metrics.read_text().splitlines():
            try:
                step = max(step, int(json.loads(ln)["step"]))
            except (ValueError, KeyError, TypeError):  # a torn last line of a killed run
                continue
    return step


def effective(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings as they act on the weights: `tail` dropped where nothing is distilled (CE only), and `auto`
    resolved against the cache it reads (`KdOptions.resolved_tail`). So a run saved before `--tail auto` was the
    default (tail: bucket) is the same run as today's default wherever auto picks bucket (a cache without draws,
    CE only, rkl), and a changed run where it picks the draws."""
    from pipeline.cache import layout
    from pipeline.losses.options import KdOptions

    d = dict(settings)
    loss = d.get("loss", "fkl")
    if not (d.get("cache") or d.get("online_teacher")) or loss == "none":
        d.pop("tail", None)
    elif d.get("tail") == "auto":
        codec = {}
        if d.get("cache"):
            try:
                codec = layout.read_meta(d["cache"]).get("codec") or {}
            except (KdError, OSError):  # no cache yet (a run planned before its teacher): compared as given
                return d
        d["tail"] = KdOptions(loss=loss, tail="auto").resolved_tail(int(codec.get("tail_samples", 0)),
                                                                    bool(codec.get("draw_step", 0)))
    return d


def read_state(out: Path, cfg: Any) -> TrainState:
    """Classify `out` against the run `cfg` describes (reads small files only; never writes)."""
    out = Path(out)
    cfg_file = out / "config.yaml"
    if not out.is_dir() or not cfg_file.is_file():
        return TrainState("new")
    try:
        saved = yaml.safe_load(cfg_file.read_text()) or {}
    except yaml.YAMLError:
        saved = {}
    if not isinstance(saved, dict):
        raise KdError(f"{cfg_file} is not a training config (expected a mapping)")
    # A key added to the config after this run was made counts as unchanged while it keeps its default.
    saved = {**_defaults(type(cfg)), **saved}
    diff = changes(effective(saved), effective(to_dict(cfg)), (*IGNORED_KEYS, "out"))
    inputs = []
    if (out / RECORD).is_file():  # runs made before the record existed are compared on settings alone
        old = read_json(out / RECORD, "training run record").get("inputs") or {}
        new = train_inputs(cfg)
        inputs = [label for key, label in _INPUT_NAMES.items() if old.get(key) != new.get(key)]
    ckpts = complete_checkpoints(out)
    state = TrainState("changed" if diff or inputs else "partial", diff, inputs,
                       checkpoint_step=int(ckpts[-1].name.split("_")[1]) if ckpts else None,
                       reached_step=_last_step(out / "metrics.jsonl"))
    final = out / "final" / RECORD
    if final.is_file():
        try:
            state.final_steps = int(json.loads(final.read_text())["steps"])
        except (ValueError, KeyError, TypeError):
            state.final_steps = None
        if state.kind == "partial":
            state.kind = "final"
    return state


def continuing(state: TrainState, total: int) -> str:
    """The line a run prints when it continues an interrupted one: where from, and what is redone."""
    reached = state.reached_step
    if state.checkpoint_step is None:
        redone = f" ({reached} step(s) done before are redone)" if reached else ""
        return f"no checkpoint yet: starting again from step 0 of {total}{redone}"
    c = state.checkpoint_step
    redone = (f"; the previous run had reached step {reached}: {reached - c} step(s) redone" if reached > c
              else "; no steps redone")
    return f"continuing from checkpoint step {c} of {total}{redone}"


def refused(out: str | Path, state: TrainState) -> KdError:
    """The error for a run with other settings, naming them and both ways on."""
    return KdError(f"{out} holds a training run made differently: {state.why()}; pass --overwrite to retrain "
                   "from scratch, or --resume to continue from its checkpoint with these settings")
