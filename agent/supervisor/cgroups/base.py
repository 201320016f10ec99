"""The one cgroup interface the supervisor uses, whatever the kernel offers.

A backend creates one cgroup per attempt under a directory of its own supervisor
(``<root>/<pid>-<start>-<random>/<attempt>``, in every controller it uses), so a
supervisor only ever touches what it created. :meth:`CgroupBackend.reap_stale`
removes the directories of supervisors that died without cleaning up.
"""

from __future__ import annotations

import errno
import os
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ...errors import CgroupError
from .limits import CgroupLimits

# The directory, in every controller, that holds every supervisor's cgroups.
DEFAULT_ROOT = "agent"


@dataclass(frozen=True)
class LimitEvents:
    """How often the kernel enforced a limit on one cgroup, read back from its files."""

    oom_kills: int = 0
    memory_limit_hits: int = 0
    pids_limit_hits: int = 0
    nr_throttled: int = 0
    throttled_seconds: float = 0.0


@runtime_checkable
class CgroupHandle(Protocol):
    """One attempt's cgroup (in every controller the backend uses)."""

    name: str
    limits: CgroupLimits
    # Limits the backend could not enforce here, with why (e.g. io_weight on mq-deadline).
    unenforced: dict[str, str]

    @property
    def procs_files(self) -> list[str]:
        """The ``cgroup.procs`` files a process writes its pid to, to join."""
        ...

    def child_spec(self) -> dict[str, Any]:
        """Plain data :func:`agent.runtime.confine.apply` uses in the child to join."""
        ...

    def attach(self, pid: int) -> None:
        """Move ``pid`` in from the supervisor side (a child normally joins itself)."""
        ...

    def pids(self) -> list[int]:
        """Processes in the cgroup now."""
        ...

    def holds(self, pid: int) -> bool:
        """Whether process ``pid`` is in this cgroup in every hierarchy it has (one read of
        ``/proc/PID/cgroup``): a state running as root may move its process out. A process
        that has exited (a zombie too) moved nothing: True."""
        ...

    def usage(self) -> dict[str, Any]:
        """cpu_seconds, peak_memory_bytes, io_read_bytes, io_write_bytes, nr_throttled, ..."""
        ...

    def cpu_seconds(self) -> float:
        """The CPU time of the cgroup's processes so far: :meth:`usage`'s ``cpu_seconds``, in one read."""
        ...

    def page_faults(self) -> int | None:
        """Page faults taken by processes while they were in the cgroup (``memory.stat``);
        a process that left the cgroup took its later ones elsewhere."""
        ...

    def limit_events(self) -> LimitEvents: ...

    def reading(self) -> tuple[dict[str, Any], LimitEvents]:
        """:meth:`usage` and :meth:`limit_events` together (a file both need is read once)."""
        ...

    def task_count(self) -> int | None:
        """Tasks (every thread of every process) in the cgroup now, in one read: cheaper than
        :meth:`pids` where the kernel counts them (``pids.current``); None where it does not."""
        ...

    def remember_limits(self) -> None:
        """Read what the limit files hold now, for :meth:`limits_changed` (a worker's cgroup,
        before its first attempt)."""
        ...

    def limits_changed(self) -> list[str]:
        """The limit files whose content is no longer what :meth:`remember_limits` read: a
        state running as root may rewrite its own cgroup's limits, which a worker must not
        carry to the next state."""
        ...

    def kill(self) -> None:
        """SIGKILL every process in the cgroup and wait until it is empty."""
        ...

    def remove(self) -> None:
        """Kill what is left and delete the cgroup (idempotent)."""
        ...

    def close_files(self) -> None:
        """Close the files kept open to read it back (a later read opens them again)."""
        ...


@runtime_checkable
class CgroupBackend(Protocol):
    """Creates attempt cgroups; ``name`` is ``"v2"``, ``"v1"`` or ``"none"``."""

    name: str

    def create(self, name: str, limits: CgroupLimits, *, every_controller: bool = False) -> CgroupHandle:
        """A new cgroup with ``limits``; ``every_controller``: in each controller an attempt
        may need, so that :meth:`apply` can give it any limits later (a parked child's)."""
        ...

    def apply(self, handle: CgroupHandle, limits: CgroupLimits) -> None:
        """Give a cgroup made with ``every_controller`` (and no limits yet) its limits."""
        ...

    def owned_dirs(self) -> list[str]:
        """The directories of this supervisor (attempt cgroups live below them)."""
        ...

    def reap_stale(self) -> int:
        """Remove cgroups of dead supervisors (killing what is left in them); returns how many."""
        ...

    def capabilities(self) -> dict[str, str]:
        """What each ResourceRequirements field is enforced by here (for ``agent doctor``)."""
        ...

    def close(self) -> None:
        """Remove this supervisor's directory (after its attempts are gone)."""
        ...


@dataclass
class SupervisorName:
    """``<pid>-<start time>-<random>``: unique, and tells whether its supervisor still lives."""

    pid: int
    start: int
    token: str = field(default_factory=lambda: secrets.token_hex(3))

    def __str__(self) -> str:
        return f"{self.pid}-{self.start}-{self.token}"

    @classmethod
    def mine(cls) -> "SupervisorName":
        pid = os.getpid()
        return cls(pid, process_start(pid) or 0)

    @classmethod
    def parse(cls, text: str) -> "SupervisorName | None":
        parts = text.split("-")
        if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit():
            return None
        return cls(int(parts[0]), int(parts[1]), parts[2])

    def alive(self) -> bool:
        """The supervisor is running (same pid *and* start time, so pid reuse is no alive)."""
        return process_start(self.pid) == self.start


def process_start(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot, or None when it does not run: it
    does not exist, or it has exited and waits for its parent to collect it (a zombie:
    an agentd killed under a slow parent left its cgroups to nobody)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # Field 2 (comm) may contain spaces and parentheses: split after its last ')'.
    fields = data[data.rindex(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def write(path: str, data: str) -> None:
    """Write one value to a cgroup file (one write call, as the kernel wants)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, data.encode())
    finally:
        os.close(fd)


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def read_int(path: str, default: int = 0) -> int:
    try:
        text = read(path)
    except OSError:
        return default
    return parse_int(text, default)


def parse_int(text: str, default: int = 0) -> int:
    text = text.strip()
    if text == "max":
        return default
    try:
        return int(text)
    except ValueError:
        return default


def read_keyed(path: str) -> dict[str, int]:
    """``key value`` lines (cpu.stat, memory.events, pids.events...) as a dict."""
    try:
        text = read(path)
    except OSError:
        return {}
    return parse_keyed(text)


def parse_keyed(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        try:
            out[key] = int(value)
        except ValueError:
            continue
    return out


def setting_in(path: str, text: str) -> str:
    """What a cgroup file sets, without the counters some such files carry beside it
    (v1's ``memory.oom_control`` also counts OOM kills)."""
    if path.endswith("/memory.oom_control"):
        return "".join(line for line in text.splitlines(keepends=True) if line.startswith("oom_kill_disable"))
    return text


class OpenFiles:
    """A cgroup's files, each opened once: reading one again is a ``pread``.

    Opening a cgroup file and reading it costs 20-90 us on the CI machine, a ``pread``
    of an open one about 3 us; a worker's cgroup is read before and after each of its
    attempts. A file that does not exist is remembered as missing. ``close`` closes them.
    """

    _MISSING = -1
    _SIZE = 1 << 16

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}

    def _fd(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is None:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except PermissionError:
                fd = self._open_readonly(path)
            except OSError:
                fd = self._MISSING
            self._fds[path] = fd
        return fd

    def text(self, path: str) -> str | None:
        """The file's content now, or None when it does not exist (or cannot be read)."""
        fd = self._fd(path)
        if fd == self._MISSING:
            return None
        try:
            data = os.pread(fd, self._SIZE, 0)
        except OSError:
            return None
        if len(data) == self._SIZE:
            return read(path)  # longer than one read: not worth keeping open
        return data.decode()

    def contents(self, paths: list[str]) -> dict[str, str]:
        """What each of ``paths`` that exists sets now (:func:`setting_in`)."""
        out = {}
        for path in paths:
            text = self.text(path)
            if text is not None:
                out[path] = setting_in(path, text)
        return out

    def changed(self, contents: dict[str, str]) -> list[str]:
        """Which of ``contents``'s files set something else now. One that cannot be read any
        more changed nothing: its cgroup is gone (a worker that went idle, removed by the zygote
        while this is read), as no process can unlink a cgroup's file."""
        changed = []
        for path, setting in contents.items():
            text = self.text(path)
            if text is not None and setting_in(path, text) != setting:
                changed.append(path)
        return changed

    def _open_readonly(self, path: str) -> int:
        try:
            return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return self._MISSING

    def int(self, path: str, default: int = 0) -> int:
        text = self.text(path)
        return default if text is None else parse_int(text, default)

    def keyed(self, path: str) -> dict[str, int]:
        text = self.text(path)
        return {} if text is None else parse_keyed(text)

    def write(self, path: str, data: str) -> None:
        """Write one value through the open descriptor (opened read-write when it could be)."""
        fd = self._fd(path)
        if fd == self._MISSING:
            raise FileNotFoundError(path)
        os.pwrite(fd, data.encode(), 0)

    def close(self) -> None:
        fds = self._fds
        while fds:
            try:
                _, fd = fds.popitem()  # one at a time: never closed twice, whichever thread closes
            except KeyError:
                break
            if fd != self._MISSING:
                os.close(fd)


def read_pids(procs_file: str) -> list[int]:
    """The pids in a ``cgroup.procs`` file; none when its cgroup is gone, even while it is
    being read (the kernel then answers ``ENODEV``: another supervisor reaping it)."""
    try:
        return [int(line) for line in read(procs_file).split()]
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENODEV):
            return []
        raise


def kill_pids(pids: list[int]) -> None:
    import signal

    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def rmdir_retry(path: str, timeout: float = 2.0) -> None:
    """rmdir a cgroup, retrying while its last processes finish exiting (EBUSY)."""
    deadline = time.monotonic() + timeout
    delay = 0.0005
    while True:
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise CgroupError(f"cannot remove cgroup {path}: {exc.strerror}") from exc
        time.sleep(delay)
        delay = min(delay * 2, 0.02)


def wait_empty(procs_files: list[str], timeout: float = 5.0) -> bool:
    """Wait (bounded) until no process is listed in ``procs_files``; True when empty."""
    deadline = time.monotonic() + timeout
    delay = 0.0005
    while any(read_pids(f) for f in procs_files):
        if time.monotonic() > deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.02)
    return True


def subdirs(path: str) -> list[str]:
    """Child cgroups of ``path`` (an attempt's code may create its own below its cgroup)."""
    try:
        return [e.name for e in os.scandir(path) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return []


def safe_name(text: str) -> str:
    """A cgroup directory name: no slashes, no dots at the start, bounded length."""
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in text)
    cleaned = cleaned.lstrip(".") or "_"
    return cleaned[:100]


_PF_EXITING = 0x4  # a task's flags (/proc/PID/stat): it is exiting


def exited(pid: int) -> bool:
    """Whether process ``pid`` is gone, a zombie, or exiting (an exiting task is moved to
    its hierarchies' roots before it is a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            stat = file.read()
    except OSError:
        return True
    fields = stat[stat.rfind(")") + 2:].split()
    return fields[0] in ("Z", "X") or bool(int(fields[6]) & _PF_EXITING)


def cgroups_of(pid: int) -> dict[str, str]:
    """The cgroup of process ``pid`` in each hierarchy, by controller ("" for the unified
    one); empty when it is gone."""
    try:
        with open(f"/proc/{pid}/cgroup") as file:
            lines = file.read().splitlines()
    except OSError:
        return {}
    out: dict[str, str] = {}
    for line in lines:
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            out[controller] = path
    return out
