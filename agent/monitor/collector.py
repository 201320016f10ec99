"""The observer that turns a run's events into metrics and a live view.

A :class:`MetricsCollector` is a plain :data:`agent.events.Observer`: attach it to an
agent (``agent.add_observer(collector)``) or to every run in a block
(``with observing(collector): ...``). Each event costs a few dictionary operations;
figures that are rates (throughput, CPU percent, process memory) are taken once per
*update window* by :meth:`MetricsCollector.sample`, which the real-time ticker calls
every ``update_interval`` and once at the end.

CPU of isolated attempts (``process``, ``worker``, ``sandbox``) is read from their cgroups
as they run: each window reads the counter of every attempt of an observed run that is
running then (one file read each, off the per-event path) and counts what it grew since
the previous read; an attempt's end adds the rest of its measured ``cpu_seconds``. What
the windows count for an attempt thus adds up to its ``usage["cpu_seconds"]``.

Times: events carry ``time.monotonic()`` stamps, so the collector's ``clock`` must use
the same timebase (the default is ``time.monotonic``; tests pass a fake clock and
events stamped with it). Reads and writes take a lock, so an exporter thread may read
while the event loop writes.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from .. import _validate
from .. import events as ev
from ..errors import FAILURE_KINDS, MonitorConfigurationError
from .aggregation import DEFAULT_CAPACITY, MetricAggregation, Ratio, Tally
from .catalogue import CATALOGUE, MetricSpec, MetricType, parse_metric_types, specs_for
from .process import ProcessSampler, ThisProcess

_MIB = 1024.0 * 1024.0

_log = logging.getLogger("agent.monitor")

# Figures shared between two categories: the same values, one aggregation.
_ALIASES = {("dependency", "resolution_time"): ("timing", "dependency_resolution")}

RECENT_RUNS = 32

AttemptsCpu = Callable[[], Iterable[tuple[str, str, int, float]]]
"""Where the collector reads the CPU seconds running isolated attempts have used so far:
``(run id, state, attempt number, cpu seconds)`` each."""


def running_attempts_cpu() -> list[tuple[str, str, int, float]]:
    """The isolated attempts the supervisors of this thread's event loop run now (none when
    no isolated state ever ran in this process: nothing is imported or started for it)."""
    service = sys.modules.get("agent.supervisor.service")
    if service is None:
        return []
    attempts: list[tuple[str, str, int, float]] = service.running_attempts_cpu()
    return attempts


@dataclass(frozen=True)
class _Window:
    """One closed update window: its active seconds and what happened in it."""

    busy: float
    completed: int
    started: int
    dequeued: int  # attempts that started after waiting for resources
    isolated_cpu: float  # seconds
    process_cpu: float  # seconds

    def __add__(self, other: "_Window") -> "_Window":
        return _Window(self.busy + other.busy, self.completed + other.completed, self.started + other.started,
                       self.dequeued + other.dequeued, self.isolated_cpu + other.isolated_cpu,
                       self.process_cpu + other.process_cpu)


@dataclass(frozen=True)
class StateView:
    """A state attempt running now."""

    agent_name: str
    run_id: str
    state: str
    attempt: int
    running_for: float  # seconds


@dataclass(frozen=True)
class RunView:
    """One run, as the live view shows it."""

    agent_name: str
    run_id: str
    status: str  # running, completed, failed, cancelled
    elapsed: float  # seconds
    completed: int
    failed_attempts: int
    retries: int
    queued: int
    running: tuple[StateView, ...]


@dataclass(frozen=True)
class LiveSnapshot:
    """What is running now and how fast, for ``agent top`` and exporters."""

    time: float
    active: tuple[RunView, ...]
    recent: tuple[RunView, ...]  # finished runs, newest first
    states_completed: int
    attempts_failed: int
    states_per_second: float  # latest update window
    used_cpu_percent: float  # latest update window
    process_memory_mb: float  # latest update window


@dataclass
class _Run:
    agent_name: str
    run_id: str
    started: float
    status: str = "running"
    finished: float | None = None
    completed: int = 0
    failed_attempts: int = 0
    retries: int = 0
    running: dict[str, tuple[int, float]] = field(default_factory=dict)
    queued: dict[str, float] = field(default_factory=dict)
    # state -> when it was first queued or started; kept until it ends (completed, failed for
    # good, cancelled, blocked): what is left when the run finishes ended cancelled with it
    first_seen: dict[str, float] = field(default_factory=dict)
    allocated: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    # state -> (attempt, its CPU seconds as counted into update windows so far)
    cpu_counted: dict[str, tuple[int, float]] = field(default_factory=dict)

    def view(self, now: float) -> RunView:
        end = self.finished if self.finished is not None else now
        return RunView(
            agent_name=self.agent_name,
            run_id=self.run_id,
            status=self.status,
            elapsed=max(0.0, end - self.started),
            completed=self.completed,
            failed_attempts=self.failed_attempts,
            retries=self.retries,
            queued=len(self.queued),
            running=tuple(
                StateView(self.agent_name, self.run_id, name, attempt, max(0.0, now - since))
                for name, (attempt, since) in self.running.items()
            ),
        )


def _measured(value: Any) -> TypeGuard[float]:
    """Whether ``value`` is a figure an aggregation takes (a finite int or float, not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _allocation(resources: Any) -> tuple[float, float, float] | None:
    """(cpu cores, memory MiB, GPUs) of a ResourceRequirements or a mapping, if any."""
    if resources is None:
        return None
    if isinstance(resources, dict):
        get = resources.get
    else:
        def get(name: str, default: float = 0.0) -> Any:
            return getattr(resources, name, default)
    try:
        return float(get("cpu_units", 0.0)), float(get("memory_mb", 0.0)), float(get("gpu_units", 0.0))
    except (TypeError, ValueError):
        return None


class MetricsCollector:
    """Aggregates the events of every run it observes into the metrics dict."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        process: ProcessSampler | None = None,
        capacity: int = DEFAULT_CAPACITY,
        min_window: float = 0.05,
        attempts: AttemptsCpu | None = running_attempts_cpu,
    ) -> None:
        self._clock = clock
        self._attempts = attempts
        self._process = process if process is not None else ThisProcess()
        _validate.integer(capacity, "MetricsCollector capacity", error=MonitorConfigurationError, minimum=1)
        self._capacity = capacity
        self._min_window = _validate.number(min_window, "MetricsCollector min_window", error=MonitorConfigurationError,
                                            unit="seconds")
        self._lock = threading.Lock()
        self._runs: dict[str, _Run] = {}
        self._recent: deque[_Run] = deque(maxlen=RECENT_RUNS)
        self._queued_total = 0
        self._running_total = 0
        self._alloc_total = [0.0, 0.0, 0.0]
        self._totals = {"completed": 0, "failed": 0}
        # Update window: active (busy) time and what happened in it.
        self._busy_acc = 0.0
        self._busy_since = 0.0
        self._window_completed = 0
        self._window_started = 0
        self._window_dequeued = 0
        self._window_isolated_cpu = 0.0
        self._last_window: _Window | None = None
        self._isolated_cpu_counted = 0.0
        self._process_cpu_mark = self._process.cpu_seconds()
        self._idle_cpu_mark = self._process_cpu_mark  # this process's CPU when the last run ended
        self._new_aggregations()
        self._handlers: dict[str, Callable[[ev.RunEvent], None]] = {
            ev.RUN_STARTED: self._on_run_started,
            ev.RUN_FINISHED: self._on_run_finished,
            ev.STATE_QUEUED: self._on_queued,
            ev.STATE_STARTED: self._on_started,
            ev.STATE_COMPLETED: self._on_completed,
            ev.STATE_FAILED: self._on_failed,
            ev.STATE_RETRYING: self._on_retrying,
            ev.STATE_CANCELLED: self._on_cancelled,
            ev.STATE_PREEMPTED: self._on_preempted,
            ev.STATE_PAUSED: self._on_paused,
            ev.STATE_BLOCKED: self._on_blocked,
            ev.DEPENDENCY_RESOLVED: self._on_dependency_resolved,
        }

    # --- aggregations ------------------------------------------------------------------

    def _new_aggregations(self) -> None:
        aggs: dict[tuple[str, str], MetricAggregation | Tally | Ratio] = {}
        for spec in CATALOGUE:
            key = (spec.category, spec.name)
            if key in _ALIASES:
                continue
            if spec.tally:
                aggs[key] = Tally()
            elif spec.binary:
                aggs[key] = Ratio()
            else:
                aggs[key] = MetricAggregation(self._capacity)
        for alias, target in _ALIASES.items():
            aggs[alias] = aggs[target]
        self._aggs = aggs
        a = aggs.__getitem__
        self._a_total_execution = a(("timing", "total_execution"))
        self._a_run_duration = a(("timing", "run_duration"))
        self._a_dependency = a(("timing", "dependency_resolution"))
        self._a_queue_wait = a(("latency", "queue_wait"))
        self._a_coordination_wait = a(("latency", "coordination_wait"))
        self._a_kinds = {kind: a(("errors", kind)) for kind in FAILURE_KINDS}
        self._a_turnaround = a(("latency", "turnaround"))
        def measured(key: tuple[str, str]) -> MetricAggregation:
            agg = aggs[key]
            assert isinstance(agg, MetricAggregation)
            return agg

        self._a_sps = measured(("throughput", "states_per_second"))
        self._a_aps = measured(("throughput", "attempts_per_second"))
        self._a_queue_rate = measured(("throughput", "queue_processing_rate"))
        self._a_used_cpu = measured(("resources", "used_CPU"))
        self._a_isolated_cpu = measured(("resources", "isolated_CPU"))
        self._a_process_cpu = measured(("resources", "process_CPU"))
        self._a_process_mem = measured(("resources", "process_memory_mb"))
        self._a_state_cpu = a(("resources", "state_cpu_seconds"))
        self._a_state_mem = a(("resources", "state_peak_memory_mb"))
        self._a_state_throttled = a(("resources", "state_throttled_seconds"))
        self._a_state_read = a(("resources", "state_io_read_mb"))
        self._a_state_write = a(("resources", "state_io_write_mb"))
        self._a_alloc = (a(("resources", "allocated_CPU")), a(("resources", "allocated_memory_mb")),
                         a(("resources", "allocated_GPU")))
        self._a_errors = a(("errors", "count"))
        self._a_failed_states = a(("errors", "failed_states"))
        self._a_error_rate = a(("errors", "error_rate"))
        self._a_retries = a(("retries", "count"))
        self._a_attempts = a(("retries", "attempts_per_state"))
        self._a_retry_delay = a(("retries", "delay"))
        self._a_started = a(("state", "started"))
        self._a_completed = a(("state", "completed"))
        self._a_cancelled = a(("state", "cancelled"))
        self._a_preempted = a(("state", "preempted"))
        self._a_success = a(("state", "success_rate"))
        self._a_resolved = a(("dependency", "resolved"))
        self._a_chain = a(("dependency", "chain_length"))
        self._a_blocked = a(("dependency", "blocked"))
        self._a_enqueued = a(("queue", "enqueued"))
        self._a_depth = a(("queue", "depth"))
        self._a_running = a(("concurrency", "running_states"))
        self._a_active_runs = a(("concurrency", "active_runs"))

    def aggregation(self, category: str, name: str) -> MetricAggregation | Tally | Ratio:
        """The live aggregation behind ``metrics[category][name]``."""
        try:
            return self._aggs[(category, name)]
        except (KeyError, TypeError):
            raise MonitorConfigurationError(
                f"no metric {category!r}.{name!r}: the catalogue (agent_monitor.CATALOGUE, docs/monitoring.md) "
                "lists each category and name"
            ) from None

    # --- the observer ------------------------------------------------------------------

    def __call__(self, event: ev.RunEvent) -> None:
        handler = self._handlers.get(event.kind)
        if handler is not None:
            with self._lock:
                handler(event)

    def _run(self, event: ev.RunEvent) -> _Run:
        run = self._runs.get(event.run_id)
        if run is None:  # attached mid-run: start tracking from here
            run = self._start_run(event.agent_name, event.run_id, event.time)
        return run

    def _start_run(self, agent_name: str, run_id: str, now: float) -> _Run:
        run = _Run(agent_name, run_id, now)
        if not self._runs:
            self._busy_since = now
            # What this process spent while no run was active is no run's: the window, which
            # counts active time only, leaves it out (it read 200% for idle runs after a busy
            # pause of the program's own).
            cpu = self._process.cpu_seconds()
            self._process_cpu_mark += max(0.0, cpu - max(self._idle_cpu_mark, self._process_cpu_mark))
        self._runs[run_id] = run
        self._a_active_runs.add(len(self._runs))
        return run

    def _on_run_started(self, event: ev.RunEvent) -> None:
        if event.run_id not in self._runs:
            self._start_run(event.agent_name, event.run_id, event.time)

    def _on_run_finished(self, event: ev.RunEvent) -> None:
        run = self._runs.pop(event.run_id, None)
        if run is None:
            return
        if not self._runs:
            self._idle_cpu_mark = self._process.cpu_seconds()
        now = event.time
        run.status = event.status or "completed"
        run.finished = now
        self._a_run_duration.add((now - run.started) * 1000.0)
        # What the run leaves unfinished ends CANCELLED with it (the engine's abandon()), but
        # only a state that was running is told so by an event: one waiting for resources,
        # for its retry, or to run again after a pause or preemption is counted here.
        self._a_cancelled.count += len(run.first_seen)
        self._running_total -= len(run.running)
        if run.queued:
            self._queued_total -= len(run.queued)
            self._a_depth.add(self._queued_total)
        for alloc in run.allocated.values():
            self._move_allocation(alloc, -1.0)
        run.running.clear()
        run.queued.clear()
        run.first_seen.clear()
        run.allocated.clear()
        run.cpu_counted.clear()
        self._recent.appendleft(run)
        if not self._runs:
            self._busy_acc += max(0.0, now - self._busy_since)

    def _on_queued(self, event: ev.RunEvent) -> None:
        run = self._run(event)
        state = event.state or ""
        if state in run.queued:  # still waiting: the engine says so on each scheduling pass
            return
        self._queued_total += 1
        run.queued[state] = event.time
        run.first_seen.setdefault(state, event.time)
        self._a_enqueued.count += 1
        self._a_depth.add(self._queued_total)

    def _on_started(self, event: ev.RunEvent) -> None:
        run = self._run(event)
        state = event.state or ""
        queued_at = self._unqueue(run, state)
        if queued_at is not None:
            self._window_dequeued += 1
            self._a_queue_wait.add((event.time - queued_at) * 1000.0)
        waited = event.data.get("coordination_wait")
        if waited is not None:  # the attempt waited for its state's primitives first
            self._a_coordination_wait.add(waited * 1000.0)
            run.first_seen.setdefault(state, event.time - waited)
        run.first_seen.setdefault(state, event.time)
        if state not in run.running:
            self._running_total += 1
        run.running[state] = (event.attempt, event.time)
        self._a_running.add(self._running_total)
        self._a_started.count += 1
        self._window_started += 1
        alloc = _allocation(event.data.get("resources")) if event.data else None
        if alloc is not None:
            previous = run.allocated.pop(state, None)
            if previous is not None:
                self._move_allocation(previous, -1.0)
            run.allocated[state] = alloc
            self._move_allocation(alloc, 1.0)

    def _unqueue(self, run: _Run, state: str) -> float | None:
        """Take ``state`` off the resource queue, recording the new depth (queue.depth is
        taken at each change); returns when it was queued, None when it was not."""
        queued_at = run.queued.pop(state, None)
        if queued_at is not None:
            self._queued_total -= 1
            self._a_depth.add(self._queued_total)
        return queued_at

    def _move_allocation(self, alloc: tuple[float, float, float], sign: float) -> None:
        total = self._alloc_total
        for i in range(3):
            total[i] = max(0.0, total[i] + sign * alloc[i])
            self._a_alloc[i].add(total[i])

    def _end_attempt(self, run: _Run, event: ev.RunEvent) -> float | None:
        """Close the running record of an attempt; returns its duration in seconds."""
        state = event.state or ""
        started = run.running.pop(state, None)
        if started is not None:
            self._running_total -= 1
        alloc = run.allocated.pop(state, None)
        if alloc is not None:
            self._move_allocation(alloc, -1.0)
        counted = run.cpu_counted.pop(state, None) if run.cpu_counted else None
        if event.usage:
            self._add_usage(event.usage, counted[1] if counted is not None else 0.0)
        if event.duration is not None:
            return event.duration
        return event.time - started[1] if started is not None else None

    def _add_usage(self, usage: dict[str, Any], counted: float) -> None:
        """An attempt's measured usage; ``counted``: its CPU seconds already counted into
        update windows while it ran (the rest goes into the current window)."""
        cpu = usage.get("cpu_seconds")
        if _measured(cpu):
            self._a_state_cpu.add(cpu)
            self._window_isolated_cpu += max(0.0, cpu - counted)
        throttled = usage.get("throttled_seconds")
        if _measured(throttled):
            self._a_state_throttled.add(throttled)
        peak = usage.get("peak_memory_bytes")
        if _measured(peak):
            self._a_state_mem.add(peak / _MIB)
        read = usage.get("io_read_bytes")
        if _measured(read):
            self._a_state_read.add(read / _MIB)
        write = usage.get("io_write_bytes")
        if _measured(write):
            self._a_state_write.add(write / _MIB)

    def _on_completed(self, event: ev.RunEvent) -> None:
        run = self._run(event)
        duration = self._end_attempt(run, event)
        if duration is not None:
            self._a_total_execution.add(duration * 1000.0)
        first = run.first_seen.pop(event.state or "", None)
        if first is not None:
            self._a_turnaround.add((event.time - first) * 1000.0)
        run.completed += 1
        self._totals["completed"] += 1
        self._window_completed += 1
        self._a_completed.count += 1
        self._a_error_rate.add(0.0)
        self._a_success.add(1.0)
        self._a_attempts.add(max(1, event.attempt))

    def _on_failed(self, event: ev.RunEvent) -> None:
        run = self._run(event)
        self._end_attempt(run, event)
        run.failed_attempts += 1
        self._totals["failed"] += 1
        self._a_errors.count += 1
        kind = self._a_kinds.get(event.data.get("kind"))
        if kind is not None:
            kind.count += 1
        self._a_error_rate.add(1.0)
        if event.data.get("final"):
            run.first_seen.pop(event.state or "", None)
            self._a_failed_states.count += 1
            self._a_success.add(0.0)
            self._a_attempts.add(max(1, event.attempt))

    def _on_retrying(self, event: ev.RunEvent) -> None:
        self._run(event).retries += 1
        self._a_retries.count += 1
        delay = event.data.get("delay")
        if _measured(delay):
            self._a_retry_delay.add(delay * 1000.0)

    def _drop_state(self, run: _Run, event: ev.RunEvent) -> None:
        self._unqueue(run, event.state or "")
        self._end_attempt(run, event)

    def _on_cancelled(self, event: ev.RunEvent) -> None:
        run = self._run(event)
        self._drop_state(run, event)
        run.first_seen.pop(event.state or "", None)
        self._a_cancelled.count += 1

    def _on_preempted(self, event: ev.RunEvent) -> None:
        self._drop_state(self._run(event), event)
        self._a_preempted.count += 1

    def _on_paused(self, event: ev.RunEvent) -> None:
        self._drop_state(self._run(event), event)

    def _on_blocked(self, event: ev.RunEvent) -> None:
        run = self._run(event)
        self._unqueue(run, event.state or "")
        run.first_seen.pop(event.state or "", None)
        self._a_blocked.count += 1

    def _on_dependency_resolved(self, event: ev.RunEvent) -> None:
        self._run(event)
        if event.duration is not None:
            self._a_dependency.add(event.duration * 1000.0)
        chain = event.data.get("chain_length")
        if isinstance(chain, int):
            self._a_chain.add(chain)
        self._a_resolved.count += 1

    # --- update windows ----------------------------------------------------------------

    def sample(self, now: float | None = None, *, final: bool = False) -> bool:
        """Close the current update window: add one throughput, CPU and memory value each.

        The CPU isolated attempts used in the window is read from their cgroups first (see
        the module's docstring). A window with no active run time adds nothing. A window
        shorter than ``min_window`` of active time is carried into the next one (its rate
        would be noise); the ``final`` one is measured together with the window before it
        (a tail of a few milliseconds with one completion would read as hundreds per second
        and pull the average up, yet what happened in it counts): its values are the rates
        over both, added as values of their own. The window before keeps its values, since
        a value once added is never rewritten: an exported summary's ``_sum`` and ``_count``
        must never go down. Returns whether values were added.
        """
        if now is not None and (isinstance(now, bool) or not isinstance(now, (int, float)) or not math.isfinite(now)):
            raise MonitorConfigurationError(f"sample(now=...) takes a finite time.monotonic() or None, got {now!r}")
        live = self._read_attempts() if self._running_total and self._attempts is not None else None
        with self._lock:
            if live:
                self._count_running_cpu(live)
            now = self._clock() if now is None else now
            busy = self._busy_acc
            if self._runs:
                busy += max(0.0, now - self._busy_since)
            if busy <= 0.0:
                return False
            short = busy < self._min_window
            if short and not final:
                return False  # carried into the next window
            merge = short and self._last_window is not None
            process_cpu = self._process.cpu_seconds()
            if not self._runs:  # counted up to when the last run ended: what came after is no run's
                process_cpu = max(self._process_cpu_mark, min(process_cpu, self._idle_cpu_mark))
            rss = self._process.rss_bytes()
            window = _Window(busy, self._window_completed, self._window_started, self._window_dequeued,
                             self._window_isolated_cpu, max(0.0, process_cpu - self._process_cpu_mark))
            self._isolated_cpu_counted += window.isolated_cpu
            if merge:
                assert self._last_window is not None
                window = self._last_window + window
            isolated_pct = window.isolated_cpu / window.busy * 100.0
            process_pct = window.process_cpu / window.busy * 100.0
            self._a_sps.add(window.completed / window.busy)
            self._a_aps.add(window.started / window.busy)
            self._a_queue_rate.add(window.dequeued / window.busy)
            self._a_isolated_cpu.add(isolated_pct)
            self._a_process_cpu.add(process_pct)
            self._a_used_cpu.add(isolated_pct + process_pct)
            self._a_process_mem.add(rss / _MIB)
            self._last_window = window
            self._process_cpu_mark = process_cpu
            self._busy_acc = 0.0
            self._busy_since = now
            self._window_completed = 0
            self._window_started = 0
            self._window_dequeued = 0
            self._window_isolated_cpu = 0.0
            return True

    def _read_attempts(self) -> list[tuple[str, str, int, float]]:
        assert self._attempts is not None
        try:
            return list(self._attempts())
        except Exception:  # monitoring never breaks a run: the attempts' ends still count
            _log.debug("reading the CPU of running isolated attempts failed", exc_info=True)
            return []

    def _count_running_cpu(self, live: list[tuple[str, str, int, float]]) -> None:
        """Count into this window what each running attempt of an observed run used since
        it was last counted (from its start the first time)."""
        runs = self._runs
        for run_id, state, attempt, cpu in live:
            run = runs.get(run_id)
            if run is None:
                continue
            running = run.running.get(state)
            if running is None or running[0] != attempt:
                continue  # not started as far as the events said, or over already
            counted = run.cpu_counted.get(state)
            before = counted[1] if counted is not None and counted[0] == attempt else 0.0
            if cpu > before:
                self._window_isolated_cpu += cpu - before
                run.cpu_counted[state] = (attempt, cpu)

    # --- reading -----------------------------------------------------------------------

    def metrics(
        self, types: MetricType = MetricType.ALL, *, reset: bool = False,
    ) -> dict[str, dict[str, dict[str, float]]]:
        """The metrics dict for the selected categories (a fresh copy).

        With ``reset`` the aggregations start over afterwards (per-window figures, for
        ``agent_monitor(aggregate=False)``); runs in progress stay tracked.
        """
        types = parse_metric_types(types)
        if not isinstance(reset, bool):
            raise MonitorConfigurationError(f"metrics(reset=...) must be True or False, got {reset!r}")
        with self._lock:
            out: dict[str, dict[str, dict[str, float]]] = {}
            for spec in specs_for(types):
                out.setdefault(spec.category, {})[spec.name] = self._aggs[(spec.category, spec.name)].to_dict()
            if reset:
                self._new_aggregations()
            return out

    def live(self) -> LiveSnapshot:
        """Runs in progress, recently finished runs, and the latest rates."""
        with self._lock:
            now = self._clock()
            return LiveSnapshot(
                time=now,
                active=tuple(run.view(now) for run in self._runs.values()),
                recent=tuple(run.view(now) for run in self._recent),
                states_completed=self._totals["completed"],
                attempts_failed=self._totals["failed"],
                states_per_second=self._a_sps.current,
                used_cpu_percent=self._a_used_cpu.current,
                process_memory_mb=self._a_process_mem.current,
            )

    @property
    def isolated_cpu_seconds(self) -> float:
        """CPU seconds of isolated attempts counted into closed update windows so far: what
        their ``isolated_CPU`` figures add up to, weighted by each window's length."""
        with self._lock:
            return self._isolated_cpu_counted

    @property
    def active_runs(self) -> int:
        return len(self._runs)


def spec_of(category: str, name: str) -> MetricSpec:
    """The catalogue entry of ``metrics[category][name]``."""
    for spec in CATALOGUE:
        if spec.category == category and spec.name == name:
            return spec
    raise KeyError(f"no metric {category}.{name}")
