"""Reading and damaging a remote shard's `shard.zip` the way an outsider would: with the standard library's
zipfile and the store's raw bytes, not through kdcache's own unpacking (what the tests check)."""

from __future__ import annotations

import hashlib
import io
import struct
import zipfile
from pathlib import Path

from pipeline.cache import layout
from pipeline.identity import file_sha256
from pipeline.storage import store_for


def pack_key(i: int) -> str:
    return f"shards/shard_{i:05d}/shard.zip"


def member_sums(data: bytes) -> dict[str, str]:
    """{member: sha256} of a zip's bytes (zipfile checks each member's CRC-32 on the way)."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return {n: hashlib.sha256(z.read(n)).hexdigest() for n in z.namelist()}


def flip_member_byte(data: bytes, member: str, bit: int = 0x40) -> bytes:
    """`data` (a zip) with one bit flipped in the middle of `member`'s stored bytes."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        info = z.getinfo(member)
    off = info.header_offset
    name_len, extra_len = struct.unpack("<HH", data[off + 26: off + 30])  # the local file header's lengths
    start = off + 30 + name_len + extra_len
    out = bytearray(data)
    out[start + info.compress_size // 2] ^= bit
    return bytes(out)


def stored_sums(cache: str | Path) -> dict[str, str]:
    """{shard/file: sha256} over every committed shard, of the bytes stored: a local shard's files, a remote
    shard's zip members; each shard's commit record must list the same digests."""
    out = {}
    for i in layout.committed_shards(cache):
        if isinstance(cache, str):
            stored = member_sums(store_for(cache).read_bytes(pack_key(i)))
        else:
            d = layout.shard_dir(cache, i)
            stored = {p.relative_to(d).as_posix(): file_sha256(p) for p in d.rglob("*")
                      if p.is_file() and p.name != layout.COMMIT_FILENAME}
        assert stored == layout.read_commit(cache, i)["files"], layout.shard_name(i)
        out.update({f"{layout.shard_name(i)}/{rel}": digest for rel, digest in stored.items()})
    return out
