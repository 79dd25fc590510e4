"""Gemma 3's vocabulary, V = 262,144, end to end: prepare -> teacher -> the cache against float64 -> train -> eval.

    .venv/bin/python -m pytest tests/teacher/test_large_vocab.py -q

A word-level tokenizer of 262,144 ids and a tiny random Gemma-3 text model (bench/large_vocab.py builds both);
Zipf text over the whole id range, so cached ids beyond 2^16 occur (stored as uint32). The entropy's error stays
within 0.01 nats (the tail entropy's code spans log(V - K) = 12.5 nats), the head and tail within the codec's
steps, and the student stage's chunked loss trains and evaluates at this V.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from stages.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import large_vocab  # noqa: E402
import real_llm_measure  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")
V = large_vocab.V


def run(*args: str) -> None:
    res = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert res.exit_code == 0, res.output


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("large_vocab")
    tok, model = large_vocab.word_tokenizer(V, root / "tok"), large_vocab.tiny_gemma3(V, root / "model")
    src = root / "text.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in large_vocab.zipf_texts(3, 48, V)))
    run("prepare", "--data", str(src), "--tokenizer", str(tok), "--out", str(root / "prep"), "--max-length", "49")
    run("teacher", "--data", str(root / "prep"), "--model", str(model), "--out", str(root / "cache"),
        "--device", "cpu", "--dtype", "float32")
    return root


def test_cache_at_262144_ids_against_float64(built):
    from transformers import AutoModelForCausalLM

    from pipeline.cache import open_cache

    c = open_cache(built / "cache")
    assert c.vocab_size == V and c.params.entropy_bits == 11
    raw = c.read_raw(0, c.num_rows, ("topk_ids",))["topk_ids"]
    assert raw.dtype == np.uint32 and int(raw.max()) >= 1 << 17  # ids need 18 bits, and they are kept
    model = AutoModelForCausalLM.from_pretrained(built / "model", dtype=torch.float32).eval()
    ids, masks = real_llm_measure.load_examples(built / "prep")
    errs = real_llm_measure.Errors(c)
    for ref in real_llm_measure.reference_rows(model, ids, masks, V, np.asarray([1.0 / t for t in c.temperatures])):
        errs.add(ref)
    e = errs.summary()
    assert e["entropy"]["max"] <= 0.01
    assert e["topk_logprobs"]["max"] <= c.params.head_step + 1e-3
    assert e["tail_logprob_rel"]["max"] <= 1e-3
    assert e["target_logprobs"]["max"] <= c.params.head_step + 1e-3


def test_train_and_eval_at_262144_ids(built, tmp_path):
    run("train", "--cache", str(built / "cache"), "--student", str(built / "model"), "--out", str(tmp_path / "run"),
        "--max-steps", "2", "--batch-size", "2", "--device", "cpu", "--dtype", "float32", "--idts")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert any("loss" in r for r in rows) and all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    run("eval", "--model", str(tmp_path / "run"), "--cache", str(built / "cache"), "--out", str(tmp_path / "ev"),
        "--device", "cpu", "--dtype", "float32")
    ev = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert math.isfinite(ev["ce"]) and 0.0 <= ev["teacher_top1_agreement"] <= 1.0
