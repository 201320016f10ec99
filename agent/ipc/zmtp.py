"""The child's end of the channel: a ZeroMQ DEALER that speaks ZMTP 3.0 itself.

The supervisor's ROUTER is libzmq. A child talks to exactly that one peer for one
attempt, so it speaks the wire protocol (ZMTP 3.0, RFC 23, NULL security) directly
over the ``ipc://`` Unix socket instead of starting a libzmq context: a context starts
two threads in every child, and a process with threads pays an inter-processor TLB
flush on each copy-on-write fault it takes after the zygote's fork. This end does only
what one DEALER connected to one ROUTER needs: the greeting, the READY handshake that
carries the routing id, and single-frame messages. Anything else from the peer is a
:class:`~agent.errors.ProtocolError`.

Sends return once the kernel holds the whole frame, and wait only while the
supervisor's receive buffer is full (back pressure). Closing waits until the supervisor
has read everything (:meth:`DealerTransport.close`).
"""

from __future__ import annotations

import asyncio
import select
import socket
import struct
import time

from ..errors import ProtocolError

_SIGNATURE = b"\xff" + b"\0" * 8 + b"\x7f"
GREETING = _SIGNATURE + b"\x03\x00" + b"NULL".ljust(20, b"\0") + b"\0" + b"\0" * 31
"""Our greeting: ZMTP 3.0, NULL mechanism, as a client (64 bytes)."""

_MORE = 0x01
_LONG = 0x02
_COMMAND = 0x04
_LONG_SIZE = struct.Struct("!Q")
_PROPERTY_SIZE = struct.Struct("!I")
_READ_SIZE = 1 << 16


def frame_header(size: int, flags: int = 0) -> bytes:
    """A ZMTP frame's header: flags, then a 1- or 8-byte size."""
    if size <= 255:
        return bytes((flags, size))
    return bytes((flags | _LONG,)) + _LONG_SIZE.pack(size)


def frame(body: bytes, flags: int = 0) -> bytes:
    """One ZMTP frame: its header, then the body."""
    return frame_header(len(body), flags) + body


def ready_command(socket_type: bytes, routing_id: bytes) -> bytes:
    """The NULL mechanism's READY command with our socket type and routing id."""
    body = b"\x05READY"
    for name, value in ((b"Socket-Type", socket_type), (b"Identity", routing_id)):
        body += bytes((len(name),)) + name + _PROPERTY_SIZE.pack(len(value)) + value
    return frame(body, _COMMAND)


def parse_properties(data: bytes) -> dict[bytes, bytes]:
    """The metadata of a READY command."""
    props, pos = {}, 0
    while pos < len(data):
        size = data[pos]
        name = data[pos + 1 : pos + 1 + size]
        pos += 1 + size
        if pos + 4 > len(data):
            raise ProtocolError("truncated READY metadata from the supervisor")
        (length,) = _PROPERTY_SIZE.unpack_from(data, pos)
        pos += 4
        props[name.lower()] = data[pos : pos + length]
        pos += length
    return props


LINGER = 5.0
"""Seconds a closing channel waits, at most, for the supervisor to read what it sent (libzmq's
LINGER, for a DEALER)."""


def connect(endpoint: str, routing_id: bytes = b"") -> socket.socket:
    """A stream socket connected to the ROUTER at ``endpoint`` (``ipc://`` only), our greeting
    and READY (announcing ``routing_id``) sent: the peer's half of the handshake then arrives while
    this end does something else, and the first :meth:`DealerTransport.send` need not wait."""
    if not endpoint.startswith("ipc://"):
        raise ValueError(f"a child connects over ipc:// only, not {endpoint!r}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(endpoint[len("ipc://"):])
        sock.sendall(GREETING + ready_command(b"DEALER", routing_id))
    except BaseException:
        sock.close()
        raise
    return sock


def connected_endpoint(sock: socket.socket) -> str:
    """The ``ipc://`` endpoint ``sock`` is connected to."""
    return "ipc://" + str(sock.getpeername())


class DealerTransport:
    """A child's DEALER connection to the supervisor's ROUTER, made after fork, in the child.

    ``routing_id`` is announced in the handshake; a child announces none, so the ROUTER
    gives the connection one of its own that no other process can claim (the child
    names its attempt in its hello instead). ``max_frame`` caps what the supervisor may send.
    """

    def __init__(
        self,
        endpoint: str,
        routing_id: bytes,
        *,
        max_frame: int = 1 << 62,
        linger: float = LINGER,
        peer_hwm: int = 0,
    ) -> None:
        self._start(connect(endpoint, routing_id), endpoint, routing_id, max_frame, linger, peer_hwm, announced=True)

    @classmethod
    def over(
        cls, sock: socket.socket, routing_id: bytes, *, max_frame: int = 1 << 62, linger: float = LINGER,
        peer_hwm: int = 0, announced: bool = False, endpoint: str = "",
    ) -> DealerTransport:
        """A DEALER on a connected stream socket: a socketpair (the zygote's warm-up, a
        worker's channel), or one :func:`connect` made ahead (``announced``: our greeting
        and READY are sent already)."""
        self = cls.__new__(cls)
        self._start(sock, endpoint, routing_id, max_frame, linger, peer_hwm, announced=announced)
        return self

    def _start(
        self, sock: socket.socket, endpoint: str, routing_id: bytes, max_frame: int, linger: float,
        peer_hwm: int, *, announced: bool,
    ) -> None:
        self.endpoint = endpoint
        self._max_frame = max_frame
        self._linger = linger
        self._peer_hwm = peer_hwm
        self._sent = 0
        self._sock = sock
        if not announced:
            try:
                self._write(GREETING + ready_command(b"DEALER", routing_id))
            except BaseException:
                sock.close()
                raise
        self._buffer = bytearray()
        self._greeted = False  # the peer's greeting and READY have been read
        self._eof = False
        self._waiter: asyncio.Future[None] | None = None
        self._watching: asyncio.AbstractEventLoop | None = None  # the loop the socket is watched on

    def read_handshake_ahead(self) -> None:
        """Read and check the peer's handshake as far as it has come, without waiting (a
        parked child does it while it waits, so that its first send need not)."""
        if not self._greeted:
            self._handshake(wait=False)

    def set_bounds(self, *, max_frame: int, peer_hwm: int, linger: float) -> None:
        """The frame cap, the peer's high-water mark and the linger of :meth:`close`, for a
        transport made before they were known (a parked child's)."""
        self._max_frame, self._peer_hwm, self._linger = max_frame, peer_hwm, linger

    def send(self, data: bytes) -> None:
        """Send one single-frame message (the first waits for the peer's handshake)."""
        if not self._greeted:
            self._handshake(wait=True)
        self._sent += 1
        if len(data) < _READ_SIZE:
            self._write(frame(data))
        else:  # not copied into one buffer with its header
            self._write(frame_header(len(data)))
            self._write(data)

    def send_many(self, messages: list[bytes]) -> None:
        """Send single-frame messages in one write where they are small (one wake-up of the peer)."""
        if sum(len(m) for m in messages) >= _READ_SIZE:
            for message in messages:
                self.send(message)
            return
        if not self._greeted:
            self._handshake(wait=True)
        self._sent += len(messages)
        self._write(b"".join([frame(m) for m in messages]))

    def _write(self, data: bytes) -> None:
        """Write all of ``data``, waiting while the peer's buffer is full.

        Not ``sendall``: once the loop watches the socket, it is non-blocking (libuv makes
        every polled descriptor so), and ``sendall`` would give up half-way through a
        frame, leaving the stream corrupt.
        """
        view = memoryview(data)
        while view:
            try:
                sent = self._sock.send(view)
            except BlockingIOError:
                self._wait(select.POLLOUT)
                continue
            view = view[sent:]

    def _wait(self, event: int, timeout: float | None = None) -> bool:
        """Block until the socket is ready for ``event``; False after ``timeout`` seconds."""
        poller = select.poll()
        poller.register(self._sock, event)
        return bool(poller.poll(None if timeout is None else timeout * 1000))

    def _handshake(self, *, wait: bool) -> None:
        """Read and check the peer's greeting and READY: until both came (``wait``; libzmq
        drops a peer whose messages arrive before it has sent its own READY), or as far as
        they have come."""
        while not self._read_handshake():
            try:
                data = self._sock.recv(_READ_SIZE, 0 if wait else socket.MSG_DONTWAIT)
            except BlockingIOError:
                if not wait:
                    return
                self._wait(select.POLLIN)
                continue
            if not data:
                raise ConnectionError("the supervisor closed the channel during the handshake")
            self._buffer += data

    async def recv(self) -> bytes:
        """The next message from the supervisor."""
        while True:
            message = self._next_message()
            if message is not None:
                return message
            if self._eof:
                raise ConnectionError("the supervisor closed the channel")
            await self._readable()

    async def aclose(self) -> None:
        self.close()

    def close(self) -> None:
        """Close once the supervisor has read everything sent (a lingering close).

        libzmq stops reading a connection whose messages reach its high-water mark, and
        if the peer has gone by then, drops what it had not read. So this end shuts its
        sending side, reads (and discards) until the supervisor closes the connection,
        which libzmq does once it has read the EOF, so after every frame, and only then
        closes: at most ``linger`` seconds, like libzmq's own LINGER. Fewer messages than
        half the ROUTER's high-water mark (``peer_hwm``) can never reach it: then this end
        closes at once, which is every attempt that writes less than a few hundred values.
        """
        if self._sock.fileno() < 0:
            return
        self._unwatch()
        if self._sent < self._peer_hwm // 2:
            self._sock.close()
            return
        try:
            self._sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + self._linger
            while (left := deadline - time.monotonic()) > 0 and self._wait(select.POLLIN, left):
                try:
                    if not self._sock.recv(_READ_SIZE):
                        break
                except BlockingIOError:
                    continue
        except OSError:
            pass  # the supervisor is gone already
        finally:
            self._sock.close()

    # --- reading ---------------------------------------------------------------------------

    async def _readable(self) -> None:
        """Wait until the socket had something to read (read into the buffer by then)."""
        loop = asyncio.get_running_loop()
        if self._watching is not loop:
            self._watch(loop)
        waiter = self._waiter = loop.create_future()
        try:
            await waiter
        finally:
            if self._waiter is waiter:  # else a later reader (this one was cancelled) waits now
                self._waiter = None

    def _watch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Watch the socket on ``loop`` from now on, not once per message (two ``epoll_ctl``
        calls and a handle each time, which a worker paid for every state it ran)."""
        self._unwatch()
        loop.add_reader(self._sock.fileno(), self._on_readable)
        self._watching = loop

    def _unwatch(self) -> None:
        loop, self._watching = self._watching, None
        if loop is not None and not loop.is_closed():
            loop.remove_reader(self._sock.fileno())

    def _on_readable(self) -> None:
        """Read what came (so that a socket nobody waits on does not wake the loop again)."""
        self._fill()
        if self._eof:
            self._unwatch()  # an ended stream stays readable: watched, it would wake the loop for ever
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fill(self) -> None:
        """Read what the socket holds now (all of it: a big frame needs no wake-up per chunk)."""
        while True:
            try:
                data = self._sock.recv(_READ_SIZE, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self._eof = True
                return
            self._buffer += data
            if len(data) < _READ_SIZE:
                return

    def _next_message(self) -> bytes | None:
        """Pop one message from the buffer, handling the handshake and commands first."""
        while True:
            if not self._greeted:
                if not self._read_handshake():
                    return None
                continue
            parsed = self._pop_frame()
            if parsed is None:
                return None
            flags, body = parsed
            if flags & _COMMAND:
                continue  # e.g. a heartbeat: nothing for a one-attempt peer to do
            if flags & _MORE:
                raise ProtocolError("the supervisor sent a multipart message; one frame was expected")
            return body

    def _read_handshake(self) -> bool:
        if len(self._buffer) < len(GREETING):
            return False
        greeting = bytes(self._buffer[: len(GREETING)])
        if greeting[0] != 0xFF or greeting[9] != 0x7F or greeting[10] < 3:
            raise ProtocolError("the peer is not a ZMTP 3 endpoint")
        if greeting[12:32].rstrip(b"\0") != b"NULL":
            raise ProtocolError(f"the peer wants security mechanism {greeting[12:32]!r}, not NULL")
        parsed = self._pop_frame(len(GREETING))
        if parsed is None:
            return False
        flags, body = parsed
        if not flags & _COMMAND or not body.startswith(b"\x05READY"):
            raise ProtocolError("the peer did not send READY after its greeting")
        socket_type = parse_properties(body[6:]).get(b"socket-type")
        if socket_type != b"ROUTER":
            raise ProtocolError(f"the peer is a {socket_type!r} socket, not the supervisor's ROUTER")
        self._greeted = True
        return True

    def _pop_frame(self, start: int = 0) -> tuple[int, bytes] | None:
        """Remove and return (flags, body) of the frame at ``start``, or None if incomplete."""
        buf = self._buffer
        if len(buf) < start + 2:
            return None
        flags = buf[start]
        if flags & _LONG:
            header = 9
            if len(buf) < start + header:
                return None
            (size,) = _LONG_SIZE.unpack_from(buf, start + 1)
        else:
            header, size = 2, buf[start + 1]
        if size > self._max_frame:
            raise ProtocolError(f"a {size}-byte frame from the supervisor is over the cap")
        end = start + header + size
        if len(buf) < end:
            return None
        body = bytes(buf[start + header : end])
        del buf[:end]
        return flags, body
