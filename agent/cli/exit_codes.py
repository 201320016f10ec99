"""Every exit status of the ``agent`` command, in one place (documented in ``docs/cli.md``)."""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """What ``agent ...`` exits with."""

    OK = 0
    """The command did what was asked; for ``agent run``, the run completed."""
    RUN_FAILED = 1
    """The run ended failed: a state failed for good, or the run timed out."""
    USAGE = 2
    """The command line is wrong: an unknown option, a missing file, an unknown run id."""
    LOAD_FAILED = 3
    """The workflow file could not be loaded, defines no agent, or its agent cannot run as built."""
    CANCELLED = 4
    """The run ended cancelled (``cancel_all()``)."""
    INTERRUPTED = 130
    """Ctrl-C: the run was paused (or stopped) and can be resumed with ``--resume``."""
    READER_GONE = 141
    """The reader of its output went away (``| head``), as SIGPIPE would end a command; for
    ``agent run``, the run was paused as for SIGTERM and can be resumed with ``--resume``."""
    TERMINATED = 143
    """SIGTERM (``systemctl stop``, ``kill``): as Ctrl-C, the run was paused (or stopped) and can
    be resumed with ``--resume``."""
