"""Stop requests: SIGTERM and SIGINT become a flag the training loop reads at step boundaries
(it saves and exits 0), from the first moment of the process.

`install_early()` is called by the `seismo` command before it imports anything heavy, so a
signal that arrives while JAX loads or a step compiles is remembered instead of killing the
process; `StopFlag.install()` in the loop takes the request over. This module imports only the
standard library.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

_EARLY = {"requested": False, "installed": False}


def _early_handler(signum: int, frame: Any) -> None:
    _EARLY["requested"] = True


def install_early() -> None:
    """Remember SIGTERM/SIGINT from now on (main thread only)."""
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _early_handler)
        _EARLY["installed"] = True


class StopFlag:
    """Set by SIGTERM/SIGINT (or by one that arrived before, see `install_early`); the loop
    saves and exits at the next step boundary."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        """Handle the signals from now on, taking over (and clearing) a request that arrived
        before: between the runs of a sweep, or while the command started."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        self.requested = self.requested or bool(_EARLY["requested"])
        _EARLY["requested"] = False

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old.clear()
