"""Preemption of isolated states: the child is told to stop, its writes survive, it restarts."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from agent import Agent, Priority, ResourcePool, ResourceRequirements, StateStatus
from agent import events as ev

supervisor = pytest.importorskip("agent.supervisor", reason="process isolation is not built in this tree")
if not hasattr(supervisor, "get_executor"):
    pytest.skip("process isolation is not built in this tree", allow_module_level=True)


def need(cpu: float, priority: Priority) -> ResourceRequirements:
    return ResourceRequirements(cpu_units=cpu, memory_mb=cpu * 128, io_weight=0, network_weight=0, priority=priority)


class StartSignals:
    """A FIFO the children write their names into once they are under way."""

    def __init__(self, path: Path) -> None:
        os.mkfifo(path, 0o600)
        self.path = str(path)
        # Our own write end keeps the FIFO from reading EOF between the children's writes.
        self._read = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        self._hold = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
        self._seen: set[str] = set()

    async def wait_for(self, *names: str) -> None:
        loop = asyncio.get_running_loop()
        arrived = asyncio.Event()
        buffer = b""

        def readable() -> None:
            nonlocal buffer
            buffer += os.read(self._read, 4096)
            *lines, buffer = buffer.split(b"\n")
            self._seen.update(line.decode() for line in lines)
            if self._seen.issuperset(names):
                arrived.set()

        loop.add_reader(self._read, readable)
        try:
            await arrived.wait()
        finally:
            loop.remove_reader(self._read)

    def close(self) -> None:
        os.close(self._read)
        os.close(self._hold)


class TestIsolatedPreemption:
    """Two isolated LOW states are evicted by a HIGH one, then resume and complete."""

    async def test_high_evicts_two_isolated_low_states(self, tmp_path: Path) -> None:
        signals = StartSignals(tmp_path / "started")
        fifo = signals.path
        events: list[ev.RunEvent] = []
        agent = Agent("preempt-isolated", isolation="process", resource_pool=ResourcePool(
            total_cpu=2, total_memory=512, total_io=10, total_network=10, total_gpu=0, enable_preemption=True,
        ))
        agent.add_observer(events.append)

        async def start(context):  # noqa: ANN001, ANN202
            return ["low_a", "low_b", "trigger"]

        async def low_a(context):  # noqa: ANN001, ANN202
            import asyncio as aio

            import os as child_os

            context.set_state("a_pid", child_os.getpid())
            done = context.get_state("a_rows", 0)
            if done == 0:
                context.set_state("a_rows", 500)  # progress kept across the eviction
                with open(fifo, "w") as f:
                    f.write("low_a\n")
                await aio.Event().wait()  # runs until preempted
            context.set_state("a_resumed_from", done)
            context.set_state("a_rows", 1000)

        async def low_b(context):  # noqa: ANN001, ANN202
            import asyncio as aio

            runs = context.get_state("b_runs", 0) + 1
            context.set_state("b_runs", runs)
            if runs == 1:
                with open(fifo, "w") as f:
                    f.write("low_b\n")
                await aio.Event().wait()

        async def trigger(context):  # noqa: ANN001, ANN202
            await signals.wait_for("low_a", "low_b")
            return ["high"]  # a fan-out of one starts now

        async def high(context):  # noqa: ANN001, ANN202
            context.set_state("high_saw_a_rows", context.get_state("a_rows"))

        agent.add_state("start", start, isolation="inline")
        agent.add_state("low_a", low_a, resources=need(1, Priority.LOW))
        agent.add_state("low_b", low_b, resources=need(1, Priority.LOW))
        agent.add_state("trigger", trigger, isolation="inline")
        agent.add_state("high", high, resources=need(2, Priority.HIGH))
        try:
            await agent.run(timeout=60)
        finally:
            signals.close()

        ctx = agent.context
        assert ctx.get_state("a_pid") != os.getpid()  # it really ran in a child process
        assert ctx.get_state("high_saw_a_rows") == 500  # the victim's write reached the supervisor
        assert ctx.get_state("a_resumed_from") == 500  # and the restarted child read it back
        assert ctx.get_state("a_rows") == 1000
        assert ctx.get_state("b_runs") == 2
        for name in ("low_a", "low_b"):
            meta = agent.state_metadata[name]
            assert meta.preemptions == 1
            assert meta.status is StateStatus.COMPLETED
        order = [(e.kind, e.state) for e in events if e.kind in (ev.STATE_PREEMPTED, ev.STATE_COMPLETED)]
        high_done = order.index((ev.STATE_COMPLETED, "high"))
        assert order.index((ev.STATE_COMPLETED, "low_a")) > high_done
        assert order.index((ev.STATE_COMPLETED, "low_b")) > high_done
        assert {s for k, s in order[:high_done] if k == ev.STATE_PREEMPTED} == {"low_a", "low_b"}
        assert agent.resource_pool.statistics().holders == 0


@pytest.mark.parametrize("level", ["process", "worker"])
async def test_a_result_that_comes_in_as_its_state_is_preempted_stands(
    tmp_path: Path, level: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A victim that blocks until its work is done returns during its stop grace: it
    completed, and is not run again (before, its result was thrown away and the whole state
    ran twice, repeating what it did)."""
    import dataclasses

    from agent.supervisor import current_supervisor

    signals = StartSignals(tmp_path / "started")
    fifo = signals.path
    agent = Agent("preempt-returned", isolation=level, resource_pool=ResourcePool(
        total_cpu=2, total_memory=512, total_io=10, total_network=10, total_gpu=0, enable_preemption=True,
    ))
    events: list[ev.RunEvent] = []
    agent.add_observer(events.append)

    async def start(context):  # noqa: ANN001, ANN202
        return ["victim", "trigger"]

    async def victim(context):  # noqa: ANN001, ANN202
        import os as child_os
        import time

        context.set_state("victim_starts", context.get_state("victim_starts", 0) + 1)
        with open(fifo, "w") as signal:
            signal.write("victim\n")
        time.sleep(1.0)  # no stop reaches it meanwhile: it returns while being preempted
        context.set_state("victim_pid", child_os.getpid())

    async def trigger(context):  # noqa: ANN001, ANN202
        await signals.wait_for("victim")
        return "urgent"

    async def urgent(context):  # noqa: ANN001, ANN202
        return None

    agent.add_state("start", start, isolation="inline")
    agent.add_state("victim", victim, resources=need(2, Priority.LOW))
    agent.add_state("trigger", trigger, isolation="inline")
    agent.add_state("urgent", urgent, resources=need(1, Priority.HIGH))
    prime = Agent("prime", isolation=level)
    prime.add_state("urgent", urgent)
    await prime.run()  # the supervisor is up: its stop grace can be lengthened past the victim's sleep
    sup = current_supervisor()
    monkeypatch.setattr(sup, "config", dataclasses.replace(sup.config, grace=30.0))
    try:
        await agent.run(timeout=60)
    finally:
        signals.close()
    meta = agent.state_metadata["victim"]
    assert agent.context.get_state("victim_starts") == 1 and agent.context.has_state("victim_pid")
    assert meta.status is StateStatus.COMPLETED and meta.preemptions == 0 and meta.attempts == 1
    assert [e.state for e in events if e.kind == ev.STATE_PREEMPTED] == []
    assert agent.state_metadata["urgent"].status is StateStatus.COMPLETED
    assert agent.resource_pool.statistics().holders == 0
