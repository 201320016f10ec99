"""``agent doctor``: what this machine can really enforce, found by trying it.

Nothing here is assumed from the kernel version or a config file. Each cgroup
controller is probed by creating a throwaway cgroup of our own
(``agent-doctor-<pid>-<random>``), writing a limit, reading it back and removing the
cgroup again. The sandbox is probed one ingredient at a time (namespaces, the
read-only view, the keyring, the seccomp filter), each in a forked child, then whole,
and by running the interpreter as a sandbox uid. GPUs come from the NVML inventory,
with the reason when there are none.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import platform
import secrets
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from ..devices import GPUDevice, GPUInventory, machine_inventory
from .cgroups.detect import (
    BACKEND_ENV,
    CORE_CONTROLLERS,
    CgroupMount,
    choose_backend,
    parse_mountinfo,
    with_v2_controllers,
)
from .sandbox import UidPool, configured_uids, users_in

# The controllers the v2 backend enables for its subtree (cpuset is not used on v2).
V2_CONTROLLERS = ("cpu", "memory", "io", "pids")
PROBE_MEMORY = 64 * 1024 * 1024
LIMIT_ORDER = (
    "cpu", "memory", "swap", "pids", "io_weight", "io_throttle", "cpuset", "devices", "freezer", "cpu_accounting",
)


@dataclass(frozen=True)
class Limit:
    """Whether one kind of limit is enforceable here, and how or why not."""

    name: str
    enforceable: bool
    detail: str


@dataclass(frozen=True)
class Check:
    """One finding of the sandbox probe."""

    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class Report:
    """Everything ``agent doctor`` found."""

    cgroup_backend: str  # "v1", "v2" or "none"
    cgroup_reason: str
    mounts: list[CgroupMount]
    limits: list[Limit]
    gpus: list[GPUDevice]
    gpu_reason: str | None
    sandbox_available: bool
    sandbox: list[Check]
    versions: dict[str, str] = field(default_factory=dict)
    ray: list[Limit] = field(default_factory=list)
    """What holds for a state with isolation='ray' (empty when Ray is not installed)."""

    def limit(self, name: str) -> Limit:
        """The finding for limit ``name`` (KeyError when it was not probed)."""
        for item in self.limits:
            if item.name == name:
                return item
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- probing a throwaway cgroup -----------------------------------------------------


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _probe(name: str, how: str, attempt: Callable[[], bool]) -> Limit:
    try:
        ok = attempt()
    except (OSError, ValueError) as exc:
        return Limit(name, False, f"{how}: {getattr(exc, 'strerror', None) or exc}")
    return Limit(name, ok, how if ok else f"{how}: the value did not read back")


def _disks() -> list[tuple[str, str, str]]:
    """(name, major:minor, active scheduler) of each real disk."""
    disks = []
    for name in sorted(os.listdir("/sys/block")):
        if name.startswith(("loop", "ram", "zram", "sr")):
            continue
        base = f"/sys/block/{name}"
        try:
            dev = _read(f"{base}/dev")
            line = _read(f"{base}/queue/scheduler")
        except OSError:
            continue
        active = next((w[1:-1] for w in line.split() if w.startswith("[")), line)
        disks.append((name, dev, active))
    return disks


def _swap_total_kb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("SwapTotal:"):
                return int(line.split()[1])
    return 0


def _swap_note() -> str:
    return "there is no swap on this machine" if _swap_total_kb() == 0 else "swap is on"


def _weights_apply(disks: list[tuple[str, str, str]]) -> bool:
    return any(sched == "bfq" for _, _, sched in disks)


def _weight_reason(disks: list[tuple[str, str, str]], file: str) -> str:
    scheds = ", ".join(f"{n} uses {s}" for n, _, s in disks) or "no disks found"
    return f"{file} has no effect here ({scheds}; proportional IO weights need the bfq scheduler)"


def _v1_limits(controller: str, cg: str, parent: str) -> list[Limit]:
    f = lambda name: os.path.join(cg, name)  # noqa: E731
    if controller == "memory":
        def memory() -> bool:
            _write(f("memory.limit_in_bytes"), str(PROBE_MEMORY))
            return int(_read(f("memory.limit_in_bytes"))) == PROBE_MEMORY

        def swap() -> bool:
            _write(f("memory.memsw.limit_in_bytes"), str(PROBE_MEMORY))
            return int(_read(f("memory.memsw.limit_in_bytes"))) == PROBE_MEMORY

        found = [_probe("memory", "memory.limit_in_bytes (OOM kills read from memory.oom_control)", memory)]
        if os.path.exists(f("memory.memsw.limit_in_bytes")):
            found.append(_probe("swap", f"memory.memsw.limit_in_bytes caps memory+swap ({_swap_note()})", swap))
        else:
            found.append(Limit("swap", False, f"no memory.memsw.* (swap accounting off; {_swap_note()})"))
        return found
    if controller == "cpu":
        def cpu() -> bool:
            _write(f("cpu.cfs_period_us"), "100000")
            _write(f("cpu.cfs_quota_us"), "50000")
            return _read(f("cpu.cfs_quota_us")) == "50000"

        return [_probe("cpu", "cpu.cfs_quota_us / cpu.cfs_period_us (CFS quota)", cpu)]
    if controller == "cpuacct":
        return [_probe("cpu_accounting", "cpuacct.usage", lambda: _read(f("cpuacct.usage")).isdigit())]
    if controller == "pids":
        def pids() -> bool:
            _write(f("pids.max"), "64")
            return _read(f("pids.max")) == "64"

        return [_probe("pids", "pids.max (fork fails with EAGAIN)", pids)]
    if controller == "blkio":
        disks = _disks()
        weight_file = next((w for w in ("blkio.weight", "blkio.bfq.weight") if os.path.exists(f(w))), None)
        if weight_file and _weights_apply(disks):
            def weight() -> bool:
                _write(f(weight_file), "500")
                return _read(f(weight_file)).split()[-1] == "500"

            found = [_probe("io_weight", f"{weight_file} (disks on bfq)", weight)]
        else:
            found = [Limit("io_weight", False, _weight_reason(disks, weight_file or "blkio.weight"))]
        if disks:
            dev = disks[0][1]

            def throttle() -> bool:
                _write(f("blkio.throttle.write_bps_device"), f"{dev} 1048576")
                return f"{dev} 1048576" in _read(f("blkio.throttle.write_bps_device"))

            how = "blkio.throttle.*_device (v1 throttles direct IO only; buffered writeback is not attributed)"
            found.append(_probe("io_throttle", how, throttle))
        else:
            found.append(Limit("io_throttle", False, "no disk found under /sys/block to throttle"))
        return found
    if controller == "cpuset":
        def cpuset() -> bool:
            cpus = _read(os.path.join(parent, "cpuset.cpus"))
            _write(f("cpuset.cpus"), cpus)
            _write(f("cpuset.mems"), _read(os.path.join(parent, "cpuset.mems")))
            return _read(f("cpuset.cpus")) == cpus

        return [_probe("cpuset", "cpuset.cpus / cpuset.mems", cpuset)]
    if controller == "devices":
        # A deny entry is not listed while the default is allow, so probe the other mode:
        # deny everything, then allow one device node, and read the list back.
        def devices() -> bool:
            _write(f("devices.deny"), "a")
            _write(f("devices.allow"), "c 195:0 rwm")
            return _read(f("devices.list")).splitlines() == ["c 195:0 rwm"]

        return [_probe("devices", "devices.deny / devices.allow (GPU device nodes, major 195)", devices)]
    if controller == "freezer":
        def freezer() -> bool:
            _write(f("freezer.state"), "FROZEN")
            frozen = _read(f("freezer.state")) == "FROZEN"
            _write(f("freezer.state"), "THAWED")
            return frozen

        return [_probe("freezer", "freezer.state (pause and resume)", freezer)]
    return []


def v2_own_cgroup(mount: CgroupMount, proc_cgroup: str = "/proc/self/cgroup") -> str:
    """The directory of this process's own cgroup in the unified hierarchy."""
    for line in _read(proc_cgroup).splitlines():
        if line.startswith("0::"):
            rel = line[3:].strip().lstrip("/")
            return os.path.join(mount.mountpoint, rel) if rel else mount.mountpoint
    return mount.mountpoint


def _v2_enable(mount: CgroupMount, own: str) -> str:
    """Enable the wanted controllers for children of ``own`` as the v2 backend does; say what changed.

    Only in the root cgroup, which the no-internal-processes rule exempts; elsewhere the
    backend first moves the supervisor into a leaf, which a probe must not do.
    """
    if own != mount.mountpoint:
        return ""
    available = set(_read(os.path.join(own, "cgroup.controllers")).split())
    enabled = set(_read(os.path.join(own, "cgroup.subtree_control")).split())
    missing = [c for c in V2_CONTROLLERS if c in available and c not in enabled]
    if not missing:
        return ""
    try:
        _write(os.path.join(own, "cgroup.subtree_control"), " ".join(f"+{c}" for c in missing))
    except OSError as exc:
        return f"; enabling {', '.join(missing)} in {own}/cgroup.subtree_control failed: {exc.strerror}"
    return f"; enabled {', '.join(missing)} in {own}/cgroup.subtree_control, as the v2 backend does"


def _v2_limits(own: str, cg: str) -> list[Limit]:
    f = lambda name: os.path.join(cg, name)  # noqa: E731
    enabled = set(_read(os.path.join(own, "cgroup.subtree_control")).split())
    found: list[Limit] = []

    def not_enabled(name: str, controller: str) -> Limit:
        return Limit(
            name,
            False,
            f"controller {controller} is not enabled in {own}/cgroup.subtree_control: start the "
            "supervisor in a delegated cgroup (systemd Delegate=yes) so it can enable it",
        )

    def probe_file(name: str, controller: str, path: str, value: str, how: str) -> None:
        if controller not in enabled:
            found.append(not_enabled(name, controller))
            return

        def attempt() -> bool:
            _write(f(path), value)
            back = _read(f(path)).split()
            return all(token in back for token in value.split())

        found.append(_probe(name, how, attempt))

    probe_file("memory", "memory", "memory.max", str(PROBE_MEMORY), "memory.max (OOM kills read from memory.events)")
    if "memory" in enabled and os.path.exists(f("memory.swap.max")):
        probe_file("swap", "memory", "memory.swap.max", "0", f"memory.swap.max ({_swap_note()})")
    else:
        found.append(Limit("swap", False, f"no memory.swap.max ({_swap_note()})"))
    probe_file("cpu", "cpu", "cpu.max", "50000 100000", "cpu.max (CFS quota)")
    probe_file("pids", "pids", "pids.max", "64", "pids.max (fork fails with EAGAIN)")
    disks = _disks()
    if "io" not in enabled:
        found.append(not_enabled("io_weight", "io"))
        found.append(not_enabled("io_throttle", "io"))
    else:
        if os.path.exists(f("io.bfq.weight")) and _weights_apply(disks):
            probe_file("io_weight", "io", "io.bfq.weight", "default 500", "io.bfq.weight (disks on bfq)")
        else:
            found.append(Limit("io_weight", False, _weight_reason(disks, "io.bfq.weight")))
        if disks:
            probe_file("io_throttle", "io", "io.max", f"{disks[0][1]} wbps=1048576", "io.max (direct and buffered IO)")
    if "cpuset" in enabled:
        probe_file("cpuset", "cpuset", "cpuset.cpus", _read("/sys/devices/system/cpu/online"), "cpuset.cpus")
    else:
        found.append(Limit("cpuset", False, "cpuset is not used on cgroup v2 (cpu.max limits CPU time)"))
    found.append(Limit("devices", False, "cgroup v2 has no devices files (it needs an eBPF program); "
                       "GPUs are pinned by CUDA_VISIBLE_DEVICES only"))

    def freeze() -> bool:
        _write(f("cgroup.freeze"), "1")
        frozen = _read(f("cgroup.freeze")) == "1"
        _write(f("cgroup.freeze"), "0")
        return frozen

    found.append(_probe("freezer", "cgroup.freeze (pause and resume)", freeze))
    return found


def _throwaway(parent: str) -> str:
    path = os.path.join(parent, f"agent-doctor-{os.getpid()}-{secrets.token_hex(4)}")
    os.mkdir(path)
    return path


def probe_cgroups(mounts: Sequence[CgroupMount], forced: str | None = None) -> tuple[str, str, list[Limit]]:
    """Decide the backend and probe every limit it offers in throwaway cgroups."""
    backend, reason = choose_backend(mounts, forced)
    limits: list[Limit] = []
    if backend == "v2":
        mount = next(m for m in mounts if m.version == 2 and all(c in m.controllers for c in CORE_CONTROLLERS))
        own = v2_own_cgroup(mount)
        try:
            reason += _v2_enable(mount, own)
            cg = _throwaway(own)
        except OSError as exc:
            return "none", f"{reason}, but creating a cgroup in {own} failed: {exc.strerror}", _no_cgroup_limits()
        try:
            limits = _v2_limits(own, cg)
        finally:
            os.rmdir(cg)
    elif backend == "v1":
        failures: dict[str, list[str]] = {}  # error -> hierarchies
        for mount in mounts:
            if mount.version != 1:
                continue
            try:
                cg = _throwaway(mount.mountpoint)
            except OSError as exc:
                failures.setdefault(str(exc.strerror), []).append(",".join(mount.controllers))
                continue
            try:
                for controller in mount.controllers:
                    limits.extend(_v1_limits(controller, cg, mount.mountpoint))
            finally:
                os.rmdir(cg)
        failed = "; ".join(f"{error} in {', '.join(where)}" for error, where in failures.items())
        names = {item.name for item in limits}
        if not all(c in names for c in CORE_CONTROLLERS):
            reason += (
                f", but creating cgroups failed ({failed}): run as root, or under a delegated cgroup "
                "(agentd with Delegate=yes)"
            )
            return "none", reason, _no_cgroup_limits()
        if failures:
            reason += f"; cannot create cgroups ({failed})"
    else:
        limits = _no_cgroup_limits()
    limits.sort(key=lambda item: LIMIT_ORDER.index(item.name) if item.name in LIMIT_ORDER else len(LIMIT_ORDER))
    core_ok = all(any(item.name == c and item.enforceable for item in limits) for c in CORE_CONTROLLERS)
    if not core_ok:
        broken = [c for c in CORE_CONTROLLERS if not any(i.name == c and i.enforceable for i in limits)]
        reason += f"; probing found {', '.join(broken)} not enforceable"
    return backend, reason, limits


def _no_cgroup_limits() -> list[Limit]:
    why = "no usable cgroups: only RLIMIT_AS/RLIMIT_NPROC and a psutil watchdog apply"
    return [Limit(name, False, why) for name in ("memory", "cpu", "pids", "io_weight", "io_throttle", "devices")]


# --- sandbox --------------------------------------------------------------------------


def _in_forked_child(step: Callable[[], None]) -> str:
    """Run ``step`` in a forked child; its error message, or "" when it worked."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            try:
                step()
                message = b""
            except Exception as exc:
                message = f"{type(exc).__name__}: {exc}".encode()
            os.write(write_end, message)
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        message = reader.read().decode()
    os.waitpid(pid, 0)
    return message


def _probe_in_child(name: str, step: Callable[[], None], works: str, fails: str) -> Check:
    """Run ``step`` in a forked child: a Check that says ``works``, or ``fails`` and why."""
    message = _in_forked_child(step)
    if message:
        return Check(name, False, f"{fails}: {message}")
    return Check(name, True, works)


def _pid_namespace() -> None:
    """What the zygote does for a sandboxed child: fork it as PID 1 of a new PID namespace."""
    from ..runtime.sandbox import CLONE_NEWPID, unshare

    unshare(CLONE_NEWPID)
    pid = os.fork()
    if pid == 0:
        os._exit(0 if os.getpid() == 1 else 1)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise OSError("the child of a new PID namespace is not its PID 1")


def _filesystem(spec: dict[str, Any]) -> Callable[[], None]:
    def step() -> None:
        from ..runtime.sandbox import isolate_filesystem, leave_namespaces

        leave_namespaces(spec)
        isolate_filesystem(spec)
        for path in ("/etc", "/run/lock", "/usr"):
            if not os.path.isdir(path):
                continue
            try:
                os.close(os.open(os.path.join(path, ".agent-doctor"), os.O_CREAT | os.O_WRONLY, 0o600))
            except OSError as exc:
                if exc.errno != errno.EROFS:
                    raise
            else:
                raise OSError(f"{path} is writable")
        os.close(os.open("/tmp/.agent-doctor", os.O_CREAT | os.O_WRONLY, 0o600))  # the private tmpfs

    return step


def _seccomp() -> None:
    import ctypes

    from ..runtime import seccomp

    listener = seccomp.install(listener=True)
    if listener is None:
        raise OSError("the kernel has no seccomp listener: denied calls fail with EPERM but are not named")
    os.close(listener)  # with nobody listening, a denied call now fails with ENOSYS
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(seccomp.CLONE_NEWUSER) == 0:
        raise OSError("unshare(CLONE_NEWUSER) still works under the filter")


def _keyring() -> None:
    from ..runtime.sandbox import join_new_session_keyring

    join_new_session_keyring()


def _can_enter(spec: dict[str, Any]) -> Check:
    from ..runtime.sandbox import enter_sandbox

    def step() -> None:
        enter_sandbox(spec)
        if os.getuid() != spec["uid"]:
            raise OSError(f"still uid {os.getuid()}")

    return _probe_in_child("enter", step, f"a forked child became uid {spec['uid']} with all of the above",
                  "a forked child could not enter the sandbox")


def _sandbox_ingredients(spec: dict[str, Any]) -> list[Check]:
    """One check per ingredient, so that the report says which one is missing."""
    from ..runtime.sandbox import isolate_network, seccomp

    return [
        _probe_in_child("network namespace", isolate_network,
               "unshare(CLONE_NEWNET) works: sandboxed states have no network", "unshare(CLONE_NEWNET) failed"),
        _probe_in_child("pid namespace", _pid_namespace,
               "a sandboxed state is PID 1 of its own PID namespace and sees only its processes",
               "cannot fork into a new PID namespace"),
        _probe_in_child("filesystem", _filesystem(spec),
               f"new mount and IPC namespaces; everything read-only and nosuid but a private "
               f"{spec['tmp_mb']} MiB tmpfs /tmp, a minimal /dev, empty /dev/shm and /dev/mqueue",
               "cannot build the read-only view"),
        _probe_in_child("keyring", _keyring, "a fresh session keyring (none of the supervisor's keys)",
               "keyctl(JOIN_SESSION_KEYRING) failed")
        if seccomp.supported() else Check("keyring", False, f"no keyctl number for {seccomp.machine()}"),
        _probe_in_child("seccomp", _seccomp, "the filter denies namespaces, mounts, keyrings, ptrace, bpf, io_uring, "
               "modules... with EPERM, and names each denied call",
               "the seccomp filter is not (fully) available")
        if seccomp.supported() else Check("seccomp", False, f"no system call table for {seccomp.machine()}"),
    ]


def _blocking_ancestor(path: str) -> str | None:
    """The first directory above ``path`` that other users cannot enter, if any."""
    current = os.path.dirname(os.path.realpath(path))
    chain = []
    while True:
        chain.append(current)
        if current == "/":
            break
        current = os.path.dirname(current)
    for folder in reversed(chain):
        mode = os.stat(folder).st_mode
        if not mode & 0o001:
            return f"{folder} (mode {mode & 0o777:04o})"
    return None


def _interpreter_check(uid: int) -> Check:
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = "import asyncio, json, zmq, msgpack, cloudpickle, agent.runtime.sandbox"
    try:
        done = subprocess.run(
            [sys.executable, "-c", code],
            user=uid,
            group=uid,
            extra_groups=[],
            cwd="/",
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": package_root},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return Check("interpreter", False, f"could not run {sys.executable} as uid {uid}: {exc}")
    if done.returncode == 0:
        return Check("interpreter", True, f"{sys.executable} and this package load as uid {uid}")
    last = (done.stderr.strip().splitlines() or ["no output"])[-1]
    blocker = _blocking_ancestor(sys.executable) or _blocking_ancestor(package_root + "/x")
    hint = f"; {blocker} is closed to other users" if blocker else ""
    return Check(
        "interpreter",
        False,
        f"{sys.executable} cannot load as uid {uid}: {last}{hint}. Use a Python and a virtualenv "
        "under a world-readable folder (e.g. /opt, made from /usr/bin/python3)",
    )


def probe_sandbox() -> list[Check]:
    """Probe each ingredient of the sandbox isolation level."""
    checks = []
    try:
        uids = configured_uids()
    except Exception as exc:  # a typed IsolationUnavailableError with the fix in it
        return [Check("uid range", False, str(exc))]
    if os.geteuid() != 0:
        return [Check("privileges", False, "not root: cannot switch uid or create a network namespace")]
    checks.append(Check("privileges", True, "running as root"))
    taken = users_in(uids)
    if taken:
        checks.append(Check("uid range", False, f"uids {uids.start}-{uids.stop - 1} include users {', '.join(taken)}: "
                            "choose a free range with AGENT_SANDBOX_UIDS=lo-hi"))
        return checks
    checks.append(Check("uid range", True, f"uids {uids.start}-{uids.stop - 1} belong to no user"))
    pool = UidPool(uids)
    try:
        lease = pool.lease(f"doctor-{os.getpid()}")
    except Exception as exc:
        checks.append(Check("uid lease", False, str(exc)))
        return checks
    try:
        checks.append(Check("uid lease", True, f"leased uid {lease.uid} (locks in {pool.lock_dir})"))
        checks += _sandbox_ingredients(lease.spec())
        checks.append(_can_enter(lease.spec()))
        checks.append(_interpreter_check(lease.uid))
    finally:
        pool.close()
    return checks


# --- versions and the report -----------------------------------------------------------


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version(), "kernel": platform.release()}
    for dist in ("uvloop", "pyzmq", "nvidia-ml-py", "psutil", "cgroupspy", "msgpack", "cloudpickle", "structlog",
                 "ray"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    try:
        import zmq

        out["libzmq"] = zmq.zmq_version()
    except ImportError:
        pass
    return out


def diagnose(
    *,
    inventory: GPUInventory | None = None,
    mountinfo: str | None = None,
    sandbox: bool = True,
) -> Report:
    """Probe this machine and report what can be enforced here."""
    if mountinfo is None:
        mountinfo = _read("/proc/self/mountinfo")
    mounts = with_v2_controllers(parse_mountinfo(mountinfo))
    backend, reason, limits = probe_cgroups(mounts, os.environ.get(BACKEND_ENV) or None)
    inventory = inventory if inventory is not None else machine_inventory()
    gpus = inventory.devices()
    checks = probe_sandbox() if sandbox else [Check("sandbox", False, "not probed")]
    return Report(
        cgroup_backend=backend,
        cgroup_reason=reason,
        mounts=mounts,
        limits=limits,
        gpus=gpus,
        gpu_reason=None if gpus else inventory.unavailable_reason,
        sandbox_available=bool(checks) and all(c.ok for c in checks),
        sandbox=checks,
        versions=_versions(),
        ray=_ray_limits(backend),
    )


def _ray_limits(backend: str) -> list[Limit]:
    from ..ray.limits import findings, installed_version

    if installed_version() is None:
        return []
    return [Limit(f.name, f.holds, f.detail) for f in findings(backend)]


def _table(rows: Iterable[tuple[str, str, str]]) -> list[str]:
    rows = list(rows)
    width = max((len(r[0]) for r in rows), default=0)
    return [f"  {a.ljust(width)}  {b:<3}  {c}" for a, b, c in rows]


def render(report: Report) -> str:
    """The report as text for a terminal."""
    lines = [f"cgroups: {report.cgroup_backend} - {report.cgroup_reason}"]
    lines += _table((lim.name, "yes" if lim.enforceable else "no", lim.detail) for lim in report.limits)
    if report.gpus:
        lines.append(f"GPUs: {len(report.gpus)}")
        lines += [f"  {g.index}  {g.name}  {g.memory_total_mb} MiB  {g.uuid}  {g.pci_bus_id}" for g in report.gpus]
    else:
        lines.append(f"GPUs: 0 - {report.gpu_reason or 'none found'}")
    lines.append(f"sandbox: {'available' if report.sandbox_available else 'NOT available'}")
    lines += _table((c.name, "ok" if c.ok else "no", c.detail) for c in report.sandbox)
    if report.ray:
        lines.append("ray: a state with isolation='ray' runs as a Ray task; what holds for it:")
        lines += _table((lim.name, "yes" if lim.enforceable else "no", lim.detail) for lim in report.ray)
    else:
        lines.append("ray: not installed (pip install 'agent-isolation[ray]' for isolation='ray')")
    lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in report.versions.items()))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``agent doctor [--json]``: print the report; exit 0."""
    parser = argparse.ArgumentParser(prog="agent doctor", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    report = diagnose()
    print(json.dumps(report.to_dict(), indent=2) if args.json else render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
