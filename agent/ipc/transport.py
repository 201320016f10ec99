"""How a child exchanges frames with its supervisor: a small protocol, two implementations.

:class:`~agent.ipc.zmtp.DealerTransport` is the real one (a ZeroMQ DEALER over the
``ipc://`` socket); :class:`MemoryTransport` is an in-process pair for tests of
the child's protocol logic.
"""

from __future__ import annotations

import asyncio
from typing import Protocol


class Transport(Protocol):
    """One end of a frame channel; frames are delivered in order."""

    def send(self, frame: bytes) -> None:
        """Hand ``frame`` to the other end; waits only while the peer's buffer is full."""

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
