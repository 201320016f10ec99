"""A worker's own channel to the supervisor: one socketpair, ZMTP as its DEALER speaks it.

A worker exchanges two messages per state with the supervisor for its whole life (a
``run`` in; a result and its next ``hello`` out). Through the process's ROUTER socket
each message also crosses libzmq's I/O thread, on the way in and on the way out: two
more wake-ups per message, which a loaded two-core machine turns into milliseconds per
state. So a worker gets a socket of its own instead: the supervisor makes a socketpair,
the worker receives one end with its spec (the zygote passes it on without using it)
and speaks to it exactly as to the ROUTER (:meth:`agent.ipc.zmtp.DealerTransport.over`);
the supervisor reads the other end on its event loop and writes to it directly.

The channel is the worker's identity: nothing else can write to it, so no routing id is
checked. What the ROUTER enforces is enforced here: a frame over the cap, a multipart
message or a malformed greeting is a protocol violation (``on_violation``), after
which nothing more is read.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable

from ..ipc.zmtp import GREETING, frame, ready_command
from ..values import FRAME_OVERHEAD

_GREETING_SIZE = len(GREETING)
_MORE, _LONG, _COMMAND = 0x01, 0x02, 0x04
_LONG_SIZE = struct.Struct("!Q")
_READ = 1 << 16


class DirectChannel:
    """The supervisor's end of one worker's socketpair."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        max_frame: int,
        on_frame: Callable[[bytes], None],
        on_violation: Callable[[str], None],
        on_close: Callable[[], None],
    ) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.setblocking(False)
        for sock in (ours, theirs):
            sock.set_inheritable(False)
        self._sock = ours
        self.child_end: socket.socket | None = theirs
        """The worker's end, passed to it at fork (then closed here by :meth:`child_started`)."""
        self._cap = max_frame + FRAME_OVERHEAD
        self._on_frame = on_frame
        self._on_violation = on_violation
        self._on_close = on_close
        self._loop = loop
        self._in = bytearray()
        self._out = bytearray(GREETING + ready_command(b"ROUTER", b""))  # its handshake reads this at once
        self._greeted = False
        self._writing = False
        self.closed = False
        loop.add_reader(ours.fileno(), self._readable)
        self._flush()

    def child_started(self) -> None:
        """The worker holds its end: drop ours, so that its exit reads as the end of the stream."""
        if self.child_end is not None:
            self.child_end.close()
            self.child_end = None

    def send(self, routing_id: bytes, data: bytes) -> None:
        """Send one message (``routing_id`` is ignored: the socket is the peer); ConnectionError when closed."""
        if self.closed:
            raise ConnectionError("the worker's channel is closed")
        self._out += frame(data)
        if not self._writing:
            self._flush()
            if self.closed:  # the worker had gone (its end is closed): nothing went out
                raise ConnectionError("the worker's channel closed as a message went out")

    def move_to(self, loop: asyncio.AbstractEventLoop) -> None:
        """Serve on ``loop`` from now on."""
        if loop is self._loop or self.closed:
            return
        fd = self._sock.fileno()
        if not self._loop.is_closed():
            self._loop.remove_reader(fd)
            if self._writing:
                self._loop.remove_writer(fd)
        self._loop = loop
        loop.add_reader(fd, self._readable)
        if self._writing:
            loop.add_writer(fd, self._flush)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if not self._loop.is_closed():
            self._loop.remove_reader(self._sock.fileno())
            if self._writing:
                self._loop.remove_writer(self._sock.fileno())
        self._sock.close()
        self.child_started()

    # --- writing -----------------------------------------------------------------------

    def _flush(self) -> None:
        while self._out:
            try:
                sent = self._sock.send(self._out)
            except BlockingIOError:
                break
            except OSError:
                self._out.clear()
                self._ended()
                return
            del self._out[:sent]
        want = bool(self._out)
        if want != self._writing and not self.closed:
            if want:
                self._loop.add_writer(self._sock.fileno(), self._flush)
            else:
                self._loop.remove_writer(self._sock.fileno())
            self._writing = want

    # --- reading -----------------------------------------------------------------------

    def _readable(self) -> None:
        while not self.closed:
            try:
                data = self._sock.recv(_READ)
            except BlockingIOError:
                break
            except OSError:
                data = b""
            if not data:
                self._parse()
                self._ended()
                return
            self._in += data
            if len(data) < _READ:
                break
        self._parse()

    def _parse(self) -> None:
        buf = self._in
        while not self.closed:
            if not self._greeted:
                if len(buf) < _GREETING_SIZE:
                    return
                if buf[0] != 0xFF or buf[9] != 0x7F:
                    self._violation("the worker's channel did not start with a ZMTP greeting")
                    return
                del buf[:_GREETING_SIZE]
                self._greeted = True
            if len(buf) < 2:
                return
            flags = buf[0]
            if flags & _LONG:
                if len(buf) < 9:
                    return
                header, (size,) = 9, _LONG_SIZE.unpack_from(buf, 1)
            else:
                header, size = 2, buf[1]
            if size > self._cap:
                self._violation(f"a {size}-byte frame from the worker is over the {self._cap}-byte cap")
                return
            if len(buf) < header + size:
                return
            body = bytes(buf[header : header + size])
            del buf[: header + size]
            if flags & _COMMAND:
                continue  # its READY: the socket itself says who it is
            if flags & _MORE:
                self._violation("a multipart message from the worker (one frame was expected)")
                return
            self._on_frame(body)

    def _violation(self, message: str) -> None:
        self._in.clear()
        self.close()
        self._on_violation(message)

    def _ended(self) -> None:
        if not self.closed:
            self.close()
            self._on_close()
