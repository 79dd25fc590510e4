"""Tests for `pipeline.evaluation.report` and `kdcache report`: fake run directories written here, a real cache.

    .venv/bin/python -m pytest tests/evaluation/test_report.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from pipeline.cache import open_cache
from pipeline.errors import KdError
from pipeline.evaluation.report import ReportConfig, build_report, cache_histograms, method_name

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The teacher pass on a tiny model is far faster single-threaded on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, prepared_dir, llama_dir) -> Path:
    """A cache of several shards (and several Zarr chunks per shard) so dask concatenates."""
    from pipeline.teacher.runner import TeacherConfig, run_teacher

    out = tmp_path_factory.mktemp("repcache") / "cache"
    run_teacher(TeacherConfig(data=str(prepared_dir), model=str(llama_dir), out=str(out), top_k=8, device="cpu",
                              shard_rows=150, chunk_rows=40))
    return out


def write_run(root: Path, name: str, config: dict | None, metrics: list[dict] | None, ev: dict | None,
              eval_in_subdir: bool = True, torn_line: bool = False) -> Path:
    d = root / name
    d.mkdir(parents=True)
    if config is not None:
        (d / "config.yaml").write_text(yaml.safe_dump(config))
    if metrics is not None:
        text = "".join(json.dumps(m) + "\n" for m in metrics)
        (d / "metrics.jsonl").write_text(text + ('{"step": 99, "lo' if torn_line else ""))
    if ev is not None:
        p = d / "eval" / "eval.json" if eval_in_subdir else d / "eval.json"
        p.parent.mkdir(exist_ok=True)
        p.write_text(json.dumps(ev))
    return d


def fake_metrics(steps: int, distill: bool, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(1, steps + 1):
        row = {"step": s, "loss": 5.0 / s ** 0.3 + 0.05 * rng.random(), "kd_loss": 0.0, "ce_loss": 5.0 / s ** 0.3,
               "lr": 3e-4, "tokens_per_s": 1000.0 + 10 * s}
        if distill:
            t = 1.0 + 0.3 * rng.standard_normal()
            row.update({"tar": min(1.0, 0.4 + 0.02 * s), "focus_ratio": max(0.1, 1.0 - 0.03 * s), "temp_mean": t,
                        "temp_min": t - 0.3, "temp_max": t + 0.5, "kept_fraction": 0.8})
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir) -> list[Path]:
    root = tmp_path_factory.mktemp("runs")
    c = str(cache_dir)
    return [
        write_run(root, "ce", {"cache": "", "loss": "fkl", "gate": "none"}, fake_metrics(20, False, 0),
                  {"ce": 3.2, "ppl": 24.5, "targets": 100}),
        write_run(root, "kd", {"cache": c, "loss": "fkl", "tail": "bucket", "gate": "none"}, fake_metrics(20, True, 1),
                  {"ce": 3.0, "ppl": 20.1, "teacher_top1_agreement": 0.41, "fkl_to_teacher": 0.52},
                  eval_in_subdir=False),
        write_run(root, "speckd_all", {"cache": c, "loss": "fkl", "tail": "bucket", "gate": "topk", "gate_k": 5,
                                       "latf": True, "idts": True}, fake_metrics(20, True, 2),
                  {"ce": 2.9, "ppl": 18.2, "exact_match": 0.25, "rouge_l": 0.61}, torn_line=True),
        write_run(root, "bare", None, None, None),
    ]


def test_method_names():
    assert method_name({"cache": "", "loss": "fkl"}) == "CE only"
    assert method_name({"cache": "c", "loss": "none"}) == "CE only"
    assert method_name({"cache": "c", "loss": "fkl", "tail": "bucket", "gate": "none"}) == "KD fkl/bucket"
    assert method_name({"cache": "c", "loss": "fkl", "gate": "topk", "gate_k": 5}) == "SpecKD topk k=5 + fkl"
    assert (method_name({"cache": "c", "loss": "rkl", "tail": "renorm", "gate": "spec", "latf": True, "idts": True})
            == "SpecKD spec + LATF + IDTS + rkl/renorm")
    assert method_name({"cache": "c", "loss": "jsd", "ce_weight": 0.5}) == "KD jsd/bucket + 0.5·CE"
    assert method_name(None) == "—"
    assert method_name({"online_teacher": "t", "loss": "fkl"}) == "KD fkl online"
    assert method_name({"online_teacher": "t", "loss": "rkl", "latf": True, "idts": True}) == "LATF + IDTS + rkl online"
    assert method_name({"online_teacher": "t", "loss": "none"}) == "CE only"


def test_report_files_table_and_plots(tmp_path, runs, cache_dir):
    out = tmp_path / "report"
    r = build_report(ReportConfig(runs=[str(p) for p in runs], out=str(out)))  # cache from the runs' configs
    md = (out / "report.md").read_text()
    table = all_runs_table(md)
    assert len(table) == 2 + len(runs)  # header, separator, one row per run
    assert "teacher top-1 agr." in table[0] and "ROUGE-L" in table[0] and "final TAR" in table[0]
    rows = {ln.split("|")[1].strip(): ln for ln in table[2:]}
    assert set(rows) == {"ce", "kd", "speckd_all", "bare"}
    assert "CE only" in rows["ce"] and "3.2000" in rows["ce"]
    assert "KD fkl/bucket" in rows["kd"] and "0.410" in rows["kd"]  # eval.json directly in the run dir
    assert "SpecKD topk k=5 + LATF + IDTS + fkl" in rows["speckd_all"] and "0.610" in rows["speckd_all"]
    assert rows["speckd_all"].split("|")[-3].strip() == "0.800"  # final TAR: last complete row (torn line skipped)
    bare = [c.strip() for c in rows["bare"].split("|")[2:-1]]
    assert bare and all(c == "—" for c in bare)
    assert set(r["plots"]) == {"heldout.png", "losses.png", "tar.png", "focus_ratio.png", "temperatures.png",
                               "cache_entropy.png", "cache_tail_mass.png"}
    # The reader's first section: the best student by held-out CE, with the honest caveat of one seed each.
    first = md.split("## All runs")[0]
    assert "**speckd_all** (SpecKD topk k=5 + LATF + IDTS + fkl) has the lowest held-out cross-entropy: 2.9000" in first
    assert "| kd (KD fkl/bucket) | 3.0000 | 0.1000 |\n" in first and "seed-to-seed spread is unknown" in first
    assert first.index("## Best student") < first.index("](heldout.png)")
    for name in r["plots"]:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1024, name
        assert f"]({name})" in md  # embedded by relative path
    assert (out / "config.yaml").is_file()


def all_runs_table(md: str) -> list[str]:
    return [ln for ln in md.split("## All runs")[1].split("##")[0].splitlines() if ln.startswith("|")]


def test_cache_histograms_cover_every_row(cache_dir):
    c = open_cache(cache_dir)
    assert len(c.shards) > 1
    h = cache_histograms(cache_dir, bins=20)
    assert h["rows"] == c.num_rows
    assert int(h["entropy"]["counts"].sum()) == c.num_rows
    assert int(h["log10_tail"]["counts"].sum()) + h["log10_tail"]["zero"] == c.num_rows
    # The out-of-core (dask, one task per Zarr chunk) counts equal an in-memory histogram of all rows at once.
    rows = c.read(0, c.num_rows, ("entropy", "tail_logprob"))
    ent = rows["entropy"].astype(np.float64)
    e_counts, _ = np.histogram(ent, bins=20, range=(ent.min(), ent.max()))
    assert np.array_equal(h["entropy"]["counts"], e_counts)
    lt = rows["tail_logprob"].astype(np.float64) / np.log(10)
    assert h["log10_tail"]["mean"] == pytest.approx(lt.mean(), rel=1e-5)
    assert np.array_equal(h["log10_tail"]["counts"], np.histogram(lt, bins=20, range=(lt.min(), 0.0))[0])


def test_report_without_cache_or_metrics(tmp_path):
    run = write_run(tmp_path, "only_eval", None, None, {"ce": 1.0, "ppl": 2.718})
    r = build_report(ReportConfig(runs=[str(run)], out=str(tmp_path / "rep")))
    md = Path(r["path"]).read_text()
    assert r["plots"] == ["heldout.png"] and r["cache"] is None  # its held-out figures, nothing else
    assert "| only_eval | — | 1.0000 | 2.72 | — | — |" in md
    assert "No cache given" in md


def test_cli_report_and_errors(tmp_path, runs, cache_dir):
    from stages.cli import main

    runner = CliRunner()
    out = tmp_path / "rep"
    res = runner.invoke(main, ["report", *map(str, runs[:2]), "--out", str(out), "--cache", str(cache_dir),
                               "--bins", "10"])
    assert res.exit_code == 0, res.output
    assert res.output.strip().splitlines()[-1].startswith("report: 2 run(s)")
    assert yaml.safe_load((out / "config.yaml").read_text())["bins"] == 10
    res = runner.invoke(main, ["report", str(tmp_path / "missing"), "--out", str(out)])
    assert res.exit_code == 1 and "kdcache report: error: run directory not found" in res.output
    res = runner.invoke(main, ["report", str(runs[0]), "--out", str(out), "--set", "bins=1"])
    assert res.exit_code == 1 and "bins must be at least 2" in res.output
    with pytest.raises(KdError, match="no run directories"):
        build_report(ReportConfig(out=str(out)))
    # --teacher (documented in the README and --help) names the `teachers` field, comma-separated.
    res = runner.invoke(main, ["report", str(runs[1]), "--teacher", f"{runs[0]},{runs[2]}", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert yaml.safe_load((out / "config.yaml").read_text())["teachers"] == [str(runs[0]), str(runs[2])]


def test_versus_baseline_states_ahead_and_behind():
    from pipeline.evaluation.report import versus_baseline

    def run(name, method, ce, agr, steps):
        return {"name": name, "method": method, "eval": {"ce": ce, "teacher_top1_agreement": agr},
                "metrics": [{"step": steps}]}

    lines = versus_baseline([run("warm", "CE only", 2.5, 0.3, 100), run("ce", "CE only", 2.0, 0.50, 400),
                             run("kd", "KD fkl/bucket", 1.9, 0.55, 300), run("spec", "SpecKD topk k=5 + fkl", 2.1, 0.52, 300)])
    text = "\n".join(lines)
    assert "baseline (ce)" in text  # the CE-only run with the most steps, not the warm start
    assert "**kd**" in text and "perplexity ahead" in text.split("**spec**")[0]
    spec = text.split("**spec**")[1]
    assert "perplexity behind" in spec and "teacher agreement ahead (0.520 vs 0.500)" in spec
    assert versus_baseline([run("ce", "CE only", 2.0, 0.5, 10)]) == []


# ---- seeds, the best student, throughput ---------------------------------------------------------

def seed_runs(root: Path) -> dict[str, list[float]]:
    """Three methods: kd (3 seeds), ce (3 seeds), spec (1 seed, another gate_k); held-out CE per run."""
    ces = {"kd": [2.00, 2.03, 1.98], "ce": [2.10, 2.14, 2.09], "spec": [2.02]}
    for method, values in ces.items():
        for seed, ce in enumerate(values):
            cfg = {"cache": "c" if method != "ce" else "", "loss": "fkl" if method != "ce" else "none",
                   "tail": "bucket", "gate": "topk" if method == "spec" else "none", "gate_k": 7, "seed": seed,
                   "lr": 0.01, "out": str(root / f"{method}_s{seed}")}
            write_run(root, f"{method}_s{seed}", cfg, fake_metrics(5, method != "ce", seed),
                      {"ce": ce, "ppl": float(np.exp(ce)), "teacher_top1_agreement": 0.5 - ce / 10})
    return ces


def test_best_student_and_its_margins_against_the_seed_spread(tmp_path):
    ces = seed_runs(tmp_path / "runs")
    names = sorted(p.name for p in (tmp_path / "runs").iterdir())
    r = build_report(ReportConfig(runs=[str(tmp_path / "runs" / n) for n in names], out=str(tmp_path / "rep")))
    groups = {g.label: [run["name"] for run in g.runs] for g in r["groups"]}
    assert groups == {"ce": ["ce_s0", "ce_s1", "ce_s2"], "kd": ["kd_s0", "kd_s1", "kd_s2"], "spec_s0": ["spec_s0"]}
    # The truth, computed here. kd and ce ran the same seeds: a paired comparison, the standard error of the
    # mean of the per-seed differences. spec (one seed) against kd: the pooled within-method sd.
    ss = sum(((np.asarray(v) - np.mean(v)) ** 2).sum() for v in ces.values() if len(v) > 1)
    s = float(np.sqrt(ss / 4))  # 2 methods x (3 - 1) degrees of freedom
    d = np.asarray(ces["ce"]) - np.asarray(ces["kd"])
    se_paired = float(np.std(d, ddof=1) / np.sqrt(3))
    best = float(np.mean(ces["kd"]))
    md = Path(r["path"]).read_text().split("## All runs")[0]
    assert f"**kd** (KD fkl/bucket) has the lowest held-out cross-entropy: {best:.4f} nats, mean of 3 seeds" in md
    resid = se_paired / np.sqrt(2 / 3)  # the residual sd of the 2 x 3 table
    assert f"methods x seeds table {resid:.4f} nats (2 methods x 3 seeds, 2 degrees of freedom)" in md
    assert f"within-method standard deviation of {s:.4f} nats" in md
    margin_ce = float(np.mean(ces["ce"])) - best
    ratio_ce = margin_ce / se_paired
    assert ratio_ce >= 2 and f"| ce (CE only) | {np.mean(ces['ce']):.4f} | {margin_ce:.4f} | ahead ({ratio_ce:.1f} SE) |" in md
    margin_spec = ces["spec"][0] - best
    ratio_spec = margin_spec / (s * np.sqrt(1 / 3 + 1))
    assert ratio_spec < 2 and f"| {margin_spec:.4f} | within noise ({ratio_spec:.1f} SE) |" in md
    assert "heldout.png" in r["plots"]


def test_seeds_are_paired_only_when_both_methods_ran_them():
    """Shared seeds: se of a difference from the per-seed differences (a method that is uniformly 0.1 better
    than another on every seed is far beyond the noise even when each seed moves both by 0.5). Disjoint seeds:
    the pooled within-method sd."""
    from pipeline.evaluation.comparison import Group, compare, spread

    def group(label, values, seeds):
        return Group(label, "m", [{"name": f"{label}_s{s}", "config": {"seed": s}, "eval": {"ce": v}, "metrics": []}
                                  for v, s in zip(values, seeds)])

    luck = [0.0, 0.5, -0.4]  # what each seed's warm start does to every method
    a = group("a", [2.0 + x for x in luck], [0, 1, 2])
    b = group("b", [2.1 + x + e for x, e in zip(luck, (0.01, -0.02, 0.0))], [0, 1, 2])
    c = group("c", [2.1 + x for x in luck], [3, 4, 5])  # other seeds: not paired with a
    sp = spread([a, b, c], "ce")
    d = np.asarray(b.values("ce")) - np.asarray(a.values("ce"))
    diff, t = compare(b, a, "ce", sp)
    assert diff == pytest.approx(d.mean()) and t == pytest.approx(d.mean() / (np.std(d, ddof=1) / np.sqrt(3)))
    within = np.sqrt(sum(np.var(g.values("ce"), ddof=1) * 2 for g in (a, b, c)) / 6)
    diff, t = compare(c, a, "ce", sp)
    assert t == pytest.approx(diff / (within * np.sqrt(2 / 3))) and abs(t) < 2
    assert sp.resid_methods == 2 and sp.seeds == {0, 1, 2}


def test_a_method_keeps_its_colour_and_seeds_their_line_styles(tmp_path):
    seed_runs(tmp_path / "runs")
    names = sorted(p.name for p in (tmp_path / "runs").iterdir())
    r = build_report(ReportConfig(runs=[str(tmp_path / "runs" / n) for n in names], out=str(tmp_path / "rep")))
    by_group = [{tuple(run["colour"]) for run in g.runs} for g in r["groups"]]
    assert all(len(c) == 1 for c in by_group) and len(set().union(*by_group)) == len(by_group)
    for g in r["groups"]:
        assert len({run["style"] for run in g.runs}) == len(g.runs)


def test_throughput_is_the_training_summarys(tmp_path, prepared_dir, vocab_size):
    """The table shows total tokens / total step time (train_summary.json), not the mean of per-step rates."""
    from pipeline.training.trainer import train
    from pipeline.training.config import TrainConfig

    student = tmp_path / "student.json"
    student.write_text(json.dumps({"model_type": "llama", "vocab_size": vocab_size, "hidden_size": 16,
                                   "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                   "num_key_value_heads": 1, "max_position_embeddings": 128,
                                   "tie_word_embeddings": True}))
    run = tmp_path / "ce"
    train(TrainConfig(data=str(prepared_dir), student_config=str(student), out=str(run), epochs=1, batch_size=8,
                      shuffle=False, device="cpu"))
    summary = json.loads((run / "train_summary.json").read_text())
    pmeta = json.loads((prepared_dir / "kdcache_prepare.json").read_text())
    assert summary["tokens_seen"] == pmeta["tokens"]  # one epoch: every token once
    assert summary["tokens_per_s"] == pytest.approx(summary["tokens_seen"] / summary["seconds"])
    r = build_report(ReportConfig(runs=[str(run)], out=str(tmp_path / "rep")))
    row = all_runs_table(Path(r["path"]).read_text())[2]
    assert row.split("|")[-2].strip() == f"{summary['tokens_per_s']:,.0f}"
    assert "losses.png" in r["plots"] and "heldout.png" not in r["plots"]


# ---- seeds and teachers: what each method pays, against the spread --------------------------------

ARMS = {  # name: (cache teacher or None, gate, max_steps, held-out CE per seed, ROUGE-L per seed)
    "warm_start": (None, "none", 2, [3.00, 3.05, 2.98], [0.20, 0.21, 0.19]),
    "ce_only": (None, "none", 5, [2.50, 2.52, 2.48], [0.30, 0.31, 0.29]),
    "kd_large": ("large", "none", 5, [2.40, 2.42, 2.38], [0.33, 0.34, 0.32]),
    "spec_large": ("large", "topk", 5, [2.49, 2.53, 2.50], [0.30, 0.32, 0.29]),
    "kd_small": ("small", "none", 5, [2.45, 2.47, 2.43], [0.31, 0.33, 0.31]),
}


def two_teacher_runs(root: Path) -> tuple[list[str], list[str]]:
    """Fake runs of 5 methods x 3 seeds distilled from two teachers whose caches record their models."""
    teachers = []
    for name, ce in (("large", 2.1), ("small", 2.3)):
        t = root / "teachers" / name
        (t / "eval").mkdir(parents=True)
        (t / "eval" / "eval.json").write_text(json.dumps({"ce": ce, "rouge_l": 0.5}))
        cache = root / "caches" / name
        cache.mkdir(parents=True)
        (cache / "kdcache.json").write_text(json.dumps({"teacher": {"model": str(t / "final")}}))
        teachers.append(str(t))
    runs = []
    for arm, (teacher, gate, steps, ces, rls) in ARMS.items():
        for seed, (ce, rl) in enumerate(zip(ces, rls)):
            distil = teacher is not None
            cfg = {"cache": str(root / "caches" / teacher) if distil else "", "loss": "fkl" if distil else "none",
                   "tail": "bucket", "gate": gate, "gate_k": 5, "seed": seed, "max_steps": steps,
                   "student": str(root / "students" / f"warm_start_s{seed}" / "final") if arm != "warm_start" else "",
                   "out": str(root / "students" / f"{arm}_s{seed}")}
            d = write_run(root / "students", f"{arm}_s{seed}", cfg, fake_metrics(steps, distil, seed),
                          {"ce": ce, "ppl": float(np.exp(ce)), "rouge_l": rl})
            runs.append(str(d))
    return runs, teachers


def test_seed_sections_say_which_methods_pay_and_whether_the_stronger_teacher_helps(tmp_path):
    runs, teachers = two_teacher_runs(tmp_path)
    r = build_report(ReportConfig(runs=runs, teachers=teachers, out=str(tmp_path / "rep")))
    md = Path(r["path"]).read_text()
    assert {g.label: g.teacher for g in r["groups"]} == {"warm_start": None, "ce_only": None, "kd_large": "large",
                                                        "spec_large": "large", "kd_small": "small"}
    # the truth, computed here: every method ran seeds 0-2 from its seed's warm start, so the noise is the
    # residual of the methods x seeds table (two-way, additive; 4 x 2 degrees of freedom) and a difference of
    # two methods' means has se = s_resid * sqrt(2 / 3)
    def resid(i):
        y = np.asarray([v[i] for v in ARMS.values()])
        r = y - y.mean(1, keepdims=True) - y.mean(0, keepdims=True) + y.mean()
        return float(np.sqrt((r ** 2).sum() / ((len(y) - 1) * 2)))

    s_ce, s_rl = resid(3), resid(4)
    se = np.sqrt(2 / 3)

    def t(arm, base, i, s):
        return (np.mean(ARMS[arm][i]) - np.mean(ARMS[base][i])) / (s * se)

    seeds = md.split("## Methods over seeds")[1].split("## All runs")[0]
    mean_sd = f"{np.mean(ARMS['kd_large'][3]):.4f} ± {np.std(ARMS['kd_large'][3], ddof=1):.4f}"
    assert mean_sd in seeds.split("| kd_large |")[1].split("\n")[0]
    # against CE only (the CE-only method with the most steps, not the warm start)
    vs_ce = seeds.split("### Against CE only (ce_only)")[1].split("###")[0]
    row = vs_ce.split("| kd_large |")[1].split("\n")[0]
    assert f"**-0.1000↑ ({t('kd_large', 'ce_only', 3, s_ce):.1f})**" in row  # better CE by > 2 SE
    row = vs_ce.split("| spec_large |")[1].split("\n")[0]
    assert abs(t("spec_large", "ce_only", 3, s_ce)) < 2 and f"({t('spec_large', 'ce_only', 3, s_ce):.1f}) |" in row
    assert "**" not in row.split("|")[1]  # within the spread: not bold
    # against plain KD from the same teacher: only that teacher's methods
    vs_kd = seeds.split("### Against plain KD from the same teacher (kd_large)")[1].split("###")[0]
    assert "| spec_large |" in vs_kd and "| kd_small |" not in vs_kd and "| ce_only |" not in vs_kd
    pay = seeds.split("### Does each method pay?")[1]
    assert "**kd_large** against CE only (ce_only): held-out CE pays (-0.1000)" in pay
    assert "**spec_large** against CE only (ce_only): held-out CE no measurable difference" in pay
    assert "**spec_large** against plain KD (kd_large): held-out CE costs" in pay
    # the same method from two teachers: weakest (small, CE 2.3) first, strongest minus weakest last
    strong = md.split("## Stronger teacher, better student?")[1].split("## All runs")[0]
    assert "small 2.300, large 2.100" in strong
    row = strong.split("| KD fkl/bucket |")[1].split("\n")[0]
    d = np.mean(ARMS["kd_large"][3]) - np.mean(ARMS["kd_small"][3])
    assert f"{d:+.4f} ({t('kd_large', 'kd_small', 3, s_ce):.1f})" in row
    assert f"{np.mean(ARMS['kd_large'][4]) - np.mean(ARMS['kd_small'][4]):+.3f}" in row
    assert abs(s_rl) > 0
    # with seeds the curves are one mean line per method; the teachers are reference rows of the table
    assert "kd_large (mean of 3)" in " ".join(run["name"] for run in [g.mean_run() for g in r["groups"]])
    assert "| large | teacher (reference) |" in md and "| small | teacher (reference) |" in md


def test_mean_run_averages_the_seeds_step_by_step():
    from pipeline.evaluation.comparison import Group

    runs = [{"name": f"a_s{i}", "eval": {}, "metrics": [{"step": 1, "ce_loss": 1.0 + i}, {"step": 2, "ce_loss": 3.0 * i}]
             + ([{"step": 3, "ce_loss": 9.0}] if i else [])} for i in range(2)]
    m = Group("a", "CE only", runs).mean_run()
    assert m["metrics"] == [{"step": 1, "ce_loss": 1.5}, {"step": 2, "ce_loss": 1.5}]  # step 3: one seed only


def test_heldout_chart_wraps_many_methods_into_rows(tmp_path):
    """18 methods x 5 figures: panels wrap into rows no wider than 24 in (at 120 dpi), not one 40-inch strip."""
    from PIL import Image

    from pipeline.evaluation.comparison import Group
    from pipeline.evaluation.plots import assign_styles, plot_heldout

    groups = [Group(f"m{i}", "m", [{"name": f"m{i}_s{s}", "config": {"seed": s}, "metrics": [],
                                    "eval": {"ce": 2.0 + 0.01 * i + 0.1 * s, "teacher_top1_agreement": 0.5,
                                             "fkl_to_teacher": 0.3, "rouge_l": 0.1, "exact_match": 0.0}}
                                   for s in range(3)]) for i in range(18)]
    assign_styles(groups)
    assert plot_heldout(groups, [], tmp_path / "h.png")
    w, h = Image.open(tmp_path / "h.png").size
    assert w <= 24 * 120 and h >= 2 * 4.2 * 120 - 1  # several rows


def test_two_teachers_of_one_model_are_told_apart(tmp_path):
    """Two teachers with one model (K = 8 and K = 32 caches of it): each distilled run is named after the teacher
    whose cache it read, not the teacher registered last for that model; with `teacher_slots` (as `kdcache run`
    passes) the model's one evaluation is one reference row named after both, and both teachers have its
    strength."""
    model = tmp_path / "model"
    model.mkdir()
    for slot in ("k8", "k32"):
        t = tmp_path / "teachers" / slot
        (t / "eval").mkdir(parents=True)
        (t / "eval" / "eval.json").write_text(json.dumps({"ce": 2.0}))
        (t / "eval" / "config.yaml").write_text(yaml.safe_dump({"model": str(model)}))
    t8, t32 = tmp_path / "teachers" / "k8", tmp_path / "teachers" / "k32"
    runs = []
    for slot in ("k8", "k32"):
        cache = tmp_path / "caches" / slot
        cache.mkdir(parents=True)
        (cache / "kdcache.json").write_text(json.dumps({"teacher": {"model": str(model)}}))
        for seed in (0, 1):
            cfg = {"cache": str(cache), "loss": "fkl", "seed": seed, "out": f"kd_{slot}_s{seed}"}
            runs.append(str(write_run(tmp_path / "students", f"kd_{slot}_s{seed}", cfg, fake_metrics(3, True, seed),
                                      {"ce": 2.5 + seed / 10 + (slot == "k8") / 100})))
    # kdcache report by hand, both teachers given (one model): the cache's own name decides between them
    r = build_report(ReportConfig(runs=runs, teachers=[str(t8), str(t32)], out=str(tmp_path / "a")))
    assert {g.label: g.teacher for g in r["groups"]} == {"kd_k8": "k8", "kd_k32": "k32"}
    # the run's way: every slot by name, their model's one evaluation
    slots = {s: {"cache": str(tmp_path / "caches" / s), "teacher": str(t8)} for s in ("k8", "k32")}
    r = build_report(ReportConfig(runs=runs, teachers=[str(t8)], teacher_slots=slots, out=str(tmp_path / "b")))
    assert {g.label: g.teacher for g in r["groups"]} == {"kd_k8": "k8", "kd_k32": "k32"}
    md = Path(r["path"]).read_text()
    assert "| k8 = k32 | teacher (reference) |" in md and md.count("teacher (reference)") == 1
    assert "| kd_k32_s0 | KD fkl/bucket | k32 |" in md and "| kd_k8_s1 | KD fkl/bucket | k8 |" in md
    assert "| kd_k32 | KD fkl/bucket | k32 | 2 |" in md  # the seed table's teacher column
    # both slots have the model's strength (2.000): the same method from each, side by side
    assert "k8 2.000" in md and "k32 2.000" in md


def test_a_cache_and_teacher_at_urls_name_the_runs_teacher(tmp_path):
    """Runs that read a cache on an object store are named after the teacher whose model made it, found from the
    cache's kdcache.json at its URL (a trailing slash or none), as for local directories."""
    import fsspec

    from pipeline.storage import store_for

    root = "memory://kdtest-report"
    teacher = store_for(f"{root}/runs/big")
    teacher.write_bytes("eval/eval.json", json.dumps({"ce": 2.0}).encode())
    store_for(f"{root}/cache").write_bytes("kdcache.json", json.dumps(
        {"teacher": {"model": f"{root}/runs/big/final/"}}).encode())
    try:
        runs = [str(write_run(tmp_path, f"kd_s{seed}", {"cache": f"{root}/cache", "loss": "fkl", "seed": seed},
                              fake_metrics(3, True, seed), {"ce": 2.5})) for seed in (0, 1)]
        r = build_report(ReportConfig(runs=runs, teachers=[f"{root}/runs/big/"], out=str(tmp_path / "report")))
        assert {g.label: g.teacher for g in r["groups"]} == {"kd": "big"}
    finally:
        fsspec.filesystem("memory").rm("/kdtest-report", recursive=True)
