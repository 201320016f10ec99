"""QUOTA: a budget of ``quota_limit`` units that holders draw amounts from.

The ``ttl`` is the reset period: what an owner draws counts against the quota for at
most ``ttl`` seconds from its first draw, after which it is reclaimed even if the
holder never gave it back, so the whole quota is available again at most ``ttl``
seconds after any burst ("reset hourly" with ``ttl=3600``).
"""

from __future__ import annotations

from ... import _validate
from ...errors import CoordinationError
from ...clock import Clock
from .base import CapacityPrimitive, PrimitiveType


class Quota(CapacityPrimitive):
    """``quota_limit`` units shared by all holders; each draw is reclaimed after ``ttl``."""

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
