"""Pick the best cgroup backend this process can use: v2, then v1, then none.

``AGENT_CGROUP_BACKEND=v2|v1|none`` forces one (an unusable forced backend is an
error, never a silent fallback). Every backend that was tried and refused is kept
with its reason, for ``agent doctor`` and for the fallback's own explanation.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from ...errors import CgroupError, IsolationUnavailableError
from .base import DEFAULT_ROOT, CgroupBackend

BACKEND_ENV = "AGENT_CGROUP_BACKEND"
"""Set, it makes the supervisor use exactly this backend ("v2", "v1" or "none")."""
ROOT_ENV = "AGENT_CGROUP_ROOT"
"""Set (by agentd, for a job's runner), the v1 cgroup delegated to this uid: its path below
each hierarchy's root. The supervisor then creates its cgroups there, without root. (On v2
a delegated cgroup is simply the process's own, so nothing needs saying.)"""
CHOICES = ("v2", "v1", "none")
V1_CONTROLLERS = ("cpu", "cpuacct", "memory", "pids", "blkio", "cpuset", "devices", "freezer")
CORE_CONTROLLERS = ("cpu", "memory", "pids")
"""What the v1/v2 backends need at the least to confine a state."""


@dataclass(frozen=True)
class CgroupMount:
    """One mounted cgroup hierarchy."""

    version: int  # 1 or 2
    mountpoint: str
    controllers: tuple[str, ...]


@dataclass
class Detection:
    """The backend chosen, and why each better one was not."""

    backend: CgroupBackend
    refused: dict[str, str] = field(default_factory=dict)


def open_backend(kind: str, root: str = DEFAULT_ROOT, reason: str = "") -> CgroupBackend:
    """Open one backend by name; raises CgroupError when it cannot be used here."""
    if kind == "v2":
        from .v2 import V2Backend

        return V2Backend(root)
    if kind == "v1":
        from .v1 import V1Backend

        return V1Backend(root)
    if kind == "none":
        from .fallback import NoneBackend

        return NoneBackend(reason or "cgroups were turned off")
    raise IsolationUnavailableError(f"unknown cgroup backend {kind!r}: use one of {', '.join(CHOICES)}")


def parse_mountinfo(text: str) -> list[CgroupMount]:
    """The cgroup hierarchies in a ``/proc/self/mountinfo`` text (v2 controllers left empty)."""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        fstype, mountpoint, options = tail[0], fields[4], tail[2].split(",")
        if fstype == "cgroup":
            names = tuple(o for o in options if o in V1_CONTROLLERS)
            if names:
                mounts.append(CgroupMount(1, mountpoint, names))
        elif fstype == "cgroup2":
            mounts.append(CgroupMount(2, mountpoint, ()))
    return mounts


def with_v2_controllers(mounts: list[CgroupMount]) -> list[CgroupMount]:
    out = []
    for mount in mounts:
        if mount.version == 2:
            try:
                with open(os.path.join(mount.mountpoint, "cgroup.controllers")) as f:
                    names = tuple(f.read().split())
            except OSError:
                names = ()
            mount = replace(mount, controllers=names)
        out.append(mount)
    return out


def choose_backend(mounts: Sequence[CgroupMount], forced: str | None = None) -> tuple[str, str]:
    """Which backend the mounts allow (before probing): ("v1" | "v2" | "none", why).

    ``forced`` is the value of ``AGENT_CGROUP_BACKEND``, which makes the supervisor use
    exactly that backend (or fail) instead of the best one.
    """
    if forced:
        if forced == "none":
            return "none", f"{BACKEND_ENV}=none turns cgroups off; states are limited by rlimits and a watchdog only"
        backend, reason = choose_backend(mounts)
        if backend == forced:
            return backend, f"{reason} (forced by {BACKEND_ENV}={forced})"
        return "none", (
            f"{BACKEND_ENV}={forced} asks for a backend this machine does not offer ({reason}); "
            f"isolated states will fail to start: unset {BACKEND_ENV}"
        )
    v2 = [m for m in mounts if m.version == 2]
    v1 = {c: m.mountpoint for m in mounts if m.version == 1 for c in m.controllers}
    v2_note = "; ".join(
        f"cgroup2 at {m.mountpoint} has {', '.join(m.controllers) or 'no controllers'}" for m in v2
    )
    for mount in v2:
        if all(c in mount.controllers for c in CORE_CONTROLLERS):
            return "v2", f"cgroup v2 (unified) at {mount.mountpoint} with {', '.join(mount.controllers)}"
    if all(c in v1 for c in CORE_CONTROLLERS):
        reason = f"cgroup v1 hierarchies for {', '.join(sorted(v1))}"
        return "v1", reason + (f" ({v2_note})" if v2_note else "")
    missing = [c for c in CORE_CONTROLLERS if c not in v1]
    reason = f"no cgroup hierarchy offers {', '.join(missing)}"
    if v2_note:
        reason += f" ({v2_note})"
    return "none", reason + "; states are limited by rlimits and a watchdog only"


def likely_backend() -> str:
    """The backend :func:`detect` would pick, judged from the mounts alone (creates nothing)."""
    forced = os.environ.get(BACKEND_ENV)
    if forced:
        return forced
    if os.geteuid() != 0 and not os.environ.get(ROOT_ENV):
        return "none"
    with open("/proc/self/mountinfo") as f:
        return choose_backend(with_v2_controllers(parse_mountinfo(f.read())))[0]


def detect(root: str = DEFAULT_ROOT, prefer: str | None = None) -> Detection:
    """The first usable backend of v2, v1, none (or exactly ``prefer`` / $AGENT_CGROUP_BACKEND).

    Under ``$AGENT_CGROUP_ROOT`` (a delegated v1 cgroup) the default ``root`` is that
    cgroup, and v1 is usable without root.
    """
    delegated = os.environ.get(ROOT_ENV)
    if delegated and root == DEFAULT_ROOT:
        root = delegated.strip("/")
    forced = prefer or os.environ.get(BACKEND_ENV) or None
    if forced:
        try:
            return Detection(open_backend(forced, root))
        except CgroupError as exc:
            raise IsolationUnavailableError(f"cgroup backend {forced!r} is not usable here: {exc}") from exc
    refused: dict[str, str] = {}
    for kind in ("v2", "v1"):
        if os.geteuid() != 0 and kind == "v1" and not delegated:
            refused[kind] = "cgroup v1 needs root"
            continue
        try:
            return Detection(open_backend(kind, root), refused)
        except CgroupError as exc:
            refused[kind] = str(exc)
    reason = "; ".join(f"{k}: {v}" for k, v in refused.items())
    return Detection(open_backend("none", root, reason), refused)


def describe(root: str = DEFAULT_ROOT) -> dict[str, object]:
    """What this machine enforces per attempt, for ``agent doctor`` (opens and closes a backend)."""
    detection = detect(root)
    try:
        return {
            "backend": detection.backend.name,
            "refused": dict(detection.refused),
            "enforces": detection.backend.capabilities(),
        }
    finally:
        detection.backend.close()
