"""User-facing errors.

A `KdError` is a mistake in the user's input or environment (missing file, mismatched vocabulary,
corrupted shard). Commands print its message as one line and exit non-zero, with no traceback.
Anything else is a bug and keeps its traceback.
"""

from typing import Any


class KdError(Exception):
    """An error caused by input, configuration or data; its message is shown as one line."""


class CorruptionError(KdError):
    """Stored data failed a checksum or completeness check; the message names the shard."""


class Change(str):
    """One setting that differs between a stored artifact and the requested one: the text users read
    ("top_k 8 -> 6"), with `key`, `old` and `new` for code that decides on it (never on the text)."""

    key: str
    old: Any
    new: Any

    def __new__(cls, key: str, old: Any = None, new: Any = None, text: str | None = None) -> "Change":
        self = super().__new__(cls, text if text is not None else f"{key} {old!r} -> {new!r}")
        self.key, self.old, self.new = key, old, new
        return self

    def __getnewargs__(self) -> tuple[Any, ...]:  # pickled whole (an error crossing a process boundary)
        return self.key, self.old, self.new, str(self)


class StaleOutput(KdError):
    """An output directory holds an artifact made with other settings; `changes` names what differs
    ("max_length 128 -> 64"), so a caller such as `kdcache run` can say why it redoes the work."""

    def __init__(self, message: str, changes: list[str]):  # `Change`s where the caller decides on them
        super().__init__(message)
        self.changes = changes

    def __reduce__(self) -> tuple[Any, ...]:  # pickled with its changes (a Dask worker's error reaches the launcher)
        return type(self), (str(self), self.changes)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with what was kept and how to continue; commands print its message as one line.

    A KeyboardInterrupt, so code that is not a command still stops on it as on any interrupt.
    """
