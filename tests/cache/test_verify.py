"""Every file of a cache is checked: kdcache.json, index.parquet and config.yaml against kdcache.sha256 (every
open checks the first two), `inspect --verify` reads everything and names any file it does not know, and a
damaged or truncated file is one line naming it in every command that reads the cache.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/cache/test_verify.py -q
"""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from pipeline.cache import layout as fmt
from pipeline.cache import open_cache
from pipeline.errors import CorruptionError
from stages.cli import main

pytestmark = pytest.mark.usefixtures("torch_one_thread")

STUDENT = {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
           "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 128,
           "tie_word_embeddings": True}


@pytest.fixture
def cache(tmp_path, llama_cache):
    out = tmp_path / "cache"
    shutil.copytree(llama_cache, out)
    return out


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def bad_lines(res) -> list[str]:
    return [ln[ln.index("BAD ") + 4:] for ln in res.output.splitlines() if "BAD " in ln]


def truncate(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def edit_meta(cache) -> None:
    """A value changed in kdcache.json, the JSON still valid (what a hand edit does)."""
    p = cache / fmt.META_FILENAME
    meta = json.loads(p.read_text())
    meta["num_rows"] += 1
    p.write_text(json.dumps(meta, indent=2))


def make_old(cache) -> None:
    """The cache as a kdcache without kdcache.sha256 wrote it."""
    p = cache / fmt.META_FILENAME
    meta = json.loads(p.read_text())
    meta.pop("checksums")
    p.write_text(json.dumps(meta, indent=2))
    (cache / fmt.CHECKSUMS_FILENAME).unlink()
    shutil.rmtree(cache / fmt.RECORDS_DIR)  # nor had it the stage's manifest


def test_a_planned_cache_has_checksums_that_sha256sum_reads(cache):
    import hashlib

    lines = (cache / fmt.CHECKSUMS_FILENAME).read_text().splitlines()
    sums = {ln.split("  ")[1]: ln.split("  ")[0] for ln in lines}
    assert set(sums) == {fmt.META_FILENAME, fmt.INDEX_FILENAME, fmt.CONFIG_FILENAME}
    for name, digest in sums.items():
        assert hashlib.sha256((cache / name).read_bytes()).hexdigest() == digest, name
    assert json.loads((cache / fmt.META_FILENAME).read_text())["checksums"] == fmt.CHECKSUMS_FILENAME
    assert open_cache(cache).checksummed


@pytest.mark.parametrize("damage, named", [
    (lambda c: truncate(c / fmt.INDEX_FILENAME), fmt.INDEX_FILENAME),
    (edit_meta, fmt.META_FILENAME),
    (lambda c: truncate(c / fmt.META_FILENAME), fmt.META_FILENAME),
    (lambda c: (c / fmt.CONFIG_FILENAME).write_text("top_k: 99\n"), fmt.CONFIG_FILENAME),
    (lambda c: (c / fmt.CHECKSUMS_FILENAME).write_text("not a checksum\n"), fmt.CHECKSUMS_FILENAME),
    (lambda c: (c / fmt.CHECKSUMS_FILENAME).unlink(), fmt.CHECKSUMS_FILENAME),
    (lambda c: (c / fmt.INDEX_FILENAME).unlink(), fmt.INDEX_FILENAME),
])
def test_verify_names_a_damaged_metadata_file(cache, damage, named):
    damage(cache)
    res = invoke("inspect", cache, "--verify")
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    bad = bad_lines(res)
    if bad:
        assert bad[0].startswith(named), res.output
    else:  # metadata that no longer parses: nothing else can be checked, one line names it
        lines = [ln for ln in res.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and str(cache / named) in lines[0] and "damaged" in lines[0], res.output
    assert "verify: all" not in res.output


def test_verify_names_files_the_cache_does_not_know(cache):
    (cache / "notes.txt").write_text("mine")
    (cache / "sub").mkdir()
    (cache / "sub" / "thesis.tex").write_text("mine")
    (cache / fmt.SHARDS_DIR / fmt.shard_name(3) / "extra.bin").write_bytes(b"x")
    (cache / fmt.TMP_DIR).mkdir(exist_ok=True)
    (cache / fmt.TMP_DIR / "scratch.txt").write_text("mine")
    (cache / fmt.TMP_DIR / f"{fmt.shard_name(2)}.abcd1234").mkdir()  # a shard being written: the writer's
    res = invoke("inspect", cache, "--verify")
    assert res.exit_code == 1
    bad = sorted(b.split(":")[0] for b in bad_lines(res))
    assert bad == ["notes.txt", f"shards/{fmt.shard_name(3)}/extra.bin", "sub/thesis.tex", "tmp/scratch.txt"], res.output
    assert "4 bad file(s)" in res.output


def test_verify_sound_cache_says_every_file_is_checked(cache):
    res = invoke("inspect", cache, "--verify")
    assert res.exit_code == 0, res.output
    assert "every file of the cache is its own" in res.output and "no checksums" not in res.output


def test_an_older_cache_without_checksums_still_reads_and_says_so(cache, llama_cache):
    make_old(cache)
    c = open_cache(cache)
    assert not c.checksummed
    assert (c.read(0, 10)["topk_ids"] == open_cache(llama_cache).read(0, 10)["topk_ids"]).all()
    res = invoke("inspect", cache, "--verify")
    assert res.exit_code == 0, res.output
    assert "no checksums" in res.output  # the summary line and the verdict both say what was not checked
    # Its index is still parsed, and a truncated one named.
    truncate(cache / fmt.INDEX_FILENAME)
    res = invoke("inspect", cache, "--verify")
    assert res.exit_code == 1 and bad_lines(res)[0].startswith(fmt.INDEX_FILENAME), res.output
    with pytest.raises(CorruptionError, match=fmt.INDEX_FILENAME):
        open_cache(cache).index


def test_open_refuses_damaged_metadata_naming_the_file(cache):
    truncate(cache / fmt.INDEX_FILENAME)
    with pytest.raises(CorruptionError, match=fmt.INDEX_FILENAME):
        open_cache(cache)


@pytest.mark.parametrize("damage, named", [
    (lambda c: truncate(c / fmt.INDEX_FILENAME), fmt.INDEX_FILENAME),
    (edit_meta, fmt.META_FILENAME),
])
@pytest.mark.parametrize("command", ["train", "export", "eval", "inspect"])
def test_every_command_gives_one_line_naming_the_file(tmp_path, cache, llama_dir, vocab_size, damage, named, command):
    damage(cache)
    student = tmp_path / "student.json"
    student.write_text(json.dumps({**STUDENT, "vocab_size": vocab_size}))
    out = tmp_path / "out"
    args = {"train": ["train", "--cache", cache, "--student-config", student, "--out", out, "--max-steps", 1,
                      "--device", "cpu"],
            "export": ["export", cache, "--format", "axolotl", "--out", out],
            "eval": ["eval", "--model", llama_dir, "--cache", cache, "--out", out, "--device", "cpu"],
            "inspect": ["inspect", cache]}[command]
    res = invoke(*args)
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"kdcache {command}: error: "), res.output
    assert str(cache / named) in lines[0], lines[0]
    assert not out.exists() or not any(p for p in out.rglob("*") if p.is_file() and ".kdcache" not in p.parts)


def test_verify_checks_the_stages_manifest(cache):
    man = cache / ".kdcache" / "manifest.json"
    assert man.is_file()
    man.write_text("{")
    res = invoke("inspect", cache, "--verify")
    assert res.exit_code == 1 and any(b.startswith(".kdcache/manifest.json: ") for b in bad_lines(res)), res.output
