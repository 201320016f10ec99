"""``create_checkpoint()`` from another thread while ``run_sync()`` runs: each snapshot is whole."""

from __future__ import annotations

import threading

from agent import Agent

BRANCHES, KEYS = 60, 300


def writer(i: int):
    async def write(context):
        for k in range(KEYS):  # one step: no snapshot may see part of it
            context.set_state(f"w{i}_{k}", k)

    return write


def test_snapshots_taken_beside_a_running_run_are_whole() -> None:
    agent = Agent("threaded_checkpoints", isolation="inline")

    async def start(context):
        return [f"w{i}" for i in range(BRANCHES)]

    agent.add_state("start", start)
    for i in range(BRANCHES):
        agent.add_state(f"w{i}", writer(i))
    errors: list[BaseException] = []
    thread = threading.Thread(target=lambda: agent.run_sync())
    thread.start()
    snapshots = []
    while thread.is_alive():
        try:
            snapshots.append(agent.create_checkpoint())
        except BaseException as exc:  # noqa: BLE001 - what the test looks for
            errors.append(exc)
    thread.join()
    assert errors == []
    assert snapshots and agent.create_checkpoint().agent_status == "completed"
    for checkpoint in snapshots:
        context = checkpoint.context
        for i in range(BRANCHES):
            seen = sum(f"w{i}_{k}" in context for k in range(KEYS))
            assert seen in (0, KEYS), f"branch {i}: {seen} of its {KEYS} keys in one snapshot"
        done = {f"w{i}" for i in range(BRANCHES) if f"w{i}_0" in context}
        assert done <= checkpoint.completed_states | set(checkpoint.running_states)
