"""The supervisor's handle on its zygote: start it, ask for forks and kills, hear exits.

The zygote is a separate interpreter started with ``exec`` (never a fork of this
process, which holds threads and a ZeroMQ context). Requests go down a socketpair;
reports (``spawned``, ``spawn_failed``, ``exited``, ``denied``, ``parked``, ``let_go``)
come back on the same socketpair and are dispatched on the attached event loop. A
child's spec travels in a memfd passed with its ``spawn`` request (or, to a parked
child, over the child's own socket: :meth:`ZygoteLauncher.hand_over`), which only the
child reads. The zygote removes the ``cleanup`` directories when it exits, even if this
process was killed.
"""

from __future__ import annotations

import array
import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Collection, Sequence
from typing import Any

from .. import _env
from ..live.protocol import socket_path
from ..runtime.child import spec_memfd
from ..runtime.zygote import MAX_FDS_PER_READ, PARK_IDLE, PARK_MAX, charged_so_far, read_frames, write_frame
from .gpus import pinning_env

ReportHandler = Callable[[dict[str, Any]], None]

_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


PRESTARTED_ENV = "AGENT_ZYGOTE"
_PINNED = tuple(pinning_env([]))  # the variables a launch pins for the state's GPUs
"""``FD:PID`` of a zygote this process forked before it started threads (agentd's job
runners do, ``agent.daemon.spawner``): the first supervisor adopts it instead of starting
an interpreter. It cannot remove the supervisor's directories when it dies; a runner's
temporary directory is its job's, which agentd cleans."""


class _Forked:
    """A zygote this process forked, with the two calls ``close`` needs of a Popen."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def wait(self, timeout: float = 3600.0) -> int:
        deadline = time.monotonic() + timeout
        while True:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired("zygote", timeout)
            time.sleep(0.005)

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)


def _take_prestarted() -> tuple[_Forked, socket.socket] | None:
    fd, _, pid = os.environ.pop(PRESTARTED_ENV, "").partition(":")
    if not (fd.isdigit() and pid.isdigit()):
        return None
    return _Forked(int(pid)), socket.socket(fileno=int(fd))


_FD_BYTES = array.array("i").itemsize


def _receive_now(sock: socket.socket) -> tuple[bytes, list[int]]:
    """What the zygote sent, and the descriptors with it, without waiting (BlockingIOError
    when nothing is there): ``socket.recv_fds`` drops its flags before Python 3.12, so a
    read of it would block the event loop (a stop of a launching state reads reports)."""
    data, ancdata, _, _ = sock.recvmsg(1 << 16, socket.CMSG_LEN(MAX_FDS_PER_READ * _FD_BYTES), socket.MSG_DONTWAIT)
    fds = array.array("i")
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % _FD_BYTES])
    return data, list(fds)


class ZygoteLauncher:
    """One running zygote process."""

    def __init__(
        self,
        on_report: ReportHandler,
        on_lost: Callable[[], None],
        cleanup: list[str] | None = None,
        *,
        preload: Sequence[str] = (),
        import_path: Sequence[str] = (),
        park_max: int = PARK_MAX,
        park_idle: float = PARK_IDLE,
        endpoint: str = "",
        open_files: int | None = None,
    ) -> None:
        self._on_report = on_report
        self._on_lost = on_lost
        prestarted = _take_prestarted()
        # The program's environment the zygote started from (what its children inherit):
        # a launch brings what changed since (:meth:`environment_changes`).
        self.environ = _env.snapshot()
        if prestarted is not None:
            self.process, ours = prestarted
        else:
            self.process, ours = self._start(cleanup)
        self.pid = self.process.pid
        self._sock = ours
        self._buffer = bytearray()
        self._fds: deque[int] = deque()  # descriptors received ahead of their reports' ends
        self._loop: asyncio.AbstractEventLoop | None = None
        self.alive = True
        # The first frame, read before the zygote warms up: what to import for the children,
        # where parked children connect ahead (the supervisor's ROUTER), the soft limit of
        # open files they get (this process's before the supervisor raised it), and the
        # environment of a state without GPUs; and this process's status socket, which the
        # zygote removes if this process is killed.
        self._send({"op": "configure", "preload": list(preload), "import_path": list(import_path),
                    "park_max": park_max, "park_idle": park_idle, "endpoint": endpoint,
                    "open_files": open_files, "child_env": pinning_env([]),
                    "status_socket": socket_path(os.getpid())})

    def environment_changes(self, keep: Collection[str] | None = None) -> dict[str, str | None]:
        """What the program's environment set (a value) and removed (None) since the zygote
        started, but the GPU pinning variables (a launch sets those itself); only the
        names in ``keep``, if given (a sandbox's)."""
        now = _env.snapshot()
        then = self.environ
        if now == then:
            return {}
        changes: dict[str, str | None] = {
            os.fsdecode(k): os.fsdecode(v) for k, v in now.items() if then.get(k) != v}
        changes.update((os.fsdecode(k), None) for k in then if k not in now)
        for name in _PINNED:
            changes.pop(name, None)
        return changes if keep is None else {k: v for k, v in changes.items() if k in keep}

    @staticmethod
    def _start(cleanup: list[str] | None) -> tuple[subprocess.Popen[bytes], socket.socket]:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p
        )
        try:
            process = subprocess.Popen(
                # -P: the working directory is not searched, so no module there shadows ours.
                [sys.executable, "-P", "-m", "agent.runtime.zygote", str(theirs.fileno()),
                 str(os.getpid()), *(cleanup or [])],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=env,
            )
        finally:
            theirs.close()
        return process, ours

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is loop:
            return
        self.detach()
        loop.add_reader(self._sock.fileno(), self.read_reports)
        self._loop = loop

    def detach(self) -> None:
        if self._loop is not None and not self._loop.is_closed() and self._sock.fileno() >= 0:
            self._loop.remove_reader(self._sock.fileno())
        self._loop = None

    def spawn(self, request_id: int, spec: dict[str, Any], *, sandbox: bool = False, fds: Sequence[int] = ()) -> None:
        """Ask for a child; its spec goes in a memfd that only the child reads.

        ``fds`` are handed to the child after it (a worker's own channel).
        """
        if not self.alive:
            raise ConnectionError("the zygote is gone")
        fd = spec_memfd(spec)
        try:
            write_frame(self._sock, {"op": "spawn", "id": request_id, "sandbox": sandbox, "fds": 1 + len(fds)},
                        [fd, *fds])
        except OSError as exc:
            self._lost()
            raise ConnectionError(f"the zygote is gone: {exc}") from None
        finally:
            os.close(fd)

    def hand_over(
        self, spec: dict[str, Any], parked: socket.socket, pid: int, *, sandbox: bool = False, fds: Sequence[int] = (),
    ) -> tuple[float, int] | None:
        """Hand parked child ``pid`` its spec (and ``fds``) over ``parked``, its socket: no
        fork, and no hop through the zygote (the caller tells it later: :meth:`taken`).

        Returns the CPU seconds and page faults the child had taken before (its warm-up,
        which the caller leaves out of the figures of the child's exit), or None when it is
        gone (its end is closed): then the spec reached no process and nobody was told.
        """
        if not self.alive:
            raise ConnectionError("the zygote is gone")
        fd = spec_memfd(spec)
        try:
            socket.send_fds(parked, [b"s"], [fd, *fds])
        except OSError:
            return None
        finally:
            os.close(fd)
        # Read once the child has its spec (before, its warm-up may not be over): what it
        # did since is a few microseconds, in clock ticks nothing.
        return charged_so_far(pid)

    def taken(self, pid: int, sandbox: bool = False) -> None:
        """Tell the zygote that parked child ``pid`` was handed a spec: it forks a replacement."""
        self._send({"op": "taken", "pid": pid, "sandbox": sandbox})

    def kill(self, pid: int, sig: int = signal.SIGKILL) -> None:
        self._send({"op": "kill", "pid": pid, "signal": int(sig)})

    def remove_on_idle_exit(self, pid: int, dirs: Sequence[str]) -> None:
        """Ask the zygote to remove worker ``pid``'s cgroup ``dirs`` when it reaps it after an
        idle exit (the supervisor may then have no event loop to do it on)."""
        self._send({"op": "idle_cgroup", "pid": pid, "dirs": list(dirs)})

    def continue_if_stopped(self) -> bool:
        """Send SIGCONT to the zygote if it is stopped (a ``process`` state's SIGSTOP to its
        parent, say: nothing would be forked, reaped or reported, and runs would wait for
        good); True when it was."""
        try:
            with open(f"/proc/{self.pid}/stat", "rb") as stat:
                state = stat.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            return False
        if not self.alive or state not in (b"T", b"t"):
            return False
        os.kill(self.pid, signal.SIGCONT)
        return True

    def _send(self, request: dict[str, Any]) -> None:
        if not self.alive:
            raise ConnectionError("the zygote is gone")
        try:
            write_frame(self._sock, request)
        except OSError as exc:
            self._lost()
            raise ConnectionError(f"the zygote is gone: {exc}") from None

    def read_reports(self) -> None:
        """Hand the reports waiting now to ``on_report``; a ``parked`` one with its child's
        socket in ``report["socket"]`` (the report's handler owns it)."""
        try:
            data, fds = _receive_now(self._sock)
        except BlockingIOError:
            return
        except OSError:
            data, fds = b"", []
        self._fds.extend(fds)
        if not data:
            self._lost()
            return
        self._buffer += data
        for report in read_frames(self._buffer):
            if report.get("op") == "parked" and self._fds:
                report["socket"] = socket.socket(fileno=self._fds.popleft())
            self._on_report(report)

    def _lost(self) -> None:
        if not self.alive:
            return
        self.alive = False
        self.detach()
        self._on_lost()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the zygote (it kills its children on EOF) and reap it."""
        self.alive = False
        self.detach()
        try:
            write_frame(self._sock, {"op": "close"})  # not a death: the process goes on
        except OSError:
            pass  # the zygote is gone
        self._sock.close()
        while self._fds:
            os.close(self._fds.popleft())
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
