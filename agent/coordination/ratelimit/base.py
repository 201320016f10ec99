"""What every rate limiter shares: FIFO admission on a clock, and its statistics.

A strategy only answers two questions: how long until the next start is allowed
(``_delay``), and record a start (``_take``). Admission is first come, first served:
waiters queue on a FIFO lock, and ``try_acquire`` refuses while anyone is queued, so a
caller that polls never overtakes one that waits.
"""

from __future__ import annotations

import asyncio
import enum
import math
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

from ... import _validate
from ...errors import CoordinationError, CoordinationTimeoutError
from ...clock import SYSTEM_CLOCK, Clock, wait_until_done

_EPS = 1e-9


class RateLimitStrategy(str, enum.Enum):
    """How a rate limit counts starts."""

    TOKEN_BUCKET = "token_bucket"
    LEAKY_BUCKET = "leaky_bucket"
    SLIDING_WINDOW = "sliding_window"
    FIXED_WINDOW = "fixed_window"


@dataclass(frozen=True)
class RateLimiterStatistics:
    """A snapshot of one rate limiter (``RateLimiter.statistics()``)."""

    name: str
    strategy: RateLimitStrategy
    max_rate: float
    admitted: int
    refused: int
    waiting: int
    timeouts: int
    total_wait: float  # clock seconds spent waiting by admitted callers

    def as_status(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy.value,
            "max_rate": self.max_rate,
            "admitted": self.admitted,
            "refused": self.refused,
            "wait_count": self.waiting,
            "timeouts": self.timeouts,
            "total_wait": self.total_wait,
        }


def check_rate(value: float, what: str) -> float:
    return _validate.number(value, what, error=CoordinationError, above=True)  # type: ignore[return-value]


def window_limit(limiter: RateLimiter, window_size: float) -> int:
    """Starts a window of ``window_size`` seconds admits at ``max_rate``: ``floor(max_rate * window_size)``.

    Never more than the rate allows; refused when that is less than one start (rounding
    it up to one would exceed ``max_rate``).
    """
    rate, name = limiter.max_rate, limiter.name
    limit = math.floor(rate * window_size + _EPS)
    if limit < 1:
        raise CoordinationError(
            f"rate limit {name!r}: {limiter.strategy.name} at max_rate={rate:g}/s over window_size={window_size:g}s "
            f"admits {rate * window_size:g} starts per window, less than one: use window_size >= {1 / rate:g}s "
            "(one start per window), or RateLimitStrategy.TOKEN_BUCKET or LEAKY_BUCKET, which hold any rate"
        )
    return limit


@dataclass(frozen=True)
class _Turn:
    """One acquire waiting in a limiter's line: ``future`` is done on ``loop`` when it reaches
    the head; ``stop`` fails it, at the head or not, when the limiter is reset."""

    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[None]
    stop: asyncio.Future[None]


def _turn_comes(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _turn_stops(turn: _Turn, error: BaseException) -> None:
    if not turn.stop.done():
        turn.stop.set_exception(error)


class RateLimiter:
    """Admits starts at no more than ``max_rate`` per second, by some strategy."""

    strategy: RateLimitStrategy

    def __init__(self, name: str, max_rate: float, *, clock: Clock | None = None) -> None:
        self.name = name
        self.max_rate = check_rate(max_rate, f"rate limit {name!r}: max_rate")
        self.clock: Clock = clock or SYSTEM_CLOCK
        # Shared by the runs of every thread's event loop: its state under a thread lock, and
        # its waiters in one line, each woken on its own loop when its turn comes.
        self._lock = threading.Lock()
        self._line: deque[_Turn] = deque()
        self._waiting = 0
        self._admitted = 0
        self._refused = 0
        self._timeouts = 0
        self._total_wait = 0.0

    def try_acquire(self) -> bool:
        """Start now if allowed and nobody is queued; never waits."""
        with self._lock:
            if self._start_now(self.clock.monotonic()):
                return True
            self._refused += 1
            return False

    def would_wait(self) -> bool:
        """Whether :meth:`acquire` would wait now (others queued, or no start allowed yet)."""
        with self._lock:
            return bool(self._line) or self._delay(self.clock.monotonic()) > _EPS

    async def acquire(self, timeout: float | None = None) -> None:
        """Wait (FIFO) until a start is allowed, then record it.

        With ``timeout``, raise CoordinationTimeoutError instead of waiting past it.
        """
        clock = self.clock
        with self._lock:
            start = clock.monotonic()
            if self._start_now(start):
                return
            loop = asyncio.get_running_loop()
            turn = _Turn(loop, loop.create_future(), loop.create_future())
            self._drop_gone_head()
            self._line.append(turn)
            self._waiting += 1
            if self._line[0] is turn:
                turn.future.set_result(None)
        deadline = math.inf if timeout is None else start + float(timeout)
        try:
            # In line (a timeout counts from the call, not from reaching the head), then at its head.
            if not await wait_until_done(clock, turn.future, deadline - clock.monotonic()):
                self._time_out(timeout)
            while True:
                if turn.stop.done():
                    turn.stop.result()  # reset meanwhile: raises
                with self._lock:
                    now = clock.monotonic()
                    delay = self._delay(now)
                    if delay <= _EPS:
                        self._take(now)
                        self._admitted += 1
                        self._total_wait += now - start
                        return
                if now + delay > deadline + _EPS:
                    self._time_out(timeout)
                await wait_until_done(clock, turn.stop, delay)
        finally:
            with self._lock:
                was_head = bool(self._line) and self._line[0] is turn
                if turn in self._line:  # (not when dropped as gone: counted out then)
                    self._line.remove(turn)
                    self._waiting -= 1
                if was_head:
                    self._wake_next()

    def _time_out(self, timeout: float | None) -> None:
        with self._lock:
            self._timeouts += 1
        raise CoordinationTimeoutError(
            f"rate limit {self.name!r} ({self.describe()}): no start allowed within "
            f"{timeout:g}s; raise the timeout or the rate"
        )

    def _drop_gone_head(self) -> None:
        """Drop waiters at the head whose loop is closed (lock held): a loop closed without
        cancelling its tasks left them there, and nobody behind them would be woken."""
        while self._line and self._line[0].loop.is_closed():
            self._line.popleft()
            self._waiting -= 1

    def _start_now(self, now: float) -> bool:
        """Record a start at ``now`` if one is allowed and nobody waits (lock held)."""
        if self._line or self._delay(now) > _EPS:
            return False
        self._take(now)
        self._admitted += 1
        return True

    def _wake_next(self) -> None:
        """Wake the waiter now at the head of the line, on its own loop (lock held); one
        whose loop closed is dropped."""
        while self._line:
            turn = self._line[0]
            try:
                turn.loop.call_soon_threadsafe(_turn_comes, turn.future)
                return
            except RuntimeError:  # its loop is closed: it waits for nothing any more
                self._line.popleft()
                self._waiting -= 1

    def reset(self) -> None:
        """Forget past starts (the limiter starts afresh); whoever waits in line fails with
        CoordinationError, on its own loop."""
        with self._lock:
            self._forget()
            waiting = list(self._line)
        for turn in waiting:
            error = CoordinationError(f"rate limit {self.name!r} was reset while a start waited for it")
            try:
                turn.loop.call_soon_threadsafe(_turn_stops, turn, error)
                turn.loop.call_soon_threadsafe(_turn_comes, turn.future)  # out of line, to hear it
            except RuntimeError:  # its loop is closed: it waits for nothing any more
                pass

    def statistics(self) -> RateLimiterStatistics:
        return RateLimiterStatistics(
            name=self.name,
            strategy=self.strategy,
            max_rate=self.max_rate,
            admitted=self._admitted,
            refused=self._refused,
            waiting=self._waiting,
            timeouts=self._timeouts,
            total_wait=self._total_wait,
        )

    def status(self) -> dict[str, Any]:
        return {**self.statistics().as_status(), **self.config()}

    def config(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "max_rate": self.max_rate}

    def describe(self) -> str:
        return f"{self.strategy.value}, {self.max_rate:g}/s"

    # --- what a strategy implements ---------------------------------------------------

    def _delay(self, now: float) -> float:
        """Seconds until a start is allowed (0 when one is allowed now)."""
        raise NotImplementedError

    def _take(self, now: float) -> None:
        """Record a start at ``now``."""
        raise NotImplementedError

    def _forget(self) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} {self.describe()}>"
