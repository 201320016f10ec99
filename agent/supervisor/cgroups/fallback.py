"""No cgroups: rlimits in the child and a psutil watchdog in the supervisor.

Used where this process can create no cgroup (not root, no delegation). The watchdog
samples each attempt's process tree every few milliseconds and SIGKILLs the tree when
its private (unshared) memory passes ``memory_mb`` or it has more processes than ``pids_max``.
The child leads a process group of its own, so the kill also reaches processes that
left the tree. It is best effort and says so: memory is checked between samples (a fast
allocation overshoots before the kill), a process that starts a new session escapes, and
CPU quotas and IO limits are not enforced at all.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import psutil

from .base import LimitEvents
from .limits import CgroupLimits

WATCH_INTERVAL = 0.01


class WatchedTree:
    """One attempt: the child's pid (once known) and what the watchdog saw of its tree."""

    def __init__(self, name: str, limits: CgroupLimits) -> None:
        self.name = name
        self.set_limits(limits)
        self.pid: int | None = None
        self._root: psutil.Process | None = None
        self._root_created = 0.0
        self._lock = threading.Lock()
        self._cpu_seconds = 0.0
        self._peak_rss = 0
        self._peak_pids = 0
        self._oom_kills = 0
        self._pids_hits = 0
        self._removed = False

    def set_limits(self, limits: CgroupLimits) -> None:
        self.limits = limits
        self.unenforced: dict[str, str] = {}
        if limits.cpu_quota_us is not None:
            self.unenforced["cpu_units"] = "no cgroups here: CPU quotas are not enforced"
        if limits.io_throttles or limits.io_weight is not None:
            self.unenforced["io"] = "no cgroups here: IO limits are not enforced"
        if limits.allow_devices is not None:
            self.unenforced["devices"] = "no cgroups here: GPUs are hidden by CUDA_VISIBLE_DEVICES only"

    @property
    def procs_files(self) -> list[str]:
        return []

    def child_spec(self) -> dict[str, Any]:
        # A process group of its own: a kill of the group also reaches processes that
        # were forked between two samples or left the tree when their parent died.
        spec: dict[str, Any] = {"process_group": True}
        if self.limits.memory_bytes is not None:
            # RLIMIT_DATA counts what the child inherited from its preloaded parent, so
            # the child sets it to what it has plus twice the limit: a backstop for a
            # single huge allocation that the sampling watchdog would see too late.
            spec["data_headroom"] = 2 * self.limits.memory_bytes
        return spec

    def attach(self, pid: int) -> None:
        try:
            root = psutil.Process(pid)
            self._root_created = root.create_time()
        except psutil.Error:
            return  # already gone: nothing to watch
        self._root = root
        self.pid = pid

    def _tree(self) -> list[psutil.Process]:
        """The child and its descendants, or [] once the child is gone.

        pids are reused fast (pid_max may be 32768): ``is_running`` compares the
        creation time, so a reaped child's pid never leads to someone else's tree.
        """
        root = self._root
        if root is None:
            return []
        try:
            if not root.is_running():
                return []
            return [root, *root.children(recursive=True)]
        except psutil.Error:
            return []

    def pids(self) -> list[int]:
        return [p.pid for p in self._tree() if _running(p)]

    def holds(self, pid: int) -> bool:
        return True  # no cgroup to leave: the watchdog follows the process tree

    def sample(self) -> None:
        """Measure the tree once and kill it when it is over a limit (watchdog thread)."""
        tree = [p for p in self._tree() if _running(p)]
        if not tree:
            return
        rss = cpu = 0.0
        for proc in tree:
            try:
                # Private memory only: pages a child shares with its preloaded parent are
                # charged to the parent, as a memory cgroup would charge them.
                rss += proc.memory_full_info().uss
                times = proc.cpu_times()
                cpu += times.user + times.system
            except psutil.Error:
                continue
        over_memory = self.limits.memory_bytes is not None and rss > self.limits.memory_bytes
        over_pids = self.limits.pids_max is not None and len(tree) > self.limits.pids_max
        with self._lock:
            self._cpu_seconds = max(self._cpu_seconds, cpu)
            self._peak_rss = max(self._peak_rss, int(rss))
            self._peak_pids = max(self._peak_pids, len(tree))
            if over_memory:
                self._oom_kills += 1
            if over_pids:
                self._pids_hits += 1
        if over_memory or over_pids:
            self.kill()

    def reset_peak(self) -> None:
        """Restart the peaks from what the next sample sees (for the next attempt of a worker)."""
        with self._lock:
            self._peak_rss = self._peak_pids = 0

    def usage(self) -> dict[str, Any]:
        with self._lock:
            return {
                "cpu_seconds": self._cpu_seconds,
                "peak_memory_bytes": self._peak_rss,
                "pids_peak": self._peak_pids,
            }

    def cpu_seconds(self) -> float:
        with self._lock:
            return self._cpu_seconds

    def page_faults(self) -> int | None:
        return None  # no cgroup counts them

    def reading(self) -> tuple[dict[str, Any], LimitEvents]:
        return self.usage(), self.limit_events()

    def task_count(self) -> int | None:
        return None  # nothing counts them but a walk of the tree: see pids()

    def remember_limits(self) -> None:
        return None

    def limits_changed(self) -> list[str]:
        return []  # the limits are the watchdog's own, and rlimits a worker checks itself

    def limit_events(self) -> LimitEvents:
        with self._lock:
            return LimitEvents(
                oom_kills=self._oom_kills,
                memory_limit_hits=self._oom_kills,
                pids_limit_hits=self._pids_hits,
            )

    def kill(self) -> None:
        """Stop the whole tree first (a stopped process cannot fork away), then SIGKILL it."""
        seen: dict[int, psutil.Process] = {}
        for _ in range(20):
            fresh = [p for p in self._tree() if p.pid not in seen]
            if not fresh:
                break
            for proc in fresh:
                seen[proc.pid] = proc
                try:
                    proc.send_signal(signal.SIGSTOP)
                except psutil.Error:
                    pass
        for proc in seen.values():
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass
        self._kill_group()

    def _kill_group(self) -> None:
        """SIGKILL the child's process group, unless its pid now names someone else."""
        if self.pid is None:
            return
        try:
            if psutil.Process(self.pid).create_time() != self._root_created:
                return  # the pid was reused: not our group
        except psutil.NoSuchProcess:
            pass  # the leader is gone; its pid stays reserved while the group has members
        except psutil.Error:
            return
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def remove(self) -> None:
        if not self._removed:
            self.kill()
            self._removed = True

    def close_files(self) -> None:
        return None  # it reads /proc as it goes: nothing is kept open


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class NoneBackend:
    """Enforcement without cgroups: what it can, and an honest list of what it cannot."""

    name = "none"

    def __init__(self, reason: str = "cgroups are not available", interval: float = WATCH_INTERVAL) -> None:
        self.reason = reason
        self.interval = interval
        self._watched: dict[str, WatchedTree] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def owned_dirs(self) -> list[str]:
        return []

    def capabilities(self) -> dict[str, str]:
        return {
            "cpu_units": f"not enforced ({self.reason})",
            "memory_mb": "psutil watchdog kills the tree above the limit (sampled every 10 ms); "
            "RLIMIT_DATA at twice the limit above the inherited size",
            "pids_max": "psutil watchdog kills the tree above the limit (sampled)",
            "io_*": f"not enforced ({self.reason})",
            "gpu_units": "CUDA_VISIBLE_DEVICES only",
        }

    def apply(self, handle: WatchedTree, limits: CgroupLimits) -> None:
        handle.set_limits(limits)

    def create(self, name: str, limits: CgroupLimits, *, every_controller: bool = False) -> WatchedTree:
        handle = _Tracked(self, name, limits)
        with self._lock:
            self._watched[name] = handle
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="agent-watchdog", daemon=True)
                self._thread.start()
        return handle

    def forget(self, name: str) -> None:
        with self._lock:
            self._watched.pop(name, None)

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                handles = list(self._watched.values())
            for handle in handles:
                handle.sample()

    def reap_stale(self) -> int:
        return 0

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        with self._lock:
            handles = list(self._watched.values())
            self._watched.clear()
        for handle in handles:
            handle.remove()


class _Tracked(WatchedTree):
    def __init__(self, backend: NoneBackend, name: str, limits: CgroupLimits) -> None:
        super().__init__(name, limits)
        self._backend = backend

    def remove(self) -> None:
        super().remove()
        self._backend.forget(self.name)
