"""cgroup v2: the unified hierarchy, used from the cgroup this process was started in.

The subtree ``<own cgroup>/<root>/<supervisor>/<attempt>`` enables cpu, memory, io
and pids. cgroup v2 forbids processes in a cgroup that hands controllers to its
children ("no internal processes"), so when the own cgroup is not the root and holds
this process, the process first moves into a leaf ``<supervisor>/supervisor`` (the
usual layout of a systemd service with ``Delegate=yes``). Other processes in the own
cgroup cannot be moved by us: then v2 is unavailable and says why.
"""

from __future__ import annotations

import errno
import os
import time
from typing import Any

from ...errors import CgroupError
from . import blockdev
from .base import (
    DEFAULT_ROOT,
    LimitEvents,
    OpenFiles,
    SupervisorName,
    cgroups_of,
    exited,
    kill_pids,
    parse_int,
    read,
    read_keyed,
    read_pids,
    rmdir_retry,
    subdirs,
    write,
)
from .limits import CgroupLimits

REQUIRED = ("cpu", "memory", "pids")
WANTED = ("cpu", "memory", "io", "pids")
LEAF = "supervisor"


def v2_location(
    mountinfo: str = "/proc/self/mountinfo", proc_cgroup: str = "/proc/self/cgroup"
) -> tuple[str, str] | None:
    """(mount point, own cgroup directory) of the unified hierarchy, or None."""
    try:
        mounts, own = read(mountinfo), read(proc_cgroup)
    except OSError:
        return None
    mount = None
    for line in mounts.splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        if right.split()[:1] == ["cgroup2"] and fields[3] == "/":
            mount = fields[4]
            break
    if mount is None:
        return None
    for line in own.splitlines():
        if line.startswith("0::"):
            rel = line[3:].strip()
            return mount, os.path.normpath(mount + rel) if rel != "/" else mount
    return None


def controllers_of(path: str) -> list[str]:
    """The controllers the cgroup ``path`` may hand to its children."""
    try:
        return read(f"{path}/cgroup.controllers").split()
    except OSError:
        return []


def _enable(path: str, controllers: list[str]) -> None:
    enabled = read(f"{path}/cgroup.subtree_control").split()
    missing = [c for c in controllers if c not in enabled]
    if missing:
        write(f"{path}/cgroup.subtree_control", " ".join(f"+{c}" for c in missing))


# The files that carry a cgroup's limits and settings (a worker whose state rewrote one is
# retired: the next state must not inherit, say, a CPU burst or memory.high).
_LIMIT_FILES = ("cpu.max", "cpu.max.burst", "cpu.weight", "cpu.idle", "cpu.uclamp.min", "cpu.uclamp.max",
                "cpuset.cpus", "cpuset.mems", "memory.max", "memory.high", "memory.low", "memory.min",
                "memory.swap.max", "memory.swap.high", "memory.zswap.max", "memory.oom.group", "pids.max",
                "io.max", "io.weight", "io.bfq.weight", "io.latency", "cgroup.max.descendants",
                "cgroup.max.depth", "cgroup.freeze")


class V2Cgroup:
    """One attempt's cgroup directory in the unified hierarchy."""

    def __init__(self, name: str, path: str, limits: CgroupLimits, relative: str = "") -> None:
        self.name = name
        self.path = path
        self.relative = relative  # its path as /proc/PID/cgroup says it
        self.limits = limits
        self.unenforced: dict[str, str] = {}
        self._removed = False
        self._files = OpenFiles()
        self._written: dict[str, str] = {}  # limit file -> what it held when remembered

    def remember_limits(self) -> None:
        self._written = self._files.contents([f"{self.path}/{name}" for name in _LIMIT_FILES])

    def limits_changed(self) -> list[str]:
        return self._files.changed(self._written)

    @property
    def procs_files(self) -> list[str]:
        return [f"{self.path}/cgroup.procs"]

    def child_spec(self) -> dict[str, Any]:
        return {"cgroup_procs": self.procs_files}

    def attach(self, pid: int) -> None:
        try:
            write(f"{self.path}/cgroup.procs", str(pid))
        except OSError as exc:
            raise CgroupError(f"cannot move pid {pid} into {self.path}: {exc.strerror}") from exc

    def pids(self) -> list[int]:
        return read_pids(f"{self.path}/cgroup.procs")

    def holds(self, pid: int) -> bool:
        return cgroups_of(pid).get("") == self.relative or exited(pid)

    def usage(self) -> dict[str, Any]:
        return self._usage(self._files.keyed(f"{self.path}/cpu.stat"))

    def cpu_seconds(self) -> float:
        return self._files.keyed(f"{self.path}/cpu.stat").get("usage_usec", 0) / 1e6

    def reading(self) -> tuple[dict[str, Any], LimitEvents]:
        """:meth:`usage` and :meth:`limit_events` at once (``cpu.stat`` read once)."""
        cpu = self._files.keyed(f"{self.path}/cpu.stat")
        return self._usage(cpu), self._limit_events(cpu)

    def _usage(self, cpu: dict[str, int]) -> dict[str, Any]:
        files, path = self._files, self.path
        out: dict[str, Any] = {
            "cpu_seconds": cpu.get("usage_usec", 0) / 1e6,
            "peak_memory_bytes": files.int(f"{path}/memory.peak"),
            "nr_throttled": cpu.get("nr_throttled", 0),
            "throttled_seconds": cpu.get("throttled_usec", 0) / 1e6,
        }
        peak = files.text(f"{path}/pids.peak")
        if peak is not None:
            out["pids_peak"] = parse_int(peak)
        io = files.text(f"{path}/io.stat")
        if io is not None:
            reads = writes = 0
            for line in io.splitlines():
                for item in line.split()[1:]:
                    key, _, value = item.partition("=")
                    if key == "rbytes":
                        reads += int(value)
                    elif key == "wbytes":
                        writes += int(value)
            out["io_read_bytes"] = reads
            out["io_write_bytes"] = writes
        return out

    def page_faults(self) -> int:
        return read_keyed(f"{self.path}/memory.stat").get("pgfault", 0)

    def limit_events(self) -> LimitEvents:
        return self._limit_events(self._files.keyed(f"{self.path}/cpu.stat"))

    def _limit_events(self, cpu: dict[str, int]) -> LimitEvents:
        files, path = self._files, self.path
        memory = files.keyed(f"{path}/memory.events")
        return LimitEvents(
            oom_kills=memory.get("oom_kill", 0),
            memory_limit_hits=memory.get("max", 0),
            pids_limit_hits=files.keyed(f"{path}/pids.events").get("max", 0),
            nr_throttled=cpu.get("nr_throttled", 0),
            throttled_seconds=cpu.get("throttled_usec", 0) / 1e6,
        )

    def task_count(self) -> int | None:
        try:
            return parse_int(read(f"{self.path}/pids.current"))
        except OSError:
            return None

    def kill(self) -> None:
        """SIGKILL every process in the cgroup and below it; wait until none is left."""
        _kill_cgroup(self.path)
        if not _wait_unpopulated(self.path):
            raise CgroupError(f"processes of cgroup {self.name} survived SIGKILL: {self.pids()}")

    def close_files(self) -> None:
        self._files.close()

    def remove(self) -> None:
        """Kill what is left (also in cgroups the attempt made below its own), delete it all."""
        if self._removed:
            return
        self._files.close()  # an open file keeps nothing busy, but its cgroup is going
        try:
            os.rmdir(self.path)  # the common case: nothing is left
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise CgroupError(f"cannot remove cgroup {self.path}: {exc.strerror}") from exc
            if _populated(self.path):
                self.kill()
            for entry in subdirs(self.path):
                _reap_tree(f"{self.path}/{entry}")
            rmdir_retry(self.path)
        self._removed = True


def _populated(path: str) -> bool:
    """Whether any live process is in ``path`` or below it (``cgroup.events``)."""
    return read_keyed(f"{path}/cgroup.events").get("populated", 0) == 1


def _wait_unpopulated(path: str, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    delay = 0.0005
    while _populated(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.02)
    return True


def _kill_cgroup(path: str) -> None:
    """``cgroup.kill`` (5.14+) kills atomically; older kernels freeze, kill, thaw."""
    if os.path.exists(f"{path}/cgroup.kill"):
        write(f"{path}/cgroup.kill", "1")
        return
    write(f"{path}/cgroup.freeze", "1")  # freezes the whole subtree
    try:
        for directory in _tree(path):
            kill_pids(read_pids(f"{directory}/cgroup.procs"))
    finally:
        write(f"{path}/cgroup.freeze", "0")


def _tree(path: str) -> list[str]:
    out = [path]
    for entry in subdirs(path):
        out.extend(_tree(f"{path}/{entry}"))
    return out


class V2Backend:
    """Attempt cgroups in the unified hierarchy, under ``<own cgroup>/<root>/<supervisor>/``."""

    name = "v2"

    def __init__(self, root: str = DEFAULT_ROOT, location: tuple[str, str] | None = None) -> None:
        found = location or v2_location()
        if found is None:
            raise CgroupError("no cgroup2 filesystem is mounted")
        self.mount, self.base = found
        available = controllers_of(self.base)
        missing = [c for c in REQUIRED if c not in available]
        if missing:
            raise CgroupError(
                f"cgroup v2 at {self.base} does not offer {missing} (has {available or 'none'}): "
                "delegate them (systemd Delegate=yes) or use cgroup v1"
            )
        self.controllers = [c for c in WANTED if c in available]
        self.root = root
        self.top = f"{self.base}/{root}"
        self.supervisor = SupervisorName.mine()
        self.sup = f"{self.top}/{self.supervisor}"
        self.leaf: str | None = None
        self._closed = False
        try:
            os.makedirs(self.sup, exist_ok=True)
        except OSError as exc:
            raise CgroupError(f"cannot create cgroup {self.sup}: {exc.strerror} (needs root or delegation)") from exc
        try:
            self._delegate()
        except BaseException:
            self.close()
            raise

    def _delegate(self) -> None:
        """Enable the controllers down to our directory, moving ourselves out of the way."""
        if self.base != self.mount and os.getpid() in read_pids(f"{self.base}/cgroup.procs"):
            self.leaf = f"{self.sup}/{LEAF}"
            os.makedirs(self.leaf, exist_ok=True)
            write(f"{self.leaf}/cgroup.procs", str(os.getpid()))
        try:
            _enable(self.base, self.controllers)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise CgroupError(
                    f"cannot enable {self.controllers} below {self.base}: other processes live in it "
                    "(cgroup v2 allows no processes in a cgroup that has child cgroups with controllers); "
                    "start the supervisor in a cgroup of its own (systemd Delegate=yes, or a scope)"
                ) from exc
            raise CgroupError(f"cannot enable {self.controllers} below {self.base}: {exc.strerror}") from exc
        _enable(self.top, self.controllers)
        _enable(self.sup, self.controllers)

    def owned_dirs(self) -> list[str]:
        """This supervisor's directory."""
        return [self.sup]

    def capabilities(self) -> dict[str, str]:
        caps = {
            "cpu_units": "CFS quota (cpu.max, period 100 ms)" if "cpu" in self.controllers else "not enforced",
            "memory_mb": "hard limit, no swap (memory.max + memory.swap.max=0); OOM kill of the whole attempt",
            "pids_max": "pids.max (default 4096, sandbox 128)",
            "gpu_units": "CUDA_VISIBLE_DEVICES only (no devices controller in v2)",
        }
        if "io" in self.controllers:
            caps["io_*_bps/io_*_iops"] = "io.max on the disk (buffered and direct IO)"
            caps["io_weight"] = "io.bfq.weight when the disk uses bfq; otherwise not enforced"
        return caps

    def create(self, name: str, limits: CgroupLimits, *, every_controller: bool = False) -> V2Cgroup:
        path = f"{self.sup}/{name}"
        handle = V2Cgroup(name, path, limits, "/" + os.path.relpath(path, self.mount).lstrip("/"))
        try:
            os.mkdir(path)
        except OSError as exc:
            raise CgroupError(f"cannot create cgroup {path}: {exc.strerror}") from exc
        try:
            self._write_limits(handle)
        except OSError as exc:
            rmdir_retry(path)
            raise CgroupError(f"cannot set limits on cgroup {path}: {exc.strerror} ({exc.filename or ''})") from exc
        except BaseException:
            rmdir_retry(path)
            raise
        return handle

    def apply(self, handle: V2Cgroup, limits: CgroupLimits) -> None:
        if limits == handle.limits:
            return  # written already (a parked child's cgroup, made with the likely limits)
        handle.limits = limits
        try:
            self._write_limits(handle)
        except OSError as exc:
            raise CgroupError(
                f"cannot set limits on cgroup {handle.path}: {exc.strerror} ({exc.filename or ''})"
            ) from exc

    def _write_limits(self, handle: V2Cgroup) -> None:
        limits, path = handle.limits, handle.path
        if limits.cpu_quota_us is not None:
            write(f"{path}/cpu.max", f"{limits.cpu_quota_us} {limits.cpu_period_us}")
        if limits.memory_bytes is not None:
            write(f"{path}/memory.max", str(limits.memory_bytes))
            if os.path.exists(f"{path}/memory.swap.max"):
                write(f"{path}/memory.swap.max", "0")
            write(f"{path}/memory.oom.group", "1")
        if limits.pids_max is not None:
            write(f"{path}/pids.max", str(limits.pids_max))
        if limits.io_throttles:
            if "io" not in self.controllers:
                handle.unenforced["io_throttle"] = "the io controller is not delegated here"
            for t in limits.io_throttles:
                parts = [
                    f"{key}={value}"
                    for key, value in (
                        ("rbps", t.read_bps),
                        ("wbps", t.write_bps),
                        ("riops", t.read_iops),
                        ("wiops", t.write_iops),
                    )
                    if value is not None
                ]
                if "io" in self.controllers:
                    write(f"{path}/io.max", f"{t.device} {' '.join(parts)}")
        if limits.io_weight is not None:
            disks = limits.io_weight_devices
            bfq = [d for d in disks if blockdev.scheduler(*d) == "bfq"]
            others = [f"{d[0]}:{d[1]} ({blockdev.scheduler(*d)})" for d in disks if d not in bfq]
            if others or not disks:
                handle.unenforced["io_weight"] = (
                    f"IO weights need the bfq scheduler; not enforced on {', '.join(others) or 'any disk'}"
                )
            if bfq and os.path.exists(f"{path}/io.bfq.weight"):
                write(f"{path}/io.bfq.weight", str(limits.io_weight))
        if limits.allow_devices is not None:
            handle.unenforced["devices"] = (
                "cgroup v2 has no devices files; GPUs are hidden by CUDA_VISIBLE_DEVICES only"
            )

    def reap_stale(self) -> int:
        count = 0
        try:
            entries = os.listdir(self.top)
        except OSError:
            return 0
        for entry in entries:
            owner = SupervisorName.parse(entry)
            if owner is None or owner.alive():
                continue
            _reap_tree(f"{self.top}/{entry}")
            count += 1
        return count

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for entry in subdirs(self.sup):
            if f"{self.sup}/{entry}" != self.leaf:
                _reap_tree(f"{self.sup}/{entry}")
        if self.leaf is not None:
            try:
                write(f"{self.base}/cgroup.procs", str(os.getpid()))
            except OSError:
                # The own cgroup now hands out controllers, so it takes no process back:
                # stay in the leaf; a later supervisor reaps it after this process exits.
                return
            rmdir_retry(self.leaf)
        rmdir_retry(self.sup)


def _reap_tree(path: str) -> None:
    """Kill everything in ``path`` and below (one recursive kill), remove it bottom-up."""
    if _populated(path):
        try:
            _kill_cgroup(path)
        except OSError:
            kill_pids(read_pids(f"{path}/cgroup.procs"))
        _wait_unpopulated(path, timeout=2.0)
    _remove_tree(path)


def _remove_tree(path: str) -> None:
    for entry in subdirs(path):
        _remove_tree(f"{path}/{entry}")
    try:
        rmdir_retry(path)
    except CgroupError:
        pass
