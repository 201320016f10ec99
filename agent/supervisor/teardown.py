"""Teardown at the program's exit that a second Ctrl-C cannot cut short.

Stopping a supervisor freezes, kills and removes cgroups; a KeyboardInterrupt in the
middle (a user pressing Ctrl-C twice) printed a traceback and left a cgroup frozen for
the next supervisor to find. Each function registered here runs with SIGINT ignored.
"""

from __future__ import annotations

import atexit
import signal
import threading
from collections.abc import Callable
from typing import Any


def at_exit(func: Callable[[], Any]) -> None:
    """``atexit.register(func)``, run with SIGINT ignored (from the main thread, where exit runs)."""

    def run() -> None:
        if threading.current_thread() is not threading.main_thread():
            func()
            return
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            func()
        finally:
            signal.signal(signal.SIGINT, previous)

    atexit.register(run)
