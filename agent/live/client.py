"""Find this user's status endpoints and ask them about their runs (``agent top``, ``agent runs``)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Any

from ..errors import StatusEndpointError
from . import protocol


@dataclass
class Endpoint:
    """What one endpoint answered (or why it did not)."""

    path: str
    pid: int | None
    command: list[str] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None


def request(path: str, message: dict[str, Any], timeout: float = 2.0) -> dict[str, Any]:
    """Send one request to the endpoint at ``path`` and return its answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            sock.sendall(protocol.encode({"v": protocol.VERSION, **message}))
            buffer = b""
            while b"\n" not in buffer:
                data = sock.recv(1 << 16)
                if not data:
                    raise StatusEndpointError(f"{path} closed the connection without answering")
                buffer += data
        except OSError as exc:
            raise StatusEndpointError(f"cannot reach the status endpoint {path}: {exc}") from exc
    answer = protocol.decode(buffer.split(b"\n", 1)[0])
    if not answer.get("ok"):
        problem = answer.get("error") or {}
        raise StatusEndpointError(f"{path}: {problem.get('code')}: {problem.get('message')}")
    return answer


def endpoints(directory: str | None = None) -> list[str]:
    """The sockets in this user's runtime directory; stale ones (their process is gone) are removed."""
    directory = directory or protocol.runtime_dir()
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    found = []
    for name in names:
        if not name.endswith(".sock"):
            continue
        path = os.path.join(directory, name)
        pid = _pid_of(name)
        if pid is not None and pid != os.getpid() and not _alive(pid):
            try:
                os.unlink(path)
            except OSError:
                pass
            continue
        found.append(path)
    return found


def live_runs(directory: str | None = None, timeout: float = 2.0, *, include_self: bool = False) -> list[Endpoint]:
    """Ask every endpoint of this user for its runs (this process's own only with ``include_self``)."""
    out = []
    for path in endpoints(directory):
        pid = _pid_of(os.path.basename(path))
        if pid == os.getpid() and not include_self:
            continue
        try:
            answer = request(path, {"op": "runs"}, timeout)
        except StatusEndpointError as exc:
            out.append(Endpoint(path, pid, error=str(exc)))
            continue
        out.append(Endpoint(path, answer.get("pid", pid), list(answer.get("command") or []),
                            list(answer.get("runs") or [])))
    return out


_NOT_OVER = frozenset({"running", "paused"})
_RUNNING = frozenset({"running"})


def live_run_ids(timeout: float = 1.0, *, running_only: bool = False) -> dict[str, int | None]:
    """The runs another live process of this user has not ended (running, or paused unless
    ``running_only``: their status endpoints say; those a process finished and still shows
    for ``agent top`` are over), with that process's pid."""
    wanted = _RUNNING if running_only else _NOT_OVER
    return {run["run_id"]: endpoint.pid for endpoint in live_runs(timeout=timeout) for run in endpoint.runs
            if run.get("status") in wanted and isinstance(run.get("run_id"), str)}


def _pid_of(name: str) -> int | None:
    stem = name[: -len(".sock")]
    return int(stem) if stem.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
