"""Tokenizer identity through train and eval, and special-token ids a saved student can generate with.

    .venv/bin/python -m pytest tests/training/test_student_tokenizer.py -q
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from stages.cli import main

pytestmark = pytest.mark.usefixtures("torch_one_thread")
ROOT = Path(__file__).resolve().parents[2]

STUDENT = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
           "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 128,
           "tie_word_embeddings": True}


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def fixed_answer(tmp_path_factory, tokenizer_dir) -> Path:
    """Prepared data whose every response is 'red', then EOS: a student learns to stop right after it."""
    from conftest import make_pairs

    root = tmp_path_factory.mktemp("fixed")
    src = root / "fixed.jsonl"
    src.write_text("".join(json.dumps({"prompt": r["prompt"], "response": "red"}) + "\n" for r in make_pairs(64, 5)))
    res = invoke("prepare", "--data", src, "--tokenizer", tokenizer_dir, "--out", root / "prepared", "--max-length", 64)
    assert res.exit_code == 0, res.output
    return root / "prepared"


@pytest.fixture(scope="module")
def student_json(tmp_path_factory, vocab_size) -> Path:
    p = tmp_path_factory.mktemp("student") / "student.json"
    p.write_text(json.dumps({**STUDENT, "vocab_size": vocab_size}))  # bos/eos/pad: LlamaConfig's defaults (1, 2, None)
    return p


@pytest.fixture(scope="module")
def trained(tmp_path_factory, fixed_answer, student_json) -> Path:
    out = tmp_path_factory.mktemp("runs") / "stops"
    res = invoke("train", "--data", fixed_answer, "--student-config", student_json, "--out", out, "--max-steps", 40,
                 "--batch-size", 16, "--lr", "1e-2", "--save-every", 20, "--device", "cpu")
    assert res.exit_code == 0, res.output
    return out


def test_saved_student_generation_stops_at_the_tokenizers_eos(trained, tokenizer_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)  # the truth: the tokenizer the data was prepared with
    assert tok.eos_token_id != 2  # LlamaConfig's default eos, which the student config did not override
    final = trained / "final"
    model = AutoModelForCausalLM.from_pretrained(final).eval()
    prompt = [tok.bos_token_id] + tok("the cat sat on a mat ?", add_special_tokens=False)["input_ids"]
    x = torch.tensor([prompt])
    with torch.no_grad():
        y = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=20, do_sample=False)
    new = y[0, x.shape[1]:].tolist()
    assert new[-1] == tok.eos_token_id and len(new) < 20, tok.decode(new)
    assert tok.decode(new, skip_special_tokens=True).strip() == "red"
    # Every saved config names the tokenizer's ids: final/ and the checkpoints.
    for d in [final, *sorted((trained / "checkpoints").iterdir())]:
        cfg = json.loads((d / "config.json").read_text())
        gen = json.loads((d / "generation_config.json").read_text())
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            assert cfg[key] == gen[key] == getattr(tok, key), (d.name, key)


def test_shipped_demo_teacher_names_its_tokenizers_ids():
    from transformers import AutoTokenizer

    teacher = ROOT / "data" / "demo" / "teacher"
    tok = AutoTokenizer.from_pretrained(teacher)
    assert AutoTokenizer.from_pretrained(ROOT / "data" / "demo" / "tokenizer").get_vocab() == tok.get_vocab()
    cfg = json.loads((teacher / "config.json").read_text())
    gen = json.loads((teacher / "generation_config.json").read_text())
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert cfg[key] == gen[key] == getattr(tok, key), key


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory) -> Path:
    """A tokenizer of the same size trained on other text: other (token, id) pairs."""
    from pipeline.data.bpe_tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("other_tok")
    train_tokenizer([f"zebra quartz {i} jumping fox vexed nymph {i * 7}" for i in range(300)], d, vocab_size=300)
    return d


def test_student_keeps_its_own_tokenizer(tmp_path, trained, fixed_answer, tokenizer_dir):
    """A student directory with its own tokenizer files (same vocabulary as the data's, another chat template)
    passes them on to final/, instead of the data's."""
    from transformers import AutoTokenizer

    base = tmp_path / "base"
    shutil.copytree(trained / "final", base)
    own = AutoTokenizer.from_pretrained(base)
    own.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}"
    own.save_pretrained(base)
    res = invoke("train", "--data", fixed_answer, "--student", base, "--out", tmp_path / "run", "--loss", "none",
                 "--max-steps", 2, "--batch-size", 8, "--device", "cpu")
    assert res.exit_code == 0, res.output
    saved = AutoTokenizer.from_pretrained(tmp_path / "run" / "final")
    assert saved.chat_template == own.chat_template
    assert AutoTokenizer.from_pretrained(tokenizer_dir).chat_template != own.chat_template


def test_student_with_another_tokenizer_is_refused_naming_both(tmp_path, trained, fixed_answer, other_tokenizer):
    base = tmp_path / "base"
    shutil.copytree(trained / "final", base)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (base / f).unlink(missing_ok=True)
    for f in other_tokenizer.iterdir():
        shutil.copy(f, base / f.name)
    out = tmp_path / "run"
    res = invoke("train", "--data", fixed_answer, "--student", base, "--out", out, "--loss", "none",
                 "--max-steps", 2, "--batch-size", 8, "--device", "cpu")
    assert res.exit_code == 1 and "Traceback" not in res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "the student's tokenizer" in lines[0], res.output
    data_tok = json.loads((fixed_answer / "kdcache_prepare.json").read_text())["tokenizer"]
    assert str(base) in lines[0] and data_tok["name"] in lines[0]
    assert not out.exists()  # refused before the run directory was made


def test_eval_refuses_a_model_whose_tokenizer_differs_naming_both(tmp_path, trained, fixed_answer, other_tokenizer):
    model = tmp_path / "model"
    shutil.copytree(trained / "final", model)
    for f in other_tokenizer.iterdir():
        shutil.copy(f, model / f.name)
    out = tmp_path / "eval"
    res = invoke("eval", "--model", model, "--data", fixed_answer, "--out", out, "--device", "cpu")
    assert res.exit_code == 1 and "Traceback" not in res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "the model's tokenizer" in lines[0] and str(model) in lines[0], res.output
    data_tok = json.loads((fixed_answer / "kdcache_prepare.json").read_text())["tokenizer"]
    assert data_tok["name"] in lines[0] and not out.exists()
    # The model's own, matching tokenizer passes (no --generate needed for the check).
    res = invoke("eval", "--model", trained, "--data", fixed_answer, "--out", tmp_path / "ok", "--device", "cpu")
    assert res.exit_code == 0, res.output
