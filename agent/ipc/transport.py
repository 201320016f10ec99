"""How a child exchanges frames with its supervisor: a small protocol, two implementations.

:class:`DealerTransport` is the real one (a ZeroMQ DEALER whose routing id is the
child's secret); :class:`MemoryTransport` is an in-process pair for tests of the
child's protocol logic.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

import zmq
import zmq.asyncio


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
    """A child's DEALER socket on the supervisor's ROUTER; made after fork, in the child."""

    def __init__(self, endpoint: str, routing_id: bytes, *, linger_ms: int = 5000) -> None:
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.ROUTING_ID, routing_id)
        self._sock.setsockopt(zmq.LINGER, linger_ms)
        self._sock.connect(endpoint)
        self._last_send: "asyncio.Future[object] | None" = None

    def send(self, frame: bytes) -> None:
        # pyzmq keeps queued sends in order; a failure surfaces when the channel closes.
        fut = self._sock.send(frame, copy=len(frame) < 65536)
        fut.add_done_callback(_retrieve)
        self._last_send = fut

    async def recv(self) -> bytes:
        return await self._sock.recv()

    async def aclose(self) -> None:
        if self._last_send is not None and not self._last_send.done():
            await asyncio.wait([self._last_send])
        self._sock.close()  # LINGER lets libzmq finish writing what is queued
        self._ctx.term()


def _retrieve(fut: "asyncio.Future[object]") -> None:
    if not fut.cancelled():
        fut.exception()
