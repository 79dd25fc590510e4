"""The distillation-quality benchmark (configs/bench-quality.yaml) end to end through `kdcache run`, reduced to
tiny models, a few steps and one seed: the same config file, its corpus built from this Python's standard
library, two teachers trained and cached by the run, every student and the report.

    .venv/bin/python -m pytest tests/evaluation/test_bench_quality.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from conftest import one_line_error

from stages.cli import main

ROOT = Path(__file__).resolve().parents[2]


def tiny(path: Path, hidden: int, layers: int) -> str:
    path.write_text(json.dumps({"model_type": "llama", "vocab_size": 8192, "hidden_size": hidden,
                                "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
                                "num_attention_heads": 2, "num_key_value_heads": 1,
                                "max_position_embeddings": 128, "tie_word_embeddings": True}))
    return str(path)


@pytest.mark.slow  # --runslow (38 s): configs/bench-quality.yaml end to end, and a train slot's cache kept
def test_bench_quality_reduced_runs_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    over = {
        "out": str(tmp_path / "bq"),
        "seeds": [0],
        "prepare": {"text": {"max_examples": 300, "max_length": 96}, "train": {"max_examples": 120, "max_length": 96},
                    "heldout": {"max_examples": 24, "max_length": 96}},
        "teachers": {"large": {"train": {"student_config": tiny(tmp_path / "tl.json", 24, 2), "max_steps": 3}},
                     "small": {"train": {"student_config": tiny(tmp_path / "ts.json", 16, 1), "max_steps": 3}}},
        "train_defaults": {"student_config": tiny(tmp_path / "s.json", 8, 1), "max_steps": 2, "batch_tokens": 1024},
        "students": {"warm_start": {"max_steps": 2}},
        "eval": {"generate": 3, "batch_size": 8},
    }
    override = tmp_path / "tiny.yaml"
    override.write_text(yaml.safe_dump(over))
    config = ROOT / "configs" / "bench-quality.yaml"
    res = CliRunner().invoke(main, ["run", str(config), "--config", str(override)])
    assert res.exit_code == 0, res.output[-3000:]
    out = tmp_path / "bq"
    manifest = json.loads((out / "corpus" / "manifest.json").read_text())
    assert manifest["settings"]["vocab_size"] == 8192 and manifest["counts"]["files_heldout"] > 0
    assert "PSF" in manifest["licence"]
    names = yaml.safe_load(config.read_text())["students"]
    for name in names:
        run = out / "students" / f"{name}_s0"
        ev = json.loads((run / "eval" / "eval.json").read_text())
        assert {"ce", "teacher_top1_agreement", "rouge_l", "exact_match"} <= ev.keys(), name
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        assert cfg["seed"] == 0
        if name != "warm_start":
            assert cfg["student"] == str(out / "students" / "warm_start_s0" / "final")
        want = "small" if name.endswith("_small") else "large"
        assert (cfg["cache"] == str(out / "caches" / want)) == (cfg["loss"] != "none"), name
    for t in ("large", "small"):
        assert (out / "caches" / t / "kdcache.json").is_file() and (out / "caches" / f"{t}_heldout" / "kdcache.json").is_file()
        assert json.loads((out / "teachers" / t / "eval" / "eval.json").read_text())["ce"] > 0
    report = (out / "report" / "report.md").read_text()
    assert all(f"| {n}_s0 |" in report for n in names) and "| large | teacher (reference) |" in report
    # A second run finds everything done: nothing is rebuilt.
    res = CliRunner().invoke(main, ["run", str(config), "--config", str(override)])
    assert res.exit_code == 0, res.output[-3000:]
    assert "up to date, skipped" in res.output and "cached" not in res.output and "steps in" not in res.output
    # A teacher the run trains is the run's own: when its training changes, its caches are made again from
    # the new weights instead of being refused (a cache of a teacher given as a model is never replaced unasked).
    before = json.loads((out / "caches" / "small" / "kdcache.json").read_text())["teacher"]
    res = CliRunner().invoke(main, ["run", str(config), "--config", str(override), "--only", "teacher",
                                    "--set", "teachers.small.train.max_steps=4"])
    assert res.exit_code == 0, res.output[-3000:]
    assert "retraining from scratch" in res.output and "so its cache is made again" in res.output
    after = json.loads((out / "caches" / "small" / "kdcache.json").read_text())["teacher"]
    assert after != before and "large[train]: cache" in res.output  # the large teacher's caches are kept
    # Other cache settings for the same weights (an edited config, or a kdcache upgrade's new default preset):
    # refused in one line, the cache kept, even for a teacher the run trains.
    meta = (out / "caches" / "small" / "kdcache.json").read_bytes()
    res = CliRunner().invoke(main, ["run", str(config), "--config", str(override), "--only", "teacher",
                                    "--set", "teachers.small.top_k=4", "--set", "teachers.small.train.max_steps=4"])
    assert one_line_error(res, "top_k", "it is kept", "overwrite=true")
    assert (out / "caches" / "small" / "kdcache.json").read_bytes() == meta
