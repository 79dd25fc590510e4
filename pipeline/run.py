"""`kdcache run CONFIG`: the stages a config lists, in dependency order, on one directory layout.

    kdcache run configs/demo.yaml

Layout under `out` (the run owns every path, so sections only hold settings):

    corpus/               the real-text corpus and its tokenizer (only with a `corpus` section:
                          `pipeline.data.stdlib_corpus`); prepare entries name it as "{corpus}/train.jsonl"
    prepared/<split>/     one `kdcache prepare` output per entry of `prepare` (train, heldout, ...)
    teacher/              the teacher trained with `kdcache train` (only when `teacher.train` is given;
                          `teacher.train.split` names the prepared split it trains on, default train)
    cache/                the teacher cache, made from prepared/train
    cache_<split>/        the teacher cache of the eval split (held-out agreement and KL)
    students/<name>/      one `kdcache train` run per entry of `students`, all from the same cache;
                          `init_from: <other>` starts a student from another's final model
    students/<name>/eval/ `kdcache eval` on prepared/<eval.split> (+ teacher/eval for the teacher)
    report/               `kdcache report` over all students

`out` may be an fsspec URL (s3://bucket/runs/x): every output above is then written there by its stage's own
remote path (prepared data, caches, training runs, evaluations, the report), except corpus/, the local text
`prepare` reads, which is built under $KDCACHE_LOCAL_CACHE/runs/<key>/corpus on the machine that runs `prepare`.

Each stage ends with a line of its wall time (`stage train: 73.2 s`), through the same echo as its other lines.

Several teachers (`teachers: {name: section, ...}` instead of `teacher`): each has teachers/<name>/ (its
trained model and eval) and caches/<name>/, caches/<name>_<split>/; a distilling student names its own with `teacher: <name>`,
and students that distil nothing are evaluated against the first teacher listed. Two teachers may share one
model (the same `model`, other cache settings: K = 8 and K = 32, with and without tail draws): the model is
evaluated once (in the first one's eval/), and the report names each student's own teacher. `seeds: [0, 1, 2]`
trains every student once per seed, as students/<name>_s<seed>/, each `init_from` resolved to the same
seed's copy of the base (so every method of one seed starts from the same warm start). A distilling student with
`online: true` is the benchmark's reference arm: its teacher's model runs on every micro-batch and the student
learns from the full distribution, no cache (`pipeline/training/online.py`; the report compares every cached
method of that teacher with it, seed by seed).

Every stage is idempotent for the same resolved config (prepare and teacher skip finished work,
train resumes from its newest checkpoint or is skipped when final, eval is skipped when its
eval.json was made with the same settings), so re-running after an interruption continues.
When settings changed, each stage says what it redoes and why, naming the changed keys:
prepared data and students are redone (a student also when its cache, data or `init_from` base
changed: `pipeline.training.state`); a teacher cache, hours of GPU time, is never replaced unasked
(`--set teacher.overwrite=true` does), except that of a teacher the run trains itself (`train:`), which
follows its teacher. Replacing an output removes only what kdcache wrote there.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar


from pipeline.config import changes, from_dict, load_yaml, merge, parse_sets, to_dict
from pipeline.errors import Interrupted, KdError, StaleOutput
from pipeline.storage import is_url, join, store_for

log = logging.getLogger(__name__)

STAGES = ("prepare", "teacher", "train", "eval", "report")


@dataclass
class RunConfig:
    """Settings of `kdcache run`: shared layout plus one section per stage."""

    URL_FIELDS: ClassVar[tuple[str, ...]] = ("out",)  # may be an fsspec URL: every stage's output goes under it

    out: str = "runs/demo"
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    corpus: dict[str, Any] = field(default_factory=dict)  # CorpusConfig keys: built under out/corpus first
    prepare: dict[str, Any] = field(default_factory=dict)  # split name -> PrepareConfig keys
    teacher: dict[str, Any] = field(default_factory=dict)  # model, train (optional TrainConfig keys), cache keys
    teachers: dict[str, Any] = field(default_factory=dict)  # name -> a `teacher` section (several teachers)
    train_defaults: dict[str, Any] = field(default_factory=dict)  # TrainConfig keys shared by every student
    students: dict[str, Any] = field(default_factory=dict)  # name -> TrainConfig keys (+ init_from, teacher)
    seeds: list[int] = field(default_factory=list)  # train every student once per seed (<name>_s<seed>)
    eval: dict[str, Any] = field(default_factory=dict)  # split + EvalConfig keys
    report: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        bad = [s for s in self.stages if s not in STAGES]
        if bad:
            raise KdError(f"unknown stage(s) {bad}; stages are {', '.join(STAGES)}")
        if "train" not in self.prepare and ("teacher" in self.stages or "train" in self.stages):
            raise KdError("the prepare section needs a 'train' entry (the data the teacher caches)")
        if self.teacher and self.teachers:
            raise KdError("give either a teacher section or a teachers section (name -> teacher), not both")
        if len(set(self.seeds)) != len(self.seeds) or any(not isinstance(x, int) for x in self.seeds):
            raise KdError(f"seeds must be distinct integers, got {self.seeds}")
        if self.seeds and any("seed" in (v or {}) for v in self.students.values()):
            raise KdError("with seeds: [...] the seed of each copy is set by the run; remove 'seed' from the students")


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


class RemoteDir(str):
    """A directory of the run at a URL (`out: s3://bucket/runs/x`), used where a `Path` is for a local run:
    `/`, `.name`, `.with_name`."""

    def __truediv__(self, part: str) -> "RemoteDir":
        return RemoteDir(join(self, part))

    @property
    def name(self) -> str:
        return self.rstrip("/").rsplit("/", 1)[-1]

    def with_name(self, name: str) -> "RemoteDir":
        return RemoteDir(self.rstrip("/").rsplit("/", 1)[0] + "/" + name)


def has_file(base: Path | str, rel: str) -> bool:
    """Is there a file `rel` under the run's directory `base` (local, or at a URL)?"""
    if isinstance(base, RemoteDir):
        return store_for(str(base)).exists(rel)
    return (Path(base) / rel).is_file()


@dataclass
class TeacherSlot:
    """One teacher of a run: its section and where its model, caches and eval live."""

    name: str
    section: dict[str, Any]
    root: Path | RemoteDir  # its run directory (trained model, eval/): out/teacher or out/teachers/<name>
    cache: Path | RemoteDir  # the cache of prepared/train: out/cache or out/caches/<name>

    def cache_of(self, split: str) -> Path | RemoteDir:
        """The cache of another prepared split, beside the train cache: cache_<split> or <name>_<split>."""
        return self.cache.with_name(f"{self.cache.name}_{split}")

    @property
    def label(self) -> str:
        return "teacher" if self.name == "teacher" and self.root.name == "teacher" else f"teacher {self.name}"

    @property
    def model(self) -> str:
        if self.section.get("train"):
            return str(self.root / "final")
        model = self.section.get("model")
        if not model:
            raise KdError(f"{self.label}: the section needs 'model' (a path or hub id) or a 'train' section")
        return str(model)

    @property
    def model_key(self) -> tuple[str, str]:
        """What identifies the model (a local path resolved, else the hub id; its revision): slots with the same
        key hold one model, evaluated once. A section without a model is its own (the teacher stage names it)."""
        try:
            model = self.model
        except KdError:
            return (f"slot:{self.name}", "")
        path = Path(model).expanduser()
        return (str(path.resolve()) if path.exists() else model, str(self.section.get("revision") or ""))


class Pipeline:
    """Runs the stages of a `RunConfig`; `echo` receives one summary line per stage."""

    def __init__(self, cfg: RunConfig, echo: Callable[[str], None] = print, progress: bool = True):
        self.cfg, self.echo, self.progress = cfg, echo, progress
        self.out: Path | RemoteDir = RemoteDir(cfg.out.rstrip("/")) if is_url(cfg.out) else Path(cfg.out)
        if cfg.teachers:
            self.teachers = [TeacherSlot(n, dict(sec or {}), self.out / "teachers" / n, self.out / "caches" / n)
                             for n, sec in cfg.teachers.items()]
        elif cfg.teacher:
            self.teachers = [TeacherSlot("teacher", dict(cfg.teacher), self.out / "teacher", self.out / "cache")]
        else:
            self.teachers = []
        self.students = expand_seeds(cfg.students, cfg.seeds)

    # ---- paths ----------------------------------------------------------------------------
    def prepared(self, split: str) -> Path | RemoteDir:
        return self.out / "prepared" / split

    @property
    def corpus_dir(self) -> Path:
        """out/corpus; for a run at a URL a local directory (the corpus is this machine's text, the input of
        `prepare`, which uploads what it prepares): under $KDCACHE_LOCAL_CACHE, one per run URL."""
        if isinstance(self.out, RemoteDir):
            import hashlib

            from pipeline.storage.staging import default_root

            return default_root() / "runs" / hashlib.sha256(self.out.encode()).hexdigest()[:16] / "corpus"
        return self.out / "corpus"

    def teacher_slot(self, name: str | None) -> TeacherSlot:
        """The teacher called `name` (None: the only or the first one)."""
        if not self.teachers:
            raise KdError("the run has no teacher section")
        if name is None:
            return self.teachers[0]
        for t in self.teachers:
            if t.name == name:
                return t
        raise KdError(f"no teacher named {name!r} (teachers: {', '.join(t.name for t in self.teachers)})")

    def student_teacher(self, name: str) -> TeacherSlot | None:
        """The teacher whose cache student `name` distils from (None: it distils nothing)."""
        section = merge(self.cfg.train_defaults, self.students[name] or {})
        wanted = section.get("teacher")
        if section.get("loss", "fkl") == "none" or section.get("cache", True) is False:
            return self.teacher_slot(wanted) if wanted else None
        if wanted is None and len(self.teachers) > 1:
            raise KdError(f"student {name} distils (loss {section.get('loss', 'fkl')}) but names no teacher; add "
                          f"teacher: <name> (teachers: {', '.join(t.name for t in self.teachers)})")
        return self.teacher_slot(wanted)

    @property
    def eval_split(self) -> str:
        return str(self.cfg.eval.get("split", "heldout"))

    def student_dir(self, name: str) -> Path | RemoteDir:
        return self.out / "students" / name

    def evaluated_slot(self, slot: TeacherSlot) -> TeacherSlot:
        """The slot whose eval/ holds `slot`'s model's figures: the first listed with the same model."""
        return next(t for t in self.teachers if t.model_key == slot.model_key)

    # ---- stages ---------------------------------------------------------------------------
    def run(self, stages: list[str]) -> dict[str, float]:
        """Run `stages` in order; after each, echo its wall time (`stage train: 73.2 s`). Returns the seconds
        per stage."""
        seconds: dict[str, float] = {}
        for s in stages:
            t0 = time.perf_counter()
            getattr(self, f"stage_{s}")()
            seconds[s] = time.perf_counter() - t0
            self.echo(f"stage {s}: {seconds[s]:.1f} s")
        return seconds

    def build_corpus(self) -> None:
        """The `corpus` section: the real-text corpus and its tokenizer under out/corpus (skipped when up to date)."""
        from pipeline.data.stdlib_corpus import CorpusConfig, build_corpus, summary_line

        cc = from_dict(CorpusConfig, {**self.cfg.corpus, "out": str(self.corpus_dir)})
        self.echo(summary_line(build_corpus(cc, echo=self.echo), cc.out))

    def _expand(self, value: Any) -> Any:
        """"{corpus}/x" in a prepare entry -> out/corpus/x."""
        if isinstance(value, str) and "{corpus}" in value:
            if not self.cfg.corpus:
                raise KdError(f"{value!r} names the run's corpus, but the config has no corpus section")
            return value.replace("{corpus}", str(self.corpus_dir))
        return value

    def stage_prepare(self) -> None:
        from pipeline.data.prepare import PrepareConfig, prepare, summary_line

        if self.cfg.corpus:
            self.build_corpus()
        for split, section in self.cfg.prepare.items():
            section = {k: self._expand(v) for k, v in (section or {}).items()}
            pc = from_dict(PrepareConfig, {**section, "out": str(self.prepared(split))})
            try:
                meta = prepare(pc, progress=self.progress)
            except StaleOutput as e:  # the run owns prepared/: cheap to redo, so redo it and say why
                self.echo(f"prepare[{split}]: settings changed ({', '.join(e.changes)}): re-preparing")
                pc.overwrite = True
                meta = prepare(pc, progress=self.progress)
            self.echo(f"prepare[{split}]: " + summary_line(meta, pc.out).removeprefix("prepare: "))

    def stage_teacher(self) -> None:
        if not self.teachers:
            raise KdError("the teacher stage needs a teacher (or teachers) section")
        for slot in self.teachers:
            self._teacher(slot)

    def _teacher(self, slot: TeacherSlot) -> None:
        from pipeline.teacher.runner import TeacherConfig, resume_hint, run_teacher

        section = dict(slot.section)
        train_section = section.pop("train", None)
        section.pop("model", None)
        label = slot.label
        if train_section:
            train_section = dict(train_section)
            split = train_section.pop("split", "train")
            if split not in self.cfg.prepare:
                raise KdError(f"{label}: train.split {split!r} is not a prepare entry ({', '.join(self.cfg.prepare)})")
            self._train_one(label, slot.root, train_section, teacher=None, split=split)
        # The train split feeds the students; the eval split's cache lets `eval` measure held-out
        # teacher agreement and KL (a few seconds: it is small).
        targets = [("train", slot.cache)]
        split = self.eval_split
        if "eval" in self.cfg.stages and split in self.cfg.prepare and split != "train":
            targets.append((split, slot.cache_of(split)))
        for name, cache in targets:
            tc = from_dict(TeacherConfig, {**section, "data": str(self.prepared(name)), "model": slot.model,
                                           "out": str(cache)})
            try:
                s = run_teacher(tc)
            except StaleOutput as e:
                # A teacher this run trains is this run's own: when its weights changed (it was retrained), its
                # cache follows it, as a student follows its base. Any other difference (the cache's settings,
                # edited or changed by a kdcache upgrade's defaults) is refused with the cache kept, as for a
                # teacher given as `model`: a teacher pass can take hours.
                retrained = any(getattr(c, "key", None) == "teacher weights_sha256" for c in e.changes)
                if not (train_section and retrained):
                    key = "teacher" if slot.name == "teacher" else f"teachers.{slot.name}"
                    keep = (f"--set {key}.preset=compact to use it (the default preset before 2026-12-07), or "
                            if resume_hint(tc, e.changes) else "")
                    raise KdError(f"{label}[{name}]: {cache} holds a cache made with other settings "
                                  f"({', '.join(e.changes)}); it is kept (a teacher pass can take hours): re-run "
                                  f"with {keep}--set {key}.overwrite=true to replace it") from None
                self.echo(f"{label}[{name}]: {cache} was made with other settings ({', '.join(e.changes)}); "
                          "this run retrained that teacher, so its cache is made again")
                tc.overwrite = True
                s = run_teacher(tc)
            if s["done"] == 0 and s["skipped"] == s["shards"]:
                self.echo(f"{label}[{name}]: cache {cache} already complete; skipped")
            else:
                self.echo(f"{label}[{name}]: cached {s['rows']} rows in {s['done']} shard(s), "
                          f"{s['seconds']:.1f}s -> {cache}")

    def stage_train(self) -> None:
        if not self.students:
            raise KdError("the students section is empty: nothing to train")
        for name in student_order(self.students):
            section = merge(self.cfg.train_defaults, self.students[name] or {})
            base = section.pop("init_from", None)
            section.pop("teacher", None)
            if base:  # start from another student's final model (e.g. a shared CE warm start)
                section.pop("student_config", None)
                section["student"] = str(self.student_dir(base) / "final")
            self._train_one(name, self.student_dir(name), section, teacher=self.student_teacher(name))

    def _train_one(self, name: str, out: Path, section: dict[str, Any], teacher: TeacherSlot | None,
                   split: str = "train") -> None:
        from pipeline.training.summary import summary_line
        from pipeline.training.trainer import train
        from pipeline.training.config import TrainConfig

        keys = {**section, "data": str(self.prepared(split)), "out": str(out)}
        # The run owns the cache path; `cache: false` in a section opts a student out of it. `online: true`: the
        # benchmark's reference arm, the teacher's model run on every micro-batch instead of its cache.
        online = bool(keys.pop("online", False))
        if keys.pop("cache", True) is not False and teacher is not None and keys.get("loss", "fkl") != "none":
            keys["online_teacher" if online else "cache"] = teacher.model if online else str(teacher.cache)
        tc = from_dict(TrainConfig, keys)
        # The run owns students/<name>: other settings retrain it (the trainer says which keys changed); the same
        # settings continue from the newest checkpoint, or are skipped when final (decided before any loading).
        try:
            s = train(tc, progress=self.progress, echo=lambda m: self.echo(f"train[{name}]: {m}"),
                      retrain_if_changed=True)
        except Interrupted as e:  # say which student the checkpoint belongs to
            raise Interrupted(f"train[{name}]: {e}") from None
        if s.get("skipped"):
            self.echo(f"train[{name}]: {out}/final is complete for this config; skipped")
            return
        self.echo(f"train[{name}]: " + summary_line(s).removeprefix("train: "))

    def stage_eval(self) -> None:
        from pipeline.evaluation.evaluate import EvalConfig, evaluate

        section = dict(self.cfg.eval)
        section.pop("split", None)
        data = self.prepared(self.eval_split)
        # (label, model, run dir, the teacher it is compared with); a model that several slots share once
        models: list[tuple[str, str | None, Path, TeacherSlot | None]] = []
        for t in self.teachers:
            first = self.evaluated_slot(t)
            if first is t:
                models.append((t.label, t.model, t.root, t))
            else:
                self.echo(f"eval[{t.label}]: the same model as {first.label}, evaluated once -> {first.root / 'eval'}")
        for name in self.students:
            teacher = self.student_teacher(name) or (self.teachers[0] if self.teachers else None)
            models.append((name, None, self.student_dir(name), teacher))
        for name, model, run_dir, teacher in models:
            model = model or str(run_dir / "final")
            if not name.startswith("teacher") and not (has_file(run_dir, "final/_COMMIT.json") if isinstance(
                    run_dir, RemoteDir) else Path(model).is_dir()):  # e.g. trained with stop_after
                self.echo(f"eval[{name}]: {model} is not written yet (training unfinished); skipped")
                continue
            keys = {**section, "model": model, "data": str(data), "out": str(run_dir / "eval")}
            if teacher is not None and has_file(teacher.cache_of(self.eval_split), "kdcache.json"):
                keys.setdefault("cache", str(teacher.cache_of(self.eval_split)))
            ec = from_dict(EvalConfig, keys)
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
        from pipeline.evaluation.report import ReportConfig, report

        runs = [str(self.student_dir(n)) for n in self.students]
        # One reference row per teacher model (its eval/), and every slot by name: each student's teacher is
        # the slot whose cache it read, also when two slots share one model.
        teachers = [str(t.root) for t in self.teachers
                    if self.evaluated_slot(t) is t and has_file(t.root, "eval/eval.json")]
        slots = {t.name: {"cache": str(t.cache), "teacher": str(self.evaluated_slot(t).root)} for t in self.teachers}
        rc = from_dict(ReportConfig, {**self.cfg.report, "runs": runs, "teachers": teachers,
                                      "teacher_slots": slots, "out": str(self.out / "report"),
                                      "cache": str(self.teachers[0].cache) if self.teachers else ""})
        path = report(rc)
        self.echo(f"report: {path}")


def expand_seeds(students: dict[str, Any], seeds: list[int]) -> dict[str, Any]:
    """Every student once per seed: name -> name_s<seed> with `seed` set and `init_from` pointing at the same
    seed's copy of its base. Without seeds the students are returned as they are."""
    if not seeds:
        return dict(students)
    out: dict[str, Any] = {}
    for name, section in students.items():
        for seed in seeds:
            sec = dict(section or {})
            sec["seed"] = seed
            if sec.get("init_from"):
                sec["init_from"] = f"{sec['init_from']}_s{seed}"
            out[f"{name}_s{seed}"] = sec
    return out


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


def _eval_config(ec: Any) -> dict[str, Any] | None:
    """The config of the eval.json in `ec.out` (a directory or a URL), None when there is none."""
    from pipeline.evaluation.report import read_run_config, read_text

    if read_text(ec.out, "eval.json") is None:
        return None
    return read_run_config(ec.out)  # None without a config.yaml too


def eval_done(ec: Any) -> bool:
    """True when `ec.out` holds an eval.json made with the same resolved settings."""
    saved = _eval_config(ec)
    return saved is not None and saved == to_dict(ec)


def eval_changes(ec: Any) -> list[str]:
    """The settings that differ from those of the eval.json in `ec.out` ([] when there is none)."""
    saved = _eval_config(ec)
    return [] if saved is None else changes(saved, to_dict(ec))
