"""What the engine tells observers (metrics, exporters, live views) while a run goes.

Observers are plain callables taking a :class:`RunEvent`. They are attached either to
one agent (``agent.add_observer``) or to everything that runs inside a block of code
(:func:`observing`, which ``agent_monitor`` uses: it works through a context variable,
so every ``Agent.run`` awaited inside the block is seen without passing the agent).
Observers must be quick and must not raise; an observer that raises is dropped from
that run and the error logged, the run goes on. An event that ends a state comes once the
state reads as it says (COMPLETED at ``STATE_COMPLETED``, FAILED at a final
``STATE_FAILED``); ``cancel_state()`` and ``cancel_all()`` tell ``STATE_CANCELLED`` for
each state they cancel, started or not. A run that ends otherwise (it failed, timed out)
makes what never started CANCELLED without an event: only a started state is told.
"""

from __future__ import annotations

import contextlib
import contextvars
import time as _time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

RUN_STARTED = "run_started"
RUN_FINISHED = "run_finished"  # status in .status: completed, failed, cancelled
STATE_QUEUED = "state_queued"  # ready, waiting for resources / concurrency
STATE_STARTED = "state_started"
STATE_COMPLETED = "state_completed"  # .data["next"]: the states it handed over to
# One attempt failed; .data["final"]: retries are exhausted, .data["run_goes_on"]: and on_failure="continue".
STATE_FAILED = "state_failed"
STATE_RETRYING = "state_retrying"
STATE_CANCELLED = "state_cancelled"
STATE_PREEMPTED = "state_preempted"
STATE_PAUSED = "state_paused"  # its attempt was stopped by pause(): it runs again on resume
STATE_BLOCKED = "state_blocked"
DEPENDENCY_RESOLVED = "dependency_resolved"  # .duration: time the state waited on dependencies


@dataclass(slots=True)
class RunEvent:
    """One thing that happened in a run."""

    kind: str
    agent_name: str
    run_id: str
    state: str | None = None
    attempt: int = 0
    status: str | None = None
    duration: float | None = None  # seconds, for *_COMPLETED / *_FAILED / DEPENDENCY_RESOLVED
    usage: dict[str, Any] = field(default_factory=dict)  # measured by the executor
    error: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=_time.monotonic)
    wall_time: float = field(default_factory=_time.time)


Observer = Callable[[RunEvent], None]

_ambient: contextvars.ContextVar[tuple[Observer, ...]] = contextvars.ContextVar(
    "agent_observers", default=()
)


@contextlib.contextmanager
def observing(observer: Observer) -> Iterator[None]:
    """Send the events of every run started inside this block to ``observer``."""
    token = _ambient.set(_ambient.get() + (observer,))
    try:
        yield
    finally:
        _ambient.reset(token)


def ambient_observers() -> tuple[Observer, ...]:
    """Observers attached with :func:`observing` in the current context."""
    return _ambient.get()
