"""Leaf types every layer shares: resource kinds, priorities, why an attempt stopped, the clock.

Nothing here imports anything of the package, so the engine, the supervisor and the
child side can all use these without pulling each other in.
"""

from __future__ import annotations

import enum
import time
from typing import Protocol


class ResourceType(enum.Flag):
    """Which resources a request is accounted for in the pool."""

    NONE = 0
    CPU = enum.auto()
    MEMORY = enum.auto()
    IO = enum.auto()
    NETWORK = enum.auto()
    GPU = enum.auto()
    ALL = CPU | MEMORY | IO | NETWORK | GPU

    # Members are singletons compared by identity; Enum's own __hash__ (of the name, in
    # Python) is the pool's hottest call, as every amount is a dict keyed by type.
    __hash__ = object.__hash__


class Priority(enum.IntEnum):
    """Scheduling priority: higher runs first; with preemption it may evict lower."""

    LOW = 0
    NORMAL = 1
    HIGH = 2
    CRITICAL = 3


class StopReason(str, enum.Enum):
    """Why the engine stopped a running attempt (``Attempt.stop_reason``)."""

    TIMEOUT = "timeout"
    CANCEL = "cancel"
    PREEMPT = "preempt"
    PAUSE = "pause"


RESULT_STANDS = frozenset({StopReason.PREEMPT, StopReason.PAUSE})
"""Stops under way that a state's result, come in meanwhile, overrides (it finished: running
it again would repeat what it did). A timeout or a cancel is how it ends, result or not."""


class Clock(Protocol):
    """Monotonic seconds; injectable so that tests of time-based policies run instantly."""

    def __call__(self) -> float: ...


monotonic: Clock = time.monotonic
"""The clock everything uses unless a test injects another."""
