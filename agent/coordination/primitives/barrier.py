"""BARRIER: wait until ``max_count`` parties have arrived, then go on together.

Two ways to use it:

* as a rendezvous: each party calls ``wait(owner)`` and blocks until ``max_count``
  parties of the same round have arrived; then all of them are released at once and
  the next round begins. If the round does not fill within ``wait_timeout`` seconds of
  a party's arrival it is broken: every waiting party gets a
  CoordinationTimeoutError saying how many of how many arrived.
* as a gate for a state (what ``add_state_coordination(..., PrimitiveType.BARRIER)``
  does): each state that hands over to the guarded state ``arrive``\\s without
  blocking, and the guarded state's ``pass_when_full`` waits until ``max_count``
  arrivals of its run are in (consuming that round), or times out saying how many
  arrived. Rounds are kept per ``group`` (the run id), so concurrent runs never mix
  their arrivals.
"""

from __future__ import annotations

import asyncio
import functools
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ... import _validate
from ..._loops import fail_soon, grant_soon, locked
from ...errors import CoordinationError, CoordinationTimeoutError
from ...clock import Clock, wait_until_done
from .base import Primitive, PrimitiveStatistics, PrimitiveType, Waiter, check_timeout

_RENDEZVOUS = ""


@dataclass
class _Round:
    parties: list[Waiter] = field(default_factory=list)  # rendezvous parties (they wait)
    arrivals: list[str] = field(default_factory=list)  # gate arrivals (they do not wait)
    gates: deque[Waiter] = field(default_factory=deque)  # owners waiting for a full round
    full: int = 0  # filled gate rounds not yet passed


class Barrier(Primitive):
    """A reusable rendezvous (or gate) for ``max_count`` parties."""

    type = PrimitiveType.BARRIER

    def __init__(
        self,
        name: str,
        max_count: int,
        *,
        wait_timeout: float | None = None,
        ttl: float | None = None,
        clock: Clock | None = None,
    ) -> None:
        super().__init__(name, ttl=ttl, clock=clock)
        _validate.integer(max_count, f"barrier {name!r}: max_count", error=CoordinationError, minimum=1)
        self.max_count = max_count
        self.wait_timeout = None if wait_timeout is None else check_timeout(wait_timeout, f"barrier {name!r}")
        self._groups: dict[str, _Round] = {}
        self._rounds = 0
        self._broken = 0

    def arrived(self, group: str = _RENDEZVOUS) -> int:
        """Parties (or arrivals) counted in ``group``'s current round."""
        rnd = self._groups.get(group)
        return 0 if rnd is None else len(rnd.parties) + len(rnd.arrivals)

    # --- rendezvous -------------------------------------------------------------------

    async def wait(self, owner: str, timeout: float | None = None) -> int:
        """Arrive and wait for the round to fill; returns this party's index in the round
        (0-based, in order of arrival, each once: a party that left before the round filled
        leaves no gap)."""
        self._check_owner(owner)
        limit = check_timeout(self.wait_timeout if timeout is None else timeout, f"barrier {self.name!r}")
        with self.lock:
            rnd = self._groups.setdefault(_RENDEZVOUS, _Round())
            parties = rnd.parties  # this round's: the round gets a new list once it opens or breaks
            waiter = Waiter(owner, 1.0, self.clock.monotonic(), asyncio.get_running_loop().create_future())
            parties.append(waiter)
            self._counters.acquisitions += 1
            if len(parties) >= self.max_count:
                self._open_rendezvous(rnd)
                return len(parties) - 1
        fut = waiter.future
        try:
            if not await wait_until_done(self.clock, fut, limit):
                with self.lock:
                    if rnd.parties is parties:
                        self._break_rendezvous(rnd, limit)
                # Else the round opened (or broke) as the time ran out, from another thread:
                # its news is on the way to this loop, and it is this party's answer.
                await asyncio.wait((fut,))
            fut.result()
        except BaseException:
            with self.lock:
                if not fut.done():
                    fut.cancel()
                if rnd.parties is parties and waiter in parties:  # the round still fills: leave it
                    parties.remove(waiter)
            raise
        return parties.index(waiter)  # the round's list no longer changes once it opened

    # --- gate -------------------------------------------------------------------------

    @locked
    def arrive(self, owner: str, group: str) -> None:
        """Count ``owner`` as arrived in ``group``'s round, without waiting."""
        self._check_owner(owner)
        rnd = self._groups.setdefault(group, _Round())
        rnd.arrivals.append(owner)
        self._counters.acquisitions += 1
        if len(rnd.arrivals) >= self.max_count:
            rnd.arrivals.clear()
            rnd.full += 1
            self._rounds += 1
            self._pass_gates(rnd)

    async def pass_when_full(self, owner: str, group: str, timeout: float | None = None) -> None:
        """Wait until ``group`` has a full round of arrivals, and use it up."""
        self._check_owner(owner)
        limit = check_timeout(self.wait_timeout if timeout is None else timeout, f"barrier {self.name!r}")
        with self.lock:
            rnd = self._groups.setdefault(group, _Round())
            if rnd.full and not rnd.gates:
                rnd.full -= 1
                return
            waiter = Waiter(owner, 1.0, self.clock.monotonic(), asyncio.get_running_loop().create_future())
            rnd.gates.append(waiter)
        fut = waiter.future
        try:
            if not await wait_until_done(self.clock, fut, limit):
                self._counters.timeouts += 1
                self._broken += 1
                raise CoordinationTimeoutError(self._short_message(len(rnd.arrivals), limit, f"before {owner!r}"))
            fut.result()
        except BaseException:
            with self.lock:
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    rnd.full += 1  # passed, but leaving: the round stays for the next one
                elif not fut.done():
                    fut.cancel()
                if waiter in rnd.gates:
                    rnd.gates.remove(waiter)
            raise

    @locked
    def give_up(self, group: str) -> None:
        """Nothing else of ``group`` can arrive: its gates waiting for a full round fail now."""
        rnd = self._groups.get(group)
        if rnd is None:
            return
        why = (f"barrier {self.name!r}: only {len(rnd.arrivals)} of {self.max_count} arrived, and nothing else "
               f"of the run can arrive: have {self.max_count} states return {self.name!r}, or lower max_count")
        for waiter in rnd.gates:
            if not waiter.future.done():
                fail_soon(waiter.future, CoordinationError(why))
                self._broken += 1

    @locked
    def forget(self, group: str) -> None:
        """Drop ``group``'s rounds (its run is over); its waiting owners fail."""
        rnd = self._groups.pop(group, None)
        if rnd is not None:
            self._fail_all(rnd, f"barrier {self.name!r}: the run {group!r} ended")

    # --- the common interface ---------------------------------------------------------

    async def acquire(self, owner: str, amount: float = 1.0, timeout: float | None = None) -> None:
        """Same as :meth:`wait`."""
        await self.wait(owner, timeout)

    def release(self, owner: str, amount: float | None = None) -> bool:
        """A barrier holds nothing after it opens; nothing to give back."""
        return False

    def owners(self) -> list[str]:
        return []

    @locked
    def waiters(self) -> list[Waiter]:
        out = []
        for rnd in self._groups.values():
            out.extend(w for w in rnd.parties if not w.future.done())
            out.extend(w for w in rnd.gates if not w.future.done())
        return out

    @locked
    def fail_waiter(self, owner: str, error: BaseException) -> bool:
        for rnd in self._groups.values():
            for queue in (rnd.parties, rnd.gates):
                for waiter in queue:
                    if waiter.owner == owner and not waiter.future.done():
                        fail_soon(waiter.future, error)
                        queue.remove(waiter)
                        self._counters.deadlock_failures += 1
                        return True
        return False

    @locked
    def reset(self) -> None:
        groups, self._groups = self._groups, {}
        for rnd in groups.values():
            self._fail_all(rnd, f"barrier {self.name!r} was reset")

    def config(self) -> dict[str, Any]:
        return {**super().config(), "max_count": self.max_count, "wait_timeout": self.wait_timeout}

    @locked
    def statistics(self) -> PrimitiveStatistics:
        c = self._counters
        waiting = len(self.waiters())
        arrived = sum(len(r.parties) + len(r.arrivals) for r in self._groups.values())
        return PrimitiveStatistics(
            name=self.name,
            type=self.type,
            state="waiting" if waiting or arrived else "open",
            owners=(),
            wait_count=waiting,
            capacity=float(self.max_count),
            in_use=float(arrived),
            ttl=self.ttl,
            acquisitions=c.acquisitions,
            timeouts=c.timeouts,
            expirations=c.expirations,
            deadlock_failures=c.deadlock_failures,
        )

    def status(self) -> dict[str, Any]:
        out = super().status()
        out.update(
            arrived={g or "rendezvous": self.arrived(g) for g in self._groups},
            max_count=self.max_count,
            rounds=self._rounds,
            broken=self._broken,
        )
        return out

    # --- internals ------------------------------------------------------------------

    def _check_owner(self, owner: str) -> None:
        if not isinstance(owner, str) or not owner:
            raise CoordinationError(f"barrier {self.name!r}: the owner must be a non-empty string, got {owner!r}")

    def _open_rendezvous(self, rnd: _Round) -> None:
        parties, rnd.parties = rnd.parties, []
        self._rounds += 1
        for waiter in parties:
            if not waiter.future.done():
                grant_soon(waiter.future)

    @locked
    def _gate_left(self, rnd: _Round) -> None:
        """A gate passed, but its waiter left before it heard: the round stays for the next one."""
        rnd.full += 1
        self._pass_gates(rnd)

    def _pass_gates(self, rnd: _Round) -> None:
        while rnd.full and rnd.gates:
            waiter = rnd.gates.popleft()
            if waiter.future.done():
                continue
            rnd.full -= 1
            grant_soon(waiter.future, functools.partial(self._gate_left, rnd))

    def _break_rendezvous(self, rnd: _Round, limit: float) -> None:
        parties, rnd.parties = rnd.parties, []
        self._broken += 1
        self._counters.timeouts += 1
        message = self._short_message(len(parties), limit, "")
        for waiter in parties:
            fail_soon(waiter.future, CoordinationTimeoutError(message))

    def _short_message(self, arrived: int, limit: float, whom: str) -> str:
        shown = "forever" if math.isinf(limit) else f"{limit:g}s"
        whom = f" {whom}" if whom else ""
        return (
            f"barrier {self.name!r}: only {arrived} of {self.max_count} arrived within {shown}{whom}; "
            f"make sure {self.max_count} states reach it, or lower max_count / raise wait_timeout"
        )

    def _fail_all(self, rnd: _Round, message: str) -> None:
        for waiter in [*rnd.parties, *rnd.gates]:
            fail_soon(waiter.future, CoordinationError(f"{message} while {waiter.owner!r} waited"))
