"""Calling into an event loop from another thread (a web request's, the status endpoint's)."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def call_on(loop: Any, func: Callable[[], T], timeout: float | None = None) -> T:
    """``func()``, run on ``loop`` when that loop runs on another thread (its result or its
    exception comes back here, within ``timeout`` seconds, else ``TimeoutError``); run here
    when there is no such loop, or it is this thread's own."""
    if loop is None or loop.is_closed() or not loop.is_running() or asyncio._get_running_loop() is loop:
        return func()
    done: concurrent.futures.Future[T] = concurrent.futures.Future()

    def on_the_loop() -> None:
        try:
            done.set_result(func())
        except BaseException as exc:
            done.set_exception(exc)

    loop.call_soon_threadsafe(on_the_loop)
    return done.result(timeout)
