"""The report's PNGs (matplotlib's Agg backend, no pyplot state).

One colour per method (a seed group, `pipeline.evaluation.comparison`) across every plot, so a student is found
by colour in each; seeds of one method differ by line style. The teacher, a reference, is black.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

LINE_STYLES = ("-", "--", ":", "-.")
TEACHER_COLOUR = "black"
ONLINE_COLOUR = "tab:red"  # the online reference arm's line


def series(rows: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the rows that log a finite `key`."""
    pts = [(r["step"], float(r[key])) for r in rows
           if isinstance(r.get(key), (int, float)) and isinstance(r.get("step"), (int, float))
           and math.isfinite(float(r[key]))]
    if not pts:
        return np.zeros(0), np.zeros(0)
    s, v = zip(*pts)
    return np.asarray(s, dtype=float), np.asarray(v, dtype=float)


def assign_styles(groups: list[Any]) -> None:
    """Set r["colour"] (one per group, tab10 then tab20) and r["style"] (one per seed) on every run."""
    from matplotlib import colormaps

    palette = list(colormaps["tab10"].colors) + list(colormaps["tab20"].colors[1::2])
    for i, g in enumerate(groups):
        for j, r in enumerate(g.runs):
            r["colour"] = palette[i % len(palette)]
            r["style"] = LINE_STYLES[j % len(LINE_STYLES)]


def _figure(title: str, xlabel: str, ylabel: str, panels: int = 1, width: float = 7.0,
            cols: int | None = None) -> tuple[Any, list[Any]]:
    """A figure of `panels` axes, `cols` per row (default: all in one row); `width` is one row's width."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(cols or panels, panels)
    rows = math.ceil(panels / cols)
    fig = Figure(figsize=(width, 4.2 * rows), dpi=120)
    FigureCanvasAgg(fig)  # Agg, without pyplot's global state
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(panels)]
    for ax in axes:
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    if panels == 1:
        axes[0].set_title(title)
    else:
        fig.suptitle(title)
    return fig, axes


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, format="png")


def _line(ax: Any, r: dict[str, Any], s: np.ndarray, v: np.ndarray) -> Any:
    return ax.plot(s, v, label=r["name"], color=r.get("colour"), linestyle=r.get("style", "-"), linewidth=1.4)[0]


def smooth(v: np.ndarray, parts: int = 30) -> np.ndarray:
    """Centred moving average over about 1/parts of the run (edges averaged over what exists)."""
    w = max(1, len(v) // parts)
    if w == 1:
        return v
    kernel = np.ones(w)
    return np.convolve(v, kernel, "same") / np.convolve(np.ones(len(v)), kernel, "same")


def _noisy_lines(ax: Any, lines: list[tuple[dict[str, Any], np.ndarray, np.ndarray]]) -> None:
    """Raw per-step values faint, their moving average solid; the y axis fits the averages after each run's
    first tenth, so one run's initial drop (a warm start from random weights) does not flatten the rest."""
    tops, bottoms = [], []
    for r, s, v in lines:
        m = smooth(v)
        ax.plot(s, v, color=r.get("colour"), linestyle=r.get("style", "-"), linewidth=0.6, alpha=0.25)
        _line(ax, r, s, m)
        tail = m[len(m) // 10:] if len(m) >= 10 else m
        tops.append(float(np.max(tail)))
        bottoms.append(float(np.min(v)))
    lo, hi = min(bottoms), max(tops)
    if hi > lo:
        ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.08 * (hi - lo))


def plot_metric(runs: list[dict[str, Any]], key: str, path: Path, title: str, ylabel: str) -> bool:
    """One line per run that logs `key`; False (no file) when none does."""
    lines = [(r, *series(r["metrics"], key)) for r in runs]
    lines = [ln for ln in lines if len(ln[1])]
    if not lines:
        return False
    fig, (ax,) = _figure(title, "optimizer step", ylabel)
    for r, s, v in lines:
        _line(ax, r, s, v)
    ax.legend(fontsize=8)
    _save(fig, path)
    return True


def plot_losses(runs: list[dict[str, Any]], path: Path) -> bool:
    """Two panels: cross-entropy on the labels, and the KD loss of distilled runs, each on its own axis.

    Not the logged `loss` (alpha·CE + (1 - alpha)·KD): it mixes two scales, and CE-only runs would
    share an axis with a divergence.
    """
    ce = [(r, *series(r["metrics"], "ce_loss")) for r in runs]
    kd = [(r, *series(r["metrics"], "kd_loss")) for r in runs if r.get("distills")]
    ce, kd = [x for x in ce if len(x[1])], [x for x in kd if len(x[1])]
    if not ce and not kd:
        return False
    fig, (a_ce, a_kd) = _figure("Training losses per step", "optimizer step", "", panels=2, width=11.0)
    a_ce.set_title("cross-entropy on the labels", fontsize=10)
    a_ce.set_ylabel("CE (nats per target token)")
    a_kd.set_title("KD loss to the cached teacher (distilled runs)", fontsize=10)
    a_kd.set_ylabel("KD loss (weighted T²·divergence)")
    for ax, lines in ((a_ce, ce), (a_kd, kd)):
        if lines:
            _noisy_lines(ax, lines)
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no distilled run", ha="center", va="center", transform=ax.transAxes)
    _save(fig, path)
    return True


def plot_temperatures(runs: list[dict[str, Any]], path: Path) -> bool:
    """Per run: the step's mean IDTS temperature as a line, its min-max range as a band."""
    fig, (ax,) = _figure("IDTS temperatures per step (line: mean, band: min-max)", "optimizer step", "temperature T")
    drawn = False
    for r in runs:
        s, mean = series(r["metrics"], "temp_mean")
        if not len(s):
            continue
        _, lo = series(r["metrics"], "temp_min")
        _, hi = series(r["metrics"], "temp_max")
        line = _line(ax, r, s, mean)
        if len(lo) == len(hi) == len(s):
            ax.fill_between(s, lo, hi, color=line.get_color(), alpha=0.18, linewidth=0)
        drawn = True
    if not drawn:
        return False
    ax.legend(fontsize=8)
    _save(fig, path)
    return True


HELDOUT_PANELS = (("ce", "held-out CE (nats), lower is better"),
                  ("teacher_top1_agreement", "teacher top-1 agreement, higher is better"),
                  ("fkl_to_teacher", "FKL to the teacher, lower is better"),
                  ("rouge_l", "ROUGE-L of greedy completions, higher is better"),
                  ("exact_match", "exact match of greedy completions, higher is better"))
TEACHER_STYLES = ("--", ":", "-.")


def plot_heldout(groups: list[Any], teachers: list[dict[str, Any]], path: Path) -> bool:
    """One bar per method and held-out figure (mean over seeds; error bar: std over seeds; dots: each seed).

    Each teacher's figure is a black reference line (dashed, dotted, ...) where it has one (not agreement or
    FKL with itself). False when no student has held-out figures.
    """
    panels = [(k, t) for k, t in HELDOUT_PANELS if any(g.values(k) for g in groups)]
    shown = [g for g in groups if any(g.values(k) for k, _ in panels)]
    if not panels or not shown:
        return False
    seeds = any(len(g.runs) > 1 for g in shown)
    title = "Held-out figures per student" + (" (bars: mean over seeds, error bars: std, dots: seeds)" if seeds else "")
    # Each panel needs ~0.3 in per method to keep its labels apart: a row holds as many panels as fit in
    # 24 in, so 18 methods x 6 figures is a 2-column grid rather than a 40-inch strip.
    per_panel = 2.0 + 0.3 * len(shown)
    cols = max(1, min(len(panels), int(24.0 // per_panel)))
    fig, axes = _figure(title, "", "", panels=len(panels), cols=cols, width=max(7.0, per_panel * cols))
    x = np.arange(len(shown))
    for ax, (key, label) in zip(axes, panels):
        ax.grid(True, axis="y", alpha=0.3)
        ax.grid(False, axis="x")
        ax.set_title(label, fontsize=9)
        means = [g.mean(key) if g.values(key) else np.nan for g in shown]
        errs = [g.std(key) or 0.0 for g in shown]
        colours = [g.runs[0].get("colour") for g in shown]
        ax.bar(x, means, color=colours, alpha=0.85)
        for i, g in enumerate(shown):
            vals = g.values(key)
            if len(vals) > 1:  # a single seed has no spread to show: no error bar rather than a flat one
                ax.errorbar(x[i], means[i], yerr=errs[i], color="black", capsize=4, linewidth=1.2)
                ax.scatter(np.full(len(vals), x[i]), vals, color="black", s=10, zorder=3)
        drawn = [v for g in shown for v in g.values(key)]
        drawn += [m + e for m, e in zip(means, errs) if np.isfinite(m)] + [m - e for m, e in zip(means, errs)
                                                                          if np.isfinite(m)]
        refs = [(t["name"], float(t["eval"][key])) for t in teachers
                if key in ("ce", "rouge_l", "exact_match") and isinstance(t["eval"].get(key), (int, float))]
        for i, (name, v) in enumerate(refs):
            ax.axhline(v, color=TEACHER_COLOUR, linestyle=TEACHER_STYLES[i % len(TEACHER_STYLES)], linewidth=1,
                       label=f"{name} {v:.3f}")
            drawn.append(v)
        # The online arms (full teacher distribution, no cache): the line every cached method is measured against.
        for g in shown:
            if g.method.endswith(" online") and g.values(key):
                v = float(g.mean(key))
                ax.axhline(v, color=ONLINE_COLOUR, linestyle=":", linewidth=1.2, label=f"{g.label} (online) {v:.3f}")
                drawn.append(v)
                refs.append((g.label, v))
        if refs:
            ax.legend(fontsize=8, loc="best")
        # Zoomed to the values (bars from 0 would hide differences of a few hundredths; the caption says so).
        lo, hi = min(drawn), max(drawn)
        pad = 0.15 * (hi - lo) if hi > lo else 0.05 * abs(hi) + 1e-3
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_xticks(x)
        ax.set_xticklabels([g.label for g in shown], rotation=30, ha="right", fontsize=8)
        ax.set_xlabel("")
        ax.set_ylabel("")
    _save(fig, path)
    return True


def plot_histogram(h: dict[str, Any], path: Path, title: str, xlabel: str) -> None:
    """A filled step histogram from precomputed counts and edges."""
    fig, (ax,) = _figure(title, xlabel, "target positions")
    ax.stairs(h["counts"], h["edges"], fill=True, alpha=0.75, label=f"mean {h['mean']:.3f}")
    ax.axvline(h["mean"], color="black", linestyle="--", linewidth=1)
    ax.legend(fontsize=8)
    _save(fig, path)
