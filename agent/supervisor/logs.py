"""Where each isolated attempt's stdout/stderr are kept, for how long, and how to read them.

One file per (run, state, attempt), ``<run>/<state>.attempt-<n>.log`` under the log
directory: ``AGENT_LOG_DIR`` when set (kept after exit), else a private temporary
directory removed with the supervisor. One directory per run, not per state: a
directory costs an ext4 disk twice what a file does, and a fan-out makes one per state.

A name that is not already a plain file name (letters, digits, ``._-``, at most 100
characters, not starting with a dot) is cleaned and given a ``~`` and a hash of the
original: ``a b`` and ``a/b`` become ``a_b~3f9c...`` and ``a_b~81d0...``, while a state
really named ``a_b`` keeps ``a_b`` (``~`` never appears in a name kept as it is).

Retention (:class:`LogRetention`): the supervisor keeps at most ``AGENT_LOG_MAX_FILES``
finished attempt logs (default 2000), ``AGENT_LOG_MAX_BYTES`` of them in all (default
256M) and none older than ``AGENT_LOG_MAX_AGE`` (default 7d); the oldest go first, as
attempts finish. A log still being written is never removed, nor is the newest one for
being over the byte budget alone. With ``AGENT_LOG_DIR``,
the logs earlier processes left there count too (read once, when the supervisor starts).

A log file is created when its attempt first prints (creating a file costs 0.3-1.3 ms
on the CI machine's loaded ext4, more than a whole attempt on a worker); an attempt that
printed nothing has an empty log, kept as a file only under ``AGENT_LOG_DIR``, where
other processes may read it.
"""

from __future__ import annotations

import bisect
import collections
import hashlib
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass

from ..errors import AttemptLogNotFoundError, InvalidConfigurationError
from .private_dirs import make_private_dir

_PLAIN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_lock = threading.Lock()
_active: "list[AttemptLogs]" = []  # the newest first


def file_component(text: str) -> str:
    """``text`` as one safe path component, distinct for distinct texts (see the module doc)."""
    if _PLAIN.fullmatch(text):
        return text
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=6).hexdigest()
    return f"{_UNSAFE.sub('_', text)[:100].lstrip('.')}~{digest}"


_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4,
          "s": 1, "min": 60, "h": 3600, "d": 86400}


def _parse(name: str, default: str, units: tuple[str, ...]) -> float:
    """A size (``512M``), a duration (``7d``) or a count (``units`` has none but ``""``: a
    whole number) from the environment; zero in any spelling (``0.0``, ``0d``), or ``off``:
    no limit."""
    text = os.environ.get(name, default).strip().lower()
    if text in ("off", "none", ""):
        return float("inf")
    number = r"(\d+)" if units == ("",) else r"(\d+(?:\.\d+)?)"
    match = re.fullmatch(number + r"\s*([a-z]*)", text)
    if match is None or match.group(2) not in units:
        wanted = "a whole number" if units == ("",) else (
            f"a number with an optional unit ({', '.join(u or 'none' for u in units)})")
        raise InvalidConfigurationError(f"{name}={os.environ.get(name)!r}: give {wanted}, or 0 for no limit")
    value = float(match.group(1)) * _UNITS[match.group(2)]
    return value if value > 0 else float("inf")


@dataclass(frozen=True)
class LogRetention:
    """How many finished attempt logs to keep: by count, total size and age (inf: no limit)."""

    max_files: float = 2000
    max_bytes: float = 256 * 1024**2
    max_age: float = 7 * 86400

    @classmethod
    def from_env(cls) -> "LogRetention":
        return cls(
            max_files=_parse("AGENT_LOG_MAX_FILES", "2000", ("",)),
            max_bytes=_parse("AGENT_LOG_MAX_BYTES", "256M", ("", "k", "m", "g", "t")),
            max_age=_parse("AGENT_LOG_MAX_AGE", "7d", ("", "s", "min", "h", "d")),
        )


class AttemptLogs:
    """A directory of per-attempt log files, pruned by a :class:`LogRetention`."""

    def __init__(self, directory: str | None = None, retention: LogRetention | None = None) -> None:
        configured = directory or os.environ.get("AGENT_LOG_DIR") or None
        self.retention = retention if retention is not None else LogRetention.from_env()
        if configured:
            os.makedirs(configured, mode=0o700, exist_ok=True)
            self.directory = configured
            self.owned = False
        else:
            self.directory = make_private_dir("logs")
            self.owned = True
        # Finished logs, oldest first: (finished at, path, bytes); and files per run folder.
        self._kept: collections.deque[tuple[float, str, int]] = collections.deque()
        self._bytes = 0
        self._per_folder: collections.Counter[str] = collections.Counter()
        self._empty: set[str] = set()  # logs of attempts that printed nothing, never created
        if not self.owned:
            self._adopt_existing()
            self._prune(time.time())

    def path(self, run_id: str, state: str, attempt: int, *, create: bool = False) -> str:
        folder = os.path.join(self.directory, file_component(run_id))
        if create:
            os.makedirs(folder, mode=0o700, exist_ok=True)
        return os.path.join(folder, f"{file_component(state)}.attempt-{int(attempt)}.log")

    def open(self, run_id: str, state: str, attempt: int) -> tuple[str, int]:
        """Create the attempt's log file; returns its path and a descriptor to append to."""
        path = self.path(run_id, state, attempt)
        return path, self.create(path)

    def create(self, path: str) -> int:
        """Create the log file ``path`` (and its run's folder); a descriptor to append to."""
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)

    def finished(self, path: str, size: int, *, created: bool = True, ended: float | None = None) -> None:
        """The attempt that wrote ``path`` ended (at ``ended``, default now): keep its log,
        within the retention policy, which lets the logs of the attempts that ended first go first.

        ``created`` False: it printed nothing and its file was never made.
        """
        if not created:
            if self.owned:
                self._empty.add(path)
            else:
                os.close(self.create(path))  # other processes may look for it
        now = time.time()
        item = (now if ended is None else min(ended, now), path, size)
        if self._kept and self._kept[-1][0] > item[0]:
            # Filed after attempts that ended later (its process took longer to exit).
            bisect.insort(self._kept, item)
        else:
            self._kept.append(item)
        self._bytes += size
        self._per_folder[os.path.dirname(path)] += 1
        self._prune(now)

    def read(self, run_id: str, state: str, attempt: int) -> str:
        path = self.path(run_id, state, attempt)
        try:
            with open(path, encoding="utf-8", errors="replace") as fh:
                return fh.read()
        except FileNotFoundError:
            if path in self._empty:
                return ""
            raise AttemptLogNotFoundError(
                f"no log for run {run_id!r}, state {state!r}, attempt {attempt}: only isolated "
                "attempts have logs; they are removed when the process exits unless AGENT_LOG_DIR "
                "is set, and the oldest go first beyond AGENT_LOG_MAX_FILES / _MAX_BYTES / _MAX_AGE"
            ) from None

    def remove(self) -> None:
        if self.owned:
            shutil.rmtree(self.directory, ignore_errors=True)

    def _prune(self, now: float) -> None:
        policy, kept = self.retention, self._kept
        # The newest log stays even when it alone is over the byte budget: the output of the
        # attempt that just ended is what its user reads next.
        while kept and (
            len(kept) > policy.max_files or (self._bytes > policy.max_bytes and len(kept) > 1)
            or now - kept[0][0] > policy.max_age
        ):
            _, path, size = kept.popleft()
            self._bytes -= size
            if path in self._empty:
                self._empty.discard(path)
            else:
                try:
                    os.unlink(path)
                except OSError:
                    pass
            folder = os.path.dirname(path)
            self._per_folder[folder] -= 1
            if self._per_folder[folder] <= 0:
                del self._per_folder[folder]
                try:
                    os.rmdir(folder)  # fails while another process still writes there: fine
                except OSError:
                    pass

    def _adopt_existing(self) -> None:
        """Count the logs earlier processes left in a configured directory, oldest first."""
        found = []
        with os.scandir(self.directory) as folders:
            for folder in folders:
                if not folder.is_dir(follow_symlinks=False):
                    continue
                try:
                    with os.scandir(folder.path) as files:
                        for entry in files:
                            if entry.name.endswith(".log") and entry.is_file(follow_symlinks=False):
                                st = entry.stat(follow_symlinks=False)
                                found.append((st.st_mtime, entry.path, st.st_size))
                except OSError:
                    continue
        for item in sorted(found):
            self._kept.append(item)
            self._bytes += item[2]
            self._per_folder[os.path.dirname(item[1])] += 1


def activate(logs: AttemptLogs) -> None:
    """Have :func:`read_attempt_log` read ``logs`` too (a supervisor's, until it stops)."""
    with _lock:
        _active.insert(0, logs)


def deactivate(logs: AttemptLogs) -> None:
    """``logs`` went away with its supervisor."""
    with _lock:
        if logs in _active:
            _active.remove(logs)


def read_attempt_log(run_id: str, state: str, attempt: int) -> str:
    """The stdout and stderr text of one isolated attempt of ``state`` in run ``run_id``."""
    with _lock:
        active = list(_active)
    if not active:
        configured = os.environ.get("AGENT_LOG_DIR")
        if not configured:
            raise AttemptLogNotFoundError(
                f"no log for run {run_id!r}, state {state!r}, attempt {attempt}: no isolated "
                "state has run in this process; set AGENT_LOG_DIR to keep logs across processes"
            )
        return AttemptLogs(configured, LogRetention(float("inf"), float("inf"), float("inf"))).read(
            run_id, state, attempt
        )
    # Several supervisors (runs on the event loops of several threads at once): the one
    # that ran the attempt has its log.
    for logs in active[1:]:
        if os.path.exists(logs.path(run_id, state, attempt)):
            return logs.read(run_id, state, attempt)
    return active[0].read(run_id, state, attempt)
