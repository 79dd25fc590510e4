"""`kdcache inspect CACHE [--verify]` and the reader's integrity errors, which must name the shard.

    .venv/bin/python -m pytest tests/cache/test_inspect.py -q
"""

from __future__ import annotations

import re
import shutil

import pytest
from click.testing import CliRunner

from pipeline.cache import layout as fmt
from pipeline.cache import open_cache
from pipeline.errors import CorruptionError, KdError
from stages.cli import main

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture
def cache(tmp_path, llama_cache):
    out = tmp_path / "cache"
    shutil.copytree(llama_cache, out)
    return out


def inspect(*args):
    return CliRunner().invoke(main, ["inspect", *[str(a) for a in args]])


def flip_byte(path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    i = int(len(data) * at)
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def chunk_file(cache, shard: int, array: str):
    files = [p for p in (cache / fmt.SHARDS_DIR / fmt.shard_name(shard) / array / "c").rglob("*") if p.is_file()]
    assert files
    return max(files, key=lambda p: p.stat().st_size)


def test_summary_shows_bytes_per_row_and_per_array(cache):
    res = inspect(cache)
    assert res.exit_code == 0, res.output
    c = open_cache(cache)
    m = re.search(r"size\s+([\d,]+) bytes = ([\d.]+) bytes/row", res.output)
    assert m, res.output
    assert int(m.group(1).replace(",", "")) == c.bytes_on_disk()
    assert abs(float(m.group(2)) - c.bytes_on_disk() / c.num_rows) < 0.006
    # per array: what each array's files take on disk (from the commit records), summing to the shards' bytes
    per = dict(re.findall(r"(\w+) ([\d.]+)", res.output.split("per array")[1].splitlines()[0]))
    assert set(per) == {"topk_ids", "head_gaps", "tail_mass", "tail_entropy", "tail_shape", "target_code",
                        "tail_ids", "tail_counts", "tail_shares"}
    on_disk = {name: sum(f.stat().st_size for d in (cache / fmt.SHARDS_DIR).iterdir() for f in (d / name).rglob("*")
                         if f.is_file()) / c.num_rows for name in per}
    for name, v in per.items():
        assert abs(float(v) - on_disk[name]) < 0.006, (name, v, on_disk[name])
    assert f"{len(c.shards)}/{len(c.shards)} committed" in res.output
    assert "entropy" in res.output and "top-K mass" in res.output and "kdcache-3" in res.output


def test_verify_sound_cache(cache):
    res = inspect(cache, "--verify")
    assert res.exit_code == 0, res.output
    assert "verify: all" in res.output


@pytest.mark.parametrize("array", ["head_gaps", "tail_mass", "tail_shape", "tail_ids", "tail_shares"])
def test_verify_flipped_byte_names_the_shard(cache, array):
    flip_byte(chunk_file(cache, 2, array))
    res = inspect(cache, "--verify")
    assert res.exit_code != 0
    bad = [ln[ln.index("BAD"):] for ln in res.output.splitlines() if "BAD " in ln]
    assert len(bad) == 1 and fmt.shard_name(2) in bad[0] and array in bad[0], res.output
    assert "Traceback" not in res.output


def test_reader_crc_error_names_the_shard(cache):
    """Without --verify's file hashes, the per-chunk crc32c still catches the flip on read."""
    flip_byte(chunk_file(cache, 1, "topk_ids"))
    c = open_cache(cache)
    s = c.shards[1]
    c.read(0, s["row_start"])  # rows before the shard still read
    with pytest.raises(CorruptionError, match=fmt.shard_name(1)):
        c.read(s["row_start"], s["row_start"] + 1)


def test_verify_missing_shard_and_file(cache):
    shutil.rmtree(cache / fmt.SHARDS_DIR / fmt.shard_name(4))
    chunk_file(cache, 6, "tail_entropy").unlink()
    res = inspect(cache, "--verify")
    assert res.exit_code != 0
    bad = [ln[ln.index("BAD"):] for ln in res.output.splitlines() if "BAD " in ln]
    assert any(fmt.shard_name(4) in ln and "not committed" in ln for ln in bad), res.output
    assert any(fmt.shard_name(6) in ln and "missing" in ln for ln in bad), res.output
    assert "2 bad shard(s)" in res.output
    c = open_cache(cache)
    with pytest.raises(KdError, match=fmt.shard_name(4)):
        c.read(c.shards[4]["row_start"], c.shards[4]["row_start"] + 1)


def test_inspect_not_a_cache(tmp_path):
    res = inspect(tmp_path / "nothing")
    assert res.exit_code == 1 and "cache not found" in res.output and "Traceback" not in res.output
    (tmp_path / "d").mkdir()
    res = inspect(tmp_path / "d")
    assert res.exit_code == 1 and "kdcache.json" in res.output


@pytest.mark.slow
def test_compression_never_loses_on_20k_rows(tmp_path, prepared_dir):
    """Bytes on disk per row <= the arrays' raw bytes per row at V = 32000, on 20k+ rows (so the fixed
    metadata does not dominate). The teacher is random-init with its head scaled x8: its top-K ids are
    spread uniformly over the vocabulary, the worst case for compression (bench/fidelity.py measures a
    teacher trained on real text)."""
    import json

    import numpy as np

    from conftest import save_tiny_model
    from pipeline.cache.schema import stored_arrays
    from pipeline.data.prepare import META_FILENAME, write_prepared

    v, n_seq, length = 32000, 160, 128  # the fixture models take 128 positions
    rng = np.random.default_rng(0)
    ids = rng.integers(0, v, (n_seq, length)).tolist()
    meta = json.loads((prepared_dir / META_FILENAME).read_text())
    meta["tokenizer"] = {"name": "synthetic", "vocab_size": v, "vocab_sha256": "synthetic"}
    meta["fingerprint"] = "synthetic-size-test"
    write_prepared(tmp_path / "prep", ids, [[0] + [1] * (length - 1)] * n_seq, meta)
    model = save_tiny_model("llama", v, tmp_path / "model")
    res = CliRunner().invoke(main, ["teacher", "--data", str(tmp_path / "prep"), "--model", str(model),
                                    "--out", str(tmp_path / "cache"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    c = open_cache(tmp_path / "cache")
    assert c.num_rows >= 20000
    raw = sum(s.dtype(c.params).itemsize * int(np.prod(s.row_shape(c.params), dtype=np.int64))
              for s in stored_arrays(c.params))
    assert c.bytes_on_disk() / c.num_rows <= raw


def test_format_2_cache_is_refused_with_one_line(cache):
    meta = (cache / fmt.META_FILENAME)
    import json

    d = json.loads(meta.read_text())
    d["format_version"] = 2
    meta.write_text(json.dumps(d))
    res = inspect(cache)
    assert res.exit_code == 1 and "Traceback" not in res.output
    err = [ln for ln in res.output.splitlines() if "error:" in ln]
    assert len(err) == 1 and "format-2 cache" in err[0] and "re-run `kdcache teacher`" in err[0]


def test_cache_pickles_for_spawned_workers(cache, prepared_dir):
    import pickle

    import numpy as np

    c = open_cache(cache, data=str(prepared_dir))
    before = c.read(10, 50)
    again = pickle.loads(pickle.dumps(c))
    after = again.read(10, 50)
    assert set(before) == set(after) and all(np.array_equal(before[k], after[k]) for k in before)
