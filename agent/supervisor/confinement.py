"""Per-attempt kernel confinement, supervisor side: cgroup, GPUs, sandbox uid.

The process executor asks a :class:`Confiner` to ``prepare`` each attempt before the
child is forked. The returned :class:`Confinement` carries ``child_spec``, plain data
the child applies with :func:`agent.runtime.confine.apply` before any user code runs,
and afterwards tells what the attempt used and whether it died on a limit.

This module starts as the no-enforcement implementation; the cgroup, GPU and sandbox
layers fill it in.
"""

from __future__ import annotations

from typing import Any

from ..errors import FailureReason
from ..executor import Attempt


class Confinement:
    """Everything set up for one attempt; ``close`` undoes it."""

    def __init__(self, child_spec: dict[str, Any] | None = None) -> None:
        self.child_spec: dict[str, Any] = child_spec or {}

    def usage(self) -> dict[str, Any]:
        """Measured use of the attempt so far (cpu_seconds, peak_memory_bytes, io bytes)."""
        return {}

    def failure_reason(self, exit_code: int | None, signal: int | None) -> FailureReason | None:
        """A limit-hit reason read back from the kernel, or None when no limit was hit."""
        return None

    def kill(self) -> None:
        """Kill every process of the attempt (used when SIGKILL of the child is not enough)."""

    def close(self) -> None:
        """Remove what ``prepare`` created (cgroup, uid lease, GPU assignment)."""


class Confiner:
    """Creates a :class:`Confinement` for each attempt."""

    backend_name = "none"

    def prepare(self, attempt: Attempt) -> Confinement:
        return Confinement()

    def close(self) -> None:
        """Release everything held (called when the supervisor shuts down)."""
