"""One attempt of one state, inside a Ray worker process: the body of the state's Ray task.

The task gets the state function (cloudpickled by Ray, from the driver), the context
snapshot as encoded values and a handle on the driver's relay actor. It runs the
coroutine on an event loop of its own; each context write is encoded in the worker (an
unencodable value fails ``set_state`` right there) and pushed to the relay as it
happens, batched while a push is in flight, in order; a human-input request goes the
same way and the answer comes back through the relay. stdout and stderr (file
descriptors 1 and 2, so C extensions and subprocesses too) go to a file of the attempt's
own while it runs. The task returns one encoded value: the result or the failure, how
many frames it pushed (the driver waits for all of them before the attempt ends), the
captured output and what it measured. A Ray worker runs one task at a time, so taking
over its descriptors for the attempt is safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

from .. import errors
from ..context import Context
from ..errors import FailureReason, HumanInputError
from ..human import HumanInputRequest, human_input_hook
from . import wire

LOG_CAP = 8 * 1024 * 1024
"""At most this much of an attempt's output comes back (its tail)."""


def log_path(token: str) -> str:
    """Where the attempt with ``token`` keeps its output on the node that runs it: beside Ray's
    own worker logs, in the session's ``logs/agent`` folder (else a private temporary one)."""
    try:
        import ray._private.worker as ray_worker

        folder = os.path.join(ray_worker.global_worker.node.get_session_dir_path(), "logs", "agent")
    except Exception:  # Ray's layout is not a public API: fall back rather than fail
        folder = os.path.join(tempfile.gettempdir(), f"agent-ray-logs-{os.getuid()}")
    return os.path.join(folder, f"{token}.log")


def run_attempt(func: Callable[..., Any], snapshot: dict[str, bytes], classes: tuple[type, ...],
                meta: tuple[str, str, int, str], relay: Any) -> bytes:
    """The state's Ray task. ``classes`` only has to arrive: unpickling it defines them here."""
    run_id, state, number, token = meta
    began = time.process_time()
    with _captured(log_path(token)) as output:
        loop = asyncio.new_event_loop()
        try:
            result, failure, frames = loop.run_until_complete(
                _attempt(func, snapshot, run_id, state, number, token, relay))
        finally:
            _close(loop)
    import ray

    usage = {
        "cpu_seconds": time.process_time() - began,
        "ray_node_ip": ray.util.get_node_ip_address(),
        "ray_worker_pid": os.getpid(),
    }
    return wire.encode_end(result, failure, frames, output(), usage)


def collect_log(token: str) -> bytes | None:
    """Read and remove the output of an attempt whose worker died or was killed (runs on its node)."""
    path = log_path(token)
    try:
        with open(path, "rb") as fh:
            data = _tail(fh)
    except FileNotFoundError:
        return None
    with contextlib.suppress(OSError):
        os.unlink(path)
    return data


async def _attempt(func: Callable[..., Any], snapshot: dict[str, bytes], run_id: str, state: str,
                   number: int, token: str, relay: Any) -> tuple[Any, FailureReason | None, int]:
    pusher = Pusher(relay, token)
    result: Any = None
    failure: FailureReason | None = None
    try:
        provider = RelayedHumanInput(pusher, relay, token)
        context = Context(
            wire.decode_snapshot(snapshot), state_name=state, attempt=number, run_id=run_id,
            on_write=pusher.write, human_input=human_input_hook(provider, run_id=run_id, state=state),
        )
        result = await func(context)
    except BaseException as exc:  # noqa: BLE001 - the state's own failure, reported to the driver
        failure = _exception(exc)
    try:
        await pusher.drain()
    except Exception as exc:
        failure = failure or FailureReason(
            kind="lost_connection", message=f"the state's context writes could not reach the driver: {exc!r}")
    return result, failure, pusher.sent


def _exception(exc: BaseException) -> FailureReason:
    cls = type(exc)
    name = f"{cls.__module__}.{cls.__qualname__}"
    return FailureReason(kind="exception", message=f"{cls.__name__}: {exc}", exception_type=name,
                         traceback="".join(traceback.format_exception(exc)))


class Pusher:
    """Sends the attempt's frames to the relay in order: one push in flight, the rest batched."""

    def __init__(self, relay: Any, token: str) -> None:
        self._relay = relay
        self._token = token
        self._pending: list[bytes] = []
        self._flight: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self.sent = 0

    def write(self, key: str, value: Any, deleted: bool) -> None:
        """The context's ``on_write`` hook."""
        self.send(wire.write_frame(key, value, deleted))

    def send(self, frame: bytes) -> None:
        if self._error is not None:
            raise errors.IsolationError(f"the relay to the driver is gone: {self._error!r}")
        self._pending.append(frame)
        self.sent += 1
        if self._flight is None:
            self._flush()

    def _flush(self) -> None:
        frames, self._pending = self._pending, []
        self._flight = asyncio.ensure_future(self._push(frames))

    async def _push(self, frames: list[bytes]) -> None:
        try:
            await self._relay.push.remote(self._token, frames)
        except Exception as exc:
            self._error = exc
            self._pending.clear()
            self._flight = None
            return
        self._flight = None
        if self._pending:
            self._flush()

    async def drain(self) -> None:
        """Wait until the relay holds every frame sent so far."""
        while self._flight is not None:
            await asyncio.shield(self._flight)
        if self._error is not None:
            raise self._error


class RelayedHumanInput:
    """A human-input provider that asks the driver's provider through the relay."""

    def __init__(self, pusher: Pusher, relay: Any, token: str) -> None:
        self._pusher = pusher
        self._relay = relay
        self._token = token
        self._ids = itertools.count(1)

    async def ask(self, request: HumanInputRequest) -> str:
        request_id = next(self._ids)
        remaining = None
        if request.timeout is not None:
            remaining = max(0.0, request.created + request.timeout - time.time())
        self._pusher.send(wire.human_request(request_id, request.prompt, remaining, request.default))
        response = wire.read_human_response(await self._relay.wait_answer.remote(self._token, request_id))
        if response.error_type is not None:
            cls = getattr(errors, response.error_type, None)
            if not (isinstance(cls, type) and issubclass(cls, HumanInputError)):
                cls = HumanInputError
            raise cls(response.error or "human input failed")
        return response.answer or ""


@contextlib.contextmanager
def _captured(path: str) -> Iterator[Callable[[], bytes]]:
    """Send file descriptors 1 and 2 to ``path`` inside the block; yields a reader for after it."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    _flush_std()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    saved = (os.dup(1), os.dup(2))
    captured: list[bytes] = []
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        yield lambda: captured[0] if captured else b""
    finally:
        _flush_std()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
        with open(path, "rb") as fh:
            captured.append(_tail(fh))
        with contextlib.suppress(OSError):
            os.unlink(path)


def _tail(fh: Any) -> bytes:
    fh.seek(0, os.SEEK_END)
    size = fh.tell()
    fh.seek(max(0, size - LOG_CAP))
    data: bytes = fh.read()
    if size > LOG_CAP:
        data = f"[... the first {size - LOG_CAP} bytes of output were dropped ...]\n".encode() + data
    return data


def _flush_std() -> None:
    import sys

    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def _close(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what the state left running, then close the loop (as ``asyncio.run`` does)."""
    try:
        left = asyncio.all_tasks(loop)
        for task in left:
            task.cancel()
        if left:
            loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        loop.close()
