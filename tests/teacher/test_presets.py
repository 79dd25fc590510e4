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
    """default: K = 8 and 4 tail draws with their log-probs; compact: K = 8, no draws; hifi: K = 16, finer codes,
    8 draws; --tail-samples overrides a preset either way; with K = V there is no tail, so the preset's draws are
    dropped (asked for explicitly, that is one line)."""
    want = {"default": (8, 4, 0.04), "compact": (8, 0, 0.04), "hifi": (16, 8, 0.02)}
    for preset, (k, s, step) in want.items():
        res = _teacher(prepared_dir, llama_dir, tmp_path / preset, "--preset", preset)
        assert res.exit_code == 0, res.output
        c = open_cache(tmp_path / preset)
        assert (c.k, c.tail_samples, c.params.head_step) == (k, s, step)
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


def test_a_cache_of_the_old_default_resumes_with_tail_samples_0(tmp_path, prepared_dir, llama_dir):
    """The default of before 2026-12-07 cached no draws (its record: the default preset, tail_samples 0). Re-run
    with today's defaults it is refused in one line that says how to resume it, and nothing is deleted; with
    --tail-samples 0 it resumes (here: is complete) unchanged."""
    out = tmp_path / "old"
    assert _teacher(prepared_dir, llama_dir, out, "--tail-samples", 0, "--shard-rows", 200).exit_code == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    one_line_error(_teacher(prepared_dir, llama_dir, out, "--shard-rows", 200),
                   "tail_samples 0 -> 4", "add --tail-samples 0 to resume it")
    res = _teacher(prepared_dir, llama_dir, out, "--shard-rows", 200, "--tail-samples", 0)
    assert res.exit_code == 0 and "already complete" in res.output, res.output
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
