"""MUTEX: one owner at a time."""

from __future__ import annotations

from ...clock import Clock
from .base import CapacityPrimitive, PrimitiveType


class Mutex(CapacityPrimitive):
    """Exclusive access for one owner; not re-entrant. ``ttl`` takes it from a holder that hangs."""

    type = PrimitiveType.MUTEX
    reentrant_amounts = False

    def __init__(
        self,
        name: str,
        *,
        ttl: float | None = None,
        wait_timeout: float | None = None,
        clock: Clock | None = None,
    ) -> None:
        super().__init__(name, 1.0, ttl=ttl, wait_timeout=wait_timeout, clock=clock)

    def _state_word(self) -> str:
        return "locked" if self._holders else "unlocked"
