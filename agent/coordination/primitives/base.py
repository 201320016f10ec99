"""What every coordination primitive shares: holders, a FIFO of waiters, TTL expiry.

A primitive guards a capacity (1 for a mutex or lease, ``max_count`` for a semaphore,
``quota_limit`` units for a quota). ``acquire`` takes an amount for an owner or waits
in a strict FIFO (a waiter is never overtaken, so nobody starves); ``release`` gives
it back and hands it straight to the waiters at the head of the queue. With a
``ttl``, a holding older than ``ttl`` seconds is taken away (the holder hung or forgot
to release); this is checked whenever the primitive is used, by waiters when the
oldest holding falls due, and by the coordinator's periodic cleanup.
"""

from __future__ import annotations

import asyncio
import enum
import math
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

from ... import _validate
from ..._loops import call_in, fail_soon, locked
from ...errors import CoordinationError, CoordinationTimeoutError
from ...clock import SYSTEM_CLOCK, Clock, wait_until_done

_EPS = 1e-9


class PrimitiveType(str, enum.Enum):
    """The kinds of coordination a state can be put under."""

    MUTEX = "mutex"
    SEMAPHORE = "semaphore"
    BARRIER = "barrier"
    LEASE = "lease"
    QUOTA = "quota"


@dataclass(frozen=True)
class PrimitiveStatistics:
    """A snapshot of one primitive (``Primitive.statistics()``)."""

    name: str
    type: PrimitiveType
    state: str
    owners: tuple[str, ...]
    wait_count: int
    capacity: float
    in_use: float
    ttl: float | None
    acquisitions: int
    timeouts: int
    expirations: int
    deadlock_failures: int

    def as_status(self) -> dict[str, Any]:
        """The status-dict shape: ``state``, ``owners`` (a list), ``wait_count`` and the rest."""
        return {
            "type": self.type.value,
            "state": self.state,
            "owners": list(self.owners),
            "wait_count": self.wait_count,
            "capacity": self.capacity,
            "in_use": self.in_use,
            "ttl": self.ttl,
            "acquisitions": self.acquisitions,
            "timeouts": self.timeouts,
            "expirations": self.expirations,
            "deadlock_failures": self.deadlock_failures,
        }


@dataclass
class Waiter:
    """One owner queued on a primitive."""

    owner: str
    amount: float
    since: float
    future: asyncio.Future[None]


@dataclass
class _Holding:
    amount: float
    since: float
    expires_at: float


@dataclass
class _Counters:
    acquisitions: int = 0
    timeouts: int = 0
    expirations: int = 0
    deadlock_failures: int = 0


def check_ttl(ttl: float | None, what: str) -> float | None:
    if ttl is None:
        return None
    return _validate.number(ttl, f"{what}: ttl", error=CoordinationError, above=True, unit="seconds")


def check_timeout(timeout: float | None, what: str) -> float:
    if timeout is None:
        return math.inf
    # None waits forever (returned as inf); a number must be finite.
    return _validate.number(timeout, f"{what}: timeout", error=CoordinationError, unit="seconds")  # type: ignore[return-value]


class Primitive:
    """The interface the coordinator, the deadlock detector and the status use."""

    type: PrimitiveType
    made_on_use = False
    """Made by ``mutex(name)``'s first use, not declared: forgotten once free (Coordinator.let_go)."""

    def __init__(self, name: str, *, ttl: float | None = None, clock: Clock | None = None) -> None:
        if not isinstance(name, str) or not name:
            raise CoordinationError(f"a primitive needs a non-empty name, got {name!r}")
        self.name = name
        self.ttl = check_ttl(ttl, f"{self.type.value} {name!r}")
        self.clock: Clock = clock or SYSTEM_CLOCK
        self._counters = _Counters()
        # Runs on the event loops of several threads may share it: each step is taken under
        # this lock, and a waiter on another thread's loop is woken on that loop.
        self.lock = threading.RLock()

    # the deadlock detector's view
    def owners(self) -> list[str]:
        raise NotImplementedError

    def waiters(self) -> list[Waiter]:
        raise NotImplementedError

    def fail_waiter(self, owner: str, error: BaseException) -> bool:
        """Make ``owner``'s pending acquire raise ``error``; False when it is not waiting."""
        raise NotImplementedError

    def expire_stale(self) -> int:
        """Take away holdings older than ``ttl``; returns how many."""
        return 0

    def reset(self) -> None:
        """Drop every holding and fail every waiter with a CoordinationError."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """The settings that define this primitive (compared when it is configured again)."""
        return {"type": self.type, "ttl": self.ttl}

    def statistics(self) -> PrimitiveStatistics:
        raise NotImplementedError

    def status(self) -> dict[str, Any]:
        self.expire_stale()
        return self.statistics().as_status()

    def __repr__(self) -> str:
        s = self.statistics()
        return f"<{type(self).__name__} {self.name!r} {s.state} owners={list(s.owners)} waiting={s.wait_count}>"


class CapacityPrimitive(Primitive):
    """A primitive that lends out units of a fixed capacity (mutex, semaphore, lease, quota)."""

    #: whether one owner may hold more than one grant at a time
    reentrant_amounts = True

    def __init__(
        self,
        name: str,
        capacity: float,
        *,
        ttl: float | None = None,
        wait_timeout: float | None = None,
        clock: Clock | None = None,
    ) -> None:
        super().__init__(name, ttl=ttl, clock=clock)
        self.capacity = _validate.number(
            capacity, f"{self.type.value} {name!r}: capacity", error=CoordinationError, above=True,
        )
        self.wait_timeout = None if wait_timeout is None else check_timeout(wait_timeout, f"{self.type.value} {name!r}")
        self._holders: dict[str, _Holding] = {}
        self._waiters: deque[Waiter] = deque()
        self._in_use = 0.0
        self._reaper: asyncio.Task[None] | None = None
        self._resets = 0  # a grant on its way to another thread's loop as a reset came is void

    # --- acquiring ------------------------------------------------------------------

    @locked
    def try_acquire(self, owner: str, amount: float = 1.0) -> bool:
        """Take ``amount`` for ``owner`` now if it is free and nobody is queued."""
        self.expire_stale()
        amount = self._check_request(owner, amount)
        if self._waiters or not self._fits(amount):
            return False
        self._grant(owner, amount)
        return True

    @locked
    def would_wait(self, amount: float = 1.0) -> bool:
        """Whether asking for ``amount`` now would wait (others queued, or it does not fit)."""
        self.expire_stale()
        return bool(self._waiters) or not self._fits(amount)

    async def acquire(self, owner: str, amount: float = 1.0, timeout: float | None = None) -> None:
        """Take ``amount`` for ``owner``, waiting in FIFO order.

        ``timeout`` (default: the primitive's ``wait_timeout``, else forever) bounds the
        wait: past it, CoordinationTimeoutError. A cancelled or failed waiter leaves the
        queue and never keeps a grant that raced its cancellation.
        """
        with self.lock:
            self.expire_stale()
            amount = self._check_request(owner, amount)
            limit = check_timeout(self.wait_timeout if timeout is None else timeout,
                                  f"{self.type.value} {self.name!r}")
            if not self._waiters and self._fits(amount):
                self._grant(owner, amount)
                return
            waiter = Waiter(owner, amount, self.clock.monotonic(), asyncio.get_running_loop().create_future())
            self._waiters.append(waiter)
            self._ensure_reaper()
        fut = waiter.future
        try:
            if not await wait_until_done(self.clock, fut, limit):
                self._counters.timeouts += 1
                raise CoordinationTimeoutError(self._timeout_message(owner, amount, limit))
            fut.result()  # raises what fail_waiter() put there (DeadlockError, reset)
        except BaseException:
            with self.lock:
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    self._take_back(owner, amount)  # granted, but we are leaving: give it back
                else:
                    if not fut.done():
                        fut.cancel()
                    self._remove_waiter(waiter)
            raise

    @locked
    def release(self, owner: str, amount: float | None = None) -> bool:
        """Give back ``amount`` (default: all) held by ``owner``.

        Returns False when ``owner`` holds nothing, for instance because its holding
        expired after ``ttl``: releasing late is not an error. An ``amount`` that is not a
        number > 0 is refused (a negative one would take more than the limit allows).
        """
        if amount is not None and (isinstance(amount, bool) or not isinstance(amount, (int, float))
                                   or not amount > 0):
            raise CoordinationError(
                f"{self.type.value} {self.name!r}: release a number > 0, or None for all "
                f"{owner!r} holds, got {amount!r}"
            )
        self.expire_stale()
        holding = self._holders.get(owner)
        if holding is None:
            return False
        self._take_back(owner, holding.amount if amount is None else min(float(amount), holding.amount))
        return True

    @locked
    def holds(self, owner: str) -> bool:
        self.expire_stale()
        return owner in self._holders

    # --- the detector's and coordinator's view ----------------------------------------

    @locked
    def owners(self) -> list[str]:
        return list(self._holders)

    @locked
    def waiters(self) -> list[Waiter]:
        return [w for w in self._waiters if not w.future.done()]

    @locked
    def fail_waiter(self, owner: str, error: BaseException) -> bool:
        for waiter in self._waiters:
            if waiter.owner == owner and not waiter.future.done():
                fail_soon(waiter.future, error)
                self._remove_waiter(waiter)
                self._counters.deadlock_failures += 1
                return True
        return False

    @locked
    def expire_stale(self) -> int:
        if self.ttl is None or not self._holders:
            return 0
        now = self.clock.monotonic()
        stale = [o for o, h in self._holders.items() if h.expires_at <= now + _EPS]
        for owner in stale:
            self._counters.expirations += 1
            self._take_back(owner, self._holders[owner].amount)
        return len(stale)

    @locked
    def reset(self) -> None:
        self._resets += 1
        self._holders.clear()
        self._in_use = 0.0
        waiters, self._waiters = list(self._waiters), deque()
        self._stop_reaper_if_idle()
        for waiter in waiters:
            fail_soon(waiter.future, CoordinationError(
                f"{self.type.value} {self.name!r} was reset while {waiter.owner!r} waited for it"))

    def config(self) -> dict[str, Any]:
        return {**super().config(), "capacity": self.capacity, "wait_timeout": self.wait_timeout}

    @locked
    def statistics(self) -> PrimitiveStatistics:
        c = self._counters
        return PrimitiveStatistics(
            name=self.name,
            type=self.type,
            state=self._state_word(),
            owners=tuple(self._holders),
            wait_count=len(self.waiters()),
            capacity=self.capacity,
            in_use=self._in_use,
            ttl=self.ttl,
            acquisitions=c.acquisitions,
            timeouts=c.timeouts,
            expirations=c.expirations,
            deadlock_failures=c.deadlock_failures,
        )

    # --- internals ------------------------------------------------------------------

    def _state_word(self) -> str:
        if self._in_use <= _EPS:
            return "available"
        return "full" if self._in_use >= self.capacity - _EPS else "partial"

    def _check_request(self, owner: str, amount: float) -> float:
        what = f"{self.type.value} {self.name!r}"
        if not isinstance(owner, str) or not owner:
            raise CoordinationError(f"{what}: the owner must be a non-empty string, got {owner!r}")
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not amount > 0:
            raise CoordinationError(f"{what}: the amount must be a number > 0, got {amount!r}")
        if amount > self.capacity + _EPS:
            raise CoordinationError(
                f"{what}: {owner!r} asks for {amount:g} but the capacity is {self.capacity:g}; "
                "ask for less or raise the limit"
            )
        holding = self._holders.get(owner)
        if holding is not None and not self.reentrant_amounts:
            raise CoordinationError(
                f"{what} is already held by {owner!r}: it is not re-entrant, release it first (an "
                "explicit owner= is one holder in every run that passes it; leave it out to take as "
                "the state attempt)"
            )
        if holding is not None and holding.amount + amount > self.capacity + _EPS:
            room = self.capacity - holding.amount
            raise CoordinationError(
                f"{what}: {owner!r} holds {holding.amount:g} of its {self.capacity:g} and asks for "
                f"{amount:g} more, which it would wait for itself to give back (an explicit owner= is one "
                "holder in every run that passes it): "
                + (f"ask for at most {room:g}, or raise the limit" if room > _EPS else "raise the limit")
            )
        return float(amount)

    def _fits(self, amount: float) -> bool:
        return self._in_use + amount <= self.capacity + _EPS

    def _grant(self, owner: str, amount: float) -> None:
        now = self.clock.monotonic()
        holding = self._holders.get(owner)
        if holding is None:
            expires = now + self.ttl if self.ttl is not None else math.inf
            self._holders[owner] = _Holding(amount, now, expires)
        else:
            holding.amount += amount
        self._in_use += amount
        self._counters.acquisitions += 1
        if self._waiters:
            self._ensure_reaper()

    @locked
    def _take_back(self, owner: str, amount: float) -> None:
        holding = self._holders.get(owner)
        if holding is None:
            return
        holding.amount -= amount
        if holding.amount <= _EPS:
            del self._holders[owner]
        self._in_use = max(0.0, self._in_use - amount)
        if not self._holders:
            self._in_use = 0.0
        self._wake()

    def _wake(self) -> None:
        """Grant to the head of the queue while it fits (strict FIFO)."""
        while self._waiters:
            head = self._waiters[0]
            if head.future.done():
                self._waiters.popleft()
                continue
            if not self._fits(head.amount) or (not self.reentrant_amounts and head.owner in self._holders):
                return
            self._waiters.popleft()
            self._grant(head.owner, head.amount)
            if not call_in(head.future.get_loop(), self._deliver, head, self._resets):
                self._take_back(head.owner, head.amount)  # its loop is closed: nobody takes it
        self._stop_reaper_if_idle()

    @locked
    def _deliver(self, waiter: Waiter, resets: int) -> None:
        """On the waiter's loop: its grant, unless the primitive was reset since (then it
        holds nothing, and hears so); one that left meanwhile gives the grant back."""
        future = waiter.future
        if resets != self._resets:
            fail_soon(future, CoordinationError(
                f"{self.type.value} {self.name!r} was reset while {waiter.owner!r} waited for it"))
        elif future.done():
            self._take_back(waiter.owner, waiter.amount)
        else:
            future.set_result(None)

    def _stop_reaper_if_idle(self) -> None:
        if self._reaper is not None and not self._waiters:
            self._reaper.cancel()
            self._reaper = None

    def _remove_waiter(self, waiter: Waiter) -> None:
        try:
            self._waiters.remove(waiter)
        except ValueError:
            pass
        self._wake()  # the head may have been the one blocking the others

    def _ensure_reaper(self) -> None:
        """While owners wait behind holders with a ttl, wake up when the oldest falls due."""
        if self.ttl is None or (self._reaper is not None and not self._reaper.done()):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._reaper = loop.create_task(self._reap(), name=f"expire {self.type.value} {self.name}")

    async def _reap(self) -> None:
        while self.waiters() and self._holders:
            await self.clock.sleep(self._next_expiry() - self.clock.monotonic())
            self.expire_stale()

    def _next_expiry(self) -> float:
        if self.ttl is None or not self._holders:
            return math.inf
        return min(h.expires_at for h in self._holders.values())

    def _timeout_message(self, owner: str, amount: float, limit: float) -> str:
        holders = ", ".join(repr(o) for o in self._holders) or "nobody"
        return (
            f"{self.type.value} {self.name!r}: {owner!r} waited {limit:g}s for {amount:g} of "
            f"{self.capacity:g} (in use {self._in_use:g}, held by {holders}); "
            "raise wait_timeout, shorten the holders' work, or give the primitive a ttl"
        )
