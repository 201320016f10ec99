"""Child side of confinement: applied right after fork, before any user code runs.

The order matters: the child joins its cgroup(s) first, so every byte and every
process it creates afterwards is counted and limited; then rlimits and the
environment (GPU pinning). The sandbox (namespaces, uid switch) comes later, from
:mod:`agent.runtime.child`, because only root may write ``cgroup.procs`` and raise
limits. This module imports nothing of the supervisor: ``child_spec`` is plain data.

``child_spec`` keys, all optional:

* ``cgroup_procs``: ``cgroup.procs`` files to write this process's pid to;
* ``joined``: the pid the supervisor already moved into those cgroups (a parked child's,
  as the supervisor sees it): that child does not join them again (a move costs a kernel
  RCU grace period), which it learns from :func:`join`'s ``parked``;
* ``rlimits``: ``[[name, soft, hard], ...]`` with ``name`` a ``resource.RLIMIT_*`` name;
* ``process_group``: make this process a process-group leader (the no-cgroup
  fallback kills the whole group);
* ``data_headroom``: bytes the child may add to its data size (``RLIMIT_DATA`` set to
  what it inherited plus this), the no-cgroup fallback's memory backstop;
* ``env``: variables to set;
* ``gpu``: ``{"env": {...}}``, variables that pin CUDA to the assigned GPUs (a None
  value removes the variable);
* ``sandbox``: the spec for :func:`agent.runtime.sandbox.enter_sandbox` (applied by the
  child itself, after this).
"""

from __future__ import annotations

import os
from typing import Any


class CgroupGone(FileNotFoundError):
    """The cgroup made for this process was removed before it could join it: the supervisor
    stopped its attempt meanwhile (a run that timed out while a worker started, say)."""


def join_cgroups(child_spec: dict[str, Any]) -> None:
    """Move this process into its cgroup(s); raises OSError naming the file on failure
    (:class:`CgroupGone` when the cgroup is gone)."""
    pid = str(os.getpid()).encode()
    for procs in child_spec.get("cgroup_procs", ()):
        try:
            fd = os.open(procs, os.O_WRONLY)
            try:
                os.write(fd, pid)
            finally:
                os.close(fd)
        except FileNotFoundError as exc:
            raise CgroupGone(exc.errno, f"cannot join cgroup {procs}: it was removed") from exc
        except OSError as exc:
            raise OSError(exc.errno, f"cannot join cgroup {procs}: {exc.strerror}") from exc


def set_limits(child_spec: dict[str, Any]) -> None:
    """Apply the rlimits of the spec (the no-cgroup fallback uses them)."""
    rlimits = list(child_spec.get("rlimits", ()))
    headroom = child_spec.get("data_headroom")
    if not rlimits and headroom is None:
        return
    import resource

    if headroom is not None:
        cap = _data_size() + int(headroom)
        rlimits.append(["RLIMIT_DATA", cap, cap])
    for name, soft, hard in rlimits:
        resource.setrlimit(getattr(resource, name), (int(soft), int(hard)))


def _data_size() -> int:
    """This process's data size now (VmData), which RLIMIT_DATA is compared with."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024
    return 0


def set_environment(child_spec: dict[str, Any]) -> None:
    """Set the spec's variables and the GPU pinning variables; those that hold the value
    already (the zygote sets the pinning of a state without GPUs ahead) are left alone."""
    gpu = child_spec.get("gpu") or {}
    environ = os.environ
    for variables in (child_spec.get("env", {}), gpu.get("env", {})):
        for key, value in variables.items():
            if value is None:  # not pinned: as the program's own environment has it
                environ.pop(str(key), None)
                continue
            key, value = str(key), str(value)
            if environ.get(key) != value:
                environ[key] = value


def join(child_spec: dict[str, Any], *, parked: bool = False) -> None:
    """Join the attempt's cgroup(s), unless the supervisor moved this process in already.

    ``parked``: this child was parked and handed this spec by the zygote, which hands a
    spec naming a ``joined`` pid to that child only (a sandboxed one is PID 1 of its own
    namespace, so its pid here is not the one named).
    """
    if not (parked and child_spec.get("joined") is not None):
        join_cgroups(child_spec)


def apply(child_spec: dict[str, Any], *, joined: bool = False) -> None:
    """Join the attempt's cgroup(s) (unless ``joined``: :func:`join` did), set limits and
    the GPU environment.

    ``child_spec`` is the plain dict built by the supervisor's Confiner. Raises OSError
    when a step fails; the child must then exit without running the state.
    """
    if not joined:
        join_cgroups(child_spec)
    if child_spec.get("process_group") and os.getpgid(0) != os.getpid():
        os.setpgid(0, 0)
    set_limits(child_spec)
    set_environment(child_spec)
