"""The table of docs/benchmarks.md "What the cache costs a student", from a finished `kdcache run` with seeds:
every method's held-out CE, teacher top-1 agreement and FKL to the teacher, as paired differences (seed s of
a method minus seed s of the reference) against the online arm and against CE only, mean ± standard error.

    .venv/bin/python bench/online_table.py runs/bench-online            # after `kdcache run configs/bench-online.yaml`
    .venv/bin/python bench/online_table.py runs/bench-online --cache runs/bench-online/caches/large

A difference is "within noise" when |mean| <= 2 standard errors of the paired differences (3 seeds: a rough
test, said as such). Reads OUT/students/<name>_s<seed>/eval/eval.json; prints markdown.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from pathlib import Path

METRICS = (("ce", "held-out CE", -1), ("teacher_top1_agreement", "agreement", +1), ("fkl_to_teacher", "FKL", -1))


def load(out: Path) -> dict[str, dict[int, dict]]:
    """{method: {seed: eval.json}} of every seeded student with an eval."""
    got: dict[str, dict[int, dict]] = {}
    for f in sorted((out / "students").glob("*_s*/eval/eval.json")):
        m = re.fullmatch(r"(.+)_s(\d+)", f.parent.parent.name)
        if m:
            got.setdefault(m.group(1), {})[int(m.group(2))] = json.loads(f.read_text())
    return got


def paired(a: dict[int, dict], b: dict[int, dict], key: str) -> tuple[float, float, int]:
    """Mean and standard error of a[s][key] - b[s][key] over the seeds both have."""
    d = [a[s][key] - b[s][key] for s in sorted(set(a) & set(b)) if key in a[s] and key in b[s]]
    if not d:
        return math.nan, math.nan, 0
    se = statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else math.nan
    return statistics.fmean(d), se, len(d)


def cell(mean: float, se: float) -> str:
    if math.isnan(mean):
        return "—"
    flag = "" if math.isnan(se) or abs(mean) <= 2 * se else " *"
    return f"{mean:+.4f} ± {se:.4f}{flag}"


def table(results: dict[str, dict[int, dict]], ref: str, title: str) -> list[str]:
    lines = [f"**{title}** (paired by seed; * = beyond 2 standard errors)", "",
             "| method | " + " | ".join(f"Δ {label}" for _, label, _ in METRICS) + " |",
             "|---|" + "---:|" * len(METRICS)]
    for name in results:
        if name == ref:
            continue
        lines.append(f"| {name} | " + " | ".join(cell(*paired(results[name], results[ref], k)[:2])
                                                 for k, _, _ in METRICS) + " |")
    return lines


def absolute(results: dict[str, dict[int, dict]]) -> list[str]:
    lines = ["| method | seeds | " + " | ".join(label for _, label, _ in METRICS) + " |",
             "|---|---:|" + "---:|" * len(METRICS)]
    for name, by_seed in results.items():
        vals = []
        for k, _, _ in METRICS:
            xs = [r[k] for r in by_seed.values() if k in r]
            vals.append(f"{statistics.fmean(xs):.4f}" if xs else "—")
        lines.append(f"| {name} | {len(by_seed)} | " + " | ".join(vals) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="the run's directory (its `out:`)")
    ap.add_argument("--online", default="kd_online", help="the reference arm's student name (without _s<seed>)")
    ap.add_argument("--ce", default="ce_only", help="the CE-only arm's student name")
    ap.add_argument("--skip", nargs="*", default=["warm_start"], help="students left out of the tables")
    args = ap.parse_args(argv)
    results = {k: v for k, v in load(Path(args.out)).items() if k not in args.skip}
    if args.online not in results or args.ce not in results:
        print(f"{args.out}: no evaluated {args.online!r} or {args.ce!r} students (run the eval stage first)",
              file=sys.stderr)
        return 1
    order = [args.online, args.ce] + sorted(k for k in results if k not in (args.online, args.ce))
    results = {k: results[k] for k in order}
    print("\n".join(absolute(results) + [""] + table(results, args.online, f"Against online KD ({args.online})")
                    + [""] + table(results, args.ce, f"Against CE only ({args.ce})")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
