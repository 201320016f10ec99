"""agentd's wire protocol: length-prefixed msgpack maps over a Unix stream socket.

Every frame is a 4-byte big-endian length and a msgpack map with an ``"op"``. A
connection opens with ``hello`` (the client's protocol version and role); agentd
answers ``{"op": "welcome", ...}`` or an error and closes, so a client of another
release gets a clear message instead of a confusing one later. Roles:

* ``control`` (agentctl): one request, one reply (``{"op": "reply", "ok": ...}``),
  in order;
* ``admission`` (a plain ``Agent.run()`` with ``AGENT_DAEMON=1``) and the job runners
  (over a socketpair agentd made for them): ``request`` / ``release`` / ``requeue``
  for resources, agentd pushes ``grant``, ``refused`` and ``preempt``; ``coordinate`` /
  ``uncoordinate`` for box-wide coordination, answered ``coordinated`` or
  ``coordination_refused``.

Decoding is bounded (frame size, string and container lengths) and a frame that is
not a map with a string ``op`` is a protocol error: agentd drops that connection and
goes on serving the others.

Importing this module costs agentctl almost nothing: :class:`BlockingChannel` (the
client side of a control connection) needs only ``_socket`` and a small codec of its
own (:func:`pack`, :func:`unpack`: every msgpack type but ext), and the error types are
imported when raised. ``socket``, ``typing``, ``msgpack`` and :mod:`agent.errors` would
have tripled agentctl's start (enum classes, regular expressions, dataclasses); agentd
and its runners keep using msgpack itself (:func:`encode`, :func:`decode`, :class:`Link`).
"""

from __future__ import annotations

import _socket
import struct

TYPE_CHECKING = False
if TYPE_CHECKING:
    import asyncio
    import socket
    from collections.abc import Callable
    from typing import Any

    from ..errors import DaemonProtocolError, DaemonUnavailableError

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


def _protocol_error(message: str) -> DaemonProtocolError:
    from ..errors import DaemonProtocolError

    return DaemonProtocolError(message)


def _unavailable(message: str) -> DaemonUnavailableError:
    from ..errors import DaemonUnavailableError

    return DaemonUnavailableError(message)


def _frame(message: dict[str, Any], body: bytes) -> bytes:
    if len(body) > MAX_FRAME:
        raise _protocol_error(
            f"a {message.get('op')!r} message of {len(body)} bytes is over the {MAX_FRAME}-byte frame cap"
        )
    return _HEADER.pack(len(body)) + body


def encode(message: dict[str, Any]) -> bytes:
    """One frame: length header and msgpack body."""
    import msgpack

    return _frame(message, msgpack.packb(message, use_bin_type=True))


def _checked(message: Any) -> dict[str, Any]:
    if not isinstance(message, dict) or not isinstance(message.get("op"), str):
        raise _protocol_error("a frame must be a map with a str 'op'")
    return message


def decode(body: bytes) -> dict[str, Any]:
    """The message in one frame body; raises DaemonProtocolError when it is not a valid one."""
    import msgpack

    try:
        message = msgpack.unpackb(
            body, raw=False, strict_map_key=True, use_list=True,
            max_str_len=MAX_FRAME, max_bin_len=MAX_FRAME, max_array_len=1 << 20, max_map_len=1 << 20,
        )
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise _protocol_error(f"undecodable frame: {type(exc).__name__}: {exc}") from None
    return _checked(message)


# --- the client's codec: msgpack without the msgpack package --------------------------------

_FLOAT = struct.Struct("!d")


def _sized(out: bytearray, size: int, fix: int | None, fix_max: int, codes: tuple[int, int, int]) -> None:
    """A str, bin, array or map header: the fix form when there is one and ``size`` fits, else 8/16/32 bits."""
    if fix is not None and size <= fix_max:
        out.append(fix | size)
    elif size <= 0xFF and codes[0]:
        out += bytes((codes[0], size))
    elif size <= 0xFFFF:
        out.append(codes[1])
        out += size.to_bytes(2, "big")
    elif size <= 0xFFFF_FFFF:
        out.append(codes[2])
        out += size.to_bytes(4, "big")
    else:
        raise _protocol_error(f"a value of {size} items or bytes is too large to send")


def _pack_into(out: bytearray, value: Any) -> None:
    if value is None:
        out.append(0xC0)
    elif value is True or value is False:
        out.append(0xC3 if value else 0xC2)
    elif isinstance(value, int):
        if -0x20 <= value <= 0x7F:  # a positive or negative fixint: the byte itself
            out.append(value & 0xFF)
            return
        signed = value < 0
        for width, code in ((1, 0xCC), (2, 0xCD), (4, 0xCE), (8, 0xCF)):
            try:
                data = value.to_bytes(width, "big", signed=signed)
            except OverflowError:
                continue
            out.append(code + 4 * signed)  # 0xD0..0xD3: int 8..64
            out += data
            return
        raise _protocol_error(f"the integer {value} does not fit in 64 bits")
    elif isinstance(value, float):
        out.append(0xCB)
        out += _FLOAT.pack(value)
    elif isinstance(value, str):
        try:
            data = value.encode("utf-8")
        except UnicodeEncodeError:  # a path or an argument with bytes that are not UTF-8
            raise _protocol_error(f"cannot send {value!r} to agentd: it is not valid UTF-8") from None
        _sized(out, len(data), 0xA0, 31, (0xD9, 0xDA, 0xDB))
        out += data
    elif isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        _sized(out, len(data), None, 0, (0xC4, 0xC5, 0xC6))
        out += data
    elif isinstance(value, (list, tuple)):
        _sized(out, len(value), 0x90, 15, (0, 0xDC, 0xDD))
        for item in value:
            _pack_into(out, item)
    elif isinstance(value, dict):
        _sized(out, len(value), 0x80, 15, (0, 0xDE, 0xDF))
        for key, item in value.items():
            _pack_into(out, key)
            _pack_into(out, item)
    else:
        raise _protocol_error(f"cannot send a {type(value).__name__} to agentd")


def pack(value: Any) -> bytes:
    """``value`` as msgpack (what ``msgpack.packb(value, use_bin_type=True)`` reads back the same)."""
    out = bytearray()
    _pack_into(out, value)
    return bytes(out)


_FIXED = {0xCA: struct.Struct("!f"), 0xCB: _FLOAT, 0xCC: struct.Struct("!B"), 0xCD: struct.Struct("!H"),
          0xCE: struct.Struct("!I"), 0xCF: struct.Struct("!Q"), 0xD0: struct.Struct("!b"),
          0xD1: struct.Struct("!h"), 0xD2: struct.Struct("!i"), 0xD3: struct.Struct("!q")}
_LENGTHS = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4, 0xDC: 2, 0xDD: 4, 0xDE: 2, 0xDF: 4}


def _unpack_from(data: bytes, at: int) -> tuple[Any, int]:
    """The value that starts at ``data[at]`` and the offset after it (IndexError/ValueError when malformed)."""
    code = data[at]
    at += 1
    if code <= 0x7F:
        return code, at
    if code >= 0xE0:
        return code - 0x100, at
    if code in _FIXED:
        fixed = _FIXED[code]
        if at + fixed.size > len(data):
            raise ValueError("truncated")
        return fixed.unpack_from(data, at)[0], at + fixed.size
    if code == 0xC0:
        return None, at
    if code in (0xC2, 0xC3):
        return code == 0xC3, at
    if 0xA0 <= code <= 0xBF or 0x90 <= code <= 0x9F or 0x80 <= code <= 0x8F:
        size = code & (0x1F if code >= 0xA0 else 0x0F)
    elif code in _LENGTHS:
        width = _LENGTHS[code]
        if at + width > len(data):
            raise ValueError("truncated")
        size = int.from_bytes(data[at:at + width], "big")
        at += width
    else:
        raise ValueError(f"type 0x{code:02x} is not one agentd sends")
    if 0xA0 <= code <= 0xBF or code in (0xD9, 0xDA, 0xDB, 0xC4, 0xC5, 0xC6):
        if at + size > len(data):
            raise ValueError("truncated")
        raw = data[at:at + size]
        return (raw if code in (0xC4, 0xC5, 0xC6) else raw.decode("utf-8")), at + size
    if 0x90 <= code <= 0x9F or code in (0xDC, 0xDD):
        items = []
        for _ in range(size):
            item, at = _unpack_from(data, at)
            items.append(item)
        return items, at
    out = {}
    for _ in range(size):
        key, at = _unpack_from(data, at)
        out[key], at = _unpack_from(data, at)
    return out, at


def unpack(data: bytes) -> Any:
    """The one msgpack value ``data`` holds (raises DaemonProtocolError when it holds anything else)."""
    try:
        value, end = _unpack_from(data, 0)
    except (IndexError, ValueError, TypeError, RecursionError) as exc:
        raise _protocol_error(f"undecodable frame: {type(exc).__name__}: {exc}") from None
    if end != len(data):
        raise _protocol_error(f"undecodable frame: {len(data) - end} bytes after its message")
    return value


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
                raise _protocol_error(f"a frame of {size} bytes is over the {MAX_FRAME}-byte cap")
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
            raise _unavailable("the connection is closed")
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
        from ..errors import DaemonProtocolError

        try:
            messages = self._frames.feed(data)
        except DaemonProtocolError as exc:
            self._lose(str(exc))
            return False
        for message in messages:
            if self.closed:  # closed by a message before (a refused hello): the rest is not read
                break
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
    """A blocking client connection (agentctl): send a request, read its reply.

    It speaks through :func:`pack` and :func:`unpack` and a plain ``_socket`` (see the
    module docstring); ``sock`` is that socket.
    """

    def __init__(self, path: str, timeout: float | None = 30.0) -> None:
        self.path = path
        self.sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError as exc:
            self.sock.close()
            raise _unavailable(
                f"cannot reach agentd at {path}: {exc.strerror or exc}; start it (systemctl start agentd, "
                "or agentd --socket PATH --state-dir DIR), or point AGENT_SOCKET (agentctl: --socket) at its socket"
            ) from None
        self._data = bytearray()

    def send(self, *messages: dict[str, Any]) -> None:
        """Send ``messages`` in one write."""
        frames = b"".join(_frame(message, pack(message)) for message in messages)
        try:
            self.sock.sendall(frames)
        except OSError as exc:
            raise _unavailable(f"lost the connection to agentd at {self.path}: {exc}") from None

    def _read(self, size: int) -> bytes:
        while len(self._data) < size:
            try:
                data = self.sock.recv(max(1 << 16, size - len(self._data)))
            except OSError as exc:
                raise _unavailable(f"lost the connection to agentd at {self.path}: {exc}") from None
            if not data:
                raise _unavailable(f"agentd at {self.path} closed the connection")
            self._data += data
        out = bytes(self._data[:size])
        del self._data[:size]
        return out

    def receive(self) -> dict[str, Any]:
        (size,) = _HEADER.unpack(self._read(_HEADER.size))
        if size > MAX_FRAME:
            raise _protocol_error(f"a frame of {size} bytes is over the {MAX_FRAME}-byte cap")
        return _checked(unpack(self._read(size)))

    def call(self, message: dict[str, Any]) -> dict[str, Any]:
        self.send(message)
        return self.receive()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "BlockingChannel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
