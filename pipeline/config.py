"""Typed stage configs: YAML files, `--set key=value` overrides and command-line options.

Each stage owns one dataclass (e.g. `pipeline.data.prepare.PrepareConfig`) that is the single source of
truth for its settings and validates itself in `__post_init__`. This module turns the three ways a
user can give settings into one instance, in increasing priority:

    dataclass defaults  <  --config FILE.yaml  <  --set key=value  <  explicit command-line options

Unknown keys are an error naming the key, so a typo never silently falls back to a default.
The resolved config is written next to every output (`save_config`), and compared on re-runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

import yaml

from pipeline.errors import KdError

C = TypeVar("C")

CONFIG_FILENAME = "config.yaml"


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file or a non-mapping is a `KdError`."""
    p = Path(path)
    if not p.is_file():
        raise KdError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise KdError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise KdError(f"config file {p} must hold a mapping of keys to values")
    return data


def parse_sets(sets: Sequence[str]) -> dict[str, Any]:
    """Turn `["a=1", "b.c=x"]` into `{"a": 1, "b": {"c": "x"}}`; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in sets:
        if "=" not in item:
            raise KdError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if not key:
            raise KdError(f"--set expects key=value, got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise KdError(f"--set {key}: {part} is both a value and a section")
        node[parts[-1]] = value
    return out


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: values of `over` win; nested mappings merge key by key."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the annotated type `tp`, or raise a `KdError` naming `key`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except KdError as e:
                errors.append(str(e))
        raise KdError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin in (list, tuple, Sequence):
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.split(",")) if v]
        if not isinstance(value, (list, tuple)):
            value = [value]
        inner = args[0] if args else Any
        items = [_coerce(v, inner, key) for v in value]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise KdError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise KdError(f"{key}: expected a section (mapping), got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise KdError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise KdError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else int(value)
            except ValueError:
                pass
        raise KdError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise KdError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise KdError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise KdError(f"{key}: expected a string, got {value!r}")
        return "" if value is None else str(value)
    return value


def from_dict(cls: type[C], data: Mapping[str, Any], prefix: str = "") -> C:
    """Build dataclass `cls` from a mapping; unknown keys and bad values are `KdError`s."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise KdError(f"unknown config key '{prefix}{raw_key}' (known keys: {known})")
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    urls_ok = getattr(cls, "URL_FIELDS", ())
    for key, value in kwargs.items():  # a URL where a local path is expected: refused before anything runs
        if key not in urls_ok:
            from pipeline.storage import refuse_url

            for v in value if isinstance(value, (list, tuple)) else (value,):
                refuse_url(v, f"{prefix}{key}")
    try:
        return cls(**kwargs)
    except KdError:
        raise
    except (TypeError, ValueError) as e:
        raise KdError(f"invalid config: {e}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-YAML-serialisable dict of a config dataclass (tuples become lists)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def resolve(
    cls: type[C],
    config_file: str | Path | None = None,
    sets: Sequence[str] = (),
    options: Mapping[str, Any] | None = None,
    section: str | None = None,
) -> C:
    """Combine defaults, a YAML file, `--set` overrides and explicit options into one `cls`.

    `options` holds command-line values; `None` means "not given" and never overrides.
    `section` picks a sub-mapping of the file (used when a stage reads a `kdcache run` config).
    """
    data: dict[str, Any] = {}
    if config_file:
        data = load_yaml(config_file)
        if section is not None:
            data = data.get(section) or {}
            if not isinstance(data, dict):
                raise KdError(f"config section '{section}' must be a mapping")
    data = merge(data, parse_sets(sets))
    data = merge(data, {k: v for k, v in (options or {}).items() if v is not None})
    return from_dict(cls, data)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically, so a reader never sees half a file)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(p)


def digest(obj: Any) -> str:
    """Stable sha256 of a JSON-able value (configs, identities): used to detect changed settings."""
    text = json.dumps(to_dict(obj) if dataclasses.is_dataclass(obj) else obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def changes(old: Mapping[str, Any], new: Mapping[str, Any], ignore: Sequence[str] = ()) -> list[str]:
    """What differs between two settings mappings, as "key old -> new" (sorted by key).

    Used to say *why* an output is redone or refused ("max_steps 300 -> 12") instead of only that it is.
    """
    keys = sorted((set(old) | set(new)) - set(ignore))
    return [f"{k} {_short(old.get(k))} -> {_short(new.get(k))}" for k in keys if old.get(k) != new.get(k)]


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."
