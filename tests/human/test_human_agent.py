"""Human input through a running Agent: the engine's hook, pause, and the default provider."""

from __future__ import annotations

import asyncio

from agent import Agent, Context
from agent.human import QueueInputProvider


def review_agent(provider: QueueInputProvider) -> Agent:
    agent = Agent("review", isolation="inline", human_input=provider)

    async def get_user_input(context: Context):
        score = await context.human_in_the_loop(
            prompt="Enter score (0-100):",
            timeout=60,
            validator=lambda x: x.isdigit() and 0 <= int(x) <= 100,
            default="50",
        )
        context.set_state("user_score", int(score))
        return "process_score"

    async def process_score(context: Context):
        context.set_state("done", True)

    agent.add_state("get_user_input", get_user_input)
    agent.add_state("process_score", process_score)
    return agent


class TestAgentHumanInput:
    """A state's question reaches the agent's provider with its run and state."""

    async def test_answer_after_a_rejection(self):
        provider = QueueInputProvider()
        agent = review_agent(provider)
        run = asyncio.create_task(agent.run())
        first = await provider.wait_for_request()
        assert (first.state, first.run_id, first.timeout, first.default) == ("get_user_input", agent.run_id, 60, "50")
        provider.answer(first.id, "150")
        again = await provider.wait_for_request()
        assert again.attempt == 2
        provider.answer(again.id, "87")
        context = await run
        assert (context.get_state("user_score"), context.get_state("done")) == (87, True)

    async def test_pause_withdraws_the_question_and_resume_asks_again(self):
        provider = QueueInputProvider()
        agent = review_agent(provider)
        run = asyncio.create_task(agent.run())
        first = await provider.wait_for_request()
        checkpoint = await agent.pause()
        assert provider.pending() == []
        assert checkpoint.running_states == [] and "get_user_input" in checkpoint.pending_states
        resumed = asyncio.create_task(agent.resume())
        again = await provider.wait_for_request()
        assert again.id != first.id and again.state == "get_user_input"
        provider.answer(again.id, "12")
        await resumed
        await run
        assert agent.context.get_state("user_score") == 12


class _FailingProvider:
    async def ask(self, request):
        raise RuntimeError("provider exploded")


async def _asks(context: Context):
    try:
        await context.human_in_the_loop("ok?", timeout=5)
    except Exception as exc:  # what the state's code can catch
        context.set_state("caught", [type(exc).__name__, str(exc)])


class TestAProviderThatFails:
    """The state gets the same HumanInputError whatever its isolation."""

    async def test_same_error_at_every_level(self):
        caught = {}
        for isolation in ("inline", "process", "worker"):
            agent = Agent("failing", isolation=isolation, human_input=_FailingProvider())
            agent.add_state("asks", _asks)
            caught[isolation] = (await agent.run()).get_state("caught")
        expected = ["HumanInputError", "human input failed: RuntimeError('provider exploded')"]
        assert caught == {"inline": expected, "process": expected, "worker": expected}


async def _asks_within_a_second(context: Context):
    try:
        await context.human_in_the_loop("a digit?", timeout=1.0, validator=str.isdigit)
    except Exception as exc:
        context.set_state("caught", [type(exc).__name__, str(exc)])


class TestTimeoutAcrossReAsks:
    """A re-asked question keeps its timeout, as the provider and the error see it, at every level."""

    async def test_the_whole_timeout_is_shown_at_every_level(self):
        seen = {}
        for isolation in ("inline", "process", "worker"):
            provider = QueueInputProvider()
            agent = Agent(f"reasked_{isolation}", isolation=isolation, human_input=provider)
            agent.add_state("asks", _asks_within_a_second)
            run = asyncio.create_task(agent.run())
            first = await provider.wait_for_request()
            provider.answer(first.id, "no")  # rejected: asked again, then nobody answers
            again = await provider.wait_for_request()
            caught = (await run).get_state("caught")
            seen[isolation] = (first.timeout, again.timeout, again.attempt, caught[0], "within 1 s" in caught[1])
        expected = (1.0, 1.0, 2, "HumanInputTimeoutError", True)
        assert seen == {"inline": expected, "process": expected, "worker": expected}
