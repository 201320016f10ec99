"""Child side of confinement: applied right after fork, before any user code runs."""

from __future__ import annotations

from typing import Any


def apply(child_spec: dict[str, Any]) -> None:
    """Join the attempt's cgroup(s), set the GPU environment and enter the sandbox.

    ``child_spec`` is the plain dict built by the supervisor's Confiner. Raises
    OSError when a step fails; the child must then exit without running the state.
    """
    return None
