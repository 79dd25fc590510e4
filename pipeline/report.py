"""Stage 4: one Markdown report comparing training runs, with plots.

    kdcache report runs/demo/ce runs/demo/kd runs/demo/speckd --out runs/demo/report

DIR/report.md holds one table (run, method, eval figures, final TAR, mean tokens/s) and embeds
PNG plots: loss, TAR, LATF focus ratio and IDTS temperatures over steps, and histograms of the
teacher's entropy and tail mass (log scale) over the WHOLE cache. Those two are computed out of core with
dask (one lazy array per shard, concatenated), so the cache never has to fit in memory.

A run directory is what `kdcache train` writes (config.yaml, metrics.jsonl, final/) plus an
eval.json from `kdcache eval`, in RUN/eval/ or RUN/ itself. Whatever a run lacks is shown as "—".
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from pipeline.config import save_config
from pipeline.errors import KdError
from pipeline.ownership import REPORT, REPORT_PLOTS, refuse_foreign

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

    runs: list[str] = field(default_factory=list)  # training run directories
    out: str = ""
    cache: str = ""  # default: the cache recorded in the runs' configs
    bins: int = 50  # histogram bins for the cache plots

    def __post_init__(self) -> None:
        if self.bins < 2:
            raise KdError(f"bins must be at least 2, got {self.bins}")


# ---- reading runs --------------------------------------------------------------------------
def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file; a missing file is empty and a torn last line (a live run) is skipped."""
    if not path.is_file():
        return []
    rows = []
    for ln in path.read_text().splitlines():
        try:
            row = json.loads(ln)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def read_eval(run: Path) -> dict[str, Any]:
    """RUN/eval/eval.json, else RUN/eval.json, else {}."""
    for p in (run / "eval" / "eval.json", run / "eval.json"):
        if p.is_file():
            try:
                data = json.loads(p.read_text())
            except json.JSONDecodeError:
                log.warning("%s is not valid JSON; its run is reported without eval figures", p)
                return {}
            return data if isinstance(data, dict) else {}
    return {}


def read_run_config(run: Path) -> dict[str, Any] | None:
    """The run's config.yaml as a plain mapping (None when missing or unreadable)."""
    p = run / "config.yaml"
    if not p.is_file():
        return None
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else None


def method_name(cfg: dict[str, Any] | None) -> str:
    """A short name of a run's training objective, from its config.yaml mapping.

    "CE only" without a cache (or loss none); "KD fkl/bucket" for plain sparse KD; otherwise the
    switched-on parts joined with " + ", e.g. "SpecKD topk k=5 + LATF + IDTS + fkl".
    """
    if cfg is None:
        return DASH
    if not cfg.get("cache") or cfg.get("loss", "fkl") == "none":
        return "CE only"
    loss, tail = cfg.get("loss", "fkl"), cfg.get("tail", "bucket")
    parts = []
    gate = cfg.get("gate", "none")
    if gate != "none":
        detail = {"topk": f" k={cfg.get('gate_k', 5)}", "threshold": f" τ={cfg.get('gate_threshold', 0.1):g}"}
        rw = float(cfg.get("reject_weight", 0.0) or 0.0)
        parts.append(f"SpecKD {gate}{detail.get(gate, '')}" + (f" (rejected x{rw:g})" if rw > 0 else ""))
    if cfg.get("latf"):
        parts.append("LATF")
    if cfg.get("idts"):
        parts.append("IDTS")
    alpha = float(cfg.get("ce_weight", 0.0) or 0.0)
    ce = f" + {alpha:g}·CE" if alpha > 0 else ""
    if not parts:
        return f"KD {loss}/{tail}{ce}"
    return " + ".join(parts) + f" + {loss}" + (f"/{tail}" if tail != "bucket" else "") + ce


def series(rows: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the rows that log a finite `key`."""
    pts = [(r["step"], float(r[key])) for r in rows
           if isinstance(r.get(key), (int, float)) and isinstance(r.get("step"), (int, float))
           and math.isfinite(float(r[key]))]
    if not pts:
        return np.zeros(0), np.zeros(0)
    s, v = zip(*pts)
    return np.asarray(s, dtype=float), np.asarray(v, dtype=float)


def collect_run(path: str) -> dict[str, Any]:
    """Everything the report shows about one run directory."""
    run = Path(path)
    if not run.is_dir():
        raise KdError(f"run directory not found: {run}")
    cfg = read_run_config(run)
    metrics = read_jsonl(run / "metrics.jsonl")
    _, tar = series(metrics, "tar")
    _, tps = series(metrics, "tokens_per_s")
    return {"name": run.name or str(run), "path": str(run), "config": cfg, "method": method_name(cfg),
            "eval": read_eval(run), "metrics": metrics, "final_tar": float(tar[-1]) if len(tar) else None,
            "tokens_per_s": float(tps.mean()) if len(tps) else None}


def table(runs: list[dict[str, Any]]) -> str:
    """The report's one Markdown table; eval columns appear when at least one run has the figure."""
    cols = [c for c in EVAL_COLUMNS if any(isinstance(r["eval"].get(c[0]), (int, float)) for r in runs)]
    head = ["run", "method"] + [t for _, t, _ in cols] + ["final TAR", "mean tokens/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]

    def fmt(v: Any, f: str) -> str:
        return f.format(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else DASH

    for r in runs:
        cells = [r["name"].replace("|", "\\|"), r["method"]] + [fmt(r["eval"].get(k), f) for k, _, f in cols]
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


# ---- plots ---------------------------------------------------------------------------------
def _figure(title: str, xlabel: str, ylabel: str) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 4.2), dpi=120)
    FigureCanvasAgg(fig)  # Agg, without pyplot's global state
    ax = fig.add_subplot(1, 1, 1)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, format="png")


def plot_metric(runs: list[dict[str, Any]], key: str, path: Path, title: str, ylabel: str) -> bool:
    """One line per run that logs `key`; False (no file) when none does."""
    lines = [(r["name"], *series(r["metrics"], key)) for r in runs]
    lines = [ln for ln in lines if len(ln[1])]
    if not lines:
        return False
    fig, ax = _figure(title, "optimizer step", ylabel)
    for name, s, v in lines:
        ax.plot(s, v, label=name, linewidth=1.4)
    ax.legend(fontsize=8)
    _save(fig, path)
    return True


def plot_temperatures(runs: list[dict[str, Any]], path: Path) -> bool:
    """Per run: the step's mean IDTS temperature as a line, its min-max range as a band."""
    fig, ax = _figure("IDTS temperatures per step (line: mean, band: min-max)", "optimizer step", "temperature T")
    drawn = False
    for r in runs:
        s, mean = series(r["metrics"], "temp_mean")
        if not len(s):
            continue
        lo_s, lo = series(r["metrics"], "temp_min")
        hi_s, hi = series(r["metrics"], "temp_max")
        line = ax.plot(s, mean, label=r["name"], linewidth=1.4)[0]
        if len(lo) == len(hi) == len(s):
            ax.fill_between(s, lo, hi, color=line.get_color(), alpha=0.18, linewidth=0)
        drawn = True
    if not drawn:
        return False
    ax.legend(fontsize=8)
    _save(fig, path)
    return True


def plot_histogram(h: dict[str, Any], path: Path, title: str, xlabel: str) -> None:
    """A filled step histogram from precomputed counts and edges."""
    fig, ax = _figure(title, xlabel, "target positions")
    ax.stairs(h["counts"], h["edges"], fill=True, alpha=0.75, label=f"mean {h['mean']:.3f}")
    ax.axvline(h["mean"], color="black", linestyle="--", linewidth=1)
    ax.legend(fontsize=8)
    _save(fig, path)


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
    out = Path(cfg.out)
    refuse_foreign(out, REPORT)  # a re-run replaces only what report wrote; anything else refuses, first
    runs = [collect_run(p) for p in cfg.runs]
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")

    sections: list[str] = []

    def embed(fname: str, caption: str) -> None:
        sections.append(f"![{fname.removesuffix('.png').replace('_', ' ')}]({fname})\n\n*{caption}*\n")

    plots = []
    curves = (("loss", "loss.png", "Training loss per step", "loss (nats)",
               "Training loss per optimizer step (alpha·CE + (1-alpha)·KD; CE alone for CE-only runs), all runs."),
              ("tar", "tar.png", "SpecKD token acceptance rate (TAR)", "TAR",
               "Token acceptance rate per step: accepted / target positions (1.0 without a gate)."),
              ("focus_ratio", "focus_ratio.png", "LATF focus ratio r", "focus ratio r",
               "LATF focus ratio per step: fraction of eligible positions kept (1.0 without LATF)."))
    notes = []
    for key, fname, title, ylabel, caption in curves:
        if plot_metric(runs, key, out / fname, title, ylabel):
            plots.append(fname)
            embed(fname, caption)
        else:
            notes.append(f"No run logged `{key}`: no {fname}.")
    if plot_temperatures(runs, out / "temperatures.png"):
        plots.append("temperatures.png")
        embed("temperatures.png", "IDTS temperatures over steps: per run, the mean temperature of the step's kept "
                                  "positions (line) and its min-max range (band); a flat line at T_base means no IDTS.")
    else:
        notes.append("No run logged temperatures: no temperatures.png.")

    cache_path = cfg.cache or default_cache(runs)
    hist = None
    if not cache_path:
        notes.append("No cache given or recorded in the runs' configs: no cache histograms.")
    elif not Path(cache_path).is_dir():
        notes.append(f"Cache {cache_path} not found: no cache histograms.")
    else:
        hist = cache_histograms(cache_path, cfg.bins)
        rows = f"{hist['rows']:,} target positions"
        plot_histogram(hist["entropy"], out / "cache_entropy.png", f"Teacher entropy over the cache ({rows})",
                       "teacher entropy H(p) (nats)")
        plot_histogram(hist["log10_tail"], out / "cache_tail_mass.png",
                       f"Teacher mass outside its top-{hist['k']} ({rows})", "log10 r,  r = 1 - top-K mass")
        plots += ["cache_entropy.png", "cache_tail_mass.png"]
        embed("cache_entropy.png", f"Teacher entropy H(p) at every cached position of {cache_path} "
                                   f"({cfg.bins} bins; dashed: mean).")
        zero = hist["log10_tail"]["zero"]
        embed("cache_tail_mass.png", f"Mass the teacher puts outside its cached top-{hist['k']} ids (the tail "
                                     f"bucket), log10 scale, every cached position ({cfg.bins} bins; dashed: mean)"
                                     + (f"; {zero:,} rows with no tail (K = V) not shown." if zero else "."))
        if hist["rows"] < hist["cache_rows"]:
            notes.append(f"The cache is incomplete: histograms cover {hist['rows']:,} of {hist['cache_rows']:,} rows.")

    text = ["# kdcache report", "",
            f"{len(runs)} run(s); eval figures from each run's eval.json (CE over target tokens in nats, "
            "FKL on the K + 1 buckets at T = 1); final TAR from the last metrics row; tokens/s averaged over steps.",
            "", table(runs), "", *versus_baseline(runs), *sections]
    if notes:
        text += ["", *[f"- {n}" for n in notes]]
    path = out / REPORT_FILENAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(text).rstrip() + "\n")
    tmp.replace(path)
    for stale in set(REPORT_PLOTS) - set(plots):  # an earlier report's plots this one did not redraw
        (out / stale).unlink(missing_ok=True)
    return {"path": str(path), "runs": runs, "plots": plots, "cache": hist}


def report(cfg: ReportConfig) -> str:
    """Write the report; returns the path of report.md."""
    return build_report(cfg)["path"]


def summary_line(r: dict[str, Any]) -> str:
    """One line for the end of `kdcache report`."""
    cache = f", cache histograms over {r['cache']['rows']:,} rows" if r["cache"] else ""
    return f"report: {len(r['runs'])} run(s), {len(r['plots'])} plot(s){cache} -> {r['path']}"
