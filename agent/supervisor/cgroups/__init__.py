"""Kernel resource limits per attempt: one interface, three backends (v2, v1, none).

>>> detection = detect()                       # v2, else v1, else rlimits + watchdog
>>> cg = detection.backend.create("attempt-1", limits_for(requirements))
>>> # the child writes its pid to cg.procs_files (agent.runtime.confine.apply)
>>> cg.usage(), cg.limit_events(); cg.remove()
"""

from .base import DEFAULT_ROOT, CgroupBackend, CgroupHandle, LimitEvents
from .detect import BACKEND_ENV, Detection, describe, detect, likely_backend, open_backend
from .limits import DEFAULT_PIDS_MAX, SANDBOX_PIDS_MAX, CgroupLimits, IoThrottle, limits_for

__all__ = [
    "BACKEND_ENV",
    "DEFAULT_PIDS_MAX",
    "DEFAULT_ROOT",
    "SANDBOX_PIDS_MAX",
    "CgroupBackend",
    "CgroupHandle",
    "CgroupLimits",
    "Detection",
    "describe",
    "IoThrottle",
    "LimitEvents",
    "detect",
    "likely_backend",
    "limits_for",
    "open_backend",
]
