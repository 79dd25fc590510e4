"""User-facing errors.

A `KdError` is a mistake in the user's input or environment (missing file, mismatched vocabulary,
corrupted shard). Commands print its message as one line and exit non-zero, with no traceback.
Anything else is a bug and keeps its traceback.
"""


class KdError(Exception):
    """An error caused by input, configuration or data; its message is shown as one line."""


class CorruptionError(KdError):
    """Stored data failed a checksum or completeness check; the message names the shard."""
