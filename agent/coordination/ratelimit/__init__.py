"""Rate limiters, one strategy per module, and the factory that builds one by strategy."""

from __future__ import annotations

import math

from ...errors import CoordinationError
from ...clock import Clock
from .base import RateLimiter, RateLimiterStatistics, RateLimitStrategy
from .fixed_window import FixedWindow
from .leaky_bucket import LeakyBucket
from .sliding_window import SlidingWindow
from .token_bucket import TokenBucket

__all__ = [
    "FixedWindow",
    "LeakyBucket",
    "RateLimitStrategy",
    "RateLimiter",
    "RateLimiterStatistics",
    "SlidingWindow",
    "TokenBucket",
    "create_rate_limiter",
    "strategy_of",
]


def strategy_of(strategy: RateLimitStrategy | str) -> RateLimitStrategy:
    """The RateLimitStrategy ``strategy`` names (the enum, or its value in any case)."""
    try:
        return RateLimitStrategy(strategy.value if isinstance(strategy, RateLimitStrategy) else str(strategy).lower())
    except ValueError:
        choices = ", ".join(s.name for s in RateLimitStrategy)
        raise CoordinationError(
            f"unknown rate limit strategy {strategy!r}: use RateLimitStrategy.{{{choices}}}"
        ) from None


def create_rate_limiter(
    name: str,
    max_rate: float,
    strategy: RateLimitStrategy | str = RateLimitStrategy.TOKEN_BUCKET,
    *,
    burst_size: int | float | None = None,
    window_size: float = 1.0,
    clock: Clock | None = None,
) -> RateLimiter:
    """Build the limiter for ``strategy``; ``max_rate`` is starts per second in all of them.

    ``burst_size`` is for TOKEN_BUCKET only (refused with the other strategies, which
    would ignore it); a window strategy needs ``max_rate * window_size >= 1``.
    """
    kind = strategy_of(strategy)
    if isinstance(window_size, bool) or not isinstance(window_size, (int, float)) or not 0 < window_size < math.inf:
        raise CoordinationError(f"rate limit {name!r}: window_size must be seconds > 0, got {window_size!r}")
    if burst_size is not None and kind is not RateLimitStrategy.TOKEN_BUCKET:
        how = ("spaces starts evenly, with no burst" if kind is RateLimitStrategy.LEAKY_BUCKET
               else "already lets a window's whole allowance, floor(max_rate * window_size) starts, through at once")
        raise CoordinationError(
            f"rate limit {name!r}: burst_size={burst_size!r} applies to TOKEN_BUCKET only; {kind.name} {how}: "
            "drop burst_size, or use RateLimitStrategy.TOKEN_BUCKET to allow bursts"
        )
    if kind is RateLimitStrategy.TOKEN_BUCKET:
        return TokenBucket(name, max_rate, burst_size, clock=clock)
    if kind is RateLimitStrategy.LEAKY_BUCKET:
        return LeakyBucket(name, max_rate, clock=clock)
    if kind is RateLimitStrategy.SLIDING_WINDOW:
        return SlidingWindow(name, max_rate, window_size, clock=clock)
    return FixedWindow(name, max_rate, window_size, clock=clock)
