"""What every command shares: `--config`/`--set`, one-line errors, logging set-up."""

from __future__ import annotations

import errno
import functools
import logging
import sys
from typing import Any, Callable

import click

from pipeline.errors import Interrupted, KdError


def config_options(fn: Callable) -> Callable:
    """Add `--config FILE.yaml` and repeatable `--set key=value` to a command."""
    fn = click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                      help="Override one config key (repeatable); beats --config, loses to explicit options.")(fn)
    fn = click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
                      help="YAML file with this command's settings.")(fn)
    return fn


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
            except Interrupted as e:  # knows what was saved and where the re-run continues
                click.echo(f"kdcache {name}: {e}", err=True)
                sys.exit(130)
            except KeyboardInterrupt:
                click.echo(f"kdcache {name}: interrupted; re-run the same command to continue", err=True)
                sys.exit(130)

        return wrapper

    return deco
