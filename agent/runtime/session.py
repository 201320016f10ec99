"""The child's side of the protocol, over any :class:`~agent.ipc.Transport`.

Say hello, receive the state function and the context snapshot, run the coroutine
with a Context whose writes stream to the supervisor and whose human input is asked
through it, stop when told, and report the result or the error.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sys
import time
import traceback
from typing import Any, Callable, NoReturn

import cloudpickle

from .. import errors, remote, values
from ..context import Context, ContextBudget
from ..human import _rejection
from ..errors import (
    HumanInputError,
    HumanInputTimeoutError,
    ProtocolError,
    ValueTooLargeError,
)
from ..ipc import (
    Cancel,
    CheckpointSnapshot,
    ContextWrite,
    CoordinationRequest,
    CoordinationResponse,
    Error,
    Hello,
    HumanInputRequest,
    HumanInputResponse,
    Preempt,
    Result,
    Run,
    Transport,
    Welcome,
    decode_message,
    encode_message,
)
from ..ipc.messages import FROM_SUPERVISOR
from ..scope import ContextScope, ScopedContext
from ..values import Bounds
from . import main_module


class ChildSession:
    """Runs one state attempt as told by the supervisor at the other end of ``transport``.

    A worker serves many sessions over one channel, which it reads itself for its whole
    life: ``reads=False`` leaves the channel to it, and it hands the session the messages
    of its attempt (:meth:`deliver`, :meth:`refuse`). ``hold_report``: the attempt's last
    message (result, error or checkpoint keys) is kept in :attr:`report`, encoded, for
    the caller to send (a worker sends it with its next hello, in one write), instead of
    being sent at once.
    """

    def __init__(
        self,
        transport: Transport,
        *,
        pid: int,
        secret: bytes = b"",
        bounds: Bounds | None = None,
        before_run: Callable[[], None] | None = None,
        context_keys: list[str] | None = None,
        reads: bool = True,
        hold_report: bool = False,
    ) -> None:
        self._transport = transport
        self._reads = reads
        self._hold_report = hold_report
        self.report: bytes | None = None
        self._before_run = before_run
        # The supervisor sends only the keys in scope; the scope makes other keys an error.
        self._scope = None if context_keys is None else ContextScope(context_keys)
        self._pid = pid
        self._process = os.getpid()  # a process the state forks is not this one (_from_a_fork)
        self._secret = secret
        self._bounds = bounds or Bounds()
        self._pending: dict[int, asyncio.Future[HumanInputResponse]] = {}
        self._taking: dict[int, asyncio.Future[CoordinationResponse]] = {}
        self._ids = itertools.count(1)
        self._task: asyncio.Task[Any] | None = None
        self._stop: str | None = None
        self._written: list[str] = []
        self._classes: tuple[type, ...] = ()
        self._greeted = False
        self._ended = False
        self._welcomed = False
        self._reader: asyncio.Task[None] | None = None

    def hello(self) -> None:
        """Say hello (done by :meth:`run` unless called before, to overlap the handshake)."""
        if not self._greeted:
            self._greeted = True
            self._send(Hello(pid=self._pid, secret=self._secret))

    async def run(self, first: Run | None = None) -> str:
        """Serve the attempt; returns how it ended (``result``, ``error``, ``stopped``).

        ``first`` is its ``run`` when the caller said hello and read it already.
        """
        if first is None:
            self.hello()
            first = self._decode(await self._transport.recv())
        if not isinstance(first, Run):
            return "stopped"
        try:
            func, context = self._prepare(first)
            if self._before_run is not None:
                self._before_run()  # e.g. enter the sandbox: code is loaded, none has run
        except BaseException as exc:  # loading the function or the snapshot, or confinement
            self._report_error(exc)
            return "error"
        self._task = asyncio.ensure_future(_call(func, context))
        reader = self._reader = asyncio.ensure_future(self._read()) if self._reads else None
        remote.set_link(self)  # mutex() and ResourceAllocation in the state's code ask the supervisor
        try:
            try:
                value = await self._task
            except asyncio.CancelledError as exc:
                if self._stop is None:
                    serving = asyncio.current_task()
                    if serving is not None and serving.cancelling():
                        raise
                    self._report_error(exc)  # the state's own code raised it: a failure, not a stop
                    return "error"
                if self._stop == "preempt":
                    self._report(CheckpointSnapshot(keys=list(dict.fromkeys(self._written))))
                return "stopped"
            except BaseException as exc:
                self._report_error(exc)
                return "error"
            if type(value) is _Raised:
                self._report_error(value.exc)
                return "error"
            value = values.plain_names(value)
            try:
                self._check_result(value)
            except errors.UnencodableValueError as exc:
                problem = values.transition_problem(value)
                if problem is not None:  # no transition either: refused for that, in these words, as inline
                    self._report(Result(not_a_transition=problem, value=None))
                    return "result"
                if type(exc) is errors.UnencodableValueError:  # names no state has
                    self._report(Result(value=values.names_as_text(value)))
                    return "result"
                self._report_error(exc)
                return "error"
            self._report(Result(value=value))
            return "result"
        finally:
            self._ended = True  # what it left on the event loop may not write the next attempt's context
            remote.set_link(None)
            if reader is not None:
                reader.cancel()
            for fut in (*self._pending.values(), *self._taking.values()):
                fut.cancel()

    def _prepare(self, run: Run) -> tuple[Callable[..., Any], Context]:
        self._bounds = Bounds(max_frame=run.max_frame)
        # Unpickled only from the supervisor; a child's frames are never unpickled.
        func = cloudpickle.loads(run.function)
        # Classes the snapshot needs; held so that they stay findable when not importable.
        self._classes = cloudpickle.loads(run.classes)
        main_module.adopt(func, *self._classes)  # pickle finds them in __main__, as in the program
        snapshot, sizes = {}, {}
        for key, data in run.context.items():
            decoded = values.decode(data, self._bounds, import_modules=True)
            snapshot[key] = decoded.value
            sizes[key] = values.entry_size(key, decoded.size)
        # The run's whole context counts, also keys this snapshot leaves out.
        budget = ContextBudget(run.context_budget, max(run.context_bytes, sum(sizes.values())), sizes)
        context = Context(
            snapshot,
            state_name=run.state_name,
            attempt=run.attempt,
            run_id=run.run_id,
            on_write=self._on_write,
            human_input=self._ask_human,
            budget=budget,
        )
        context._failures = run.failures
        if self._scope is not None:
            context = ScopedContext.over(context, self._scope)
        return func, context

    # --- outgoing -------------------------------------------------------------------------

    def _send(self, msg: Any) -> None:
        if os.getpid() != self._process:
            _from_a_fork(msg)
        self._transport.send(encode_message(msg))

    def _report(self, msg: Any) -> None:
        """The attempt's last message: sent, or kept in :attr:`report` (``hold_report``).

        The CPU time this thread has run since it last stopped is not yet in its cgroup (the
        kernel adds it at the next scheduler tick, or when the thread stops running), and
        the supervisor reads the cgroup as soon as the report comes: reading the thread's
        own CPU clock makes the kernel add it now, without giving up the CPU."""
        time.thread_time()
        if self._hold_report:
            if os.getpid() != self._process:
                _from_a_fork(msg)
            self.report = encode_message(msg)
        else:
            self._send(msg)

    def _check_result(self, value: Any) -> None:
        """The return value must be in the model and fit in one message."""
        size = values.check(value, "the state's return value", self._bounds)
        cap = self._bounds.max_frame
        if size > cap:
            raise ValueTooLargeError(
                f"the state's return value encodes to {size:,} bytes, over the {cap:,}-byte limit "
                "of one message between processes: keep large data in a file and return a state name"
            )

    def _on_write(self, key: str, value: Any, deleted: bool) -> None:
        # Context.set_state has checked the value and the run's budget already.
        if self._ended:  # a callback the state left on a worker's loop, run after it ended
            raise errors.ContextError(
                f"context key {key!r}: this state's attempt has ended, so its context takes no more writes "
                "(a callback it left behind, such as loop.call_later, ran after it returned)"
            )
        self._send(ContextWrite(key=key, value=None if deleted else value, deleted=deleted))
        self._written.append(key)

    def _report_error(self, exc: BaseException) -> None:
        if os.getpid() != self._process:
            _fork_ends(exc)
        tb = errors.traceback_text(exc)
        name = errors.exception_type_name(type(exc))
        self._report(Error(exception_type=name, message=errors.exception_text(exc) or type(exc).__name__, traceback=tb))

    async def _ask_human(
        self,
        prompt: str,
        timeout: float | None = None,
        validator: Callable[[str], bool] | None = None,
        default: str | None = None,
    ) -> str:
        """Ask through the supervisor; the validator runs here and re-asks until it passes."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        question, attempt, rejected = next(self._ids), 1, None
        while True:
            remaining = None if deadline is None else max(0.0, deadline - loop.time())
            request_id = next(self._ids)
            fut: asyncio.Future[HumanInputResponse] = loop.create_future()
            self._pending[request_id] = fut
            self._send(HumanInputRequest(request_id=request_id, prompt=prompt, timeout=timeout, default=default,
                                         question=question, attempt=attempt, rejected=rejected, left=remaining))
            try:
                response = await fut
            finally:
                self._pending.pop(request_id, None)
            if response.error_type == HumanInputTimeoutError.__name__ and default is not None:
                return default  # the supervisor says the time is up (and why), the default stays here
            if response.error_type is not None:
                raise _named_error(response.error_type, response.error or "", HumanInputError)
            answer = response.answer or ""
            rejected = await _rejection(validator, answer)  # a validator that raises rejects, as inline
            if rejected is None:
                return answer
            attempt += 1  # asked again with what is left of the timeout: none left is a timeout there

    async def take(self, kind: str, name: str, owner: str | None, amount: float, ttl: float | None,
                   timeout: float | None) -> int:
        """Take a primitive of the supervisor's coordinator (:class:`agent.remote.CoordinationLink`)."""
        request_id = next(self._ids)
        fut: asyncio.Future[CoordinationResponse] = asyncio.get_running_loop().create_future()
        self._taking[request_id] = fut
        task = asyncio.current_task()
        self._send(CoordinationRequest(request_id=request_id, op="take", kind=kind, name=name, owner=owner,
                                       task=0 if task is self._task or task is None else id(task),
                                       amount=float(amount), ttl=ttl, timeout=timeout))
        try:
            response = await fut
        except BaseException:
            self.give_back(request_id)  # cancelled while waiting: a grant on its way is returned
            raise
        finally:
            self._taking.pop(request_id, None)
        if response.error_type == errors.DaemonUnavailableError.__name__:
            raise errors.DaemonUnavailableError(response.error or "")  # agentd went, as inline
        if response.error_type is not None:
            raise _named_error(response.error_type, response.error or "", errors.CoordinationError)
        return request_id

    def give_back(self, holding: int) -> None:
        self._send(CoordinationRequest(request_id=holding, op="give_back", kind="", name="", owner=None, task=0,
                                       amount=0.0, ttl=None, timeout=None))

    # --- incoming -------------------------------------------------------------------------

    def _decode(self, frame: bytes) -> Any:
        return decode_message(frame, self._bounds, FROM_SUPERVISOR)

    async def _read(self) -> None:
        while True:
            try:
                msg = self._decode(await self._transport.recv())
            except ProtocolError as exc:
                self.refuse(exc)
                return
            self.deliver(msg)

    def deliver(self, msg: Any) -> None:
        """A message from the supervisor, for the attempt in progress."""
        if isinstance(msg, HumanInputResponse):
            fut = self._pending.get(msg.request_id)
            if fut is not None and not fut.done():
                fut.set_result(msg)
        elif isinstance(msg, CoordinationResponse):
            taking = self._taking.get(msg.request_id)
            if taking is not None and not taking.done():
                taking.set_result(msg)
        elif isinstance(msg, Preempt):
            self._stop_task("preempt")
        elif isinstance(msg, Cancel):
            self._stop_task(msg.reason or "cancel")
        elif isinstance(msg, Welcome):
            self._welcomed = True

    def refuse(self, exc: ProtocolError) -> None:
        """The supervisor broke the protocol: the state stops."""
        self._stop_task(f"protocol error from the supervisor: {exc}")

    async def welcomed(self, timeout: float) -> None:
        """Wait (at most ``timeout`` seconds) until the supervisor believed the hello: a
        connection closed before then could no longer show whose it was (:class:`Welcome`)."""
        if self._reader is not None:
            await asyncio.wait([self._reader])  # cancelled by run(): it stops watching the channel first
        try:
            async with asyncio.timeout(timeout):
                while not self._welcomed:
                    if isinstance(self._decode(await self._transport.recv()), Welcome):
                        self._welcomed = True
        except (TimeoutError, ConnectionError, ProtocolError):
            pass

    def _stop_task(self, reason: str) -> None:
        if self._stop is None:
            self._stop = reason
        if self._task is not None:
            self._task.cancel()


class _Raised:
    """What the state raised that asyncio would carry out of the event loop (``SystemExit``,
    ``KeyboardInterrupt``): a failed attempt like any other exception, reported by the
    session, while the child (a worker's next state among them) serves on."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


async def _call(func: Callable[..., Any], context: Context) -> Any:
    try:
        return await func(context)
    except (SystemExit, KeyboardInterrupt, GeneratorExit) as exc:
        return _Raised(exc)


def _named_error(type_name: str, message: str, base: type[Exception]) -> Exception:
    """The error the supervisor named (a subclass of ``base`` in :mod:`agent.errors`), else ``base``."""
    cls = getattr(errors, type_name, None)
    if isinstance(cls, type) and issubclass(cls, base):
        return cls(message)
    return base(message)


def _from_a_fork(msg: Any) -> None:
    """A process the state forked (``os.fork``) got to a message for the supervisor: the
    attempt's connection is the state's own process's, and a second writer on it would
    garble it. A copy that ran the state to its end exits quietly (its outcome is not the
    attempt's; a fork bomb whose copies return is judged by its own process alone); any
    other message is refused in it (an error ends it: :func:`_fork_ends`)."""
    if isinstance(msg, Result):
        os._exit(0)
    raise errors.IsolationError(
        f"process {os.getpid()} was forked by the state, whose connection to the supervisor only "
        "the state's own process may use: write the context, ask for input or coordinate from "
        "there (send what a forked process found back over a pipe, or use multiprocessing)"
    )


def _fork_ends(exc: BaseException) -> NoReturn:
    """A process the state forked ran the state to an exception: it ends as a Python
    program would, with ``sys.exit``'s code, or its traceback printed and status 1."""
    if isinstance(exc, SystemExit):
        code = exc.code
        if code is None or isinstance(code, int):
            os._exit(code or 0)
        print(code, file=sys.stderr, flush=True)
    else:
        traceback.print_exception(exc)
        sys.stderr.flush()
    os._exit(1)
