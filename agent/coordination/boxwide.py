"""Coordination for the whole box: the primitives and rate limits agentd keeps per user.

DESIGN item 12: under agentd, a MUTEX on ``database_write`` holds across every job and
every script of the box that uses agentd's pool (``AGENT_DAEMON=1``, which agentd sets
for its jobs' runners), not only across the runs of one process. There
:func:`~agent.coordination.coordinator.default_coordinator` is a :class:`BoxCoordinator`:
each of its MUTEX, SEMAPHORE, LEASE and QUOTA primitives and each rate limit is taken
first in this process (the process's own FIFO, status, deadlock detection and reset work
as without agentd) and then from agentd, which keeps one of the same name and settings
for all of the user's jobs and scripts. A holding is given back to both when it ends, and
agentd gives back what a job or script still held when its connection closes (it ended,
crashed or was killed).

Decisions:

* agentd's coordination is per user. One user's names never meet another's: a tenant
  cannot hold another tenant's lock, nor fix the settings of a name another uses.
* The settings of a name are checked box-wide when a state first takes it: a job that
  declares ``database_write`` a SEMAPHORE while another job of the user still declares
  it a MUTEX fails that state with a :class:`~agent.errors.CoordinationError` naming
  the other job (agentd forgets a job's declarations when the job ends).
* A BARRIER counts the arrivals of one run, so it stays in the process.
* A state's ``wait_timeout`` bounds its whole wait, in the process and in agentd.
  agentd looks for deadlocks among the waits it holds; a cycle through a wait of this
  process and one of agentd is not seen as one.
* A process that loses agentd while one of its runs holds a box-wide primitive fails
  that run (a new agentd would give the name to another job), whether the agent declared
  it or a state's code took it, at every isolation level; code outside any run that
  holds one goes on (nothing to fail).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import Any, Protocol, cast

from ..errors import CoordinationError
from ..executor import FAIL_RUN
from ..resources import default_pool
from .coordinator import Coordinator
from .primitives import CapacityPrimitive, Primitive
from .primitives.base import check_timeout
from .ratelimit import RateLimiter

Token = Any
"""What gives back agentd's side of a holding."""


class BoxLink(Protocol):
    """agentd's coordination, over this process's connection to it
    (:class:`agent.daemon.remote.RemoteAdmission`)."""

    async def take(self, kind: str, name: str, settings: dict[str, Any], owner: str, amount: float,
                   timeout: float | None, *, declared: bool = True,
                   on_lost: Callable[[BaseException], None] | None = None) -> Token: ...

    def give_back(self, token: Token) -> None: ...

    def renew(self, token: Token, ttl: float | None) -> None: ...


def agentd() -> BoxLink:
    """The connection to agentd of this process's pool (agentd's under ``AGENT_DAEMON=1``)."""
    make = getattr(default_pool(), "make_admission", None)
    if make is None:  # AGENT_DAEMON was unset after this process's coordinator was made
        raise CoordinationError("box-wide coordination needs agentd's pool: keep AGENT_DAEMON=1 set")
    return cast(BoxLink, make())


class BoxPrimitive(Primitive):
    """A primitive taken in this process (``local``) and then from agentd."""

    def __init__(self, local: CapacityPrimitive, settings: dict[str, Any], coordinator: Coordinator) -> None:
        self.local = local
        self.settings = settings
        self.coordinator = coordinator
        self.type = local.type
        self.name = local.name
        self.clock = local.clock
        self.lock = threading.RLock()
        self._box: dict[str, list[tuple[float, Token]]] = {}  # owner -> agentd's holdings

    def try_acquire(self, owner: str, amount: float = 1.0) -> bool:
        return False  # agentd is asked over its connection: only acquire() can wait for it

    async def acquire(self, owner: str, amount: float = 1.0, timeout: float | None = None) -> None:
        local = self.local
        limit = check_timeout(local.wait_timeout if timeout is None else timeout,
                              f"{self.type.value} {self.name!r}")
        start = self.clock.monotonic()
        if not local.try_acquire(owner, amount):
            await local.acquire(owner, amount, timeout)
        try:
            left = None if math.isinf(limit) else max(0.0, limit - (self.clock.monotonic() - start))
            token = await agentd().take("primitive", self.name, self.settings, owner, amount, left,
                                        declared=self.coordinator.declared("primitive", self.name),
                                        on_lost=FAIL_RUN.get())
        except BaseException:
            local.release(owner, amount)
            raise
        with self.lock:
            self._box.setdefault(owner, []).append((float(amount), token))

    def release(self, owner: str, amount: float | None = None) -> bool:
        with self.lock:
            held = self._box.get(owner, [])
            if amount is None:
                given = list(held)
            else:  # what one take of ``amount`` got (each take gives back what it took)
                given = ([h for h in held if h[0] == amount] or held)[-1:]
            for holding in given:
                held.remove(holding)
            if not held:
                self._box.pop(owner, None)
        for _, token in given:
            agentd().give_back(token)
        return bool(self.local.release(owner, amount))

    def renew(self, owner: str, ttl: float | None = None) -> float:
        """A LEASE's ``renew``, in this process and in agentd."""
        expires: float = self.local.renew(owner, ttl)  # type: ignore[attr-defined]
        with self.lock:
            tokens = [token for _, token in self._box.get(owner, ())]
        for token in tokens:
            agentd().renew(token, ttl)
        return expires

    def owners(self) -> list[str]:
        return self.local.owners()

    def waiters(self) -> list[Any]:
        return self.local.waiters()

    def fail_waiter(self, owner: str, error: BaseException) -> bool:
        return self.local.fail_waiter(owner, error)

    def expire_stale(self) -> int:
        return self.local.expire_stale()

    def reset(self) -> None:
        with self.lock:
            held, self._box = self._box, {}
        for holdings in held.values():
            for _, token in holdings:
                agentd().give_back(token)
        self.local.reset()

    def config(self) -> dict[str, Any]:
        return self.local.config()

    def statistics(self) -> Any:
        return self.local.statistics()

    def status(self) -> dict[str, Any]:
        return {**self.local.status(), "box": "agentd"}

    def __getattr__(self, name: str) -> Any:  # capacity, wait_timeout, expires_at, ...
        return getattr(self.__dict__["local"], name)


class BoxRateLimiter(RateLimiter):
    """A rate limit passed in this process (``local``) and then in agentd."""

    def __init__(self, local: RateLimiter, settings: dict[str, Any]) -> None:
        self.local = local
        self.settings = settings
        self.name = local.name
        self.strategy = local.strategy
        self.max_rate = local.max_rate
        self.clock = local.clock

    def try_acquire(self) -> bool:
        return False  # agentd is asked over its connection: only acquire() can wait for it

    def would_wait(self) -> bool:
        return True  # for agentd's answer, at least

    async def acquire(self, timeout: float | None = None) -> None:
        start = self.clock.monotonic()
        await self.local.acquire(timeout)
        left = None if timeout is None else max(0.0, float(timeout) - (self.clock.monotonic() - start))
        await agentd().take("rate", self.name, self.settings, "", 1.0, left)

    def reset(self) -> None:
        self.local.reset()

    def statistics(self) -> Any:
        return self.local.statistics()

    def status(self) -> dict[str, Any]:
        return {**self.local.status(), "box": "agentd"}

    def config(self) -> dict[str, Any]:
        return self.local.config()

    def describe(self) -> str:
        return self.local.describe()


class BoxCoordinator(Coordinator):
    """The coordinator of a process that uses agentd's pool (see the module docstring)."""

    def _new_primitive(self, name: str, settings: dict[str, Any]) -> Primitive:
        local = super()._new_primitive(name, settings)
        return BoxPrimitive(local, settings, self) if isinstance(local, CapacityPrimitive) else local

    def _new_rate_limiter(self, name: str, settings: dict[str, Any]) -> RateLimiter:
        return BoxRateLimiter(super()._new_rate_limiter(name, settings), settings)


__all__ = ["BoxCoordinator", "BoxPrimitive", "BoxRateLimiter"]
