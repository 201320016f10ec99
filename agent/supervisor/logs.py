"""Where each isolated attempt's stdout/stderr go, and how to read them back.

One file per (run, state, attempt), ``<run>/<state>.attempt-<n>.log`` under the log
directory: ``AGENT_LOG_DIR`` when set (kept after exit), else a private temporary
directory removed with the supervisor. One directory per run, not per state: a
directory costs an ext4 disk twice what a file does, and a fan-out makes one per state.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading

from ..errors import AttemptLogNotFoundError

_SAFE = re.compile(r"[^A-Za-z0-9._-]")
_lock = threading.Lock()
_active: "AttemptLogs | None" = None


def _component(text: str) -> str:
    cleaned = _SAFE.sub("_", text)
    return cleaned if cleaned not in ("", ".", "..") else f"_{cleaned}"


class AttemptLogs:
    """A directory of per-attempt log files."""

    def __init__(self, directory: str | None = None) -> None:
        configured = directory or os.environ.get("AGENT_LOG_DIR") or None
        if configured:
            os.makedirs(configured, mode=0o700, exist_ok=True)
            self.directory = configured
            self.owned = False
        else:
            self.directory = tempfile.mkdtemp(prefix="agent-logs-")
            self.owned = True

    def path(self, run_id: str, state: str, attempt: int, *, create: bool = False) -> str:
        folder = os.path.join(self.directory, _component(run_id))
        if create:
            os.makedirs(folder, mode=0o700, exist_ok=True)
        return os.path.join(folder, f"{_component(state)}.attempt-{int(attempt)}.log")

    def read(self, run_id: str, state: str, attempt: int) -> str:
        path = self.path(run_id, state, attempt)
        try:
            with open(path, encoding="utf-8", errors="replace") as fh:
                return fh.read()
        except FileNotFoundError:
            raise AttemptLogNotFoundError(
                f"no log for run {run_id!r}, state {state!r}, attempt {attempt}: only isolated "
                "attempts of this process have logs, and they are removed when it exits unless "
                "AGENT_LOG_DIR is set"
            ) from None

    def remove(self) -> None:
        if self.owned:
            shutil.rmtree(self.directory, ignore_errors=True)


def activate(logs: AttemptLogs | None) -> None:
    """Make ``logs`` the directory :func:`read_attempt_log` reads (the supervisor's)."""
    global _active
    with _lock:
        _active = logs


def read_attempt_log(run_id: str, state: str, attempt: int) -> str:
    """The stdout and stderr text of one isolated attempt of ``state`` in run ``run_id``."""
    with _lock:
        logs = _active
    if logs is None:
        configured = os.environ.get("AGENT_LOG_DIR")
        if not configured:
            raise AttemptLogNotFoundError(
                f"no log for run {run_id!r}, state {state!r}, attempt {attempt}: no isolated "
                "state has run in this process; set AGENT_LOG_DIR to keep logs across processes"
            )
        logs = AttemptLogs(configured)
    return logs.read(run_id, state, attempt)
