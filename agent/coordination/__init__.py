"""Coordination & control: primitives, rate limits and deadlock detection for states."""

from __future__ import annotations

from .allocation import ResourceAllocation, current_owner, mutex
from .clock import Clock, FakeClock, SystemClock
from .coordinator import Coordinator, default_coordinator
from .deadlock import DeadlockCycle, DeadlockDetector, DeadlockResolution, WaitEdge
from .primitives import (
    Barrier,
    Lease,
    Mutex,
    Primitive,
    PrimitiveStatistics,
    PrimitiveType,
    Quota,
    Semaphore,
    create_primitive,
)
from .ratelimit import (
    FixedWindow,
    LeakyBucket,
    RateLimiter,
    RateLimiterStatistics,
    RateLimitStrategy,
    SlidingWindow,
    TokenBucket,
    create_rate_limiter,
)
from .coordinated import CoordinatedAgent, create_coordinated_agent, enhance_agent

__all__ = [
    "Barrier",
    "Clock",
    "CoordinatedAgent",
    "Coordinator",
    "DeadlockCycle",
    "DeadlockDetector",
    "DeadlockResolution",
    "FakeClock",
    "FixedWindow",
    "LeakyBucket",
    "Lease",
    "Mutex",
    "Primitive",
    "PrimitiveStatistics",
    "PrimitiveType",
    "Quota",
    "RateLimitStrategy",
    "RateLimiter",
    "RateLimiterStatistics",
    "ResourceAllocation",
    "Semaphore",
    "SlidingWindow",
    "SystemClock",
    "TokenBucket",
    "WaitEdge",
    "create_coordinated_agent",
    "create_primitive",
    "create_rate_limiter",
    "current_owner",
    "default_coordinator",
    "enhance_agent",
    "mutex",
]
