"""Real-time metrics: subscribers get the current metrics every ``update_interval``.

``start()`` attaches the collector to every run started afterwards in the calling task
(and the tasks it creates), the same ambient mechanism :func:`agent.events.observing`
uses, then starts the timer; ``stop()`` detaches it, stops the timer and sends one last
update, which counts what happened since the last tick (a window too short for a rate of
its own is measured together with the one before it: see :meth:`MetricsCollector.sample`).
Both can be called plainly from async code or awaited. Runs started elsewhere can be fed
with ``agent.add_observer(rt.observer)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Generator
from typing import Any

from .. import events
from ..errors import MonitorConfigurationError
from .catalogue import MetricType, parse_metric_types
from .collector import LiveSnapshot, MetricsCollector
from .process import ProcessSampler
from .ticker import Sleep, Ticker, check_callback, check_interval, check_seams, deliver, stopped

MetricsCallback = Callable[[dict], Any]


class _Ready:
    """What ``start()`` returns: awaiting it is allowed and does nothing more."""

    def __await__(self) -> Generator[Any, None, None]:
        return iter(())


class RealTimeMetrics:
    """Periodic metrics of the runs it observes, pushed to subscribed callbacks."""

    def __init__(
        self,
        update_interval: float = 1.0,
        metrics: MetricType = MetricType.ALL,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        process: ProcessSampler | None = None,
    ) -> None:
        self.update_interval = check_interval(update_interval)
        self.types = parse_metric_types(metrics)
        check_seams("RealTimeMetrics", clock, sleep, process)
        self._clock = clock
        self._sleep = sleep
        self._process = process
        self._subscribers: list[MetricsCallback] = []
        self._collector = MetricsCollector(clock=clock, process=process)
        self._ticker: Ticker | None = None
        self._attached: contextlib.AbstractContextManager[None] | None = None
        self._observing = False

    # --- subscribers -------------------------------------------------------------------

    def subscribe(self, callback: MetricsCallback) -> None:
        """Send every update to ``callback(metrics)`` (a function or a coroutine function)."""
        check_callback(callback, "a RealTimeMetrics subscriber")
        if callback is None:
            raise MonitorConfigurationError("subscribe() needs a callback, got None")
        if callback not in self._subscribers:
            self._subscribers.append(callback)

    def unsubscribe(self, callback: MetricsCallback) -> None:
        """Stop sending updates to ``callback`` (no-op when it is not subscribed)."""
        with contextlib.suppress(ValueError):
            self._subscribers.remove(callback)

    @property
    def subscribers(self) -> tuple[MetricsCallback, ...]:
        return tuple(self._subscribers)

    # --- observing ---------------------------------------------------------------------

    def observer(self, event: events.RunEvent) -> None:
        """The observer to attach to agents (``agent.add_observer(rt.observer)``)."""
        if self._observing:
            self._collector(event)

    @property
    def collector(self) -> MetricsCollector:
        return self._collector

    def metrics(self) -> dict[str, dict[str, dict[str, float]]]:
        """The current metrics, without closing an update window."""
        return self._collector.metrics(self.types)

    def live(self) -> LiveSnapshot:
        return self._collector.live()

    async def publish(self, final: bool = False) -> None:
        """Close an update window now and send the metrics to every subscriber."""
        self._collector.sample(final=final)
        for callback in tuple(self._subscribers):
            await deliver(callback, self._collector.metrics(self.types))

    # --- lifecycle ---------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._ticker is not None and self._ticker.running

    def start(self) -> _Ready:
        """Observe runs started from here on and start the timer. Needs a running loop."""
        if self._ticker is not None:
            return _Ready()
        ticker = Ticker(self.update_interval, self.publish, self._sleep)
        ticker.start()  # raises MonitorError without a running loop
        self._ticker = ticker
        self._observing = True
        self._attached = events.observing(self.observer)
        self._attached.__enter__()
        return _Ready()

    def stop(self) -> "asyncio.Future[None]":
        """Stop observing and the timer; await the result to wait for the last update."""
        self._observing = False
        if self._attached is not None:
            attached, self._attached = self._attached, None
            # Stopped from another task: that task never saw the attachment, and the
            # observer above is already off, so there is nothing left to undo.
            with contextlib.suppress(ValueError):
                attached.__exit__(None, None, None)
        ticker, self._ticker = self._ticker, None
        if ticker is None:
            return stopped("stop")
        return ticker.stop()
