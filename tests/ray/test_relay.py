"""The relay on its own (no cluster): acknowledged long-polls, answers, and the driver's end."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("ray")

from agent.context import Context
from agent.executor import Attempt
from agent.ray import wire
from agent.ray.executor import RelayLink
from agent.ray.relay import Relay


async def noop(context):
    return None


class TestRelay:
    """take() returns what is not acknowledged yet; answers meet their waiters either way round."""

    async def test_entries_stay_until_acknowledged(self):
        relay = Relay()
        await relay.push("a", [b"1", b"2"])
        await relay.push("b", [b"3"])
        first, entries = await relay.take(0, 0)
        assert (first, entries) == (0, [("a", [b"1", b"2"]), ("b", [b"3"])])
        # A long-poll whose answer got lost: the same entries again.
        assert await relay.take(0, 0) == (0, entries)
        await relay.push("a", [b"4"])
        assert await relay.take(2, 0) == (2, [("a", [b"4"])])
        assert relay.statistics()["entries"] == 1

    async def test_take_waits_for_a_push(self):
        relay = Relay()
        taking = asyncio.ensure_future(relay.take(0, 30))
        await asyncio.sleep(0)
        assert not taking.done()
        await relay.push("a", [b"x"])
        assert await taking == (0, [("a", [b"x"])])

    async def test_take_gives_up_after_its_wait(self):
        assert await Relay().take(0, 0.01) == (0, [])

    async def test_answers_before_and_after_the_wait(self):
        relay = Relay()
        await relay.answer("a", 1, b"early")
        assert await relay.wait_answer("a", 1) == b"early"
        waiting = asyncio.ensure_future(relay.wait_answer("a", 2))
        await asyncio.sleep(0)
        await relay.answer("a", 2, b"late")
        assert await waiting == b"late"

    async def test_forget_releases_an_ended_attempt(self):
        relay = Relay()
        waiting = asyncio.ensure_future(relay.wait_answer("a", 1))
        await relay.answer("a", 9, b"unasked")
        await asyncio.sleep(0)
        await relay.forget("a")
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert relay.statistics() == {"entries": 0, "answers": 0, "waiting": 0}


class FakeRelay:
    """The actor's handle as the driver sees it, over a local Relay (``.remote()`` awaitables)."""

    def __init__(self) -> None:
        self.relay = Relay()
        self.takes = 0

    def options(self, name: str) -> "FakeRelay":
        return self

    def remote(self) -> "FakeRelay":
        return self

    @property
    def take(self):
        outer = self

        class Take:
            @staticmethod
            def remote(seen, wait):
                outer.takes += 1
                return outer.relay.take(seen, wait)

        return Take


def attempt_with(context: Context) -> Attempt:
    return Attempt("run", "agent", "state", noop, 1, context=context)


class TestRelayLink:
    """The driver's long-poll delivers frames in order, and starts again after it ended."""

    async def test_frames_reach_their_attempt_in_order(self):
        fake = FakeRelay()
        link = RelayLink()
        link.actor_class = fake
        context = Context()
        channel = link.open("t1", attempt_with(context))
        await fake.relay.push("t1", [wire.write_frame("k", 1, False), wire.write_frame("k", 2, False)])
        await fake.relay.push("other", [wire.write_frame("k", 99, False)])  # an ended attempt's: dropped
        await channel.settled(2, 5)
        assert context.get_state("k") == 2
        link.close("t1")

    async def test_a_poll_that_ended_while_idle_is_started_again(self):
        fake = FakeRelay()
        link = RelayLink()
        link.actor_class = fake
        link.open("t1", attempt_with(Context()))
        link.close("t1")
        await fake.relay.push("late", [b"x"])  # the poll returns with nobody left: it ends
        for _ in range(10):
            await asyncio.sleep(0)
        context = Context()
        channel = link.open("t2", attempt_with(context))
        await fake.relay.push("t2", [wire.write_frame("after", True, False)])
        await channel.settled(1, 5)
        assert context.get_state("after") is True
        link.close("t2")
