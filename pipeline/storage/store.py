"""`Store`: one directory of an fsspec file system, addressed by relative POSIX names, with retries.

Every call goes through `_call`: a transient failure (a connection reset, a timeout, a 5xx) is retried with
exponential backoff; one that persists, or a refusal (access denied, no such bucket), becomes one `KdError`
line naming the URL, never a traceback or a secret. A missing object is `FileNotFoundError`, for callers
that expect absence.
"""

from __future__ import annotations

import errno
import functools
import re
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

from pipeline.errors import KdError
from pipeline.storage.urls import join, redact, storage_options

R = TypeVar("R")

RETRIES = 5  # tries of one call before it is an error
BACKOFF_S = 0.25  # the first wait; doubled per try (0.25, 0.5, 1, 2 s)


class Store:
    """The directory `url` of an fsspec file system (`options`: its storage options)."""

    def __init__(self, url: str, options: dict[str, Any] | None = None, retries: int = RETRIES,
                 backoff: float = BACKOFF_S):
        from fsspec.core import url_to_fs

        self.url = str(url).rstrip("/")
        self.retries, self.backoff = retries, backoff
        opts = dict(options if options is not None else storage_options())
        if self.url.startswith("file://"):  # object stores have no directories; a local file system needs them made
            opts.setdefault("auto_mkdir", True)
        try:
            self.fs, self.root = url_to_fs(self.url, **opts)
        except ImportError as e:  # s3fs, gcsfs, adlfs: the protocol's package
            raise KdError(f"{self.url}: this URL needs a package that is not installed ({e}); "
                          "pip install s3fs (s3://), gcsfs (gs://) or adlfs (az://)") from None
        except (TypeError, ValueError) as e:
            raise KdError(redact(f"{self.url}: bad storage options ({e})")) from None
        self.root = self.root.rstrip("/")
        self.calls = 0  # requests made (benchmarks and tests count them)

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    def uri(self, rel: str = "") -> str:
        """The URL of `rel` (for messages)."""
        return join(self.url, rel)

    def _path(self, rel: str) -> str:
        return join(self.root, rel) if rel else self.root

    def _call(self, what: str, fn: Callable[[], R]) -> R:
        """`fn()`, retried on transient errors; `what` names the object for the error line."""
        wait = self.backoff
        for attempt in range(self.retries):
            self.calls += 1
            try:
                return fn()
            except (FileNotFoundError, FileExistsError, KdError):
                raise
            except PermissionError as e:
                raise KdError(redact(f"{self.uri(what)}: access denied ({_first_line(e)}); check the storage "
                                     "credentials (environment, provider config, --storage-option)")) from None
            except Exception as e:  # connection errors come as OSError, botocore or aiohttp exceptions
                if not transient(e):  # bad options, a full disk, a refused request: trying again changes nothing
                    raise KdError(redact(f"{self.uri(what)}: {_first_line(e)}")) from None
                if attempt + 1 == self.retries:
                    raise KdError(redact(f"{self.uri(what)}: {_first_line(e)} (after {self.retries} tries); "
                                         "re-run the same command once the store is reachable "
                                         "(committed work is kept)")) from None
                time.sleep(wait)
                wait *= 2
        raise AssertionError("unreachable")

    # ---- reading -----------------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        """Does the object exist now? (Not from a listing cached earlier: another machine may have written it.)"""
        def exists() -> bool:
            self.fs.invalidate_cache(self._path(rel))
            return self.fs.exists(self._path(rel))

        return self._call(rel, exists)

    def read_bytes(self, rel: str) -> bytes:
        """The object's bytes (`FileNotFoundError` when there is none)."""
        return self._call(rel, lambda: self.fs.cat_file(self._path(rel)))

    def get_file(self, rel: str, local: Path) -> None:
        """Download `rel` to the local file `local` (its directory must exist)."""
        self._call(rel, lambda: self.fs.get_file(self._path(rel), str(local)))

    def sizes(self, rel: str = "") -> dict[str, int]:
        """{relative name: size} of every object under `rel` (recursively); {} when there is none."""
        base = self._path(rel)

        def find() -> dict[str, Any]:
            self.fs.invalidate_cache()  # a listing must see what other machines wrote since the last one
            return self.fs.find(base, detail=True)

        found = self._call(rel or ".", find)
        prefix = self.root + "/"
        out = {}
        for path, info in found.items():
            path = path.rstrip("/")
            if info.get("type") == "directory":
                continue
            name = path[len(prefix):] if path.startswith(prefix) else path.split(self.root, 1)[-1].lstrip("/")
            out[name] = int(info.get("size") or 0)
        return out

    def listdir(self, rel: str = "") -> list[str]:
        """Names directly under `rel` (objects and prefixes), sorted; [] when there is none."""
        base = self._path(rel)

        def ls() -> list[str]:
            self.fs.invalidate_cache(base)
            try:
                return self.fs.ls(base, detail=False)
            except FileNotFoundError:
                return []

        return sorted({p.rstrip("/").rsplit("/", 1)[-1] for p in self._call(rel or ".", ls)})

    # ---- writing -----------------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes, create: bool = False) -> None:
        """One single-object write: readers see the whole object or none (S3, GCS and Azure PUT semantics).
        `create`: only if there is no such object yet (`FileExistsError` otherwise; atomic where the store
        has conditional writes, as S3 and GCS do)."""
        mode = "create" if create else "overwrite"
        self._writing(rel, lambda: self.fs.pipe_file(self._path(rel), data, mode=mode))

    def put_file(self, local: Path, rel: str) -> None:
        """Upload the local file `local` as `rel`."""
        self._writing(rel, lambda: self.fs.put_file(str(local), self._path(rel)))

    def _writing(self, rel: str, fn: Callable[[], Any]) -> None:
        try:
            self._call(rel, fn)
        except FileNotFoundError:  # s3fs: the bucket (gcsfs, adlfs: the bucket or container) does not exist
            raise KdError(f"{self.uri(rel)}: cannot write, the bucket or container does not exist (create it, or "
                          "check the URL)") from None

    def delete(self, rels: list[str]) -> None:
        """Delete these objects (missing ones are fine)."""
        for rel in rels:
            def rm(rel: str = rel) -> None:
                try:
                    self.fs.rm_file(self._path(rel))
                except FileNotFoundError:
                    pass

            self._call(rel, rm)


# Errors a retry can cure: connections dropped or refused, timeouts, throttling, the service's 5xx answers.
_TRANSIENT_NAMES = re.compile(r"Connect|Timeout|Disconnect|Throttl|SlowDown|ServiceUnavailable|InternalError|"
                              r"RequestTimeTooSkewed|IncompleteRead|ResponseStreamingError|ClientPayloadError")


def transient(e: BaseException) -> bool:
    """Is `e` an error that trying again may cure?"""
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    for x in (e, e.__cause__, e.__context__):
        if x is None:
            continue
        if _TRANSIENT_NAMES.search(type(x).__name__) or _TRANSIENT_NAMES.search(str(x)[:300]):
            return True
        status = getattr(x, "status", None) or getattr(x, "code", None)
        if isinstance(status, int) and (status >= 500 or status == 429):
            return True
        if isinstance(x, OSError) and x.errno in (errno.ECONNRESET, errno.ECONNREFUSED, errno.ETIMEDOUT,
                                                   errno.EPIPE, errno.EHOSTUNREACH, errno.ENETUNREACH):
            return True
    return False


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


@functools.lru_cache(maxsize=64)
def _cached(url: str, options_key: str) -> Store:
    import json

    return Store(url, json.loads(options_key))


def store_for(url: str) -> Store:
    """The process's `Store` for `url` with the current storage options (one per URL and options)."""
    import json

    return _cached(str(url).rstrip("/"), json.dumps(storage_options(), sort_keys=True, default=str))
