"""Tests for `pipeline.data.bpe_tokenizer`: round trip, special tokens, chat template, reload, determinism.

    .venv/bin/python -m pytest tests/data/test_tokenizer_train.py -q
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from pipeline.errors import KdError
from pipeline.data.bpe_tokenizer import SPECIAL_TOKENS, train_tokenizer

REPO = Path(__file__).resolve().parents[2]
VOCAB = 320  # 256 bytes + 5 specials + a few merges: enough to exercise BPE, fast to train
TEXTS = [f"What is {a} + {b}? The answer is {a + b}. Reverse 'planet': tenalp" for a in range(40) for b in range(10)]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(TEXTS, out, vocab_size=VOCAB)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    return AutoTokenizer.from_pretrained(tok_dir)


def test_round_trip(tok):
    for text in ["What is 12 + 7? 19", "  spaces  and\nnewlines\t", "unseen bytes: é ✓ 猫"]:
        ids = tok(text)["input_ids"]
        assert tok.decode(ids) == text


def test_special_tokens(tok):
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    assert tok.convert_tokens_to_ids(SPECIAL_TOKENS) == [0, 1, 2, 3, 4]
    assert set(SPECIAL_TOKENS) <= set(tok.all_special_tokens)
    # A special token in text is one id, never split into bytes.
    assert tok("<|user|>hi<|eos|>")["input_ids"][0] == 3
    assert len(tok) <= VOCAB


def test_chat_template(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == "<|user|>Be brief.<|eos|><|user|>What is 2 + 2?<|eos|><|assistant|>4<|eos|>"
    prompt = tok.apply_chat_template(messages[1:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|user|>What is 2 + 2?<|eos|><|assistant|>"
    ids = tok.apply_chat_template(messages[1:2], tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    assert ids[0] == 3 and ids[-1] == 4


def test_reload_matches(tok_dir):
    first = train_tokenizer(TEXTS, tok_dir.parent / "again", vocab_size=VOCAB)
    reloaded = AutoTokenizer.from_pretrained(tok_dir)
    text = "What is 33 + 4? The answer is 37."
    assert first(text)["input_ids"] == reloaded(text)["input_ids"]
    assert first.chat_template == reloaded.chat_template


def test_deterministic_across_processes(tok_dir, tmp_path):
    # A fresh interpreter gets fresh hash seeds (Python and Rust), which is where a trainer that
    # breaks merge ties by map order would differ.
    texts = tmp_path / "texts.json"
    texts.write_text(json.dumps(TEXTS))
    code = (
        "import json, sys; from pipeline.data.bpe_tokenizer import train_tokenizer; "
        f"train_tokenizer(json.load(open(sys.argv[1])), sys.argv[2], vocab_size={VOCAB})"
    )
    subprocess.run([sys.executable, "-c", code, str(texts), str(tmp_path / "tok")], cwd=REPO, check=True)
    assert sha256(tmp_path / "tok" / "tokenizer.json") == sha256(tok_dir / "tokenizer.json")


def test_rejects_bad_settings(tmp_path):
    with pytest.raises(KdError, match="unigram"):
        train_tokenizer(TEXTS, tmp_path, model="unigram")
    with pytest.raises(KdError, match="vocab_size=100"):
        train_tokenizer(TEXTS, tmp_path, vocab_size=100)
