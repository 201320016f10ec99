"""The child's protocol logic, driven in-process over a memory transport."""

from __future__ import annotations

import asyncio

import cloudpickle

from agent.ipc import (
    FROM_CHILD,
    Cancel,
    CheckpointSnapshot,
    ContextWrite,
    Error,
    Hello,
    HumanInputRequest,
    HumanInputResponse,
    MemoryTransport,
    Preempt,
    Result,
    Run,
    decode_message,
    encode_message,
)
from agent.errors import ContextBudgetError
from agent.runtime.session import ChildSession
from agent.values import Bounds, encode

BOUNDS = Bounds()




class Peer:
    """The supervisor's end of a memory pair, speaking the real message types."""

    def __init__(self) -> None:
        self.end, child_end = MemoryTransport.pair()
        self.session = ChildSession(child_end, pid=1234, secret=b"s" * 16)

    async def start(self, func, context=None, budget=1 << 20) -> asyncio.Task[str]:
        task = asyncio.ensure_future(self.session.run())
        assert await self.recv() == Hello(pid=1234, secret=b"s" * 16)
        snapshot = {k: encode(v) for k, v in (context or {}).items()}
        self.send(Run("run", "agent", "state", 1, cloudpickle.dumps(func), cloudpickle.dumps(()),
                      snapshot, BOUNDS.max_frame, budget,
                      sum(len(k) + len(v) + 3 for k, v in snapshot.items()), {}))
        return task

    def send(self, msg) -> None:
        self.end.send(encode_message(msg))

    async def recv(self):
        return decode_message(await self.end.recv(), BOUNDS, FROM_CHILD)


class TestSession:
    """Hello, run, stream writes, report; stop when told."""

    async def test_writes_stream_before_the_result(self):
        async def state(ctx):
            ctx.set_state("n", ctx.get_state("start") + 1)
            ctx.remove_state("start")
            return "next"

        peer = Peer()
        task = await peer.start(state, {"start": 41})
        assert await peer.recv() == ContextWrite("n", False, 42)
        assert await peer.recv() == ContextWrite("start", True, None)
        result = await peer.recv()
        assert isinstance(result, Result) and result.value == "next"
        assert await task == "result"

    async def test_exception_is_reported_with_traceback(self):
        async def state(ctx):
            raise KeyError("missing")

        peer = Peer()
        task = await peer.start(state)
        error = await peer.recv()
        assert isinstance(error, Error) and error.exception_type == "builtins.KeyError"
        assert "in state" in error.traceback and "KeyError: 'missing'" in error.traceback
        assert await task == "error"

    async def test_cancel_stops_the_coroutine(self):
        async def state(ctx):
            ctx.set_state("started", True)
            try:
                await asyncio.get_running_loop().create_future()
            finally:
                ctx.set_state("cleaned_up", True)

        peer = Peer()
        task = await peer.start(state)
        await peer.recv()  # the write: the state is running
        peer.send(Cancel(reason="timeout"))
        assert await peer.recv() == ContextWrite("cleaned_up", False, True)
        assert await task == "stopped"

    async def test_preempt_sends_the_written_keys(self):
        async def state(ctx):
            ctx.set_state("a", 1)
            ctx.set_state("b", 2)
            await asyncio.get_running_loop().create_future()

        peer = Peer()
        task = await peer.start(state)
        await peer.recv()
        await peer.recv()
        peer.send(Preempt(reason="preempt"))
        assert await peer.recv() == CheckpointSnapshot(keys=["a", "b"])
        assert await task == "stopped"


class TestHumanInput:
    """The validator runs in the child; a default ends the asking."""

    async def test_reask_until_valid(self):
        async def state(ctx):
            return await ctx.human_in_the_loop("age?", timeout=60, validator=str.isdigit)

        peer = Peer()
        task = await peer.start(state)
        for answer in ("ten", "10"):
            request = await peer.recv()
            assert isinstance(request, HumanInputRequest) and request.prompt == "age?"
            assert 0 < request.timeout <= 60
            peer.send(HumanInputResponse(request.request_id, answer, None, None))
        result = await peer.recv()
        assert result.value == "10"
        await task

    async def test_a_validator_that_raises_rejects_the_answer(self):
        async def state(ctx):
            return await ctx.human_in_the_loop("n?", timeout=60, validator=lambda x: int(x) > 0)

        peer = Peer()
        task = await peer.start(state)
        for answer in ("notanint", "5"):
            request = await peer.recv()
            assert isinstance(request, HumanInputRequest)
            peer.send(HumanInputResponse(request.request_id, answer, None, None))
        assert (await peer.recv()).value == "5"
        await task

    async def test_the_time_running_out_gives_the_default(self):
        """The supervisor says the time is up; the default, which the validator need not
        pass, is the answer. An answer that only equals the default is validated."""
        async def state(ctx):
            return await ctx.human_in_the_loop("score?", timeout=5, validator=str.isdigit, default="n/a")

        peer = Peer()
        task = await peer.start(state)
        request = await peer.recv()
        assert request.default == "n/a"
        peer.send(HumanInputResponse(request.request_id, "n/a", None, None))  # typed by a human: rejected
        again = await peer.recv()
        assert isinstance(again, HumanInputRequest) and again.rejected == "'n/a' is not valid"
        peer.send(HumanInputResponse(again.request_id, None, "HumanInputTimeoutError", "no valid answer"))
        assert (await peer.recv()).value == "n/a"
        await task

    async def test_error_from_the_provider(self):
        async def state(ctx):
            from agent.errors import HumanInputTimeoutError

            try:
                await ctx.human_in_the_loop("hello?", timeout=1)
            except HumanInputTimeoutError as exc:
                return f"raised {exc}"

        peer = Peer()
        task = await peer.start(state)
        request = await peer.recv()
        peer.send(HumanInputResponse(request.request_id, None, "HumanInputTimeoutError", "nobody"))
        assert (await peer.recv()).value == "raised nobody"
        await task


class TestBoundsInTheChild:
    """The child holds the supervisor to the same bounds, and keeps the run's budget itself."""

    async def test_a_deep_snapshot_value_is_refused_not_crashed_on(self):
        async def state(ctx):
            return "ran"

        peer = Peer()
        task = asyncio.ensure_future(peer.session.run())
        await peer.recv()
        deep = b"\x92\xc7\x00\x01" * 300 + b"\x91\xc7\x00\x01"
        peer.send(Run("run", "agent", "state", 1, cloudpickle.dumps(state), cloudpickle.dumps(()),
                      {"deep": deep}, BOUNDS.max_frame, 1 << 20, 0, {}))
        error = await peer.recv()
        assert isinstance(error, Error) and error.exception_type == "agent.errors.BoundExceededError"
        assert "nested deeper than 64 levels" in error.message
        assert await task == "error"

    async def test_the_budget_counts_the_whole_run(self):
        async def state(ctx):
            ctx.set_state("fits", b"x" * 100)
            try:
                ctx.set_state("too_much", b"x" * 1000)
            except ContextBudgetError as exc:
                return str(exc)

        peer = Peer()
        # 1,000 bytes of budget, 800 taken by keys this child does not see.
        task = asyncio.ensure_future(peer.session.run())
        await peer.recv()
        peer.send(Run("run", "agent", "state", 1, cloudpickle.dumps(state), cloudpickle.dumps(()),
                      {}, BOUNDS.max_frame, 1000, 800, {}))
        assert (await peer.recv()).key == "fits"
        result = await peer.recv()
        assert "context key 'too_much'" in result.value
        assert await task == "result"
