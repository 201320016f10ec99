"""Text with a lone surrogate (an undecodable byte, as ``os.listdir`` names a file) in what a
state raises or returns fails that state as inline, at every level, and no other state."""

from __future__ import annotations

import pytest

from agent import Agent, RetryPolicy, StateFailedError, StateStatus, UnknownNextStateError

FILE = b"report-\xff.csv".decode("utf-8", "surrogateescape")
LEVELS = ["inline", "process", "worker"]


@pytest.mark.parametrize("level", LEVELS)
async def test_an_exception_naming_it_is_a_retried_exception(level: str) -> None:
    async def parse(context):
        context.set_state("tries", context.get_state("tries", 0) + 1)
        raise ValueError(f"cannot parse {FILE}")

    agent = Agent("undecodable_raise", isolation=level)
    agent.add_state("parse", parse, retry_policy=RetryPolicy(max_retries=1, initial_delay=0.0))
    with pytest.raises(StateFailedError) as info:
        await agent.run()
    reason = info.value.reason
    assert (reason.kind, reason.exception_type, info.value.attempts) == ("exception", "builtins.ValueError", 2)
    assert reason.message == "ValueError: cannot parse report-\\udcff.csv"
    assert "report-\\udcff.csv" in reason.traceback
    assert agent.context.get_state("tries") == 2


@pytest.mark.parametrize("level", LEVELS)
async def test_a_failure_naming_it_fails_no_other_state(level: str) -> None:
    async def start(context):
        return ["parse", "other"]

    async def parse(context):
        raise ValueError(f"cannot parse {FILE}")

    async def other(context):
        return "join"

    async def join(context):
        context.set_state("failed", context.failed_states())

    agent = Agent("undecodable_sibling", isolation=level, on_failure="continue")
    for name, fn in (("start", start), ("parse", parse), ("other", other), ("join", join)):
        agent.add_state(name, fn, isolation="inline" if name == "parse" else None)
    with pytest.raises(StateFailedError):
        await agent.run()
    assert {n: m.status for n, m in agent.state_metadata.items() if n != "parse"} == {
        "start": StateStatus.COMPLETED, "other": StateStatus.COMPLETED, "join": StateStatus.COMPLETED}
    assert agent.context.get_state("failed") == {"parse": "ValueError: cannot parse report-\\udcff.csv"}


@pytest.mark.parametrize("level", LEVELS)
async def test_a_name_holding_it_is_an_unknown_state(level: str) -> None:
    async def pick(context):
        return [f"step-{FILE}"]

    agent = Agent("undecodable_return", isolation=level)
    agent.add_state("pick", pick)
    with pytest.raises(UnknownNextStateError, match="which is not a state of this agent"):
        await agent.run()
