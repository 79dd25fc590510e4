"""The zarr-free chunk reader (`pipeline/cache/chunks.py`) against zarr itself, the independent truth.

    .venv/bin/python -m pytest tests/cache/test_cache_chunks.py -q
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import zarr

from pipeline.cache import layout, open_cache
from pipeline.cache.chunks import EMPTY, ShardArray, open_array
from pipeline.cache.schema import CodecParams, stored_arrays
from pipeline.cache.writer import write_shard
from pipeline.errors import CorruptionError

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def test_every_array_of_a_real_cache_reads_as_zarr_reads_it(llama_cache):
    """Every stored array (tail samples included) of every shard, over ranges inside one chunk, across
    chunk boundaries, to the shard's end and empty, is what zarr returns."""
    c = open_cache(llama_cache)
    rng = np.random.default_rng(0)
    for i, s in enumerate(c.shards):
        n = s["row_stop"] - s["row_start"]
        g = c._group(i)
        z = zarr.open_group(str(layout.shard_dir(llama_cache, i)), mode="r")
        assert set(g) == {a.name for a in stored_arrays(c.params)}
        for name, arr in g.items():
            assert isinstance(arr, ShardArray), name  # the fast path, not the zarr fallback
            cuts = sorted(rng.integers(0, n + 1, size=6).tolist()) + [0, n]
            for a, b in [(0, n), (cuts[0], cuts[-3]), (n - 1, n), (3, 3)] + list(zip(cuts[:-1], cuts[1:])):
                a, b = min(a, b), max(a, b)
                got, want = arr[a:b], z[name][a:b]
                assert got.dtype == want.dtype and got.shape == want.shape
                assert np.array_equal(got, want), (i, name, a, b)


def test_many_chunks_and_a_chunk_that_was_never_stored(tmp_path):
    """A shard of several chunks where one chunk of one array is all zeros: zarr does not store such a
    chunk (index entry 2^64 - 1); the reader gives zeros, as zarr does."""
    params = CodecParams(top_k=4, vocab_size=1000, temperatures=(0.5, 2.0))
    rng = np.random.default_rng(1)
    n, chunk = 1000, 128
    arrays = {s.name: rng.integers(1, 200, size=(n,) + s.row_shape(params)).astype(s.dtype(params))
              for s in stored_arrays(params)}
    arrays["tail_mass"][256:384] = 0  # exactly chunk 2
    write_shard(tmp_path, 0, arrays, {"targets_sha256": ""}, params, chunk)
    d = layout.shard_dir(tmp_path, 0)
    arr = open_array(d / "tail_mass", np.dtype(np.uint16), ())
    assert arr is not None and int(arr.index[2, 0]) == EMPTY and int(arr.index[1, 0]) != EMPTY
    for name, want in arrays.items():
        spec = next(s for s in stored_arrays(params) if s.name == name)
        got = open_array(d / name, spec.dtype(params), spec.row_shape(params))
        assert np.array_equal(got[0:n], want) and np.array_equal(got[250:700], want[250:700]), name
        assert np.array_equal(got[0:n], zarr.open_array(str(d / name), mode="r")[:])


def test_other_layouts_fall_back_to_zarr(tmp_path):
    z = zarr.create_array(str(tmp_path / "plain"), shape=(100, 3), chunks=(10, 3), dtype="uint16", zarr_format=3)
    z[:] = np.arange(300, dtype=np.uint16).reshape(100, 3)
    assert open_array(tmp_path / "plain", np.dtype(np.uint16), (3,)) is None  # not sharded: zarr reads it
    assert open_array(tmp_path / "nowhere", np.dtype(np.uint16), (3,)) is None


@pytest.fixture
def copy(tmp_path, llama_cache):
    out = tmp_path / "cache"
    shutil.copytree(llama_cache, out)
    return out


def shard_file(cache, shard: int, array: str):
    return next(p for p in (layout.shard_dir(cache, shard) / array / "c").rglob("*") if p.is_file())


def test_a_flipped_index_byte_names_the_shard(copy):
    f = shard_file(copy, 1, "head_gaps")
    data = bytearray(f.read_bytes())
    data[-7] ^= 0xFF  # inside the index (the last 4 bytes are its crc32c)
    f.write_bytes(bytes(data))
    c = open_cache(copy)
    with pytest.raises(CorruptionError, match=layout.shard_name(1)):
        c.read(c.shards[1]["row_start"], c.shards[1]["row_start"] + 1)


def test_a_missing_file_of_a_committed_shard_is_an_error_not_zeros(copy):
    """zarr reads a missing shard file as fill values; the commit record says the file exists."""
    shard_file(copy, 2, "tail_entropy").unlink()
    c = open_cache(copy)
    with pytest.raises(CorruptionError, match=f"{layout.shard_name(2)}.*missing"):
        c.read(c.shards[2]["row_start"], c.shards[2]["row_start"] + 1)


def test_layout_check_refuses_a_changed_codec(copy):
    meta_path = layout.shard_dir(copy, 0) / "head_gaps" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["codecs"][0]["configuration"]["codecs"].insert(2, {"name": "transpose", "configuration": {"order": [1, 0]}})
    meta_path.write_text(json.dumps(meta))
    params = open_cache(copy).params
    assert open_array(meta_path.parent, np.dtype(np.uint16), (params.top_k - 1,)) is None


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors through /proc")
def test_reading_every_shard_holds_no_file_open(llama_cache):
    """The reader keeps every shard it has read; holding their files open would exhaust descriptors on a
    cache of thousands of shards."""
    c = open_cache(llama_cache)
    before = len(os.listdir("/proc/self/fd"))
    c.read(0, c.num_rows)
    assert len(c._groups) == len(c.shards) > 5
    assert len(os.listdir("/proc/self/fd")) <= before + 2
