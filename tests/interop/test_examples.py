"""The examples in examples/ run as their docstrings say, on the tiny fixtures, and write a model that loads.

    .venv/bin/python -m pytest tests/interop/test_examples.py -q

Each example is run in this process through its `main(argv)` (the same code as `python examples/X.py ...`,
without paying for a second interpreter's torch import).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.usefixtures("torch_one_thread")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"kdcache_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, vocab_size) -> Path:
    """A GPT-2 student with 5 padded head rows beyond the teacher's vocabulary."""
    from conftest import save_tiny_model

    return save_tiny_model("gpt2", vocab_size + 5, tmp_path_factory.mktemp("student"), seed=1)


def assert_trained_model(out: Path, start: Path, vocab_size: int) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == "gpt2" and len(AutoTokenizer.from_pretrained(out)) == vocab_size
    before, after = load_file(start / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained
    assert not [p.name for p in out.parent.iterdir() if ".tmp" in p.name]  # no temporary directory left


ARGS = ["--max-steps", "3", "--batch-size", "4", "--latf", "--idts", "--gate", "spec", "--ce-weight", "0.2"]


@pytest.mark.parametrize("name, extra", [("hf_trainer", ["--grad-accum", "2"]), ("plain_loop", []),
                                         ("trl_sft", ["--grad-accum", "2"])])
def test_example_trains_and_writes_a_loadable_model(tmp_path, prepared_dir, llama_cache, student_dir, vocab_size,
                                                    name, extra):
    if name == "trl_sft":
        pytest.importorskip("trl", reason="TRL is optional: pip install -e '.[trl]' (the test extra includes it)")
    out = tmp_path / "student"
    rc = load_example(name).main(["--data", str(prepared_dir), "--cache", str(llama_cache), "--student",
                                  str(student_dir), "--out", str(out), *ARGS, *extra])
    assert rc == 0
    assert_trained_model(out, student_dir, vocab_size)


def test_example_refuses_a_student_that_cannot_score_the_teachers_vocabulary(tmp_path, prepared_dir, llama_cache,
                                                                              vocab_size, capsys):
    from conftest import save_tiny_model

    small = save_tiny_model("gpt2", vocab_size - 10, tmp_path / "small")
    rc = load_example("plain_loop").main(["--data", str(prepared_dir), "--cache", str(llama_cache), "--student",
                                          str(small), "--out", str(tmp_path / "out"), "--max-steps", "1"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("plain_loop:")]
    assert rc == 1 and len(err) == 1 and "output ids" in err[0]
    assert not (tmp_path / "out").exists()
