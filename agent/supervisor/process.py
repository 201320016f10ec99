"""The executors of the supervisor's processes: ``process`` (and ``sandbox``) and ``worker``.

``process`` runs each attempt in its own forked child; ``worker`` on a reused worker
process of the attempt's shape (:mod:`agent.supervisor.workers`). Both watch the same
kind of record (:class:`~agent.supervisor.child.ChildProcess`) and stop it the same way
when the attempt is cancelled.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, TypeVar

from .._types import RESULT_STANDS
from ..errors import IsolationUnavailableError
from ..executor import Attempt, AttemptFailed, AttemptOutcome, Isolation
from .child import ChildProcess
from .confinement import removed
from .service import Supervisor, serving_supervisor
from .workers import WorkerSettings

T = TypeVar("T")


_ZYGOTE_CHECK = 1.0
"""Seconds an attempt's end waits for its process's exit report before it looks whether
the zygote, which reaps and reports, was stopped."""


async def _exited(sup: Supervisor, child: ChildProcess) -> int | None:
    """``child``'s exit status once the zygote reports it; a zygote found stopped meanwhile
    is continued (else this would wait for good), and that is logged."""
    while True:
        try:
            return await asyncio.wait_for(asyncio.shield(child.exited), _ZYGOTE_CHECK)
        except TimeoutError:
            if sup.zygote.continue_if_stopped():
                sup.log.warning("zygote_continued", zygote_pid=sup.zygote.pid, state_pid=child.pid,
                                why="it was stopped (SIGSTOP): a state's process may have stopped its parent")


_UID_POLL = 0.5
"""Seconds between looks for a sandbox uid another process may have freed meanwhile."""


async def _confined(sup: Supervisor, attempt: Attempt) -> Any:
    """``sup.confine(attempt)``; a sandbox that finds every uid leased waits for one, as for
    any resource (the state before it in a chain frees its uid as its process is reaped,
    which may come just after this launch)."""
    while True:
        try:
            return sup.confine(attempt)
        except IsolationUnavailableError as exc:
            from .sandbox import UidsInUseError  # (imported when a sandbox is asked for)

            if not isinstance(exc, UidsInUseError):
                raise
            freed = sup.confiner.uid_freed()
        try:
            await asyncio.wait_for(freed, _UID_POLL)
        except TimeoutError:
            pass


class ProcessExecutor:
    """Runs attempts in children forked by the process's supervisor."""

    def __init__(self, isolation: Isolation = Isolation.PROCESS) -> None:
        self.isolation = isolation

    async def run_attempt(self, attempt: Attempt) -> AttemptOutcome:
        sup = serving_supervisor(asyncio.get_running_loop())
        try:
            await sup.room_for_child()
            confinement = await _confined(sup, attempt)
        except BaseException:
            sup.exit_attempt()
            raise
        ends_later = False  # its end was left to a task of attempt.settle (_settle)
        try:
            child = sup.launch(attempt, confinement)
            if attempt.settle is not None and not attempt.assignment.get("gpus"):
                outcome = await self._answer(sup, child, attempt)
                if outcome is not None:
                    settle_later(attempt, self._settle(sup, child, confinement))
                    ends_later = True
                    return outcome
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
            if not ends_later:
                try:
                    confinement.close()
                finally:
                    sup.exit_attempt()
                settle_removal(attempt, confinement)

    @staticmethod
    async def _answer(sup: Supervisor, child: ChildProcess, attempt: Attempt) -> AttemptOutcome | None:
        """The outcome as soon as the child's result is in (None: its end must be awaited).

        The attempt's resources are then free for the next state while its process exits;
        one holding GPUs is always awaited (a process that is still exiting holds its GPU
        memory).
        """
        await watch(child, attempt, sup.config.grace, over=child.answered())
        outcome = child.outcome_now()
        if outcome is not None:
            attempt.usage.update(outcome.usage)
        return outcome

    @staticmethod
    async def _settle(sup: Supervisor, child: ChildProcess, confinement: Any) -> None:
        """The end of an attempt whose outcome was taken early: its process reaped (killed if
        it lingers past the grace period), its log closed, its cgroup and uid let go."""
        try:
            status = await uncancellable(_exited(sup, child))
            confinement.reaped = status is not None
        finally:
            sup.forget(child)
            try:
                confinement.close()
            finally:
                sup.exit_attempt()
        await removed(confinement)

    async def prepare(self, timeout: float | None = None) -> None:
        await until_ready(timeout)

    async def aclose(self) -> None:
        """Nothing per executor: the supervisor is shared and goes away with the process."""
        return None


_CROSSINGS = 3
"""How many times in a row an attempt may meet a worker that exited idle as its ``run``
went out (rare: the two cross within a moment) before that exit is taken for the state's
own (a state calling ``os._exit`` with the idle exit code would otherwise go round forever)."""


class WorkerExecutor:
    """Runs attempts on the supervisor's worker processes (``isolation="worker"``)."""

    isolation = Isolation.WORKER

    async def run_attempt(self, attempt: Attempt) -> AttemptOutcome:
        sup = serving_supervisor(asyncio.get_running_loop())
        try:
            for crossed in range(_CROSSINGS + 1):
                handed = sup.workers.acquire(attempt)
                try:
                    child = await handed
                except asyncio.CancelledError:
                    if not handed.done() or handed.cancelled() or handed.exception() is not None:
                        raise
                    # Handed to a worker just as it was cancelled: stop it there.
                    attempt.stopping, attempt.hurry = True, handed.result().hurry
                    await uncancellable(handed.result().stop(attempt.stop_reason or "cancel",
                                                             stop_grace(attempt, sup.config.grace)))
                    raise
                status = await watch(child, attempt, sup.config.grace, over=child.over)
                if attempt.assignment.get("gpus"):
                    # Its worker is retired: the GPUs are free once its process (and the GPU
                    # memory it holds) is gone, as for a process attempt.
                    await uncancellable(child.worker.until_gone())
                settle_removal(attempt, child.worker.confinement)  # a worker gone with its attempt takes its cgroup
                if not child.never_ran or crossed == _CROSSINGS:  # else its worker went idle first: again
                    return verdict(child, status, attempt)
            raise AssertionError("unreachable: the last crossing returns its verdict")
        finally:
            sup.exit_attempt()

    async def prepare(self, timeout: float | None = None) -> None:
        WorkerSettings()  # read now: a wrong AGENT_WORKER_* setting refuses the run before it starts
        await until_ready(timeout)

    async def aclose(self) -> None:
        """Nothing per executor: the workers belong to the supervisor."""
        return None


async def until_ready(timeout: float | None = None) -> None:
    """Start the supervisor serving this loop, if none does, and wait (at most ``timeout``
    seconds) until its zygote can fork (see :func:`agent.executor.prepare_for`)."""
    sup = serving_supervisor(asyncio.get_running_loop())
    try:
        await sup.until_ready(timeout)
    finally:
        sup.exit_attempt()


def settle_removal(attempt: Attempt, confinement: Any) -> None:
    """Have the run ``attempt`` belongs to wait, before it returns, for the cgroup that
    ``confinement.close()`` left to the confiner's thread (nothing when none was, or when
    the attempt belongs to no run)."""
    if attempt.settle is not None and confinement.removing is not None and not confinement.removing.done():
        settle_later(attempt, removed(confinement))


def settle_later(attempt: Attempt, end: Awaitable[None]) -> None:
    """Leave ``end`` to a task of ``attempt.settle``, which its run awaits before it returns."""
    assert attempt.settle is not None
    task = asyncio.ensure_future(end)
    attempt.settle.add(task)
    task.add_done_callback(attempt.settle.discard)


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
        attempt.stopping, attempt.hurry = True, child.hurry
        await uncancellable(child.stop(attempt.stop_reason or "cancel", stop_grace(attempt, grace)))
        if attempt.stop_reason in RESULT_STANDS and child.returned():
            # Its result came in as it was being preempted or paused (a state that blocked
            # until it was done): the work is done, and doing it again would repeat it.
            return await uncancellable(child.exited)
        try:  # what it used until it was stopped, and a limit it hit: no outcome carries them
            attempt.usage.update(child.confinement.usage())
            attempt.limit_hit = child.confinement.failure_reason(None, None)
        except Exception:  # a report only: never in the way of the stop
            pass
        raise


def stop_grace(attempt: Attempt, grace: float) -> float:
    """How long a stopped attempt's process may take to stop before it is killed."""
    return grace if attempt.stop_grace is None else min(grace, attempt.stop_grace)


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
