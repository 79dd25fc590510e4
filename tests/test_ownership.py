"""Replacing an output deletes only what kdcache wrote: every stage refuses a directory holding a file
it did not write (one line, exit 1, the file named and kept), and a genuine re-run still replaces.

    .venv/bin/python -m pytest tests/test_ownership.py -q
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pipeline.errors import KdError
from pipeline.ownership import EVAL, EXPORT, LAYOUTS, PREPARE, REPORT, TEACHER, TRAIN, remove_owned, scan
from stages.cli import main

pytestmark = pytest.mark.usefixtures("torch_one_thread")

STUDENT = {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
           "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 128,
           "tie_word_embeddings": True}


def invoke(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def files_under(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---- the rule itself -------------------------------------------------------------------------------

def fake_run(root: Path) -> Path:
    """A directory laid out as `kdcache train` leaves it (contents are placeholders)."""
    for rel in ("kdcache_train.json", "config.yaml", "metrics.jsonl", "checkpoints/step_000002/model.safetensors",
                "checkpoints/step_000004/trainer_state.pt", "final/config.json", "tensorboard/events.out",
                "eval/eval.json", "eval/config.yaml"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(rel)
    return root


@pytest.mark.parametrize("planted, named", [
    ("notes.txt", "notes.txt"),
    ("sub/thesis.tex", "sub/thesis.tex"),  # a foreign directory is named by the file in it
    ("checkpoints/notes.txt", "checkpoints/notes.txt"),  # inside a container kdcache also writes to
    ("eval/plot.png", "eval/plot.png"),
])
def test_foreign_file_refuses_and_nothing_is_deleted(tmp_path, planted, named):
    run = fake_run(tmp_path / "run")
    (run / planted).parent.mkdir(parents=True, exist_ok=True)
    (run / planted).write_text("mine")
    before = files_under(run)
    with pytest.raises(KdError, match=f"holds {named}, which `kdcache train` did not write") as e:
        remove_owned(run, TRAIN)
    assert "\n" not in str(e.value)
    assert files_under(run) == before


def test_owned_entries_are_removed_and_empty_containers_too(tmp_path):
    run = fake_run(tmp_path / "run")
    remove_owned(run, TRAIN)
    assert run.is_dir() and list(run.iterdir()) == []


def test_symlinked_owned_entry_is_unlinked_not_followed(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious.bin").write_text("keep")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("")
    os.symlink(elsewhere, run / "final")
    remove_owned(run, TRAIN)
    assert not (run / "final").exists() and (elsewhere / "precious.bin").read_text() == "keep"


def test_a_directory_of_another_stage_is_named_as_such(tmp_path):
    run = fake_run(tmp_path / "run")
    with pytest.raises(KdError, match="is a training run directory, not an eval output directory: use --out"):
        remove_owned(run, EVAL)


# ---- every stage, through the command line ---------------------------------------------------------

@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, data_file, tokenizer_dir, llama_dir, vocab_size) -> dict[str, Path]:
    """One real output of every stage, made by the commands themselves."""
    root = tmp_path_factory.mktemp("artifacts")
    student = root / "student.json"
    student.write_text(json.dumps({**STUDENT, "vocab_size": vocab_size}))
    paths = {"prepare": root / "prepared", "teacher": root / "cache", "train": root / "run",
             "eval": root / "run" / "eval", "report": root / "report", "export": root / "export"}
    for args in (["prepare", "--data", data_file, "--tokenizer", tokenizer_dir, "--out", paths["prepare"],
                  "--max-length", 64],
                 ["teacher", "--data", paths["prepare"], "--model", llama_dir, "--out", paths["teacher"],
                  "--top-k", 8, "--shard-rows", 200, "--device", "cpu"],
                 ["train", "--cache", paths["teacher"], "--student-config", student, "--out", paths["train"],
                  "--max-steps", 2, "--batch-size", 8, "--device", "cpu"],
                 ["eval", "--model", paths["train"], "--cache", paths["teacher"], "--out", paths["eval"],
                  "--device", "cpu"],
                 ["report", paths["train"], "--out", paths["report"]],
                 ["export", paths["teacher"], "--format", "axolotl", "--out", paths["export"]]):
        res = invoke(*args)
        assert res.exit_code == 0, res.output
    return {**paths, "student": student, "tokenizer": tokenizer_dir, "data": data_file, "llama": llama_dir}


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: lay.stage)
def test_every_file_a_stage_writes_is_owned(artifacts, layout):
    """The ownership lists cannot fall behind the stages: real outputs hold nothing they call foreign."""
    owned, foreign = scan(artifacts[layout.stage], layout)
    assert owned and foreign == []


def rerun_args(a: dict[str, Path], stage: str, out: Path) -> list:
    """A genuine re-run into `out` that must replace the stage's earlier output."""
    return {
        "prepare": ["prepare", "--data", a["data"], "--tokenizer", a["tokenizer"], "--out", out, "--max-length", 48,
                    "--overwrite"],
        "teacher": ["teacher", "--data", a["prepare"], "--model", a["llama"], "--out", out, "--top-k", 4,
                    "--shard-rows", 200, "--device", "cpu", "--overwrite"],
        "train": ["train", "--cache", a["teacher"], "--student-config", a["student"], "--out", out, "--max-steps", 3,
                  "--batch-size", 8, "--device", "cpu", "--overwrite"],
        "eval": ["eval", "--model", a["train"], "--data", a["prepare"], "--out", out, "--batch-size", 4,
                 "--device", "cpu"],
        "report": ["report", a["train"], "--out", out, "--bins", 10],
        "export": ["export", a["teacher"], "--format", "distillkit", "--out", out, "--overwrite"],
    }[stage]


@pytest.mark.parametrize("stage", ["prepare", "teacher", "train", "eval", "report", "export"])
@pytest.mark.parametrize("planted", ["notes.txt", "sub/thesis.tex"])
def test_stage_keeps_foreign_files_then_replaces_its_own(tmp_path, artifacts, stage, planted):
    out = tmp_path / stage
    shutil.copytree(artifacts[stage], out, symlinks=True)
    (out / planted).parent.mkdir(parents=True, exist_ok=True)
    (out / planted).write_text("mine, not kdcache's")
    before = files_under(out)
    res = invoke(*rerun_args(artifacts, stage, out))
    assert res.exit_code == 1, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"kdcache {stage}: error: "), res.output
    assert planted in lines[0] and "Traceback" not in res.output
    assert files_under(out) == before  # refused before anything was touched

    # Once the user moves their file away, the same command replaces the stage's own output.
    shutil.rmtree(out / "sub") if planted.startswith("sub/") else (out / planted).unlink()
    res = invoke(*rerun_args(artifacts, stage, out))
    assert res.exit_code == 0, res.output
    if stage == "prepare":
        assert json.loads((out / "kdcache_prepare.json").read_text())["max_length"] == 48
    elif stage == "teacher":
        assert json.loads((out / "kdcache.json").read_text())["codec"]["top_k"] == 4
    elif stage == "train":
        rows = (out / "metrics.jsonl").read_text().splitlines()
        assert len(rows) == 3 and (out / "final" / "config.json").is_file()
        assert not (out / "eval").exists()  # it described the replaced model
        assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_000003"]
    elif stage == "eval":
        assert yaml.safe_load((out / "config.yaml").read_text())["batch_size"] == 4
    elif stage == "export":
        assert json.loads((out / "kdcache_export.json").read_text())["format"] == "distillkit"
    else:
        assert yaml.safe_load((out / "config.yaml").read_text())["bins"] == 10


def test_train_into_a_directory_of_someone_elses_files_is_refused(tmp_path, artifacts):
    """Without --overwrite too: a fresh run never starts inside a directory that holds other files."""
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    res = invoke("train", "--cache", artifacts["teacher"], "--student-config", artifacts["student"], "--out", out,
                 "--max-steps", 1, "--device", "cpu")
    assert res.exit_code == 1 and "is not a training run directory (it holds thesis.tex" in res.output
    assert [p.name for p in out.iterdir()] == ["thesis.tex"]


def test_layouts_do_not_claim_each_others_markers():
    """Each stage is recognised by a marker no other stage owns, so messages name the right kind."""
    for lay in LAYOUTS:
        for other in LAYOUTS:
            if other is not lay:
                assert not any(other.owns(m) for m in lay.markers), (lay.stage, other.stage)
    assert PREPARE.owns("data-00000-of-00001.arrow") and TEACHER.owns("shards/shard_00003")
    assert EXPORT.owns("data-00000-of-00001.arrow") and not EXPORT.owns("kdcache_prepare.json")
    assert not REPORT.owns("diagram.png")


def test_report_rerun_drops_its_own_stale_plots_only(tmp_path, artifacts):
    out = tmp_path / "report"
    shutil.copytree(artifacts["report"], out)
    assert (out / "cache_entropy.png").is_file()
    res = invoke("report", artifacts["train"], "--out", out, "--cache", tmp_path / "no-cache")
    assert res.exit_code == 0, res.output
    assert not (out / "cache_entropy.png").exists() and (out / "losses.png").is_file()
    assert "no cache histograms" in (out / "report.md").read_text()
