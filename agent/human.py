"""Human input: questions a state asks, and the providers that answer them.

A state calls ``context.human_in_the_loop(prompt, timeout, validator, default)``; the
engine turns that into :func:`ask_human` on the agent's provider (DESIGN.md item 13):

* the provider gets a :class:`HumanInputRequest` and returns the human's text;
* an answer the validator rejects (returns false or raises) is asked for again as the
  *same* request id with ``attempt`` one higher and ``rejected`` saying why, so a web
  app or ``agentctl respond`` keeps addressing one question;
* ``timeout`` bounds the whole exchange, re-asks included; when it passes the default
  is returned, or :class:`~agent.errors.HumanInputTimeoutError` raised without one.

Providers: :class:`ConsoleInputProvider` (a terminal or a pipe, read on the event loop,
no thread) and :class:`QueueInputProvider` (programmatic: tests, web apps, a daemon).
"""

from __future__ import annotations

import asyncio
import inspect
import os
import stat
import sys
import threading
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, replace
from typing import Any, Protocol, TextIO, runtime_checkable

from ._loops import call_in
from .clock import SYSTEM_CLOCK, Clock
from . import _validate
from .errors import HumanInputError, HumanInputTimeoutError, InvalidConfigurationError, ValueTooLargeError

Validator = Callable[[str], Any]

MAX_TEXT = 200_000
"""Characters a prompt, a default or an answer may have: a human's text, not a payload
(pass data through the context). It fits the smallest frame between processes, so a
question and its answer reach an isolated state whole; a longer answer is asked again."""


@dataclass(frozen=True)
class HumanInputRequest:
    """One question to a human. ``created`` is wall-clock time (seconds since the epoch)."""

    id: str
    prompt: str
    run_id: str = ""
    state: str | None = None
    timeout: float | None = None
    default: str | None = None
    created: float = 0.0
    attempt: int = 1
    rejected: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain data, to send over IPC or show in a UI."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HumanInputRequest":
        try:
            return cls(**data)
        except TypeError as exc:
            raise HumanInputError(f"malformed human input request: {exc}") from exc


@runtime_checkable
class HumanInputProvider(Protocol):
    """Answers human input requests; ``ask`` may be cancelled (the request then goes away)."""

    async def ask(self, request: HumanInputRequest) -> str: ...


# --- asking ---------------------------------------------------------------------------


async def ask_human(
    provider: HumanInputProvider,
    prompt: str,
    *,
    timeout: float | None = None,
    validator: Validator | None = None,
    default: str | None = None,
    run_id: str = "",
    state: str | None = None,
    max_attempts: int | None = None,
    clock: Clock = SYSTEM_CLOCK,
    request_id: str | None = None,
    attempt: int = 1,
    rejected: str | None = None,
    left: float | None = None,
    default_there: bool = False,
) -> str:
    """Ask ``provider`` until an answer passes ``validator``; see the module docstring.

    ``max_attempts`` bounds the re-asks: after that many rejected answers the default
    is returned, or HumanInputError raised without one. ``request_id``, ``attempt``,
    ``rejected`` and ``left`` (the seconds left of ``timeout``) continue a question asked
    before: a state in another process validates its answers there and asks again through
    here (:func:`ask_relayed`); the provider and the errors see the whole ``timeout``.
    ``default_there``: a timeout raises HumanInputTimeoutError even with a default, for the
    process that validates the answers to fall back to it (an answer equal to the default is
    then still validated).
    """
    timeout = check_question(prompt, timeout, validator, default)
    _validate.integer(max_attempts, "max_attempts", error=InvalidConfigurationError, minimum=1, none=True)
    if timeout is None:
        deadline = None
    else:
        wait = timeout if left is None or not 0 <= left < timeout else left
        deadline = clock.monotonic() + wait
    request = HumanInputRequest(
        id=request_id or new_request_id(), prompt=prompt, run_id=run_id, state=state,
        timeout=timeout, default=default, created=clock.time(), attempt=attempt, rejected=rejected,
    )
    while True:
        answer = await _ask_once(provider, request, deadline, clock)
        if answer is None:
            if default is not None and not default_there:
                return default
            where = f" (state {state!r})" if state else ""
            if request.rejected is None:
                raise HumanInputTimeoutError(
                    f"nobody answered {prompt!r} within {timeout:g} s{where}: "
                    "pass default= to continue without an answer, or a longer timeout"
                )
            raise HumanInputTimeoutError(
                f"no valid answer to {prompt!r} within {timeout:g} s{where}: {request.attempt - 1} "
                f"rejected (last: {request.rejected}); pass default= or a longer timeout"
            )
        why = _too_long(answer) or _unencodable(answer) or await _rejection(validator, answer)
        if why is None:
            return answer
        if max_attempts is not None and request.attempt >= max_attempts:
            if default is not None:
                return default
            raise HumanInputError(
                f"{request.attempt} answers to {prompt!r} were rejected (last: {why}): "
                "pass default= or a larger max_attempts"
            )
        request = replace(request, attempt=request.attempt + 1, rejected=why)


async def _ask_once(
    provider: HumanInputProvider, request: HumanInputRequest, deadline: float | None, clock: Clock
) -> str | None:
    """The provider's answer, or None when ``deadline`` passed first. A provider that fails
    raises HumanInputError ("human input failed: ..."), inline as from a child."""
    try:
        return await _ask_provider(provider, request, deadline, clock)
    except (HumanInputError, asyncio.CancelledError):
        raise
    except Exception as exc:
        raise HumanInputError(f"human input failed: {exc!r}") from exc


async def _ask_provider(
    provider: HumanInputProvider, request: HumanInputRequest, deadline: float | None, clock: Clock
) -> str | None:
    if deadline is None:
        return _checked(await _asked(provider, request))
    if clock.monotonic() >= deadline:
        return None
    asking = asyncio.ensure_future(_asked(provider, request))
    timer = asyncio.ensure_future(clock.sleep_until(deadline))
    try:
        await asyncio.wait({asking, timer}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        # On timeout, or when we are cancelled, the provider withdraws the request.
        for task in (timer, asking):
            if not task.done():
                task.cancel()
        await asyncio.gather(timer, asking, return_exceptions=True)
    if asking.cancelled():
        return None
    return _checked(asking.result())


def _asked(provider: HumanInputProvider, request: HumanInputRequest) -> Awaitable[str]:
    asked = provider.ask(request)
    if not inspect.isawaitable(asked):
        raise HumanInputError(
            f"a human input provider's ask() must be async: {type(provider).__name__}.ask returned "
            f"{type(asked).__name__}; define it with async def"
        )
    return asked


def _checked(answer: Any) -> str:
    if not isinstance(answer, str):
        raise HumanInputError(f"a human input provider returned {type(answer).__name__}, not str")
    return answer


def check_question(prompt: Any, timeout: Any, validator: Any, default: Any) -> float | None:
    """Check a question's arguments where it is asked, the same at every isolation level;
    returns ``timeout`` as seconds (None: no limit)."""
    if not isinstance(prompt, str):
        raise InvalidConfigurationError(f"a human input prompt must be a str, got {type(prompt).__name__}")
    if default is not None and not isinstance(default, str):
        raise InvalidConfigurationError(
            f"a human input default must be a str or None (what the answer would have been), "
            f"got {type(default).__name__}"
        )
    for what, text in (("prompt", prompt), ("default", default)):
        if text is None:
            continue
        try:
            text.encode()
        except UnicodeEncodeError as exc:
            raise InvalidConfigurationError(
                f"a human input {what} must be text UTF-8 can encode, for the human to read: "
                f"{text[exc.start:exc.end]!r} at position {exc.start} is not ({exc.reason})"
            ) from None
        if len(text) > MAX_TEXT:
            raise ValueTooLargeError(
                f"a human input {what} of {len(text):,} characters is over the {MAX_TEXT:,}-character limit: "
                "pass data through the context, and ask the human about it"
            )
    if validator is not None and not callable(validator):
        raise InvalidConfigurationError(
            f"a human input validator must be callable (answer -> bool) or None, got {type(validator).__name__}"
        )
    if validator is not None:
        _validate.one_argument(validator, "a human input validator", error=InvalidConfigurationError,
                               takes="the answer (a str), returning whether it is valid")
    return _validate.number(timeout, "human input timeout", error=InvalidConfigurationError, none=True,
                            unit="seconds")


def _too_long(answer: str) -> str | None:
    if len(answer) <= MAX_TEXT:
        return None
    return f"an answer of {len(answer):,} characters is over the {MAX_TEXT:,}-character limit"


def _unencodable(answer: str) -> str | None:
    try:
        answer.encode()
    except UnicodeEncodeError as exc:
        return f"an answer must be text UTF-8 can encode ({exc.reason} at position {exc.start})"
    return None


def new_request_id() -> str:
    """A fresh id for a question to a human."""
    return uuid.uuid4().hex[:12]


async def ask_relayed(context: Any, asked: dict[int, str], question: int, prompt: str, timeout: float | None,
                      default: str | None, attempt: int, rejected: str | None, left: float | None = None,
                      *, default_there: bool = True) -> str:
    """Ask, through ``context``'s hook, what a state in another process (a child, a Ray task)
    asks: that process validates the answers, and each re-ask of its ``question`` keeps the
    question's request id (kept in ``asked``), with its ``attempt``, why the last answer was
    ``rejected`` and the seconds ``left`` of its ``timeout``, as an inline state's would. A
    hook that cannot take them (one given to a Context by hand) gets the plain question.
    ``default_there``: the time being up raises HumanInputTimeoutError, and that process
    falls back to its default (a child); else the default is the answer (a Ray task, whose
    own question has a deadline and default of its own)."""
    hook = context._human_hook()
    if hook is None or not _takes_request_id(hook):
        return str(await context.human_in_the_loop(prompt=prompt, timeout=timeout if left is None else left,
                                                   validator=None, default=default))
    request_id = asked.setdefault(question, new_request_id())
    return str(await hook(prompt=prompt, timeout=timeout, validator=None, default=default,
                          request_id=request_id, attempt=attempt, rejected=rejected, left=left,
                          default_there=default_there))


def _takes_request_id(hook: Callable[..., Any]) -> bool:
    try:
        parameters = inspect.signature(hook).parameters.values()
    except (TypeError, ValueError):  # no signature to read: asked as a plain question
        return False
    return any(p.name == "request_id" or p.kind is p.VAR_KEYWORD for p in parameters)


async def _rejection(validator: Validator | None, answer: str) -> str | None:
    """Why ``validator`` rejects ``answer``, or None when it accepts it. An ``async def``
    validator (one that looks the answer up somewhere) is awaited."""
    if validator is None:
        return None
    try:
        ok = validator(answer)
        if inspect.isawaitable(ok):
            ok = await ok
    except Exception as exc:  # a validator like int() signals "invalid" by raising
        return f"{answer!r} is not valid: {type(exc).__name__}: {exc}"
    return None if ok else f"{answer!r} is not valid"


def human_input_hook(
    provider: HumanInputProvider,
    *,
    run_id: str = "",
    state: str | None = None,
    clock: Clock = SYSTEM_CLOCK,
) -> Callable[..., Any]:
    """The ``human_input`` hook a :class:`~agent.context.Context` view calls, for one state."""

    async def hook(
        prompt: str, timeout: float | None = None, validator: Validator | None = None, default: str | None = None,
        **asked: Any,
    ) -> str:
        return await ask_human(
            provider, prompt, timeout=timeout, validator=validator, default=default,
            run_id=run_id, state=state, clock=clock, **asked,
        )

    return hook


# --- the programmatic provider ----------------------------------------------------------


@dataclass
class _Pending:
    request: HumanInputRequest
    future: asyncio.Future[str]
    loop: asyncio.AbstractEventLoop
    delivered: bool = False


class QueueInputProvider:
    """Questions wait in a list until code answers them: tests, web apps, a daemon.

    ``pending()`` lists open requests, ``answer(id, text)`` answers one (from any task,
    or from another thread), ``await wait_for_request()`` returns each request (and each
    re-ask of a rejected one) once, in the order they were asked.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, _Pending] = {}
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    async def ask(self, request: HumanInputRequest) -> str:
        loop = asyncio.get_running_loop()
        entry = _Pending(request, loop.create_future(), loop)
        with self._lock:
            if request.id in self._pending:
                raise HumanInputError(f"human input request {request.id} is already pending")
            self._pending[request.id] = entry
            waiters, self._waiters = self._waiters, []
        for waiter_loop, waiter in waiters:
            call_in(waiter_loop, _set_none, waiter)
        try:
            return await entry.future
        finally:
            with self._lock:
                if self._pending.get(request.id) is entry:
                    del self._pending[request.id]

    def pending(self) -> list[HumanInputRequest]:
        """Requests waiting for an answer, oldest first."""
        with self._lock:
            return [p.request for p in self._pending.values()]

    def answer(self, request_id: str, text: str) -> None:
        """Answer the pending request ``request_id``; raises HumanInputError when there is none
        or for text UTF-8 cannot encode, ValueTooLargeError for an answer over
        :data:`MAX_TEXT` characters (both still pending)."""
        if not isinstance(text, str):
            raise HumanInputError(f"an answer is a str, got {type(text).__name__}")
        if len(text) > MAX_TEXT:
            raise ValueTooLargeError(f"{_too_long(text)}: answer with less, and pass data through the context")
        unencodable = _unencodable(text)
        if unencodable is not None:  # (a lone surrogate, as json.loads('"\\ud800"') gives): still pending
            raise HumanInputError(f"{unencodable}: answer with valid text")
        with self._lock:
            entry = self._pending.pop(request_id, None)
            open_ids = list(self._pending)
        if entry is None:
            raise HumanInputError(
                f"no pending human input request {request_id!r} (answered, timed out or never "
                f"asked); pending now: {', '.join(open_ids) or 'none'}"
            )
        call_in(entry.loop, _set_result, entry.future, text)

    async def wait_for_request(self) -> HumanInputRequest:
        """The oldest request not yet returned by this method; waits for one if none."""
        loop = asyncio.get_running_loop()
        while True:
            with self._lock:
                for entry in self._pending.values():
                    if not entry.delivered:
                        entry.delivered = True
                        return entry.request
                waiter: asyncio.Future[None] = loop.create_future()
                self._waiters.append((loop, waiter))
            try:
                await waiter
            finally:
                with self._lock:
                    if (loop, waiter) in self._waiters:
                        self._waiters.remove((loop, waiter))


def _set_result(future: asyncio.Future[str], text: str) -> None:
    if not future.done():
        future.set_result(text)


def _set_none(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


# --- the console provider -----------------------------------------------------------------


class ConsoleInputProvider:
    """Asks on a terminal, one question at a time, reading with the event loop (no thread).

    Input is read from ``input_fd`` (stdin by default) with ``loop.add_reader``, so a
    timed-out or cancelled question leaves no blocked thread behind; a pipe or a file
    works the same way, one answer per line. Once the input has ended, every question
    raises :class:`~agent.errors.HumanInputError`.
    """

    def __init__(self, input_fd: int | None = None, output: TextIO | None = None) -> None:
        self._fd = input_fd  # None: whatever sys.stdin is when a question is asked
        self._out = output
        self._ended = False  # the input reached its end
        self._buffer = bytearray()
        self._busy: asyncio.Lock | None = None
        self._busy_loop: asyncio.AbstractEventLoop | None = None

    async def ask(self, request: HumanInputRequest) -> str:
        loop = asyncio.get_running_loop()
        if self._busy is None or self._busy_loop is not loop:
            self._busy, self._busy_loop = asyncio.Lock(), loop
        async with self._busy:
            if not self._ended:
                out = self._out if self._out is not None else sys.stdout
                out.write(format_request(request))
                out.flush()
                line = await self._read_line(loop)
                if line is not None:
                    return line
                self._ended = True
        raise HumanInputError("standard input is closed: nobody can answer on this console")

    async def _read_line(self, loop: asyncio.AbstractEventLoop) -> str | None:
        """The next line (None: the input ended)."""
        while b"\n" not in self._buffer:
            chunk = await self._read_chunk(loop)
            if not chunk:
                if self._buffer:
                    break
                return None
            self._buffer += chunk
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer = bytearray(rest)
        return line.decode("utf-8", errors="replace").rstrip("\r")

    async def _read_chunk(self, loop: asyncio.AbstractEventLoop) -> bytes:
        fd = sys.stdin.fileno() if self._fd is None else self._fd
        future: asyncio.Future[bytes] = loop.create_future()

        def readable() -> None:
            try:
                data = os.read(fd, 4096)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if not future.done():
                    future.set_exception(HumanInputError(f"cannot read the console: {exc}"))
                return
            if not future.done():
                future.set_result(data)

        try:
            loop.add_reader(fd, readable)
        except (PermissionError, ValueError, NotImplementedError):
            return os.read(fd, 4096)  # a regular file never blocks
        try:
            return await future
        finally:
            loop.remove_reader(fd)


def format_request(request: HumanInputRequest) -> str:
    """How a console shows a request."""
    lines = []
    if request.rejected:
        lines.append(f"  {request.rejected}; please answer again.")
    where = f"[{request.state}] " if request.state else ""
    extra = []
    if request.default is not None:
        extra.append(f"default {request.default!r}")
    if request.timeout is not None:
        extra.append(f"{request.timeout:g}s")
    suffix = f" ({', '.join(extra)})" if extra else ""
    lines.append(f"{where}{request.prompt}{suffix} > ")
    return "\n".join(lines)


# --- defaults -----------------------------------------------------------------------------

class PipedInputProvider:
    """Answers from a pipe or a file and from code at once: each question is read from
    ``console`` and waits in ``queue`` too, and the first answer wins; once the input has
    ended, the queue alone answers (``echo approve | python flow.py``, or a web app)."""

    def __init__(self, console: ConsoleInputProvider, queue: QueueInputProvider) -> None:
        self.console = console
        self.queue = queue

    async def ask(self, request: HumanInputRequest) -> str:
        read = asyncio.ensure_future(self.console.ask(request))
        queued = asyncio.ensure_future(self.queue.ask(request))
        try:
            done, _ = await asyncio.wait((read, queued), return_when=asyncio.FIRST_COMPLETED)
            if queued not in done and read.exception() is None:
                return read.result()
            return await queued  # answered from code, or the input ended
        finally:
            for task in (read, queued):
                task.cancel()
            await asyncio.gather(read, queued, return_exceptions=True)


_defaults_lock = threading.Lock()
_process_queue: QueueInputProvider | None = None
_console: ConsoleInputProvider | None = None
_piped: PipedInputProvider | None = None


def process_queue() -> QueueInputProvider:
    """The process's one programmatic provider (what agents use when stdin is no terminal)."""
    global _process_queue
    with _defaults_lock:
        if _process_queue is None:
            _process_queue = QueueInputProvider()
        return _process_queue


def default_provider() -> HumanInputProvider:
    """Where answers come from by default: standard input when it is a terminal, a pipe or
    a file (``echo approve | python flow.py``; questions asked once it has ended wait in
    :func:`process_queue`), else :func:`process_queue` (no stdin, ``/dev/null``, a test
    runner's)."""
    global _console, _piped
    stdin = stdin_kind()
    queue = process_queue()
    if stdin is None:
        return queue
    with _defaults_lock:
        if _console is None:
            _console = ConsoleInputProvider()
        if stdin == "terminal":
            return _console
        if _piped is None:
            _piped = PipedInputProvider(_console, queue)
        return _piped


def stdin_kind() -> str | None:
    """What standard input is, when it can carry answers: ``"terminal"`` or ``"pipe"`` (a
    pipe, a socket or a file); None otherwise."""
    stdin = sys.stdin
    try:
        if stdin is None:
            return None
        if stdin.isatty():
            return "terminal"
        mode = os.fstat(stdin.fileno()).st_mode
    except (ValueError, OSError, AttributeError):  # closed, detached, or not a file (a test runner's)
        return None
    return "pipe" if stat.S_ISFIFO(mode) or stat.S_ISREG(mode) or stat.S_ISSOCK(mode) else None
