"""This process's status endpoint: a Unix socket, served by daemon threads.

Threads, not the event loop: runs come and go on different loops (``run_sync`` makes
one per run), and a view is most wanted when a loop is stuck. One thread accepts, and
each connection is served by a thread of its own (at most :data:`MAX_CLIENTS` at once),
so that a tool that keeps its connection open to poll does not lock others out. The
threads only read:
each snapshot is built on the run's loop (``call_soon_threadsafe``), or, when that loop
does not answer within half a second, read directly. Clients must be this process's
user or root (``SO_PEERCRED``); the socket is removed at exit. One a killed process left
is removed by its zygote as that exits (:mod:`agent.supervisor.launcher`), where the process
ran isolated states, and else when the next endpoint of the user starts.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import struct
import sys
import threading
from typing import Any

from .._stdio import open_standard_streams
from .._version import __version__
from ..errors import StatusEndpointError
from . import client, find, protocol, read, runs
from .protocol import VERSION, decode, encode, error

_log = logging.getLogger("agent.live")
_PEERCRED = struct.Struct("3i")
CLIENT_TIMEOUT = 5.0
MAX_CLIENTS = 16
"""Connections served at once; more wait to be accepted (the listen backlog holds 16)."""

_server: "StatusServer | None" = None


class StatusServer:
    """Listens on ``<runtime dir>/<pid>.sock`` and answers status requests."""

    def __init__(self, directory: str | None = None) -> None:
        self.directory = protocol.ensure_private(directory or protocol.runtime_dir())
        self.pid = os.getpid()
        self.path = protocol.socket_path(self.pid, self.directory)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            if os.path.exists(self.path):
                os.unlink(self.path)  # a process of the same pid that died without cleaning up
            self._sock.bind(self.path)
            os.chmod(self.path, 0o600)
            self._sock.listen(16)
        except OSError:
            self._sock.close()
            raise
        client.endpoints(self.directory)  # removes the sockets of processes that died without doing it
        self._thread = threading.Thread(target=self._serve, name="agent-status", daemon=True)
        self._slots = threading.BoundedSemaphore(MAX_CLIENTS)
        self._closed = False

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        if self._closed or os.getpid() != self.pid:  # a forked child leaves its parent's socket alone
            return
        self._closed = True
        try:
            os.unlink(self.path)
        except OSError:
            pass
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the thread in accept()
        except OSError:
            pass
        self._sock.close()

    def _serve(self) -> None:
        while not self._closed:
            self._slots.acquire()
            try:
                conn, _ = self._sock.accept()
            except OSError:
                self._slots.release()
                return
            try:
                threading.Thread(target=self._serve_one, args=(conn,), name="agent-status-client",
                                 daemon=True).start()
            except RuntimeError:  # no thread can be started now (the interpreter is exiting)
                conn.close()
                self._slots.release()

    def _serve_one(self, conn: socket.socket) -> None:
        try:
            with conn:
                self._handle(conn)
        except (OSError, StatusEndpointError):
            pass  # a client that went away or sent garbage: the others are served
        except Exception:  # never let one request take the endpoint down
            _log.exception("status request failed")
        finally:
            self._slots.release()

    def _handle(self, conn: socket.socket) -> None:
        _, uid, _ = _PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
        allowed = uid in (os.getuid(), 0)
        conn.settimeout(CLIENT_TIMEOUT)
        buffer = b""
        while True:
            while b"\n" not in buffer:
                if len(buffer) > protocol.MAX_LINE:
                    conn.sendall(encode(error("too_large", f"a request is at most {protocol.MAX_LINE} bytes")))
                    return
                data = conn.recv(65536)
                if not data:
                    return
                buffer += data
            line, buffer = buffer.split(b"\n", 1)
            if len(line) > protocol.MAX_LINE:  # its newline came in the same read as its end
                conn.sendall(encode(error("too_large", f"a request is at most {protocol.MAX_LINE} bytes")))
                return
            if not allowed:  # every request of another user gets this answer, and nothing else
                conn.sendall(encode(error("forbidden", f"uid {uid} may not read the runs of uid {os.getuid()}")))
                return
            try:
                answer = answer_request(decode(line))
            except StatusEndpointError as exc:
                answer = error("bad_request", str(exc))
            conn.sendall(encode(answer))


def answer_request(request: dict[str, Any]) -> dict[str, Any]:
    """The answer to one request (see :mod:`agent.live.protocol`)."""
    version = request.get("v", VERSION)
    if not isinstance(version, int) or version > VERSION:
        return error("unsupported_version", f"this endpoint speaks version {VERSION}, not {version!r}")
    op = request.get("op")
    if op == "hello":
        return {"v": VERSION, "ok": True, "server": "process", "pid": os.getpid(), "uid": os.getuid(),
                "command": command_line(), "cwd": os.getcwd(), "version": __version__, "ops": list(protocol.OPS)}
    if op == "runs":
        return {"v": VERSION, "ok": True, "pid": os.getpid(), "command": command_line(), "runs": read(runs())}
    if op == "run":
        run_id = request.get("run_id")
        entry = find(run_id) if isinstance(run_id, str) else None
        found = read([entry]) if entry is not None else []
        if not found:
            return error("not_found", f"no run {run_id!r} in process {os.getpid()}")
        return {"v": VERSION, "ok": True, "run": found[0]}
    return error("unknown_op", f"unknown op {op!r}: this endpoint answers {', '.join(protocol.OPS)}")


def command_line() -> list[str]:
    """How this process was started (``sys.argv`` may have been replaced, e.g. by ``agent run``)."""
    try:
        with open("/proc/self/cmdline", "rb") as fh:
            return [part.decode("utf-8", "replace") for part in fh.read().split(b"\0") if part]
    except OSError:
        return list(sys.argv)


def _forget_after_fork() -> None:
    """The endpoint is the parent's: a forked process starts its own when it runs an agent."""
    global _server
    if _server is not None:
        _server._sock.close()  # this process's copy only: the parent goes on serving
        _server = None


os.register_at_fork(after_in_child=_forget_after_fork)


def start() -> StatusServer | None:
    """Start this process's endpoint once; a failure is logged, never raised into a run."""
    global _server
    if _server is not None:
        return _server
    open_standard_streams()  # the socket must not become this process's stdout (agent._stdio)
    try:
        _server = StatusServer()
    except (OSError, StatusEndpointError) as exc:
        _log.warning("status endpoint not started: %s", exc)
        return None
    _server.start()
    atexit.register(_server.close)
    return _server


def current() -> StatusServer | None:
    return _server
