"""agentd's cgroup subtree: one cgroup per running job, delegated to the job's uid.

agentd opens the same backends the embedded supervisor uses, with its own root
(``agentd``): on v1 ``<hierarchy>/agentd/<pid>-<start>-<random>/`` in every
controller, on v2 ``<own cgroup>/agentd/<...>/`` (agentd first moves itself into a
leaf, as a systemd service with ``Delegate=yes`` must). Below it, each job gets
``job-<id>``, with the job's ceilings written by agentd (the user's memory and CPU
quota, ``pids.max``; on v1 a closed devices policy that agentd opens for exactly the
GPUs the job holds), then handed to the job's uid the way systemd delegates:

* v1: the directory, its ``cgroup.procs`` and ``tasks`` in every hierarchy;
* v2: the directory, ``cgroup.procs``, ``cgroup.subtree_control`` and ``cgroup.threads``.

The limit files stay root's, so a job cannot raise its ceilings. The job's runner is
put in the cgroup before it drops root; its own supervisor then creates its attempt
cgroups below it as the user (``AGENT_CGROUP_ROOT`` says where on v1). A job's
cgroup is removed, killing whatever is left in it, when the job's runner ends; the
subtree of an agentd that died is reaped when the next one starts.
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import CgroupError
from ..supervisor.cgroups import CgroupLimits, detect
from ..supervisor.cgroups.base import write
from ..supervisor.cgroups.detect import ROOT_ENV
from ..supervisor.cgroups.limits import CPU_PERIOD_US
from ..supervisor.gpus import NVIDIA_DEVICE_MAJOR, device_rules

DAEMON_ROOT = "agentd"
_V2_DELEGATED = ("cgroup.procs", "cgroup.subtree_control", "cgroup.threads")
_V1_DELEGATED = ("cgroup.procs", "tasks")


class JobCgroup:
    """One job's delegated cgroup (nothing at all on a machine without cgroups)."""

    def __init__(self, handle: Any, backend: str, dirs: list[str], env: dict[str, str]) -> None:
        self.handle = handle
        self.backend = backend
        self.dirs = dirs
        self.env = env  # what the runner needs to know to work inside it
        self._gpus: set[int] = set()

    @property
    def procs_files(self) -> list[str]:
        """Where the runner writes its pid (as root, before dropping privileges)."""
        return list(self.handle.procs_files) if self.handle is not None else []

    def set_gpus(self, minors: set[int]) -> None:
        """Open the devices policy (v1) for exactly the GPUs the job holds now."""
        devices = self.handle.dirs.get("devices") if self.backend == "v1" else None
        if devices is None or minors == self._gpus:
            self._gpus = set(minors)
            return
        for minor in sorted(self._gpus - minors):
            write(f"{devices}/devices.deny", f"c {NVIDIA_DEVICE_MAJOR}:{minor} rwm")
        if minors - self._gpus:
            for rule in device_rules(minors):
                write(f"{devices}/devices.allow", rule)
        self._gpus = set(minors)

    def remove(self) -> None:
        """Kill everything left in the job's cgroup and below it, and delete it all."""
        if self.handle is not None:
            self.handle.remove()


class JobCgroups:
    """agentd's own subtree (see the module docstring); ``backend`` is v2, v1 or none."""

    def __init__(self, prefer: str | None = None, gpu_minors: list[int] | None = None) -> None:
        detection = detect(DAEMON_ROOT, prefer=prefer)
        self._backend = detection.backend
        self.backend = self._backend.name
        self.refused = detection.refused
        self.reaped = self._backend.reap_stale()
        self._gpu_minors = list(gpu_minors or [])

    def create(self, job_id: str, uid: int, gid: int, quota: dict[str, float], pids_max: int) -> JobCgroup:
        """The job's cgroup with its ceilings, owned by ``uid``."""
        name = f"job-{job_id}"
        if self.backend == "none":
            return JobCgroup(None, "none", [], {})
        cpu = quota.get("cpu")
        memory = quota.get("memory_mb")
        limits = CgroupLimits(
            cpu_quota_us=max(1000, int(cpu * CPU_PERIOD_US)) if cpu else None,
            memory_bytes=int(memory * 1024 * 1024) if memory else None,
            pids_max=pids_max,
            allow_devices=device_rules([]) if self._gpu_minors and self.backend == "v1" else None,
        )
        env: dict[str, str] = {}
        if self.backend == "v1":
            handle = self._backend.create(name, limits, every_controller=True)  # type: ignore[call-arg]
            dirs = sorted(set(handle.dirs.values()))
            delegated = _V1_DELEGATED
            mount, sup = self._backend.mounts["memory"], self._backend.sup_dirs["memory"]  # type: ignore[attr-defined]
            env[ROOT_ENV] = os.path.relpath(f"{sup}/{name}", mount)  # the same below every hierarchy
        else:
            handle = self._backend.create(name, limits)
            dirs = [handle.path]
            delegated = _V2_DELEGATED
        try:
            for path in dirs:
                os.chown(path, uid, gid)
                for entry in delegated:
                    try:
                        os.chown(f"{path}/{entry}", uid, gid)
                    except FileNotFoundError:
                        pass  # a hierarchy without it (v1: every one has both; v2: cgroup.threads is newer)
        except OSError as exc:
            handle.remove()
            raise CgroupError(f"cannot delegate cgroup {name} to uid {uid}: {exc.strerror}") from exc
        return JobCgroup(handle, self.backend, dirs, env)

    def close(self) -> None:
        """Remove agentd's subtree (every job's cgroup in it must be gone or is killed)."""
        self._backend.close()
