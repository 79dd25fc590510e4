"""`kdcache run`: the whole pipeline on a reduced config, skipping finished work, resuming after kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from stages.cli import main


def write_config(tmp_path: Path, data_file: Path, heldout_file: Path, tokenizer_dir: Path, teacher_dir: Path,
                 vocab_size: int, **train_over) -> Path:
    student = tmp_path / "student.json"
    student.write_text(json.dumps({"model_type": "llama", "vocab_size": vocab_size, "hidden_size": 16,
                                   "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                   "num_key_value_heads": 1, "max_position_embeddings": 128,
                                   "tie_word_embeddings": True}))
    cfg = {
        "out": str(tmp_path / "run"),
        "prepare": {"train": {"data": str(data_file), "tokenizer": str(tokenizer_dir), "max_length": 64},
                    "heldout": {"data": str(heldout_file), "tokenizer": str(tokenizer_dir), "max_length": 64}},
        "teacher": {"model": str(teacher_dir), "top_k": 8, "shard_rows": 200},
        "train_defaults": {"student_config": str(student), "max_steps": 4, "batch_size": 8, "lr": 1e-2,
                           **train_over},
        "students": {"ce": {"loss": "none"}, "kd": {"loss": "fkl"},
                     "spec_ada": {"gate": "topk", "gate_k": 3, "reject_weight": 0.2, "latf": True, "idts": True}},
        "eval": {"split": "heldout", "generate": 3},
        "report": {},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture()
def heldout_file(tmp_path) -> Path:
    from conftest import make_pairs

    p = tmp_path / "heldout.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in make_pairs(12, seed=9)))
    return p


def test_run_whole_pipeline_then_skip_everything(tmp_path, data_file, heldout_file, tokenizer_dir, llama_dir, vocab_size):
    cfg = write_config(tmp_path, data_file, heldout_file, tokenizer_dir, llama_dir, vocab_size)
    runner = CliRunner()
    res = runner.invoke(main, ["run", str(cfg)])
    assert res.exit_code == 0, res.output
    out = tmp_path / "run"
    assert "report: " + str(out / "report" / "report.md") in res.output
    report = (out / "report" / "report.md").read_text()
    for name in ("ce", "kd", "spec_ada"):
        assert (out / "students" / name / "final" / "config.json").is_file()
        ev = json.loads((out / "students" / name / "eval" / "eval.json").read_text())
        assert {"ce", "ppl", "teacher_top1_agreement", "fkl_to_teacher", "exact_match", "rouge_l"} <= ev.keys()
        assert name in report
    assert (out / "cache_heldout" / "kdcache.json").is_file()
    pngs = list((out / "report").glob("*.png"))
    assert len(pngs) >= 5 and all(p.stat().st_size > 1000 for p in pngs)
    # Everything is complete for the same config: a re-run skips every stage's work.
    res = runner.invoke(main, ["run", str(cfg)])
    assert res.exit_code == 0, res.output
    assert "already up to date" in res.output and "already complete" in res.output
    assert res.output.count("skipped") >= 3 + 4  # 3 students trained + teacher/students evaluated
    # --only and --from select stages.
    res = runner.invoke(main, ["run", str(cfg), "--only", "report"])
    assert res.exit_code == 0 and "train[" not in res.output and "report:" in res.output


def test_run_resumes_after_kill_9(tmp_path, data_file, heldout_file, tokenizer_dir, llama_dir, vocab_size):
    cfg = write_config(tmp_path, data_file, heldout_file, tokenizer_dir, llama_dir, vocab_size,
                       max_steps=12, save_every=2)
    kdcache = Path(sys.executable).with_name("kdcache")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([str(kdcache), "run", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=env, start_new_session=True)
    ckpts = tmp_path / "run" / "students" / "kd" / "checkpoints"
    deadline = time.time() + 180
    while time.time() < deadline and not (ckpts.exists() and any(p.name.startswith("step_") for p in ckpts.iterdir())):
        if proc.poll() is not None:
            pytest.fail(f"run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "run" / "students" / "kd" / "final").exists()
    res = subprocess.run([str(kdcache), "run", str(cfg)], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "train[ce]" in res.stdout and "skipped" in res.stdout  # the finished student is not retrained
    metrics = [json.loads(ln) for ln in (tmp_path / "run" / "students" / "kd" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 13))  # resumed, no step lost or repeated
    assert (tmp_path / "run" / "report" / "report.md").is_file()


def test_run_config_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("out: x\nstages: [prepare, teach]\nprepare: {train: {data: a, tokenizer: b}}\n")
    res = CliRunner().invoke(main, ["run", str(bad)])
    assert res.exit_code == 1 and "unknown stage" in res.output and "Traceback" not in res.output
    bad.write_text("out: x\nprepare: {train: {data: a, tokenizer: b, colour: red}}\nstudents: {a: {}}\n")
    res = CliRunner().invoke(main, ["run", str(bad), "--only", "prepare"])
    assert res.exit_code == 1 and "colour" in res.output


def test_student_order_puts_bases_first_and_refuses_bad_references():
    from pipeline.errors import KdError
    from pipeline.run import student_order

    students = {"a": {"init_from": "b"}, "b": {"init_from": "c"}, "c": {}, "d": None}
    order = student_order(students)
    assert order.index("c") < order.index("b") < order.index("a") and sorted(order) == ["a", "b", "c", "d"]
    with pytest.raises(KdError, match="no student named 'x'"):
        student_order({"a": {"init_from": "x"}})
    with pytest.raises(KdError, match="cycle"):
        student_order({"a": {"init_from": "b"}, "b": {"init_from": "a"}})


def test_run_says_what_it_redoes_and_why(tmp_path, data_file, heldout_file, tokenizer_dir, llama_dir, vocab_size):
    """Each stage names the keys that changed and what it redoes; the teacher cache is never replaced unasked."""
    path = write_config(tmp_path, data_file, heldout_file, tokenizer_dir, llama_dir, vocab_size)
    cfg = yaml.safe_load(path.read_text())
    cfg.update(stages=["prepare", "teacher", "train", "eval"], students={"kd": {"loss": "fkl"}},
               eval={"split": "heldout"})
    path.write_text(yaml.safe_dump(cfg))
    override = tmp_path / "override.yaml"
    override.write_text(yaml.safe_dump({"eval": {"batch_size": 4}}))  # merged over the eval section
    runner = CliRunner()

    def run(*extra, code=0):
        res = runner.invoke(main, ["run", str(path), *extra])
        assert res.exit_code == code, res.output
        assert "Traceback" not in res.output
        return res.output

    run()
    out = run("--set", "students.kd.max_steps=2")
    assert "train[kd]: config changed (max_steps 4 -> 2): retraining from scratch" in out
    assert "eval[kd]: ce" in out  # the old eval described the replaced model: redone, not skipped
    out = run("--set", "students.kd.max_steps=6", "--set", "students.kd.stop_after=3")
    assert "train[kd]: config changed (max_steps 2 -> 6): retraining from scratch" in out and "3/6 steps" in out
    assert "final is not written yet (training unfinished); skipped" in out
    six = ("--set", "students.kd.max_steps=6")
    out = run(*six)
    assert "train[kd]: continuing from checkpoint step 3 of 6; no steps redone" in out and "6/6 steps" in out
    out = run(*six, "--config", str(override))
    assert "train[kd]: " in out and "complete for this config; skipped" in out
    assert "eval[kd]: settings changed (batch_size 8 -> 4): re-evaluating" in out
    # New prepared data: redone and said so; the cache made from the old data is kept and the error says how
    # to replace it.
    longer = ("--set", "prepare.train.max_length=48", "--config", str(override))
    out = run(*six, *longer, code=1)
    assert "prepare[train]: settings changed (max_length 64 -> 48): re-preparing" in out
    errors = [ln for ln in out.splitlines() if "error:" in ln]
    assert len(errors) == 1 and "teacher[train]:" in errors[0] and "(prepared data fingerprint)" in errors[0]
    assert "--set teacher.overwrite=true" in errors[0]
    out = run(*six, *longer, "--set", "teacher.overwrite=true")
    assert "train[kd]: inputs changed (prepared data, teacher cache): retraining from scratch" in out
    assert "run: prepare, teacher, train, eval done" in out
    # A cache made with the default preset of before 2026-12-07 (K = 8, no draws: `compact` today) is kept under
    # today's default, and the error says how to go on using it.
    compact = ("--set", "teacher.preset=compact", "--set", "teacher.overwrite=true")
    run(*six, *longer, *compact, "--only", "teacher")
    out = run(*six, *longer, "--only", "teacher", code=1)
    errors = [ln for ln in out.splitlines() if "error:" in ln]
    assert len(errors) == 1 and "tail_samples 0 -> 4" in errors[0] and "--set teacher.preset=compact to use it" in errors[0]
    out = run(*six, *longer, "--only", "teacher", "--set", "teacher.preset=compact")
    assert "already complete; skipped" in out


def test_run_takes_its_config_from_config_option_too(tmp_path):
    res = CliRunner().invoke(main, ["run"])
    assert res.exit_code == 1 and "no run config given" in res.output
    cfg = tmp_path / "c.yaml"
    cfg.write_text("out: x\nstages: [prepare, teach]\nprepare: {train: {data: a, tokenizer: b}}\n")
    res = CliRunner().invoke(main, ["run", "--config", str(cfg)])
    assert res.exit_code == 1 and "unknown stage" in res.output


def test_two_teacher_slots_of_one_model_stage_times(tmp_path, data_file, heldout_file, tokenizer_dir, llama_dir,
                                                    vocab_size, torch_one_thread):
    """Two teacher slots of one model (K = 8 and K = 4): the model is evaluated once, and the report names each
    student's own slot (not the one registered last for that model) in the table, the seed table and the teacher
    row. Every stage ends with a line of its wall time."""
    import re

    path = write_config(tmp_path, data_file, heldout_file, tokenizer_dir, llama_dir, vocab_size, max_steps=2)
    cfg = yaml.safe_load(path.read_text())
    del cfg["teacher"]
    cfg.update(teachers={"k8": {"model": str(llama_dir), "top_k": 8, "shard_rows": 200},
                         "k4": {"model": str(llama_dir), "top_k": 4, "shard_rows": 200}},
               seeds=[0, 1], students={"ce": {"loss": "none"}, "kd8": {"teacher": "k8"}, "kd4": {"teacher": "k4"}},
               eval={"split": "heldout", "generate": 0})
    path.write_text(yaml.safe_dump(cfg))
    res = CliRunner().invoke(main, ["run", str(path)])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    times = [ln for ln in lines if ln.startswith("stage ")]
    assert [ln.split(":")[0] for ln in times] == [f"stage {s}" for s in ("prepare", "teacher", "train", "eval",
                                                                         "report")]
    assert all(re.fullmatch(r"stage \w+: \d+\.\d s", ln) for ln in times), times
    assert lines.index(times[2]) > max(i for i, ln in enumerate(lines) if "train[" in ln)  # after its stage
    out = tmp_path / "run"
    # the model is evaluated once, in the first slot's eval/ (k4: the config file lists its keys sorted)
    assert "eval[teacher k8]: the same model as teacher k4, evaluated once" in res.output
    assert (out / "teachers" / "k4" / "eval" / "eval.json").is_file()
    assert not (out / "teachers" / "k8" / "eval").exists()
    for seed in (0, 1):
        for name, slot in (("kd8", "k8"), ("kd4", "k4")):
            assert yaml.safe_load((out / "students" / f"{name}_s{seed}" / "config.yaml").read_text())["cache"] == \
                str(out / "caches" / slot)
            ev = yaml.safe_load((out / "students" / f"{name}_s{seed}" / "eval" / "config.yaml").read_text())
            assert ev["cache"] == str(out / "caches" / f"{slot}_heldout")  # compared with its own slot's cache
    report = (out / "report" / "report.md").read_text()
    for seed in (0, 1):
        # the default cache has tail draws, so --tail auto trains on them
        assert f"| kd8_s{seed} | KD fkl/sampled | k8 |" in report and f"| kd4_s{seed} | KD fkl/sampled | k4 |" in report
        assert f"| ce_s{seed} | CE only | — |" in report
    assert "| kd8 | KD fkl/sampled | k8 | 2 |" in report and "| kd4 | KD fkl/sampled | k4 | 2 |" in report
    assert report.count("teacher (reference)") == 1 and "| k4 = k8 | teacher (reference) |" in report


def test_online_reference_arm(tmp_path, data_file, heldout_file, tokenizer_dir, llama_dir, vocab_size,
                              torch_one_thread):
    """`online: true`: the teacher's model runs on every micro-batch (no cache); the report names the arm, gives it the
    teacher, and measures every cached method of that teacher against it, paired by seed."""
    path = write_config(tmp_path, data_file, heldout_file, tokenizer_dir, llama_dir, vocab_size, max_steps=2)
    cfg = yaml.safe_load(path.read_text())
    cfg.update(seeds=[0, 1], students={"ce": {"loss": "none"}, "kd": {}, "kd_online": {"online": True}},
               eval={"split": "heldout", "generate": 0})
    path.write_text(yaml.safe_dump(cfg))
    res = CliRunner().invoke(main, ["run", str(path)])
    assert res.exit_code == 0, res.output
    out = tmp_path / "run"
    for seed in (0, 1):
        tc = yaml.safe_load((out / "students" / f"kd_online_s{seed}" / "config.yaml").read_text())
        assert tc["online_teacher"] == str(llama_dir) and not tc["cache"]
    report = (out / "report" / "report.md").read_text()
    assert "| kd_online_s0 | KD fkl online | teacher |" in report, report
    assert "Against online KD from the same teacher (kd_online" in report


def test_a_run_at_a_url_keeps_every_output_there_then_skips_everything(tmp_path, monkeypatch, data_file,
                                                                          heldout_file, tokenizer_dir, llama_dir,
                                                                          vocab_size):
    """`out: memory://...`: prepared data, a teacher the run trains (then caches from its URL), its caches, a
    student started from another's final/ at the URL, evaluations and the report all land under the URL; only
    the corpus (none here) would be local. The same config again skips every stage's work."""
    import uuid

    from pipeline.storage import store_for

    monkeypatch.setenv("KDCACHE_LOCAL_CACHE", str(tmp_path / "copies"))
    cfg_path = write_config(tmp_path, data_file, heldout_file, tokenizer_dir, llama_dir, vocab_size)
    cfg = yaml.safe_load(cfg_path.read_text())
    url = f"memory://kdrun-{uuid.uuid4().hex[:8]}/runs/x"
    student = cfg["train_defaults"]["student_config"]
    cfg.update(out=url, teacher={"train": {"student_config": student, "max_steps": 3, "batch_size": 8},
                                 "top_k": 8, "shard_rows": 200},
               students={"ce": {"loss": "none"}, "kd": {"loss": "fkl", "init_from": "ce"}})
    cfg_path.write_text(yaml.safe_dump(cfg))
    res = CliRunner().invoke(main, ["run", str(cfg_path)])
    assert res.exit_code == 0, res.output
    assert f"report: {url}/report/report.md" in res.output
    names = set(store_for(url).sizes())
    for rel in ("prepared/train/kdcache_prepare.json", "teacher/final/_COMMIT.json", "cache/kdcache.json",
                "cache_heldout/kdcache.json", "students/ce/final/_COMMIT.json", "students/kd/final/_COMMIT.json",
                "students/kd/eval/eval.json", "teacher/eval/eval.json", "report/report.md"):
        assert rel in names, rel
    assert not list(tmp_path.glob("memory*")) and not (Path.cwd() / "memory:").exists()  # nothing local by mistake
    meta = json.loads(store_for(url).read_bytes("cache/kdcache.json"))
    assert meta["teacher"]["model"] == f"{url}/teacher/final"  # the teacher it trained, by its URL
    kd = yaml.safe_load(store_for(url).read_bytes("students/kd/config.yaml"))
    assert kd["student"] == f"{url}/students/ce/final"
    report = store_for(url).read_bytes("report/report.md").decode()
    assert "| kd |" in report or "kd" in report
    res = CliRunner().invoke(main, ["run", str(cfg_path)])
    assert res.exit_code == 0, res.output
    assert "train[ce]" in res.output and res.output.count("skipped") >= 2 + 3, res.output
