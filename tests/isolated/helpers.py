"""Helpers for the process-isolation tests."""

from __future__ import annotations

import os
import uuid

import psutil
import pytest

from agent import Agent, RetryPolicy
from agent.context import Context
from agent.errors import StateFailedError
from agent.executor import Attempt, AttemptOutcome, Isolation
from agent.runtime.child import PARKED_NAME
from agent.supervisor import current_supervisor, get_executor


LEVEL = Isolation.PROCESS
"""The isolation level the shared tests run at (set by the ``level`` fixture)."""


def make_attempt(func, *, context: Context | None = None, state: str = "s", number: int = 1) -> Attempt:
    """An attempt of ``func`` in a fresh run, isolated at :data:`LEVEL`."""
    run_id = f"test-{uuid.uuid4().hex[:12]}"
    ctx = context if context is not None else Context(run_id=run_id)
    return Attempt(run_id, "test-agent", state, func, number, context=ctx, isolation=LEVEL)


async def run(attempt: Attempt) -> AttemptOutcome:
    return await get_executor(attempt.isolation).run_attempt(attempt)


async def budget_race(isolation: str, fan, write, writers: tuple[str, str]) -> None:
    """Two states that each fit a 1 MiB run budget write 600 KB at once (``fan`` returns
    ``writers``, each runs ``write``): the same outcome at every isolation level."""
    agent = Agent("budget-race", isolation=isolation, context_budget_mb=1,
                  retry_policy=RetryPolicy(max_retries=1, initial_delay=0))
    agent.add_state("fan", fan)
    for name in writers:
        agent.add_state(name, write)
    with pytest.raises(StateFailedError) as info:
        await agent.run()
    exc = info.value
    # Both fitted by what they could see. The one written second was stopped for the
    # other's write, not judged a bound passed; its retry saw that write, and its own
    # write then raised ContextBudgetError in the state.
    assert exc.attempts == 2 and exc.reason.permanent and exc.reason.exception_type.endswith("ContextBudgetError")
    first = agent.state_metadata[exc.state].history[0]
    assert first.outcome == "failed" and "other states wrote to the run's context" in first.reason
    assert agent.context.budget.used <= agent.context.budget.limit


def state_process_gone(pid: int) -> bool:
    """Whether the process that served a state is gone, or, for ``worker``, serves on idle,
    its state stopped (the worker outlives its states, unless it had to be killed)."""
    sup = current_supervisor()
    if LEVEL is Isolation.WORKER and sup is not None and pid in sup.workers.idle_pids():
        return True
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def stray_processes() -> list[psutil.Process]:
    """Live descendants of this process other than the supervisor's zygote, its parked
    children and workers serving no attempt (which stay warm between runs by design).

    A child parked just as the test ended may not be in ``sup.parked`` yet (the zygote's
    report waits for the event loop): its process name says it is parked."""
    sup = current_supervisor()
    warm = {sup.zygote.pid, *sup.parked, *sup.workers.warm_pids()} if sup is not None else set()
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            parked = sup is not None and p.ppid() == sup.zygote.pid and p.name() == PARKED_NAME.decode()
            if p.pid not in warm and not parked and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def describe(processes: list[psutil.Process]) -> list[str]:
    """Who each leftover process is: pid, parent, name and status."""
    out = []
    for p in processes:
        try:
            out.append(f"{p.pid} (parent {p.ppid()}, {p.name()!r}, {p.status()})")
        except psutil.NoSuchProcess:
            out.append(f"{p.pid} (gone)")
    return out


def files_under(dirs: list[str]) -> list[str]:
    """What this process holds open below ``dirs``."""
    held = []
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if any(target.startswith(f"{d}/") for d in dirs):
            held.append(target)
    return held
