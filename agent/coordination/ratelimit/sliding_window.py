"""SLIDING_WINDOW: at most ``max_rate * window_size`` starts in any ``window_size`` seconds.

``max_rate`` is a per-second rate in every strategy, so ``max_rate=100.0,
window_size=60.0`` admits up to 6000 starts in any 60-second span (not 100): the
window only decides over how long a stretch the rate is averaged, which lets short
bursts through as long as the window's total holds. The limit is
``floor(max_rate * window_size)``, never more than the rate allows; a window too short
for one start at ``max_rate`` (``max_rate * window_size < 1``) is refused rather than
rounded up to one start, which would exceed the rate. The log of start times is exact (a start
at ``t`` counts for windows ``(t - window_size, t]``), so no window ever holds more
than the limit, whatever its alignment.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from ...clock import Clock
from .base import RateLimiter, RateLimitStrategy, check_rate, window_limit

_EPS = 1e-9


class SlidingWindow(RateLimiter):
    strategy = RateLimitStrategy.SLIDING_WINDOW

    def __init__(self, name: str, max_rate: float, window_size: float = 1.0, *, clock: Clock | None = None) -> None:
        super().__init__(name, max_rate, clock=clock)
        self.window_size = check_rate(window_size, f"rate limit {name!r}: window_size")
        self.limit = window_limit(self, self.window_size)
        self._starts: deque[float] = deque()

    def _prune(self, now: float) -> None:
        starts, window = self._starts, self.window_size
        while starts and starts[0] + window <= now + _EPS:
            starts.popleft()

    def _delay(self, now: float) -> float:
        self._prune(now)
        if len(self._starts) < self.limit:
            return 0.0
        return self._starts[0] + self.window_size - now

    def _take(self, now: float) -> None:
        self._prune(now)
        self._starts.append(now)

    def _forget(self) -> None:
        self._starts.clear()

    def in_window(self) -> int:
        """Starts counted in the window ending now."""
        self._prune(self.clock.monotonic())
        return len(self._starts)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "window_size": self.window_size, "limit": self.limit}

    def status(self) -> dict[str, Any]:
        return {**super().status(), "in_window": self.in_window()}

    def describe(self) -> str:
        return f"sliding window, {self.limit} per {self.window_size:g}s"
