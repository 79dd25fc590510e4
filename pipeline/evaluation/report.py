"""Stage 4: one Markdown report comparing training runs, with plots.

    kdcache report runs/demo/ce runs/demo/kd runs/demo/speckd --teacher runs/demo/teacher --out runs/demo/report

DIR/report.md opens with what a reader wants first: the best student by held-out cross-entropy and
its margin over the others, set against the seed-to-seed spread when a method ran with several seeds
(`pipeline.evaluation.comparison`), and one chart of every student's held-out figures (bars, error bars over
seeds). Then the table (run, method, eval figures, final TAR, training tokens/s = total tokens /
total step time from the run's train_summary.json), each distilled student against the CE-only
baseline, and the curves: CE and KD losses on separate axes, TAR, LATF focus ratio, IDTS
temperatures; last, histograms of the teacher's entropy and tail mass (log scale) over the WHOLE
cache, computed out of core with dask (one lazy array per Zarr chunk), so the cache never has to fit
in memory. A method keeps its colour in every plot (`pipeline.evaluation.plots`).

A run directory is what `kdcache train` writes (config.yaml, metrics.jsonl, train_summary.json,
final/) plus an eval.json from `kdcache eval`, in RUN/eval/ or RUN/ itself. Whatever a run lacks is
shown as "—". The teacher (`--teacher`, a directory with its eval; several comma-separated) is a
reference: shown, never ranked. A run's teacher (the table's teacher column) is the teacher slot whose cache it
read when `teacher_slots` names them (`kdcache run` does: name -> {cache, teacher: the directory whose eval
stands for its model}, so two slots of one model, K = 8 and K = 32, stay apart and their model has one
reference row, named after both); else the one whose model made its cache (the cache records the teacher's
model path; of several teachers with that model, the one named like the cache's directory).

With several seeds per method the report adds what the seeds can answer (`pipeline.evaluation.comparison`): every
method's mean ± standard deviation of every figure, each method's difference from CE only and from plain
KD with the same teacher in standard-error units with a verdict per method, and, when methods ran with
several teachers, whether the stronger teacher made the better student; the curves become one mean line
per method.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar

import numpy as np
import yaml

from pipeline.evaluation.comparison import (best_student, differences, group_runs, seed_table, spread, teacher_strength,
                                 verdicts)
from pipeline.config import save_config
from pipeline.errors import KdError
from pipeline.losses.options import method_name
from pipeline.ownership import REPORT, REPORT_PLOTS, Output, claim
from pipeline.storage import is_url, join, store_for
from pipeline.evaluation.plots import (assign_styles, plot_heldout, plot_histogram, plot_losses, plot_metric,
                                   plot_temperatures, series)

log = logging.getLogger(__name__)

REPORT_FILENAME = "report.md"
DASH = "—"
# (eval.json key, column title, format)
EVAL_COLUMNS = (("ce", "CE (nats)", "{:.4f}"), ("ppl", "PPL", "{:.2f}"),
                ("teacher_top1_agreement", "teacher top-1 agr.", "{:.3f}"), ("fkl_to_teacher", "FKL to teacher", "{:.4f}"),
                ("exact_match", "exact match", "{:.3f}"), ("rouge_l", "ROUGE-L", "{:.3f}"))


@dataclass
class ReportConfig:
    """Settings of `kdcache report`."""

    URL_FIELDS: ClassVar[tuple[str, ...]] = ("cache", "runs", "teachers", "out")  # may be fsspec URLs

    runs: list[str] = field(default_factory=list)  # training run directories
    out: str = ""
    teachers: list[str] = field(default_factory=list)  # teacher directories (their eval/): references, not ranked
    cache: str = ""  # default: the cache recorded in the runs' configs
    bins: int = 50  # histogram bins for the cache plots
    # teacher slot name -> {"cache": its train cache, "teacher": the teacher directory whose eval/ holds its
    # model's figures}: names each run's teacher by the cache it read (`kdcache run` fills it)
    teacher_slots: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.bins < 2:
            raise KdError(f"bins must be at least 2, got {self.bins}")


# ---- reading runs --------------------------------------------------------------------------
def read_text(run: str | Path, rel: str) -> str | None:
    """RUN/rel as text, for a run directory or a run at a URL (`train --out URL`); None when there is none."""
    if is_url(run):
        try:
            return store_for(str(run)).read_bytes(rel).decode("utf-8", errors="replace")
        except FileNotFoundError:
            return None
    p = Path(run) / rel
    return p.read_text() if p.is_file() else None


def read_jsonl(run: str | Path, rel: str) -> list[dict[str, Any]]:
    """Rows of RUN/rel, a JSONL file; a missing file is empty and a torn last line (a live run) is skipped."""
    text = read_text(run, rel)
    if text is None:
        return []
    rows = []
    for ln in text.splitlines():
        try:
            row = json.loads(ln)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def read_eval(run: str | Path) -> dict[str, Any]:
    """RUN/eval/eval.json, else RUN/eval.json, else {}."""
    for rel in ("eval/eval.json", "eval.json"):
        text = read_text(run, rel)
        if text is not None:
            try:
                data = json.loads(text)
            except json.JSONDecodeError:
                log.warning("%s/%s is not valid JSON; its run is reported without eval figures", run, rel)
                return {}
            return data if isinstance(data, dict) else {}
    return {}


def read_run_config(run: str | Path, rel: str = "config.yaml") -> dict[str, Any] | None:
    """The run's config.yaml (or another YAML file of it) as a plain mapping (None when missing or unreadable)."""
    text = read_text(run, rel)
    if text is None:
        return None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else None


def collect_run(path: str, teachers: dict[str, list[str]] | None = None,
                caches: dict[str, str] | None = None) -> dict[str, Any]:
    """Everything the report shows about one run directory. `caches`: `path_key` of a cache -> teacher slot name;
    `teachers`: `path_key` of a teacher model -> teacher names, to name the teacher of a distilled run whose
    cache is not in `caches` from its cache's record."""
    run: str | Path = path if is_url(path) else Path(path)
    if not is_url(run) and not Path(run).is_dir():
        raise KdError(f"run directory not found: {run}")
    cfg, ev = read_run_config(run), read_eval(run)
    if is_url(run) and cfg is None and not ev and all(read_text(run, rel) is None  # (not merely unreadable)
                                                      for rel in ("config.yaml", "eval/eval.json")):
        raise KdError(f"run not found: {run} (no config.yaml or eval/eval.json there)")
    metrics = read_jsonl(run, "metrics.jsonl")
    _, tar = series(metrics, "tar")
    _, focus = series(metrics, "focus_ratio")
    summary = read_summary(run)
    tps = summary.get("tokens_per_s")
    online = bool(cfg and cfg.get("online_teacher"))
    distills = bool(cfg and (cfg.get("cache") or online) and cfg.get("loss", "fkl") != "none")
    teacher = (online_teacher_name(cfg["online_teacher"], teachers or {}) if online
               else run_teacher(cfg["cache"], teachers or {}, caches or {})) if distills else None
    named = {**cfg, "tail": summary["tail"]} if cfg and summary.get("tail") else cfg  # --tail auto, as resolved
    return {"name": PurePosixPath(str(run).rstrip("/")).name or str(run), "path": str(run), "config": cfg,
            "method": method_name(named), "distills": distills, "teacher": teacher, "eval": ev, "metrics": metrics,
            "final_tar": float(tar[-1]) if len(tar) else None,
            "final_focus_ratio": float(focus[-1]) if len(focus) else None,
            "tokens_per_s": float(tps) if isinstance(tps, (int, float)) and tps > 0 else None}


def path_key(p: str | Path) -> str:
    """One spelling of a model, cache or run location, to match them by: a local path resolved, a URL as written
    without a trailing slash (a hub id resolves like a relative path, the same on both sides)."""
    return str(p).rstrip("/") if is_url(p) else str(Path(p).resolve())


def online_teacher_name(model: str, teachers: dict[str, list[str]]) -> str:
    """The teacher slot an online arm ran (`teachers`: `path_key` of a model -> slot names; the first of several
    slots sharing the model), else the model directory's name (a run directory's final/ is named by its run)."""
    key = path_key(model)
    names, p = teachers.get(key, []), PurePosixPath(key)
    return names[0] if names else (p.parent.name if p.name == "final" else p.name)


def run_teacher(cache: str, teachers: dict[str, list[str]], caches: dict[str, str]) -> str:
    """The teacher slot whose cache is `cache` (`caches`: `path_key` of a cache -> name), else `cache_teacher`."""
    return caches.get(path_key(cache)) or cache_teacher(cache, teachers)


def cache_teacher(cache: str, teachers: dict[str, list[str]]) -> str:
    """The name of the teacher whose model made `cache` (from the cache's kdcache.json; `teachers`: `path_key` of a
    model path -> the names of the teachers with that model: of several, the one named like the cache's
    directory), else the cache's directory name."""
    from pipeline.cache.layout import read_meta

    own = PurePosixPath(path_key(cache)).name
    try:
        model = path_key(read_meta(cache)["teacher"]["model"])  # a local directory or a URL
    except (KdError, OSError, KeyError, TypeError):
        return own
    names = teachers.get(model, [])
    if len(names) == 1:
        return names[0]
    return own  # no teacher of that model, or several: the cache's own name (kdcache run names it after its slot)


def teacher_name(path: str) -> str:
    """`runs/x/teacher` -> "teacher", `runs/x/teachers/large` -> "large"."""
    return Path(path).name


def read_summary(run: str | Path) -> dict[str, Any]:
    """RUN/train_summary.json (written by `kdcache train` at its end), or {}."""
    text = read_text(run, "train_summary.json")
    try:
        data = json.loads(text) if text is not None else {}
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


def table(runs: list[dict[str, Any]]) -> str:
    """The report's one Markdown table; eval columns appear when at least one run has the figure, the teacher
    column when a run distils."""
    cols = [c for c in EVAL_COLUMNS if any(isinstance(r["eval"].get(c[0]), (int, float)) for r in runs)]
    with_teacher = any(r.get("teacher") for r in runs)
    head = ["run", "method"] + (["teacher"] if with_teacher else []) + [t for _, t, _ in cols] + ["final TAR",
                                                                                                "train tokens/s"]
    text = len(head) - len(cols) - 2
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * text + ["---:"] * (len(head) - text)) + "|"]

    def fmt(v: Any, f: str) -> str:
        return f.format(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else DASH

    for r in runs:
        teacher = [(r.get("teacher") or DASH).replace("|", "\\|")] if with_teacher else []
        cells = [r["name"].replace("|", "\\|"), r["method"], *teacher]
        cells += [fmt(r["eval"].get(k), f) for k, _, f in cols]
        cells += [fmt(r["final_tar"], "{:.3f}"), fmt(r["tokens_per_s"], "{:,.0f}")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def versus_baseline(runs: list[dict[str, Any]]) -> list[str]:
    """Lines comparing every distilled run with the CE-only baseline on held-out CE and agreement.

    The baseline is the CE-only run that trained the most steps (a warm start is CE-only too, with
    fewer). The verdict is stated either way: a distilled student behind the baseline is a finding.
    """
    def steps(r: dict[str, Any]) -> int:
        return int(r["metrics"][-1]["step"]) if r["metrics"] else 0

    scored = [r for r in runs if isinstance(r["eval"].get("ce"), (int, float))]
    ce_runs = [r for r in scored if r["method"] == "CE only"]
    kd_runs = [r for r in scored if r["method"] not in ("CE only", DASH)]
    if not ce_runs or not kd_runs:
        return []
    base = max(ce_runs, key=steps)
    b_ce, b_agr = base["eval"]["ce"], base["eval"].get("teacher_top1_agreement")
    lines = [f"## Distilled students against the CE-only baseline ({base['name']})", ""]
    for r in kd_runs:
        ce, agr = r["eval"]["ce"], r["eval"].get("teacher_top1_agreement")
        part = [f"perplexity {'ahead' if ce < b_ce else 'behind'} ({math.exp(ce):.2f} vs {math.exp(b_ce):.2f})"]
        if isinstance(agr, (int, float)) and isinstance(b_agr, (int, float)):
            part.append(f"teacher agreement {'ahead' if agr > b_agr else 'behind'} ({agr:.3f} vs {b_agr:.3f})")
        lines.append(f"- **{r['name']}** ({r['method']}): " + "; ".join(part))
    return lines + [""]


# ---- the cache, out of core ----------------------------------------------------------------
def cache_histograms(cache_path: str | Path, bins: int = 50) -> dict[str, Any]:
    """Histograms of teacher entropy and of the tail mass r = 1 - (top-K mass), over every committed row.

    One delayed `Cache.read` per Zarr chunk of each committed shard (dask, so the cache never has to fit
    in memory), decoding only `entropy` and `tail_logprob`. The tail mass is histogrammed as log10 r: a
    trained teacher's top-K mass is 0.98-1.0 on most rows, which a linear [0, 1] axis squeezes into one bin.
    Rows with r = 0 (K = V) are counted apart. Two passes: ranges, then the histograms.
    Returns {rows, shards, k, cache_rows, entropy: {counts, edges, mean}, log10_tail: {counts, edges, mean,
    zero}}.
    """
    import dask
    import dask.array as da

    from pipeline.cache import open_cache

    c = open_cache(cache_path)
    chunk = c.chunk_rows

    def part(a: int, b: int) -> np.ndarray:
        rows = c.read(a, b, ("entropy", "tail_logprob"))
        return np.stack([rows["entropy"].astype(np.float64), rows["tail_logprob"].astype(np.float64) / np.log(10)], 1)

    pieces, shards = [], 0
    for i, ok in enumerate(c.committed()):
        s = c.shards[i]
        if not ok or s["row_stop"] == s["row_start"]:
            continue
        shards += 1
        for a in range(s["row_start"], s["row_stop"], chunk):
            b = min(a + chunk, s["row_stop"])
            pieces.append(da.from_delayed(dask.delayed(part)(a, b), shape=(b - a, 2), dtype=np.float64))
    if not pieces:
        raise KdError(f"cache {c.path} has no committed rows to plot")
    both = da.concatenate(pieces)
    ent, lt = both[:, 0], both[:, 1]
    finite = da.isfinite(lt)
    lt_f = da.where(finite, lt, np.nan)
    with dask.config.set(scheduler="threads"):
        lo, hi, e_mean, t_lo, t_mean, zero = dask.compute(ent.min(), ent.max(), ent.mean(), da.nanmin(lt_f),
                                                          da.nanmean(lt_f), (~finite).sum())
        lo, hi = float(lo), float(hi)
        hi = hi if hi > lo else lo + 1e-3
        t_lo = float(t_lo) if np.isfinite(t_lo) else -1.0
        t_hi = 0.0 if t_lo < 0 else 1.0
        e_counts, e_edges = da.histogram(ent, bins=bins, range=(lo, hi))
        t_counts, t_edges = da.histogram(lt_f, bins=bins, range=(t_lo, t_hi))
        e_counts, t_counts = dask.compute(e_counts, t_counts)
    return {"rows": int(ent.shape[0]), "shards": shards, "k": c.k, "cache_rows": c.num_rows,
            "entropy": {"counts": np.asarray(e_counts), "edges": np.asarray(e_edges), "mean": float(e_mean)},
            "log10_tail": {"counts": np.asarray(t_counts), "edges": np.asarray(t_edges),
                           "mean": float(t_mean) if np.isfinite(t_mean) else float("nan"), "zero": int(zero)}}


# ---- the stage -----------------------------------------------------------------------------
def default_cache(runs: list[dict[str, Any]]) -> str:
    """The cache the runs' configs record (the first one; a note is logged when they differ)."""
    caches = [r["config"].get("cache") for r in runs if r["config"] and r["config"].get("cache")]
    if len(set(caches)) > 1:
        log.warning("runs were trained on different caches; plotting %s", caches[0])
    return str(caches[0]) if caches else ""


def build_report(cfg: ReportConfig) -> dict[str, Any]:
    """Write DIR/report.md and its PNGs; returns {path, runs, plots, cache} (cache: histogram data or None)."""
    if not cfg.out:
        raise KdError("no output directory given (--out DIR)")
    if not cfg.runs:
        raise KdError("no run directories given")
    if is_url(cfg.out):
        return _report_to_url(cfg)
    # The lock, and every file in OUT checked to be report's: a re-run replaces only its own; anything else
    # refuses, first.
    with claim(cfg.out, REPORT) as own:
        return _build_report(cfg, own)


def _report_to_url(cfg: ReportConfig) -> dict[str, Any]:
    """--out at a URL: made in a local staging directory and uploaded, report.md last (`publish`: anything there
    but a report's files refuses first; an earlier report's plots not redrawn are deleted)."""
    from pipeline.storage.staging import publish

    def make(local: Path) -> dict[str, Any]:
        with claim(str(local), REPORT) as own:
            return _build_report(cfg, own, local)

    res = publish(cfg.out, "report", (*REPORT_PLOTS, "config.yaml", REPORT_FILENAME), make)
    return {**res, "path": join(cfg.out, REPORT_FILENAME)}


def _build_report(cfg: ReportConfig, own: Output, write_to: Path | None = None) -> dict[str, Any]:
    out = Path(write_to or cfg.out)
    models: dict[str, list[str]] = {}
    for t in cfg.teachers:  # its trained model, or one given by path (recorded by its eval config)
        model = (read_run_config(t, "eval/config.yaml") or {}).get("model")
        for m in {path_key(join(t, "final")), *([path_key(model)] if model else [])}:
            models.setdefault(m, []).append(teacher_name(t))
    caches, slots_of = slot_maps(cfg.teacher_slots)
    runs = [collect_run(p, models, caches) for p in cfg.runs]
    teachers = []
    for t in cfg.teachers:
        tr = collect_run(t)
        tr["method"] = "teacher (reference)"
        # the slots this model stands for, by name (two slots of one model: one row, named after both)
        tr["slots"] = slots_of.get(path_key(t)) or [teacher_name(t)]
        tr["name"] = " = ".join(tr["slots"])
        teachers.append(tr)
    groups = group_runs(runs)
    assign_styles(groups)
    out.mkdir(parents=True, exist_ok=True)
    own.writing("config.yaml", REPORT_FILENAME, *REPORT_PLOTS)
    save_config(cfg, out / "config.yaml")

    plots: list[str] = []
    notes: list[str] = []

    def figure(fname: str, drawn: bool, caption: str, missing: str) -> list[str]:
        if not drawn:
            notes.append(missing)
            return []
        plots.append(fname)
        return [f"![{fname.removesuffix('.png').replace('_', ' ')}]({fname})", "", f"*{caption}*", ""]

    seeds = any(len(g.runs) > 1 for g in groups)
    head = figure("heldout.png", plot_heldout(groups, teachers, out / "heldout.png"),
                  "Held-out figures of every student (one colour per method in every plot"
                  + ("; bars: mean over seeds, error bars: standard deviation over seeds, dots: single seeds. "
                     "The error bars include each seed's own luck, which every method of that seed shares: "
                     "the tables below compare methods seed by seed" if seeds else "") + "; axes zoomed to the values"
                  + (", dashed: the teachers' CE" if teachers else "") + ").",
                  "No run has held-out figures (eval.json): no heldout.png.")
    # With seeds, one line per method (the mean over its seeds) instead of one per run.
    lines_of = [g.mean_run() for g in groups] if seeds else runs
    curves = figure("losses.png", plot_losses(lines_of, out / "losses.png"),
                    "Training losses per optimizer step, each on its own axis: cross-entropy on the labels (every "
                    "run), and the KD loss to the cached teacher (distilled runs); faint: per step, solid: moving "
                    "average; the y axis fits the runs after their first tenth. The logged total, "
                    "alpha·CE + (1-alpha)·KD, is in metrics.jsonl as `loss`.",
                    "No run logged losses: no losses.png.")
    for key, fname, title, ylabel, caption in (
            ("tar", "tar.png", "SpecKD token acceptance rate (TAR)", "TAR",
             "Token acceptance rate per step: accepted / target positions (1.0 without a gate)."),
            ("focus_ratio", "focus_ratio.png", "LATF focus ratio r", "focus ratio r",
             "LATF focus ratio per step: fraction of eligible positions kept (1.0 without LATF).")):
        curves += figure(fname, plot_metric(lines_of, key, out / fname, title, ylabel), caption,
                         f"No run logged `{key}`: no {fname}.")
    curves += figure("temperatures.png", plot_temperatures(lines_of, out / "temperatures.png"),
                     "IDTS temperatures over steps: per run, the mean temperature of the step's kept positions "
                     "(line) and its min-max range (band); a flat line at T_base means no IDTS.",
                     "No run logged temperatures: no temperatures.png.")

    cache_path = cfg.cache or default_cache(runs)
    hist = None
    if not cache_path:
        notes.append("No cache given or recorded in the runs' configs: no cache histograms.")
    elif not is_url(cache_path) and not Path(cache_path).is_dir():
        notes.append(f"Cache {cache_path} not found: no cache histograms.")
    else:
        try:
            hist = cache_histograms(cache_path, cfg.bins)
        except KdError as e:  # the runs are still worth a report; say why the histograms are missing
            notes.append(f"Cache {cache_path} could not be read ({e}): no cache histograms.")
    if hist is not None:
        rows = f"{hist['rows']:,} target positions"
        plot_histogram(hist["entropy"], out / "cache_entropy.png", f"Teacher entropy over the cache ({rows})",
                       "teacher entropy H(p) (nats)")
        plot_histogram(hist["log10_tail"], out / "cache_tail_mass.png",
                       f"Teacher mass outside its top-{hist['k']} ({rows})", "log10 r,  r = 1 - top-K mass")
        zero = hist["log10_tail"]["zero"]
        curves += figure("cache_entropy.png", True, f"Teacher entropy H(p) at every cached position of {cache_path} "
                                                    f"({cfg.bins} bins; dashed: mean).", "")
        curves += figure("cache_tail_mass.png", True,
                         f"Mass the teacher puts outside its cached top-{hist['k']} ids (the tail bucket), log10 "
                         f"scale, every cached position ({cfg.bins} bins; dashed: mean)"
                         + (f"; {zero:,} rows with no tail (K = V) not shown." if zero else "."), "")
        if hist["rows"] < hist["cache_rows"]:
            notes.append(f"The cache is incomplete: histograms cover {hist['rows']:,} of {hist['cache_rows']:,} rows.")

    listed = teachers + runs
    text = ["# kdcache report", "", *best_student(groups), *head, *seed_sections(groups, teachers),
            "## All runs", "",
            f"{len(runs)} run(s); eval figures from each run's eval.json (CE over target tokens in nats, FKL on the "
            "K + 1 buckets at T = 1); final TAR from the last metrics row; train tokens/s = total tokens / total "
            "step time of the whole run (train_summary.json).", "", table(listed), "",
            *([] if seeds else versus_baseline(runs)), "## Training curves", "", *curves]
    if notes:
        text += ["", *[f"- {n}" for n in notes]]
    path = out / REPORT_FILENAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(text).rstrip() + "\n")
    tmp.replace(path)
    for stale in set(REPORT_PLOTS) - set(plots):  # an earlier report's plots this one did not redraw
        (out / stale).unlink(missing_ok=True)
    return {"path": str(path), "runs": runs, "plots": plots, "cache": hist, "groups": groups}


def slot_maps(slots: dict[str, Any]) -> tuple[dict[str, str], dict[str, list[str]]]:
    """From `ReportConfig.teacher_slots`: (`path_key` of a cache -> slot name, of a teacher directory -> the
    names of the slots whose model it evaluated, in order)."""
    caches: dict[str, str] = {}
    slots_of: dict[str, list[str]] = {}
    for name, slot in (slots or {}).items():
        slot = slot or {}
        if slot.get("cache"):
            caches[path_key(slot["cache"])] = str(name)
        if slot.get("teacher"):
            slots_of.setdefault(path_key(slot["teacher"]), []).append(str(name))
    return caches, slots_of


def seed_sections(groups: list[Any], teachers: list[dict[str, Any]]) -> list[str]:
    """The sections only seeds can support: per-method means ± sd, differences from the baselines against
    the seed spread with a verdict per method, and the teacher-strength comparison. [] without seeds."""
    if not any(len(g.runs) > 1 for g in groups):
        return []
    lines = ["## Methods over seeds", "",
             "Mean ± standard deviation over each method's seeds (eval figures on the held-out split; final TAR "
             "and focus ratio from the last training step).", "", *seed_table(groups), ""]
    sp = spread(groups, "ce")
    if sp is not None:
        lines += [f"Held-out CE. {sp.describe()} Every figure below is tested the same way, each against its own "
                  "noise; each comparison on its own at 2 standard errors: with this many comparisons about one in "
                  "twenty differences that are really zero would still show as bold.", ""]
    ce_groups = [g for g in groups if g.method == "CE only" and g.values("ce")]
    base = max(ce_groups, key=lambda g: g.runs[0]["metrics"][-1]["step"] if g.runs[0]["metrics"] else 0, default=None)
    if base is not None:
        lines += differences(groups, base, f"Against CE only ({base.label})")
    # The online arm (the teacher's full distribution, no cache) is what every cached method approximates.
    online = {g.teacher: g for g in groups if g.method == "KD fkl online" and g.teacher is not None}
    for t, ref in online.items():
        same = [g for g in groups if g.teacher == t and g is not ref]
        lines += differences(groups, ref, f"Against online KD from the same teacher ({ref.label}: the reference "
                             "every cached method approximates)", only=same)
    kd_bases = {g.teacher: g for g in groups if g.method == "KD fkl/bucket" and g.teacher is not None}
    for t, kd in kd_bases.items():
        same = [g for g in groups if g.teacher == t and g is not kd]
        lines += differences(groups, kd, f"Against plain KD from the same teacher ({kd.label})", only=same)
    lines += ["### Does each method pay?", ""]
    if base is not None:
        lines += verdicts([g for g in groups if g.method != "CE only"], base, f"CE only ({base.label})") + [""]
    for t, kd in kd_bases.items():
        lines += verdicts([g for g in groups if g.teacher == t], kd, f"plain KD ({kd.label})") + [""]
    strength = {s: float(t["eval"]["ce"]) for t in teachers if isinstance(t["eval"].get("ce"), (int, float))
                for s in t.get("slots", [t["name"]])}
    lines += teacher_strength(groups, strength)
    return lines


def report(cfg: ReportConfig) -> str:
    """Write the report; returns the path of report.md."""
    return build_report(cfg)["path"]


def summary_line(r: dict[str, Any]) -> str:
    """One line for the end of `kdcache report`."""
    cache = f", cache histograms over {r['cache']['rows']:,} rows" if r["cache"] else ""
    return f"report: {len(r['runs'])} run(s), {len(r['plots'])} plot(s){cache} -> {r['path']}"
