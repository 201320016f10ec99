"""``@agent_monitor``: metrics of every agent run inside a coroutine, without passing the agent.

The wrapper attaches a fresh :class:`MetricsCollector` to the runs awaited inside the
decorated coroutine (:func:`agent.events.observing`, a context variable), so nothing
changes in the workflow code. With ``realtime=True`` the callback gets the metrics every
``update_interval`` while the coroutine runs; it always gets them once more at the end,
even when the coroutine raises. Without a callback the final metrics are kept on the
wrapper as ``wrapper.last_metrics`` (the latest call's; ``None`` before the first call).

``aggregate=True`` (the default) gives figures over everything since the call began;
``aggregate=False`` gives each update only what happened since the previous one.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

from .. import events
from ..errors import MonitorConfigurationError
from .catalogue import MetricType, parse_metric_types
from .collector import MetricsCollector
from .process import ProcessSampler
from .ticker import Sleep, Ticker, check_callback, check_interval, check_seams, deliver

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


@overload
def agent_monitor(metrics: F) -> F: ...


@overload
def agent_monitor(
    metrics: MetricType = ...,
    realtime: bool = ...,
    update_interval: float = ...,
    metrics_callback: Callable[[dict], Any] | None = ...,
    aggregate: bool = ...,
    *,
    clock: Callable[[], float] = ...,
    sleep: Sleep = ...,
    process: ProcessSampler | None = ...,
) -> Callable[[F], F]: ...


def agent_monitor(
    metrics: Any = MetricType.ALL,
    realtime: bool = False,
    update_interval: float = 1.0,
    metrics_callback: Callable[[dict], Any] | None = None,
    aggregate: bool = True,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Sleep = asyncio.sleep,
    process: ProcessSampler | None = None,
) -> Any:
    """Monitor every agent run inside the decorated ``async def`` (also usable bare: ``@agent_monitor``)."""
    if inspect.iscoroutinefunction(metrics):
        return agent_monitor()(metrics)
    types = parse_metric_types(metrics)
    interval = check_interval(update_interval)
    check_callback(metrics_callback, "metrics_callback")
    for name, flag in (("realtime", realtime), ("aggregate", aggregate)):
        if type(flag) is not bool:
            raise MonitorConfigurationError(f"agent_monitor({name}=...) must be True or False, got {flag!r}")
    check_seams("agent_monitor", clock, sleep, process)

    def decorate(func: F) -> F:
        if not inspect.iscoroutinefunction(func):
            raise MonitorConfigurationError(
                f"@agent_monitor decorates async functions, got {func!r}: define it with 'async def'"
            )

        @functools.wraps(func)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            collector = MetricsCollector(clock=clock, process=process)

            async def publish(final: bool) -> None:
                collector.sample(final=final)
                data = collector.metrics(types, reset=not aggregate)
                wrapper.last_metrics = data  # type: ignore[attr-defined]
                if metrics_callback is not None:
                    await deliver(metrics_callback, data)

            with events.observing(collector):
                ticker = Ticker(interval, publish, sleep) if realtime else None
                if ticker is not None:
                    ticker.start()
                try:
                    return await func(*args, **kwargs)
                finally:
                    if ticker is not None:
                        await ticker.stop()  # its last tick is the final publish
                    else:
                        await publish(True)

        wrapper.last_metrics = None  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate

