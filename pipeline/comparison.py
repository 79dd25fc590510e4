"""Which student is best, by how much, and whether that is more than seed-to-seed noise.

Runs whose configs differ only in `seed` (and in keys that do not change the weights) are seeds of
one method: a *group*. The best group is the one with the lowest mean held-out cross-entropy; its
margin over every other group is set against the seed-to-seed spread, the within-group standard
deviation pooled over every group that has several seeds:

    se = s_pooled * sqrt(1/n_best + 1/n_other),   margin / se >= 2  ->  "ahead", else "within noise"

Without repeated seeds the spread is unknown and the report says so rather than guessing.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import digest
from pipeline.train_state import IGNORED_KEYS

PRIMARY = "ce"  # the figure the best student is chosen by (lower is better)
# Config keys that do not make another method: the seed, where the run went, how it was run and watched.
NOT_METHOD = ("seed", "out", *IGNORED_KEYS, "eval_every", "eval_data", "eval_cache", "best_metric", "device", "dtype")


@dataclass
class Group:
    """Seeds of one method: runs with the same settings but the seed."""

    label: str
    method: str
    runs: list[dict[str, Any]] = field(default_factory=list)

    def values(self, key: str) -> list[float]:
        return [float(r["eval"][key]) for r in self.runs
                if isinstance(r["eval"].get(key), (int, float)) and math.isfinite(float(r["eval"][key]))]

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


def method_key(cfg: dict[str, Any] | None, name: str) -> str:
    """Equal for runs that are seeds of one method; a run without a config is its own method."""
    if cfg is None:
        return "run:" + name
    return digest({k: v for k, v in cfg.items() if k not in NOT_METHOD})


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


def pooled_spread(groups: list[Group], key: str = PRIMARY) -> tuple[float, int, int] | None:
    """(pooled within-group std, groups with >= 2 seeds, degrees of freedom), None without repeated seeds."""
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
    return math.sqrt(ss / dof), used, dof


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
    spread = pooled_spread(groups, key)
    if spread is None:
        lines += ["Every method ran with one seed, so the seed-to-seed spread is unknown and the margins below are "
                  "not tested against it: train a method again with another `seed` to measure it.", ""]
    else:
        s, used, dof = spread
        lines += [f"Seed-to-seed spread of held-out CE: {s:.4f} nats (standard deviation within a method, pooled "
                  f"over {used} method(s), {dof} degree(s) of freedom). A margin counts as ahead when it is at "
                  "least twice its standard error.", ""]
    if not others:
        return lines
    if spread is None:
        lines += ["| behind it | held-out CE | margin (nats) |", "|---|---:|---:|"]
    else:
        lines += ["| behind it | held-out CE | margin (nats) | against the spread |", "|---|---:|---:|---|"]
    for g in others:
        margin = g.mean(key) - mean
        row = f"| {g.label} ({g.method}) | {g.mean(key):.4f} | {margin:.4f} |"
        if spread is not None:
            se = spread[0] * math.sqrt(1 / n + 1 / len(g.values(key)))
            ratio = margin / se if se > 0 else math.inf
            row += f" ahead ({ratio:.1f} SE) |" if ratio >= 2 else f" within noise ({ratio:.1f} SE) |"
        lines.append(row)
    return lines + [""]
