"""A shard as one object: how a cache on an object store holds a shard's files.

On a local disk a shard is a directory of small files (a Zarr v3 group: one `zarr.json` per array and
one Zarr shard file per array, plus the commit record). On an object store every file is a request, and
a request costs milliseconds of latency and of client CPU whatever its size, so a remote shard holds its
files (all but the commit record) in ONE object, `shard.zip`:

    CACHE/shards/shard_00012/shard.zip      the shard's files, uncompressed (ZIP_STORED: the arrays are
                                            compressed already), in sorted order, with fixed timestamps
                                            and modes, so the same shard always packs to the same bytes
    CACHE/shards/shard_00012/_COMMIT.json   the commit record, unchanged (its "files" sha256 are of the
                                            files inside the zip), uploaded after the zip

A zip of a Zarr group is a Zarr store (`zarr.storage.ZipStore` opens it in place, and `unzip` restores
the local layout), so the remote cache stays readable without kdcache; a local directory copied from a store
(`aws s3 sync`) is read by `open_cache` as a store (`file://`), unpacked into its local copy. A reader
downloads the zip in one request and `unpack` writes its members into a directory, each checked against the
record's sha256 as it is written; a member the record does not list, a listed file the zip lacks, or a damaged
zip is a one-line `CorruptionError` naming the shard.
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path, PurePosixPath

from pipeline.errors import CorruptionError

PACK_FILENAME = "shard.zip"
_EPOCH = (1980, 1, 1, 0, 0, 0)  # zip's earliest timestamp: the packed bytes do not depend on when
_MODE = 0o644 << 16  # a regular file, rw-r--r-- (external attributes)


def holds_packed_shards(cache: Path) -> bool:
    """Does the local directory `cache` hold shards as an object store does (a copy made with `aws s3 sync` or
    `gsutil rsync`)? Such a directory is read as a store (`open_cache`), through a local copy."""
    root = Path(cache) / "shards"
    return root.is_dir() and next(root.glob(f"shard_*/{PACK_FILENAME}"), None) is not None


def pack(src: Path, files: list[str], dst: Path) -> int:
    """Write the files `files` (POSIX paths relative to `src`) into the zip `dst`; -> its size in bytes.

    Deterministic: the same files give the same bytes (sorted names, fixed timestamps and modes, no
    compression), so a shard packed again after a kill is the object an uninterrupted run uploads."""
    with zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
        for rel in sorted(files):
            info = zipfile.ZipInfo(rel, date_time=_EPOCH)
            info.external_attr = _MODE
            info.create_system = 3  # unix, whatever packs it
            info.file_size = (src / rel).stat().st_size  # zipfile then adds zip64 fields only where needed
            with open(src / rel, "rb") as f, z.open(info, "w") as out:
                while block := f.read(1 << 20):
                    out.write(block)
    return dst.stat().st_size


# What reading a damaged zip raises (a flipped bit in a header can make zipfile see another version, a
# compression method or encryption, or seek outside the file): all of them mean "the stored bytes are bad".
_READ_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError, NotImplementedError,
                RuntimeError, KeyError)


def unpack(zip_path: Path, digests: dict[str, str], dst: Path, shard: str, where: str) -> int:
    """Write the members of `zip_path` under `dst`, each checked against `digests` (rel -> sha256, the commit
    record's "files") as it is written; -> bytes written. `shard`, `where` name the shard and its URL in errors.
    Whatever is wrong with the zip is a one-line `CorruptionError`; an error writing `dst` is not caught."""
    def damaged(why: object) -> CorruptionError:
        return CorruptionError(f"{shard}: its {PACK_FILENAME} from {where} is damaged ({why}); delete the shard's "
                               "objects and re-run `kdcache teacher` to rewrite it")

    def mismatch(rel: str) -> CorruptionError:
        return CorruptionError(f"{shard}: file {rel} checksum mismatch on arrival from {where}: the stored copy is "
                               "damaged and was not read; delete the shard's objects and re-run `kdcache teacher` "
                               "to rewrite it")

    try:
        z = zipfile.ZipFile(zip_path)
        infos = z.infolist()
    except _READ_ERRORS as e:
        raise damaged(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    with z:
        members = {i.filename: i for i in infos if not i.is_dir()}
        extra = sorted(set(members) - set(digests))
        if extra:
            raise CorruptionError(f"{shard}: its {PACK_FILENAME} in {where} holds {extra[0]!r}, which its commit "
                                  "record does not list; not read")
        missing = sorted(set(digests) - set(members))
        if missing:
            raise CorruptionError(f"{shard}: file {missing[0]} is missing from {where} (its commit record lists "
                                  "it); rebuild the shard with `kdcache teacher`")
        total = 0
        for rel in sorted(members):
            parts = PurePosixPath(rel).parts  # the record's names (the caller checked them too): never outside dst
            if not parts or rel.startswith("/") or ".." in parts or "\\" in rel:
                raise CorruptionError(f"{shard}: its {PACK_FILENAME} names a file outside the shard ({rel!r})")
            info = members[rel]
            if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:  # never written so: a bit flipped
                raise mismatch(rel)
            out = dst / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            h = hashlib.sha256()
            with open(out, "wb") as w:
                try:
                    f = z.open(info)
                except _READ_ERRORS:
                    raise mismatch(rel) from None
                with f:
                    while True:
                        try:
                            block = f.read(1 << 20)  # zip's own CRC-32 check fails on a flipped byte first
                        except _READ_ERRORS:
                            raise mismatch(rel) from None
                        if not block:
                            break
                        h.update(block)
                        w.write(block)
            if h.hexdigest() != digests[rel]:
                raise mismatch(rel)
            total += out.stat().st_size
    return total
