"""LEAKY_BUCKET: starts evenly spaced, exactly ``1 / max_rate`` seconds apart at most.

Callers queue (the bucket) and leak out at a steady ``max_rate``: no bursts, smooth
flow into the thing downstream. ``window_size`` is accepted for symmetry with the
window strategies and does not change the spacing.
"""

from __future__ import annotations

from ...clock import Clock
from .base import RateLimiter, RateLimitStrategy


class LeakyBucket(RateLimiter):
    strategy = RateLimitStrategy.LEAKY_BUCKET

    def __init__(self, name: str, max_rate: float, *, clock: Clock | None = None) -> None:
        super().__init__(name, max_rate, clock=clock)
        self.interval = 1.0 / self.max_rate
        self._forget()

    def _delay(self, now: float) -> float:
        return max(0.0, self._next - now)

    def _take(self, now: float) -> None:
        self._next = max(now, self._next) + self.interval

    def _forget(self) -> None:
        self._next = -float("inf")

    def describe(self) -> str:
        return f"leaky bucket, one start every {self.interval:g}s"
