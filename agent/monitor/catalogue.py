"""Which metrics exist: the :class:`MetricType` flags and the table of every figure.

The metrics dict handed to callbacks is ``{category: {name: stats}}``; a category is
present only when its flag is selected, and every name of a present category is always
there (zero until something happens), so callbacks can index it without checks.
``stats`` holds ``count, sum, min, max, avg, median, p95, p99, current``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ..errors import FAILURE_KINDS


class MetricType(enum.Flag):
    """Which categories of metrics to collect; combine with ``|``."""

    NONE = 0
    TIMING = enum.auto()
    RESOURCES = enum.auto()
    THROUGHPUT = enum.auto()
    LATENCY = enum.auto()
    ERRORS = enum.auto()
    STATE = enum.auto()
    DEPENDENCY = enum.auto()
    RETRIES = enum.auto()
    QUEUE = enum.auto()
    CONCURRENCY = enum.auto()
    ALL = TIMING | RESOURCES | THROUGHPUT | LATENCY | ERRORS | STATE | DEPENDENCY | RETRIES | QUEUE | CONCURRENCY

    @property
    def category(self) -> str:
        """The key of this (single) flag's section in the metrics dict."""
        value = self.value
        if self.name is None or value == 0 or value & (value - 1):
            raise ValueError(f"{self!r} is not a single metric category")
        return self.name.lower()


@dataclass(frozen=True)
class MetricSpec:
    """One figure: where it lives in the metrics dict, its unit, and what it measures."""

    type: MetricType
    name: str
    unit: str  # ms, percent, mib, bytes, seconds, per_second, count, ratio, states, runs, cores
    help: str
    tally: bool = False  # one occurrence adds 1: ``sum`` is the number of occurrences
    binary: bool = False  # every value is 0 or 1: aggregated exactly by two counters

    @property
    def category(self) -> str:
        return self.type.category


T = MetricType
CATALOGUE: tuple[MetricSpec, ...] = (
    # timing
    MetricSpec(T.TIMING, "total_execution", "ms", "execution time of each completed state (its successful attempt)"),
    MetricSpec(T.TIMING, "run_duration", "ms", "wall time of each finished run"),
    MetricSpec(T.TIMING, "dependency_resolution", "ms", "time each state waited for its dependencies"),
    # latency
    MetricSpec(T.LATENCY, "queue_wait", "ms", "time an attempt waited for resources (queued) before it started"),
    MetricSpec(T.LATENCY, "coordination_wait", "ms",
               "time an attempt of a coordinated state waited for its primitives and rate limits before it started"),
    MetricSpec(T.LATENCY, "turnaround", "ms",
               "time from a state's first start (or queueing) to its completion, retries and their delays included"),
    # throughput
    MetricSpec(T.THROUGHPUT, "states_per_second", "per_second",
               "completed states per second of active run time, one value per update window"),
    MetricSpec(T.THROUGHPUT, "attempts_per_second", "per_second",
               "started attempts per second of active run time, one value per update window"),
    MetricSpec(T.THROUGHPUT, "queue_processing_rate", "per_second",
               "attempts taken off the resource queue (started after waiting for resources) per second of "
               "active run time, one value per update window"),
    # resources
    MetricSpec(T.RESOURCES, "used_CPU", "percent",
               "CPU use in percent of one core (isolated_CPU + process_CPU), one value per update window"),
    MetricSpec(T.RESOURCES, "isolated_CPU", "percent",
               "CPU of isolated states measured by the kernel (cgroup) while they run, percent of one core, "
               "per update window"),
    MetricSpec(T.RESOURCES, "process_CPU", "percent",
               "CPU of this Python process (scheduler and inline states; psutil), percent of one core, "
               "per update window"),
    MetricSpec(T.RESOURCES, "process_memory_mb", "mib", "resident memory of this Python process (psutil), per update window"),
    MetricSpec(T.RESOURCES, "state_cpu_seconds", "seconds", "CPU time of each isolated attempt (cgroup)"),
    MetricSpec(T.RESOURCES, "state_throttled_seconds", "seconds",
               "time each isolated attempt was held back by its CPU quota (cgroup)"),
    MetricSpec(T.RESOURCES, "state_peak_memory_mb", "mib", "peak memory of each isolated attempt (cgroup)"),
    MetricSpec(T.RESOURCES, "state_io_read_mb", "mib", "bytes read by each isolated attempt (cgroup), in MiB"),
    MetricSpec(T.RESOURCES, "state_io_write_mb", "mib", "bytes written by each isolated attempt (cgroup), in MiB"),
    MetricSpec(T.RESOURCES, "allocated_CPU", "cores", "CPU cores held from the resource pool by running states, at each change"),
    MetricSpec(T.RESOURCES, "allocated_memory_mb", "mib", "memory held from the resource pool by running states, at each change"),
    MetricSpec(T.RESOURCES, "allocated_GPU", "gpus", "GPUs held from the resource pool by running states, at each change"),
    # errors
    MetricSpec(T.ERRORS, "count", "count", "failed attempts (exception, crash, kill, timeout, limit)", tally=True),
    MetricSpec(T.ERRORS, "failed_states", "count", "states that failed for good (retries exhausted)", tally=True),
    MetricSpec(T.ERRORS, "error_rate", "ratio", "1 for each failed attempt, 0 for each completed one: avg is the failure rate",
               binary=True),
    # one per failure kind: the pattern of what fails (the counts add up to errors.count)
    *(MetricSpec(T.ERRORS, kind, "count", f"failed attempts of kind {kind!r}: {meaning}", tally=True)
      for kind, meaning in FAILURE_KINDS.items()),
    # retries
    MetricSpec(T.RETRIES, "count", "count", "retries scheduled", tally=True),
    MetricSpec(T.RETRIES, "delay", "ms", "backoff delay before each retry"),
    MetricSpec(T.RETRIES, "attempts_per_state", "count", "attempts each state took, counted when it completed or failed for good"),
    # state
    MetricSpec(T.STATE, "started", "count", "state attempts started", tally=True),
    MetricSpec(T.STATE, "completed", "count", "states completed", tally=True),
    MetricSpec(T.STATE, "cancelled", "count", "states cancelled", tally=True),
    MetricSpec(T.STATE, "preempted", "count", "states preempted (requeued, not a failure)", tally=True),
    MetricSpec(T.STATE, "success_rate", "ratio", "1 for each state that completed, 0 for each that failed for good",
               binary=True),
    # dependency
    MetricSpec(T.DEPENDENCY, "resolution_time", "ms", "time each state waited for its dependencies"),
    MetricSpec(T.DEPENDENCY, "resolved", "count", "dependency waits that ended with the state free to run", tally=True),
    MetricSpec(T.DEPENDENCY, "blocked", "count", "states blocked because a required dependency failed", tally=True),
    MetricSpec(T.DEPENDENCY, "chain_length", "states",
               "longest chain of dependencies behind each state whose dependencies resolved "
               "(1: the states it depends on depend on nothing)"),
    # queue
    MetricSpec(T.QUEUE, "enqueued", "count", "attempts that had to wait for resources", tally=True),
    MetricSpec(T.QUEUE, "depth", "states", "attempts waiting for resources, at each change"),
    # concurrency
    MetricSpec(T.CONCURRENCY, "running_states", "states", "attempts running at once, at each start"),
    MetricSpec(T.CONCURRENCY, "active_runs", "runs", "runs in progress at once, at each run start"),
)
del T

CATEGORY_TYPES: tuple[MetricType, ...] = tuple(
    dict.fromkeys(spec.type for spec in CATALOGUE)
)


def specs_for(types: MetricType) -> tuple[MetricSpec, ...]:
    """The catalogue entries of the selected categories."""
    return tuple(spec for spec in CATALOGUE if spec.type & types)


def parse_metric_types(value: "MetricType | int") -> MetricType:
    """Validate a ``metrics=`` argument."""
    from ..errors import MonitorConfigurationError

    if isinstance(value, MetricType):
        return value
    raise MonitorConfigurationError(
        f"metrics must be MetricType flags such as MetricType.TIMING | MetricType.ERRORS, got {value!r}"
    )
