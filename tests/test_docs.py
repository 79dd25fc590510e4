"""The documentation's code runs and agrees with the library: docs/cache-format.md's plain-zarr decoder.

    .venv/bin/python -m pytest tests/test_docs.py -q
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from pipeline.cache import open_cache
from pipeline.teacher.runner import TeacherConfig, run_teacher

DOCS = Path(__file__).resolve().parents[1] / "docs"


def python_blocks(md: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", md.read_text(), flags=re.S)


@pytest.mark.parametrize("top_k", [8, 300])  # a tail, and K = V (no tail)
def test_cache_format_decoder_matches_the_reader(tmp_path, prepared_dir, llama_dir, vocab_size, top_k):
    if top_k > vocab_size:
        top_k = vocab_size
    out = tmp_path / "cache"
    run_teacher(TeacherConfig(data=str(prepared_dir), model=str(llama_dir), out=str(out), top_k=top_k,
                              device="cpu", dtype="float32"))
    block = next(b for b in python_blocks(DOCS / "cache-format.md") if "zarr.open_group" in b)
    scope: dict = {}
    exec(block.replace('cache = "CACHE"', f'cache = "{out}"'), scope)  # noqa: S102 - our own documentation
    n = scope["n"]
    rows = open_cache(out).read(0, n)
    assert np.array_equal(scope["ids"], rows["topk_ids"])
    np.testing.assert_allclose(scope["logp"], rows["topk_logprobs"], atol=1e-6)
    np.testing.assert_allclose(scope["log_r"], rows["tail_logprob"], atol=1e-6)
    np.testing.assert_allclose(scope["tail_log_partition"], rows["tail_log_partition"], atol=1e-5)
    np.testing.assert_allclose(scope["a"], rows["log_partition"], atol=1e-5)
