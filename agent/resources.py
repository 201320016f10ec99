"""What a state asks for, and the pool that decides whether it can have it now.

The pool is a capacity limiter over several resource types at once: ``try_acquire``
takes everything a request needs or nothing, never over-commits, and ``release``
gives it back. Requests that must wait queue by priority, first come first served
within one (``enqueue`` / ``grant_next``, or ``await acquire``). A request larger than
the pool's totals, or than its quota, is rejected up front instead of waiting forever.
Quotas live in :mod:`agent.quotas`, the choice of preemption victims in
:mod:`agent.preemption`.

A pool may be shared by runs on several threads, each with its own event loop: its
steps are taken under :attr:`ResourcePool.lock`, and an ``acquire`` that waits on
another thread's loop is woken on that loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import math
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import _env, _validate
from ._ledger import ASK_POOL, EPS as _EPS, Holding, Ledger, amounts_of as _amounts_of
from ._loops import fail_soon, grant_soon, locked
from ._types import Priority, ResourceType
from .devices import MIN_GPU_SHARE, GPUAllocator, GPUDevice, GPUInventory, machine_inventory
from .errors import GPUUnavailableError, QuotaExceededError, ResourceError, ResourceRequestError
from .preemption import Holder, PreemptionPolicy, eviction_order
from .quotas import Quota, QuotaBook, QuotaBreach, QuotaMode

_ALL_TYPES = ResourceType.ALL
MIN_MEMORY_MB = 0.25
"""The smallest memory limit a state's cgroup takes (64 pages): below it no process starts."""
# Members as module names: reading one from its class goes through the enum metaclass in 3.11.
_CPU, _MEMORY, _IO, _NETWORK, _GPU = (ResourceType.CPU, ResourceType.MEMORY, ResourceType.IO,
                                      ResourceType.NETWORK, ResourceType.GPU)
_MOST = sys.float_info.max  # an int above it (10**400) is no float: _validate refuses it
_NUMBER_TYPES = frozenset((int, float))  # exactly these; bool and the rest go through _validate


# The defaults of ResourceRequirements.__init__, by identity: an argument left out is the
# default object itself, so one ``is`` tells that it was.
_ONE, _DEFAULT_MEMORY, _NO_GPU, _NORMAL = 1.0, 100.0, 0.0, Priority.NORMAL


@dataclass(init=False)
class ResourceRequirements:
    """What one state needs. Enforced by the kernel for isolated states.

    ``cpu_units`` cores (CFS quota), ``memory_mb`` MiB (hard limit, no swap),
    ``io_weight`` relative IO priority, ``network_weight`` pool accounting only,
    ``gpu_units`` whole GPUs (>= 1) or a share of one (< 1). The ``io_*_bps`` /
    ``io_*_iops`` throttles and ``pids_max`` are optional kernel limits.

    A field left at its default is read from the class (the dataclass keeps each
    default there), so a request that gives only ``cpu_units`` and ``memory_mb`` (most
    do, one per state) stores those two; any other is stored and checked in full
    (:meth:`__post_init__`, which a dataclass subclass's own ``__init__`` calls too).
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

    def __init__(
        self,
        cpu_units: float = _ONE,
        memory_mb: float = _DEFAULT_MEMORY,
        io_weight: float = _ONE,
        network_weight: float = _ONE,
        gpu_units: float = _NO_GPU,
        priority: Priority = _NORMAL,
        timeout: float | None = None,
        resource_types: ResourceType = _ALL_TYPES,
        io_read_bps: int | None = None,
        io_write_bps: int | None = None,
        io_read_iops: int | None = None,
        io_write_iops: int | None = None,
        pids_max: int | None = None,
    ) -> None:
        self.cpu_units = cpu_units
        self.memory_mb = memory_mb
        numbers = _NUMBER_TYPES
        if (type(cpu_units) in numbers and type(memory_mb) in numbers and 0.0 <= cpu_units <= _MOST
                and 0.0 <= memory_mb <= _MOST and io_weight is _ONE and network_weight is _ONE
                and gpu_units is _NO_GPU and priority is _NORMAL and timeout is None
                and resource_types is _ALL_TYPES and io_read_bps is None and io_write_bps is None
                and io_read_iops is None and io_write_iops is None and pids_max is None):
            return  # requests are made per state, often per run: the rest is the class's defaults
        self.io_weight = io_weight
        self.network_weight = network_weight
        self.gpu_units = gpu_units
        self.priority = priority
        self.timeout = timeout
        self.resource_types = resource_types
        self.io_read_bps = io_read_bps
        self.io_write_bps = io_write_bps
        self.io_read_iops = io_read_iops
        self.io_write_iops = io_write_iops
        self.pids_max = pids_max
        self.__post_init__()

    def __post_init__(self) -> None:
        """Check every field, raising :class:`~agent.errors.ResourceRequestError` for a wrong one."""
        error = ResourceRequestError
        cpu, memory, io = self.cpu_units, self.memory_mb, self.io_weight
        network, gpu = self.network_weight, self.gpu_units
        numbers = _NUMBER_TYPES
        if not (type(cpu) in numbers and type(memory) in numbers and type(io) in numbers
                and type(network) in numbers and type(gpu) in numbers
                and 0.0 <= cpu <= _MOST and 0.0 <= memory <= _MOST and 0.0 <= io <= _MOST
                and 0.0 <= network <= _MOST and 0.0 <= gpu <= _MOST):
            for name in ("cpu_units", "memory_mb", "io_weight", "network_weight", "gpu_units"):
                _validate.number(getattr(self, name), f"ResourceRequirements.{name}", error=error)
        if gpu > 1 and gpu != int(gpu):
            raise ResourceRequestError(
                f"gpu_units={gpu}: ask for whole GPUs (1, 2, ...) or a share of one (< 1)"
            )
        if 0 < gpu < MIN_GPU_SHARE:
            raise ResourceRequestError(
                f"gpu_units={gpu:g}: a share of a GPU is at least {MIN_GPU_SHARE:g}; ask for 0 (no GPU) or more")
        if self.timeout is not None:
            _validate.number(self.timeout, "ResourceRequirements.timeout", error=error, above=True, none=True,
                             unit="seconds")
        if type(self.priority) is not Priority:
            self.priority = _validate.member(Priority, self.priority, "ResourceRequirements.priority", error=error)
        if self.resource_types is not _ALL_TYPES:
            self.resource_types = _validate.member(
                ResourceType, self.resource_types, "ResourceRequirements.resource_types", error=error
            )
        if (self.io_read_bps is not None or self.io_write_bps is not None or self.io_read_iops is not None
                or self.io_write_iops is not None or self.pids_max is not None):
            for name, (most, why) in _KERNEL_MOST.items():
                _validate.integer(getattr(self, name), f"ResourceRequirements.{name}", error=error, minimum=1,
                                  none=True, maximum=most, why_maximum=why)

    def amounts(self) -> dict[ResourceType, float]:
        """The accounted amount per resource type (only the types in ``resource_types``)."""
        return _amounts_of(self)


# The most each optional kernel limit can be: a larger value is refused by the kernel
# (pids.max), or cut to fit without a word (an iops throttle is 32 bits wide).
_KERNEL_MOST: dict[str, tuple[int, str]] = {
    **{name: ((1 << 63) - 1, " bytes per second") for name in ("io_read_bps", "io_write_bps")},
    **{name: ((1 << 32) - 2, ", the kernel's largest IO operations per second throttle")
       for name in ("io_read_iops", "io_write_iops")},
    "pids_max": (4_194_304, ", the kernel's most processes (PID_MAX_LIMIT); leave it None for no limit"),
}

_PRIORITY_BY_VALUE: tuple[Priority, ...] = tuple(sorted(Priority))
# Scheduling order of the wait queues: most important first.
_LEVELS: tuple[Priority, ...] = tuple(sorted(Priority, reverse=True))

_UNITS: dict[ResourceType, str] = {
    ResourceType.CPU: "CPU core(s)",
    ResourceType.MEMORY: "MiB of memory",
    ResourceType.IO: "IO units",
    ResourceType.NETWORK: "network units",
    ResourceType.GPU: "GPU(s)",
}
# The keyword each type has in set_quota / set_priority_quota.
_QUOTA_KEYWORD: dict[ResourceType, str] = {
    ResourceType.CPU: "cpu",
    ResourceType.MEMORY: "memory",
    ResourceType.IO: "io",
    ResourceType.NETWORK: "network",
    ResourceType.GPU: "gpu",
}


def describe(rtype: ResourceType) -> str:
    """A human name for a resource type's unit."""
    return _UNITS.get(rtype, rtype.name or "resource")


@functools.cache
def machine_cpus() -> float:
    """Logical CPUs of this machine (read once per process)."""
    return float(os.cpu_count() or 1)


@functools.cache
def machine_memory_mb() -> float:
    """Physical memory of this machine in MiB (read once per process)."""
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024))


@dataclass(frozen=True)
class ResourceUsage:
    """Allocation statistics for one resource type.

    ``current_usage``, ``peak_usage`` and ``average_usage`` (time-weighted since the
    pool was made) count what is *allocated*. ``measured_usage`` is what executors
    reported with :meth:`ResourcePool.record_measured`: CPU-seconds consumed so far for
    CPU, the sum of the current holders' peak memory (MiB) for MEMORY, ``None`` for types
    nothing measures. The isolated executors report an attempt's figures as it ends, just
    before its release: its CPU then counts, its memory no longer (the monitor's
    ``used_CPU`` reads running attempts as they run).
    """

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
    """A snapshot of the pool, for monitoring and tests."""

    totals: dict[ResourceType, float]
    allocated: dict[ResourceType, float]
    holders: int
    waiting: int
    waiting_by_priority: dict[Priority, int] = field(default_factory=dict)
    granted: int = 0  # grants since the pool was made (try_acquire and the queue)
    rejected: int = 0  # requests refused for good (too large, quota in fail mode)
    preempted: int = 0  # victims chosen by find_victims
    evicting: int = 0  # victims chosen that still hold their resources


Notify = Callable[[str], None]
"""Called with the owner when its queued request is granted (the engine's wake-up)."""


class _Waiter:
    """One queued request."""

    __slots__ = ("owner", "amounts", "priority", "state", "rank", "future", "notify", "dead", "parked", "counted")

    def __init__(
        self,
        owner: str,
        amounts: dict[ResourceType, float],
        priority: Priority,
        state: str,
        rank: tuple[int, int],
        future: asyncio.Future[None] | None,
        notify: Notify | None = None,
    ) -> None:
        self.owner = owner
        self.amounts = amounts
        self.priority = priority
        self.state = state
        self.rank = rank  # (0 for requeued victims else 1, arrival number): the heap order
        self.future = future  # set for acquire() callers, who are woken through it
        self.notify = notify  # set for the engine's requests: called at the grant
        self.dead = False
        self.parked = False
        self.counted = False  # in its level's needs (see ResourcePool._count_in)


class ResourcePool:
    """Totals of CPU, memory, IO, network and GPU that states draw from.

    Two ways in. ``try_acquire`` takes a request now or not at all. The wait queue
    (``enqueue`` / ``grant_next`` / ``cancel``, or ``await acquire`` and ``async with
    allocate``) grants in priority order, first come first served within a priority:

    * a priority level is served strictly in order: when its oldest request does not
      fit, later ones of that level wait behind it (a small request cannot overtake a
      large one forever);
    * a lower level may still be served past a blocked higher one ("backfill"), but
      only out of what is left after setting aside everything the blocked requests
      above it need, so backfill never delays them (a pool of GPU devices sets them all
      aside while a blocked request above needs GPUs: which device it gets depends on
      which frees first; a request that asks for none of a resource is never held up by
      what is set aside of it);
    * a level blocked by its priority quota stops too; a request blocked by its own
      state's quota steps aside (it cannot hold up other states) and keeps its place
      for when its state's use drops.

    ``try_acquire`` obeys the same rules, as if the request joined the tail of its
    level. Every change (enqueue, release, cancel, quota change) settles the queue at
    once; grants go to the waiting ``acquire`` call, to the ``notify`` callback the
    engine queued with (:mod:`agent.engine.admission`: every run sharing this pool
    waits in this one queue), or into the list that the next ``grant_next()`` returns.
    Higher levels can starve lower ones while they keep the pool full: that is what
    priority means here; preemption goes the other way.

    GPUs are devices, not just a count: ``total_gpu`` defaults to the machine's
    inventory (``AGENT_GPUS`` or NVML, see :mod:`agent.devices`), and each grant of
    ``gpu_units`` is assigned concrete GPUs (whole ones for ``>= 1``, a packed share
    of one for less; ``devices(owner)``). A pool given more GPUs than the inventory
    holds (``total_gpu=2`` on a machine without any, for planning or tests) counts GPU
    units without assigning devices; its states are then neither pinned nor hidden: they
    see the GPUs the program sees (``CUDA_VISIBLE_DEVICES`` as the program has it).
    """

    def __init__(
        self,
        total_cpu: float | None = None,
        total_memory: float | None = None,
        total_io: float = 100.0,
        total_network: float = 100.0,
        total_gpu: float | None = None,
        enable_preemption: bool = False,
        enable_quotas: bool = False,
        *,
        clock: Callable[[], float] = time.monotonic,
        preemption_policy: PreemptionPolicy | None = None,
        gpu_inventory: GPUInventory | None = None,
    ) -> None:
        def total(value: Any, name: str) -> float:
            return _validate.number(value, f"ResourcePool({name}=...)", error=ResourceRequestError)  # type: ignore[return-value]

        _validate.function(clock, "ResourcePool(clock=...)", error=ResourceRequestError,
                           expected="a function returning seconds, like time.monotonic")
        _validate.methods(gpu_inventory, "ResourcePool(gpu_inventory=...)", ("devices",), error=ResourceRequestError,
                          expected="a GPUInventory (devices() and unavailable_reason), e.g. "
                                   "agent.devices.StaticInventory([...])", none=True)
        _validate.methods(preemption_policy, "ResourcePool(preemption_policy=...)", ("choose",),
                          error=ResourceRequestError, expected="an agent.preemption.PreemptionPolicy", none=True)
        inventory = gpu_inventory if gpu_inventory is not None else machine_inventory()
        devices = inventory.devices()
        totals = {
            ResourceType.CPU: machine_cpus() if total_cpu is None else total(total_cpu, "total_cpu"),
            ResourceType.MEMORY: machine_memory_mb() if total_memory is None else total(total_memory, "total_memory"),
            ResourceType.IO: total(total_io, "total_io"),
            ResourceType.NETWORK: total(total_network, "total_network"),
            ResourceType.GPU: float(len(devices)) if total_gpu is None else total(total_gpu, "total_gpu"),
        }
        _validate.flag(enable_preemption, "ResourcePool(enable_preemption=...)", error=ResourceRequestError)
        _validate.flag(enable_quotas, "ResourcePool(enable_quotas=...)", error=ResourceRequestError)
        self.totals = totals
        gpus = totals[ResourceType.GPU]
        self._gpus = (
            GPUAllocator(inventory, devices[: math.ceil(gpus)]) if 0 < gpus <= len(devices) else None
        )
        self._gpu_reason = inventory.unavailable_reason
        self._no_gpus = ""  # where the GPUs are not, and what to do, for a pool of another machine's
        self._machine_gpus = len(devices)
        self.enable_preemption = enable_preemption
        self._clock = clock
        self._policy = preemption_policy or PreemptionPolicy()
        # The books (:mod:`agent._ledger`), whose dictionaries the pool shares. Usage
        # statistics are kept cheaply on the hot path: what is allocated now is totals -
        # available; the peak is what the lowest availability left; the time-integrated
        # allocation (for the average) gains each holding's amount x duration at its
        # release, the current holdings' at the reading.
        ledger = self._ledger = Ledger(totals, clock, _PRIORITY_BY_VALUE, self._gpus is not None, enable_quotas)
        self._since = clock()
        self._holders: dict[str, Holding] = ledger.holders
        self._lent: dict[str, float] = {}  # owner -> the CPU it lent (lend_cpu), until taken back
        self._loans: dict[str, asyncio.Future[None]] = {}  # lenders waiting to take it back
        # The wait queue: one heap per priority of (rank, waiter); cancelled entries
        # stay until they reach the top. _blocked / _reserve_at cache, per level, the
        # last settling pass: whether the level's head is stuck, and what the requests
        # of higher levels whose head is stuck set aside.
        self._waiters: dict[str, _Waiter] = ledger.waiters
        self._queues: list[list[tuple[tuple[int, int], int, _Waiter]]] = [[] for _ in Priority]
        # What the live requests in each level's heap need, together (and how many they
        # are): what a level whose head is stuck sets aside, kept as they come and go.
        self._needs: list[dict[ResourceType, float]] = [{} for _ in Priority]
        self._counted: list[int] = [0 for _ in Priority]
        self._blocked: list[bool] = [False for _ in Priority]
        self._reserve_at: list[dict[ResourceType, float] | None] = [None for _ in Priority]
        self._arrivals = 0
        self._outbox: list[str] = []
        self._parked: dict[str, list[_Waiter]] = {}
        # Quotas.
        self._state_quotas = QuotaBook()
        self._priority_quotas = QuotaBook()
        # Preemption in progress: victim -> requester, requester -> what it needs.
        self._evicting: dict[str, str] = ledger.evicting
        self._claims: dict[str, dict[ResourceType, float]] = ledger.claims
        # Measured use: owner -> (cpu_seconds, peak memory MiB) of its current holding.
        self._measured: dict[str, tuple[float, float]] = ledger.measured
        self._cpu_seconds_done = 0.0
        self._rejected = 0
        self._preempted = 0
        self.lock = threading.RLock()

    @property
    def _available(self) -> dict[ResourceType, float]:
        """What is free now, per resource type (a copy)."""
        return self._ledger.free.as_dict()

    @property
    def _lowest(self) -> dict[ResourceType, float]:
        """The least that has been free, per resource type (a copy)."""
        return self._ledger.lowest.as_dict()

    @property
    def _area(self) -> dict[ResourceType, float]:
        """Amount x seconds of the holdings that ended, per resource type (a copy)."""
        return self._ledger.area.as_dict()

    @property
    def enable_quotas(self) -> bool:
        """Whether quotas are enforced (``set_quota`` / ``set_priority_quota``)."""
        return self._ledger.quotas

    @enable_quotas.setter
    def enable_quotas(self, value: bool) -> None:
        flag = _validate.flag(value, "ResourcePool.enable_quotas", error=ResourceRequestError)
        with self.lock:
            self._ledger.quotas = flag
            if not flag and self._parked:
                self._requota()  # what a quota held back waits in its level again

    # --- admission ------------------------------------------------------------------

    def check_request(self, requirements: ResourceRequirements, state: str = "?") -> None:
        """Raise when ``requirements`` could never be met by this pool."""
        totals = self.totals
        if (requirements.cpu_units <= totals[_CPU] and requirements.memory_mb <= totals[_MEMORY]
                and requirements.io_weight <= totals[_IO] and requirements.network_weight <= totals[_NETWORK]
                and requirements.gpu_units <= totals[_GPU]):
            return  # every amount fits, whichever types it counts (the common case, checked per add_state)
        for rtype, amount in requirements.amounts().items():
            total = self.totals[rtype]
            if amount > total + _EPS:
                if rtype is ResourceType.GPU and total == 0 and self._machine_gpus:
                    raise GPUUnavailableError(
                        f"state {state!r} asks for {amount:g} GPU(s) but this pool was made with total_gpu=0 "
                        f"(this machine has {self._machine_gpus}): give the pool GPUs, or drop gpu_units"
                    )
                if rtype is ResourceType.GPU and total == 0:
                    why = self._gpu_reason or "no NVIDIA driver or no device found"
                    raise GPUUnavailableError(
                        f"state {state!r} asks for {amount:g} GPU(s) but "
                        f"{self._no_gpus or f'this machine has none ({why}): drop gpu_units, or run on a GPU host'}"
                    )
                if rtype is ResourceType.GPU:
                    raise GPUUnavailableError(
                        f"state {state!r} asks for {amount:g} GPU(s) but the pool has {total:g} in total: "
                        "lower gpu_units, or run on a host with more GPUs"
                    )
                raise ResourceRequestError(
                    f"state {state!r} asks for {amount:g} {_UNITS[rtype]} but the pool has "
                    f"{total:g} in total: lower the request or enlarge the ResourcePool"
                )

    def try_acquire(
        self,
        owner: str,
        requirements: ResourceRequirements,
        *,
        state: str | None = None,
        priority: Priority | int | None = None,
    ) -> bool:
        """Take everything ``requirements`` needs for ``owner``, or nothing; returns success.

        Fails (returns False) when queued requests come first: a blocked request of the
        same or a higher priority, or what blocked higher ones set aside. ``state``
        names the state for per-state quotas (default: ``owner``); ``priority``
        overrides ``requirements.priority``.
        """
        _check_request("try_acquire", owner, requirements, state)
        with self.lock:
            return self._try_acquire(owner, requirements, state, priority)

    def _try_acquire(self, owner: str, requirements: ResourceRequirements, state: str | None,
                     priority: Priority | int | None) -> bool:
        quick = self._ledger.try_take(owner, requirements, owner if state is None else state, priority)
        if quick != ASK_POOL:
            return bool(quick)
        return self._acquire_by_policy(owner, requirements, state, priority)

    def _acquire_by_policy(self, owner: str, requirements: ResourceRequirements, state: str | None,
                           priority: Priority | int | None, readmitted: bool = False) -> bool:
        """``try_acquire`` for what the ledger's common case does not cover (``ASK_POOL``);
        ``readmitted``: see :meth:`_quota_blocks`."""
        if owner in self._holders:
            raise ResourceRequestError(f"{owner!r} already holds resources: release them first")
        if owner in self._waiters:
            raise ResourceRequestError(f"{owner!r} is already queued: cancel() it before try_acquire()")
        if priority is None:
            level = requirements.priority
        elif type(priority) is int and 0 <= priority < len(_PRIORITY_BY_VALUE):
            level = _PRIORITY_BY_VALUE[priority]
        else:
            level = _level(priority, "try_acquire(priority=...)")
        amounts = requirements.amounts()
        if state is None:
            state = owner
        if self.enable_quotas and self._quota_blocks(owner, state, level, amounts, False, readmitted):
            return False
        reserve = None
        if self._waiters:
            if self._blocked[level]:
                return False
            reserve = self._reserve_at[level]
        if not self._ledger.fits(amounts, reserve):
            return False
        if self._gpus is not None and ResourceType.GPU in amounts and not self._gpus.fits(amounts[ResourceType.GPU]):
            return False
        self._take(owner, amounts, level, state)
        return True

    def release(self, owner: str) -> None:
        """Give back what ``owner`` holds, or withdraw its queued request (no-op if neither).

        Queued requests that now fit are granted at once (see ``grant_next``).
        """
        with self.lock:
            self._release(owner)

    def _release(self, owner: str) -> None:
        if self._lent:
            self._lent.pop(owner, None)  # a loan still waiting (_loans) ends with nothing to add
        if not self._ledger.try_release(owner):
            self._release_by_policy(owner)
        if self._loans:
            self._grant_loans()

    def _release_by_policy(self, owner: str) -> None:
        """``release`` for what the ledger's common case does not cover."""
        holding = self._holders.pop(owner, None)
        if holding is None:
            self._claims.pop(owner, None)
            if owner in self._waiters:
                self.cancel(owner)
            return
        self._ledger.give_back(holding)
        if holding.devices:
            self._gpus.release(owner)  # type: ignore[union-attr]
        if self._evicting:
            claimant = self._evicting.pop(owner, None)
            if claimant is not None and claimant not in self._evicting.values():
                self._claims.pop(claimant, None)  # its room is free now: no longer promised
        if self._measured:
            measured = self._measured.pop(owner, None)
            if measured is not None:
                self._cpu_seconds_done += measured[0]
        if self.enable_quotas:
            self._state_quotas.refund(holding.state, holding.amounts)
            self._priority_quotas.refund(holding.priority, holding.amounts)
            parked = self._parked.pop(holding.state, None)
            if parked:
                self._unpark(parked)
        if self._waiters:
            self._settle()

    def _take(self, owner: str, amounts: dict[ResourceType, float], level: Priority, state: str) -> None:
        holding = self._ledger.take(owner, amounts, level, state)
        if self._gpus is not None and ResourceType.GPU in amounts:
            try:
                holding.devices = self._gpus.allocate(owner, amounts[ResourceType.GPU]) or []
            except BaseException:  # nothing is taken then
                del self._holders[owner]
                self._ledger.give_back(holding)
                raise
        if self.enable_quotas:
            self._state_quotas.charge(state, amounts)
            self._priority_quotas.charge(level, amounts)

    # --- the wait queue -------------------------------------------------------------

    def enqueue(
        self,
        owner: str,
        requirements: ResourceRequirements,
        priority: Priority | int | None = None,
        *,
        state: str | None = None,
        front: bool = False,
        notify: Notify | None = None,
    ) -> None:
        """Queue a request; it is granted as soon as the policy allows (maybe right now).

        Raises when it can never be granted: larger than the pool (``check_request``)
        or than its quota; or, for a quota in ``fail`` mode, when it would pass the
        quota now. ``front`` puts it ahead of its level's other requests (a requeued
        preemption victim keeps the work it lost to a minimum). ``notify(owner)`` is
        called at the grant instead of listing the owner for ``grant_next()``.
        """
        self._enqueue(owner, requirements, priority, state, front, None, notify)

    @locked
    def _enqueue(
        self,
        owner: str,
        requirements: ResourceRequirements,
        priority: Priority | int | None,
        state: str | None,
        front: bool,
        future: asyncio.Future[None] | None,
        notify: Notify | None = None,
    ) -> None:
        what = "enqueue" if future is None else "acquire"
        _check_request(what, owner, requirements, state)
        if notify is not None and not callable(notify):
            raise ResourceRequestError(f"{what}(notify=...) must be a function taking the owner, or None, "
                                       f"got {_validate.shown(notify)}")
        if owner in self._holders:
            raise ResourceRequestError(f"{owner!r} already holds resources: release them first")
        if owner in self._waiters:
            raise ResourceRequestError(f"{owner!r} is already queued: cancel() it first")
        level = requirements.priority if priority is None else _level(priority, f"{what}(priority=...)")
        if state is None:
            state = owner
        try:
            self.check_request(requirements, state)
        except ResourceRequestError:
            self._rejected += 1
            raise
        amounts = requirements.amounts()
        if self.enable_quotas:
            self._quota_blocks(owner, state, level, amounts, True, front)
        self._arrivals += 1
        waiter = _Waiter(owner, amounts, level, state, (0 if front else 1, self._arrivals), future, notify)
        self._waiters[owner] = waiter
        heapq.heappush(self._queues[level], (waiter.rank, self._arrivals, waiter))
        self._count_in(waiter)
        self._settle()

    @locked
    def requeue(self, owner: str, notify: Notify | None = None) -> None:
        """Give back what ``owner`` holds and queue the same request at the front of its level.

        For a preempted state: in one step, so that nothing of its level that arrived
        later can slip in between the release and the new request.
        """
        holding = self._holders.get(owner)
        if holding is None:
            raise ResourceRequestError(f"{owner!r} holds nothing to requeue")
        self._arrivals += 1
        amounts = holding.amounts
        lent = self._lent.get(owner)
        if lent:  # its state waits for a human: it asks again for the CPU it lent too
            amounts = {**amounts, ResourceType.CPU: amounts.get(ResourceType.CPU, 0.0) + lent}
        waiter = _Waiter(owner, amounts, holding.priority, holding.state, (0, self._arrivals), None, notify)
        heapq.heappush(self._queues[holding.priority], (waiter.rank, self._arrivals, waiter))
        self._count_in(waiter)
        self._waiters[owner] = waiter
        self.release(owner)  # gives back, then settles the queue with the request in place

    @locked
    def grant_next(self) -> list[str]:
        """Owners granted since the last call, in grant order (``acquire`` callers excluded)."""
        self._settle()
        granted, self._outbox = self._outbox, []
        return granted

    @locked
    def cancel(self, owner: str) -> bool:
        """Withdraw ``owner``'s queued request; returns whether there was one."""
        self._claims.pop(owner, None)
        waiter = self._waiters.pop(owner, None)
        if waiter is None:
            return False
        waiter.dead = True
        self._count_out(waiter)
        if waiter.parked:
            parked = self._parked.get(waiter.state, [])
            if waiter in parked:
                parked.remove(waiter)
            if not parked:
                self._parked.pop(waiter.state, None)
        self._claims.pop(owner, None)
        if waiter.future is not None:
            fail_soon(waiter.future, ResourceError(f"the request of {owner!r} was cancelled"))
        self._settle()
        return True

    @locked
    def queued(self) -> list[str]:
        """Queued owners in the order they would be considered (priority, then arrival)."""
        out: list[str] = []
        for level in _LEVELS:
            out.extend(entry[2].owner for entry in sorted(self._queues[level]) if not entry[2].dead)
        out.extend(w.owner for ws in self._parked.values() for w in ws if w.owner not in out)
        return out

    def _settle(self) -> None:
        """Grant every queued request the policy allows now, and cache what blocks the rest."""
        if self._loans:
            self._grant_loans()  # first: see take_cpu_back
        if not self._waiters:
            for level in _LEVELS:
                self._blocked[level] = False
                self._reserve_at[level] = None
            return
        ledger = self._ledger
        quotas = self.enable_quotas
        reserve: dict[ResourceType, float] | None = None
        for level in _LEVELS:
            self._reserve_at[level] = reserve
            heap = self._queues[level]
            blocked = False
            while heap:
                waiter = heap[0][2]
                if waiter.dead:
                    heapq.heappop(heap)
                    continue
                future = waiter.future
                if future is not None and (future.done() or future.get_loop().is_closed()):  # it went away
                    heapq.heappop(heap)
                    self._drop(waiter)
                    continue
                amounts = waiter.amounts
                if quotas:
                    if self._state_quotas.breach(waiter.state, amounts) is not None:
                        heapq.heappop(heap)
                        waiter.parked = True
                        self._count_out(waiter)
                        self._parked.setdefault(waiter.state, []).append(waiter)
                        continue
                    if self._priority_quotas.breach(level, amounts) is not None:
                        blocked = True
                        break
                fits = ledger.fits(amounts, reserve or None)
                if fits and self._gpus is not None and ResourceType.GPU in amounts:
                    fits = self._gpus.fits(amounts[ResourceType.GPU])
                if fits:
                    heapq.heappop(heap)
                    self._drop(waiter)
                    self._take(waiter.owner, amounts, level, waiter.state)
                    if future is not None:
                        grant_soon(future, functools.partial(self.release, waiter.owner))
                    elif waiter.notify is not None:
                        waiter.notify(waiter.owner)
                    else:
                        self._outbox.append(waiter.owner)
                    continue
                blocked = True
                # What every request of the level needs is set aside, not only the head's:
                # a lower request that fits past the head would still delay the ones after it.
                reserve = dict(reserve) if reserve else {}
                for rtype, amount in self._level_needs(level).items():
                    reserve[rtype] = reserve.get(rtype, 0.0) + amount
                if self._gpus is not None and reserve.get(ResourceType.GPU, 0.0) > _EPS:
                    # GPUs are devices: a share placed now may sit on the very device the
                    # blocked request would get next, whatever the count says.
                    reserve[ResourceType.GPU] = math.inf
                break
            self._blocked[level] = blocked

    def _drop(self, waiter: _Waiter) -> None:
        waiter.dead = True
        self._count_out(waiter)
        if self._waiters.get(waiter.owner) is waiter:
            del self._waiters[waiter.owner]

    def _count_in(self, waiter: _Waiter) -> None:
        """``waiter`` is live in its level's heap: its needs count in the level's."""
        if waiter.counted:
            return
        waiter.counted = True
        needs = self._needs[waiter.priority]
        for rtype, amount in waiter.amounts.items():
            needs[rtype] = needs.get(rtype, 0.0) + amount
        self._counted[waiter.priority] += 1

    def _count_out(self, waiter: _Waiter) -> None:
        """``waiter`` left (granted, cancelled, gone or parked by its quota)."""
        if not waiter.counted:
            return
        waiter.counted = False
        level = waiter.priority
        self._counted[level] -= 1
        if not self._counted[level]:
            self._needs[level] = {}  # no rounding left behind
            return
        needs = self._needs[level]
        for rtype, amount in waiter.amounts.items():
            needs[rtype] = needs.get(rtype, 0.0) - amount

    def _level_needs(self, level: Priority) -> dict[ResourceType, float]:
        """What the live requests of ``level`` need, together. With quotas, those their
        state's quota holds back are left out: they are parked when they reach the head,
        and what was set aside for them would hold up lower requests for nothing."""
        if not self.enable_quotas:
            return self._needs[level]
        needs: dict[ResourceType, float] = {}
        for _, _, waiter in self._queues[level]:
            if waiter.counted and self._state_quotas.breach(waiter.state, waiter.amounts) is None:
                for rtype, amount in waiter.amounts.items():
                    needs[rtype] = needs.get(rtype, 0.0) + amount
        return needs

    def _unpark(self, parked: list[_Waiter]) -> None:
        for waiter in parked:
            if not waiter.dead:
                waiter.parked = False
                heapq.heappush(self._queues[waiter.priority], (waiter.rank, waiter.rank[1], waiter))
                self._count_in(waiter)

    # --- async use, like a capacity limiter ---------------------------------------------

    @locked
    def lend_cpu(self, owner: str) -> bool:
        """Give back the CPU ``owner`` holds, keeping the rest of its holding (memory, GPUs
        and their devices): its state waits for a human. Queued requests that now fit are
        granted. Returns whether there was CPU to lend (:meth:`take_cpu_back` then)."""
        holding = self._holders.get(owner)
        if holding is None or holding.held.cpu <= _EPS or owner in self._lent:
            return False
        ledger = self._ledger
        cpu = holding.held.cpu
        holding.held.cpu = 0.0
        holding._amounts = None
        ledger.free.cpu = min(ledger.free.cpu + cpu, ledger.total.cpu)
        ledger.area.cpu += cpu * (self._clock() - holding.started)  # held so far; not while lent
        self._lent[owner] = cpu
        if self.enable_quotas:
            self._state_quotas.refund(holding.state, {ResourceType.CPU: cpu})
            self._priority_quotas.refund(holding.priority, {ResourceType.CPU: cpu})
        self._settle()
        return True

    async def take_cpu_back(self, owner: str) -> None:
        """Wait until the CPU :meth:`lend_cpu` gave back is free again and add it to
        ``owner``'s holding, ahead of every queued request: the state was admitted and
        holds the rest, which a queued request may be waiting for (it would wait for this
        state, and this state for the CPU reserved for it). Returns at once when ``owner``
        lent nothing, or when its holding is given back or requeued meanwhile."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        with self.lock:
            if owner not in self._lent:
                return
            self._loans[owner] = future
            self._grant_loans()
        try:
            await future
        finally:
            with self.lock:
                if self._loans.get(owner) is future:
                    del self._loans[owner]

    def _grant_loans(self) -> None:
        """Give each lender waiting in :meth:`take_cpu_back` its CPU, when free (lock held)."""
        ledger = self._ledger
        for owner, future in list(self._loans.items()):
            cpu = self._lent.get(owner)
            holding = self._holders.get(owner)
            if cpu is not None and holding is not None:
                if cpu > ledger.free.cpu + _EPS:
                    continue
                ledger.free.cpu -= cpu
                ledger.lowest.cpu = min(ledger.lowest.cpu, ledger.free.cpu)
                holding.held.cpu += cpu
                holding._amounts = None
                ledger.area.cpu -= cpu * (self._clock() - holding.started)  # counted from now on
                if self.enable_quotas:
                    self._state_quotas.charge(holding.state, {ResourceType.CPU: cpu})
                    self._priority_quotas.charge(holding.priority, {ResourceType.CPU: cpu})
            self._lent.pop(owner, None)
            del self._loans[owner]
            grant_soon(future)

    async def acquire(
        self,
        owner: str,
        requirements: ResourceRequirements,
        priority: Priority | int | None = None,
        *,
        state: str | None = None,
    ) -> None:
        """Wait in the queue until ``requirements`` is granted to ``owner``."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._enqueue(owner, requirements, priority, state, False, future)
        try:
            await future
        except BaseException:
            with self.lock:
                if future.done() and not future.cancelled() and future.exception() is None:
                    self.release(owner)  # granted, but the caller went away
                elif self._waiters.get(owner) is not None and self._waiters[owner].future is future:
                    self.cancel(owner)
            raise

    @contextlib.asynccontextmanager
    async def allocate(
        self,
        owner: str,
        requirements: ResourceRequirements,
        priority: Priority | int | None = None,
        *,
        state: str | None = None,
    ) -> AsyncIterator[ResourcePool]:
        """``async with pool.allocate(owner, req):`` holds the request for the block."""
        await self.acquire(owner, requirements, priority, state=state)
        try:
            yield self
        finally:
            self.release(owner)

    # --- quotas -------------------------------------------------------------------------

    @locked
    def set_quota(
        self,
        state: str,
        *,
        cpu: float | None = None,
        memory: float | None = None,
        io: float | None = None,
        network: float | None = None,
        gpu: float | None = None,
        mode: QuotaMode | str = QuotaMode.WAIT,
    ) -> None:
        """Cap what all running instances of ``state`` hold together (None: no cap for that type)."""
        if not isinstance(state, str) or not state:
            raise ResourceRequestError(f"set_quota() takes a state name, got {state!r}")
        self._set_quota(self._state_quotas, state, cpu, memory, io, network, gpu, mode)

    @locked
    def set_priority_quota(
        self,
        priority: Priority | int,
        *,
        cpu: float | None = None,
        memory: float | None = None,
        io: float | None = None,
        network: float | None = None,
        gpu: float | None = None,
        mode: QuotaMode | str = QuotaMode.WAIT,
    ) -> None:
        """Cap what all holders of ``priority`` hold together."""
        level = _validate.member(Priority, priority, "set_priority_quota(priority)", error=ResourceRequestError)
        self._set_quota(self._priority_quotas, Priority(level), cpu, memory, io, network, gpu, mode)

    @locked
    def remove_quota(self, state: str | None = None, priority: Priority | int | None = None) -> None:
        """Drop the quota of ``state`` and/or ``priority``."""
        if state is not None and (not isinstance(state, str) or not state):
            raise ResourceRequestError(f"remove_quota(state=...) takes a state name or None, got "
                                       f"{_validate.shown(state)}")
        level = None if priority is None else _level(priority, "remove_quota(priority=...)")
        if state is not None:
            self._state_quotas.set(state, None)
        if level is not None:
            self._priority_quotas.set(level, None)
        self._requota()

    @locked
    def get_quotas(self) -> dict[str, dict[Any, Quota]]:
        """The quotas set: ``{"state": {name: Quota}, "priority": {Priority: Quota}}``."""
        return {"state": dict(self._state_quotas.quotas), "priority": dict(self._priority_quotas.quotas)}

    def _set_quota(self, book: QuotaBook, key: Any, cpu, memory, io, network, gpu, mode) -> None:  # type: ignore[no-untyped-def]
        if not self.enable_quotas:
            raise ResourceRequestError(
                "quotas are off for this pool: create it with ResourcePool(..., enable_quotas=True)"
            )
        given = {
            ResourceType.CPU: cpu,
            ResourceType.MEMORY: memory,
            ResourceType.IO: io,
            ResourceType.NETWORK: network,
            ResourceType.GPU: gpu,
        }
        limits = {rtype: float(v) if isinstance(v, int) and not isinstance(v, bool) else v
                  for rtype, v in given.items() if v is not None}
        if not limits:
            raise ResourceRequestError(
                "a quota needs at least one limit (cpu=, memory=, io=, network=, gpu=); "
                "use remove_quota() to drop one"
            )
        book.set(key, Quota(limits, QuotaMode.parse(mode)))
        self._requota()

    def _requota(self) -> None:
        parked, self._parked = self._parked, {}
        for waiters in parked.values():
            self._unpark(waiters)
        self._settle()

    def _quota_blocks(self, owner: str, state: str, level: Priority, amounts: dict[ResourceType, float],
                      queued: bool, readmitted: bool = False) -> bool:
        """Whether a quota stops this request now; raises where waiting cannot or must not help.

        A ``readmitted`` request (a requeued one: a preempted holder, or an attempt that gave
        its grant back while an admission hook held it up) passed its quota once already: a
        quota in fail mode makes it wait, as a request queued for capacity does, rather than
        fail an attempt under way."""
        for book, what in ((self._state_quotas, "state"), (self._priority_quotas, "priority")):
            key = state if what == "state" else level
            breach = book.breach(key, amounts)
            if breach is None:
                continue
            if breach.never_fits or (breach.mode is QuotaMode.FAIL and not readmitted):
                self._rejected += 1
                raise QuotaExceededError(self._quota_message(owner, what, key, breach))
            if not queued:
                return True
        return False

    @staticmethod
    def _quota_message(owner: str, what: str, key: Any, breach: QuotaBreach) -> str:
        rtype = breach.rtype
        kw = _QUOTA_KEYWORD.get(rtype, "cpu")  # type: ignore[call-overload]
        unit = _UNITS.get(rtype, "units")  # type: ignore[call-overload]
        if what == "state":
            subject = f"state {key!r}"
            fix = f"pool.set_quota({key!r}, {kw}=...)"
        else:
            subject = f"priority {Priority(key).name}"
            fix = f"pool.set_priority_quota(Priority.{Priority(key).name}, {kw}=...)"
        head = (
            f"{owner!r} asks for {breach.requested:g} {unit} but the quota of {subject} is "
            f"{breach.limit:g} ({breach.in_use:g} in use)"
        )
        if breach.never_fits:
            return f"{head}: it can never fit; lower the request or raise the quota with {fix}"
        return f"{head}: raise the quota with {fix}, or pass mode='wait' there to queue instead of failing"

    # --- preemption ---------------------------------------------------------------------

    @locked
    def find_victims(
        self,
        owner: str,
        requirements: ResourceRequirements,
        priority: Priority | int | None = None,
        *,
        among: Collection[str] | None = None,
        state: str | None = None,
    ) -> list[str] | None:
        """Running owners to evict so that ``requirements`` fits (see agent.preemption).

        ``[]``: it fits (or will, once evictions already under way finish); ``None``:
        preemption is off, a quota holds the request back (evicting frees capacity, not
        quota), or no set of strictly lower-priority holders frees enough. ``among`` limits
        the victims to holders the caller can stop. Chosen victims are
        remembered until they release, so they are not chosen twice, and what they free
        counts as promised to ``owner`` until the last of them has released.
        """
        _check_request("find_victims", owner, requirements, state)
        level = requirements.priority if priority is None else _level(priority, "find_victims(priority=...)")
        if not self.enable_preemption:
            return None
        need = requirements.amounts()
        if self.enable_quotas and (
            self._state_quotas.breach(owner if state is None else state, need) is not None
            or self._priority_quotas.breach(level, need) is not None
        ):
            return None
        free = self._available
        for victim in self._evicting:
            holding = self._holders.get(victim)
            if holding is not None:
                for rtype, amount in holding.amounts.items():
                    free[rtype] += amount
        for claimant, claimed in self._claims.items():
            if claimant != owner:
                for rtype, amount in claimed.items():
                    free[rtype] -= amount
        candidates = [
            Holder(h.owner, int(h.priority), h.amounts, h.started, h.seq)
            for h in self._holders.values()
            if h.owner not in self._evicting and h.owner != owner and (among is None or h.owner in among)
        ]
        victims = self._policy.choose(need, free, int(level), candidates)
        gpus = need.get(ResourceType.GPU, 0.0)
        if victims is not None and gpus > 0 and self._gpus is not None:
            victims = self._placed(victims, gpus, int(level), candidates, need, free)
        if victims:
            for victim in victims:
                self._evicting[victim] = owner
            self._claims[owner] = need
            self._preempted += len(victims)
        return victims

    def _placed(self, victims: list[str], gpus: float, level: int, candidates: list[Holder],
                need: dict[ResourceType, float], free: dict[ResourceType, float]) -> list[str] | None:
        """``victims`` and, when what they free is spread over GPUs others still use, more
        lower-priority GPU holders (least important, then youngest, first) until the
        request can be placed on devices; then without each victim the others make
        unneeded (one that freed a share of a GPU still in use, say); None when even all
        of them would not do."""
        assert self._gpus is not None
        gone = set(self._evicting) | set(victims)
        if self._gpus.fits_without(gpus, gone):
            return victims
        chosen = list(victims)
        more = sorted((h for h in candidates if h.owner not in gone and h.priority < level
                       and self._gpus.assigned(h.owner)), key=eviction_order)
        for holder in more:
            chosen.append(holder.owner)
            gone.add(holder.owner)
            if self._gpus.fits_without(gpus, gone):
                break
        else:
            return None
        by_owner = {h.owner: h for h in candidates}
        # Spared first: the most important victims (the reverse of the eviction order).
        for victim in sorted(chosen, key=lambda owner: eviction_order(by_owner[owner]), reverse=True):
            rest = [v for v in chosen if v != victim]
            frees = {rtype: free.get(rtype, 0.0) + sum(by_owner[v].amounts.get(rtype, 0.0) for v in rest)
                     for rtype in need}
            if all(frees[rtype] + _EPS >= amount for rtype, amount in need.items()) and \
                    self._gpus.fits_without(gpus, set(self._evicting) | set(rest)):
                chosen = rest
        return chosen

    @locked
    def blocked_heads(self) -> list[str]:
        """The first request of each priority that waits for room, highest priority first."""
        if not self._waiters:
            return []
        heads = (self._head(level) for level in _LEVELS if self._blocked[level])
        return [head.owner for head in heads if head is not None]

    @locked
    def pending_evictions(self) -> dict[str, str]:
        """Victims chosen that still hold resources, with the owner they make room for."""
        return dict(self._evicting)

    # --- why things wait ------------------------------------------------------------------

    @locked
    def get_waiting_states(self) -> dict[str, str]:
        """Owners waiting for resources, with what they wait for."""
        heads = {level: self._head(level) for level in _LEVELS}
        return {owner: self._why(waiter, heads[waiter.priority]) for owner, waiter in self._waiters.items()}

    @locked
    def waiting_reason(self, owner: str) -> str | None:
        """What ``owner``'s queued request waits for (None when it is not queued)."""
        waiter = self._waiters.get(owner)
        return None if waiter is None else self._why(waiter, self._head(waiter.priority))

    def _head(self, level: Priority) -> _Waiter | None:
        """The oldest live request of ``level`` (cancelled entries at the top are dropped)."""
        heap = self._queues[level]
        while heap and heap[0][2].dead:
            heapq.heappop(heap)
        return heap[0][2] if heap else None

    def _why(self, waiter: _Waiter, head: _Waiter | None) -> str:
        if waiter.parked:
            breach = self._state_quotas.breach(waiter.state, waiter.amounts)
            if breach is not None:
                return (
                    f"quota of state {waiter.state!r}: needs {breach.requested:g} {describe(breach.rtype)}"  # type: ignore[arg-type]
                    f", {breach.in_use:g} of {breach.limit:g} in use"
                )
        level = waiter.priority
        if head is not None and head is not waiter:
            return f"queued behind {head.owner!r} (priority {level.name} is first come, first served)"
        if self.enable_quotas:
            breach = self._priority_quotas.breach(level, waiter.amounts)
            if breach is not None:
                return (
                    f"quota of priority {level.name}: needs {breach.requested:g} {describe(breach.rtype)}"  # type: ignore[arg-type]
                    f", {breach.in_use:g} of {breach.limit:g} in use"
                )
        reserve = self._reserve_at[level] or {}
        for rtype, amount in waiter.amounts.items():
            free = self._ledger.free.get(rtype)
            if amount > free - reserve.get(rtype, 0.0) + _EPS:
                text = f"needs {amount:g} {describe(rtype)}, {free:g} free"
                if reserve.get(rtype):
                    text += f" ({reserve[rtype]:g} set aside for higher priorities)"
                return text
        gpus = waiter.amounts.get(ResourceType.GPU, 0.0)
        if gpus and self._gpus is not None and not self._gpus.fits(gpus):
            return (f"needs {gpus:g} GPU(s) on devices where it fits: the free share is spread over GPUs "
                    "other states use")
        return "about to be granted"

    # --- measured use ------------------------------------------------------------------------

    @locked
    def record_measured(self, owner: str, usage: Mapping[str, Any]) -> None:
        """Note what ``owner``'s attempt really used so far (from its executor).

        Understands ``cpu_seconds`` and ``peak_memory_bytes`` (or ``peak_memory_mb``),
        cumulative for the attempt: a later report replaces an earlier one. Each is a
        number >= 0 or None (not measured).
        """
        if type(owner) is not str or not owner:
            raise ResourceRequestError(f"record_measured(owner=...) takes the owner's name (a non-empty str), "
                                       f"got {_validate.shown(owner)}")
        if type(usage) is not dict and not isinstance(usage, Mapping):
            raise ResourceRequestError(
                f"record_measured(usage=...) takes a mapping such as {{'cpu_seconds': 1.5, "
                f"'peak_memory_bytes': 2**20}}, got {_validate.shown(usage)}"
            )
        cpu = _measured(usage, "cpu_seconds")
        if "peak_memory_mb" in usage:
            memory = _measured(usage, "peak_memory_mb")
        else:
            memory = _measured(usage, "peak_memory_bytes") / (1024 * 1024)
        if owner in self._holders:
            self._measured[owner] = (cpu, memory)
        else:  # reported after the release: only the CPU time still counts
            self._cpu_seconds_done += cpu

    @locked
    def get_measured(self) -> dict[str, dict[str, float]]:
        """The latest measured use of each current holder."""
        return {o: {"cpu_seconds": c, "peak_memory_mb": m} for o, (c, m) in self._measured.items()}

    # --- statistics ------------------------------------------------------------------------

    @locked
    def get_usage_stats(self) -> dict[ResourceType, ResourceUsage]:
        now = self._clock()
        measured: dict[ResourceType, float | None] = {rtype: None for rtype in self.totals}
        measured[ResourceType.CPU] = self._cpu_seconds_done + sum(c for c, _ in self._measured.values())
        measured[ResourceType.MEMORY] = sum(m for _, m in self._measured.values())
        area, available, lowest = self._area, self._available, self._lowest
        for holding in self._holders.values():
            for rtype, amount in holding.amounts.items():
                area[rtype] += amount * (now - holding.started)
        span = now - self._since
        out = {}
        for rtype, total in self.totals.items():
            current = _allocated(total, available[rtype])
            out[rtype] = ResourceUsage(
                total=total,
                current_usage=current,
                peak_usage=_allocated(total, lowest[rtype]),
                average_usage=area[rtype] / span if span > 0 else current,
                measured_usage=measured[rtype],
            )
        return out

    @locked
    def get_state_allocations(self) -> dict[str, dict[ResourceType, float]]:
        return {owner: dict(h.amounts) for owner, h in self._holders.items()}

    def devices(self, owner: str) -> list[GPUDevice]:
        """The GPUs assigned to ``owner``'s grant ([] when none, or when the pool has no devices)."""
        holding = self._holders.get(owner)
        return list(holding.devices) if holding is not None else []

    def holds(self, owner: str) -> bool:
        """Whether ``owner`` holds resources now."""
        return owner in self._holders

    def is_queued(self, owner: str) -> bool:
        """Whether ``owner`` has a request waiting in the queue."""
        return owner in self._waiters

    @locked
    def statistics(self) -> PoolStatistics:
        by_level = {level: 0 for level in Priority}
        available = self._available
        for waiter in self._waiters.values():
            by_level[waiter.priority] += 1
        return PoolStatistics(
            totals=dict(self.totals),
            allocated={r: self.totals[r] - available[r] for r in self.totals},
            holders=len(self._holders),
            waiting=len(self._waiters),
            waiting_by_priority=by_level,
            granted=self._ledger.granted,
            rejected=self._rejected,
            preempted=self._preempted,
            evicting=len(self._evicting),
        )

    def available(self, rtype: ResourceType) -> float:
        return self._ledger.free.get(rtype)

    def __repr__(self) -> str:
        available = self._available
        parts = ", ".join(f"{r.name}={available[r]:g}/{t:g}" for r, t in self.totals.items())
        return f"ResourcePool({parts}, holders={len(self._holders)}, queued={len(self._waiters)})"


def _check_request(what: str, owner: Any, requirements: Any, state: Any) -> None:
    """Refuse the arguments of a request that the pool would misread."""
    if type(owner) is str and owner and type(requirements) is ResourceRequirements and (
            state is None or type(state) is str):
        return  # the common case: one test per argument
    if not isinstance(owner, str) or not owner:
        raise ResourceRequestError(f"{what}(owner=...) takes the requester's name (a non-empty str), "
                                   f"got {_validate.shown(owner)}")
    if not isinstance(requirements, ResourceRequirements):
        raise ResourceRequestError(f"{what}(requirements=...) takes a ResourceRequirements, e.g. "
                                   f"ResourceRequirements(cpu_units=1), got {_validate.shown(requirements)}")
    if state is not None and (not isinstance(state, str) or not state):
        raise ResourceRequestError(f"{what}(state=...) takes a state name (a non-empty str) or None, "
                                   f"got {_validate.shown(state)}")


def _level(priority: Any, what: str) -> Priority:
    """``priority`` as a Priority (a member or its int value; a bool, a float or 9 refused)."""
    if type(priority) is Priority:
        return priority
    return _validate.member(Priority, priority, what, error=ResourceRequestError)  # type: ignore[no-any-return]


def _measured(usage: Mapping[str, Any], key: str) -> float:
    """``usage[key]`` as a float >= 0 (0 when missing or None)."""
    value = usage.get(key)
    if value is None:
        return 0.0
    if (type(value) is float or type(value) is int) and 0 <= value <= _MOST:
        return float(value)
    return _validate.number(value, f"record_measured(usage[{key!r}])", error=ResourceRequestError)  # type: ignore[return-value]


def _allocated(total: float, available: float) -> float:
    """What is allocated of ``total`` when ``available`` is left (float dust counts as none)."""
    allocated = total - available
    return allocated if allocated > _EPS else 0.0


_default: tuple[GPUInventory, ResourcePool] | None = None
_default_lock = threading.Lock()


def default_pool() -> ResourcePool:
    """The process's shared pool: this machine's totals, one queue for every agent not given a pool.

    Made on first use. When the GPU inventory changes (``AGENT_GPUS`` set to another
    value) a new one is made, once the old one holds and queues nothing. With
    ``AGENT_DAEMON=1`` it is agentd's box-wide pool instead (:mod:`agent.daemon.remote`).
    """
    global _default
    if _env.get("AGENT_DAEMON") == "1":
        import importlib

        return importlib.import_module("agent.daemon.remote").daemon_pool()  # type: ignore[no-any-return]
    inventory = machine_inventory()
    with _default_lock:  # agents first run on several threads at once share one pool, not one each
        if _default is None or (_default[0] is not inventory and not _default[1]._holders
                                and not _default[1]._waiters):
            _default = (inventory, ResourcePool(gpu_inventory=inventory))
        return _default[1]
