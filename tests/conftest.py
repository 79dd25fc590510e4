"""Fixtures: a tokenizer trained here, tiny teachers built from transformers configs, prepared data.

Nothing is downloaded: every model is random-initialised from a config and saved to a local
directory, which exercises the same `from_pretrained` path a hub id takes.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

WORDS = ("the cat dog bird sat ran on a mat log tree red blue green big small one two three four five "
         "what is plus minus answer question reverse sort hello world").split()


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")
    parser.addoption("--realllm", action="store_true", default=False,
                     help="run tests marked realllm (SmolLM2-135M from the package registry, bench/real_llm.py)")


def pytest_collection_modifyitems(config, items):
    skips = {"slow": None if config.getoption("--runslow") else pytest.mark.skip(reason="slow: pass --runslow"),
             "realllm": None if config.getoption("--realllm") else pytest.mark.skip(reason="real LLM: pass --realllm")}
    for item in items:
        for marker, skip in skips.items():
            if skip is not None and marker in item.keywords:
                item.add_marker(skip)


def one_line_error(res, *needles: str) -> str:
    """The one `error:` line of a failed CLI run (exit 1, no traceback), checked to contain each needle."""
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output, res.output
    errs = [ln for ln in res.output.splitlines() if "error:" in ln]
    assert len(errs) == 1, res.output
    for n in needles:
        assert n in errs[0], errs[0]
    return errs[0]


def make_pairs(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Small prompt-response records over a fixed word list."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8)))
        r = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6)))
        out.append({"prompt": p + " ?", "response": r})
    return out


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from pipeline.data.bpe_tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("tokenizer")
    texts = [f"{r['prompt']} {r['response']}" for r in make_pairs(400, seed=1)]
    train_tokenizer(texts, d, vocab_size=300)
    return d


def save_tiny_model(kind: str, vocab_size: int, out: Path, seed: int = 0, **over) -> Path:
    """A random-initialised tiny causal LM of one family, saved with `save_pretrained`."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

    torch.manual_seed(seed)
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                          tie_word_embeddings=False, **over)
    elif kind == "gpt2":
        cfg = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=128, **over)
    elif kind == "qwen2":
        cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                          tie_word_embeddings=True, **over)
    else:
        raise ValueError(kind)
    model = AutoModelForCausalLM.from_config(cfg)
    # Random init gives near-uniform distributions; larger logits make the top-K informative.
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head.mul_(8.0)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def vocab_size(tokenizer_dir) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(tokenizer_dir))


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, vocab_size) -> Path:
    return save_tiny_model("llama", vocab_size, tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def data_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in make_pairs(60, seed=2)))
    return p


@pytest.fixture(scope="session")
def prepared_dir(tmp_path_factory, data_file, tokenizer_dir) -> Path:
    from pipeline.data.prepare import PrepareConfig, prepare

    out = tmp_path_factory.mktemp("prep") / "prepared"
    prepare(PrepareConfig(data=str(data_file), tokenizer=str(tokenizer_dir), out=str(out), max_length=64))
    return out


# ---- teacher-cache fixtures (tests/cache/test_cache_oracle.py, test_teacher_*.py, test_inspect.py) ----------

CACHE_SHARD_ROWS = 60  # ~11 shards over `prepared_dir`: restart, multi-worker and verify tests need several


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory, vocab_size) -> Path:
    return save_tiny_model("gpt2", vocab_size, tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="session")
def qwen2_tied_dir(tmp_path_factory, vocab_size) -> Path:
    return save_tiny_model("qwen2", vocab_size, tmp_path_factory.mktemp("qwen2"))


@pytest.fixture(scope="session")
def teacher_args(prepared_dir, llama_dir) -> list[str]:
    """`kdcache teacher` options (less --out) shared by the reference cache and the runs compared to it."""
    return ["--data", str(prepared_dir), "--model", str(llama_dir), "--shard-rows", str(CACHE_SHARD_ROWS),
            "--tail-samples", "4", "--device", "cpu", "--dtype", "float32"]


@pytest.fixture(scope="session")
def llama_cache(tmp_path_factory, teacher_args) -> Path:
    """A finished cache of the tiny llama over `prepared_dir`, made in one uninterrupted process."""
    from click.testing import CliRunner

    from stages.cli import main

    out = tmp_path_factory.mktemp("cache") / "llama"
    res = CliRunner().invoke(main, ["teacher", *teacher_args, "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="session")
def student_cache(tmp_path_factory, prepared_dir, llama_dir) -> Path:
    """A cache of the tiny llama over `prepared_dir` with 4 tail draws, in shards of 200 rows: what the student
    stage's tests distil from (tests/training/test_train.py, tests/storage/test_remote_train.py)."""
    from pipeline.teacher.runner import TeacherConfig, run_teacher

    out = tmp_path_factory.mktemp("cache") / "cache"
    run_teacher(TeacherConfig(data=str(prepared_dir), model=str(llama_dir), out=str(out), shard_rows=200,
                              chunk_rows=64, tail_samples=4))
    return out


def reseal_cache(cache: Path) -> None:
    """Rewrite CACHE/kdcache.sha256 for kdcache.json, index.parquet and config.yaml as they are now: a test that
    edits kdcache.json to make a cache with other properties (another tokenizer, a moved data path) makes one
    written that way, not a damaged one (which every reader refuses, naming the file)."""
    import hashlib

    lines = [f"{hashlib.sha256((cache / n).read_bytes()).hexdigest()}  {n}\n"
             for n in ("kdcache.json", "index.parquet", "config.yaml") if (cache / n).is_file()]
    (cache / "kdcache.sha256").write_text("".join(lines))


@pytest.fixture(scope="module")
def torch_one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core box every OpenMP barrier can
    wait a scheduler time slice (measured: a tiny teacher pass 1 s alone, 19 s under load at 2 threads)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def free_port() -> int:
    """A TCP port nothing listens on now (torchrun's rendezvous; a fixed port collides with parallel runs)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
