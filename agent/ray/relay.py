"""The relay: a small Ray actor per driver that carries frames between state tasks and it.

A task cannot call its driver, and a driver cannot call into a running task, so both
talk to this actor. Tasks ``push`` their frames (context writes, human-input requests)
as they happen; the driver long-polls ``take``, which returns everything after the
sequence number the driver has seen and keeps it until a later ``take`` acknowledges it,
so an answer lost on the way (a driver that stopped waiting) is never lost for good.
Human-input answers go the other way through ``answer`` / ``wait_answer``.

The driver creates it (``num_cpus=0``, named ``agent-relay-<pid>-<random>`` so that a task
looks it up once per worker process, and only when it has something to send) with its
first Ray attempt, and owns it: it goes away with the driver. Frames it holds for
attempts that have ended are dropped by the driver, never applied. It keeps nothing but
bytes; it decodes nothing.
"""

from __future__ import annotations

import asyncio
from typing import Any


class Relay:
    """The actor's class (made a Ray actor by the driver)."""

    def __init__(self) -> None:
        self._entries: list[tuple[str, list[bytes]]] = []
        self._first = 0  # sequence number of _entries[0]
        self._arrived = asyncio.Event()
        self._answers: dict[tuple[str, int], bytes] = {}
        self._waiting: dict[tuple[str, int], asyncio.Future[bytes]] = {}

    async def push(self, token: str, frames: list[bytes]) -> None:
        """Frames from the attempt ``token``, in the order it sent them."""
        self._entries.append((token, frames))
        self._arrived.set()

    async def take(self, after: int, wait: float) -> tuple[int, list[tuple[str, list[bytes]]]]:
        """Entries numbered ``after`` and up (earlier ones are acknowledged and dropped);
        waits up to ``wait`` seconds for one when there are none. Returns the first one's
        number and the entries."""
        drop = min(max(0, after - self._first), len(self._entries))
        if drop:
            del self._entries[:drop]
            self._first += drop
        if not self._entries:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), wait)
            except asyncio.TimeoutError:
                pass
        return self._first, list(self._entries)

    async def answer(self, token: str, request_id: int, frame: bytes) -> None:
        """The driver's answer to one human-input request of attempt ``token``."""
        waiter = self._waiting.pop((token, request_id), None)
        if waiter is not None and not waiter.done():
            waiter.set_result(frame)
        else:
            self._answers[(token, request_id)] = frame

    async def wait_answer(self, token: str, request_id: int) -> bytes:
        """The answer to a request, once the driver has given it."""
        key = (token, request_id)
        if key in self._answers:
            return self._answers.pop(key)
        waiter: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiting[key] = waiter
        try:
            return await waiter
        finally:
            self._waiting.pop(key, None)

    async def forget(self, token: str) -> None:
        """Attempt ``token`` has ended: drop its answers and release its waiters."""
        for key in [k for k in self._answers if k[0] == token]:
            del self._answers[key]
        for key in [k for k in self._waiting if k[0] == token]:
            self._waiting.pop(key).cancel()

    def statistics(self) -> dict[str, Any]:
        """What it holds now (for tests and debugging)."""
        return {"entries": len(self._entries), "answers": len(self._answers), "waiting": len(self._waiting)}
