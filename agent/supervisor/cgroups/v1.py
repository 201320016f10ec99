"""cgroup v1: one hierarchy per controller (``/sys/fs/cgroup/<controller>``).

Each attempt gets a directory in memory, cpuacct, pids, blkio and freezer, plus cpu
when it has a CPU quota and devices when GPUs must be hidden (a directory costs a
mkdir, a join and an rmdir per attempt); cpuset is left unrestricted and not joined.
Settings cgroupspy knows (memory, cpu, cpuacct) go through its controller objects; pids,
blkio throttles and the devices list, which it lacks or gets wrong, are written
directly. ``cgroupspy.trees.Tree`` is never used: it walks the whole hierarchy.
Creating an attempt's cgroups and writing its limits costs a few tenths of a millisecond.
"""

from __future__ import annotations

import errno
import os
import time
from typing import Any

from cgroupspy.controllers import CpuController, MemoryController

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
    read_pids,
    rmdir_retry,
    subdirs,
    wait_empty,
    write,
)
from .limits import CgroupLimits

REQUIRED = ("memory", "cpu", "cpuacct", "pids")
OPTIONAL = ("blkio", "freezer", "devices")


def v1_mounts(mountinfo: str = "/proc/self/mountinfo") -> dict[str, str]:
    """controller -> mount point of every cgroup v1 hierarchy (co-mounted ones share one)."""
    mounts: dict[str, str] = {}
    try:
        text = read(mountinfo)
    except OSError:
        return mounts
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if len(rfields) < 3 or rfields[0] != "cgroup":
            continue
        for option in rfields[2].split(","):
            if option in REQUIRED or option in OPTIONAL or option == "cpuset":
                mounts.setdefault(option, fields[4])
    return mounts


class _At:
    """The one thing a cgroupspy controller needs from a node: its directory."""

    __slots__ = ("full_path",)

    def __init__(self, path: str) -> None:
        self.full_path = path.encode()


def _memory(path: str) -> MemoryController:
    return MemoryController(_At(path))


def _cpu(path: str) -> CpuController:
    return CpuController(_At(path))


# The files that carry a cgroup's limits, by controller.
# The files that carry a cgroup's limits and settings, by controller (a worker whose
# state rewrote one is retired: the next state must not inherit, say, oom_kill_disable).
_LIMIT_FILES = {
    "memory": ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes", "memory.swappiness",
               "memory.oom_control", "memory.soft_limit_in_bytes", "memory.kmem.limit_in_bytes",
               "memory.kmem.tcp.limit_in_bytes", "memory.move_charge_at_immigrate", "memory.use_hierarchy"),
    "cpu": ("cpu.cfs_quota_us", "cpu.cfs_period_us", "cpu.cfs_burst_us", "cpu.shares", "cpu.idle",
            "cpu.rt_runtime_us", "cpu.rt_period_us"),
    "cpuset": ("cpuset.cpus", "cpuset.mems"),
    "pids": ("pids.max",),
    "blkio": ("blkio.throttle.read_bps_device", "blkio.throttle.write_bps_device",
              "blkio.throttle.read_iops_device", "blkio.throttle.write_iops_device", "blkio.bfq.weight",
              "blkio.weight", "blkio.weight_device", "blkio.bfq.weight_device"),
    "devices": ("devices.list",),
    "freezer": ("freezer.state",),
}


class V1Cgroup:
    """One attempt's directories, one per controller hierarchy."""

    def __init__(self, name: str, dirs: dict[str, str], limits: CgroupLimits, relative: str = "") -> None:
        self.name = name
        self.dirs = dirs
        self.relative = relative  # its path in each hierarchy (as /proc/PID/cgroup says it)
        self.limits = limits
        self.unenforced: dict[str, str] = {}
        self._removed = False
        self._files = OpenFiles()
        self._written: dict[str, str] = {}  # limit file -> what it held when remembered

    def remember_limits(self) -> None:
        self._written = self._files.contents(
            [f"{self.dirs[controller]}/{name}" for controller, names in _LIMIT_FILES.items()
             if controller in self.dirs for name in names])

    def limits_changed(self) -> list[str]:
        return self._files.changed(self._written)

    @property
    def procs_files(self) -> list[str]:
        seen: list[str] = []
        for path in self.dirs.values():
            procs = f"{path}/cgroup.procs"
            if procs not in seen:
                seen.append(procs)
        return seen

    def child_spec(self) -> dict[str, Any]:
        return {"cgroup_procs": self.procs_files}

    def attach(self, pid: int) -> None:
        for procs in self.procs_files:
            try:
                write(procs, str(pid))
            except OSError as exc:
                raise CgroupError(f"cannot move pid {pid} into {procs}: {exc.strerror}") from exc

    def pids(self) -> list[int]:
        return read_pids(f"{self.dirs['memory']}/cgroup.procs")

    def holds(self, pid: int) -> bool:
        where = cgroups_of(pid)
        return all(where.get(controller) == self.relative for controller in self.dirs) or exited(pid)

    # --- reading back ------------------------------------------------------------------

    def usage(self) -> dict[str, Any]:
        return self._usage(self._cpu_stat())

    def reading(self) -> tuple[dict[str, Any], LimitEvents]:
        """:meth:`usage` and :meth:`limit_events` at once (``cpu.stat`` read once)."""
        cpu_stat = self._cpu_stat()
        return self._usage(cpu_stat), self._limit_events(cpu_stat)

    def task_count(self) -> int | None:
        text = self._files.text(f"{self.dirs['pids']}/pids.current")
        return None if text is None else parse_int(text)

    def _usage(self, cpu_stat: dict[str, int]) -> dict[str, Any]:
        files, dirs = self._files, self.dirs
        out: dict[str, Any] = {
            "cpu_seconds": self.cpu_seconds(),
            "peak_memory_bytes": files.int(f"{dirs['memory']}/memory.max_usage_in_bytes"),
            "nr_throttled": cpu_stat.get("nr_throttled", 0),
            "throttled_seconds": cpu_stat.get("throttled_time", 0) / 1e9,
        }
        peak = files.text(f"{dirs['pids']}/pids.peak")
        if peak is not None:
            out["pids_peak"] = parse_int(peak)
        if "blkio" in dirs:
            reads = writes = 0
            for line in (files.text(f"{dirs['blkio']}/blkio.throttle.io_service_bytes") or "").splitlines():
                parts = line.split()
                if len(parts) == 3 and parts[1] == "Read":
                    reads += int(parts[2])
                elif len(parts) == 3 and parts[1] == "Write":
                    writes += int(parts[2])
            out["io_read_bytes"] = reads
            out["io_write_bytes"] = writes
        return out

    def cpu_seconds(self) -> float:
        return self._files.int(f"{self.dirs['cpuacct']}/cpuacct.usage") / 1e9

    def reset_peak(self) -> None:
        """Restart the peak memory from the usage now (for the next attempt of a worker).

        Nothing to restart once the cgroup is gone: a worker that went idle at once after its
        attempt's report is reaped, its cgroup removed, before the supervisor reads that report
        (the kernel then answers ``ENODEV`` through the open file).
        """
        try:
            self._files.write(f"{self.dirs['memory']}/memory.max_usage_in_bytes", "0")
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENODEV):
                raise

    def _cpu_stat(self) -> dict[str, int]:
        cpu = self.dirs.get("cpu")
        return self._files.keyed(f"{cpu}/cpu.stat") if cpu else {}

    def page_faults(self) -> int:
        return self._files.keyed(f"{self.dirs['memory']}/memory.stat").get("total_pgfault", 0)

    def limit_events(self) -> LimitEvents:
        return self._limit_events(self._cpu_stat())

    def _limit_events(self, cpu_stat: dict[str, int]) -> LimitEvents:
        files, memory = self._files, self.dirs["memory"]
        return LimitEvents(
            oom_kills=files.keyed(f"{memory}/memory.oom_control").get("oom_kill", 0),
            memory_limit_hits=files.int(f"{memory}/memory.failcnt"),
            pids_limit_hits=files.keyed(f"{self.dirs['pids']}/pids.events").get("max", 0),
            nr_throttled=cpu_stat.get("nr_throttled", 0),
            throttled_seconds=cpu_stat.get("throttled_time", 0) / 1e9,
        )

    # --- teardown ----------------------------------------------------------------------

    def kill(self) -> None:
        """Freeze (so nothing forks meanwhile), SIGKILL everything, thaw, wait until empty."""
        freezer = self.dirs.get("freezer")
        procs = self.procs_files
        frozen = False
        if freezer:
            try:
                frozen = _freeze(freezer)
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.ENODEV):
                    raise
                # Removed already (remove() took it while it was empty): what is left of the
                # attempt is in the other controllers' cgroups, killed without a freeze.
                freezer = None
        try:
            for _ in range(100):  # without a freezer, repeat until no fork outruns the kills
                pids = sorted({pid for f in procs for pid in read_pids(f)})
                if not pids:
                    break
                kill_pids(pids)
                if frozen:
                    break
        finally:
            if freezer:
                _thaw(freezer)
        if not wait_empty(procs):
            raise CgroupError(f"processes of cgroup {self.name} survived SIGKILL: {self.pids()}")

    def close_files(self) -> None:
        self._files.close()

    def remove(self) -> None:
        """Kill what is left (also in cgroups the attempt made below its own), delete it all."""
        if self._removed:
            return
        self._files.close()  # an open file keeps nothing busy, but its cgroup is going
        busy = [path for path in set(self.dirs.values()) if not _try_rmdir(path)]
        if busy:  # processes (or nested cgroups) are left: the slow path
            if any(read_pids(f) for f in self.procs_files):
                self.kill()
            for path in busy:
                for entry in subdirs(path):
                    _reap_tree(f"{path}/{entry}")
                rmdir_retry(path)
        self._removed = True


def _try_rmdir(path: str) -> bool:
    """rmdir ``path``; False when it is busy (still has processes or child cgroups)."""
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise CgroupError(f"cannot remove cgroup {path}: {exc.strerror}") from exc
        return False
    return True


def _freeze(freezer_dir: str, timeout: float = 2.0) -> bool:
    """Freeze the cgroup; True once the kernel reports every task frozen."""
    state = f"{freezer_dir}/freezer.state"
    write(state, "FROZEN")
    deadline = time.monotonic() + timeout
    delay = 0.0002
    while read(state).strip() != "FROZEN":
        if time.monotonic() > deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.01)
    return True


def _thaw(freezer_dir: str) -> None:
    try:
        write(f"{freezer_dir}/freezer.state", "THAWED")
    except OSError:
        pass  # removed meanwhile


class V1Backend:
    """Attempt cgroups on the v1 hierarchies, under ``<mount>/<root>/<supervisor>/``."""

    name = "v1"

    def __init__(self, root: str = DEFAULT_ROOT, mounts: dict[str, str] | None = None) -> None:
        self.root = root
        self.mounts = v1_mounts() if mounts is None else mounts
        missing = [c for c in REQUIRED if c not in self.mounts]
        if missing:
            raise CgroupError(f"cgroup v1 controllers {missing} are not mounted")
        # Writing devices.allow / devices.deny needs CAP_SYS_ADMIN: a delegated (non-root)
        # supervisor leaves devices to whoever delegated its cgroup (agentd pins a job's GPUs).
        self.controllers = [
            c for c in REQUIRED + OPTIONAL if c in self.mounts and (c != "devices" or os.geteuid() == 0)
        ]
        self.supervisor = SupervisorName.mine()
        self.sup_dirs: dict[str, str] = {}
        for controller in self.controllers:
            path = f"{self.mounts[controller]}/{root}/{self.supervisor}"
            try:
                os.makedirs(path, exist_ok=True)
            except OSError as exc:
                self._remove_sup_dirs()
                raise CgroupError(f"cannot create cgroup {path}: {exc.strerror} (needs root)") from exc
            self.sup_dirs[controller] = path
        self._closed = False

    def owned_dirs(self) -> list[str]:
        """This supervisor's directories (one per controller hierarchy)."""
        return list(self.sup_dirs.values())

    def capabilities(self) -> dict[str, str]:
        caps = {
            "cpu_units": "CFS quota (cpu.cfs_quota_us, period 100 ms)",
            "memory_mb": "hard limit, no swap (memory.limit_in_bytes + memory.memsw.limit_in_bytes); OOM kill",
            "pids_max": "pids.max (default 4096, sandbox 128)",
        }
        if "blkio" in self.mounts:
            caps["io_*_bps/io_*_iops"] = "blkio.throttle.* on the disk (direct IO only on v1)"
            caps["io_weight"] = "blkio.bfq.weight when the disk uses bfq; otherwise not enforced"
        if "devices" in self.mounts:
            caps["gpu_units"] = "devices cgroup denies other GPUs' /dev/nvidia* + CUDA_VISIBLE_DEVICES"
        return caps

    def create(self, name: str, limits: CgroupLimits, *, every_controller: bool = False) -> V1Cgroup:
        """The cgroup ``name`` with ``limits``; ``every_controller`` makes it in every hierarchy
        (a cgroup delegated to a supervisor of its own needs them all)."""
        controllers = [c for c in self.controllers if every_controller or self._needed(c, limits)]
        dirs: dict[str, str] = {}
        some = self.controllers[0]
        relative = "/" + os.path.normpath(f"{self.sup_dirs[some][len(self.mounts[some]):]}/{name}").lstrip("/")
        handle = V1Cgroup(name, dirs, limits, relative)
        try:
            for controller in controllers:
                path = f"{self.sup_dirs[controller]}/{name}"
                if path not in dirs.values():  # co-mounted controllers share a directory
                    os.mkdir(path)
                dirs[controller] = path
            self._write_limits(handle)
        except OSError as exc:
            self._undo(dirs)
            raise CgroupError(
                f"cannot set up cgroup {name}: {exc.strerror} ({getattr(exc, 'filename', '') or ''})"
            ) from exc
        except BaseException:
            self._undo(dirs)
            raise
        return handle

    def apply(self, handle: V1Cgroup, limits: CgroupLimits) -> None:
        missing = [c for c in self.controllers if self._needed(c, limits) and c not in handle.dirs]
        if missing:
            raise CgroupError(f"cgroup {handle.name} is not in {missing}, which these limits need")
        if limits == handle.limits:
            return  # written already (a parked child's cgroup, made with the likely limits)
        handle.limits = limits
        try:
            self._write_limits(handle)
        except OSError as exc:
            raise CgroupError(
                f"cannot set limits on cgroup {handle.name}: {exc.strerror} ({exc.filename or ''})"
            ) from exc

    @staticmethod
    def _needed(controller: str, limits: CgroupLimits) -> bool:
        """cpu only carries a quota and devices an allow list; without them, not joined."""
        if controller == "cpu":
            return limits.cpu_quota_us is not None
        if controller == "devices":
            return limits.allow_devices is not None
        return True

    def _write_limits(self, handle: V1Cgroup) -> None:
        limits, dirs = handle.limits, handle.dirs
        if limits.memory_bytes is not None:
            memory = _memory(dirs["memory"])
            if os.path.exists(f"{dirs['memory']}/memory.memsw.limit_in_bytes"):
                # memory+swap may never be below memory: raise it first, lower it last (a
                # parked child's cgroup is made with a default limit, then given the attempt's).
                if limits.memory_bytes > memory.limit_in_bytes:
                    memory.memsw_limit_in_bytes = limits.memory_bytes
                    memory.limit_in_bytes = limits.memory_bytes
                else:
                    memory.limit_in_bytes = limits.memory_bytes
                    memory.memsw_limit_in_bytes = limits.memory_bytes
            else:
                memory.limit_in_bytes = limits.memory_bytes
                memory.swappiness = 0
        if limits.cpu_quota_us is not None:
            cpu = _cpu(dirs["cpu"])
            if limits.cpu_period_us != 100_000:
                cpu.cfs_period_us = limits.cpu_period_us
            cpu.cfs_quota_us = limits.cpu_quota_us
        if limits.pids_max is not None:
            write(f"{dirs['pids']}/pids.max", str(limits.pids_max))
        if limits.io_throttles:
            if "blkio" not in dirs:
                handle.unenforced["io_throttle"] = "the blkio controller is not mounted"
            else:
                for t in limits.io_throttles:
                    for fname, value in (
                        ("read_bps_device", t.read_bps),
                        ("write_bps_device", t.write_bps),
                        ("read_iops_device", t.read_iops),
                        ("write_iops_device", t.write_iops),
                    ):
                        if value is not None:
                            write(f"{dirs['blkio']}/blkio.throttle.{fname}", f"{t.device} {value}")
        if limits.io_weight is not None:
            self._write_io_weight(handle)
        if limits.allow_devices is not None and "devices" not in dirs:
            handle.unenforced["devices"] = "the devices cgroup needs root; GPUs are hidden by CUDA_VISIBLE_DEVICES"
        elif limits.allow_devices is not None:  # closed policy: deny all, then allow the list
            write(f"{dirs['devices']}/devices.deny", "a")
            for rule in limits.allow_devices:
                write(f"{dirs['devices']}/devices.allow", rule)

    def _write_io_weight(self, handle: V1Cgroup) -> None:
        limits, dirs = handle.limits, handle.dirs
        disks = limits.io_weight_devices
        bfq = [d for d in disks if blockdev.scheduler(*d) == "bfq"]
        others = [f"{d[0]}:{d[1]} ({blockdev.scheduler(*d)})" for d in disks if d not in bfq]
        if others or not disks:
            handle.unenforced["io_weight"] = (
                f"IO weights need the bfq scheduler; not enforced on {', '.join(others) or 'any disk'}"
            )
        if bfq and "blkio" in dirs and os.path.exists(f"{dirs['blkio']}/blkio.bfq.weight"):
            write(f"{dirs['blkio']}/blkio.bfq.weight", str(limits.io_weight))

    def _undo(self, dirs: dict[str, str]) -> None:
        for path in set(dirs.values()):
            try:
                os.rmdir(path)
            except OSError:
                pass

    def reap_stale(self) -> int:
        dead: set[str] = set()
        # The freezer hierarchy first: its processes are frozen before they are killed,
        # so none exits and hands its pid to someone else between reading and killing.
        for controller in sorted(self.controllers, key=lambda c: c != "freezer"):
            base = f"{self.mounts[controller]}/{self.root}"
            try:
                entries = os.listdir(base)
            except OSError:
                continue
            for entry in entries:
                owner = SupervisorName.parse(entry)
                if owner is None or owner.alive():
                    continue
                _reap_tree(f"{base}/{entry}", freeze=controller == "freezer")
                dead.add(entry)
        return len(dead)

    def close(self) -> None:
        if self._closed:
            return
        for controller in sorted(self.sup_dirs, key=lambda c: c != "freezer"):
            _reap_tree(self.sup_dirs[controller], freeze=controller == "freezer")
        self._closed = True

    def _remove_sup_dirs(self) -> None:
        for path in self.sup_dirs.values():
            _reap_tree(path)


def _reap_tree(path: str, freeze: bool = False) -> None:
    """Kill everything in ``path`` and below, then remove the directories bottom-up.

    With ``freeze`` (a freezer hierarchy) the whole subtree is frozen first.
    """
    tree = _walk(path)
    if any(read_pids(f"{d}/cgroup.procs") for d in tree):
        frozen = freeze and _freeze(path)
        try:
            for _ in range(50):
                pids = [pid for d in tree for pid in read_pids(f"{d}/cgroup.procs")]
                if not pids:
                    break
                kill_pids(pids)
                if frozen:
                    break
                wait_empty([f"{d}/cgroup.procs" for d in tree], timeout=0.1)
        finally:
            if freeze:
                # Every level, not only the top: a cgroup below may have been frozen on its own
                # by a supervisor killed between freezing and thawing it, and a frozen process
                # never dies of its SIGKILL (nor does the zygote waiting for it).
                for directory in tree:
                    _thaw(directory)
        wait_empty([f"{d}/cgroup.procs" for d in tree], timeout=2.0)
    for directory in reversed(tree):  # children before parents
        try:
            rmdir_retry(directory)
        except CgroupError:
            pass


def _walk(path: str) -> list[str]:
    """``path`` and every cgroup below it, parents before children."""
    out = [path]
    for entry in subdirs(path):
        out.extend(_walk(f"{path}/{entry}"))
    return out
