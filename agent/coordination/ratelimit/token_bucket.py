"""TOKEN_BUCKET: a burst of ``burst_size`` at once, then ``max_rate`` per second.

The bucket holds up to ``burst_size`` tokens (default: ``max(1, floor(max_rate))``), starts
full, and refills continuously at ``max_rate`` tokens per second; a start takes one.
Over any interval of ``t`` seconds at most ``burst_size + max_rate * t`` starts happen.
"""

from __future__ import annotations

import math
from typing import Any

from ... import _validate
from ...errors import CoordinationError
from ...clock import Clock
from .base import RateLimiter, RateLimitStrategy

_EPS = 1e-9


class TokenBucket(RateLimiter):
    strategy = RateLimitStrategy.TOKEN_BUCKET

    def __init__(
        self, name: str, max_rate: float, burst_size: int | float | None = None, *, clock: Clock | None = None
    ) -> None:
        super().__init__(name, max_rate, clock=clock)
        if burst_size is None:
            burst_size = max(1.0, math.floor(self.max_rate))
        self.burst_size = _validate.number(
            burst_size, f"rate limit {name!r}: burst_size", error=CoordinationError, minimum=1,
        )
        self._forget()

    def _refill(self, now: float) -> None:
        if now > self._last:
            self._tokens = min(self.burst_size, self._tokens + (now - self._last) * self.max_rate)
            self._last = now

    def _delay(self, now: float) -> float:
        self._refill(now)
        missing = 1.0 - self._tokens
        return 0.0 if missing <= _EPS else missing / self.max_rate

    def _take(self, now: float) -> None:
        self._refill(now)
        self._tokens = max(0.0, self._tokens - 1.0)

    def _forget(self) -> None:
        self._tokens = self.burst_size
        self._last = self.clock.monotonic()

    def tokens(self) -> float:
        """Tokens in the bucket now."""
        self._refill(self.clock.monotonic())
        return self._tokens

    def config(self) -> dict[str, Any]:
        return {**super().config(), "burst_size": self.burst_size}

    def status(self) -> dict[str, Any]:
        return {**super().status(), "tokens": self.tokens()}

    def describe(self) -> str:
        return f"token bucket, {self.max_rate:g}/s, burst {self.burst_size:g}"
