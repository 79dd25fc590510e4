"""Mutation check of the KD mathematics: plant known defects in a temporary copy of `pipeline/` and run tests.

Each mutant is a set of source edits (old text -> new text, with the number of places it must match) applied to a
fresh copy of the `pipeline` package in a temporary directory; never to the real files. A forked child (torch is
imported once, by the parent) puts the copy first on sys.path, checks that `pipeline` is imported from it, and
runs pytest on the chosen tests. A mutant is killed when some test fails. A mutant whose text no longer matches
the source is reported STALE (the code moved on: update its edit) and fails the run, as does a failing baseline.
A few mutants carry the reason they may survive (`survives`: equivalent, or below what any test resolves) and are
reported, not required to die; `fast=False` ones are killed only by a hand-written test outside the fast subset.

    OMP_NUM_THREADS=1 .venv/bin/python tests/mutation/run_mutants.py --fast      # the fast subset, -x (~1 min)
    OMP_NUM_THREADS=1 .venv/bin/python tests/mutation/run_mutants.py             # the full subset, every failing test
    ... --only rkl_as_fkl no_t_squared --markdown --json mutants.json

Fast subset: the float64-reference tests (tests/losses/test_reference.py, the chunked loss and the re-tempering
against tests/losses/reference.py). Full subset: tests/losses/, the tail draws' tests (tests/teacher/test_tail_draws.py,
their codec in tests/cache/test_cache_codecs.py) and the KDLoss tests of tests/interop/test_api.py,
so the table says which tests kill each mutant (the path-vs-path comparisons among them). Exit status 0 when the
baseline passes and every mutant without a documented `survives` reason is killed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from typing import Iterator
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

FAST = (
    "tests/losses/test_reference.py",
    "tests/losses/test_chunked_loss.py::test_chunked_equals_the_float64_reference",
    "tests/losses/test_temperature.py::test_decoded_then_interpolated_a_against_the_reference",
)
FULL = (
    "tests/losses",
    "tests/teacher/test_tail_draws.py",  # the teacher's sampler
    "tests/cache/test_cache_codecs.py::test_draw_log_probs_round_trip_and_caches_without_them",
    "tests/interop/test_api.py::test_kdloss_equals_a_dense_reference",
    "tests/interop/test_api.py::test_kdloss_equals_the_float64_reference_with_every_method",
    "tests/interop/test_api.py::test_kdloss_gives_the_numbers_of_kdcache_train",
)


@dataclass(frozen=True)
class Mutant:
    """A planted defect: edits (file under pipeline/, old, new, how many places old must match)."""

    name: str
    what: str
    edits: tuple[tuple[str, str, str, int], ...]
    survives: str = ""  # why it may survive (equivalent, or below what the tests resolve); empty: must be killed
    fast: bool = True  # the fast subset must kill it (False: only a hand-written test of the full subset does)


def _e(path: str, old: str, new: str, count: int = 1) -> tuple[str, str, str, int]:
    return (path, old, new, count)


DIV, GATE, ADA, SEL, TEMP, OBJ, CH, SCHEMA = ("losses/divergences.py", "losses/gate.py", "losses/adakd.py",
                                              "losses/selection.py", "losses/temperature.py", "losses/objective.py",
                                              "losses/chunked.py", "cache/schema.py")
SAMP, STATS = "losses/sampled.py", "teacher/stats.py"

MUTANTS: tuple[Mutant, ...] = (
    # ---- the reviewer's families -------------------------------------------------------------------------------
    Mutant("akl_weights_args_swapped", "AKL: _akl_weights(log_q, log_p): head chosen by Q, not P",
           (_e(DIV, "w_head, w_tail = _akl_weights(log_p, log_q, mu)", "w_head, w_tail = _akl_weights(log_q, log_p, mu)"),)),
    Mutant("akl_fkl_rkl_swapped", "AKL: w_head·rkl + w_tail·fkl",
           (_e(DIV, "return w_head * fkl + w_tail * rkl", "return w_head * rkl + w_tail * fkl"),)),
    Mutant("idts_inverted", "IDTS: T = T_base·exp(+c·tanh(log(s/m))) (hard tokens get the high temperature)",
           (_e(ADA, "temps = t_base * torch.exp(-c * torch.tanh(", "temps = t_base * torch.exp(c * torch.tanh("),)),
    Mutant("gate_tail_mass_as_p", "gate: p(ŷ) outside the head = r (the tail mass), not r/(V-K)",
           (_e(GATE, "tail = r / (vocab_size - k) if vocab_size > k", "tail = r if vocab_size > k"),)),
    Mutant("latf_keeps_easiest", "LATF keeps the easiest fraction",
           (_e(ADA, "return keep_top_fraction(difficulty, eligible, self._ratio)",
               "return keep_top_fraction(-difficulty, eligible, self._ratio)"),)),
    Mutant("offgrid_tail_plus_0_1", "T(β) + 0.1 between grid knots (A(β) off the grid shifted by up to 0.1)",
           (_e(TEMP, "out = b * safe_r + (1.0 - b) * renyi", "out = b * safe_r + (1.0 - b) * renyi + 0.1"),)),
    Mutant("head_gaps_plus_2pct", "codec: decoded head gaps × 1.02",
           (_e(SCHEMA, "d *= self.gaps.step", "d *= self.gaps.step * 1.02"),)),
    Mutant("no_t_squared", "the T² factor dropped everywhere (kd_terms, chunked value and gradient, weighted_kd_loss)",
           (_e(OBJ, "return KdTerms((w * t * t * d).sum(),", "return KdTerms((w * d).sum(),"),
            _e(CH, "scale = spec.kd_scale * plan.weight[g] * t * t", "scale = spec.kd_scale * plan.weight[g]"),
            _e(CH, "(plan.weight[g] * t * t * d).sum()", "(plan.weight[g] * d).sum()"),
            _e(CH, "torch.where(keep, plan.weight[g] * t * t * d,", "torch.where(keep, plan.weight[g] * d,"),
            _e(DIV, "scale = w if temperature is None else w * temperature.detach().to(dt).square()", "scale = w"))),
    Mutant("rkl_as_fkl", "rkl computed as fkl",
           (_e(DIV, 'if name == "rkl":\n        return _xlogx_ratio(log_q, log_p)',
               'if name == "rkl":\n        return _xlogx_ratio(log_p, log_q)'),)),
    Mutant("sekd_keeps_lowest", "SE-KD keeps the lowest-entropy positions",
           (_e(SEL, "return keep_top_fraction(entropy, eligible, ratio, groups)",
               "return keep_top_fraction(-entropy, eligible, ratio, groups)"),)),
    Mutant("normaliser_is_count", "KD normaliser = number of kept rows instead of Σ w (plan, kd_terms, weighted_kd_loss)",
           (_e(OBJ, "return float(self.weight[self.keep].sum())", "return float(self.keep.sum())"),
            _e(OBJ, "return KdTerms((w * t * t * d).sum(), float(w.sum()),", "return KdTerms((w * t * t * d).sum(), float(w.numel()),"),
            _e(DIV, "total_w = w.sum()", "total_w = used.sum().to(dt)"))),
    # ---- more divergence constants and forms ---------------------------------------------------------------
    Mutant("jsd_lambda_swapped", "jsd: M = λP + (1-λ)Q",
           (_e(DIV, "log_m = _log_mix(1 - lam, log_p, lam, log_q)", "log_m = _log_mix(lam, log_p, 1 - lam, log_q)"),)),
    Mutant("tvd_without_half", "tvd = Σ|P - Q| (no ½)",
           (_e(DIV, "return 0.5 * (log_p.exp() - log_q.exp()).abs()", "return (log_p.exp() - log_q.exp()).abs()"),)),
    Mutant("skl_mix_swapped", "skl: KL(P ‖ (1-α)P + αQ)",
           (_e(DIV, "_xlogx_ratio(log_p, _log_mix(alpha, log_p, 1 - alpha, log_q))",
               "_xlogx_ratio(log_p, _log_mix(1 - alpha, log_p, alpha, log_q))"),)),
    Mutant("srkl_mix_swapped", "srkl: KL(Q ‖ αP + (1-α)Q)",
           (_e(DIV, "_xlogx_ratio(log_q, _log_mix(1 - alpha, log_p, alpha, log_q))",
               "_xlogx_ratio(log_q, _log_mix(alpha, log_p, 1 - alpha, log_q))"),)),
    Mutant("student_tail_includes_padded_ids", "student buckets over the whole padded head, not the teacher's V",
           (_e(DIV, "    logits = logits[:, :vocab_size]\n", "    pass\n"),)),
    Mutant("teacher_tail_not_retempered", "the teacher's tail bucket taken at T = 1 (log r) at every temperature",
           (_e(OBJ, "tail_beta[rows] = tail_log_partition_at(1.0 / temps[rows],",
               "tail_beta[rows] = tail_log_partition_at(torch.ones_like(temps[rows]),"),)),
    Mutant("tail_shape_grid_reversed", "codec: tail shape codes read at the reversed grid column",
           (_e(SCHEMA, "self.shape.decode(shape_codes[:, g])", "self.shape.decode(shape_codes[:, -1 - g])"),)),
    # ---- gate, selection, temperatures ---------------------------------------------------------------------
    Mutant("gate_k_ignored", "topk rule checks all K cached ids, not the first gate_k",
           (_e(GATE, "accepted = (topk_ids[:, :kv] == y[:, None]).any(-1)", "accepted = (topk_ids == y[:, None]).any(-1)"),)),
    Mutant("spec_ratio_inverted", "spec rule accepts with min(1, q/p)",
           (_e(GATE, "p / q.clamp_min(torch.finfo(q.dtype).tiny)", "q / p.clamp_min(torch.finfo(q.dtype).tiny)"),)),
    Mutant("reject_weight_swapped", "accepted rows get reject_weight, rejected rows 1",
           (_e(GATE, "weight = torch.where(accepted, 1.0, reject_weight)", "weight = torch.where(accepted, reject_weight, 1.0)"),)),
    Mutant("sekd_per_microbatch", "SE-KD selects over the micro-batch, not per sequence",
           (_e(SEL, "return keep_top_fraction(entropy, eligible, ratio, groups)",
               "return keep_top_fraction(entropy, eligible, ratio, None)"),)),
    Mutant("idts_lower_median", "IDTS: the lower middle value instead of the mean of the two middle ones",
           (_e(ADA, "mid = 0.5 * (ordered[lo] + ordered[hi])", "mid = ordered[lo] + 0.0 * ordered[hi]"),)),
    Mutant("idts_median_over_all_rows", "IDTS: median over every row, not over the kept ones",
           (_e(ADA, "m = _true_median(s, selected)", "m = _true_median(s, torch.ones_like(selected))"),)),
    Mutant("akl_mu_strict", "AKL head: cumulative P < μ instead of <=",
           (_e(DIV, "in_head_sorted = p.gather(1, order).cumsum(-1) <= mu",
               "in_head_sorted = p.gather(1, order).cumsum(-1) < mu"),)),
    # Only the hand-written boundary case of tests/losses/test_gate.py (p(ŷ) = τ exactly) kills this one.
    Mutant("threshold_strict", "threshold rule p(ŷ) > τ instead of >=",
           (_e(GATE, "accepted = p >= threshold", "accepted = p > threshold"),), fast=False),
    # The reference tests hold the difficulty to the documented ranking approximation (|ΔHellinger| <= 3e-4), which
    # does not resolve this; the derandomised property test of tests/losses/test_adversarial_rows.py does (a confident
    # student's K + 1 masses then sum above one: Hellinger > 1).
    Mutant("ranking_tail_floor_1e-4", "LATF/IDTS difficulty: the student's ranking tail floored at 1e-4, not 1e-7",
           (_e(OBJ, "total = torch.logsumexp(head, dim=-1).clamp(max=-1e-7)",
               "total = torch.logsumexp(head, dim=-1).clamp(max=-1e-4)"),), fast=False),
    # ---- the sampled tail, the teacher's sampler, one-pass CE: killed by their own tests, in the full subset only
    # (`--only ... --tests tests/losses/test_sampled_tail.py tests/losses/test_chunked_loss.py
    # tests/teacher/test_tail_draws.py tests/cache/test_cache_codecs.py`: 7/7 with no_t_squared, 234 s) -----------
    Mutant("sampled_weights_dropped", "sampled tail: P̂_j = r^T·c_j/S at every T (the T = 1 split, no importance weight)",
           (_e(SAMP, "log_pw = torch.where(valid, log_w + log_p_draw, NEG_INF)",
               "log_pw = torch.where(valid, log_c + log_p_tail[:, None], NEG_INF)"),), fast=False),
    Mutant("sampled_student_weighted_ratio_inverted", "sampled srkl/jsd: log(1 + (a/b)·p/q) instead of (b/a)",
           (_e(SAMP, "F.softplus(math.log(b / a) + lp - lq)", "F.softplus(math.log(a / b) + lp - lq)"),), fast=False),
    Mutant("sampled_tvd_exact_part_halved", "sampled tvd: ¼(r^T + Q_T) instead of ½",
           (_e(SAMP, "tail = 0.5 * (t.log_p_tail.to(dt).exp() + q_tail)", "tail = 0.25 * (t.log_p_tail.to(dt).exp() + q_tail)"),),
           fast=False),
    Mutant("draws_uniform_squared", "teacher's sampler: u² instead of u (draws skewed to low ids)",
           (_e(STATS, "x = uniforms * total  # [C, S]", "x = uniforms.square() * total  # [C, S]"),), fast=False),
    Mutant("draw_share_code_without_log_r", "codec: tail_logprobs decoded as log π_j (the share), not log r + log π_j",
           (_e(SCHEMA, "lp = log_r[:, None] + self.shares.decode(raw[\"tail_shares\"])",
               "lp = 0.0 * log_r[:, None] + self.shares.decode(raw[\"tail_shares\"])"),), fast=False),
    Mutant("fused_ce_ignores_padded_ids", "one-pass CE: the student's padded ids left out of CE's log-sum",
           (_e(DIV, "lse = log_total if lse_pad is None else _logaddexp(log_total, lse_pad)", "lse = log_total"),)),
    # ---- documented survivors ------------------------------------------------------------------------------
    Mutant("normaliser_guard_clamped", "weighted_kd_loss divides by max(Σw, 1e-12) instead of (Σw if Σw > 0 else 1)",
           (_e(DIV, "return terms.sum() / torch.where(total_w > 0, total_w, torch.ones_like(total_w))",
               "return terms.sum() / total_w.clamp_min(1e-12)"),),
           survives="equivalent: Σw = 0 only when no row is kept, and then the numerator is exactly 0 either way"),
)


# ---- running --------------------------------------------------------------------------------------------------

class _Recorder:
    """pytest plugin: every test's outcome (a failure in setup or collection counts as a failure)."""

    def __init__(self) -> None:
        self.outcomes: dict[str, str] = {}

    def pytest_runtest_logreport(self, report) -> None:
        if report.failed:
            self.outcomes[report.nodeid] = "failed"
        elif report.when == "call" and report.nodeid not in self.outcomes:
            self.outcomes[report.nodeid] = "skipped" if report.skipped else "passed"
        elif report.skipped and report.nodeid not in self.outcomes:
            self.outcomes[report.nodeid] = "skipped"

    def pytest_collectreport(self, report) -> None:
        if report.failed:
            self.outcomes[f"{report.nodeid or 'collection'} (collection)"] = "failed"


def _apply(mutant: Mutant, pkg: Path) -> None:
    for rel, old, new, count in mutant.edits:
        p = pkg / rel
        text = p.read_text()
        found = text.count(old)
        if found != count:
            raise LookupError(f"{rel}: expected {count} match(es) of {old!r}, found {found}")
        p.write_text(text.replace(old, new))


def _child(mutant: Mutant | None, tests: list[str], stop_first: bool, tmp: Path, out: Path, log: Path,
           limit_s: int) -> int:
    import importlib

    signal.alarm(limit_s)
    sys.dont_write_bytecode = True  # nothing written into the repository (assertion-rewrite caches included)
    pkg = tmp / "pipeline"
    # __pycache__ too: copy2 keeps the sources' mtimes, so the unmodified modules' bytecode stays valid
    shutil.copytree(ROOT / "pipeline", pkg)
    if mutant is not None:
        try:
            _apply(mutant, pkg)
        except LookupError as e:
            out.write_text(json.dumps({"stale": str(e)}))
            return 0
    drop = {"", ".", str(ROOT), os.getcwd()}
    sys.path[:] = [str(tmp), str(ROOT)] + [p for p in sys.path if p not in drop]
    importlib.invalidate_caches()
    import pipeline

    if not Path(pipeline.__file__).resolve().is_relative_to(tmp.resolve()):
        raise RuntimeError(f"pipeline imported from {pipeline.__file__}, not from the mutated copy")
    os.chdir(ROOT)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    import pytest

    rec = _Recorder()
    args = [*tests, "-q", "-p", "no:cacheprovider", "-W", "ignore::pytest.PytestAssertRewriteWarning",
            *(["-x"] if stop_first else [])]
    code = pytest.main(args, plugins=[rec])
    out.write_text(json.dumps({"exit": int(code), "outcomes": rec.outcomes}))
    return 0


def start(mutant: Mutant | None, tests: list[str], stop_first: bool, limit_s: int = 900) -> tuple[int, Path, float]:
    """Fork a child that runs `tests` against pipeline/ with `mutant` planted (None: the baseline), in a temporary
    directory of its own. -> (pid, that directory, start time); `collect` reads its result."""
    tmp = Path(tempfile.mkdtemp(prefix="kdcache-mutant-"))
    out, log = tmp / "result.json", tmp / "pytest.log"
    t0 = time.perf_counter()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child never returns
        code = 70
        try:
            code = _child(mutant, tests, stop_first, tmp, out, log, limit_s)
        except BaseException:
            with open(tmp / "error.txt", "w") as f:
                traceback.print_exc(file=f)
        finally:
            os._exit(code)
    return pid, tmp, t0


def collect(tmp: Path, status: int, t0: float, keep_log: Path | None = None) -> dict:
    """The result of a finished child (`status` from wait), its directory removed; keep_log: copy pytest's output
    there."""
    try:
        out, log = tmp / "result.json", tmp / "pytest.log"
        seconds = time.perf_counter() - t0
        if out.exists():
            res = json.loads(out.read_text())
        else:
            err = (tmp / "error.txt").read_text() if (tmp / "error.txt").exists() else ""
            tail = log.read_text()[-3000:] if log.exists() else ""
            res = {"error": f"child exited with status {status}: {err}{tail}"}
        res["seconds"] = round(seconds, 1)
        if keep_log is not None and log.exists():
            keep_log.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(log, keep_log)
        if "outcomes" in res and res.get("exit") not in (0, 1):  # 2 interrupted, 3 internal, 4 usage, 5 no tests
            res["error"] = f"pytest exit code {res['exit']}: {log.read_text()[-3000:] if log.exists() else ''}"
        return res
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_one(mutant: Mutant | None, tests: list[str], stop_first: bool, limit_s: int = 900,
            keep_log: Path | None = None) -> dict:
    """`start` then wait for that child and `collect` it."""
    pid, tmp, t0 = start(mutant, tests, stop_first, limit_s)
    _, status = os.waitpid(pid, 0)
    return collect(tmp, status, t0, keep_log)


def run_many(mutants: list[Mutant], tests: list[str], stop_first: bool, jobs: int,
             logs: Path | None = None) -> Iterator[tuple[Mutant, dict]]:
    """Each mutant's result as its child finishes, `jobs` children at a time (each child is one process on one
    thread: OMP_NUM_THREADS=1)."""
    pending, running = list(mutants), {}
    while pending or running:
        while pending and len(running) < max(1, jobs):
            m = pending.pop(0)
            pid, tmp, t0 = start(m, tests, stop_first)
            running[pid] = (m, tmp, t0)
        pid, status = os.wait()
        if pid not in running:
            continue
        m, tmp, t0 = running.pop(pid)
        yield m, collect(tmp, status, t0, logs / f"{m.name}.log" if logs else None)


def verdict(mutant: Mutant, res: dict) -> str:
    if "stale" in res:
        return "STALE"
    if "error" in res:
        return "ERROR"
    failed = [k for k, v in res["outcomes"].items() if v == "failed"]
    if failed:
        return "killed"
    return "survived (documented)" if mutant.survives else "SURVIVED"


def by_function(outcomes: dict[str, str]) -> dict[str, tuple[int, int]]:
    """{file::test function: (failed, run)} over parametrised cases."""
    agg: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for node, outcome in outcomes.items():
        fn = node.split("[", 1)[0]
        agg[fn][1] += outcome != "skipped"
        agg[fn][0] += outcome == "failed"
    return {k: (v[0], v[1]) for k, v in agg.items()}


def _warm_up(torch, full: bool) -> None:
    """Run the kinds of op the tests run once here, so each forked child does not pay torch's first-call costs."""
    x = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    y = torch.log_softmax(x / 1.3, -1).logsumexp(-1) + torch.softmax(x.float(), -1).sort(-1).values.sum(-1)
    torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(x, x)  # its first call imports torch.distributed.tensor (~1 s)
    # The heavy third-party imports too (each child imported zarr, hypothesis and anyio anew, ~4 s: pytest
    # assertion-rewrites the packages of its entry-point plugins); the children silence pytest's warning that
    # these were imported before it could rewrite them. `pipeline` itself must not be imported here.
    import importlib

    for name in ("numpy", "pytest", "zarr", "numcodecs", "pyarrow", "hypothesis", "anyio") + (("transformers",) if full else ()):
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    assert not any(m == "pipeline" or m.startswith("pipeline.") for m in sys.modules), "pipeline imported too early"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fast", action="store_true", help="the fast subset, stopping at the first failure")
    ap.add_argument("--tests", nargs="+", help="pytest node ids to run instead of the subset")
    ap.add_argument("--only", nargs="+", help="mutant names")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run")
    ap.add_argument("--logs", help="keep each run's pytest output in this directory")
    ap.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)),
                    help="mutants run at once, one single-threaded process each (default: the usable cores)")
    a = ap.parse_args(argv)
    if a.list:
        for m in MUTANTS:
            print(f"{m.name:34s} {m.what}" + (f"  [may survive: {m.survives}]" if m.survives else "")
                  + ("" if m.fast else "  [full subset only]"))
        return 0
    # the fast run: the mutants the fast subset must kill (no documented survivors, no full-subset-only ones)
    mutants = [m for m in MUTANTS if (m.name in a.only if a.only else not a.fast or (m.fast and not m.survives))]
    if a.only and len(mutants) != len(set(a.only)):
        ap.error(f"unknown mutant(s): {sorted(set(a.only) - {m.name for m in MUTANTS})}")
    tests = list(a.tests or (FAST if a.fast else FULL))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch  # noqa: F401  (imported once here; every forked child inherits it)

    torch.set_num_threads(1)
    _warm_up(torch, full=not a.fast)
    t0 = time.perf_counter()
    results: dict[str, dict] = {}
    ok = True
    if not a.no_baseline:
        logs = Path(a.logs) if a.logs else None
        base = run_one(None, tests, stop_first=a.fast, keep_log=logs / "baseline.log" if logs else None)
        bad = [k for k, v in base.get("outcomes", {}).items() if v == "failed"]
        print(f"baseline: {len(base.get('outcomes', {}))} tests, {len(bad)} failed, {base['seconds']} s", flush=True)
        if bad or "error" in base:
            print("baseline fails; no mutant can be judged:", bad or base.get("error"), file=sys.stderr)
            return 2
        results["(baseline)"] = base
    for m, res in run_many(mutants, tests, a.fast, a.jobs, Path(a.logs) if a.logs else None):
        v = verdict(m, res)
        results[m.name] = {**res, "verdict": v, "what": m.what, "survives": m.survives, "fast": m.fast}
        ok &= v in ("killed", "survived (documented)")
        killers = by_function(res.get("outcomes", {}))
        names = ", ".join(f"{k.split('::')[-1]} ({f}/{n})" for k, (f, n) in killers.items() if f)
        print(f"{m.name:34s} {v:22s} {res['seconds']:6.1f} s  {names or res.get('stale') or res.get('error', '')[:300]}",
              flush=True)
    total = time.perf_counter() - t0
    print(f"{sum(r.get('verdict') == 'killed' for r in results.values())}/{len(mutants)} killed, "
          f"{'fast' if a.fast else 'full'} subset, {total:.0f} s", flush=True)
    if a.markdown:
        print()
        print("| mutant | defect | verdict | killed by (failing / run cases) |")
        print("|---|---|---|---|")
        for m in mutants:
            r = results[m.name]
            killers = by_function(r.get("outcomes", {}))
            cell = "; ".join(f"`{k.replace('tests/', '')}` {f}/{n}" for k, (f, n) in killers.items() if f)
            print(f"| `{m.name}` | {m.what} | {r['verdict']} | {cell or m.survives or r.get('stale', '')} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"tests": tests, "fast": a.fast, "seconds": round(total, 1),
                                            "results": results}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
