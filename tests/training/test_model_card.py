"""The model card in final/README.md, its refresh by `kdcache eval`, and --push-to-hub's offline checks.

    .venv/bin/python -m pytest tests/training/test_model_card.py -q
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pipeline.training.model_card import MARKER, front_matter, render_card
from stages.cli import main

pytestmark = pytest.mark.usefixtures("torch_one_thread")

STUDENT = {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
           "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 128,
           "tie_word_embeddings": True}


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture()
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, prepared_dir, llama_dir, vocab_size) -> dict[str, Path]:
    from pipeline.teacher.runner import TeacherConfig, run_teacher

    root = tmp_path_factory.mktemp("card")
    run_teacher(TeacherConfig(data=str(prepared_dir), model=str(llama_dir), out=str(root / "cache"), top_k=8,
                              shard_rows=200, device="cpu"))
    student = root / "student.json"
    student.write_text(json.dumps({**STUDENT, "vocab_size": vocab_size}))
    return {"cache": root / "cache", "student": student, "data": prepared_dir, "teacher": llama_dir}


@pytest.fixture(scope="module")
def run(tmp_path_factory, setup) -> Path:
    """One epoch of SpecKD + LATF + IDTS, made with the network switched off."""
    mp = pytest.MonkeyPatch()
    try:
        def refuse(*args, **kwargs):
            raise AssertionError(f"network access attempted: {args}")

        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket, "getaddrinfo", refuse)
        out = tmp_path_factory.mktemp("runs") / "speckd"
        res = invoke("train", "--cache", setup["cache"], "--student-config", setup["student"], "--out", out,
                     "--epochs", 1, "--batch-size", 8, "--no-shuffle", "--gate", "topk", "--gate-k", 4,
                     "--reject-weight", 0.25, "--latf", "--idts", "--idts-c", 0.3, "--temperature", 1.2,
                     "--ce-weight", 0.1, "--device", "cpu")
        assert res.exit_code == 0, res.output
    finally:
        mp.undo()
    return out


def card(run: Path) -> str:
    return (run / "final" / "README.md").read_text()


def test_card_front_matter_and_what_it_states(run, setup):
    text = card(run)
    meta = front_matter(run / "final" / "README.md")
    assert meta["library_name"] == "transformers"
    assert {"knowledge-distillation", "kdcache", "adakd"} <= set(meta["tags"])
    assert "base_model" not in meta  # built from a config: no base model
    assert MARKER in text
    cache_meta = json.loads((setup["cache"] / "kdcache.json").read_text())
    pmeta = json.loads((setup["data"] / "kdcache_prepare.json").read_text())
    for fact in (str(setup["teacher"]), str(setup["cache"]), f"| format version | {cache_meta['format_version']} |",
                 f"| top-K | {cache_meta['codec']['top_k']} |", f"| codec | {cache_meta['codec']['name']} |",
                 cache_meta["data"]["fingerprint"], "proposal in the teacher's top 4",
                 "rejected positions weighted 0.25", "on: warm-up 0.05, EMA decay 0.99", "on: c = 0.3",
                 "| temperature T_base | 1.2 |", "| 0.1 |", "| tail policy | sampled |", "| loss (divergence) | fkl |"):
        assert fact in text, fact
    # One epoch without shuffling sees every token of the prepared data once.
    steps = -(-pmeta["examples"] // 8)
    assert f"| optimizer steps | {steps:,} |" in text
    assert f"| tokens seen | {pmeta['tokens']:,} |" in text
    assert "Not evaluated yet" in text


def test_eval_of_the_run_updates_its_card(tmp_path, run, setup, no_network):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    res = invoke("eval", "--model", copy, "--cache", setup["cache"], "--out", copy / "eval", "--device", "cpu")
    assert res.exit_code == 0, res.output
    ev = json.loads((copy / "eval" / "eval.json").read_text())
    text = card(copy)
    assert "Not evaluated yet" not in text
    assert f"| perplexity | {ev['ppl']:.2f} |" in text
    assert f"| top-1 agreement with the teacher | {ev['teacher_top1_agreement']:.3f} |" in text
    assert f"| forward KL to the teacher (K + 1 buckets) | {ev['fkl_to_teacher']:.4f} |" in text
    # An eval elsewhere adds a column; the one beside the run stays.
    res = invoke("eval", "--model", copy / "final", "--data", setup["data"], "--out", tmp_path / "elsewhere",
                 "--device", "cpu")
    assert res.exit_code == 0, res.output
    header = next(ln for ln in card(copy).splitlines() if ln.startswith("| |") and "kdcache eval" in ln)
    assert header.count("kdcache eval") == 2
    # A card someone edited (marker removed) is theirs: left alone.
    edited = card(copy).replace(MARKER + "\n", "") + "\nmy notes\n"
    (copy / "final" / "README.md").write_text(edited)
    res = invoke("eval", "--model", copy, "--data", setup["data"], "--out", tmp_path / "again", "--device", "cpu")
    assert res.exit_code == 0 and card(copy) == edited


def test_eval_never_writes_a_card_into_a_model_kdcache_did_not_train(tmp_path, setup):
    import shutil

    model = tmp_path / "teacher"
    shutil.copytree(setup["teacher"], model)
    before = sorted(p.name for p in model.iterdir())
    res = invoke("eval", "--model", model, "--data", setup["data"], "--out", tmp_path / "ev", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in model.iterdir()) == before


def test_base_model_datasets_and_license_when_known(tmp_path):
    record = {"steps": 10, "tokens_seen": 1234, "config": {"student": "Qwen/Qwen2.5-0.5B", "cache": "c", "loss": "fkl"},
              "data_info": {"data": "HuggingFaceH4/ultrachat_200k", "source_sha256": None}}
    meta = yaml.safe_load(render_card(record, [], "kd").split("---")[1])
    assert meta["base_model"] == "Qwen/Qwen2.5-0.5B" and meta["datasets"] == ["HuggingFaceH4/ultrachat_200k"]
    # A student started from a local directory inherits the base model and licence its card names.
    local = tmp_path / "warm"
    local.mkdir()
    (local / "README.md").write_text("---\nbase_model: Qwen/Qwen2.5-0.5B\nlicense: apache-2.0\n---\n# warm\n")
    record["config"]["student"] = str(local)
    record["data_info"] = {"data": str(tmp_path / "corpus.jsonl"), "source_sha256": "ab" * 32}
    meta = yaml.safe_load(render_card(record, [], "kd").split("---")[1])
    assert meta["base_model"] == "Qwen/Qwen2.5-0.5B" and meta["license"] == "apache-2.0"
    assert "datasets" not in meta  # a local file is not a Hub dataset


def test_push_to_hub_repo_is_checked_before_training(tmp_path, setup, monkeypatch, no_network):
    base = ["train", "--cache", setup["cache"], "--student-config", setup["student"], "--max-steps", 1,
            "--device", "cpu"]
    for repo, message in (("just-a-name", "expected OWNER/NAME"), ("me/bad name!", "not a valid repo id"),
                          ("a/b/c", "expected OWNER/NAME")):
        out = tmp_path / "bad"
        res = invoke(*base, "--out", out, "--push-to-hub", repo)
        lines = [ln for ln in res.output.splitlines() if ln.strip()]
        assert res.exit_code == 1 and len(lines) == 1 and message in lines[0], res.output
        assert not out.exists()
    res = invoke(*base, "--out", tmp_path / "x", "--push-to-hub")  # the option without its value
    assert res.exit_code == 2 and "requires an argument" in res.output
    # A valid repo without a token: refused before anything is trained (no network needed to know).
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
    out = tmp_path / "no_token"
    res = invoke(*base, "--out", out, "--push-to-hub", "me/student")
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 1 and len(lines) == 1 and "no Hugging Face token" in lines[0], res.output
    assert not out.exists()
