"""`kdcache run CONFIG`: the stages a config lists, in dependency order, on one directory layout.

    kdcache run configs/demo.yaml

Layout under `out` (the run owns every path, so sections only hold settings):

    prepared/<split>/     one `kdcache prepare` output per entry of `prepare` (train, heldout, ...)
    teacher/              the teacher trained with `kdcache train` (only when `teacher.train` is given)
    cache/                the teacher cache, made from prepared/train
    cache_<split>/        the teacher cache of the eval split (held-out agreement and KL)
    students/<name>/      one `kdcache train` run per entry of `students`, all from the same cache;
                          `init_from: <other>` starts a student from another's final model
    students/<name>/eval/ `kdcache eval` on prepared/<eval.split> (+ teacher/eval for the teacher)
    report/               `kdcache report` over all students

Every stage is idempotent for the same resolved config (prepare and teacher skip finished work,
train resumes from its newest checkpoint or is skipped when final, eval is skipped when its
eval.json was made with the same settings), so re-running after an interruption continues.
When settings changed, each stage says what it redoes and why, naming the changed keys:
prepared data and students are redone (a student also when its cache, data or `init_from` base
changed: `pipeline.train_state`); a teacher cache, hours of GPU time, is never replaced unasked
(`--set teacher.overwrite=true` does). Replacing an output removes only what kdcache wrote there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from pipeline.config import changes, from_dict, load_yaml, merge, parse_sets, to_dict
from pipeline.errors import Interrupted, KdError, StaleOutput

log = logging.getLogger(__name__)

STAGES = ("prepare", "teacher", "train", "eval", "report")


@dataclass
class RunConfig:
    """Settings of `kdcache run`: shared layout plus one section per stage."""

    out: str = "runs/demo"
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    prepare: dict[str, Any] = field(default_factory=dict)  # split name -> PrepareConfig keys
    teacher: dict[str, Any] = field(default_factory=dict)  # model, train (optional TrainConfig keys), cache keys
    train_defaults: dict[str, Any] = field(default_factory=dict)  # TrainConfig keys shared by every student
    students: dict[str, Any] = field(default_factory=dict)  # name -> TrainConfig keys
    eval: dict[str, Any] = field(default_factory=dict)  # split + EvalConfig keys
    report: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        bad = [s for s in self.stages if s not in STAGES]
        if bad:
            raise KdError(f"unknown stage(s) {bad}; stages are {', '.join(STAGES)}")
        if "train" not in self.prepare and ("teacher" in self.stages or "train" in self.stages):
            raise KdError("the prepare section needs a 'train' entry (the data the teacher caches)")


def load_run_config(path: str | None, sets: tuple[str, ...] = (), override: str | None = None) -> RunConfig:
    """Read a run config: `path`, then the `override` file (`--config`, merged section by section), then
    `--set section.key=value` overrides of nested keys. Either file alone is enough."""
    if not path and not override:
        raise KdError("no run config given (kdcache run CONFIG.yaml, or --config FILE)")
    data = load_yaml(path) if path else {}
    if override:
        data = merge(data, load_yaml(override))
    return from_dict(RunConfig, merge(data, parse_sets(sets)))


def select_stages(cfg: RunConfig, only: str | None, start: str | None) -> list[str]:
    """The stages to run: the config's, restricted by --only or --from, in dependency order."""
    chosen = [s for s in STAGES if s in cfg.stages]
    for opt, name in (("--only", only), ("--from", start)):
        if name and name not in STAGES:
            raise KdError(f"{opt} {name}: stages are {', '.join(STAGES)}")
    if only:
        return [only]
    if start:
        return [s for s in chosen if STAGES.index(s) >= STAGES.index(start)]
    return chosen


class Pipeline:
    """Runs the stages of a `RunConfig`; `echo` receives one summary line per stage."""

    def __init__(self, cfg: RunConfig, echo: Callable[[str], None] = print, progress: bool = True):
        self.cfg, self.echo, self.progress = cfg, echo, progress
        self.out = Path(cfg.out)

    # ---- paths ----------------------------------------------------------------------------
    def prepared(self, split: str) -> Path:
        return self.out / "prepared" / split

    @property
    def cache(self) -> Path:
        return self.out / "cache"

    @property
    def teacher_model(self) -> str:
        if self.cfg.teacher.get("train"):
            return str(self.out / "teacher" / "final")
        model = self.cfg.teacher.get("model")
        if not model:
            raise KdError("the teacher section needs 'model' (a path or hub id) or a 'train' section")
        return str(model)

    @property
    def eval_split(self) -> str:
        return str(self.cfg.eval.get("split", "heldout"))

    @property
    def eval_cache(self) -> Path:
        return self.out / f"cache_{self.eval_split}"

    def student_dir(self, name: str) -> Path:
        return self.out / "students" / name

    # ---- stages ---------------------------------------------------------------------------
    def run(self, stages: list[str]) -> None:
        for s in stages:
            getattr(self, f"stage_{s}")()

    def stage_prepare(self) -> None:
        from pipeline.prepare import PrepareConfig, prepare, summary_line

        for split, section in self.cfg.prepare.items():
            pc = from_dict(PrepareConfig, {**section, "out": str(self.prepared(split))})
            try:
                meta = prepare(pc, progress=self.progress)
            except StaleOutput as e:  # the run owns prepared/: cheap to redo, so redo it and say why
                self.echo(f"prepare[{split}]: settings changed ({', '.join(e.changes)}): re-preparing")
                pc.overwrite = True
                meta = prepare(pc, progress=self.progress)
            self.echo(f"prepare[{split}]: " + summary_line(meta, pc.out).removeprefix("prepare: "))

    def stage_teacher(self) -> None:
        from pipeline.teacher import TeacherConfig, run_teacher

        section = dict(self.cfg.teacher)
        train_section = section.pop("train", None)
        section.pop("model", None)
        if train_section:
            self._train_one("teacher", self.out / "teacher", train_section, with_cache=False)
        # The train split feeds the students; the eval split's cache lets `eval` measure held-out
        # teacher agreement and KL (a few seconds: it is small).
        targets = [("train", self.cache)]
        split = self.eval_split
        if "eval" in self.cfg.stages and split in self.cfg.prepare and split != "train":
            targets.append((split, self.eval_cache))
        for name, cache in targets:
            tc = from_dict(TeacherConfig, {**section, "data": str(self.prepared(name)), "model": self.teacher_model,
                                           "out": str(cache)})
            try:
                s = run_teacher(tc)
            except StaleOutput as e:
                raise KdError(f"teacher[{name}]: {cache} holds a cache made with other settings "
                              f"({', '.join(e.changes)}); it is kept (a teacher pass can take hours): re-run with "
                              "--set teacher.overwrite=true to replace it") from None
            if s["done"] == 0 and s["skipped"] == s["shards"]:
                self.echo(f"teacher[{name}]: cache {cache} already complete; skipped")
            else:
                self.echo(f"teacher[{name}]: cached {s['rows']} rows in {s['done']} shard(s), "
                          f"{s['seconds']:.1f}s -> {cache}")

    def stage_train(self) -> None:
        if not self.cfg.students:
            raise KdError("the students section is empty: nothing to train")
        for name in student_order(self.cfg.students):
            section = merge(self.cfg.train_defaults, self.cfg.students[name] or {})
            base = section.pop("init_from", None)
            if base:  # start from another student's final model (e.g. a shared CE warm start)
                section.pop("student_config", None)
                section["student"] = str(self.student_dir(base) / "final")
            self._train_one(name, self.student_dir(name), section, with_cache=True)

    def _train_one(self, name: str, out: Path, section: dict[str, Any], with_cache: bool) -> None:
        from pipeline.train import summary_line, train
        from pipeline.train_config import TrainConfig
        from pipeline.train_state import read_state

        keys = {**section, "data": str(self.prepared("train")), "out": str(out)}
        # The run owns the cache path; `cache: false` in a section opts a student out of it.
        if keys.pop("cache", True) is not False and with_cache and keys.get("loss", "fkl") != "none":
            keys["cache"] = str(self.cache)
        tc = from_dict(TrainConfig, keys)
        state = read_state(out, tc)
        if state.kind == "final" and not tc.overwrite:
            self.echo(f"train[{name}]: {out}/final is complete for this config; skipped")
            return
        # The run owns students/<name>: other settings retrain it (the trainer says which keys changed);
        # the same settings continue from the newest checkpoint.
        tc.overwrite = tc.overwrite or state.kind == "changed"
        try:
            s = train(tc, progress=self.progress, echo=lambda m: self.echo(f"train[{name}]: {m}"))
        except Interrupted as e:  # say which student the checkpoint belongs to
            raise Interrupted(f"train[{name}]: {e}") from None
        self.echo(f"train[{name}]: " + summary_line(s).removeprefix("train: "))

    def stage_eval(self) -> None:
        from pipeline.evaluate import EvalConfig, evaluate

        section = dict(self.cfg.eval)
        section.pop("split", None)
        data = self.prepared(self.eval_split)
        if (self.eval_cache / "kdcache.json").exists():
            section.setdefault("cache", str(self.eval_cache))
        models = [(name, self.student_dir(name)) for name in self.cfg.students]
        if self.cfg.teacher.get("train") or self.cfg.teacher.get("model"):
            models.insert(0, ("teacher", self.out / "teacher"))
        for name, run_dir in models:
            model = self.teacher_model if name == "teacher" else str(run_dir / "final")
            if name != "teacher" and not Path(model).is_dir():  # e.g. trained with stop_after: not finished
                self.echo(f"eval[{name}]: {model} is not written yet (training unfinished); skipped")
                continue
            ec = from_dict(EvalConfig, {**section, "model": model, "data": str(data), "out": str(run_dir / "eval")})
            if eval_done(ec):
                self.echo(f"eval[{name}]: {ec.out}/eval.json is up to date; skipped")
                continue
            diff = eval_changes(ec)
            if diff:
                self.echo(f"eval[{name}]: settings changed ({', '.join(diff)}): re-evaluating")
            res = evaluate(ec, progress=self.progress)
            self.echo(f"eval[{name}]: ce {res['ce']:.4f}, ppl {res['ppl']:.2f}"
                      + (f", exact match {res['exact_match']:.3f}" if "exact_match" in res else "") + f" -> {ec.out}")

    def stage_report(self) -> None:
        from pipeline.report import ReportConfig, report

        runs = [str(self.student_dir(n)) for n in self.cfg.students]
        teacher = str(self.out / "teacher") if (self.out / "teacher" / "eval").exists() else ""
        rc = from_dict(ReportConfig, {**self.cfg.report, "runs": runs, "teacher": teacher,
                                      "out": str(self.out / "report"), "cache": str(self.cache)})
        path = report(rc)
        self.echo(f"report: {path}")


def student_order(students: dict[str, Any]) -> list[str]:
    """Student names with every `init_from` base before the students that start from it."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order:
            return
        if name not in students:
            raise KdError(f"init_from: no student named {name!r} (students: {', '.join(students)})")
        if name in visiting:
            raise KdError(f"init_from forms a cycle through student {name!r}")
        visiting.add(name)
        base = (students[name] or {}).get("init_from")
        if base:
            visit(base)
        order.append(name)

    for n in students:
        visit(n)
    return order


def eval_done(ec: Any) -> bool:
    """True when `ec.out` holds an eval.json made with the same resolved settings."""
    out = Path(ec.out)
    if not (out / "eval.json").is_file() or not (out / "config.yaml").is_file():
        return False
    return (yaml.safe_load((out / "config.yaml").read_text()) or {}) == to_dict(ec)


def eval_changes(ec: Any) -> list[str]:
    """The settings that differ from those of the eval.json in `ec.out` ([] when there is none)."""
    out = Path(ec.out)
    if not (out / "eval.json").is_file() or not (out / "config.yaml").is_file():
        return []
    return changes(yaml.safe_load((out / "config.yaml").read_text()) or {}, to_dict(ec))
