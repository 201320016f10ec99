"""The status protocol: where endpoints listen, and what a request and an answer look like.

Every process that runs agents listens on a Unix socket, ``<pid>.sock``, in a per-user
directory (:func:`runtime_dir`), mode 0700, which only that user (and root) may enter;
the server also checks each client's uid with ``SO_PEERCRED``. A client sends one JSON
object per line and reads one JSON object per line back, as many as it likes on one
connection. ``agentd`` serves the same requests on its own socket. The full
description, with examples, is ``docs/status-protocol.md``.

Requests: ``{"v": 1, "op": "hello"}``, ``{"v": 1, "op": "runs"}``,
``{"v": 1, "op": "run", "run_id": "..."}``. Answers carry ``"v"`` (the server's
version) and ``"ok"``; a failure is ``{"v": 1, "ok": false, "error": {"code": ...,
"message": ...}}``. Fields may be added within a version; clients ignore what they do
not know. A server refuses a request of a newer version than its own
(``unsupported_version``), so a client can fall back.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Mapping
from typing import Any

from ..errors import StatusEndpointError

VERSION = 1
OPS = ("hello", "runs", "run")
MAX_LINE = 64 * 1024
"""The longest request a server reads; answers may be longer (a client reads to the newline)."""


def runtime_dir(env: Mapping[str, str] | None = None, uid: int | None = None) -> str:
    """The directory of this user's status sockets (or those of a process of ``uid`` that
    runs with environment ``env``).

    ``$AGENT_RUNTIME_DIR`` when set; else ``$XDG_RUNTIME_DIR/agent`` (``/run/user/UID/agent``
    where systemd made that directory); else ``/tmp/agent-UID``.
    """
    env = os.environ if env is None else env
    configured = env.get("AGENT_RUNTIME_DIR")
    if configured:
        return configured
    uid = os.getuid() if uid is None else uid
    for base in (env.get("XDG_RUNTIME_DIR"), f"/run/user/{uid}"):
        if base and _owned_directory(base, uid):
            return os.path.join(base, "agent")
    return f"/tmp/agent-{uid}"


def ensure_private(directory: str) -> str:
    """Create ``directory`` 0700 if needed; refuse one another user owns or others may enter."""
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        info = os.lstat(directory)
    except OSError as exc:
        raise StatusEndpointError(f"cannot create the status directory {directory}: {exc}") from exc
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise StatusEndpointError(
            f"{directory} is not a private directory of uid {os.getuid()} (owner {info.st_uid}, "
            f"mode {stat.filemode(info.st_mode)}): remove it, or set AGENT_RUNTIME_DIR"
        )
    return directory


def _owned_directory(path: str, uid: int) -> bool:
    try:
        info = os.stat(path)
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == uid


def socket_path(pid: int, directory: str | None = None) -> str:
    return os.path.join(directory or runtime_dir(), f"{pid}.sock")


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":"), default=str).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    try:
        message = json.loads(line)
    except ValueError as exc:
        raise StatusEndpointError(f"not a JSON line: {exc}") from None
    if not isinstance(message, dict):
        raise StatusEndpointError(f"a message is a JSON object, got {type(message).__name__}")
    return message


def error(code: str, message: str) -> dict[str, Any]:
    return {"v": VERSION, "ok": False, "error": {"code": code, "message": message}}
