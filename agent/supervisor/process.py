"""The ``process`` executor: each attempt in its own forked child under the supervisor."""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, TypeVar

from ..executor import Attempt, AttemptOutcome, Isolation
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
        confinement = sup.confiner.prepare(attempt)
        try:
            child = sup.launch(attempt, confinement)
            try:
                status = await asyncio.shield(child.exited)
            except asyncio.CancelledError:
                reason = attempt.stop_reason or "cancel"
                await uncancellable(child.stop(reason, sup.config.grace))
                raise
            finally:
                sup.forget(child)
            confinement.reaped = status is not None
            outcome = child.outcome(status)
            attempt.usage.update(outcome.usage)
            return outcome
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


async def uncancellable(aw: Awaitable[T]) -> T:
    """Await ``aw`` to the end even if this task is cancelled again meanwhile."""
    task = asyncio.ensure_future(aw)
    while True:
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done():
                return task.result()
