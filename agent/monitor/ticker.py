"""A periodic task that publishes metrics every interval, and once more when stopped.

Time passes through an injectable ``sleep`` (``asyncio.sleep`` by default), so tests
drive updates by hand instead of waiting on the wall clock.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from .. import _validate
from ..errors import MonitorConfigurationError, MonitorError

log = logging.getLogger("agent.monitor")

Sleep = Callable[[float], Awaitable[Any]]


def check_interval(interval: float) -> float:
    return _validate.number(interval, "update_interval", error=MonitorConfigurationError,  # type: ignore[return-value]
                            above=True, unit="seconds")


def check_callback(callback: Any, what: str) -> None:
    if callback is not None and not callable(callback):
        raise MonitorConfigurationError(
            f"{what} must be a function taking the metrics dict (sync or async), got {callback!r}"
        )


async def deliver(callback: Callable[[dict], Any], metrics: dict) -> None:
    """Call a metrics callback, sync or async. Its errors are logged: monitoring never breaks a run."""
    try:
        result = callback(metrics)
        if inspect.isawaitable(result):
            await result
    except Exception:
        log.exception("metrics callback %r raised; the run goes on", callback)


def running_loop(what: str) -> asyncio.AbstractEventLoop:
    """The running loop; MonitorError without one (``what``: the call, for the message)."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        raise MonitorError(
            f"real-time metrics need a running event loop: {what} them from async code"
        ) from None


def stopped(what: str) -> "asyncio.Future[None]":
    """A future already done: nothing was running to stop."""
    done: asyncio.Future[None] = running_loop(what).create_future()
    done.set_result(None)
    return done


class Ticker:
    """Calls ``tick(final)`` every ``interval`` seconds until stopped, then once with ``final=True``."""

    def __init__(self, interval: float, tick: Callable[[bool], Awaitable[None]], sleep: Sleep = asyncio.sleep) -> None:
        self._interval = check_interval(interval)
        self._tick = tick
        self._sleep = sleep
        self._task: asyncio.Task[None] | None = None
        self._sleeper: asyncio.Future[Any] | None = None
        self._stopping = False

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        loop = running_loop("start")
        if self._task is not None:
            return
        self._task = loop.create_task(self._run(), name="agent-metrics-ticker")

    async def _run(self) -> None:
        while not self._stopping:
            self._sleeper = asyncio.ensure_future(self._sleep(self._interval))
            try:
                await self._sleeper
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not self._stopping or (task is not None and task.cancelling()):
                    raise
            finally:
                self._sleeper = None
            if self._stopping:
                break
            await self._tick(False)
        await self._tick(True)

    def stop(self) -> "asyncio.Future[None]":
        """Stop ticking; the returned future is done once the final tick has run."""
        if self._task is None:
            return stopped("stop")
        if not self._stopping:
            self._stopping = True
            if self._sleeper is not None:
                self._sleeper.cancel()
        return self._task


def check_seams(owner: str, clock: Any, sleep: Any, process: Any) -> None:
    """The test seams (``clock``, ``sleep``, ``process``) are checked when given: a wrong one
    would fail only once the monitor runs, inside it."""
    error = MonitorConfigurationError
    _validate.function(clock, f"{owner}(clock=...)", error=error,
                       expected="a function returning seconds, like time.monotonic")
    _validate.function(sleep, f"{owner}(sleep=...)", error=error,
                       expected="an async function taking seconds, like asyncio.sleep")
    _validate.methods(process, f"{owner}(process=...)", ("cpu_seconds", "rss_bytes"), error=error,
                      expected="a ProcessSampler with cpu_seconds() and rss_bytes()", none=True)
