from __future__ import annotations

from typing import Any, Callable

import pytest

from agent import events as ev
from agent.monitor import MetricsCollector
from agent.monitor.testing import FakeClock, FakeProcess


class Feed:
    """Emits run events stamped with the fake clock, as the engine would."""

    def __init__(self, clock: FakeClock, observer: Callable[[ev.RunEvent], None], agent: str = "wf", run: str = "r1"):
        self.clock = clock
        self.observer = observer
        self.agent = agent
        self.run = run

    def emit(self, kind: str, state: str | None = None, **fields: Any) -> None:
        self.observer(ev.RunEvent(kind, self.agent, self.run, state, time=self.clock.now, **fields))

    def state(self, name: str, seconds: float, attempt: int = 1, usage: dict | None = None) -> None:
        """One successful attempt taking ``seconds`` on the fake clock."""
        self.emit(ev.STATE_STARTED, name, attempt=attempt)
        self.clock.advance(seconds)
        self.emit(ev.STATE_COMPLETED, name, attempt=attempt, duration=seconds, usage=usage or {})

    def failure(self, name: str, seconds: float, attempt: int, final: bool, usage: dict | None = None) -> None:
        self.emit(ev.STATE_STARTED, name, attempt=attempt)
        self.clock.advance(seconds)
        self.emit(ev.STATE_FAILED, name, attempt=attempt, duration=seconds, usage=usage or {},
                  error="boom", data={"final": final, "kind": "exception"})


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def process() -> FakeProcess:
    return FakeProcess(cpu_seconds=10.0, rss_bytes=64 * 1024 * 1024)


@pytest.fixture
def collector(clock: FakeClock, process: FakeProcess) -> MetricsCollector:
    return MetricsCollector(clock=clock, process=process)


@pytest.fixture
def feed(clock: FakeClock, collector: MetricsCollector) -> Feed:
    return Feed(clock, collector)
