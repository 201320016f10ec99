"""The asyncio side of a run: attempts as tasks, timers, executor calls.

:class:`~agent.engine.run.Run` decides what runs when; this module makes it happen on
the event loop and reports every attempt's end back through ``run.finished``.

Every attempt is a task of its own, inline ones too, as ``asyncio.create_task`` would
make it: what its code sees of asyncio holds from its first line to its last
(``asyncio.current_task()`` is its own task throughout, which ``asyncio.timeout()``,
aiohttp's and anyio's timeouts rely on), and the context variables it sets stay in it
(each task runs in a copy of those of ``run()``'s caller).

One kind of inline state needs no task: an ``async def`` whose code awaits nothing (no
``await``, ``async for`` or ``async with``) cannot suspend, so the run steps it at once
(:func:`~agent.workflow.cannot_suspend`, :func:`inline_runner`), still in a copy of the caller's context
variables; only ``asyncio.current_task()`` there is not its own. Such states cost no
task and no loop iteration, which is what keeps small inline steps fast. While an inline
state started before it has not run its first line yet (its task waits for the loop),
it gets a task too: states begin in the order they were started.
"""

from __future__ import annotations

import asyncio
import functools
import traceback
import types
from collections.abc import Generator, Iterable
from typing import TYPE_CHECKING, Any

from .._compiled import framework_file
from .._types import RESULT_STANDS, StopReason
from ..errors import FailureReason, exception_message, exception_text, exception_type_name, reported, utf8_text
from ..executor import FAIL_RUN, HELD_UP, Attempt, AttemptFailed, Isolation, executor_for

if TYPE_CHECKING:
    from .run import Activation, Run

_KILLABLE = (Isolation.PROCESS, Isolation.SANDBOX, Isolation.WORKER)
"""Levels whose attempts are killed once a run's cleanup_timeout is over (their processes
are the supervisor's); a Ray task is cancelled only as far as Ray can."""


class Returned:
    """What :func:`inline_runner` yields when the coroutine it runs has returned: ``value``
    is what it returned. One per runner, reused."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: Any = None


@types.coroutine
def inline_runner(coro: Any) -> Generator[Any, Any, None]:
    """Steps coroutines that cannot suspend (:func:`~agent.workflow.cannot_suspend`) one after another.

    Started with ``send(None)``, then given each next coroutine with ``send(coro)``; each
    comes back as a :class:`Returned`, and one that raises ends the runner. Stepping each
    with ``coro.send(None)`` would raise and catch a StopIteration per state, which costs
    more than everything else a no-op state does.
    """
    done = Returned()
    while True:
        done.value = yield from coro
        coro = yield done


def exception_reason(exc: BaseException) -> FailureReason:
    """A state's own exception as a failure reason; its traceback starts at the state's code
    (the engine's frames that called it say nothing to its author). Its message and
    traceback are cut as a state's process's are (:func:`~agent.errors.reported`), so that
    a failure reads the same at every level."""
    start = exc.__traceback__
    while start is not None and framework_file(start.tb_frame.f_code.co_filename):
        start = start.tb_next
    tb = reported(utf8_text("".join(traceback.format_exception(type(exc), exc, start or exc.__traceback__))),
                  tail=True)
    return FailureReason(kind="exception",
                         message=exception_message(type(exc).__name__, reported(exception_text(exc))),
                         traceback=tb, exception_type=exception_type_name(type(exc)))


def _unasked_cancel(act: "Activation", exc: asyncio.CancelledError) -> FailureReason | None:
    """What a CancelledError out of an attempt's task means: None when the engine stopped it
    (its ``stop_reason`` says why). Otherwise, cancelled from outside the engine, it is
    cancelled; raised by the state's own code (an awaited task it cancelled), it is a
    failure like any exception, not a return."""
    if act.stop_reason is not None:
        return None
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        act.stop_reason = StopReason.CANCEL
        return None
    return exception_reason(exc)


class Driver:
    """Runs one run's attempts on the current event loop."""

    __slots__ = ("run", "loop", "waker", "handles", "settling")

    def __init__(self, run: "Run") -> None:
        self.run = run
        self.loop = asyncio.get_running_loop()
        self.waker: asyncio.Future[None] | None = None
        self.handles: set[asyncio.TimerHandle] = set()
        # Ends of attempts whose outcome came before their process was gone (Attempt.settle).
        self.settling: set[asyncio.Task[None]] = set()

    # --- waking ------------------------------------------------------------------------

    def kick(self) -> None:
        """Make the drive loop pump again soon (no-op while it is pumping)."""
        waker = self.waker
        if waker is not None and not waker.done():
            waker.set_result(None)

    def fail_run(self, error: BaseException) -> None:
        """Fail the run with ``error`` unless it is over (:data:`agent.executor.FAIL_RUN`)."""
        if not self.run.done:
            self.run.fail(error)
            self.kick()

    def call_at(self, when: float, callback: Any, *args: Any) -> asyncio.TimerHandle:
        """Call ``callback(*args)`` at run-clock time ``when``, then pump."""
        delay = max(0.0, when - self.run.clock())
        handle: asyncio.TimerHandle

        def fire() -> None:
            self.handles.discard(handle)
            callback(*args)
            self.kick()

        handle = self.loop.call_later(delay, fire)
        self.handles.add(handle)
        return handle

    async def drive(self, deadline: float | None, timeout: float = 0.0) -> None:
        """Pump until the run is done; on ``deadline`` (run clock, ``timeout`` seconds from its
        start) the run times out."""
        run = self.run
        loop = self.loop
        timer = None
        try:
            if deadline is not None:
                timer = loop.call_later(max(0.0, deadline - run.clock()), run.time_out, timeout)
            while True:
                run.pump()
                if run.done:
                    break
                self.waker = loop.create_future()
                try:
                    await self.waker
                finally:
                    self.waker = None
        except asyncio.CancelledError:
            run.caller_cancelled()
            await self.cleanup(StopReason.CANCEL)
            raise
        finally:
            if timer is not None:
                timer.cancel()
        await self.cleanup(StopReason.CANCEL)

    async def cleanup(self, reason: StopReason) -> None:
        """Stop whatever still runs and wait for it, up to the run's ``cleanup_timeout``."""
        run = self.run
        grace = run.cleanup_timeout or None
        isolated: dict[asyncio.Task[Any], Attempt] = {}
        for act in run.running.values():
            attempt = act.attempt_obj
            if attempt is not None and act.task is not None and attempt.isolation in _KILLABLE:
                attempt.stop_grace = grace  # killed then, if it has not stopped
                isolated[act.task] = attempt
        tasks = run.stop_all(reason)
        cancelled = False  # the caller cancelled again meanwhile (an outer timeout, a shutdown)
        if tasks:
            late, cancelled = await _through_cancels(tasks, None if grace is None else self.loop.time() + grace)
            # An isolated state's process is being killed now: the run waits until it is
            # gone, so that nothing of it runs (or writes to the context) after run() returned.
            # An inline state that ignores its cancellation cannot be stopped, nor code of the
            # program's own that holds up a cancelled attempt (an admission hook): they are left.
            killed = [task for task in late if task in isolated and isolated[task].stopping]
            for task in killed:  # a stop that began before this one (a state's timeout) ends now too
                hurry = isolated[task].hurry
                if hurry is not None:
                    hurry()
            if killed:
                cancelled = (await _through_cancels(killed, None))[1] or cancelled
        run.abandon()
        for handle in self.handles:
            handle.cancel()
        self.handles.clear()
        try:
            await self.settled()
        finally:
            if cancelled:
                raise asyncio.CancelledError

    async def settled(self) -> None:
        """Wait until every attempt's process is gone, even if cancelled meanwhile (then
        re-raised): a run never returns before its processes, cgroups and logs are done."""
        cancelled = False
        while self.settling:  # (tasks that settle add more: waited for too)
            cancelled = (await _through_cancels(list(self.settling), None))[1] or cancelled
        if cancelled:
            raise asyncio.CancelledError

    # --- attempts ----------------------------------------------------------------------

    def start_inline(self, act: "Activation", func: Any, context: Any) -> None:
        """Run an inline attempt, ``func(context)``, in a task of its own (its coroutine is
        made there: a task cancelled before it starts leaves none behind unawaited)."""
        act.task = task = self.loop.create_task(self._inline(act, func, context), name=f"state {act.state!r}",
                                                context=self.run.caller_context.copy())
        task.add_done_callback(functools.partial(self._task_done, act))
        self.run.unstarted.add(task)

    def start_attempt(self, act: "Activation", attempt: Attempt) -> None:
        """Run ``attempt`` through its executor (and the admission hooks) in a task."""
        act.attempt_obj = attempt
        attempt.settle = self.settling
        act.task = task = self.loop.create_task(self._run_attempt(act, attempt),
                                                context=self.run.caller_context.copy())
        task.add_done_callback(functools.partial(self._task_done, act))

    def _task_done(self, act: "Activation", task: asyncio.Task[Any]) -> None:
        # A task cancelled before its first step never ran its own handler.
        run = self.run
        run.unstarted.discard(task)
        if run.running.get(act.state) is act and act.task is task:
            if act.stop_reason is None:
                act.stop_reason = StopReason.CANCEL  # cancelled by someone else than the engine
            run.finished(act, None, None, {})

    async def _inline(self, act: "Activation", func: Any, context: Any) -> None:
        run = self.run
        run.unstarted.discard(act.task)
        FAIL_RUN.set(self.fail_run)
        try:
            result = await func(context)
        except asyncio.CancelledError as exc:
            run.finished_here(act, None, _unasked_cancel(act, exc))
            return
        except (Exception, SystemExit, GeneratorExit) as exc:  # sys.exit() too: a failed attempt
            run.finished_here(act, None, exception_reason(exc))
            return
        _returned(act)
        run.finished_here(act, result, None)

    async def _run_attempt(self, act: "Activation", attempt: Attempt) -> None:
        run = self.run
        FAIL_RUN.set(self.fail_run)
        entered: list[Any] = []
        ok = False
        try:
            try:
                if run.hooks:
                    # A hook that waits gives the pool grant back meanwhile (admission_held_up).
                    token = HELD_UP.set(functools.partial(run.give_back_while_held_up, act) if act.holds else None)
                    try:
                        for hook in run.hooks:
                            await hook.acquire(attempt.state_name, run.run_id, attempt.number)
                            entered.append(hook)
                    finally:
                        HELD_UP.reset(token)
                    if act.regrant is not None:
                        await run.grant_again(act, attempt)
                if entered:
                    run.admitted(act)
                if act.stop_reason is not None:  # stopped while a hook held it up (which took the cancel)
                    raise asyncio.CancelledError
                outcome = await executor_for(attempt.isolation).run_attempt(attempt)
            except asyncio.CancelledError as exc:
                # Stopped by the engine: a limit hit meanwhile is said with its reason (a timeout).
                result, failure, usage = None, _unasked_cancel(act, exc) or attempt.limit_hit, dict(attempt.usage)
            except AttemptFailed as failed:
                result, failure, usage = None, failed.reason, failed.usage
            except Exception as exc:
                result, failure, usage = None, exception_reason(exc), dict(attempt.usage)
            else:
                ok = True
                _returned(act)
                result, failure, usage = outcome.result, None, outcome.usage
            # What follows starts from this task (one loop iteration sooner), unless the
            # hooks it entered must let go first.
            (run.finished if entered else run.finished_here)(act, result, failure, usage)
        finally:
            for hook in reversed(entered):
                try:
                    await hook.release(attempt.state_name, run.run_id, attempt.number, ok)
                except Exception:
                    run.log.exception("admission hook %r failed to release", hook)
            if entered:
                self.kick()

    def stop(self, act: "Activation") -> None:
        """Cancel the task of a running activation (its ``stop_reason`` is set)."""
        if act.task is not None:
            act.task.cancel()


def _returned(act: "Activation") -> None:
    """``act``'s attempt returned: a preemption or pause under way is then no longer its end."""
    if act.stop_reason in RESULT_STANDS:
        act.stop_reason = None
        if act.attempt_obj is not None:
            act.attempt_obj.stop_reason = None


async def _through_cancels(tasks: Iterable[asyncio.Task[Any]],
                           until: float | None) -> tuple[set[asyncio.Task[Any]], bool]:
    """Wait for ``tasks`` until loop time ``until`` (None: for good) even if cancelled
    meanwhile: those still pending, and whether it was cancelled (the caller re-raises it
    once its cleanup is done, so that a second cancel cannot cut a cleanup short and leave
    a state's process running after ``run()`` ended)."""
    loop = asyncio.get_running_loop()
    pending = set(tasks)
    cancelled = False
    while pending:
        left = None if until is None else until - loop.time()
        if left is not None and left <= 0:
            break
        try:
            _, pending = await asyncio.wait(pending, timeout=left)
            break
        except asyncio.CancelledError:
            cancelled = True
            pending = {task for task in pending if not task.done()}
    return pending, cancelled
