"""Which student is best, by how much, and whether that is more than seed-to-seed noise.

Runs whose configs differ only in `seed` (and in keys that do not change the weights) are seeds of
one method: a *group*. The best group is the one with the lowest mean held-out cross-entropy; its
margin over every other group is set against the seed-to-seed noise (`Spread`):

- **Seeds as blocks** (the usual case, `seeds:` in `kdcache run`): when methods ran with the same seeds,
  seed s of every method starts from the same weights (its own warm start) and reads the data in the same
  order, so what one seed does to a method it does to the others. The methods x seeds table is then a
  randomised block design: the noise is the residual of the additive model y[m, s] = mu_m + b_s + e, its
  standard deviation pooled over every method with that seed set ((M - 1)(S - 1) degrees of freedom), and a
  difference of two such methods' means has se = s_resid * sqrt(2 / S) (the paired comparison).
- **Otherwise** (different or single seeds): the within-method standard deviation pooled over every method
  with several seeds, se = s_pooled * sqrt(1/n_a + 1/n_b).

    difference / se >= 2  ->  "ahead" (bold in the tables), else "within noise"

Without repeated seeds the spread is unknown and the report says so rather than guessing.

With seeds, the same test answers the user's question per figure: `seed_table` gives every method's mean ±
standard deviation, `differences` each method's difference from a baseline (CE only, plain KD from the same
teacher) in units of its standard error, `verdicts` says in words which methods pay, and
`teacher_strength` compares one method distilled from teachers of different strength. Each comparison is
tested on its own at 2 SE (about a 5% two-sided level for 20 or more degrees of freedom; no correction for
the number of comparisons, which the report states).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import digest
from pipeline.training.state import IGNORED_KEYS

PRIMARY = "ce"  # the figure the best student is chosen by (lower is better)
# (key, title, format, +1 when higher is better / -1 when lower is); final_* come from the training metrics.
FIGURES = (("ce", "held-out CE", "{:.4f}", -1), ("ppl", "PPL", "{:.2f}", -1),
           ("teacher_top1_agreement", "teacher top-1 agr.", "{:.3f}", 1), ("fkl_to_teacher", "FKL to teacher", "{:.4f}", -1),
           ("rouge_l", "ROUGE-L", "{:.3f}", 1), ("exact_match", "exact match", "{:.3f}", 1),
           ("final_tar", "final TAR", "{:.3f}", 0), ("final_focus_ratio", "final focus ratio", "{:.3f}", 0))
# Config keys that do not make another method: the seed, where the run went, how it was run and watched.
NOT_METHOD = ("seed", "out", *IGNORED_KEYS, "eval_every", "eval_data", "eval_cache", "best_metric", "device", "dtype")


def _figure_of(run: dict[str, Any], key: str) -> float | None:
    """A run's finite figure `key` (eval.json first, then the run's own, e.g. final_tar), else None."""
    v = run["eval"].get(key, run.get(key))
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
        return float(v)
    return None


@dataclass
class Group:
    """Seeds of one method: runs with the same settings but the seed."""

    label: str
    method: str
    runs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def teacher(self) -> str | None:
        """The teacher the runs distil from (`collect_run` sets r["teacher"]; None for CE only)."""
        return self.runs[0].get("teacher") if self.runs else None

    def values(self, key: str) -> list[float]:
        """The figure `key` of every run that has it: from its eval.json, else from the run itself (final_tar)."""
        return [v for v in (_figure_of(r, key) for r in self.runs) if v is not None]

    def mean_run(self) -> dict[str, Any]:
        """A run-like dict whose metrics are the mean over the seeds at each step every seed logged (what the
        curves draw for a method); the first run itself when there is one."""
        if len(self.runs) == 1:
            return self.runs[0]
        rows: dict[float, list[dict[str, Any]]] = {}
        for r in self.runs:
            for m in r["metrics"]:
                if isinstance(m.get("step"), (int, float)):
                    rows.setdefault(m["step"], []).append(m)
        metrics = []
        for step in sorted(rows):
            ms = rows[step]
            if len(ms) != len(self.runs):
                continue
            avg: dict[str, Any] = {"step": step}
            for k in set().union(*ms):
                vals = [m.get(k) for m in ms]
                if k != "step" and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
                    avg[k] = sum(vals) / len(vals)
            metrics.append(avg)
        first = self.runs[0]
        return {**first, "name": f"{self.label} (mean of {len(self.runs)})", "metrics": metrics}

    def by_seed(self, key: str) -> dict[Any, float]:
        """{seed: figure} for the runs that have both (a run without a config seed is left out)."""
        out = {}
        for r in self.runs:
            seed, v = (r.get("config") or {}).get("seed"), _figure_of(r, key)
            if seed is not None and v is not None:
                out[seed] = v
        return out

    def mean(self, key: str) -> float | None:
        v = self.values(key)
        return sum(v) / len(v) if v else None

    def std(self, key: str) -> float | None:
        """Sample standard deviation over seeds (None below two)."""
        v = self.values(key)
        if len(v) < 2:
            return None
        m = sum(v) / len(v)
        return math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))


def method_key(cfg: dict[str, Any] | None, name: str, ignore: tuple[str, ...] = ()) -> str:
    """Equal for runs that are seeds of one method; a run without a config is its own method.

    A base model named after the run's own seed (`students/warm_start_s1/final` in a `seeds:` run, where
    every seed starts from its own copy of the warm start) counts as the same base for every seed.
    `ignore`: more keys to leave out (e.g. "cache", to pair one method across teachers).
    """
    if cfg is None:
        return "run:" + name
    kept = {k: v for k, v in cfg.items() if k not in NOT_METHOD and k not in ignore}
    seed = cfg.get("seed")
    if isinstance(kept.get("student"), str) and seed is not None:
        kept["student"] = re.sub(rf"_s{seed}(?=/|$)", "_s*", kept["student"])
    return digest(kept)


def _label(names: list[str], method: str) -> str:
    """kd_s0, kd_s1 -> 'kd'; one run keeps its name; nothing in common -> the method."""
    if len(names) == 1:
        return names[0]
    prefix = names[0]
    for n in names[1:]:
        while not n.startswith(prefix):
            prefix = prefix[:-1]
    prefix = re.sub(r"[_\-. ]*(seed|s)?[_\-. ]*$", "", prefix)
    return prefix or method


def group_runs(runs: list[dict[str, Any]]) -> list[Group]:
    """Groups in order of their first run."""
    by_key: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by_key.setdefault(method_key(r["config"], r["name"]), []).append(r)
    return [Group(_label([r["name"] for r in rs], rs[0]["method"]), rs[0]["method"], rs) for rs in by_key.values()]


@dataclass
class Spread:
    """The seed-to-seed noise of one figure, and the standard error of a difference of two methods' means.

    `within`: the within-method standard deviation pooled over methods with >= 2 seeds (`within_dof`, over
    `within_methods`). `resid`: the residual standard deviation of the methods x seeds table of the methods
    whose seeds are exactly `seeds` (`resid_dof` = (M - 1)(S - 1), over `resid_methods`), None when fewer than
    two methods share a seed set of two or more.
    """

    within: float
    within_dof: int
    within_methods: int
    resid: float | None = None
    resid_dof: int = 0
    resid_methods: int = 0
    seeds: frozenset = frozenset()

    @property
    def blocked(self) -> bool:
        return self.resid is not None

    def se(self, a: Group, b: Group, key: str) -> float:
        """Standard error of mean(a) - mean(b): paired by seed when both ran exactly the block seeds."""
        if self.resid is not None and set(a.by_seed(key)) == set(b.by_seed(key)) == self.seeds \
                and len(a.values(key)) == len(b.values(key)) == len(self.seeds):
            return self.resid * math.sqrt(2 / len(self.seeds))
        return self.within * math.sqrt(1 / len(a.values(key)) + 1 / len(b.values(key)))

    def describe(self, unit: str = "nats") -> str:
        """One sentence for the report: which noise the margins are tested against."""
        if self.resid is not None:
            return (f"Seeds are blocks (every method's seed s starts from the same weights and reads the data in "
                    f"the same order), so methods are compared seed by seed: residual standard deviation of the "
                    f"methods x seeds table {self.resid:.4f} {unit} ({self.resid_methods} methods x "
                    f"{len(self.seeds)} seeds, {self.resid_dof} degrees of freedom), against a within-method "
                    f"standard deviation of {self.within:.4f} {unit} that includes each seed's own luck.")
        return (f"Seed-to-seed spread: {self.within:.4f} {unit} (standard deviation within a method, pooled over "
                f"{self.within_methods} method(s), {self.within_dof} degree(s) of freedom).")


def _residual_sd(groups: list[Group], key: str) -> tuple[float, int, int, frozenset] | None:
    """(residual sd, dof, methods, seeds) of the additive methods x seeds model over the methods whose seed
    set is the most common one of >= 2 seeds; None when fewer than two methods share it."""
    sets: dict[frozenset, list[dict[Any, float]]] = {}
    for g in groups:
        v = g.by_seed(key)
        if len(v) >= 2 and len(v) == len(g.values(key)):
            sets.setdefault(frozenset(v), []).append(v)
    if not sets:
        return None
    seeds, rows = max(sets.items(), key=lambda kv: (len(kv[1]), len(kv[0])))
    m, n = len(rows), len(seeds)
    if m < 2:
        return None
    order = sorted(seeds, key=str)
    row_mean = [sum(r[s] for s in order) / n for r in rows]
    col_mean = {s: sum(r[s] for r in rows) / m for s in order}
    grand = sum(row_mean) / m
    ss = sum((r[s] - row_mean[i] - col_mean[s] + grand) ** 2 for i, r in enumerate(rows) for s in order)
    dof = (m - 1) * (n - 1)
    return math.sqrt(ss / dof), dof, m, seeds


def spread(groups: list[Group], key: str = PRIMARY) -> Spread | None:
    """The noise of figure `key` (see `Spread`); None without repeated seeds."""
    ss = dof = used = 0
    for g in groups:
        v = g.values(key)
        if len(v) >= 2:
            m = sum(v) / len(v)
            ss += sum((x - m) ** 2 for x in v)
            dof += len(v) - 1
            used += 1
    if dof == 0:
        return None
    out = Spread(math.sqrt(ss / dof), dof, used)
    resid = _residual_sd(groups, key)
    if resid is not None:
        out.resid, out.resid_dof, out.resid_methods, out.seeds = resid
    return out


def best_student(groups: list[Group], key: str = PRIMARY) -> list[str]:
    """Markdown lines: the best group by mean held-out `key`, and its margin over each other group."""
    scored = sorted((g for g in groups if g.values(key)), key=lambda g: g.mean(key))
    if not scored:
        return []
    best, others = scored[0], scored[1:]
    n = len(best.values(key))
    mean = best.mean(key)
    seeds = f", mean of {n} seeds" if n > 1 else ""
    extra = [f"PPL {math.exp(mean):.2f}"] if mean < 700 else []
    agr = best.mean("teacher_top1_agreement")
    if agr is not None:
        extra.append(f"teacher top-1 agreement {agr:.3f}")
    also = f" ({', '.join(extra)})" if extra else ""
    lines = ["## Best student", "",
             f"**{best.label}** ({best.method}) has the lowest held-out cross-entropy: {mean:.4f} nats{seeds}{also}.",
             ""]
    sp = spread(groups, key)
    if sp is None:
        lines += ["Every method ran with one seed, so the seed-to-seed spread is unknown and the margins below are "
                  "not tested against it: train a method again with another `seed` to measure it.", ""]
    else:
        lines += [f"Held-out CE. {sp.describe()} A margin counts as ahead when it is at least twice its standard "
                  "error.", ""]
    if not others:
        return lines
    if sp is None:
        lines += ["| behind it | held-out CE | margin (nats) |", "|---|---:|---:|"]
    else:
        lines += ["| behind it | held-out CE | margin (nats) | against the spread |", "|---|---:|---:|---|"]
    for g in others:
        margin = g.mean(key) - mean
        row = f"| {g.label} ({g.method}) | {g.mean(key):.4f} | {margin:.4f} |"
        if sp is not None:
            se = sp.se(g, best, key)
            ratio = margin / se if se > 0 else math.inf
            row += f" ahead ({ratio:.1f} SE) |" if ratio >= 2 else f" within noise ({ratio:.1f} SE) |"
        lines.append(row)
    return lines + [""]


# ---- seeds: every figure, every method ---------------------------------------------------------
def _fmt(v: float | None, f: str) -> str:
    return f.format(v) if v is not None else "—"


def _mean_sd(g: Group, key: str, f: str) -> str:
    m, sd = g.mean(key), g.std(key)
    if m is None:
        return "—"
    return f.format(m) + (f" ± {f.format(sd)}" if sd is not None else "")


def shown_figures(groups: list[Group]) -> list[tuple[str, str, str, int]]:
    return [fig for fig in FIGURES if any(g.values(fig[0]) for g in groups)]


def seed_table(groups: list[Group]) -> list[str]:
    """Markdown: one row per method, mean ± standard deviation over its seeds of every figure any run has."""
    figs = shown_figures(groups)
    head = ["method", "what", "teacher", "seeds"] + [t for _, t, _, _ in figs]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(head) - 3)) + "|"]
    for g in groups:
        cells = [g.label, g.method, g.teacher or "—", str(len(g.runs))] + [_mean_sd(g, k, f) for k, _, f, _ in figs]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return lines


def compare(g: Group, base: Group, key: str, sp: Spread | None) -> tuple[float, float | None] | None:
    """(mean difference g - base, difference / standard error or None without a spread); None when either
    group lacks the figure. SE: `Spread.se` (paired by seed when both ran the block seeds)."""
    a, b = g.values(key), base.values(key)
    if not a or not b:
        return None
    d = sum(a) / len(a) - sum(b) / len(b)
    if sp is None:
        return d, None
    se = sp.se(g, base, key)
    return d, (d / se if se > 0 else (math.inf if d else 0.0))


def differences(groups: list[Group], base: Group, title: str, only: list[Group] | None = None) -> list[str]:
    """Markdown: each group's difference from `base` per figure, `**bold**` when it is at least 2 SE."""
    figs = [f for f in shown_figures(groups) if f[3] != 0]
    spreads = {k: spread(groups, k) for k, _, _, _ in figs}
    rows = [g for g in (only if only is not None else groups) if g is not base]
    if not rows:
        return []
    lines = [f"### {title}", "",
             "Difference of the means (method − baseline), and in brackets that difference over its standard error; "
             "**bold**: at least 2 SE, i.e. beyond the seed-to-seed spread; ↑/↓ marks better/worse.", "",
             "| method | " + " | ".join(t for _, t, _, _ in figs) + " |", "|---|" + "---:|" * len(figs)]
    for g in rows:
        cells = [g.label]
        for k, _, f, better in figs:
            c = compare(g, base, k, spreads[k])
            if c is None:
                cells.append("—")
                continue
            d, t = c
            sign = "↑" if d * better > 0 else ("↓" if d * better < 0 else "")
            txt = f"{f.format(d) if d < 0 else '+' + f.format(d)}{sign}" + (f" ({t:.1f})" if t is not None else "")
            cells.append(f"**{txt}**" if t is not None and abs(t) >= 2 else txt)
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def verdict(g: Group, base: Group, key: str, sp: Spread | None, better: int) -> str:
    """'pays' / 'costs' / 'no measurable difference' / 'untested' for g against base on `key`."""
    c = compare(g, base, key, sp)
    if c is None or c[1] is None:
        return "untested (one seed)"
    d, t = c
    if abs(t) < 2:
        return "no measurable difference"
    return "pays" if d * better > 0 else "costs"


def verdicts(groups: list[Group], base: Group, base_name: str) -> list[str]:
    """One sentence per method: does it beat `base` on held-out CE and on ROUGE-L, beyond the spread?"""
    keys = [(k, t, b) for k, t, _, b in FIGURES if k in ("ce", "rouge_l") and any(g.values(k) for g in groups)]
    spreads = {k: spread(groups, k) for k, _, _ in keys}
    out = []
    for g in groups:
        if g is base or not g.values(PRIMARY):
            continue
        parts = []
        for k, t, b in keys:
            c = compare(g, base, k, spreads[k])
            if c is not None:
                parts.append(f"{t} {verdict(g, base, k, spreads[k], b)} ({c[0]:+.4f})")
        out.append(f"- **{g.label}** against {base_name}: " + "; ".join(parts))
    return out


def teacher_strength(groups: list[Group], strength: dict[str, float]) -> list[str]:
    """Markdown: methods run with several teachers, one column per teacher (weakest first by the teacher's own
    held-out CE in `strength`), held-out CE and ROUGE-L mean ± sd, and the change from the weakest to the
    strongest teacher in SE units. Empty unless some method ran with two teachers."""
    by_method: dict[str, list[Group]] = {}
    for g in groups:
        if g.teacher is not None and g.runs and g.runs[0].get("config") is not None:
            by_method.setdefault(method_key(g.runs[0]["config"], g.label, ignore=("cache",)), []).append(g)
    pairs = [gs for gs in by_method.values() if len({g.teacher for g in gs}) > 1]
    if not pairs:
        return []
    order = sorted({g.teacher for gs in pairs for g in gs}, key=lambda t: -strength.get(t, 0.0))  # weak -> strong
    spread_ce, spread_rl = spread(groups, "ce"), spread(groups, "rouge_l")
    lines = ["## Stronger teacher, better student?", "",
             "The same method distilled from each teacher (teachers ordered weakest to strongest by their own "
             "held-out CE: " + ", ".join(f"{t} {strength[t]:.3f}" for t in order if t in strength) + "). Last "
             "columns: strongest minus weakest teacher, in brackets over its standard error (**bold**: ≥ 2 SE).", "",
             "| method | " + " | ".join(f"CE from {t}" for t in order) + " | " + " | ".join(f"ROUGE-L from {t}" for t in order)
             + " | Δ CE | Δ ROUGE-L |", "|---|" + "---:|" * (2 * len(order) + 2)]
    for gs in pairs:
        by_t = {g.teacher: g for g in gs}
        cells = [gs[0].method] + [_mean_sd(by_t[t], "ce", "{:.4f}") if t in by_t else "—" for t in order]
        cells += [_mean_sd(by_t[t], "rouge_l", "{:.3f}") if t in by_t else "—" for t in order]
        present = [t for t in order if t in by_t]
        weak, strong = by_t[present[0]], by_t[present[-1]]
        for key, sp, f in (("ce", spread_ce, "{:+.4f}"), ("rouge_l", spread_rl, "{:+.3f}")):
            c = compare(strong, weak, key, sp)
            if c is None:
                cells.append("—")
                continue
            txt = f.format(c[0]) + (f" ({c[1]:.1f})" if c[1] is not None else "")
            cells.append(f"**{txt}**" if c[1] is not None and abs(c[1]) >= 2 else txt)
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]
