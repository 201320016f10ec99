"""Calling into an event loop from another thread (a web request's, the status endpoint's,
another run's that shares a pool or a coordination primitive), and registering callbacks
that outlive their caller."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from ._stdio import open_standard_streams

T = TypeVar("T")

_log = logging.getLogger("agent")


def runs_elsewhere(loop: asyncio.AbstractEventLoop | None) -> bool:
    """Whether ``loop`` runs now, and not as this thread's own loop."""
    return loop is not None and not loop.is_closed() and loop.is_running() and asyncio._get_running_loop() is not loop


_LOOP_POLL = 0.05  # seconds between looks at whether a loop call_on waits for still runs


def call_on(loop: Any, func: Callable[[], T], timeout: float | None = None) -> T:
    """``func()``, run on ``loop`` when that loop runs on another thread (its result or its
    exception comes back here, within ``timeout`` seconds, else ``TimeoutError``); run here
    when there is no such loop, or it is this thread's own, or (no ``timeout``) when that
    loop stops before it ran ``func``."""
    if not runs_elsewhere(loop):
        return func()
    done: concurrent.futures.Future[T] = concurrent.futures.Future()

    def on_the_loop() -> None:
        if not done.set_running_or_notify_cancel():
            return  # given up on (its loop stopped first): it ran here instead
        try:
            done.set_result(func())
        except BaseException as exc:
            done.set_exception(exc)

    try:
        loop.call_soon_threadsafe(on_the_loop)
    except RuntimeError:  # closed meanwhile
        return func()
    if timeout is not None:
        return done.result(timeout)
    while True:
        try:
            return done.result(_LOOP_POLL)
        except concurrent.futures.TimeoutError:
            if not runs_elsewhere(loop) and done.cancel():
                return func()


class LoopGone(Exception):
    """The loop :func:`awaited_on` was to run a coroutine on stopped before it did."""


async def awaited_on(loop: asyncio.AbstractEventLoop, make: Callable[[], Awaitable[T]]) -> T:
    """``await make()`` run on ``loop``, another thread's running loop; its outcome (or its
    exception) comes back here. The outcome is handed over from inside that coroutine, so
    a loop that stops right after it (``run_until_complete`` returning) still delivers it.
    :class:`LoopGone` when the loop stopped for good without running it.
    """
    outcome: concurrent.futures.Future[T] = concurrent.futures.Future()

    async def there() -> None:
        try:
            outcome.set_result(await make())
        except BaseException as exc:
            outcome.set_exception(exc)

    coro = there()
    try:
        asyncio.run_coroutine_threadsafe(coro, loop)
    except RuntimeError:  # closed already
        coro.close()
        raise LoopGone from None
    waiting = asyncio.wrap_future(outcome)
    while not outcome.done():
        await asyncio.wait([waiting], timeout=_LOOK_AGAIN)
        if not outcome.done() and (loop.is_closed() or not loop.is_running()):
            waiting.cancel()
            raise LoopGone
    return await waiting


_LOOK_AGAIN = 0.05
"""Seconds between two looks at whether the loop :func:`awaited_on` waits on still runs."""


def outside_caller(func: Callable[..., T], *args: Any) -> T:
    """``func(*args)`` in an empty :class:`contextvars.Context`.

    A loop callback copies the context variables of whoever registered it. One kept for
    the process's life (the supervisor's readers) or a worker's (its channel and output)
    would otherwise hold the first attempt's variables, and through them its run and
    agent, long after both are done: an agent dropped with ``del`` stayed alive, and so
    did the coordination primitives it declared.
    """
    return contextvars.Context().run(func, *args)


def locked(method: Callable[..., T]) -> Callable[..., T]:
    """Run ``method`` under its object's ``lock`` (an RLock): for what runs on the event
    loops of several threads, such as a shared pool or coordination primitive."""
    @functools.wraps(method)
    def under_lock(self: Any, *args: Any, **kwargs: Any) -> T:
        with self.lock:
            return method(self, *args, **kwargs)
    return under_lock


def call_in(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> bool:
    """Run ``fn(*args)`` now when ``loop`` is this thread's, else hand it to that loop;
    False (and nothing run) when that loop is closed."""
    if loop is asyncio._get_running_loop():
        fn(*args)
        return True
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # closed
        return False
    return True


def grant_soon(future: asyncio.Future[None], give_back: Callable[[], None] | None = None) -> None:
    """Tell the waiter awaiting ``future`` that it was granted what it waited for, on the
    waiter's own loop (:func:`call_in`).

    ``give_back()`` runs instead when nobody can take the grant any more: the waiter left
    (``future`` is done, cancelled) before the news reached it, or its loop is closed.
    """
    def grant() -> None:
        if not future.done():
            future.set_result(None)
        elif give_back is not None:
            give_back()

    if not call_in(future.get_loop(), grant) and give_back is not None:
        give_back()


def fail_soon(future: asyncio.Future[Any], error: BaseException) -> None:
    """Fail ``future`` with ``error`` (unless it is done by then), on its own loop
    (:func:`call_in`); not at all when that loop is closed: nobody awaits it."""
    def fail() -> None:
        if not future.done():
            future.set_exception(error)

    call_in(future.get_loop(), fail)


def run_to_end(main: Coroutine[Any, Any, T], grace: float) -> T:
    """``main`` run on a fresh uvloop loop, as ``asyncio.run`` does (Ctrl-C cancels it), but
    the loop's teardown does not wait forever for tasks that ignore their cancellation.

    ``asyncio.run`` cancels the tasks still there at the end and waits for every one: an
    inline state that swallows ``CancelledError`` (which the run gave up on after its
    ``cleanup_timeout``) kept ``run_sync()`` from ever returning. Here what is left gets
    ``grace`` seconds after its cancellation; what still runs then is named in a warning
    and abandoned with the loop.
    """
    import uvloop

    open_standard_streams()
    runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    try:
        return runner.run(main)
    finally:
        loop = runner.get_loop()
        stubborn: set[asyncio.Task[Any]] = set()
        try:
            stubborn = loop.run_until_complete(_cancel_leftovers(grace))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.close()
            for task in stubborn:  # closed now, not whenever the collector finds it
                try:
                    task.get_coro().close()
                except RuntimeError:  # it ignored GeneratorExit too
                    pass


async def _cancel_leftovers(grace: float) -> set[asyncio.Task[Any]]:
    here = asyncio.current_task()
    left = [task for task in asyncio.all_tasks() if task is not here]
    for task in left:
        task.cancel()
    if not left:
        return set()
    _, stubborn = await asyncio.wait(left, timeout=grace)
    for task in left:
        if task.done() and not task.cancelled() and task.exception() is not None:
            _log.error("a task left at the end of the run failed: %r", task, exc_info=task.exception())
    if stubborn:
        _log.warning("%d task(s) still run %.3g s after their cancellation and are abandoned with the "
                     "event loop (a state that swallows CancelledError?): %s",
                     len(stubborn), grace, ", ".join(sorted(t.get_name() for t in stubborn)))
    return stubborn
