"""A remote shard's one object (`pipeline.cache.packing`): the same bytes for the same shard, a Zarr store in its
own right (zarr's ZipStore reads it without kdcache), and every way its contents can disagree with the commit
record refused with the shard's name."""

from __future__ import annotations

import io
import os
import shutil
import zipfile

import numpy as np
import pytest

from pipeline.cache import layout, packing
from pipeline.errors import CorruptionError
from tests.storage.packed import flip_member_byte


@pytest.fixture
def shard(llama_cache, tmp_path):
    """A copy of a committed local shard, and its commit record's file digests."""
    d = tmp_path / "shard"
    shutil.copytree(layout.shard_dir(llama_cache, 1), d)
    return d, layout.read_commit(llama_cache, 1)["files"]


def test_the_same_shard_packs_to_the_same_bytes(shard, tmp_path):
    d, files = shard
    a = tmp_path / "a.zip"
    packing.pack(d, list(files), a)
    for p in d.rglob("*"):  # other times and modes: what a re-run after a kill, on another machine, sees
        os.utime(p, (1_800_000_000, 1_800_000_000))
        if p.is_file():
            p.chmod(0o600)
    b = tmp_path / "b.zip"
    packing.pack(d, list(reversed(list(files))), b)
    assert a.read_bytes() == b.read_bytes()
    with zipfile.ZipFile(a) as z:
        assert z.namelist() == sorted(files) and all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())


def test_the_zip_is_a_zarr_store_without_kdcache(shard, tmp_path):
    import zarr
    from zarr.storage import ZipStore

    d, files = shard
    packing.pack(d, list(files), tmp_path / "s.zip")
    group = zarr.open_group(ZipStore(tmp_path / "s.zip", mode="r"), mode="r")
    for name in ("topk_ids", "head_gaps", "tail_mass", "target_code"):
        np.testing.assert_array_equal(group[name][...], zarr.open_array(str(d / name), mode="r")[...])


def test_unpack_checks_every_member_against_the_record(shard, tmp_path):
    d, files = shard
    z = tmp_path / "s.zip"
    packing.pack(d, list(files), z)
    out = tmp_path / "out"
    assert packing.unpack(z, files, out, "shard_00001", "memory://c") == sum(
        (d / rel).stat().st_size for rel in files)
    assert {rel: (out / rel).read_bytes() for rel in files} == {rel: (d / rel).read_bytes() for rel in files}

    def refused(data: bytes, digests=files) -> str:
        bad = tmp_path / "bad.zip"
        bad.write_bytes(data)
        target = tmp_path / f"x{len(list(tmp_path.iterdir()))}"
        with pytest.raises(CorruptionError) as e:
            packing.unpack(bad, digests, target, "shard_00001", "memory://c")
        assert str(e.value).startswith("shard_00001: ") and "\n" not in str(e.value)
        return str(e.value)

    member = next(rel for rel in sorted(files) if rel.startswith("head_gaps/c/"))
    # A flipped bit (zip's CRC-32 catches it first) and a member rewritten whole with a valid CRC (sha256 does).
    assert f"file {member} checksum mismatch" in refused(flip_member_byte(z.read_bytes(), member))
    (d / member).write_bytes(b"\0" + (d / member).read_bytes()[1:])
    packing.pack(d, list(files), tmp_path / "other.zip")
    assert f"file {member} checksum mismatch" in refused((tmp_path / "other.zip").read_bytes())
    # A member the record does not list, a listed file the zip lacks, a truncated zip.
    assert "does not list" in refused(z.read_bytes(), {k: v for k, v in files.items() if k != member})
    buf = io.BytesIO()
    with zipfile.ZipFile(z) as src, zipfile.ZipFile(buf, "w") as dst:
        for name in src.namelist():
            if name != member:
                dst.writestr(name, src.read(name))
    assert f"file {member} is missing" in refused(buf.getvalue())
    assert "is damaged" in refused(z.read_bytes()[: z.stat().st_size // 2])


def test_no_flipped_bit_anywhere_in_a_zip_gives_anything_but_the_files_or_one_line(tmp_path):
    """Every bit of a small packed shard flipped in turn (headers, names, central directory, data): unpack writes the
    very files the record lists, or raises a CorruptionError naming the shard, never another exception."""
    import hashlib

    src = tmp_path / "src"
    files = {"zarr.json": b'{"zarr_format": 3}', "a/c/0": bytes(range(40)), "b/zarr.json": b"{}" * 9}
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    digests = {rel: hashlib.sha256(data).hexdigest() for rel, data in files.items()}
    good = tmp_path / "good.zip"
    packing.pack(src, list(files), good)
    raw = good.read_bytes()
    bad = tmp_path / "bad.zip"
    outcomes = {"files": 0, "refused": 0}
    for pos in range(len(raw)):
        for bit in (0x01, 0x80):
            flipped = bytearray(raw)
            flipped[pos] ^= bit
            bad.write_bytes(bytes(flipped))
            out = tmp_path / "out"
            shutil.rmtree(out, ignore_errors=True)
            try:
                packing.unpack(bad, digests, out, "shard_00007", "memory://c")
            except CorruptionError as e:
                assert str(e).startswith("shard_00007: ") and "\n" not in str(e)
                outcomes["refused"] += 1
                continue
            assert {rel: (out / rel).read_bytes() for rel in files} == files, (pos, bit)
            outcomes["files"] += 1
    assert outcomes["refused"] > len(raw)  # most flips are caught; the rest (times, attributes) change no file
