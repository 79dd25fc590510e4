"""Ctrl-C that stops a loop at a step boundary instead of wherever Python happens to be.

    stop = StopRequest.install()
    try:
        while ...:
            one_step()            # a KeyboardInterrupt here could land inside optimizer.step()
            if stop.requested:    # the first Ctrl-C only sets this
                break             # state is whole: checkpoint it
    finally:
        stop.restore()

An optimizer step is several C++ calls (AdamW updates its two parameter groups one after the other;
the scheduler, the LATF state and the reader's position move after it), so an interrupt raised between
them leaves a state no checkpoint should hold. The first SIGINT is therefore deferred to the end of
the step; a second one raises KeyboardInterrupt at once, for a user who will not wait.
Outside the main thread (where Python cannot install handlers) nothing is installed.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

log = logging.getLogger(__name__)


class StopRequest:
    """A deferred Ctrl-C: `requested` turns True on the first SIGINT after `install()`."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None
        self._installed = False

    @classmethod
    def install(cls) -> StopRequest:
        stop = cls()
        if threading.current_thread() is threading.main_thread():
            stop._previous = signal.signal(signal.SIGINT, stop._handle)
            stop._installed = True
        return stop

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("interrupt: finishing the current step and saving a checkpoint (Ctrl-C again to stop at once)")

    def restore(self) -> None:
        """Put the previous SIGINT handler back (Python's own when it was not installed from Python)."""
        if self._installed:
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.default_int_handler)
            self._installed = False
