"""GGUF teachers, students and tokenizers: `--model file.gguf`, `--student file.gguf`, `--tokenizer file.gguf`.

A tiny F32 GGUF is written here from the tiny llama and tokenizer fixtures (tests/gguf_fixture.py), so nothing is
downloaded; the file must load back into the very model and tokenizer it was written from.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_gguf.py -q
"""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import make_pairs, one_line_error
from gguf_fixture import write_gguf

from pipeline.errors import KdError
from pipeline.identity import file_sha256, tokenizer_identity
from stages.cli import main

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, llama_dir, tokenizer_dir):
    return write_gguf(llama_dir, tokenizer_dir, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_the_file_loads_as_the_model_it_was_written_from(tiny_gguf, llama_dir, vocab_size, tmp_path):
    from transformers import AutoModelForCausalLM

    from pipeline.models import load_causal_lm

    model = load_causal_lm(str(tiny_gguf), torch.device("cpu"), torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, vocab_size, (3, 23), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
    # A plain float model: nothing left of the GGUF quantizer, so it trains and saves as an ordinary checkpoint.
    assert not hasattr(model.config, "quantization_config")
    assert getattr(model, "hf_quantizer", None) is None
    assert all(p.dtype == torch.float32 for p in model.parameters())
    model.save_pretrained(tmp_path / "saved")
    assert "quantization_config" not in json.loads((tmp_path / "saved" / "config.json").read_text())


def test_the_tokenizer_comes_from_the_same_file(tiny_gguf, tokenizer_dir):
    from transformers import AutoTokenizer

    from pipeline.models import has_tokenizer_files, load_tokenizer, own_tokenizer

    ref = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok = load_tokenizer(str(tiny_gguf))
    # Same (token, id) pairs: transformers' extra `<|endoftext|>` (not in this vocabulary) is dropped.
    assert tokenizer_identity(tok, "a")["vocab_sha256"] == tokenizer_identity(ref, "b")["vocab_sha256"]
    assert len(tok) == len(ref)
    for text in [f"{r['prompt']} {r['response']}" for r in make_pairs(30, seed=5)] + [
            "<|user|>hello world<|eos|><|assistant|>the cat", "  two spaces, ünïcödé 123"]:
        assert tok(text, add_special_tokens=False)["input_ids"] == ref(text, add_special_tokens=False)["input_ids"]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (ref.bos_token_id, ref.eos_token_id,
                                                                      ref.pad_token_id)
    assert tok.chat_template == ref.chat_template
    assert has_tokenizer_files(tiny_gguf)
    assert own_tokenizer(str(tiny_gguf)).get_vocab() == ref.get_vocab()


def test_prepare_with_the_gguf_tokenizer_gives_the_same_data(tiny_gguf, data_file, prepared_dir, tmp_path):
    from pipeline.data.prepare import load_prepared, prepared_meta

    res = invoke("prepare", "--data", data_file, "--tokenizer", tiny_gguf, "--out", tmp_path / "p", "--max-length", 64)
    assert res.exit_code == 0, res.output
    got, want = prepared_meta(tmp_path / "p")["tokenizer"], prepared_meta(prepared_dir)["tokenizer"]
    assert got["vocab_sha256"] == want["vocab_sha256"] and got["name"] == str(tiny_gguf)
    assert load_prepared(tmp_path / "p")["input_ids"] == load_prepared(prepared_dir)["input_ids"]


@pytest.fixture(scope="module")
def gguf_cache(tmp_path_factory, tiny_gguf, teacher_args):
    args = list(teacher_args)
    args[args.index("--model") + 1] = str(tiny_gguf)
    out = tmp_path_factory.mktemp("gguf_cache") / "cache"
    res = invoke("teacher", *args, "--out", out)
    assert res.exit_code == 0, res.output
    return out


def test_teacher_on_a_gguf_file_records_its_sha256_and_caches_the_same_rows(gguf_cache, tiny_gguf, llama_cache):
    from pipeline.cache import open_cache

    got, want = open_cache(gguf_cache), open_cache(llama_cache)
    teacher = got.meta["teacher"]
    assert teacher["weights_sha256"] == file_sha256(tiny_gguf)  # the file's own digest: `sha256sum tiny.gguf`
    assert teacher["model"] == str(tiny_gguf)
    for key in ("model_vocab_size", "context_length", "architectures"):
        assert teacher[key] == want.meta["teacher"][key], key
    n = want.meta["num_rows"]
    assert got.meta["num_rows"] == n
    a, b = got.read(0, n), want.read(0, n)
    assert set(a) == set(b)
    for field in a:
        np.testing.assert_array_equal(a[field], b[field], err_msg=field)


def test_a_changed_gguf_file_is_refused_on_resume(gguf_cache, tiny_gguf, tmp_path, teacher_args, llama_dir,
                                                  tokenizer_dir):
    """The recorded sha256 is what a re-run compares: the same path holding other weights is another teacher."""
    other = write_gguf(llama_dir, tokenizer_dir, tmp_path / "other.gguf", permute_qk=False)  # same size, other bytes
    cache = tmp_path / "cache"
    shutil.copytree(gguf_cache, cache)
    args = list(teacher_args)
    args[args.index("--model") + 1] = str(tiny_gguf)
    saved = tiny_gguf.read_bytes()
    try:
        shutil.copy(other, tiny_gguf)
        one_line_error(invoke("teacher", *args, "--out", cache), "teacher weights_sha256", "--overwrite")
    finally:
        tiny_gguf.write_bytes(saved)


def test_train_a_gguf_student(tiny_gguf, llama_cache, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    res = invoke("train", "--cache", llama_cache, "--student", tiny_gguf, "--out", out, "--max-steps", 2,
                 "--batch-size", 4, "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert "train: 2/2 steps" in res.output
    cfg = json.loads((out / "final" / "config.json").read_text())
    assert "quantization_config" not in cfg
    model = AutoModelForCausalLM.from_pretrained(out / "final")  # an ordinary checkpoint, with the file's tokenizer
    assert model.config.num_hidden_layers == 2
    assert len(AutoTokenizer.from_pretrained(out / "final")) == model.config.vocab_size


def test_eval_a_gguf_model_scores_as_its_directory(tiny_gguf, llama_dir, prepared_dir, llama_cache, tmp_path):
    """`eval --model file.gguf`: the model and, for --generate, the tokenizer from the file (checked against the
    data's): the same figures and generations as the directory it was written from."""
    for name, model in (("g", tiny_gguf), ("d", llama_dir)):
        res = invoke("eval", "--model", model, "--data", prepared_dir, "--cache", llama_cache, "--generate", 2,
                     "--device", "cpu", "--out", tmp_path / name)
        assert res.exit_code == 0, res.output
    got, want = (json.loads((tmp_path / name / "eval.json").read_text()) for name in ("g", "d"))
    assert got.pop("model") == str(tiny_gguf)
    for key in set(want) - {"model", "seconds", "out"}:
        assert got[key] == (pytest.approx(want[key], rel=1e-6) if isinstance(want[key], float) else want[key]), key


@pytest.mark.parametrize("stage", ["teacher", "train", "prepare"])
def test_missing_gguf_package_is_one_line_naming_the_extra(tiny_gguf, prepared_dir, data_file, llama_cache,
                                                           tmp_path, monkeypatch, stage):
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` fails as if it were not installed
    args = {"teacher": ["--data", prepared_dir, "--model", tiny_gguf, "--device", "cpu"],
            "train": ["--cache", llama_cache, "--student", tiny_gguf, "--max-steps", 1, "--device", "cpu"],
            "prepare": ["--data", data_file, "--tokenizer", tiny_gguf]}[stage]
    err = one_line_error(invoke(stage, *args, "--out", tmp_path / "out"),
                         "needs the gguf package", "pip install 'kdcache[gguf]'", str(tiny_gguf))
    assert err.startswith(f"kdcache {stage}: error:")


def test_missing_accelerate_is_one_line_naming_the_extra(tiny_gguf, monkeypatch):
    from pipeline.models import load_causal_lm, load_tokenizer

    monkeypatch.setitem(sys.modules, "accelerate", None)
    with pytest.raises(KdError, match=r"needs the accelerate package .*pip install 'kdcache\[gguf\]'"):
        load_causal_lm(str(tiny_gguf), torch.device("cpu"), torch.float32)
    assert len(load_tokenizer(str(tiny_gguf))) > 0  # a tokenizer needs only the gguf package


@pytest.mark.parametrize("case", ["missing", "random-bytes", "truncated"])
def test_a_bad_gguf_file_is_one_line(tiny_gguf, prepared_dir, llama_cache, tmp_path, case):
    bad = tmp_path / "bad.gguf"
    if case == "random-bytes":
        bad.write_bytes(np.random.default_rng(0).bytes(4096))
    elif case == "truncated":  # the magic and version, then the file ends inside the metadata
        bad.write_bytes(tiny_gguf.read_bytes()[:200])
    needle = {"missing": "not found", "random-bytes": "not a GGUF file", "truncated": "cannot load"}[case]
    one_line_error(invoke("teacher", "--data", prepared_dir, "--model", bad, "--device", "cpu",
                          "--out", tmp_path / "c"), str(bad), needle)
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").glob("shards/*"))
    one_line_error(invoke("train", "--cache", llama_cache, "--student", bad, "--max-steps", 1, "--device", "cpu",
                          "--out", tmp_path / "r"), str(bad), needle)
