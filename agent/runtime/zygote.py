"""The zygote: a clean interpreter with the child's modules loaded, forking children.

Started once per supervisor (``python -m agent.runtime.zygote FD PARENT_PID [PATH...]``).
It holds no threads and no ZeroMQ context, so a fork is a cheap, safe copy. Over the
control socket ``FD`` it reads length-prefixed requests (``spawn``, ``kill``) and writes
reports (``spawned``, ``spawn_failed``, ``exited`` with the raw wait status, and the CPU
seconds and page faults the kernel charged the child). It exits,
killing its children, when the supervisor closes the socket or dies (parent-death
signal), and then removes the PATHs (the supervisor's private directories), so that even
a supervisor killed outright leaves no files behind.

Most of a child's cost is copy-on-write: each page of the zygote a child writes is
copied. Hence: the zygote is warmed up by serving whole attempts in-process before it
forks (:func:`warm_up`); being single-threaded, it forks through libc rather than
``os.fork``, whose after-fork work in the child (resetting locks and thread state,
which one thread leaves consistent, and every loaded module's ``os.register_at_fork``
hook) writes a few hundred pages (the one hook a child needs, reseeding :mod:`random`,
is done by hand); and it passes each child its spec as bytes, allocating nothing.
"""

from __future__ import annotations

import _signal
import ctypes
import gc
import os
import random
import select
import shutil
import signal
import socket
import struct
import sys
import threading
from collections.abc import Sequence
from typing import Any

from ..values import Bounds, pack_plain, unpack_plain
from . import child as child_module
from .child import set_parent_death_signal

_libc_fork = ctypes.PyDLL(None, use_errno=True).fork  # PyDLL: the GIL is held across it
_HEADER = struct.Struct("!I")
_SIGTERM = (int(signal.SIGTERM),)
_CONTROL_BOUNDS = Bounds(max_frame=16 * 1024 * 1024)


def write_frame(sock: socket.socket, obj: Any) -> None:
    data = pack_plain(obj)
    sock.sendall(_HEADER.pack(len(data)) + data)


def read_frames(buffer: bytearray) -> list[Any]:
    """Pop every complete frame from ``buffer``."""
    out = []
    while len(buffer) >= _HEADER.size:
        (size,) = _HEADER.unpack_from(buffer)
        if len(buffer) < _HEADER.size + size:
            break
        out.append(unpack_plain(bytes(buffer[_HEADER.size : _HEADER.size + size]), _CONTROL_BOUNDS))
        del buffer[: _HEADER.size + size]
    return out


def _thread_count() -> int:
    return len(os.listdir("/proc/self/task"))


class Zygote:
    """The fork loop."""

    def __init__(self, control: socket.socket, parent_pid: int) -> None:
        self._control = control
        self._parent_pid = parent_pid
        self._children: set[int] = set()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # Checked once: the zygote starts no thread, so this stays true.
        self._single_threaded = _thread_count() == 1

    def serve(self, pending: list[Any], buffer: bytearray) -> None:
        """Serve requests until the supervisor goes: ``pending`` ones first, then the socket's
        (``buffer`` holds the start of one already read)."""
        signal.set_wakeup_fd(self._wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for request in pending:
            self._handle(request)
        while True:
            readable, _, _ = select.select([self._control, self._wake_r], [], [])
            if self._wake_r in readable:
                self._drain_wakeups()
                self._reap()
            if self._control in readable:
                data = self._control.recv(1 << 16)
                if not data:
                    break
                buffer += data
                for request in read_frames(buffer):
                    self._handle(request)
        self._kill_all()

    def _handle(self, request: dict[str, Any]) -> None:
        op = request.get("op")
        if op == "spawn":
            self._spawn(request["id"], request["spec"])
        elif op == "kill":
            self._kill(request["pid"], request.get("signal", signal.SIGKILL))

    def _spawn(self, request_id: int, spec: bytes) -> None:
        # SIGTERM (the zygote's own clean-up) stays blocked in the child until it resets it.
        # (``_signal``: the ``signal`` wrapper builds an enum set of the old mask per call.)
        _signal.pthread_sigmask(signal.SIG_BLOCK, _SIGTERM)
        try:
            pid = self._fork()
        except OSError as exc:
            _signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGTERM)
            write_frame(self._control, {"op": "spawn_failed", "id": request_id, "error": str(exc)})
            return
        if pid != 0:
            _signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGTERM)
        if pid == 0:
            child_module.child_main(
                spec, os.getppid(), [self._control.fileno(), self._wake_r, self._wake_w]
            )
        self._children.add(pid)
        write_frame(self._control, {"op": "spawned", "id": request_id, "pid": pid})

    def _fork(self) -> int:
        if not self._single_threaded:
            return os.fork()
        pid = _libc_fork()
        if pid < 0:
            errno = ctypes.get_errno()
            raise OSError(errno, os.strerror(errno))
        if pid == 0:  # what of os.fork's after-fork work a child needs
            random.seed()  # else every child draws the zygote's sequence
            threading.main_thread()._set_native_id()
        return pid

    def _kill(self, pid: int, sig: int) -> None:
        # Only a child not yet reaped: its pid (and process group) cannot have been reused.
        if pid not in self._children:
            return
        try:
            os.killpg(pid, sig)
        except OSError:
            pass
        try:
            os.kill(pid, sig)
        except OSError:
            pass

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _reap(self) -> None:
        while True:
            try:
                # wait4: the kernel's own CPU and fault figures for the child (and what it
                # reaped), which the supervisor compares with its cgroup's to see whether it left.
                pid, status, rusage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._children.discard(pid)
            cpu = rusage.ru_utime + rusage.ru_stime
            faults = rusage.ru_minflt + rusage.ru_majflt
            try:
                write_frame(self._control, {"op": "exited", "pid": pid, "status": status, "cpu": cpu,
                                            "faults": faults})
            except OSError:
                pass

    def _kill_all(self) -> None:
        for pid in list(self._children):
            self._kill(pid, signal.SIGKILL)
        for pid in list(self._children):
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        self._children.clear()


def _read_configure(control: socket.socket, buffer: bytearray) -> tuple[dict[str, Any], list[Any]]:
    """Block for the supervisor's first request, ``configure``; return it and any read with it."""
    while not (requests := read_frames(buffer)):
        data = control.recv(1 << 16)
        if not data:
            raise _ParentDied()
        buffer += data
    config, *pending = requests
    if not isinstance(config, dict) or config.get("op") != "configure":
        raise RuntimeError(f"the zygote's first request must be 'configure', not {config!r}")
    return config, pending


def preload(modules: Sequence[str], import_path: Sequence[str]) -> None:
    """Import ``modules`` (``AGENT_PRELOAD``) once, here, so that every child inherits them.

    A state whose function or context needs a module the zygote has not loaded imports it
    in its own process, every time: for numpy, pandas or torch that is far more than the
    fork. Like :func:`multiprocessing.set_forkserver_preload`, the list is explicit:
    importing runs the module's code in the zygote. A module that cannot be imported is
    reported on stderr and skipped (children then import it themselves); one that starts
    threads is reported too, since the zygote then forks a multi-threaded process.
    """
    import importlib

    saved = sys.path[:]
    sys.path[:] = [*import_path, *saved]
    try:
        for name in modules:
            before = _thread_count()
            try:
                importlib.import_module(name)
            except BaseException as exc:  # its top-level code may raise anything, even SystemExit
                print(f"agent: AGENT_PRELOAD: cannot import {name!r} ({type(exc).__name__}: {exc}); "
                      "each state's process will import it itself", file=sys.stderr, flush=True)
                continue
            started = _thread_count() - before
            if started > 0:
                print(f"agent: AGENT_PRELOAD: importing {name!r} started {started} thread(s) in "
                      "the zygote; children are forked from a multi-threaded process, which is only "
                      "as safe as that module's fork handlers", file=sys.stderr, flush=True)
    finally:
        sys.path[:] = saved


async def _warm_state(context: Any) -> dict[str, Any]:
    context.set_state("count", context.get_state("count", 0) + 1)
    return {"ok": [1, 2.0, "x", None]}


def warm_up(rounds: int = 12) -> None:
    """Serve whole attempts in-process, as every child will, before the first fork.

    Lazy initialisation then happens once, here; and CPython specialises a function's
    bytecode in place after a few calls, so children share code that is already
    specialised instead of each rewriting (and so copying) it. A round is a
    :class:`ChildSession` on a :class:`DealerTransport` whose peer, one end of a
    socketpair, was loaded beforehand with what the supervisor's ROUTER would send. It
    leaves nothing behind: no thread, no socket, no event loop.
    """
    import asyncio

    import cloudpickle
    import uvloop

    from .. import values
    from ..ipc import DealerTransport, Run, encode_message
    from ..ipc.zmtp import GREETING, frame, ready_command
    from . import confine
    from .session import ChildSession

    run = encode_message(Run(
        run_id="warm-up", agent_name="zygote", state_name="warm", attempt=1,
        function=cloudpickle.dumps(_warm_state), classes=cloudpickle.dumps(()),
        context={"count": values.encode(1), "t": values.encode((1, {2}))},
        max_frame=values.DEFAULT_MAX_FRAME, context_budget=values.MIB, context_bytes=0,
    ))
    for _ in range(rounds):
        ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        loop = uvloop.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            peer.sendall(GREETING + ready_command(b"ROUTER", b"") + frame(run))
            transport = DealerTransport.over(ours, b"", linger=0)  # the peer never closes
            session = ChildSession(transport, pid=os.getpid(), secret=b"warm-up")
            session.hello()
            loop.run_until_complete(child_module.serve(session, transport))
            confine.apply({})
        finally:
            loop.close()
            asyncio.set_event_loop(None)
            ours.close()
            peer.close()


def _release_free_heap() -> None:
    """Give free heap pages back to the kernel (glibc ``malloc_trim``).

    Every page the zygote holds is copied into each child's page tables at fork and
    walked again when the child exits: a smaller zygote forks and reaps faster.
    """
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


class _ParentDied(Exception):
    pass


def _on_sigterm(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one interruption only: the clean-up must run
    raise _ParentDied()


def main(argv: list[str]) -> int:
    control_fd, parent_pid, cleanup = int(argv[1]), int(argv[2]), argv[3:]
    signal.signal(signal.SIGTERM, _on_sigterm)
    set_parent_death_signal(signal.SIGTERM)
    zygote = None
    try:
        if os.getppid() != parent_pid:
            return 1  # the supervisor is already gone
        control = socket.socket(fileno=control_fd)
        control.setblocking(True)
        buffer = bytearray()
        config, pending = _read_configure(control, buffer)
        preload(config.get("preload", ()), config.get("import_path", ()))
        warm_up()
        # Objects loaded so far are never collected: children share their pages untouched.
        gc.collect()
        gc.freeze()
        _release_free_heap()
        zygote = Zygote(control, parent_pid)
        zygote.serve(pending, buffer)
    except (_ParentDied, OSError):
        pass
    finally:
        try:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        except _ParentDied:
            pass  # the parent-death signal came just as the loop ended; no other can
        if zygote is not None:
            zygote._kill_all()
        for path in cleanup:
            shutil.rmtree(path, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
