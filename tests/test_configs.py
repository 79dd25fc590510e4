"""Every shipped config loads into its typed config, so none can rot silently."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from pipeline.config import from_dict, load_yaml
from pipeline.evaluation.evaluate import EvalConfig
from pipeline.data.prepare import PrepareConfig
from pipeline.run import RunConfig, load_run_config
from pipeline.teacher.runner import TeacherConfig
from pipeline.training.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
YAMLS = sorted((ROOT / "configs").glob("*.yaml"))
CLASSES = {"prepare": PrepareConfig, "teacher": TeacherConfig, "train": TrainConfig, "eval": EvalConfig}


def test_there_are_configs():
    assert any(p.name == "demo.yaml" for p in YAMLS) and len(YAMLS) >= 3


@pytest.mark.parametrize("path", YAMLS, ids=[p.name for p in YAMLS])
def test_config_loads_and_starts_with_its_command(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith(("# kdcache ", "# torchrun ")), f"{path.name} must start with the command that runs it"
    words = shlex.split(first[2:].replace("$(which kdcache)", "kdcache"))
    command = words[words.index("kdcache") + 1]
    assert f"configs/{path.name}" in words, f"{path.name}'s command must name the config itself"
    if command == "run":
        # an override (`kdcache run BASE.yaml --config THIS.yaml`) is loaded over its base, as the run does
        override = "--config" in words and words[words.index("--config") + 1] == f"configs/{path.name}"
        base = words[words.index("run") + 1] if override else None
        cfg = load_run_config(base, override=str(path)) if override else load_run_config(str(path))
        assert isinstance(cfg, RunConfig) and cfg.students
        teachers = cfg.teachers or {"teacher": cfg.teacher}
        for section in cfg.students.values():  # every student resolves to a valid TrainConfig
            keys = {**cfg.train_defaults, **(section or {})}
            if keys.pop("init_from", None):  # the run substitutes the base student's final model
                keys.pop("student_config", None)
                keys["student"] = "base-student/final"
            named = keys.pop("teacher", None)
            assert named is None or named in teachers, f"{path.name}: no teacher {named!r}"
            if keys.pop("online", False):  # the run passes the teacher's model instead of its cache
                keys["online_teacher"] = "teacher-model"
            from_dict(TrainConfig, keys)
        for split in cfg.prepare.values():
            from_dict(PrepareConfig, {k: v.replace("{corpus}", "corpus") if isinstance(v, str) else v
                                      for k, v in split.items()})
        for section in teachers.values():
            from_dict(TeacherConfig, {k: v for k, v in section.items() if k not in ("model", "train")})
            if section.get("train"):
                assert section["train"].get("split", "train") in cfg.prepare
                from_dict(TrainConfig, {k: v for k, v in section["train"].items() if k != "split"})
        eval_keys = {k: v for k, v in cfg.eval.items() if k != "split"}
        from_dict(EvalConfig, eval_keys)
    else:
        from_dict(CLASSES[command], load_yaml(path))


@pytest.mark.parametrize("name", ["demo_teacher.json", "demo_student.json"])
def test_model_configs_build(name):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(ROOT / "configs" / "models" / name))
    assert cfg.vocab_size == json.loads((ROOT / "data" / "demo" / "teacher" / "config.json").read_text())["vocab_size"]


def test_bench_quality_models_have_the_stated_sizes():
    """configs/bench-quality.yaml says 0.62M / 2.90M / 6.84M parameters (4.7x and 11.1x): keep it true."""
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = {}
    for name in ("bq_student", "bq_teacher_small", "bq_teacher_large"):
        cfg = AutoConfig.from_pretrained(str(ROOT / "configs" / "models" / f"{name}.json"))
        assert cfg.vocab_size == 8192
        sizes[name] = sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters())
    assert round(sizes["bq_student"] / 1e6, 2) == 0.62
    assert round(sizes["bq_teacher_small"] / 1e6, 2) == 2.90 and round(sizes["bq_teacher_large"] / 1e6, 2) == 6.84
    assert sizes["bq_teacher_large"] >= 10 * sizes["bq_student"]
