"""User-facing errors.

A `KdError` is a mistake in the user's input or environment (missing file, mismatched vocabulary,
corrupted shard). Commands print its message as one line and exit non-zero, with no traceback.
Anything else is a bug and keeps its traceback.
"""


class KdError(Exception):
    """An error caused by input, configuration or data; its message is shown as one line."""


class CorruptionError(KdError):
    """Stored data failed a checksum or completeness check; the message names the shard."""


class StaleOutput(KdError):
    """An output directory holds an artifact made with other settings; `changes` names what differs
    ("max_length 128 -> 64"), so a caller such as `kdcache run` can say why it redoes the work."""

    def __init__(self, message: str, changes: list[str]):
        super().__init__(message)
        self.changes = changes


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with what was kept and how to continue; commands print its message as one line.

    A KeyboardInterrupt, so code that is not a command still stops on it as on any interrupt.
    """
