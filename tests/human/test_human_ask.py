"""ask_human semantics (DESIGN.md item 13) against the programmatic provider."""

from __future__ import annotations

import asyncio
import threading

import pytest

from agent.context import Context
from agent.errors import HumanInputError, HumanInputTimeoutError, InvalidConfigurationError
from agent.human import (
    HumanInputProvider,
    HumanInputRequest,
    QueueInputProvider,
    ask_human,
    human_input_hook,
)


def is_score(text: str) -> bool:
    return text.isdigit() and 0 <= int(text) <= 100


class TestValidation:
    """A rejected answer is asked again as the same request with a higher attempt."""

    async def test_rejected_then_accepted(self, clock):
        provider = QueueInputProvider()
        task = asyncio.create_task(
            ask_human(provider, "Enter score (0-100):", validator=is_score, run_id="r1", state="score", clock=clock)
        )
        first = await provider.wait_for_request()
        assert (first.attempt, first.rejected, first.run_id, first.state) == (1, None, "r1", "score")
        provider.answer(first.id, "lots")
        second = await provider.wait_for_request()
        assert second.id == first.id
        assert second.attempt == 2
        assert "'lots' is not valid" in second.rejected
        assert provider.pending() == [second]
        provider.answer(second.id, "87")
        assert await task == "87"
        assert provider.pending() == []

    async def test_validator_that_raises_counts_as_rejection(self, clock):
        provider = QueueInputProvider()
        task = asyncio.create_task(ask_human(provider, "n?", validator=int, clock=clock))
        request = await provider.wait_for_request()
        provider.answer(request.id, "x")
        again = await provider.wait_for_request()
        assert "ValueError" in again.rejected
        provider.answer(again.id, "0")  # int("0") is falsy but did not raise: still rejected
        third = await provider.wait_for_request()
        assert third.attempt == 3
        provider.answer(third.id, "7")
        assert await task == "7"

    async def test_max_attempts_falls_back_to_default(self, clock):
        provider = QueueInputProvider()
        task = asyncio.create_task(
            ask_human(provider, "yes/no", validator=lambda a: a in ("yes", "no"), default="no", max_attempts=2,
                      clock=clock)
        )
        for _ in range(2):
            provider.answer((await provider.wait_for_request()).id, "maybe")
        assert await task == "no"

    async def test_max_attempts_without_default_raises(self, clock):
        provider = QueueInputProvider()
        task = asyncio.create_task(
            ask_human(provider, "yes/no", validator=lambda a: False, max_attempts=1, clock=clock)
        )
        provider.answer((await provider.wait_for_request()).id, "maybe")
        with pytest.raises(HumanInputError, match="rejected"):
            await task


class TestTimeout:
    """On timeout the default is used, or HumanInputTimeoutError raised without one."""

    async def test_timeout_returns_default(self, clock):
        provider = QueueInputProvider()
        task = asyncio.create_task(ask_human(provider, "score?", timeout=60, default="50", clock=clock))
        request = await provider.wait_for_request()
        assert (request.timeout, request.default) == (60, "50")
        await clock.advance(60)
        assert await task == "50"
        assert provider.pending() == []

    async def test_timeout_without_default_raises(self, clock):
        provider = QueueInputProvider()
        task = asyncio.create_task(ask_human(provider, "approve?", timeout=300, state="review", clock=clock))
        await provider.wait_for_request()
        await clock.advance(300)
        with pytest.raises(HumanInputTimeoutError, match="'approve\\?'.*300 s.*'review'"):
            await task
        assert provider.pending() == []

    async def test_answer_before_deadline_wins(self, clock):
        provider = QueueInputProvider()
        task = asyncio.create_task(ask_human(provider, "q", timeout=10, default="d", clock=clock))
        request = await provider.wait_for_request()
        await clock.advance(9.5)
        provider.answer(request.id, "a")
        assert await task == "a"

    async def test_timeout_covers_reasks(self, clock):
        provider = QueueInputProvider()
        task = asyncio.create_task(
            ask_human(provider, "q", timeout=10, validator=lambda a: a == "ok", default="d", clock=clock)
        )
        first = await provider.wait_for_request()
        await clock.advance(6)
        provider.answer(first.id, "bad")
        await provider.wait_for_request()
        await clock.advance(4)
        assert await task == "d"

    async def test_late_answer_is_refused(self, clock):
        provider = QueueInputProvider()
        task = asyncio.create_task(ask_human(provider, "q", timeout=1, default="d", clock=clock))
        request = await provider.wait_for_request()
        await clock.advance(1)
        assert await task == "d"
        with pytest.raises(HumanInputError, match="no pending human input request"):
            provider.answer(request.id, "too late")

    async def test_zero_timeout_uses_default_without_asking(self, clock):
        provider = QueueInputProvider()
        assert await ask_human(provider, "q", timeout=0, default="d", clock=clock) == "d"
        assert provider.pending() == []

    async def test_negative_timeout_is_rejected(self, clock):
        with pytest.raises(InvalidConfigurationError, match="timeout"):
            await ask_human(QueueInputProvider(), "q", timeout=-1, clock=clock)


class TestConcurrency:
    """Answers may come from other tasks and threads, in any order."""

    async def test_answer_from_another_task(self, clock):
        provider = QueueInputProvider()

        async def reviewer() -> None:
            request = await provider.wait_for_request()
            provider.answer(request.id, f"approved {request.prompt}")

        helper = asyncio.create_task(reviewer())
        assert await ask_human(provider, "draft 3", clock=clock) == "approved draft 3"
        await helper

    async def test_answer_from_another_thread(self, clock):
        provider = QueueInputProvider()
        task = asyncio.create_task(ask_human(provider, "q", clock=clock))
        request = await provider.wait_for_request()
        thread = threading.Thread(target=provider.answer, args=(request.id, "from a thread"))
        thread.start()
        assert await task == "from a thread"
        thread.join()

    async def test_two_requests_answered_out_of_order(self, clock):
        provider = QueueInputProvider()
        first = asyncio.create_task(ask_human(provider, "first", clock=clock))
        second = asyncio.create_task(ask_human(provider, "second", clock=clock))
        r1 = await provider.wait_for_request()
        r2 = await provider.wait_for_request()
        assert [r1.prompt, r2.prompt] == ["first", "second"]
        assert r1.id != r2.id
        provider.answer(r2.id, "answer two")
        assert await second == "answer two"
        assert not first.done()
        assert provider.pending() == [r1]
        provider.answer(r1.id, "answer one")
        assert await first == "answer one"

    async def test_cancelled_question_is_withdrawn(self, clock):
        provider = QueueInputProvider()
        task = asyncio.create_task(ask_human(provider, "q", clock=clock))
        request = await provider.wait_for_request()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert provider.pending() == []
        with pytest.raises(HumanInputError):
            provider.answer(request.id, "nobody listens")

    async def test_non_string_answer_is_refused(self, clock):
        provider = QueueInputProvider()
        task = asyncio.create_task(ask_human(provider, "q", clock=clock))
        request = await provider.wait_for_request()
        with pytest.raises(HumanInputError, match="str"):
            provider.answer(request.id, 42)  # type: ignore[arg-type]
        provider.answer(request.id, "42")
        assert await task == "42"


class _NumberProvider:
    """A provider returning something that is not text."""

    async def ask(self, request: HumanInputRequest) -> str:
        return 7  # type: ignore[return-value]


class TestProviderContract:
    """Providers are checked, and the context hook goes through ask_human."""

    def test_providers_satisfy_protocol(self):
        assert isinstance(QueueInputProvider(), HumanInputProvider)

    async def test_provider_returning_non_text(self, clock):
        with pytest.raises(HumanInputError, match="int, not str"):
            await ask_human(_NumberProvider(), "q", clock=clock)

    async def test_context_human_in_the_loop_uses_the_hook(self, clock):
        provider = QueueInputProvider()
        hook = human_input_hook(provider, run_id="run-9", state="get_user_input", clock=clock)
        context = Context(run_id="run-9", human_input=hook)
        task = asyncio.create_task(
            context.human_in_the_loop(
                prompt="Enter score (0-100):", timeout=60, validator=is_score, default="50"
            )
        )
        request = await provider.wait_for_request()
        assert (request.run_id, request.state) == ("run-9", "get_user_input")
        provider.answer(request.id, "101")
        await provider.wait_for_request()
        await clock.advance(60)
        assert await task == "50"

    def test_request_round_trips_as_plain_data(self):
        request = HumanInputRequest(id="abc", prompt="p", run_id="r", state="s", timeout=3.0, default="d",
                                    created=5.0, attempt=2, rejected="no")
        assert HumanInputRequest.from_dict(request.to_dict()) == request
        with pytest.raises(HumanInputError):
            HumanInputRequest.from_dict({"id": "x"})
