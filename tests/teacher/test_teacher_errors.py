"""Bad input to `kdcache teacher`: one clear line, a non-zero exit, no traceback, nothing half-committed.

    .venv/bin/python -m pytest tests/teacher/test_teacher_errors.py -q
"""

from __future__ import annotations

import errno
import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.cache import layout as fmt
from pipeline.cache import open_cache
from pipeline.data.prepare import META_FILENAME, load_prepared, write_prepared
from stages.cli import main

from conftest import one_line_error, save_tiny_model

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def teacher(*args):
    return CliRunner().invoke(main, ["teacher", "--device", "cpu", *[str(a) for a in args]])


def assert_nothing_half_committed(cache) -> None:
    """Every shard directory is committed and verifies; tmp/ holds nothing."""
    tmp = cache / fmt.TMP_DIR
    assert not tmp.exists() or not list(tmp.iterdir()), list(tmp.iterdir())
    if (cache / fmt.META_FILENAME).exists():
        c = open_cache(cache)
        for d in (cache / fmt.SHARDS_DIR).glob("shard_*"):
            assert (d / fmt.COMMIT_FILENAME).is_file(), d
        bad = [p for p in c.verify() if "not committed" not in p]
        assert not bad, bad


def prepared_like(src, dst, ids, masks):
    """A prepared directory with the given rows and `src`'s tokenizer record."""
    meta = json.loads((src / META_FILENAME).read_text())
    meta.update(examples=len(ids), fingerprint=f"test-{len(ids)}-{sum(map(len, ids))}")
    write_prepared(dst, ids, masks, meta)
    return dst


# ---- inputs ---------------------------------------------------------------------------------------

def test_missing_prepared_data(tmp_path, llama_dir):
    one_line_error(teacher("--data", tmp_path / "nope", "--model", llama_dir, "--out", tmp_path / "c"),
                   "prepared data not found")
    (tmp_path / "notprep").mkdir()
    one_line_error(teacher("--data", tmp_path / "notprep", "--model", llama_dir, "--out", tmp_path / "c"),
                   "kdcache_prepare.json")
    assert not (tmp_path / "c").exists()


def test_unreadable_prepared_record(tmp_path, prepared_dir, llama_dir):
    bad = tmp_path / "prep"
    shutil.copytree(prepared_dir, bad)
    (bad / META_FILENAME).write_text("{not json")
    one_line_error(teacher("--data", bad, "--model", llama_dir, "--out", tmp_path / "c"), "not valid JSON")


def test_missing_model(tmp_path, prepared_dir):
    one_line_error(teacher("--data", prepared_dir, "--model", tmp_path / "nomodel", "--out", tmp_path / "c"),
                   "nomodel")
    assert not (tmp_path / "c").exists()


def test_a_training_run_directory_is_its_final_model(tmp_path, prepared_dir, llama_dir, llama_cache):
    """`teacher --model RUN_DIR` takes RUN_DIR/final, as `eval` does (it failed: no config.json in RUN_DIR)."""
    run = tmp_path / "run"
    shutil.copytree(llama_dir, run / "final")
    (run / "metrics.jsonl").write_text("")
    res = teacher("--data", prepared_dir, "--model", run, "--out", tmp_path / "c")
    assert res.exit_code == 0, res.output
    got, want = open_cache(tmp_path / "c"), open_cache(llama_cache)
    assert got.meta["teacher"]["model"] == str(run / "final")
    assert got.meta["teacher"]["weights_sha256"] == want.meta["teacher"]["weights_sha256"]
    n = want.meta["num_rows"]
    assert np.array_equal(got.read(0, n)["topk_ids"], want.read(0, n)["topk_ids"])


@pytest.mark.parametrize("case", ["empty", "no-targets"])
def test_nothing_to_cache(tmp_path, prepared_dir, llama_dir, case):
    if case == "empty":  # `prepare` refuses to write one; made by hand as another tool might
        import datasets

        data = tmp_path / "prep"
        datasets.Dataset.from_dict({"input_ids": [], "loss_mask": []}).save_to_disk(str(data))
        meta = json.loads((prepared_dir / META_FILENAME).read_text())
        (data / META_FILENAME).write_text(json.dumps({**meta, "examples": 0}))
        needle = "empty"
    else:  # position 0 is never a target, whatever its mask says
        data = prepared_like(prepared_dir, tmp_path / "prep", [[0, 5, 6], [0, 7]], [[0, 0, 0], [1, 0]])
        needle = "no target positions"
    one_line_error(teacher("--data", data, "--model", llama_dir, "--out", tmp_path / "c"), needle)
    assert not (tmp_path / "c").exists()


def test_sequence_longer_than_context(tmp_path, prepared_dir, vocab_size):
    model = save_tiny_model("llama", vocab_size, tmp_path / "short")
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 16}))
    lengths = [len(x) for x in load_prepared(prepared_dir)["input_ids"]]
    first_long = next(i for i, n in enumerate(lengths) if n > 16)
    err = one_line_error(teacher("--data", prepared_dir, "--model", model, "--out", tmp_path / "c"),
                         f"example {first_long} has {lengths[first_long]} tokens", "context of 16", "--max-length 16")
    assert err
    assert not (tmp_path / "c").exists()


def test_existing_directory_that_is_not_a_cache(tmp_path, prepared_dir, llama_dir):
    out = tmp_path / "c"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    one_line_error(teacher("--data", prepared_dir, "--model", llama_dir, "--out", out), "is not a teacher cache",
                   "notes.txt")
    assert (out / "notes.txt").read_text() == "mine"


# ---- the teacher itself ---------------------------------------------------------------------------

def test_non_finite_logits_name_the_example(tmp_path, prepared_dir, vocab_size):
    """A NaN in the embedding row of a token that occurs in one example only poisons that example
    from its first occurrence on: the error names that example and the first target after it."""
    ds = load_prepared(prepared_dir)
    rows = [np.asarray(x) for x in ds["input_ids"]]
    masks = [np.asarray(m) for m in ds["loss_mask"]]
    tok = min(set(range(vocab_size)) - set(np.concatenate(rows).tolist()))  # an id no example uses
    e = 37
    first = int(np.argmax(masks[e])) - 1  # the last prompt token: the next position is a target
    rows[e][first] = tok
    pos = first + 1
    data = prepared_like(prepared_dir, tmp_path / "prep", [r.tolist() for r in rows], [m.tolist() for m in masks])
    model = save_tiny_model("llama", vocab_size, tmp_path / "nan")
    from safetensors.torch import load_file, save_file

    weights = load_file(model / "model.safetensors")
    weights["model.embed_tokens.weight"][tok] = float("nan")
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "c"
    args = ("--data", data, "--model", model, "--out", out, "--shard-rows", 60)
    one_line_error(teacher(*args), f"example {e} at position {pos}", "not finite")
    # shards before the bad example are committed and sound; the bad one is not there at all
    c = open_cache(out)
    bad_shard = next(s["index"] for s in c.shards if s["example_start"] <= e < s["example_stop"])
    assert not c.committed()[bad_shard]
    assert_nothing_half_committed(out)
    one_line_error(teacher(*args), f"example {e} at position {pos}")  # deterministic on a re-run


# ---- the disk ---------------------------------------------------------------------------------------

def enospc(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device", "cache")


def test_disk_full_mid_run_then_rerun(tmp_path, teacher_args, llama_cache, monkeypatch):
    import pipeline.cache.writer as writer

    real = writer._fsync_tree
    calls = {"n": 0}

    def flaky(root):  # the third shard's flush hits a full disk
        calls["n"] += 1
        if calls["n"] == 3:
            enospc()
        return real(root)

    monkeypatch.setattr(writer, "_fsync_tree", flaky)
    out = tmp_path / "c"
    res = CliRunner().invoke(main, ["teacher", *teacher_args, "--out", str(out)])
    one_line_error(res, "no space left on device", "re-run")
    assert sum(open_cache(out).committed()) == 2
    assert_nothing_half_committed(out)
    monkeypatch.setattr(writer, "_fsync_tree", real)
    res = CliRunner().invoke(main, ["teacher", *teacher_args, "--out", str(out)])
    assert res.exit_code == 0 and "2 already committed" in res.output, res.output
    a, b = open_cache(out), open_cache(llama_cache)
    ra, rb = a.read_raw(0, a.num_rows), b.read_raw(0, b.num_rows)
    assert all(np.array_equal(ra[n], rb[n]) for n in ra)


def test_disk_full_while_planning_then_rerun(tmp_path, teacher_args, monkeypatch):
    import pipeline.cache.writer as writer

    monkeypatch.setattr(writer, "write_json", enospc)  # kdcache.json is the last file of the plan
    out = tmp_path / "c"
    one_line_error(CliRunner().invoke(main, ["teacher", *teacher_args, "--out", str(out)]), "no space left")
    assert not (out / fmt.META_FILENAME).exists()
    monkeypatch.undo()
    res = CliRunner().invoke(main, ["teacher", *teacher_args, "--out", str(out)])  # no --overwrite needed
    assert res.exit_code == 0, res.output
    assert open_cache(out).complete


def test_interrupt_leaves_no_partial_shard(tmp_path, teacher_args, monkeypatch):
    import pipeline.cache.writer as writer

    def interrupted(root):
        raise KeyboardInterrupt

    monkeypatch.setattr(writer, "_fsync_tree", interrupted)
    out = tmp_path / "c"
    res = CliRunner().invoke(main, ["teacher", *teacher_args, "--out", str(out)])
    assert res.exit_code == 130 and "re-run the same command" in res.output and "Traceback" not in res.output
    assert sum(open_cache(out).committed()) == 0
    assert_nothing_half_committed(out)


def test_nan_model_everywhere(tmp_path, prepared_dir, vocab_size):
    model = save_tiny_model("gpt2", vocab_size, tmp_path / "nan")
    from safetensors.torch import load_file, save_file

    w = load_file(model / "model.safetensors")
    key = next(k for k in w if k.endswith("ln_f.weight"))
    w[key] = torch.full_like(w[key], float("nan"))
    save_file(w, model / "model.safetensors", metadata={"format": "pt"})
    one_line_error(teacher("--data", prepared_dir, "--model", model, "--out", tmp_path / "c"), "not finite", "example")


# ---- tokenizer identity and precision ------------------------------------------------------------

def test_data_from_another_tokenizer_is_refused(tmp_path, prepared_dir, llama_dir, vocab_size):
    # A model directory that carries a tokenizer must carry the one the data was prepared with.
    from pipeline.data.bpe_tokenizer import train_tokenizer

    model = tmp_path / "with_tok"
    shutil.copytree(llama_dir, model)
    train_tokenizer(["a completely different corpus for another tokenizer"] * 20, model, vocab_size=280)
    one_line_error(teacher("--data", prepared_dir, "--model", model, "--out", tmp_path / "c"),
                   "the data was prepared with tokenizer", "has its own tokenizer")
    # Without tokenizer files: a head larger than the data's vocabulary by more than padding is refused...
    big = save_tiny_model("llama", vocab_size + 600, tmp_path / "big")
    one_line_error(teacher("--data", prepared_dir, "--model", big, "--out", tmp_path / "c"),
                   f"{vocab_size + 600} output ids", "more than padding apart")
    assert not (tmp_path / "c").exists()
    # ...while padding (Qwen-style: a few dozen extra rows) is masked and recorded (test_cache_oracle).


def test_a_worker_resolving_another_dtype_cannot_mix_precisions(tmp_path, prepared_dir, llama_dir):
    # dtype "auto" resolves on each worker; a shard computed in another precision than the committed ones
    # is refused at commit, naming both, instead of silently mixing float32 and bf16 rows.
    out = tmp_path / "cache"
    args = ("--data", prepared_dir, "--model", llama_dir, "--out", out, "--shard-rows", 200)
    assert teacher(*args).exit_code == 0
    rec_path = out / fmt.SHARDS_DIR / fmt.shard_name(0) / fmt.COMMIT_FILENAME
    rec = json.loads(rec_path.read_text())
    rec["dtype"] = "bfloat16"  # as if another worker had computed shard 0 on a GPU
    rec_path.write_text(json.dumps(rec))
    shutil.rmtree(out / fmt.SHARDS_DIR / fmt.shard_name(1))
    one_line_error(teacher(*args), "computed in float32", "committed shards are bfloat16")
    assert not (out / fmt.SHARDS_DIR / fmt.shard_name(1)).exists()  # not committed, and no half-written leftover
    assert not (out / fmt.TMP_DIR).exists() or not list((out / fmt.TMP_DIR).iterdir())
    assert any("different dtypes" in p for p in open_cache(out).verify())  # what --verify says of the planted one
