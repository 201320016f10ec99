"""What a job's runner starts ahead of its run, decided from the workflow's isolation levels."""

from __future__ import annotations

import pytest

from agent import Agent
from agent.daemon.runner import _isolated, _supervised


async def _noop(context: object) -> None:
    return None


@pytest.mark.parametrize(("default", "levels", "supervised", "isolated"), [
    ("inline", ["inline", "inline"], False, False),
    ("inline", ["inline", "process"], True, True),
    ("process", [None], True, True),
    ("inline", ["worker"], True, True),
    ("inline", ["sandbox"], True, True),
])
def test_the_supervisor_starts_ahead_only_for_states_it_runs(default: str, levels: list[str | None],
                                                            supervised: bool, isolated: bool) -> None:
    agent = Agent("levels", isolation=default)
    for i, level in enumerate(levels):
        agent.add_state(f"s{i}", _noop, **({"isolation": level} if level else {}))
    assert _supervised(agent) is supervised
    assert _isolated(agent) is isolated
