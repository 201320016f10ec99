"""Per-attempt kernel confinement, supervisor side: cgroup, GPUs, sandbox uid.

The process executor asks a :class:`Confiner` to ``prepare`` each attempt before the
child is forked. The returned :class:`Confinement` carries ``child_spec``, plain data
the child applies with :func:`agent.runtime.confine.apply` before any user code runs,
and afterwards tells what the attempt used and whether it died on a limit, read back
from the kernel (``memory.oom_control`` / ``memory.events``, ``pids.events``,
``cpu.stat``).

Lifecycle, for the executor::

    confinement = confiner.prepare(attempt)      # cgroup created, limits written
    pid = fork(); child: apply(confinement.child_spec); run the state
    confinement.started(pid)                      # the no-cgroup watchdog needs the pid
    ... child exits (or confinement.kill()) and is reaped ...
    reason = confinement.failure_reason(exit_code, signal)   # any failure, before close()
    usage = confinement.usage(); confinement.close()
"""

from __future__ import annotations

import asyncio
import glob
import itertools
import logging
import os
import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import fields
from typing import Any, Callable

from ..devices import machine_inventory
from ..errors import CgroupError, FailureReason, IsolationUnavailableError
from ..executor import Attempt, Isolation
from ..resources import ResourceType
from .cgroups import DEFAULT_ROOT, CgroupBackend, CgroupHandle, CgroupLimits, LimitEvents, detect, limits_for
from .cgroups import blockdev
from .teardown import at_exit
from .cgroups.base import safe_name
from .gpus import device_rules, machine_gpu_minors, pinning_env

_log = logging.getLogger("agent.supervisor")

Reading = tuple[dict[str, Any], LimitEvents]
"""A cgroup's usage and limit events read at one moment (:meth:`CgroupHandle.reading`)."""

_COUNTERS = ("cpu_seconds", "nr_throttled", "throttled_seconds", "io_read_bytes", "io_write_bytes")
_EVENTS = tuple(f.name for f in fields(LimitEvents))


def counts_unpinned_gpus(attempt: Attempt) -> bool:
    """Whether ``attempt`` holds GPU units of its pool that no device backs (a pool larger than
    the inventory: counted, not pinned): it then sees the GPUs the program sees. One that
    asked for none, or left GPU out of its ``resource_types``, sees none."""
    resources = attempt.resources  # most ask for no GPU: one attribute read tells them
    return (resources is not None and resources.gpu_units > 0 and not attempt.assignment.get("gpus")
            and ResourceType.GPU in resources.amounts())


def _asks_io_rates(attempt: Attempt) -> bool:
    req = attempt.resources
    return req is not None and any(
        v is not None for v in (req.io_read_bps, req.io_write_bps, req.io_read_iops, req.io_write_iops)
    )


def _mib(nbytes: int | float) -> str:
    return f"{nbytes / (1024 * 1024):.4g} MiB"


def _gpu_device_paths(minors: set[int]) -> tuple[str, ...]:
    """The /dev nodes a sandbox with the GPUs ``minors`` needs (its own GPUs, the control nodes)."""
    control = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia-modeset")
    caps = tuple(sorted(glob.glob("/dev/nvidia-caps/*")))
    return tuple(f"/dev/nvidia{m}" for m in sorted(minors)) + control + caps


class Confinement:
    """Everything set up for one attempt; ``close`` undoes it."""

    def __init__(
        self,
        child_spec: dict[str, Any] | None = None,
        handle: CgroupHandle | None = None,
        backend_name: str = "none",
        release: Callable[[], None] | None = None,
    ) -> None:
        self.child_spec: dict[str, Any] = child_spec or {}
        self.handle = handle
        self.backend_name = backend_name
        self._release = release
        self._usage: dict[str, Any] = {}
        self._events = LimitEvents()
        self._closed = False
        self.cleanup_error: CgroupError | None = None
        # Set by the executor once the zygote reaped the attempt's process: for a sandbox,
        # its namespaces (and everything in them) are then gone.
        self.reaped = False
        # Runs the removal of a cgroup whose processes are all reaped, off the event loop;
        # ``removing`` is then that removal, for whoever must not return before it is done.
        self.remove_later: Callable[[Callable[[], None]], Future[None] | None] | None = None
        self.removing: Future[None] | None = None
        self._start: Reading | None = None  # the counters when the attempt started (count_from_now)

    @property
    def limits(self) -> CgroupLimits | None:
        return self.handle.limits if self.handle is not None else None

    @property
    def unenforced(self) -> dict[str, str]:
        """Requested limits this machine could not enforce, with why."""
        return dict(self.handle.unenforced) if self.handle is not None else {}

    def started(self, pid: int) -> None:
        """Tell the confinement the child's pid (cgroup children joined by themselves)."""
        if self.handle is not None and not self.handle.procs_files:
            self.handle.attach(pid)

    def count_from_now(self) -> None:
        """The attempt starts now, in the cgroup of a parked child that warmed up there: its
        figures count from here (the child is handed its spec next), its peak memory
        restarted where the kernel can (cgroup v1, the no-cgroup watchdog). One read, on the
        launch's path: before its launch a parked child only warms up (one thread, no block
        IO, within every default limit), so only its CPU time needs a starting point."""
        if self.handle is not None and not self._closed:
            restart_peak(self.handle)
            self._start = ({"cpu_seconds": self.handle.cpu_seconds()}, LimitEvents())

    def counted_before(self) -> float:
        """The CPU seconds its cgroup had counted when the attempt started (0: none, or a
        cgroup made for the attempt)."""
        return float(self._start[0].get("cpu_seconds", 0.0)) if self._start is not None else 0.0

    def _refresh(self) -> None:
        if self.handle is not None and not self._closed:
            self._usage, self._events = since(self.handle.reading(), self._start)

    def usage(self) -> dict[str, Any]:
        """Measured use of the attempt so far (cpu_seconds, peak_memory_bytes, io bytes, ...)."""
        self._refresh()
        return dict(self._usage)

    def limit_events(self) -> LimitEvents:
        self._refresh()
        return self._events

    def _events_behind(self, signal: int | None) -> LimitEvents:
        """The limit events that may explain a failure (ended by ``signal``, if any)."""
        return self._events

    def close_files(self) -> None:
        """Close the cgroup files kept open to read it back (the supervisor shuts down, its
        zygote taking the process with it; the cgroup goes with the supervisor's directory)."""
        if self.handle is not None:
            self.handle.close_files()

    def cgroup_gone(self) -> bool:
        """Whether its cgroup was removed by someone else (the zygote removes an idle worker's)."""
        handle = self.handle
        return handle is not None and not any(os.path.exists(f) for f in handle.procs_files)

    def page_faults(self) -> int | None:
        """Page faults the attempt's cgroup saw (None without a cgroup, or once closed)."""
        if self.handle is None or self._closed:
            return None
        return self.handle.page_faults()

    def failure_reason(self, exit_code: int | None, signal: int | None) -> FailureReason | None:
        """A limit-hit reason read back from the kernel, or None when no limit was hit.

        Call it for every failed attempt (killed, non-zero exit, *or* a state exception:
        a refused fork surfaces as ``BlockingIOError`` in the state), after the child
        was reaped and before :meth:`close`; prefer its reason when it returns one.
        """
        if self.handle is None:
            return None
        self._refresh()
        events, usage, limits = self._events_behind(signal), self._usage, self.handle.limits
        watchdog = " (watchdog)" if self.backend_name == "none" else ""
        if events.oom_kills and limits.memory_bytes is not None:
            peak = usage.get("peak_memory_bytes", 0)
            return FailureReason(
                kind="limit",
                message=f"killed: memory limit {_mib(limits.memory_bytes)}{watchdog}, peak {_mib(peak)}",
                exit_code=exit_code,
                signal=signal,
                details={
                    "limit": "memory",
                    "limit_bytes": limits.memory_bytes,
                    "peak_bytes": peak,
                    "oom_kills": events.oom_kills,
                    "backend": self.backend_name,
                },
            )
        if events.pids_limit_hits and limits.pids_max is not None:
            peak = usage.get("pids_peak")
            if watchdog:
                message = f"killed: pids limit {limits.pids_max} exceeded (watchdog saw {peak} processes)"
            else:
                seen = f", peak {peak} processes" if peak else ""
                killed = "killed: " if signal is not None else ""
                message = (
                    f"{killed}pids limit {limits.pids_max} reached: the kernel refused "
                    f"{events.pids_limit_hits} fork(s){seen}; raise pids_max or fork less"
                )
            return FailureReason(
                kind="limit",
                message=message,
                exit_code=exit_code,
                signal=signal,
                details={
                    "limit": "pids",
                    "pids_max": limits.pids_max,
                    "pids_peak": peak,
                    "refused": events.pids_limit_hits,
                    "backend": self.backend_name,
                },
            )
        return None

    def kill(self) -> None:
        """Kill every process of the attempt (used when SIGKILL of the child is not enough)."""
        if self.handle is not None and not self._closed:
            self.handle.kill()

    def close(self) -> None:
        """Remove what ``prepare`` created (cgroup, uid lease, GPU assignment); idempotent."""
        if self._closed:
            return
        try:
            if self.handle is not None:
                if not self._usage:  # nothing read yet: keep the final figures before removing
                    self._refresh()
                if self.reaped and self._release is None and self.remove_later is not None:
                    # Nothing is left in it: removing it (0.3 ms or more, sleeping on the
                    # kernel's cgroup lock) need not hold up the attempt's outcome.
                    self.removing = self.remove_later(self.handle.remove)
                else:
                    self.handle.remove()
        except (CgroupError, OSError) as exc:
            # Never let cleanup hide the attempt's outcome: the supervisor's own
            # directory is reaped (with whatever is left in it) when the Confiner closes.
            self.cleanup_error = exc
            _log.warning("cgroup_not_removed: %s", exc)
        finally:
            self._closed = True
            if self._release is not None:
                self._release()


class SharedConfinement(Confinement):
    """One attempt's share of a confinement that outlives it (a worker's cgroup).

    What the attempt used is the difference of the cgroup's counters read when it ended
    (:meth:`end`) and ``baseline``: the reading that ended the worker's previous attempt
    (its peak restarted then, :func:`restart_peak`), or, for a worker's first attempt, one
    taken now. Its peak memory is the cgroup's peak since then where the kernel can restart
    it (cgroup v1 and the no-cgroup watchdog; on cgroup v2, the peak since the worker
    started). Limits hit in between are the attempt's. Closing it leaves the cgroup to its
    owner; :meth:`kill` kills the owner's processes (a worker that will not stop is replaced).
    A worker killed during its first attempt (no ``baseline``) is judged on the limits it
    hit over its whole life, as a ``process`` child is: one killed by a memory limit too
    small for it fails its attempt with that limit, also when the kill came between its
    hello and the attempt. Otherwise what the worker's start hit (a refused fork at import)
    is not the attempt's.
    """

    def __init__(self, owner: Confinement, baseline: Reading | None = None) -> None:
        super().__init__(owner.child_spec, owner.handle, owner.backend_name)
        self._owner = owner
        self._ended = False
        self._first = baseline is None
        self.final: Reading | None = None  # the cgroup's own figures when the attempt ended
        if baseline is None and owner.handle is not None:
            restart_peak(owner.handle)
            baseline = owner.handle.reading()
            owner.handle.remember_limits()  # read back after each attempt (WorkerPool)
        self._start = baseline

    def started(self, pid: int) -> None:
        return None  # the owner's process is followed already

    def _refresh(self) -> None:
        if self.handle is None or self._ended:
            return
        self.final = now = self.handle.reading()
        self._usage, self._events = since(now, self._start)

    def _events_behind(self, signal: int | None) -> LimitEvents:
        if self._first and signal is not None and self.final is not None:
            return self.final[1]  # the worker died: what it hit since its cgroup was made
        return self._events

    def end(self) -> None:
        """The attempt is over: keep what it used, whatever the owner does next."""
        self._refresh()
        self._ended = True

    def kill(self) -> None:
        self._owner.kill()

    def close(self) -> None:
        self._closed = True


def since(now: Reading, start: Reading | None) -> Reading:
    """What the counters and limit events of ``now`` add up to since ``start`` (None: all of
    them); the rest of the usage (peaks) as read ``now``. Never below zero: a cgroup removed
    meanwhile (its worker exited) reads as zeros."""
    if start is None:
        return now
    usage, before = dict(now[0]), start[0]
    for key in _COUNTERS:
        if key in usage:
            usage[key] = max(0, usage[key] - before.get(key, 0))
    events, earlier = now[1], start[1]
    return usage, LimitEvents(*(max(0, getattr(events, f) - getattr(earlier, f)) for f in _EVENTS))


def restart_peak(handle: CgroupHandle) -> None:
    """Restart the cgroup's peak memory from its usage now, where the backend can."""
    reset = getattr(handle, "reset_peak", None)
    if reset is not None:
        reset()


class Confiner:
    """Creates a :class:`Confinement` for each attempt, on the best cgroup backend here.

    On start it reaps cgroups left by supervisors that died (``reaped`` says how many).
    ``io_paths`` are the paths whose disks get the IO throttles (default: the working
    directory and ``/``). ``gpu_minors`` are the machine's ``/dev/nvidia<N>`` minors
    (default: found in /dev and in the GPU inventory); when there are any, every child
    gets a closed devices policy that allows only the GPUs it was assigned.
    """

    # "v2", "v1" or "none": set per instance from the backend detected (or given).
    backend_name = "none"

    def __init__(
        self,
        backend: CgroupBackend | str | None = None,
        *,
        root: str = DEFAULT_ROOT,
        io_paths: list[str] | None = None,
        gpu_minors: list[int] | None = None,
    ) -> None:
        if backend is None or isinstance(backend, str):
            detection = detect(root, prefer=backend)
            self.backend: CgroupBackend = detection.backend
            self.refused = detection.refused
        else:
            self.backend = backend
            self.refused = {}
        self.backend_name = self.backend.name
        self.reaped = self.backend.reap_stale()
        self.io_devices = blockdev.disks_for(io_paths or [os.getcwd(), "/"])
        self._counter = itertools.count(1)
        self._said: set[tuple[str, str, str]] = set()  # (agent, state, limit) said to be unenforced
        self._uid_pool: Any = None
        self._uid_pool_made = threading.Lock()  # leases are taken on the loop and on the thread
        self._closed = False
        _close_at_exit(self)
        self._thread: ThreadPoolExecutor | None = None
        self._fixed_minors = sorted(gpu_minors) if gpu_minors is not None else None
        self._gpu_minors: list[int] = []
        self._minors_of: object = None

    def capabilities(self) -> dict[str, str]:
        """What each ResourceRequirements field is enforced by on this machine."""
        return self.backend.capabilities()

    def limits(self, attempt: Attempt) -> CgroupLimits:
        """The kernel limits ``attempt`` gets: its resources, its GPUs' devices, the sandbox's defaults."""
        minors = [int(m) for m in attempt.assignment.get("gpu_minors", [])]
        return limits_for(attempt.resources, io_devices=self.io_devices,
                          sandbox=attempt.isolation is Isolation.SANDBOX, allow_devices=self._devices(minors))

    def _devices(self, minors: list[int]) -> tuple[str, ...] | None:
        return device_rules(minors) if minors or self._machine_gpu_minors() else None

    def park(self, pid: int, sandboxed: bool = False) -> CgroupHandle | None:
        """A fresh cgroup, in every controller an attempt may need, with the parked child
        ``pid`` moved in (None: no cgroups here). Called off the loop. Its limits are those of
        an attempt without resources (a sandbox's defaults, for a child parked for sandboxes),
        so that the launch of such an attempt writes none."""
        if not self.backend.owned_dirs():
            return None
        limits = limits_for(None, io_devices=self.io_devices, sandbox=sandboxed, allow_devices=self._devices([]))
        handle = self.backend.create(safe_name(f"parked-{pid}-{next(self._counter)}"), limits, every_controller=True)
        try:
            handle.attach(pid)
            handle.reading()  # opens its files now: reading them at the attempt's result is then cheap
        except BaseException:
            handle.remove()
            raise
        return handle

    def lease_ahead(self, pid: int) -> Any:
        """A sandbox uid leased for parked child ``pid``'s launch (None: none can be leased now;
        the launch then leases one, or says why it cannot)."""
        try:
            return self._uids().lease(safe_name(f"parked-{pid}-{next(self._counter)}"), ahead=True)
        except Exception:
            return None

    def let_go(self, made: Any) -> None:
        """Undo what was made ahead for a parked child that serves no launch (a
        :class:`~agent.supervisor.parked.Parked`): its cgroup (and so the child) and its uid."""
        try:
            if made.cgroup is not None:
                made.cgroup.remove()
        finally:
            if made.lease is not None and self._uid_pool is not None:
                self._uid_pool.release(made.lease.owner, contained=True)  # nothing ever ran as it

    def background(self, work: Callable[[], None]) -> Future[None] | None:
        """Run ``work`` (making or removing a cgroup) on this confiner's own thread, in order;
        its future (None: done already, here)."""
        if self._closed:
            _logged(work)
            return None
        if self._thread is None:
            self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="agent-cgroups")
        try:
            return self._thread.submit(_logged, work)
        except RuntimeError:  # the interpreter is exiting: its thread pools take nothing new
            _logged(work)
            return None

    def prepare(self, attempt: Attempt, *, name: str | None = None, parked: Any = None) -> Confinement:
        """Create the attempt's cgroup with its limits, and the child's spec.

        ``name`` names the cgroup (default: from the run, the state and the attempt).
        ``parked`` is a parked child (a :class:`~agent.supervisor.parked.Parked`) and the
        cgroup it waits in (from :meth:`park`): that cgroup gets the attempt's limits
        instead, and the child need not join it; a sandbox uid leased for it is the attempt's.
        """
        sandboxed = attempt.isolation is Isolation.SANDBOX
        if name is None:
            name = f"{attempt.run_id[:8]}-{attempt.state_name}-{attempt.number}"
        name = safe_name(f"{name}-{next(self._counter)}")
        uuids = [str(u) for u in attempt.assignment.get("gpus", [])]
        minors = [int(m) for m in attempt.assignment.get("gpu_minors", [])]
        limits = self.limits(attempt)
        if parked is not None:
            handle = parked.cgroup
            self.backend.apply(handle, limits)
        else:
            parked = None
            handle = self.backend.create(name, limits)
        if _asks_io_rates(attempt) and not self.io_devices:
            handle.unenforced["io_throttle"] = "no block device holds the working directory or /"
        child_spec = handle.child_spec()
        if counts_unpinned_gpus(attempt):
            child_spec["gpu"] = {"env": {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES")}}
        else:
            child_spec["gpu"] = {"env": pinning_env(uuids)}
        if parked is not None:
            child_spec["joined"] = parked.pid
        if sandboxed:
            try:
                pool = self._uids()
                ahead = parked.lease if parked is not None else None
                lease = pool.claim(ahead, name) if ahead is not None else pool.lease(name)
            except BaseException:
                handle.remove()
                raise
            # With a pids cgroup, RLIMIT_NPROC is only a backstop, set well above pids.max: the
            # cgroup must refuse the fork first, so that its counter names the limit (a refusal
            # by the rlimit leaves no trace; with pids.max + 1 it came first in most fork bombs).
            # Without one, the rlimit is the limit.
            nproc = None
            if limits.pids_max is not None:
                nproc = limits.pids_max + 1 if self.backend_name == "none" else 2 * limits.pids_max
            devices = _gpu_device_paths(set(minors)) if uuids else ()
            child_spec["sandbox"] = lease.spec(devices=devices, **({"nproc": nproc} if nproc else {}))
        if handle.unenforced:
            self._say_unenforced(attempt, handle.unenforced)
        confinement = Confinement(child_spec, handle, self.backend_name)
        confinement.remove_later = self.background
        if parked is not None:
            confinement.count_from_now()  # what the child did while parked (its warm-up) is not the attempt's
        if sandboxed:
            confinement._release = lambda: pool.release(lease.owner, contained=confinement.reaped)
        return confinement

    def _say_unenforced(self, attempt: Attempt, unenforced: dict[str, str]) -> None:
        """Warn, once per state and limit, that a limit it asked for is not enforced here
        (``agent doctor`` says what this machine enforces; this says who is affected)."""
        for limit, why in unenforced.items():
            key = (attempt.agent_name, attempt.state_name, limit)
            if key not in self._said:
                self._said.add(key)
                _log.warning("limit_not_enforced: agent %r, state %r: %s: %s",
                             attempt.agent_name, attempt.state_name, limit, why)

    def _machine_gpu_minors(self) -> list[int]:
        """Minors of every GPU on the machine (read again only when the inventory changes)."""
        if self._fixed_minors is not None:
            return self._fixed_minors
        inventory = machine_inventory()
        if self._minors_of is not inventory:
            self._gpu_minors, self._minors_of = machine_gpu_minors(), inventory
        return self._gpu_minors

    def uid_freed(self) -> Any:
        """A future set when a sandbox uid of this confiner's pool is next freed."""
        return self._uids().until_one_is_freed()

    def _uids(self) -> Any:
        with self._uid_pool_made:
            return self._uid_pool or self._make_uid_pool()

    def _make_uid_pool(self) -> Any:
        try:
            from . import sandbox
        except ImportError as exc:
            raise IsolationUnavailableError(
                f"isolation 'sandbox' needs agent.supervisor.sandbox, which failed to import: {exc}; "
                "use isolation='process'"
            ) from exc
        reason = sandbox.unavailable_reason()
        if reason:
            raise IsolationUnavailableError(reason)
        self._uid_pool = sandbox.UidPool()
        return self._uid_pool

    def close(self) -> None:
        """Release everything held (called when the supervisor shuts down); idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._thread.shutdown(wait=True)  # the removals it has queued, first
        try:
            self.backend.close()
        finally:
            if self._uid_pool is not None:
                self._uid_pool.close()
                self._uid_pool = None


async def removed(confinement: Confinement) -> None:
    """Wait until the cgroup that ``confinement.close()`` left to the confiner's thread is
    gone: a run returns only once its cgroups are."""
    pending = confinement.removing
    if pending is not None and not pending.done():
        await asyncio.shield(asyncio.wrap_future(pending))


def _logged(work: Callable[[], None]) -> None:
    try:
        work()
    except Exception as exc:  # the supervisor's directory is reaped when the confiner closes
        _log.warning("cgroup_work_failed: %s", exc)


_open: "weakref.WeakKeyDictionary[Confiner, int]" = weakref.WeakKeyDictionary()  # -> the pid that made it


def _close_at_exit(confiner: Confiner) -> None:
    """Close ``confiner`` when this process exits normally (not in a forked child)."""
    _open[confiner] = os.getpid()


def _close_open() -> None:
    """Registered when this module loads, so it runs after the supervisors' shutdown at exit
    (exit handlers run last registered first): closing a confiner kills what is left in its
    cgroups, which a supervisor still serving a thread's run took for a kill from outside."""
    for confiner, owner in list(_open.items()):
        if os.getpid() == owner:
            confiner.close()


at_exit(_close_open)
