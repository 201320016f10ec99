"""Descriptors 0, 1 and 2 are open before this process opens a socket or a loop."""

from __future__ import annotations

import os
import sys


def open_standard_streams() -> None:
    """Open ``/dev/null`` on whichever of descriptors 0, 1 and 2 is closed (a program started
    with ``<&-`` or ``>&-``, or by a service manager that closed them).

    Else the next socket or pipe opened takes that number: a state process, which writes
    its output to descriptors 1 and 2, would write over its own channel, and uvloop aborts
    the whole program (SIGABRT) when it closes a socket there. A descriptor that is open
    stays as it is, whatever it is (an event loop made while 1 was free took that
    number: the program's own affair). ``sys.stdout`` and the others, None where Python
    found their descriptor closed as it started, then write to ``/dev/null``.
    Cheap (three ``fstat``), so called wherever such a socket may come next.
    """
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        reopened = False
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)  # the lowest free number: fd itself
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
            reopened = True
        if getattr(sys, name) is None:  # Python found the descriptor closed when it started
            setattr(sys, name, open(fd, mode, closefd=False) if reopened else open(os.devnull, mode))
