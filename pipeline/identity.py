"""Identities of the things a cache depends on: tokenizer, model weights, prepared data.

Artifacts record these so a later stage can refuse a mismatch (a student tokenizer that differs
from the one the cache was made with, a prepared dataset that changed under a cache) with one line
that names what differs, instead of training on silently misaligned ids.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pipeline.errors import KdError


def tokenizer_identity(tokenizer: Any, name_or_path: str) -> dict[str, Any]:
    """{name, vocab_size, vocab_sha256} of a Hugging Face tokenizer.

    The hash covers every (token, id) pair including added/special tokens, so two tokenizers with
    the same hash map every id to the same string.
    """
    vocab = tokenizer.get_vocab()
    h = hashlib.sha256()
    for tok, idx in sorted(vocab.items(), key=lambda kv: kv[1]):
        h.update(f"{idx}\t{tok}\n".encode("utf-8", "surrogatepass"))
    return {"name": str(name_or_path), "vocab_size": len(vocab), "vocab_sha256": h.hexdigest()}


def same_tokenizer(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """True when two recorded tokenizer identities map ids to the same tokens."""
    return a.get("vocab_sha256") == b.get("vocab_sha256") and a.get("vocab_size") == b.get("vocab_size")


def describe_tokenizer(ident: dict[str, Any]) -> str:
    """'data/demo/tokenizer (512 ids, sha256 3f2a9c01b7de)': how messages name a recorded tokenizer."""
    return f"{ident.get('name')} ({ident.get('vocab_size')} ids, sha256 {str(ident.get('vocab_sha256'))[:12]})"


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of one file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def weights_hash(model_dir: str | Path) -> str | None:
    """sha256 over the weight files of a local model directory (None if it holds none); for a `.gguf` file, the
    file's own sha256 (what `sha256sum model.gguf` prints, so it can be checked against a published digest).

    Hub models are identified by their revision instead; hashing multi-GB shards of a local 70B
    checkpoint takes minutes, which is acceptable once per teacher pass.
    """
    d = Path(model_dir)
    if d.is_file() and d.suffix.lower() == ".gguf":
        return file_sha256(d)
    if not d.is_dir():
        return None
    files = sorted(p for p in d.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth"))
    if not files:
        return None
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        h.update(file_sha256(p).encode())
    return h.hexdigest()


def read_json(path: str | Path, what: str) -> dict[str, Any]:
    """Read a JSON object; a missing or malformed file is a `KdError` naming `what`."""
    p = Path(path)
    if not p.is_file():
        raise KdError(f"{what} not found: {p}")
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KdError(f"{what} is not valid JSON: {p} ({e})") from None
    if not isinstance(data, dict):
        raise KdError(f"{what} must hold a JSON object: {p}")
    return data


def json_text(data: dict[str, Any]) -> str:
    """The text `write_json` writes for `data` (so a caller can hash the bytes before they are written)."""
    return json.dumps(data, indent=2, sort_keys=False, default=str)


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (tmp file + rename), so a kill never leaves half a file."""
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json_text(data))
    tmp.replace(p)
