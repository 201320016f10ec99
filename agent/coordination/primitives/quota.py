"""QUOTA: a budget of ``quota_limit`` units that holders draw amounts from at once.

It bounds what is in use *at the same time* (16 GB of GPU memory, 100 units of a pool),
not how much is used per period: a draw counts from when it is granted until it is
given back, which an admitted attempt does when it ends (success or not) and an
``async with ResourceAllocation(...)`` block when it exits. So a quota that is never
held past its holders' work is never "used up".

``ttl`` takes back draws of holders that hang: everything an owner holds stops
counting ``ttl`` seconds after its first draw (checked whenever the quota is used,
when a waiter's turn could come from it, and by the coordinator's cleanup), even if
the holder never gave it back; a give-back after that is no error. So no draw counts
for more than ``ttl`` seconds, however its holder behaves: that is what the spec's
"reset quota hourly" (``ttl=3600``) comes to here; a QUOTA is not a budget per period.
"""

from __future__ import annotations

from ... import _validate
from ...errors import CoordinationError
from ...clock import Clock
from .base import CapacityPrimitive, PrimitiveType


class Quota(CapacityPrimitive):
    """``quota_limit`` units shared by all holders; draws come back on release, or after ``ttl`` at the latest."""

    type = PrimitiveType.QUOTA

    def __init__(
        self,
        name: str,
        quota_limit: float,
        *,
        ttl: float | None = None,
        wait_timeout: float | None = None,
        clock: Clock | None = None,
    ) -> None:
        _validate.number(quota_limit, f"quota {name!r}: quota_limit", error=CoordinationError, above=True)
        super().__init__(name, quota_limit, ttl=ttl, wait_timeout=wait_timeout, clock=clock)
        self.quota_limit = float(quota_limit)

    @property
    def available(self) -> float:
        self.expire_stale()
        return self.capacity - self._in_use

    def _state_word(self) -> str:
        if self._in_use <= 1e-9:
            return "available"
        return "exhausted" if self._in_use >= self.capacity - 1e-9 else "in_use"
