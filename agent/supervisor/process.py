"""The executors of the supervisor's processes: ``process`` (and ``sandbox``) and ``worker``.

``process`` runs each attempt in its own forked child; ``worker`` on a reused worker
process of the attempt's shape (:mod:`agent.supervisor.workers`). Both watch the same
kind of record (:class:`~agent.supervisor.child.ChildProcess`) and stop it the same way
when the attempt is cancelled.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, TypeVar

from ..executor import Attempt, AttemptFailed, AttemptOutcome, Isolation
from .child import ChildProcess
from .service import Supervisor, get_supervisor

T = TypeVar("T")


class ProcessExecutor:
    """Runs attempts in children forked by the process's supervisor."""

    def __init__(self, isolation: Isolation = Isolation.PROCESS) -> None:
        self.isolation = isolation

    async def run_attempt(self, attempt: Attempt) -> AttemptOutcome:
        sup = get_supervisor()
        sup.attach(asyncio.get_running_loop())
        sup.enter_attempt()
        try:
            return await self._run(sup, attempt)
        finally:
            sup.exit_attempt()

    async def _run(self, sup: Supervisor, attempt: Attempt) -> AttemptOutcome:
        confinement = sup.confine(attempt)
        try:
            child = sup.launch(attempt, confinement)
            try:
                status = await watch(child, attempt, sup.config.grace)
            finally:
                sup.forget(child)
            confinement.reaped = status is not None
            return verdict(child, status, attempt)
        except BaseException as exc:
            usage: Any = getattr(exc, "usage", None)
            if isinstance(usage, dict):
                attempt.usage.update(usage)
            raise
        finally:
            confinement.close()

    async def aclose(self) -> None:
        """Nothing per executor: the supervisor is shared and goes away with the process."""
        return None


class WorkerExecutor:
    """Runs attempts on the supervisor's worker processes (``isolation="worker"``)."""

    isolation = Isolation.WORKER

    async def run_attempt(self, attempt: Attempt) -> AttemptOutcome:
        sup = get_supervisor()
        sup.attach(asyncio.get_running_loop())
        sup.enter_attempt()
        try:
            while True:
                handed = sup.workers.acquire(attempt)
                try:
                    child = await handed
                except asyncio.CancelledError:
                    if not handed.done() or handed.cancelled() or handed.exception() is not None:
                        raise
                    # Handed to a worker just as it was cancelled: stop it there.
                    await uncancellable(handed.result().stop(attempt.stop_reason or "cancel", sup.config.grace))
                    raise
                status = await watch(child, attempt, sup.config.grace, over=child.over)
                if not child.never_ran:  # else its worker went idle before reading it: again
                    return verdict(child, status, attempt)
        finally:
            sup.exit_attempt()

    async def aclose(self) -> None:
        """Nothing per executor: the workers belong to the supervisor."""
        return None


async def watch(
    child: ChildProcess, attempt: Attempt, grace: float, *, over: asyncio.Future[int | None] | None = None,
) -> int | None:
    """Wait until ``child``'s attempt is over; when cancelled, stop it for good first.

    ``over``: a future of that end which only this wait uses, awaited as it is (else
    ``child.exited``, shielded: others await it too).
    """
    try:
        return await (over if over is not None else asyncio.shield(child.exited))
    except asyncio.CancelledError:
        await uncancellable(child.stop(attempt.stop_reason or "cancel", grace))
        raise


def verdict(child: ChildProcess, status: int | None, attempt: Attempt) -> AttemptOutcome:
    """The attempt's outcome (or :class:`AttemptFailed`), its measured usage kept on ``attempt``."""
    try:
        outcome = child.outcome(status)
    except AttemptFailed as failed:
        attempt.usage.update(failed.usage)
        raise
    attempt.usage.update(outcome.usage)
    return outcome


async def uncancellable(aw: Awaitable[T]) -> T:
    """Await ``aw`` to the end even if this task is cancelled again meanwhile."""
    task = asyncio.ensure_future(aw)
    while True:
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done():
                return task.result()
