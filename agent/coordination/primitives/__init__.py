"""Coordination primitives, one per module, and the factory that builds one by type."""

from __future__ import annotations

from ...errors import CoordinationError
from ...clock import Clock
from .barrier import Barrier
from .base import CapacityPrimitive, Primitive, PrimitiveStatistics, PrimitiveType, Waiter
from .lease import Lease
from .mutex import Mutex
from .quota import Quota
from .semaphore import Semaphore

__all__ = [
    "Barrier",
    "CapacityPrimitive",
    "Lease",
    "Mutex",
    "Primitive",
    "PrimitiveStatistics",
    "PrimitiveType",
    "Quota",
    "Semaphore",
    "Waiter",
    "create_primitive",
    "primitive_type_of",
]


def primitive_type_of(primitive_type: PrimitiveType | str) -> PrimitiveType:
    """The PrimitiveType ``primitive_type`` names (the enum, or its value in any case)."""
    try:
        given = primitive_type.value if isinstance(primitive_type, PrimitiveType) else str(primitive_type).lower()
        return PrimitiveType(given)
    except ValueError:
        choices = ", ".join(t.name for t in PrimitiveType)
        raise CoordinationError(f"unknown primitive type {primitive_type!r}: use PrimitiveType.{{{choices}}}") from None


def create_primitive(
    name: str,
    primitive_type: PrimitiveType | str,
    *,
    ttl: float | None = None,
    max_count: int | None = None,
    quota_limit: float | None = None,
    wait_timeout: float | None = None,
    clock: Clock | None = None,
) -> Primitive:
    """Build the primitive ``primitive_type`` names, checking it got the settings it needs."""
    kind = primitive_type_of(primitive_type)
    if max_count is not None and kind not in (PrimitiveType.SEMAPHORE, PrimitiveType.BARRIER):
        raise CoordinationError(f"{kind.name} {name!r} takes no max_count (a SEMAPHORE or a BARRIER does)")
    if quota_limit is not None and kind is not PrimitiveType.QUOTA:
        raise CoordinationError(f"{kind.name} {name!r} takes no quota_limit (a QUOTA does)")
    if kind is PrimitiveType.MUTEX:
        return Mutex(name, ttl=ttl, wait_timeout=wait_timeout, clock=clock)
    if kind is PrimitiveType.LEASE:
        return Lease(name, ttl=ttl, wait_timeout=wait_timeout, clock=clock)
    if kind is PrimitiveType.SEMAPHORE:
        if max_count is None:
            raise CoordinationError(f"semaphore {name!r} needs max_count: how many may hold it at once")
        return Semaphore(name, max_count, ttl=ttl, wait_timeout=wait_timeout, clock=clock)
    if kind is PrimitiveType.BARRIER:
        if max_count is None:
            raise CoordinationError(f"barrier {name!r} needs max_count: how many parties it waits for")
        if ttl is not None:
            raise CoordinationError(
                f"BARRIER {name!r} takes no ttl (it holds nothing after it opens): bound the wait with wait_timeout"
            )
        return Barrier(name, max_count, wait_timeout=wait_timeout, clock=clock)
    if quota_limit is None:
        raise CoordinationError(f"quota {name!r} needs quota_limit: the number of units it hands out")
    return Quota(name, quota_limit, ttl=ttl, wait_timeout=wait_timeout, clock=clock)
