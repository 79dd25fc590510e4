"""The codec presets (`kdcache teacher --preset`, pipeline/cache/schema.py PRESETS and PRESET_TAIL_SAMPLES): what each
caches, and a cache made with the default of before 2026-12-07 (no tail draws) still reads and resumes.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/teacher/test_presets.py -q
"""

from __future__ import annotations

from click.testing import CliRunner

from conftest import one_line_error
from pipeline.cache import open_cache
from stages.cli import main


def _teacher(prepared_dir, llama_dir, out, *extra):
    return CliRunner().invoke(main, ["teacher", "--data", str(prepared_dir), "--model", str(llama_dir), "--out", str(out),
                                     "--device", "cpu", "--dtype", "float32", *map(str, extra)])


def test_each_preset_caches_its_draws(tmp_path, prepared_dir, llama_dir, vocab_size):
    """default: K = 6 and 4 tail draws with their log-probs (2^-5 nats); compact: K = 8, no draws; hifi: K = 16,
    finer codes, 8 draws; --tail-samples overrides a preset either way; with K = V there is no tail, so the preset's draws are
    dropped (asked for explicitly, that is one line)."""
    want = {"default": (6, 4, 0.04, 2**-5), "compact": (8, 0, 0.04, 0.0), "hifi": (16, 8, 0.02, 2**-6)}
    for preset, (k, s, step, draw_step) in want.items():
        res = _teacher(prepared_dir, llama_dir, tmp_path / preset, "--preset", preset)
        assert res.exit_code == 0, res.output
        c = open_cache(tmp_path / preset)
        assert (c.k, c.tail_samples, c.params.head_step, c.params.draw_step) == (k, s, step, draw_step)
        assert c.params.draw_logprobs == (s > 0)
        if s:
            rows = c.read(0, 50, ("tail_ids", "tail_counts", "tail_logprobs"))
            assert (rows["tail_counts"].sum(1) == s).all()
    res = _teacher(prepared_dir, llama_dir, tmp_path / "none", "--tail-samples", 0)
    assert res.exit_code == 0 and open_cache(tmp_path / "none").tail_samples == 0
    res = _teacher(prepared_dir, llama_dir, tmp_path / "kv", "--top-k", vocab_size)
    assert res.exit_code == 0, res.output
    assert (open_cache(tmp_path / "kv").k, open_cache(tmp_path / "kv").tail_samples) == (vocab_size, 0)
    one_line_error(_teacher(prepared_dir, llama_dir, tmp_path / "kv2", "--top-k", vocab_size, "--tail-samples", 2),
                   "tail_samples needs ids outside the top-K")


def test_a_cache_of_the_old_default_resumes_as_compact(tmp_path, prepared_dir, llama_dir):
    """The default of before 2026-12-07 was K = 8 with the compact precisions and no draws unless asked for (its
    record says preset default). Re-run with today's defaults it is refused in one line that says how to resume
    it, and nothing is touched; with --preset compact (that preset under its new name) it resumes (here: is
    complete) unchanged, with or without the draws it was made with."""
    for extra in ((), ("--tail-samples", 8)):
        out = tmp_path / f"old{len(extra)}"
        # what the old default wrote: the same codec record as compact's (the preset's name is not compared)
        assert _teacher(prepared_dir, llama_dir, out, "--preset", "compact", *extra).exit_code == 0
        before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
        one_line_error(_teacher(prepared_dir, llama_dir, out, *extra), "top_k 8 -> 6", "add --preset compact")
        res = _teacher(prepared_dir, llama_dir, out, "--preset", "compact", *extra)
        assert res.exit_code == 0 and "already complete" in res.output, res.output
        assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
