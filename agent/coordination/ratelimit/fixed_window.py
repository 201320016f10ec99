"""FIXED_WINDOW: at most ``floor(max_rate * window_size)`` starts per aligned window.

Windows are ``[k * window_size, (k + 1) * window_size)`` on the limiter's clock; the
count resets at each boundary. Cheap and simple, but two full windows back to back
can let up to twice the limit through around a boundary (use SLIDING_WINDOW when
that matters). ``max_rate`` is per second, as in every strategy; a window too short for
one start at that rate (``max_rate * window_size < 1``) is refused.
"""

from __future__ import annotations

import math
from typing import Any

from ...clock import Clock
from .base import RateLimiter, RateLimitStrategy, check_rate, window_limit

_EPS = 1e-9


class FixedWindow(RateLimiter):
    strategy = RateLimitStrategy.FIXED_WINDOW

    def __init__(self, name: str, max_rate: float, window_size: float = 1.0, *, clock: Clock | None = None) -> None:
        super().__init__(name, max_rate, clock=clock)
        self.window_size = check_rate(window_size, f"rate limit {name!r}: window_size")
        self.limit = window_limit(self, self.window_size)
        self._forget()

    def _window(self, now: float) -> int:
        return math.floor((now + _EPS) / self.window_size)

    def _delay(self, now: float) -> float:
        window = self._window(now)
        if window != self._current or self._count < self.limit:
            return 0.0
        return (window + 1) * self.window_size - now

    def _take(self, now: float) -> None:
        window = self._window(now)
        if window != self._current:
            self._current, self._count = window, 0
        self._count += 1

    def _forget(self) -> None:
        self._current = -1 << 62
        self._count = 0

    def config(self) -> dict[str, Any]:
        return {**super().config(), "window_size": self.window_size, "limit": self.limit}

    def describe(self) -> str:
        return f"fixed window, {self.limit} per {self.window_size:g}s"
