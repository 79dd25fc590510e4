"""bench/gpu_suite.py, the one command that measures every GPU figure: its CPU smoke mode runs every part on tiny
sizes here, so the suite cannot rot between GPU sessions, and its dry run names every figure that
docs/benchmarks.md lists under "Not yet measured".

    .venv/bin/python -m pytest tests/bench/test_gpu_suite.py -q
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SUITE = ROOT / "bench" / "gpu_suite.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

# Figures that need a GPU or a compiler run the smoke skips (each part notes why).
NOT_IN_SMOKE = {
    "teacher": {"compile_warmup_s", "teacher_compiled_tok_s", "ratio_compiled", "mfu_teacher_compiled",
                "compile_speedup", "compiled_same_set", "compiled_max_dlogp"},
    "fidelity": {"compiled_cpu_same_set", "compiled_cpu_max_dlogp"},
}


def dry_run() -> tuple[dict[str, list[str]], str]:
    """-> ({part: [figure keys]}, the whole output)."""
    out = subprocess.run([sys.executable, str(SUITE), "--dry-run"], capture_output=True, text=True, timeout=60,
                         env=ENV, check=True).stdout
    parts: dict[str, list[str]] = {}
    current = None
    for line in out.splitlines():
        m = re.match(r"part (\w+) \(budget \d+ s\)", line)
        if m:
            current = parts.setdefault(m.group(1), [])
        elif current is not None and re.match(r"    \w+: ", line):
            current.append(line.split(":")[0].strip())
        elif not line.strip():
            current = None
    return parts, out


def not_yet_measured() -> list[tuple[str, str]]:
    """docs/benchmarks.md, section 'Not yet measured': (bold label, the part the bullet names) per bullet."""
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    section = text.split("## Not yet measured", 1)[1].split("\n## ", 1)[0]
    bullets = [b for b in re.split(r"\n(?=- )", section) if b.startswith("- ")]
    out = []
    for b in bullets:
        label = re.match(r"- \*\*(.+?)\*\*", b)
        part = re.search(r"part `(\w+)`", b)
        assert label and part, f"a 'Not yet measured' bullet without a **label** or a part `NAME`: {b[:120]!r}"
        out.append((label.group(1), part.group(1)))
    return out


def test_dry_run_names_every_not_yet_measured_figure_and_its_part():
    parts, out = dry_run()
    bullets = not_yet_measured()
    assert len(bullets) >= 6
    for label, part in bullets:
        assert part in parts, f"docs name part {part!r}, the suite has {sorted(parts)}"
        line = next((x for x in out.splitlines() if x.strip().startswith(f"- {label} -> part ")), None)
        assert line is not None, f"the dry run does not list {label!r}"
        assert line.strip().startswith(f"- {label} -> part {part} ("), (line, part)
        keys = re.search(r"\((.*)\)$", line).group(1).split(", ")
        assert keys and set(keys) <= set(parts[part]), (label, keys, parts[part])
    listed = [x for x in out.splitlines() if " -> part " in x]
    assert len(listed) == len(bullets), "the suite lists a figure docs/benchmarks.md does not (or twice)"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_suite")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(SUITE), "--smoke", "--out", str(out)], capture_output=True, text=True,
                          timeout=300, env=ENV, cwd=ROOT)
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "gpu_suite.json").read_text()), out, proc, wall


def fig(res, part, key):
    return res["parts"][part]["figures"][key]


@pytest.mark.slow  # --runslow (27 s): run it before a GPU session and whenever bench/ or a part's code changes
def test_smoke_runs_every_part_and_records_every_figure(smoke):
    res, out, proc, wall = smoke
    parts, _ = dry_run()
    assert list(res["parts"]) == list(parts)
    for name, p in res["parts"].items():
        if name == "multi_gpu":  # one machine without GPUs: skipped, saying why
            assert p["status"] == "skipped" and "2 GPUs" in p["skipped"], p
            continue
        assert p["status"] == "ok", (name, p.get("error"), p.get("traceback", "")[-2000:])
        missing = set(parts[name]) - set(p["figures"]) - NOT_IN_SMOKE.get(name, set())
        assert not missing, (name, missing)
    assert res["smoke"] and res["env"]["torch"] and res["env"]["transformers"] and res["command"].endswith(f"--out {out}")
    md = (out / "gpu_suite.md").read_text()
    assert res["env"]["torch"] in md and "--smoke" in md and res["date"] in md
    for name in parts:
        assert f"| {name} | " in md
    for line in md.splitlines():  # a pipe inside a label or note must not add a column
        if line.startswith("|"):
            assert len(re.findall(r"(?<!\\)\|", line)) in (4, 5), line
    # Printed as measured, part by part (a failure later keeps these lines).
    assert "teacher.ratio = " in proc.stdout and "student.kd_ce_ratio = " in proc.stdout
    print(f"smoke wall time {wall:.1f} s")


@pytest.mark.slow
def test_smoke_figures_make_sense(smoke):
    res, _, _, _ = smoke
    z = res["sizes"]
    # cuda_paths on CPU: the device path is the CPU path, so everything is equal; the bf16 product is exact in fp32.
    assert fig(res, "cuda_paths", "host_buffers_max_diff") == 0.0
    assert fig(res, "cuda_paths", "fp32_product_rel_diff") == 0.0
    assert 0.0 <= fig(res, "cuda_paths", "fp32_product_err_cpu") < 1e-5
    assert fig(res, "cuda_paths", "device_map_same_set") == 1.0 and fig(res, "cuda_paths", "device_map_max_dlogp") == 0.0
    # teacher: positive rates, the ratio is their quotient, MFU a fraction (nominal 1 TFLOP/s peak in the smoke).
    bare, teach = fig(res, "teacher", "bare_tok_s"), fig(res, "teacher", "teacher_tok_s")
    assert bare > 0 and teach > 0 and math.isclose(fig(res, "teacher", "ratio"), teach / bare, rel_tol=1e-9)
    assert fig(res, "teacher", "tokens") == z["big_seqs"] * z["big_seq"]
    for k in ("mfu_bare", "mfu_teacher"):
        assert 0.0 < fig(res, "teacher", k) < 1.0
    assert math.isclose(fig(res, "teacher", "mfu_teacher") / fig(res, "teacher", "mfu_bare"), teach / bare, rel_tol=1e-9)
    assert 5.0 < fig(res, "teacher", "bytes_per_row") < 200.0
    # fidelity: every row of both caches; the fp32 cache within the codec's bounds of the float64 oracle
    # (head: head_step 0.04 + 2^-10), the bf16 one within bf16's; CPU against CPU bitwise.
    f = res["parts"]["fidelity"]["figures"]
    assert f["bf16_rows"] == z["oracle_seqs"] * (z["big_seq"] - 1)
    assert f["dev_cpu_rows"] == z["small_seqs"] * (z["small_seq"] - 1)
    assert f["fp32_head_err_max"] <= 0.041 + 1e-4
    assert f["fp32_tail_rel_max"] < 2e-3
    assert f["fp32_entropy_err_max"] < 0.05
    assert 0.999 < f["fp32_grad_cos_ideal_min"] <= 1.0 + 1e-9
    assert f["bf16_head_err_max"] < 0.2 and f["bf16_head_err_mean"] <= f["bf16_head_err_max"]
    assert 0.5 < f["bf16_topk_set"] <= 1.0
    assert f["bf16_tail_rel_median"] <= f["bf16_tail_rel_max"] < 0.05
    assert f["bf16_entropy_err_max"] < 0.1 and f["bf16_target_err_max"] < 0.2
    for k in ("bf16_grad_cos_ideal_mean", "bf16_grad_cos_ideal_min", "bf16_grad_cos_dense_mean",
              "ideal_grad_cos_dense_mean"):
        assert -1.0 <= f[k] <= 1.0 + 1e-9, k
    assert f["bf16_grad_cos_ideal_mean"] > 0.95 and f["bf16_grad_cos_ideal_min"] <= f["bf16_grad_cos_ideal_mean"]
    assert (f["dev_cpu_identical"], f["dev_cpu_same_set"], f["dev_cpu_max_dlogp"], f["dev_cpu_max_dtail"],
            f["dev_cpu_max_dentropy"]) == (1.0, 1.0, 0.0, 0.0, 0.0)
    # real_llm (the smoke's stand-in): rows cached, the device cache equal to the CPU one.
    r = res["parts"]["real_llm"]["figures"]
    assert r["rows"] > 0 and r["rows_s_bf16"] > 0 and r["eq_rows"] > 0 and r["params_m"] > 0
    assert (r["dev_cpu_identical"], r["dev_cpu_same_set"], r["dev_cpu_max_dlogp"]) == (1.0, 1.0, 0.0)
    # student: every row kept, the ratio is the quotient of the medians; fp32 autocast off CUDA = fp32.
    s = res["parts"]["student"]["figures"]
    assert s["ce_step_s"] > 0 and s["kd_step_s"] > 0
    assert math.isclose(s["kd_ce_ratio"], s["kd_step_s"] / s["ce_step_s"], rel_tol=1e-9)
    assert s["kept_fraction"] == 1.0 and s["targets"] == z["student_batch"] * (z["student_seq"] - 1)
    assert abs(s["autocast_grad_cos"] - 1.0) < 1e-9 and abs(s["autocast_grad_norm_ratio"] - 1.0) < 1e-9
    assert s["chunked_step_s"] > 0 and s["full_step_s"] > 0
    assert s["peak_chunked_gb"] is None and s["peak_full_gb"] is None  # CUDA memory statistics only
    # quality: the reduced run trained and evaluated every student, with finite held-out CE.
    q = res["parts"]["quality"]["figures"]
    assert q["students_trained"] == q["students_evaluated"] == q["students_total"] == len(q["heldout_ce"]) == 3
    assert all(0 < v < 20 for v in q["heldout_ce"].values()) and all(0 < v < 20 for v in q["teacher_ce"].values())


PARTS_THAT_FAIL = """
import sys, time
from pathlib import Path
sys.path.insert(0, "bench")
import gpu_suite as g

part = g.Part("demo", 1, 1, "a part that fails", (("before", "measured before the failure"),))
s = g.Session(args=None, sizes=None, device="cpu", work=Path(sys.argv[1]), out=Path(sys.argv[1]))

def raises(s):
    s.rec.fig("before", 1.5)
    raise ValueError("bad input\\nsecond line")

def overruns(s):
    s.rec.fig("before", 2.5)
    s.rec.note("sleeping past the budget")
    time.sleep(60)

def dies(s):
    import os, signal
    os.kill(os.getpid(), signal.SIGKILL)

import json
print(json.dumps({n: g.run_child(n, f, s, part, budget=0.5, grace_s=0.5) for n, f in
                  (("raises", raises), ("overruns", overruns), ("dies", dies))}))
"""


def test_a_part_that_raises_overruns_or_dies_is_recorded_and_keeps_what_it_measured(tmp_path):
    # The suite's runner on three parts that fail each way: each one's record says how, in one line, with the
    # figures measured before the failure; the runner itself returns (the suite goes on to the next part).
    proc = subprocess.run([sys.executable, "-c", PARTS_THAT_FAIL, str(tmp_path)], capture_output=True, text=True,
                          timeout=60, env=ENV, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    r = rec["raises"]
    assert r["status"] == "error" and r["error"] == "ValueError: bad input" and r["figures"] == {"before": 1.5}
    assert "Traceback" in r["traceback"]
    r = rec["overruns"]
    assert r["status"] == "over budget" and r["figures"] == {"before": 2.5} and r["notes"] == ["sleeping past the budget"]
    assert r["seconds"] < 10
    r = rec["dies"]
    assert r["status"] == "error" and r["error"] == "died of signal 9"
