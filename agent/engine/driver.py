"""The asyncio side of a run: attempts as tasks, timers, eager inline stepping, executor calls.

:class:`~agent.engine.run.Run` decides what runs when; this module makes it happen on
the event loop and reports every attempt's end back through ``run.finished``.

Inline states without admission hooks are started *eagerly* by the run: the coroutine
is stepped synchronously, and only if it really awaits something is it handed here to
go on in a task. A no-op state therefore costs no task and no loop iteration, which is
what makes inline runs fast.
"""

from __future__ import annotations

import asyncio
import functools
import traceback
import types
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

from .._types import StopReason
from ..errors import FailureReason, exception_text
from ..executor import Attempt, AttemptFailed, executor_for

if TYPE_CHECKING:
    from .run import Activation, Run


class Returned:
    """What :func:`inline_runner` yields when the coroutine it runs has returned: ``value``
    is what it returned. One per runner, reused: a state's own awaitables never yield one."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: Any = None


@types.coroutine
def inline_runner(coro: Any) -> Generator[Any, Any, None]:
    """Runs inline state coroutines one after another, each stepped with ``send``.

    Started with ``send(None)``, then given each next coroutine with ``send(coro)``. A
    coroutine that returns comes back as a :class:`Returned`; one that awaits
    something leaves the runner in the middle of it (a task continues it,
    :class:`_Resume`), and one that raises ends the runner. Stepping each coroutine
    with ``coro.send(None)`` would raise and catch a StopIteration per state, which
    costs more than everything else a no-op state does.
    """
    done = Returned()
    while True:
        done.value = yield from coro
        coro = yield done


class _Resume:
    """Continues an :func:`inline_runner` stepped eagerly, inside a Task, until its coroutine returns."""

    __slots__ = ("coro", "first")

    def __init__(self, coro: Any, first: Any) -> None:
        self.coro = coro
        self.first = first

    def __await__(self) -> Generator[Any, Any, Any]:
        coro = self.coro
        yielded = self.first
        while True:
            try:
                sent = yield yielded
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # noqa: BLE001 - delivered into the coroutine
                try:
                    yielded = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    yielded = coro.send(sent)
                except StopIteration as stop:
                    return stop.value
            if type(yielded) is Returned:
                return yielded.value


def exception_reason(exc: BaseException) -> FailureReason:
    """A state's own exception as a failure reason."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return FailureReason(kind="exception", message=f"{type(exc).__name__}: {exception_text(exc)}", traceback=tb,
                         exception_type=type(exc).__name__)


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

    async def drive(self, deadline: float | None) -> None:
        """Pump until the run is done; on ``deadline`` (run clock) the run times out."""
        run = self.run
        loop = self.loop
        timer = None
        try:
            if deadline is not None:
                timer = loop.call_later(max(0.0, deadline - run.clock()), run.time_out)
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
        tasks = run.stop_all(reason)
        if tasks:
            await asyncio.wait(tasks, timeout=run.cleanup_timeout or None)
        run.abandon()
        for handle in self.handles:
            handle.cancel()
        self.handles.clear()
        await self.settled()

    async def settled(self) -> None:
        """Wait until every attempt's process is gone, even if cancelled meanwhile (then
        re-raised): a run never returns before its processes, cgroups and logs are done."""
        cancelled = False
        while self.settling:
            try:
                await asyncio.wait(list(self.settling))
            except asyncio.CancelledError:
                cancelled = True
        if cancelled:
            raise asyncio.CancelledError

    # --- attempts ----------------------------------------------------------------------

    def continue_inline(self, act: "Activation", coro: Any, first: Any) -> None:
        """An inline state the run stepped (``coro``: its :func:`inline_runner`) awaits
        something (``first``): go on in a task."""
        act.task = task = self.loop.create_task(self._continue_inline(act, coro, first))
        task.add_done_callback(functools.partial(self._task_done, act))

    def start_attempt(self, act: "Activation", attempt: Attempt) -> None:
        """Run ``attempt`` through its executor (and the admission hooks) in a task."""
        act.attempt_obj = attempt
        attempt.settle = self.settling
        act.task = task = self.loop.create_task(self._run_attempt(act, attempt))
        task.add_done_callback(functools.partial(self._task_done, act))

    def _task_done(self, act: "Activation", task: asyncio.Task[Any]) -> None:
        # A task cancelled before its first step never ran its own handler.
        run = self.run
        if run.running.get(act.state) is act and act.task is task:
            run.finished(act, None, None, {})

    async def _continue_inline(self, act: "Activation", coro: Any, first: Any) -> None:
        run = self.run
        try:
            result = await _Resume(coro, first)
        except asyncio.CancelledError:
            run.finished(act, None, None, {})
            return
        except Exception as exc:
            run.finished(act, None, exception_reason(exc), {})
            return
        run.finished(act, result, None, {})

    async def _run_attempt(self, act: "Activation", attempt: Attempt) -> None:
        run = self.run
        entered: list[Any] = []
        ok = False
        try:
            for hook in run.hooks:
                await hook.acquire(attempt.state_name, run.run_id, attempt.number)
                entered.append(hook)
            if entered:
                run.admitted(act)
            outcome = await executor_for(attempt.isolation).run_attempt(attempt)
        except asyncio.CancelledError:
            run.finished(act, None, None, dict(attempt.usage))
        except AttemptFailed as failed:
            run.finished(act, None, failed.reason, failed.usage)
        except Exception as exc:
            run.finished(act, None, exception_reason(exc), dict(attempt.usage))
        else:
            ok = True
            run.finished(act, outcome.result, None, outcome.usage)
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
