"""Each way a state's process can go wrong: the attempt fails with the right kind,
the process is gone (a worker that does not stop is replaced), and the supervisor keeps serving."""

from __future__ import annotations

import asyncio
import errno
import gc
import os
import signal

import msgpack
import psutil
import pytest
import zmq

from agent.context import Context
from agent.executor import AttemptFailed
from agent.ipc.zmtp import DealerTransport
from agent.supervisor import current_supervisor

from agent.executor import Isolation

from . import helpers
from .helpers import make_attempt, run, state_process_gone

pytestmark = pytest.mark.usefixtures("level")

# --- state functions (module level: the child imports this module to load them) ------------


async def ok_state(context):
    return "done"


async def raising_state(context):
    raise ValueError("bad input row 7")


async def exit_state(context):
    os._exit(3)


async def segfault_state(context):
    os.kill(os.getpid(), signal.SIGSEGV)


async def crashing_in_native_code(context):
    import ctypes

    ctypes.string_at(0)  # reads address 0: SIGSEGV inside C


async def aborting_state(context):
    os.abort()


async def hanging_state(context):
    context.set_state("pid", os.getpid())
    await asyncio.get_running_loop().create_future()


async def stubborn_state(context):
    context.set_state("pid", os.getpid())
    while True:  # ignores cancellation: only SIGKILL ends it
        try:
            await asyncio.get_running_loop().create_future()
        except asyncio.CancelledError:
            pass


async def unencodable_state(context):
    context.set_state("handle", object())
    return "unreachable"


async def unencodable_caught_state(context):
    from agent.errors import UnencodableValueError

    try:
        context.set_state("lock", asyncio.Lock())
    except UnencodableValueError as exc:
        return f"caught: {exc}"
    return "not raised"


async def huge_state(context):
    context.set_state("blob", b"\0" * (200 * 1024 * 1024))
    return "unreachable"


def _own_transport() -> DealerTransport:
    (transport,) = [o for o in gc.get_objects() if isinstance(o, DealerTransport) and o._sock.fileno() >= 0]
    return transport


async def garbage_state(context):
    _own_transport().send(b"\xc1\xc1 not msgpack at all")
    await asyncio.get_running_loop().create_future()


async def oversized_state(context):
    _own_transport().send(b"x" * (70 * 1024 * 1024))
    await asyncio.get_running_loop().create_future()


async def wrong_version_state(context):
    frame = msgpack.packb({"v": 99, "t": "log", "level": "info", "message": "hi"})
    _own_transport().send(frame)
    await asyncio.get_running_loop().create_future()


async def wrong_routing_id_state(context):
    endpoint = _own_transport().endpoint
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.ROUTING_ID, b"not-my-secret")
    sock.connect(endpoint)
    sock.send(msgpack.packb({"v": 1, "t": "result", "value": msgpack.packb("forged")}))
    await asyncio.get_running_loop().create_future()


# --- helpers ------------------------------------------------------------------------------


async def failed(func, **kwargs) -> AttemptFailed:
    with pytest.raises(AttemptFailed) as info:
        await run(make_attempt(func, **kwargs))
    return info.value


async def still_serving() -> None:
    assert (await run(make_attempt(ok_state))).result == "done"


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class TestStateFailures:
    """Failures of the state's own making are reported with their kind."""

    async def test_exception_carries_type_message_and_child_traceback(self):
        exc = await failed(raising_state)
        assert exc.reason.kind == "exception"
        assert exc.reason.exception_type == "builtins.ValueError"
        assert "bad input row 7" in exc.reason.message
        assert "raising_state" in exc.reason.traceback
        await still_serving()

    async def test_os_exit_reports_exit_code(self):
        exc = await failed(exit_state)
        assert (exc.reason.kind, exc.reason.exit_code) == ("exit_code", 3)
        await still_serving()

    async def test_sigsegv_reports_signal(self):
        exc = await failed(segfault_state)
        assert (exc.reason.kind, exc.reason.signal) == ("signal", signal.SIGSEGV)
        assert "SIGSEGV" in exc.reason.message
        await still_serving()

    async def test_a_crash_in_native_code_says_which_python_line_it_was_on(self):
        exc = await failed(crashing_in_native_code)
        assert (exc.reason.kind, exc.reason.signal) == ("signal", signal.SIGSEGV)
        assert "native code" in exc.reason.message and "traceback shows the Python line" in exc.reason.message
        assert "Fatal Python error: Segmentation fault" in exc.reason.traceback
        assert "in crashing_in_native_code" in exc.reason.traceback
        await still_serving()

    async def test_an_abort_says_it_aborted_and_where(self):
        exc = await failed(aborting_state)
        assert (exc.reason.kind, exc.reason.signal) == ("signal", signal.SIGABRT)
        assert exc.reason.message.startswith("the state's process aborted (abort()")
        assert "closes every descriptor" not in exc.reason.message  # its log is there: it did not close it
        assert "in aborting_state" in exc.reason.traceback
        await still_serving()


class TestLaunchFailures:
    async def test_a_spec_that_cannot_be_written_fails_only_its_attempt(self, monkeypatch: pytest.MonkeyPatch):
        if helpers.LEVEL is Isolation.WORKER:
            pytest.skip("a warm worker takes the attempt: no spec is written for it")
        await still_serving()  # the supervisor is up, children are parked

        def no_descriptor_left(name: str, flags: int = 0) -> int:
            raise OSError(errno.EMFILE, "Too many open files")

        monkeypatch.setattr(os, "memfd_create", no_descriptor_left)
        exc = await failed(ok_state)
        monkeypatch.undo()
        assert exc.reason.kind == "exit_code"
        assert "could not be started" in exc.reason.message and "Too many open files" in exc.reason.message
        await still_serving()


class TestValuesOverTheBoundary:
    """Bad writes fail set_state inside the child, with a message that says what to do."""

    async def test_unencodable_value_fails_the_attempt(self):
        exc = await failed(unencodable_state)
        assert exc.reason.kind == "exception"
        assert exc.reason.exception_type == "agent.errors.UnencodableValueError"
        for part in ("'handle'", "builtins.object", "TypedContextData"):
            assert part in exc.reason.message
        assert exc.reason.permanent

    async def test_unencodable_value_raises_in_set_state(self):
        attempt = make_attempt(unencodable_caught_state)
        outcome = await run(attempt)
        assert outcome.result.startswith("caught: context key 'lock'")
        assert "lock" not in attempt.context

    async def test_value_over_the_budget_fails_in_the_child(self):
        attempt = make_attempt(huge_state)
        with pytest.raises(AttemptFailed) as info:
            await run(attempt)
        assert info.value.reason.exception_type == "agent.errors.ContextBudgetError"
        assert "storing 200.0 MiB" in info.value.reason.message
        assert "blob" not in attempt.context
        await still_serving()


class TestProtocolViolations:
    """A process that breaks the protocol is killed; the attempt fails with kind protocol."""

    @pytest.mark.parametrize(
        "func, words",
        [
            (garbage_state, "malformed"),
            (oversized_state, "cap"),
            (wrong_version_state, "protocol version 99"),
            (wrong_routing_id_state, "never said a valid hello"),
        ],
        ids=["garbage", "oversized", "wrong-version", "wrong-routing-id"],
    )
    async def test_violation_kills_the_child_and_supervisor_keeps_running(self, func, words):
        if func is wrong_routing_id_state and helpers.LEVEL is Isolation.WORKER:
            pytest.skip("a worker's channel is a socket of its own: there is no routing id to forge")
        sup = current_supervisor()
        before = sup.statistics().protocol_violations if sup else 0
        exc = await failed(func)
        assert exc.reason.kind == "protocol"
        assert words in exc.reason.message
        assert current_supervisor().statistics().protocol_violations > before
        await still_serving()


class TestStopping:
    """A cancelled attempt leaves no process behind, whether or not the state cooperates."""

    async def _started(self, func, reason: str):
        started = asyncio.Event()
        ctx = Context(on_write=lambda key, value, deleted: started.set())
        attempt = make_attempt(func, context=ctx)
        task = asyncio.ensure_future(run(attempt))
        await started.wait()
        attempt.stop_reason = reason
        return attempt, task

    async def test_timeout_via_wait_for_stops_the_state(self):
        attempt, task = await self._started(hanging_state, "timeout")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(task, timeout=0.01)
        assert state_process_gone(attempt.context.get_state("pid"))
        await still_serving()

    async def test_state_ignoring_cancel_is_killed_after_grace(self):
        attempt, task = await self._started(stubborn_state, "cancel")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert gone(attempt.context.get_state("pid"))

    async def test_cancel_before_the_child_says_hello(self):
        task = asyncio.ensure_future(run(make_attempt(hanging_state)))
        await asyncio.sleep(0)  # let it launch: the fork request is sent, nothing more
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await still_serving()
