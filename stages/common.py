"""What every command shares: `--config`/`--set`, options whose defaults are the config's, one-line
errors, logging set-up."""

from __future__ import annotations

import dataclasses
import errno
import functools
import logging
import sys
from typing import Any, Callable

import click

from pipeline.errors import Interrupted, KdError


def _storage_options(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> None:
    """`--storage-option key=value`: fsspec options for URL paths, held in this process only (never saved)."""
    if value:
        from pipeline.storage import configure, parse_storage_options

        try:
            configure(parse_storage_options(value))
        except KdError as e:
            raise click.BadParameter(str(e)) from None


def config_options(fn: Callable) -> Callable:
    """Add `--config FILE.yaml`, repeatable `--set key=value` and `--storage-option key=value` to a command."""
    fn = click.option("--storage-option", multiple=True, metavar="KEY=VALUE", expose_value=False,
                      callback=_storage_options,
                      help="fsspec storage option for s3:// / gs:// / az:// paths (repeatable; e.g. endpoint_url=..., "
                           "profile=...); beside the provider's environment and config files and "
                           "$KDCACHE_STORAGE_OPTIONS (JSON). Never saved.")(fn)
    fn = click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                      help="Override one config key (repeatable); beats --config, loses to explicit options.")(fn)
    fn = click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
                      help="YAML file with this command's settings (the keys of its config; see --set).")(fn)
    return fn


def field_default(cls: type, name: str) -> Any:
    """The default of field `name` of config dataclass `cls`."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            raise KeyError(f"{cls.__name__}.{name} has no default")
    raise KeyError(f"{cls.__name__} has no field {name!r}")


def setting(cls: type, *decls: str, field: str | None = None, show: str | None = None, **kw: Any) -> Callable:
    """An option for config field `field` of `cls` (default: named after the option), defaulting to the
    dataclass's default and showing it in --help, so help and behaviour cannot drift apart.

    Only values typed on the command line override --config/--set (`given`), so carrying the real
    default here changes nothing about priority. `show` replaces the shown default where the
    dataclass's is a placeholder ("" for "taken from the cache").
    """
    name = field or next(d for d in decls if d.startswith("--")).split("/")[0].lstrip("-").replace("-", "_")
    default = field_default(cls, name)
    if isinstance(default, (list, tuple)):  # e.g. temperatures: typed as one comma-separated value
        default = ",".join(str(x) for x in default)
    if field:  # the option's value goes to the field, whatever the option is called (`--teacher` -> teachers)
        decls = (*decls, field)
    return click.option(*decls, default=default, show_default=show if show is not None else True, **kw)


def given(opts: dict[str, Any]) -> dict[str, Any]:
    """The options the user typed (not defaults): only these beat --config and --set."""
    ctx = click.get_current_context()
    defaults = (click.core.ParameterSource.DEFAULT, click.core.ParameterSource.DEFAULT_MAP)
    return {k: v for k, v in opts.items() if ctx.get_parameter_source(k) not in defaults}


# Which batch setting to lower when a stage runs out of memory (the settings that bound its peak).
OOM_ADVICE = {
    "teacher": "lower --batch-tokens (padded tokens per forward pass) or --head-chunk-rows (rows of logits at once)",
    "train": "lower --batch-size (sequences per micro-batch) and raise --grad-accum to keep the step, or lower "
             "--set loss_chunk_rows=N (rows of student logits at once)",
    "eval": "lower --batch-size",
    "run": "lower the batch_size of the stage that failed (train_defaults / eval) or the teacher's batch_tokens",
}


def is_out_of_memory(e: BaseException) -> bool:
    """True for an allocator failure: CUDA's OutOfMemoryError, CPU's "can't allocate memory", MemoryError."""
    import torch

    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(e)
    return "out of memory" in text or "can't allocate memory" in text or "not enough memory" in text


def out_of_memory_where(e: BaseException) -> str:
    """A short description of the failed allocation (the first line of the allocator's message)."""
    first = (str(e).splitlines() or [type(e).__name__])[0].strip()
    return first[:160] if first else type(e).__name__


def user_errors(name: str) -> Callable:
    """Turn user errors into one line on stderr and exit code 1 (2 for bad usage), never a traceback."""

    def deco(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
            try:  # per-file "Writing model shards" / "Loading weights" bars drown our own progress bars
                from transformers.utils import logging as hf_logging

                hf_logging.disable_progress_bar()
                hf_logging.set_verbosity_error()
            except ImportError:
                pass
            for noisy in ("distributed", "urllib3", "httpx", "huggingface_hub", "datasets", "filelock"):
                logging.getLogger(noisy).setLevel(logging.WARNING)
            try:
                return fn(*args, **kwargs)
            except KdError as e:
                click.echo(f"kdcache {name}: error: {e}", err=True)
                sys.exit(1)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    click.echo(f"kdcache {name}: error: no space left on device ({e.filename or 'output'}); "
                               "committed shards are kept, free space and re-run the same command", err=True)
                    sys.exit(1)
                if e.errno is not None:  # permissions, read-only file systems, vanished files: the environment
                    where = f" {e.filename}" if e.filename else ""
                    click.echo(f"kdcache {name}: error: {e.strerror or e}{where}; re-run the same command once "
                               "fixed (committed work is kept)", err=True)
                    sys.exit(1)
                raise
            except (MemoryError, RuntimeError) as e:
                if not is_out_of_memory(e):
                    raise
                click.echo(f"kdcache {name}: error: out of memory ({out_of_memory_where(e)}); "
                           f"{OOM_ADVICE.get(name, 'lower the batch size')}; committed work is kept, re-run the "
                           "same command", err=True)
                sys.exit(1)
            except Interrupted as e:  # knows what was saved and where the re-run continues
                click.echo(f"kdcache {name}: {e}", err=True)
                sys.exit(130)
            except KeyboardInterrupt:
                click.echo(f"kdcache {name}: interrupted; re-run the same command to continue", err=True)
                sys.exit(130)

        return wrapper

    return deco
