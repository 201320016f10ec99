"""The supervisor's end of the channel: one ROUTER socket for every child.

The socket lives on ``ipc://`` in a directory only its owner can enter (0700). It is a
plain (sync) ZeroMQ socket driven by ``loop.add_reader``, so the supervisor works on
whatever event loop its caller runs, and can move to the next loop between runs.
Frames over the size cap never reach Python: libzmq (``MAXMSGSIZE``) drops the
connection that sent them, which a socket monitor reports as a disconnect.
Children connect without a routing id of their own, so libzmq gives each connection a
fresh one that no other process can claim or block. Each frame carries the descriptor
it came in on, so the kernel's peer credentials (``SO_PEERCRED``) tell which process
opened the connection a frame came from.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import Callable

import zmq
from zmq.utils.monitor import recv_monitor_message

from ..values import FRAME_OVERHEAD

FrameHandler = Callable[[bytes, list[bytes | memoryview], int], None]
"""``on_frame(routing_id, frames, fd)``: every message received, in order."""

DisconnectHandler = Callable[[int], None]
"""``on_disconnect(fd)``: a child's connection went away."""

RECEIVE_HWM = 1000
"""Messages libzmq queues per child before it stops reading that child (its default)."""
_COPY_BELOW = 65536
_POLLIN = int(zmq.POLLIN)  # a plain int: ``EVENTS & zmq.POLLIN`` would build an enum per test


class RouterChannel:
    """A bound ROUTER socket plus its monitor, dispatching to callbacks."""

    def __init__(
        self,
        directory: str,
        *,
        max_frame: int,
        on_frame: FrameHandler,
        on_disconnect: DisconnectHandler,
    ) -> None:
        self.endpoint = f"ipc://{os.path.join(directory, 'supervisor.sock')}"
        self._on_frame = on_frame
        self._on_disconnect = on_disconnect
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        try:
            self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            self._sock.setsockopt(zmq.MAXMSGSIZE, max_frame + FRAME_OVERHEAD)
            self._sock.setsockopt(zmq.RCVHWM, RECEIVE_HWM)
            self._sock.setsockopt(zmq.LINGER, 0)
            old_umask = os.umask(0o077)
            try:
                self._sock.bind(self.endpoint)
            finally:
                os.umask(old_umask)
            self._monitor = self._sock.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        except BaseException:  # a context left to the garbage collector can hang it in term()
            self._sock.close(linger=0)
            self._ctx.term()
            raise
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        # Connections whose disconnect was reported while frames of theirs may still be
        # queued (until another connection gets their descriptor).
        self._gone: set[int] = set()

    # --- loop attachment ----------------------------------------------------------------

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        return self._loop

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Dispatch on ``loop`` from now on (detaching from the previous one)."""
        if self._loop is loop:
            return
        self.detach()
        loop.add_reader(self._sock.FD, self.drain)
        loop.add_reader(self._monitor.FD, self.drain)
        self._loop = loop
        loop.call_soon(self.drain)

    def detach(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._sock.FD)
            self._loop.remove_reader(self._monitor.FD)
        self._loop = None

    # --- traffic --------------------------------------------------------------------------

    def send(self, routing_id: bytes, frame: bytes) -> None:
        """Send one frame; raises ``ConnectionError`` when the peer is not connected."""
        try:
            self._sock.send_multipart([routing_id, frame], zmq.NOBLOCK, copy=len(frame) < 65536)
        except zmq.ZMQError as exc:
            raise ConnectionError(f"child is not connected: {exc}") from None
        finally:
            # Sending can consume the edge of the (edge-triggered) FD: look again.
            if self._loop is not None:
                self._loop.call_soon(self.drain)

    def drain(self) -> None:
        """Hand every frame and disconnect waiting now to the callbacks."""
        if self._closed:
            return
        while True:
            self._drain_monitor()
            try:
                if not self._sock.getsockopt(zmq.EVENTS) & _POLLIN:
                    return
                parts = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            fd = parts[-1].get(zmq.SRCFD)
            # A disconnect seen before this frame may free the fd it came in on: report it first.
            self._drain_monitor()
            # Big frames are not copied: their decoder reads libzmq's buffer.
            self._on_frame(parts[0].bytes, [p.bytes if len(p) < _COPY_BELOW else p.buffer for p in parts[1:]], fd)
            if fd in self._gone:
                # Its connection closed before this frame was read (a child that said hello
                # and exited at once): whoever the frame bound to it learns that now.
                self._on_disconnect(fd)

    def _drain_monitor(self) -> None:
        # Look before receiving: a zmq.Again per call costs more than the check.
        while self._monitor.getsockopt(zmq.EVENTS) & _POLLIN:
            try:
                event = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            fd = int(event["value"])
            if event["event"] == zmq.EVENT_DISCONNECTED:
                self._gone.add(fd)
                self._on_disconnect(fd)
            else:  # accepted: the descriptor is a new connection's now
                self._gone.discard(fd)

    def close(self) -> None:
        """Close the sockets and the ZeroMQ context; removes the socket file."""
        if self._closed:
            return
        self.detach()
        self._closed = True
        self._sock.disable_monitor()
        self._monitor.close(linger=0)
        self._sock.close(linger=0)
        self._ctx.term()
        path = self.endpoint[len("ipc://"):]
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def peer_credentials(fd: int) -> tuple[int, int] | None:
    """``(pid, uid)`` of the process that opened unix socket ``fd``, if the kernel says.

    The pid is 0 once that process has exited and been reaped (its uid is still known).
    """
    if fd < 0:
        return None
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return None
    try:
        cred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _gid = struct.unpack("3i", cred)
        return pid, uid
    except OSError:
        return None
    finally:
        sock.detach()
