"""URLs and storage options: what is a URL, which options reach fsspec, and keeping secrets out of text."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterable

from pipeline.errors import KdError

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
ENV_OPTIONS = "KDCACHE_STORAGE_OPTIONS"  # a JSON object of storage options, e.g. {"endpoint_url": "..."}
# Option names whose values are secrets: never shown (`redact` replaces their values in any text).
_SECRET_KEYS = re.compile(r"(secret|token|password|passwd|key|credential|sas|signature|connection_string)", re.I)

_options: dict[str, Any] = {}
_OWN_ENV = os.environ.get(ENV_OPTIONS)  # the process's own, before any `configure`


def protocol(path: str | Path | None) -> str | None:
    """The fsspec protocol of `path` ("s3" for s3://b/k), or None for a local path (or a hub id)."""
    if path is None or isinstance(path, Path):
        return None
    m = _SCHEME.match(str(path))
    if not m:
        return None
    import fsspec

    proto = m.group(1).lower()
    return proto if proto in fsspec.available_protocols() else None


def is_url(path: str | Path | None) -> bool:
    """Is `path` an fsspec URL (s3://, gs://, az://, memory://, file://, ...) rather than a local path?"""
    return protocol(path) is not None


def join(url: str, *parts: str) -> str:
    """`url` / part / ... with single slashes."""
    out = str(url).rstrip("/")
    for p in parts:
        if p:
            out += "/" + str(p).strip("/")
    return out


def parse_storage_options(items: Iterable[str]) -> dict[str, Any]:
    """`["endpoint_url=http://127.0.0.1:9000", "anon=true"]` -> options. Values stay strings (a key or secret
    is never reinterpreted: `0x1F`, `123456` and `abc #x` are kept as typed), except true/false, which the
    providers' flags need; a dotted key nests: `client_kwargs.region_name=eu-west-1`."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:  # the item is not echoed: it may be a secret typed with the wrong separator
            raise KdError("--storage-option expects KEY=VALUE (an item without '=' was given)")
        key, raw = item.split("=", 1)
        value: Any = {"true": True, "false": False}.get(raw.strip().lower(), raw)
        node = out
        parts = key.strip().split(".")
        if not all(parts):
            raise KdError(f"--storage-option {key.strip()!r}: an empty part in the key")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise KdError(f"--storage-option {key.strip()!r}: {part!r} was given a value, it cannot hold keys")
        if isinstance(node.get(parts[-1]), dict):
            raise KdError(f"--storage-option {key.strip()!r}: it holds keys, it cannot be given a value")
        node[parts[-1]] = value
    return out


def use_job_options(options: dict[str, Any] | None) -> None:
    """In a worker process that runs many launches' jobs (a shared Dask cluster): this job's options over the
    worker's own environment, and nothing left from an earlier job's."""
    if _OWN_ENV is None:
        os.environ.pop(ENV_OPTIONS, None)
    else:
        os.environ[ENV_OPTIONS] = _OWN_ENV
    configure(options or None)


def configure(options: dict[str, Any] | None) -> None:
    """Set this process's storage options (merged over KDCACHE_STORAGE_OPTIONS); None or {} keeps the
    environment's alone. The commands call it with their `--storage-option`s."""
    _options.clear()
    _options.update(options or {})
    if options:  # worker processes this one starts (a local Dask cluster, torchrun) read the same options
        os.environ[ENV_OPTIONS] = json.dumps(storage_options())


def storage_options() -> dict[str, Any]:
    """The options every `Store` of this process is opened with: KDCACHE_STORAGE_OPTIONS, then `configure`'s."""
    env = os.environ.get(ENV_OPTIONS, "").strip()
    base: dict[str, Any] = {}
    if env:
        try:
            base = json.loads(env)
        except json.JSONDecodeError:
            raise KdError(f"{ENV_OPTIONS} must hold a JSON object of storage options") from None
        if not isinstance(base, dict):
            raise KdError(f"{ENV_OPTIONS} must hold a JSON object of storage options")
    return {**base, **_options}


def _secrets(options: dict[str, Any]) -> list[str]:
    out = []
    for k, v in options.items():
        if isinstance(v, dict):
            out += _secrets(v)
        elif _SECRET_KEYS.search(str(k)) and v is not None and not isinstance(v, bool) and len(str(v)) >= 4:
            out.append(str(v))
    return out


def redact(text: str) -> str:
    """`text` with every secret storage option's value (and the provider's key variables) replaced by ***."""
    secrets = _secrets(storage_options())
    secrets += [v for k, v in os.environ.items() if _SECRET_KEYS.search(k) and len(v) >= 8
                and k.startswith(("AWS_", "GOOGLE_", "AZURE_", "GCS_", "S3_"))]
    for s in sorted(set(secrets), key=len, reverse=True):
        text = text.replace(s, "***")
    return text


def refuse_url(value: Any, what: str) -> None:
    """A `KdError` when `value` is a URL where only a local path works (`what`: "prepare --out")."""
    if isinstance(value, str) and is_url(value):
        raise KdError(f"{what} {value}: object-store URLs are read and written only for prepared data, "
                      "teacher caches, training runs, evaluations, reports and exports (--out of every stage and "
                      "`kdcache run`'s out, --data and --cache, a run at a URL as --model of eval and teacher or "
                      "as `train --student`); this field needs a local path")
