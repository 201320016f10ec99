"""agentd's wire protocol: length-prefixed msgpack maps over a Unix stream socket.

Every frame is a 4-byte big-endian length and a msgpack map with an ``"op"``. A
connection opens with ``hello`` (the client's protocol version and role); agentd
answers ``{"op": "welcome", ...}`` or an error and closes, so a client of another
release gets a clear message instead of a confusing one later. Roles:

* ``control`` (agentctl): one request, one reply (``{"op": "reply", "ok": ...}``),
  in order;
* ``admission`` (a plain ``Agent.run()`` with ``AGENT_DAEMON=1``) and the job runners
  (over a socketpair agentd made for them): ``request`` / ``release`` / ``requeue``
  for resources; agentd pushes ``grant``, ``refused`` and ``preempt``.

Decoding is bounded (frame size, string and container lengths) and a frame that is
not a map with a string ``op`` is a protocol error: agentd drops that connection and
goes on serving the others.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgpack

from ..errors import DaemonProtocolError, DaemonUnavailableError

if TYPE_CHECKING:
    import asyncio

DEFAULT_SOCKET = "/run/agent/agentd.sock"
SOCKET_ENV = "AGENT_SOCKET"
PROTOCOL_VERSION = 1
"""Bumped on any incompatible change; both sides refuse a different version."""

MAX_FRAME = 16 * 1024 * 1024
"""The largest frame either side accepts (a workflow file is sent in one)."""

ROLES = ("control", "admission", "runner")

# Reply codes: what kind of refusal an error reply is (agentctl maps them to exit codes).
DENIED = "denied"
NOT_FOUND = "not_found"
INVALID = "invalid"
VERSION = "version"
CONFLICT = "conflict"

_HEADER = struct.Struct("!I")


def encode(message: dict[str, Any]) -> bytes:
    """One frame: length header and msgpack body."""
    body = msgpack.packb(message, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise DaemonProtocolError(
            f"a {message.get('op')!r} message of {len(body)} bytes is over the {MAX_FRAME}-byte frame cap"
        )
    return _HEADER.pack(len(body)) + body


def decode(body: bytes) -> dict[str, Any]:
    """The message in one frame body; raises DaemonProtocolError when it is not a valid one."""
    try:
        message = msgpack.unpackb(
            body, raw=False, strict_map_key=True, use_list=True,
            max_str_len=MAX_FRAME, max_bin_len=MAX_FRAME, max_array_len=1 << 20, max_map_len=1 << 20,
        )
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise DaemonProtocolError(f"undecodable frame: {type(exc).__name__}: {exc}") from None
    if not isinstance(message, dict) or not isinstance(message.get("op"), str):
        raise DaemonProtocolError("a frame must be a map with a str 'op'")
    return message


class FrameBuffer:
    """Bytes in, whole messages out (for readers that get data in arbitrary pieces)."""

    __slots__ = ("_data",)

    def __init__(self) -> None:
        self._data = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """Add ``data``; return every message now complete (raises on a bad or oversized one)."""
        buf = self._data
        buf += data
        out = []
        while len(buf) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(buf)
            if size > MAX_FRAME:
                raise DaemonProtocolError(f"a frame of {size} bytes is over the {MAX_FRAME}-byte cap")
            end = _HEADER.size + size
            if len(buf) < end:
                break
            out.append(decode(bytes(buf[_HEADER.size:end])))
            del buf[:end]
        return out


def socket_path(given: str | None = None) -> str:
    """agentd's socket: ``given``, else ``$AGENT_SOCKET``, else ``/run/agent/agentd.sock``."""
    import os

    return given or os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET


def hello(role: str, **fields: Any) -> dict[str, Any]:
    """The first message of a connection."""
    return {"op": "hello", "version": PROTOCOL_VERSION, "role": role, **fields}


def version_mismatch(theirs: Any, who: str) -> str | None:
    """Why a peer speaking protocol ``theirs`` cannot be served (None when it can)."""
    if theirs == PROTOCOL_VERSION:
        return None
    return (
        f"{who} speaks control protocol {theirs!r} but this side speaks {PROTOCOL_VERSION}: "
        "use agentctl and agentd from the same release (restart agentd after an upgrade)"
    )


class Link:
    """One connection served by an event loop (either side): frames out, each message in to ``on_message``.

    ``on_lost(why)`` is called once, when the peer closes, on an error, or on a malformed frame.
    """

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop,
                 on_message: Callable[[dict[str, Any]], None], on_lost: Callable[[str], None]) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.loop = loop
        self.on_message = on_message
        self.on_lost = on_lost
        self._frames = FrameBuffer()
        self._out = bytearray()
        self.closed = False
        loop.add_reader(sock.fileno(), self._readable)

    def send(self, message: dict[str, Any]) -> None:
        if self.closed:
            raise DaemonUnavailableError("the connection is closed")
        pending = bool(self._out)
        self._out += encode(message)
        if not pending:
            self._writable()

    def _writable(self) -> None:
        try:
            sent = self.sock.send(self._out)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._lose(f"cannot write: {exc}")
            return
        del self._out[:sent]
        if self._out:
            self.loop.add_writer(self.sock.fileno(), self._writable)
        else:
            self.loop.remove_writer(self.sock.fileno())

    def _readable(self) -> None:
        self._read_once()

    def drain(self) -> None:
        """Handle everything already received (the peer is gone, but what it sent counts)."""
        while self._read_once():
            pass

    def _read_once(self) -> bool:
        """Read what is there and handle each whole message; False when nothing more can come now."""
        if self.closed:
            return False
        try:
            data = self.sock.recv(1 << 16)
        except BlockingIOError:
            return False
        except OSError as exc:
            self._lose(f"cannot read: {exc}")
            return False
        if not data:
            self._lose("the peer closed the connection")
            return False
        try:
            messages = self._frames.feed(data)
        except DaemonProtocolError as exc:
            self._lose(str(exc))
            return False
        for message in messages:
            self.on_message(message)
        return True

    def _lose(self, why: str) -> None:
        if not self.closed:
            self.close()
            self.on_lost(why)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if not self.loop.is_closed():
            self.loop.remove_reader(self.sock.fileno())
            self.loop.remove_writer(self.sock.fileno())
        self.sock.close()


class BlockingChannel:
    """A blocking client connection (agentctl): send a request, read its reply."""

    def __init__(self, path: str, timeout: float | None = 30.0) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError as exc:
            self.sock.close()
            raise DaemonUnavailableError(
                f"cannot reach agentd at {path}: {exc.strerror or exc}; start it (systemctl start agentd, "
                "or agentd --socket PATH --state-dir DIR), or point AGENT_SOCKET (agentctl: --socket) at its socket"
            ) from None
        self._frames = FrameBuffer()
        self._ready: list[dict[str, Any]] = []

    def send(self, message: dict[str, Any]) -> None:
        try:
            self.sock.sendall(encode(message))
        except OSError as exc:
            raise DaemonUnavailableError(f"lost the connection to agentd at {self.path}: {exc}") from None

    def receive(self) -> dict[str, Any]:
        while not self._ready:
            try:
                data = self.sock.recv(1 << 16)
            except OSError as exc:
                raise DaemonUnavailableError(f"lost the connection to agentd at {self.path}: {exc}") from None
            if not data:
                raise DaemonUnavailableError(f"agentd at {self.path} closed the connection")
            self._ready.extend(self._frames.feed(data))
        return self._ready.pop(0)

    def call(self, message: dict[str, Any]) -> dict[str, Any]:
        self.send(message)
        return self.receive()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "BlockingChannel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
