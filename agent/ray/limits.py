"""What holds for a state that runs on Ray, for ``agent doctor`` (no Ray is imported or started).

Ray's resources are counts for placement: ``num_cpus``, ``num_gpus``, ``memory`` and
custom resources choose a node that has them and keep other tasks from being placed on
what they hold, but nothing stops a running task from using more. What does hold, and
what this package adds with ``ray_options(isolation="process")``, is listed row by row.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RayFinding:
    """One row: a kind of limit, whether it holds for a Ray state, and how or why not."""

    name: str
    holds: bool
    detail: str


def installed_version() -> str | None:
    """Ray's version, when it is installed (read from its metadata, not by importing it)."""
    from importlib import metadata

    try:
        return metadata.version("ray")
    except metadata.PackageNotFoundError:
        return None


def findings(cgroup_backend: str) -> list[RayFinding]:
    """The rows for a Ray state; ``cgroup_backend`` is what this machine has (v1, v2 or none),
    which is what a confined state gets when this machine is a node of the cluster."""
    confined = {
        "v1": "cgroup v1 here: CPU quota, memory without swap, pids and IO throttles, as isolation='process'",
        "v2": "cgroup v2 here: CPU quota, memory without swap, pids and IO, as isolation='process'",
    }.get(cgroup_backend)
    if cgroup_backend == "v2":
        system = ("cgroup v2 here: Ray >= 2.51 started with --enable-resource-isolation reserves CPU and "
                  "memory for Ray's own processes against all workers together; no single task is limited")
    else:
        system = (f"needs cgroup v2 (this machine: {cgroup_backend}): Ray >= 2.51's --enable-resource-isolation "
                  "protects Ray's own processes from the workers, and limits no single task even there")
    return [
        RayFinding("placement", True, "num_cpus, num_gpus, memory and custom resources pick a node that has "
                   "them; our pool (agent.ray.cluster_pool()) decides when each state starts"),
        RayFinding("cpu", False, "num_cpus only counts: a task may use every core of its node (Ray sets "
                   "OMP_NUM_THREADS to it when unset, a hint)"),
        RayFinding("memory", False, "memory only counts: nothing caps a task; Ray's memory monitor kills "
                   "workers when the node passes RAY_memory_usage_threshold (95% by default)"),
        RayFinding("gpus", False, "Ray assigns GPU ids and sets CUDA_VISIBLE_DEVICES; no devices cgroup, so "
                   "a task can still open every /dev/nvidia* of its node"),
        RayFinding("io, pids", False, "no IO weight, IO throttle or pids limit"),
        RayFinding("ray system reserve", cgroup_backend == "v2", system),
        RayFinding("confined state", confined is not None,
                   (confined or f"no cgroups here ({cgroup_backend}): rlimits and a watchdog only")
                   + "; ray_options(isolation='process') runs the state in a child of this package's "
                   "supervisor on its node (root or a delegated cgroup there)"),
    ]
