"""SEMAPHORE: at most ``max_count`` holders at once."""

from __future__ import annotations

from ... import _validate
from ...errors import CoordinationError
from ...clock import Clock
from .base import CapacityPrimitive, PrimitiveType


class Semaphore(CapacityPrimitive):
    """Up to ``max_count`` concurrent permits; an owner may hold several."""

    type = PrimitiveType.SEMAPHORE

    def __init__(
        self,
        name: str,
        max_count: int,
        *,
        ttl: float | None = None,
        wait_timeout: float | None = None,
        clock: Clock | None = None,
    ) -> None:
        _validate.integer(max_count, f"semaphore {name!r}: max_count", error=CoordinationError, minimum=1)
        super().__init__(name, max_count, ttl=ttl, wait_timeout=wait_timeout, clock=clock)
        self.max_count = max_count
