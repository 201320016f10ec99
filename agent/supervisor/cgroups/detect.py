"""Pick the best cgroup backend this process can use: v2, then v1, then none.

``AGENT_CGROUP_BACKEND=v2|v1|none`` forces one (an unusable forced backend is an
error, never a silent fallback). Every backend that was tried and refused is kept
with its reason, for ``agent doctor`` and for the fallback's own explanation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ...errors import CgroupError, IsolationUnavailableError
from .base import DEFAULT_ROOT, CgroupBackend

BACKEND_ENV = "AGENT_CGROUP_BACKEND"
CHOICES = ("v2", "v1", "none")


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


def likely_backend() -> str:
    """The backend :func:`detect` would pick, judged from the mounts alone (creates nothing)."""
    forced = os.environ.get(BACKEND_ENV)
    if forced:
        return forced
    if os.geteuid() != 0:
        return "none"
    from . import v1, v2

    location = v2.v2_location()
    if location is not None and all(c in v2.controllers_of(location[1]) for c in v2.REQUIRED):
        return "v2"
    if all(c in v1.v1_mounts() for c in v1.REQUIRED):
        return "v1"
    return "none"


def detect(root: str = DEFAULT_ROOT, prefer: str | None = None) -> Detection:
    """The first usable backend of v2, v1, none (or exactly ``prefer`` / $AGENT_CGROUP_BACKEND)."""
    forced = prefer or os.environ.get(BACKEND_ENV) or None
    if forced:
        try:
            return Detection(open_backend(forced, root))
        except CgroupError as exc:
            raise IsolationUnavailableError(f"cgroup backend {forced!r} is not usable here: {exc}") from exc
    refused: dict[str, str] = {}
    for kind in ("v2", "v1"):
        if os.geteuid() != 0 and kind == "v1":
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
