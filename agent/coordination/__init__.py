"""Coordination & control: primitives, rate limits and deadlock detection for states.

* :mod:`.primitives`: MUTEX, SEMAPHORE, BARRIER, LEASE, QUOTA (one module each), FIFO,
  with timeouts and ``ttl`` expiry of holders that hang;
* :mod:`.ratelimit`: TOKEN_BUCKET, LEAKY_BUCKET, SLIDING_WINDOW, FIXED_WINDOW
  (``max_rate`` is starts per second in every strategy);
* :mod:`.deadlock`: the wait-for graph, cycle detection and resolution;
* :mod:`.coordinator`: everything above by name, one default per process;
* :mod:`.boxwide`: the default under agentd, which also takes each from agentd;
* :mod:`.coordinated`: ``CoordinatedAgent``, which admits each attempt through them;
* :mod:`.allocation`: ``ResourceAllocation`` and ``mutex`` for use inside state code;
* :mod:`.clock`: the injectable clock, and ``FakeClock`` for tests.
"""

from __future__ import annotations

from .allocation import ResourceAllocation, current_coordinator, current_owner, mutex
from ..clock import Clock, FakeClock, SystemClock
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
    "current_coordinator",
    "current_owner",
    "default_coordinator",
    "enhance_agent",
    "mutex",
]
