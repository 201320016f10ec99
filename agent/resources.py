"""What a state asks for, and the pool that decides whether it can have it now.

The pool is a capacity limiter over several resource types at once: ``try_acquire``
takes everything a request needs or nothing, never over-commits, and ``release``
gives it back. A request larger than the pool's totals is rejected up front
(``check_request``) instead of waiting forever.
"""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field
from typing import Any

from .errors import GPUUnavailableError, ResourceRequestError


class ResourceType(enum.Flag):
    """Which resources a request is accounted for in the pool."""

    NONE = 0
    CPU = enum.auto()
    MEMORY = enum.auto()
    IO = enum.auto()
    NETWORK = enum.auto()
    GPU = enum.auto()
    ALL = CPU | MEMORY | IO | NETWORK | GPU


class Priority(enum.IntEnum):
    """Scheduling priority: higher runs first; with preemption it may evict lower."""

    LOW = 0
    NORMAL = 1
    HIGH = 2
    CRITICAL = 3


@dataclass
class ResourceRequirements:
    """What one state needs. Enforced by the kernel for isolated states.

    ``cpu_units`` cores (CFS quota), ``memory_mb`` MiB (hard limit, no swap),
    ``io_weight`` relative IO priority, ``network_weight`` pool accounting only,
    ``gpu_units`` whole GPUs (>= 1) or a share of one (< 1). The ``io_*_bps`` /
    ``io_*_iops`` throttles and ``pids_max`` are optional kernel limits.
    """

    cpu_units: float = 1.0
    memory_mb: float = 100.0
    io_weight: float = 1.0
    network_weight: float = 1.0
    gpu_units: float = 0.0
    priority: Priority = Priority.NORMAL
    timeout: float | None = None
    resource_types: ResourceType = ResourceType.ALL
    io_read_bps: int | None = None
    io_write_bps: int | None = None
    io_read_iops: int | None = None
    io_write_iops: int | None = None
    pids_max: int | None = None

    def __post_init__(self) -> None:
        for name in ("cpu_units", "memory_mb", "io_weight", "network_weight", "gpu_units"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 or math.isnan(value):
                raise ResourceRequestError(
                    f"ResourceRequirements.{name} must be a number >= 0, got {value!r}"
                )
        if self.gpu_units > 1 and self.gpu_units != int(self.gpu_units):
            raise ResourceRequestError(
                f"gpu_units={self.gpu_units}: ask for whole GPUs (1, 2, ...) or a share of one (< 1)"
            )
        if self.timeout is not None and (not isinstance(self.timeout, (int, float)) or self.timeout <= 0):
            raise ResourceRequestError(f"ResourceRequirements.timeout must be > 0 seconds, got {self.timeout!r}")
        if not isinstance(self.priority, Priority):
            try:
                self.priority = Priority(self.priority)
            except ValueError:
                raise ResourceRequestError(f"unknown priority {self.priority!r}") from None
        for name in ("io_read_bps", "io_write_bps", "io_read_iops", "io_write_iops", "pids_max"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ResourceRequestError(f"ResourceRequirements.{name} must be a positive int, got {value!r}")

    def amounts(self) -> dict[ResourceType, float]:
        """The accounted amount per resource type (only the types in ``resource_types``)."""
        out = {}
        types = self.resource_types
        if ResourceType.CPU in types and self.cpu_units:
            out[ResourceType.CPU] = float(self.cpu_units)
        if ResourceType.MEMORY in types and self.memory_mb:
            out[ResourceType.MEMORY] = float(self.memory_mb)
        if ResourceType.IO in types and self.io_weight:
            out[ResourceType.IO] = float(self.io_weight)
        if ResourceType.NETWORK in types and self.network_weight:
            out[ResourceType.NETWORK] = float(self.network_weight)
        if ResourceType.GPU in types and self.gpu_units:
            out[ResourceType.GPU] = float(self.gpu_units)
        return out


_EPS = 1e-9


def _machine_cpus() -> float:
    import psutil

    return float(psutil.cpu_count() or 1)


def _machine_memory_mb() -> float:
    import psutil

    return float(psutil.virtual_memory().total // (1024 * 1024))


def _machine_gpus() -> float:
    try:
        from .supervisor.gpus import default_inventory
    except ImportError:
        return 0.0
    return float(len(default_inventory().devices()))


@dataclass(frozen=True)
class ResourceUsage:
    """Allocation statistics for one resource type."""

    total: float
    current_usage: float
    peak_usage: float
    average_usage: float
    measured_usage: float | None = None

    @property
    def available(self) -> float:
        return self.total - self.current_usage


@dataclass(frozen=True)
class PoolStatistics:
    totals: dict[ResourceType, float]
    allocated: dict[ResourceType, float]
    holders: int
    waiting: int


@dataclass
class _Stat:
    current: float = 0.0
    peak: float = 0.0
    area: float = 0.0  # integral of current over time, for the average
    since: float = field(default_factory=time.monotonic)
    last: float = field(default_factory=time.monotonic)

    def move(self, delta: float, now: float) -> None:
        self.area += self.current * (now - self.last)
        self.last = now
        self.current += delta
        if self.current < _EPS:
            self.current = 0.0
        if self.current > self.peak:
            self.peak = self.current

    def average(self, now: float) -> float:
        span = now - self.since
        if span <= 0:
            return self.current
        return (self.area + self.current * (now - self.last)) / span


class ResourcePool:
    """Totals of CPU, memory, IO, network and GPU that states draw from."""

    def __init__(
        self,
        total_cpu: float | None = None,
        total_memory: float | None = None,
        total_io: float = 100.0,
        total_network: float = 100.0,
        total_gpu: float | None = None,
        enable_preemption: bool = False,
        enable_quotas: bool = False,
    ) -> None:
        totals = {
            ResourceType.CPU: _machine_cpus() if total_cpu is None else float(total_cpu),
            ResourceType.MEMORY: _machine_memory_mb() if total_memory is None else float(total_memory),
            ResourceType.IO: float(total_io),
            ResourceType.NETWORK: float(total_network),
            ResourceType.GPU: _machine_gpus() if total_gpu is None else float(total_gpu),
        }
        for rtype, value in totals.items():
            if value < 0 or math.isnan(value):
                raise ResourceRequestError(f"pool total for {rtype.name} must be >= 0, got {value}")
        self.totals = totals
        self.enable_preemption = enable_preemption
        self.enable_quotas = enable_quotas
        self._available = dict(totals)
        self._stats = {rtype: _Stat() for rtype in totals}
        self._allocations: dict[str, dict[ResourceType, float]] = {}
        self._waiting: dict[str, str] = {}

    # --- admission ------------------------------------------------------------------

    def check_request(self, requirements: ResourceRequirements, state: str = "?") -> None:
        """Raise when ``requirements`` could never be met by this pool."""
        for rtype, amount in requirements.amounts().items():
            total = self.totals[rtype]
            if amount > total + _EPS:
                if rtype is ResourceType.GPU and total == 0:
                    raise GPUUnavailableError(
                        f"state {state!r} asks for {amount:g} GPU(s) but this machine has none "
                        "(no NVIDIA driver or no device found): drop gpu_units, or run on a GPU host"
                    )
                raise ResourceRequestError(
                    f"state {state!r} asks for {amount:g} {_UNITS[rtype]} but the pool has "
                    f"{total:g} in total: lower the request or enlarge the ResourcePool"
                )

    def try_acquire(self, owner: str, requirements: ResourceRequirements) -> bool:
        """Take everything ``requirements`` needs for ``owner``, or nothing; returns success."""
        if owner in self._allocations:
            raise ResourceRequestError(f"{owner!r} already holds resources: release them first")
        amounts = requirements.amounts()
        available = self._available
        for rtype, amount in amounts.items():
            if amount > available[rtype] + _EPS:
                return False
        now = time.monotonic()
        for rtype, amount in amounts.items():
            available[rtype] -= amount
            self._stats[rtype].move(amount, now)
        self._allocations[owner] = amounts
        self._waiting.pop(owner, None)
        return True

    def release(self, owner: str) -> None:
        """Give back what ``owner`` holds (no-op when it holds nothing)."""
        self._waiting.pop(owner, None)
        amounts = self._allocations.pop(owner, None)
        if not amounts:
            return
        now = time.monotonic()
        for rtype, amount in amounts.items():
            self._available[rtype] = min(self.totals[rtype], self._available[rtype] + amount)
            self._stats[rtype].move(-amount, now)

    def blocking_resource(self, requirements: ResourceRequirements) -> ResourceType | None:
        """The first resource type that is short for ``requirements`` right now."""
        for rtype, amount in requirements.amounts().items():
            if amount > self._available[rtype] + _EPS:
                return rtype
        return None

    def mark_waiting(self, owner: str, reason: str) -> None:
        self._waiting[owner] = reason

    def unmark_waiting(self, owner: str) -> None:
        self._waiting.pop(owner, None)

    # --- statistics -----------------------------------------------------------------

    def get_usage_stats(self) -> dict[ResourceType, ResourceUsage]:
        now = time.monotonic()
        return {
            rtype: ResourceUsage(
                total=self.totals[rtype],
                current_usage=stat.current,
                peak_usage=stat.peak,
                average_usage=stat.average(now),
            )
            for rtype, stat in self._stats.items()
        }

    def get_state_allocations(self) -> dict[str, dict[ResourceType, float]]:
        return {owner: dict(amounts) for owner, amounts in self._allocations.items()}

    def get_waiting_states(self) -> dict[str, str]:
        """Owners waiting for resources, with what they wait for."""
        return dict(self._waiting)

    def statistics(self) -> PoolStatistics:
        return PoolStatistics(
            totals=dict(self.totals),
            allocated={r: self.totals[r] - self._available[r] for r in self.totals},
            holders=len(self._allocations),
            waiting=len(self._waiting),
        )

    def available(self, rtype: ResourceType) -> float:
        return self._available[rtype]

    def __repr__(self) -> str:
        parts = ", ".join(f"{r.name}={self._available[r]:g}/{t:g}" for r, t in self.totals.items())
        return f"ResourcePool({parts})"


_UNITS: dict[ResourceType, str] = {
    ResourceType.CPU: "CPU core(s)",
    ResourceType.MEMORY: "MiB of memory",
    ResourceType.IO: "IO units",
    ResourceType.NETWORK: "network units",
    ResourceType.GPU: "GPU(s)",
}


def describe(rtype: ResourceType) -> str:
    """A human name for a resource type's unit."""
    return _UNITS.get(rtype, rtype.name or "resource")


def machine_totals() -> dict[str, Any]:
    """This machine's CPU cores, memory (MiB) and GPUs, as the default pool sees them."""
    return {"cpu": _machine_cpus(), "memory_mb": _machine_memory_mb(), "gpu": _machine_gpus()}
