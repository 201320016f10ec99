"""Isolated execution: the supervisor, its zygote launcher and the process executor."""

from __future__ import annotations

from ..executor import Executor, Isolation
from .logs import read_attempt_log
from .process import ProcessExecutor, WorkerExecutor
from .service import Supervisor, SupervisorConfig, SupervisorStatistics, current_supervisor, shutdown_supervisor

_executors: dict[Isolation, Executor] = {}


def get_executor(isolation: Isolation) -> Executor:
    """The executor for an isolated level; ``sandbox`` differs from ``process`` only in its confinement."""
    isolation = Isolation.parse(isolation)
    if isolation is Isolation.INLINE or isolation is Isolation.RAY:
        from ..executor import executor_for

        return executor_for(isolation)
    executor = _executors.get(isolation)
    if executor is None:
        executor = _executors[isolation] = (
            WorkerExecutor() if isolation is Isolation.WORKER else ProcessExecutor(isolation)
        )
    return executor


__all__ = [
    "ProcessExecutor", "Supervisor", "WorkerExecutor", "SupervisorConfig", "SupervisorStatistics",
    "current_supervisor", "get_executor", "read_attempt_log", "shutdown_supervisor",
]
