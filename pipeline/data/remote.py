"""Prepared data on an object store: uploaded by `prepare --out URL`, read through a checked local copy.

A teacher's Dask workers on other machines, or students anywhere, read the prepared data the launcher names;
on a cluster without a shared file system that is a URL. Prepared data is small beside its cache (the token
ids and loss mask: ~5 bytes per token against ~20-50 for the cache), so it is copied whole:

    local = local_prepared("s3://bucket/prep")   # ~/.cache/kdcache/remote/prepared/<key>/, a prepared directory

What a URL holds is a prepared directory's files, uploaded with the marker (`kdcache_prepare.json`) last and
the output's manifest (`.kdcache/manifest.json`: every file's size and sha256) before it, so a URL without the
marker is an unfinished upload. A copy is downloaded under a temporary name, every file checked against the
manifest's sha256, and renamed into place whole; it is keyed by the URL and the bytes of the marker and
manifest, so data prepared again under the same URL is downloaded again. Processes on one machine share a copy
(an `flock` per copy: one downloads, the others wait and use it).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path, PurePosixPath
from typing import Any

from pipeline.errors import CorruptionError, KdError
from pipeline.identity import file_sha256
from pipeline.ownership import MANIFEST_FILENAME, STATE_DIR
from pipeline.storage import Store, store_for
from pipeline.storage.staging import default_root, local_copy

MANIFEST = f"{STATE_DIR}/{MANIFEST_FILENAME}"
# What `prepare` writes (a `datasets` directory, its record and config, the manifest): nothing else is its own.
_OURS = re.compile(r"data-\d{5}-of-\d{5}\.arrow|dataset_info\.json|state\.json|config\.yaml|kdcache_prepare\.json|"
                   + re.escape(MANIFEST))


def is_ours(rel: str) -> bool:
    """Is `rel` (a name under a prepared-data URL) one `kdcache prepare` writes?"""
    return bool(_OURS.fullmatch(rel))


def local_prepared(url: str, marker: str) -> Path:
    """The local, checked copy of the prepared data at `url` (downloaded if this machine has none yet).
    `marker`: the prepared directory's record file name (its presence means the data is complete)."""
    store = store_for(url)
    try:
        record = store.read_bytes(marker)
    except FileNotFoundError:
        raise KdError(f"prepared data not found: {url} (run `kdcache prepare --out {url}` first)") from None
    try:
        manifest_raw = store.read_bytes(MANIFEST)
        files = {rel: r["sha256"] for rel, r in json.loads(manifest_raw)["files"].items()}
    except FileNotFoundError:
        raise KdError(f"{url}: no {MANIFEST}: not data `kdcache prepare` uploaded") from None
    except (ValueError, KeyError, TypeError, AttributeError):
        raise CorruptionError(f"{url}: its {MANIFEST} is damaged") from None
    if marker not in files:
        raise CorruptionError(f"{url}: its {MANIFEST} does not list {marker}")
    key = hashlib.sha256(store.url.encode() + b"\0" + record + b"\0" + manifest_raw).hexdigest()[:16]
    return local_copy(default_root() / "prepared", key, lambda d: (d / marker).is_file(),
                      lambda tmp: _download(store, files, record, marker, tmp))


def _download(store: Store, files: dict[str, str], record: bytes, marker: str, tmp: Path) -> None:
    """Every file the manifest lists into `tmp`, each checked against its sha256 on arrival."""
    for rel, digest in sorted(files.items()):
        parts = PurePosixPath(rel).parts
        if not parts or rel.startswith("/") or ".." in parts:
            raise CorruptionError(f"{store.url}: its {MANIFEST} names a file outside the data ({rel!r})")
        dst = tmp / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if rel == marker:
            dst.write_bytes(record)  # the one read first: the copy is of that upload
        else:
            try:
                store.get_file(rel, dst)
            except FileNotFoundError:
                raise CorruptionError(f"{store.uri(rel)} is missing (the data's manifest lists it); "
                                      "prepare the data again") from None
        if file_sha256(dst) != digest:
            raise CorruptionError(f"{store.uri(rel)}: checksum mismatch on arrival (the stored copy is damaged "
                                  "or was replaced meanwhile); not used")


def foreign(store: Store) -> list[str]:
    """Objects under a prepared-data URL that `kdcache prepare` did not write (sorted)."""
    return sorted(rel for rel in store.sizes() if not is_ours(rel))


def upload_dataset_dir(local: Path, store: Store, marker: str, ours: Any = is_ours) -> None:
    """Replace what an earlier upload put at `store` with the local directory `local` (a `save_to_disk` directory
    with its record `marker` and its manifest: prepared data, or an export, whose names `ours(rel)` tells): the
    old marker deleted first, the other files and the manifest uploaded, the marker last."""
    old = sorted(rel for rel in store.sizes() if ours(rel))
    store.delete(sorted(old, key=lambda rel: rel != marker))  # the marker first: never a half-replaced set
    manifest = json.loads((local / MANIFEST).read_text())
    names = sorted(manifest["files"], key=lambda rel: (rel == marker, rel))
    for rel in names[:-1]:
        store.put_file(local / rel, rel)
    store.put_file(local / MANIFEST, MANIFEST)
    store.put_file(local / names[-1], names[-1])


def read_record(store: Store, marker: str) -> dict[str, Any] | None:
    """The prepared data's record at the URL (None when there is none: nothing or an unfinished upload)."""
    try:
        return json.loads(store.read_bytes(marker))
    except FileNotFoundError:
        return None
    except ValueError:
        raise CorruptionError(f"{store.uri(marker)} is damaged") from None
