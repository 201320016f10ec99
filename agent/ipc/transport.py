"""How a child exchanges frames with its supervisor: a small protocol, two implementations.

:class:`DealerTransport` is the real one (a ZeroMQ DEALER whose routing id is the
child's secret); :class:`MemoryTransport` is an in-process pair for tests of the
child's protocol logic.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

import zmq
from zmq import backend as zmq_backend

_POLLIN = int(zmq.POLLIN)  # a plain int: ``EVENTS & zmq.POLLIN`` would build an enum per test


class Transport(Protocol):
    """One end of a frame channel; frames are delivered in order."""

    def send(self, frame: bytes) -> None:
        """Queue ``frame`` for the other end (never blocks the loop)."""

    async def recv(self) -> bytes:
        """The next frame from the other end."""

    async def aclose(self) -> None:
        """Flush what was sent and release the channel."""


class MemoryTransport:
    """An in-process end of a pair made by :meth:`pair`."""

    def __init__(self) -> None:
        self._inbox: asyncio.Queue[bytes] = asyncio.Queue()
        self.peer: MemoryTransport | None = None
        self.closed = False

    @classmethod
    def pair(cls) -> tuple["MemoryTransport", "MemoryTransport"]:
        a, b = cls(), cls()
        a.peer, b.peer = b, a
        return a, b

    def send(self, frame: bytes) -> None:
        if self.closed or self.peer is None:
            raise ConnectionError("memory transport is closed")
        self.peer._inbox.put_nowait(bytes(frame))

    async def recv(self) -> bytes:
        return await self._inbox.get()

    async def aclose(self) -> None:
        self.closed = True


class DealerTransport:
    """A child's DEALER socket on the supervisor's ROUTER; made after fork, in the child.

    A plain ZeroMQ socket whose descriptor is watched by the running loop: cheaper to set
    up than ``zmq.asyncio`` in a process that lives for one attempt. It uses pyzmq's
    backend classes, without the Python layer on top (socket registry, option
    properties): a quarter of a millisecond less per child. ``send`` does not wait for
    the peer; it blocks only past the high-water mark (back pressure).
    """

    def __init__(self, endpoint: str, routing_id: bytes, *, linger_ms: int = 5000) -> None:
        self._ctx = zmq_backend.Context()
        self._sock = zmq_backend.Socket(self._ctx, zmq.DEALER)
        self._sock.set(zmq.ROUTING_ID, routing_id)
        self._sock.set(zmq.LINGER, linger_ms)
        self._sock.connect(endpoint)
        self._waiter: asyncio.Future[None] | None = None

    def send(self, frame: bytes) -> None:
        self._sock.send(frame, copy=len(frame) < 65536)
        # Sending may consume the edge of the (edge-triggered) descriptor: look again.
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def recv(self) -> bytes:
        loop = asyncio.get_running_loop()
        fd = self._sock.get(zmq.FD)
        while True:
            if self._sock.get(zmq.EVENTS) & _POLLIN:
                return self._sock.recv(zmq.NOBLOCK)
            self._waiter = loop.create_future()
            loop.add_reader(fd, self._wake)
            try:
                await self._waiter
            finally:
                loop.remove_reader(fd)
                self._waiter = None

    async def aclose(self) -> None:
        self.close()

    def close(self) -> None:
        """Close the socket and terminate the context; LINGER lets libzmq finish writing."""
        self._sock.close()
        self._ctx.term()
