"""LEASE: exclusive access that always ends after ``ttl`` seconds unless renewed.

Unlike a MUTEX, whose ``ttl`` is an optional safety net, a lease is time-based by
definition: the holder gets the resource for ``ttl`` seconds and must ``renew`` to
keep it longer.
"""

from __future__ import annotations

from ..._loops import locked
from ...errors import CoordinationError
from ...clock import Clock
from .base import CapacityPrimitive, PrimitiveType, check_ttl


class Lease(CapacityPrimitive):
    """One holder at a time for at most ``ttl`` seconds per grant or renewal."""

    type = PrimitiveType.LEASE
    reentrant_amounts = False

    def __init__(
        self,
        name: str,
        *,
        ttl: float | None,
        wait_timeout: float | None = None,
        clock: Clock | None = None,
    ) -> None:
        if ttl is None:
            raise CoordinationError(
                f"lease {name!r} needs a ttl: the number of seconds each lease lasts (e.g. ttl=600.0)"
            )
        super().__init__(name, 1.0, ttl=ttl, wait_timeout=wait_timeout, clock=clock)

    @locked
    def renew(self, owner: str, ttl: float | None = None) -> float:
        """Extend ``owner``'s lease to ``ttl`` (default: the lease's ttl) from now; returns the new expiry."""
        ttl = check_ttl(ttl, f"lease {self.name!r}")
        self.expire_stale()
        holding = self._holders.get(owner)
        if holding is None:
            raise CoordinationError(
                f"lease {self.name!r} is not held by {owner!r} (it may have expired): acquire it again"
            )
        holding.expires_at = self.clock.monotonic() + (self.ttl if ttl is None else float(ttl))  # type: ignore[operator]
        return holding.expires_at

    @locked
    def expires_at(self, owner: str) -> float | None:
        """When ``owner``'s lease ends (clock time), or None when it holds none."""
        holding = self._holders.get(owner)
        return None if holding is None else holding.expires_at

    def _state_word(self) -> str:
        return "leased" if self._holders else "free"
