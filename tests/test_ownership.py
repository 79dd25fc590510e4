"""Replacing an output deletes only what kdcache wrote: every stage refuses a directory holding a file
it did not write (one line, exit 1, the file named and kept), and a genuine re-run still replaces.

    .venv/bin/python -m pytest tests/test_ownership.py -q
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pipeline.errors import KdError
from pipeline.ownership import (EVAL, EXPORT, LAYOUTS, PREPARE, REPORT, TEACHER, TRAIN, Manifest, claim, remove_owned,
                                scan)
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
    """A directory as `kdcache train` (and `kdcache eval` in its eval/) leaves it, recorded in their manifests
    (contents are placeholders: ownership is by record, not by name or content)."""
    files = ("kdcache_train.json", "config.yaml", "metrics.jsonl", "checkpoints/step_000002/model.safetensors",
             "checkpoints/step_000004/trainer_state.pt", "final/config.json", "tensorboard/events.out")
    with claim(root, TRAIN) as own:
        own.writing("kdcache_train.json", "config.yaml", "metrics.jsonl", "checkpoints", "final", "tensorboard")
        for rel in files:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text(rel)
    with claim(root / "eval", EVAL) as own:
        own.writing("eval.json", "config.yaml")
        for rel in ("eval.json", "config.yaml"):
            (root / "eval" / rel).write_text(rel)
    return root


def user_files(root: Path) -> dict[str, bytes]:
    """Every file but kdcache's own records (.kdcache/)."""
    return {k: v for k, v in files_under(root).items() if ".kdcache" not in Path(k).parts}


@pytest.mark.parametrize("planted, named", [
    ("notes.txt", "notes.txt"),
    ("sub/thesis.tex", "sub/thesis.tex"),  # a foreign directory is named by the file in it
    ("checkpoints/notes.txt", "checkpoints/notes.txt"),  # inside a directory kdcache also writes to
    ("eval/plot.png", "eval/plot.png"),  # inside the nested eval output
    ("config.yaml.orig", "config.yaml.orig"),
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


@pytest.mark.parametrize("edited", ["config.yaml", "final/config.json", "eval/eval.json"])
def test_a_recorded_file_changed_since_is_foreign(tmp_path, edited):
    run = fake_run(tmp_path / "run")
    (run / edited).write_text("edited by hand")
    before = files_under(run)
    with pytest.raises(KdError, match=f"holds {edited}, which `kdcache train` wrote but which was changed since"):
        remove_owned(run, TRAIN)
    assert files_under(run) == before


def test_a_recorded_file_touched_but_unchanged_is_still_owned(tmp_path):
    """mtime differs (a copy, a touch): the sha256 decides."""
    run = fake_run(tmp_path / "run")
    os.utime(run / "config.yaml", (1, 1))
    assert scan(run, TRAIN)[1] == []


def test_owned_entries_are_removed_and_empty_containers_too(tmp_path):
    run = fake_run(tmp_path / "run")
    remove_owned(run, TRAIN)
    assert [p.name for p in run.iterdir()] == [".kdcache"]
    assert json.loads((run / ".kdcache" / "manifest.json").read_text())["files"] == {}


def test_symlinked_owned_entry_is_unlinked_not_followed(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious.bin").write_text("keep")
    run = tmp_path / "run"
    run.mkdir()
    Manifest(run, "train", writing=["final"]).save()  # a run killed while writing final/
    os.symlink(elsewhere, run / "final")
    remove_owned(run, TRAIN)
    assert not (run / "final").exists() and (elsewhere / "precious.bin").read_text() == "keep"


def test_a_symlink_is_never_recorded_so_it_is_foreign(tmp_path):
    run = fake_run(tmp_path / "run")
    os.symlink(tmp_path, run / "link")
    assert scan(run, TRAIN)[1] == ["link"]


def test_a_directory_of_another_stage_is_named_as_such(tmp_path):
    run = fake_run(tmp_path / "run")
    with pytest.raises(KdError, match="is a training run directory, not an eval output directory: use --out"):
        remove_owned(run, EVAL)


def test_a_damaged_manifest_is_one_line_naming_it(tmp_path):
    run = fake_run(tmp_path / "run")
    (run / ".kdcache" / "manifest.json").write_text("{trunc")
    with pytest.raises(KdError, match="manifest.json is damaged") as e:
        remove_owned(run, TRAIN)
    assert "\n" not in str(e.value)


# ---- outputs written before manifests ---------------------------------------------------------------

def legacy_run(root: Path) -> Path:
    """A run as kdcache wrote it before manifests: real markers, no .kdcache/."""
    for rel, text in (("kdcache_train.json", json.dumps({"kind": "kdcache-train-run"})),
                      ("config.yaml", f"out: {root}\nmax_steps: 2\n"), ("metrics.jsonl", '{"step": 1}\n'),
                      ("checkpoints/step_000002/model.safetensors", "w"), ("final/config.json", "{}"),
                      ("eval/eval.json", json.dumps({"ce": 1.0})), ("eval/config.yaml", f"out: {root}/eval\n")):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_an_older_output_is_adopted_by_its_old_names_when_its_marker_and_contents_check_out(tmp_path):
    run = legacy_run(tmp_path / "run")
    assert scan(run, TRAIN)[1] == []
    with claim(run, TRAIN):  # the first stage to hold it writes its manifest: from then on, by record
        pass
    recorded = json.loads((run / ".kdcache" / "manifest.json").read_text())["files"]
    assert {"config.yaml", "metrics.jsonl", "checkpoints/step_000002/model.safetensors"} <= set(recorded)
    remove_owned(run, TRAIN)
    assert [p.name for p in run.iterdir()] == [".kdcache"]


@pytest.mark.parametrize("change", ["user config", "no marker", "foreign name"])
def test_an_older_output_adopts_nothing_it_cannot_verify(tmp_path, change):
    run = legacy_run(tmp_path / "run")
    if change == "user config":  # a config.yaml kdcache never wrote (no `out`), under kdcache's name
        (run / "config.yaml").write_text("lr: 0.1\n")
        named = "config.yaml"
    elif change == "no marker":  # not a kdcache run at all: nothing is adopted
        (run / "kdcache_train.json").write_text("my notes")
        (run / "metrics.jsonl").write_text("my notes")
        named = "checkpoints/step_000002/model.safetensors"
    else:
        (run / "notes.txt").write_text("mine")
        named = "notes.txt"
    before = files_under(run)
    with pytest.raises(KdError, match=re.escape(named)):
        remove_owned(run, TRAIN)
    assert files_under(run) == before


# ---- one writer per output ---------------------------------------------------------------------------

def plant_lock(out: Path, pid: int, host: str | None = None, name: str = "lock.json", **extra) -> Path:
    import socket

    (out / ".kdcache").mkdir(parents=True, exist_ok=True)
    p = out / ".kdcache" / name
    p.write_text(json.dumps({"run_id": "x" * 32, "stage": "train", "host": host or socket.gethostname(), "pid": pid,
                             "command": "kdcache train --out elsewhere", "started": "2026-01-01 00:00:00", **extra}))
    return p


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_live_lock_refuses_a_second_writer(tmp_path):
    out = tmp_path / "run"
    lock = plant_lock(out, os.getpid())
    with pytest.raises(KdError, match=f"is being written by `kdcache train --out elsewhere` \\(pid {os.getpid()} on this host") as e:
        with claim(out, TRAIN):
            pass
    assert "\n" not in str(e.value) and str(lock) in str(e.value)
    assert lock.is_file()  # not ours to remove


def test_a_lock_from_another_host_is_never_taken_over(tmp_path):
    out = tmp_path / "run"
    lock = plant_lock(out, 1, host="gpu-node-7")
    with pytest.raises(KdError, match=f"locked by .*on host gpu-node-7.*if that run is gone, delete {re.escape(str(lock))}"):
        with claim(out, TRAIN):
            pass


def test_a_stale_lock_is_taken_over_with_a_message(tmp_path, caplog):
    out = tmp_path / "run"
    lock = plant_lock(out, dead_pid())
    with caplog.at_level("WARNING", logger="pipeline.ownership"):
        with claim(out, TRAIN) as own:
            assert json.loads(lock.read_text())["pid"] == os.getpid()
            assert own.lock.held
    assert "taking over the lock" in caplog.text and "no longer running" in caplog.text
    assert not lock.exists()  # released at the end


def test_a_torn_lock_file_is_taken_over(tmp_path):
    out = tmp_path / "run"
    (out / ".kdcache").mkdir(parents=True)
    (out / ".kdcache" / "lock.json").write_text("{")
    with claim(out, TRAIN):
        pass
    assert not (out / ".kdcache" / "lock.json").exists()


def test_the_lock_is_released_on_errors_and_interrupts(tmp_path):
    out = tmp_path / "run"
    for exc in (KdError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with claim(out, TRAIN):
                raise exc
        assert not (out / ".kdcache" / "lock.json").exists()
    assert not out.exists()  # made only to hold the lock, and left empty


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


# ---- by record, every stage, through the command line ------------------------------------------------

def fresh_args(a: dict[str, Path], stage: str, out: Path) -> list:
    """A first run of `stage` into `out` (rerun_args without --overwrite)."""
    return [x for x in rerun_args(a, stage, out) if x != "--overwrite"]


HAS_OVERWRITE = ("prepare", "teacher", "train", "export")


def one_error_line(res, stage: str) -> str:
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"kdcache {stage}: error: "), res.output
    return lines[0]


@pytest.mark.parametrize("stage, planted", [
    ("prepare", "config.yaml"), ("prepare", "data-00000-of-00001.arrow"), ("prepare", "kdcache_prepare.json"),
    ("teacher", "config.yaml"), ("teacher", "index.parquet"),
    ("train", "config.yaml"), ("train", "metrics.jsonl"), ("train", "final/config.json"),
    ("eval", "eval.json"), ("eval", "config.yaml"),
    ("report", "report.md"), ("report", "config.yaml"),
    ("export", "config.yaml"), ("export", "dataset_info.json"),
])
def test_a_users_file_under_a_name_the_stage_writes_is_refused(tmp_path, artifacts, stage, planted):
    """`mkdir d; echo 'lr: 0.1' > d/config.yaml; kdcache teacher ... --out d` must not replace it: refused before
    anything is written, with and without --overwrite, the file byte-identical."""
    out = tmp_path / "d"
    (out / planted).parent.mkdir(parents=True)
    (out / planted).write_text("lr: 0.1\n")
    before = files_under(out)
    for extra in (["--overwrite"] if stage in HAS_OVERWRITE else []) + [None]:
        res = invoke(*fresh_args(artifacts, stage, out), *([extra] if extra else []))
        line = one_error_line(res, stage)
        assert planted in line and f"which `kdcache {stage}` did not write" in line, line
        assert files_under(out) == before  # nothing written, nothing deleted (not even a lock left behind)


@pytest.mark.parametrize("stage", ["prepare", "teacher", "train", "eval", "report", "export"])
def test_a_stages_own_file_changed_since_is_refused(tmp_path, artifacts, stage):
    out = tmp_path / stage
    shutil.copytree(artifacts[stage], out, symlinks=True)
    with open(out / "config.yaml", "a") as f:
        f.write("# my note\n")
    before = files_under(out)
    res = invoke(*rerun_args(artifacts, stage, out))
    line = one_error_line(res, stage)
    assert "config.yaml" in line and "changed since" in line, line
    assert files_under(out) == before


@pytest.mark.parametrize("stage", ["prepare", "teacher", "train", "eval", "report", "export"])
def test_a_second_writer_is_refused_with_one_line(tmp_path, artifacts, stage):
    """A lock held by a live process (this test's own: the one process certain to be alive)."""
    out = tmp_path / stage
    shutil.copytree(artifacts[stage], out, symlinks=True)
    lock = plant_lock(out, os.getpid())
    before = files_under(out)
    line = one_error_line(invoke(*rerun_args(artifacts, stage, out)), stage)
    assert f"is being written by `kdcache train --out elsewhere` (pid {os.getpid()} on this host" in line, line
    assert str(lock) in line
    assert files_under(out) == before


def test_two_trainings_at_once_the_second_is_refused(tmp_path, artifacts):
    """The first `kdcache train` (another process) holds the lock while it runs; the second is refused."""
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pipeline.ownership import TRAIN, claim\n"
         "with claim(sys.argv[1], TRAIN):\n    print('held', flush=True); time.sleep(120)\n", str(out)],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    try:
        assert holder.stdout.readline().strip() == "held"
        line = one_error_line(invoke(*fresh_args(artifacts, "train", out)), "train")
        assert "is being written by" in line and f"pid {holder.pid} on this host" in line, line
        assert not (out / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    # The holder was killed (-9): its lock is stale, taken over by the next run, which trains.
    res = invoke(*fresh_args(artifacts, "train", out))
    assert res.exit_code == 0, res.output
    assert not (out / ".kdcache" / "lock.json").exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path, artifacts):
    out = tmp_path / "prepared"
    plant_lock(out, dead_pid())
    res = invoke(*fresh_args(artifacts, "prepare", out))
    assert res.exit_code == 0, res.output
    assert (out / "kdcache_prepare.json").is_file() and not (out / ".kdcache" / "lock.json").exists()


KILLED_PREPARE = """
import os, signal, sys
from pipeline import ownership
from pipeline.data import prepare as prep

point = sys.argv.pop(1)
if point == "tokenizing":
    real = prep.tokenize_records
    def tokenize_records(*a, **k):
        for i, rec in enumerate(real(*a, **k)):
            if i == 5:
                os.kill(os.getpid(), signal.SIGKILL)
            yield rec
    prep.tokenize_records = tokenize_records
else:  # while its files are renamed into place: one moved, the rest still staged
    def move_in(self, staged, last=()):
        names = sorted(p.name for p in staged.iterdir())
        self.writing(*names)
        os.replace(staged / names[0], self.root / names[0])
        os.kill(os.getpid(), signal.SIGKILL)
    ownership.Output.move_in = move_in
from stages.cli import main
main(["prepare", *sys.argv[1:]])
"""


@pytest.mark.parametrize("point", ["tokenizing", "moving"])
def test_kill_9_then_rerun_gives_identical_output(tmp_path, artifacts, point):
    import datasets

    args = [str(x) for x in fresh_args(artifacts, "prepare", tmp_path / "killed")[1:]]
    proc = subprocess.run([sys.executable, "-c", KILLED_PREPARE, point, *args], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -9, proc.stderr[-2000:]
    killed = tmp_path / "killed"
    assert (killed / ".kdcache" / "lock.json").is_file()  # left behind by the kill
    res = invoke(*fresh_args(artifacts, "prepare", killed))  # the same command: no --overwrite needed
    assert res.exit_code == 0, res.output
    clean = tmp_path / "clean"
    assert invoke(*fresh_args(artifacts, "prepare", clean)).exit_code == 0
    a, b = user_files(killed), user_files(clean)
    assert sorted(a) == sorted(b)
    assert a["kdcache_prepare.json"] == b["kdcache_prepare.json"]
    da, db = datasets.load_from_disk(str(killed)), datasets.load_from_disk(str(clean))
    assert da["input_ids"] == db["input_ids"] and da["loss_mask"] == db["loss_mask"]
    assert scan(killed, PREPARE)[1] == [] and not list((killed / ".kdcache").glob("staging-*"))


def test_teacher_replicas_each_hold_their_own_lock(tmp_path, artifacts):
    """Independent launches --replica r --replicas R split one cache: r = 0 holding its lock does not stop
    r = 1, but a second launch of r = 0, a plain launch or one with another replica count is refused."""
    out = tmp_path / "cache"
    base = fresh_args(artifacts, "teacher", out)
    plant_lock(out, os.getpid(), name="lock.replica-0.json", replica=0, replicas=2)
    for extra in (["--replica", 0, "--replicas", 2], [], ["--replica", 1, "--replicas", 3]):
        line = one_error_line(invoke(*base, *extra), "teacher")
        assert f"pid {os.getpid()}" in line and "lock.replica-0.json" in line, line
    res = invoke(*base, "--replica", 1, "--replicas", 2)
    assert res.exit_code == 0, res.output
    assert (out / "shards" / "shard_00001").is_dir() and not (out / "shards" / "shard_00000").exists()
    assert (out / ".kdcache" / "lock.replica-0.json").is_file()  # the other replica's, untouched


def strip_records(out: Path) -> None:
    """The output as a kdcache from before manifests left it."""
    for d in sorted(out.rglob(".kdcache"), reverse=True):
        shutil.rmtree(d)


@pytest.mark.parametrize("stage", ["prepare", "teacher", "train", "eval", "report", "export"])
def test_an_output_made_before_manifests_is_adopted_then_replaced(tmp_path, artifacts, stage):
    layout = {lay.stage: lay for lay in LAYOUTS}[stage]
    out = tmp_path / stage
    shutil.copytree(artifacts[stage], out, symlinks=True)
    strip_records(out)
    assert scan(out, layout)[1] == []
    res = invoke(*rerun_args(artifacts, stage, out))
    assert res.exit_code == 0, res.output
    assert (out / ".kdcache" / "manifest.json").is_file() and scan(out, layout)[1] == []


@pytest.mark.parametrize("stage", ["prepare", "teacher", "train", "eval", "report", "export"])
def test_an_older_output_with_a_users_config_yaml_is_refused(tmp_path, artifacts, stage):
    out = tmp_path / stage
    shutil.copytree(artifacts[stage], out, symlinks=True)
    strip_records(out)
    (out / "config.yaml").write_text("lr: 0.1\n")  # not a kdcache config: it has no `out`
    before = files_under(out)
    line = one_error_line(invoke(*rerun_args(artifacts, stage, out)), stage)
    assert "config.yaml" in line, line
    assert files_under(out) == before
