"""Coordination holds for isolated states: admission happens in the supervisor."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent import Agent, Context, RunTimeoutError, StateFailedError
from agent.coordination import Coordinator, PrimitiveType, create_coordinated_agent, mutex

supervisor = pytest.importorskip("agent.supervisor", reason="process isolation is not built in this tree")
if not hasattr(supervisor, "get_executor"):
    pytest.skip("process isolation is not built in this tree", allow_module_level=True)


class TestIsolatedMutex:
    """A MUTEX on database_write admits one isolated child at a time, across concurrent runs."""

    async def test_one_child_inside(self, tmp_path: Path) -> None:
        log = str(tmp_path / "inside.log")

        def make_state():
            async def database_write(context: Context):
                import os
                import time

                with open(log, "a") as f:
                    f.write(f"enter {os.getpid()}\n")
                    f.flush()
                    time.sleep(0.05)  # the work: long enough for a second child to overlap, were it let in
                    f.write(f"exit {os.getpid()}\n")
                return None

            return database_write

        coordinator = Coordinator()
        agents = []
        for i in range(3):
            agent = create_coordinated_agent(f"writer{i}", coordinator=coordinator, isolation="process")
            agent.add_state_coordination("database_write", PrimitiveType.MUTEX, ttl=30.0)
            agent.add_state("database_write", make_state())
            agents.append(agent)
        await asyncio.gather(*(a.run() for a in agents))
        await coordinator.aclose()
        lines = Path(log).read_text().split()
        events = list(zip(lines[0::2], lines[1::2]))
        assert len(events) == 6
        for (kind_in, pid_in), (kind_out, pid_out) in zip(events[0::2], events[1::2]):
            assert (kind_in, kind_out) == ("enter", "exit") and pid_in == pid_out


class TestTakenInsideAChild:
    """mutex() and ResourceAllocation in an isolated state's code take the supervisor's primitives."""

    @pytest.mark.parametrize("isolation", ["process", "worker", "sandbox"])
    async def test_a_mutex_excludes_the_children_of_every_agent(self, isolation: str) -> None:
        async def write(context: Context):
            import time

            # mutex is this module's: loaded with the state's code, before a sandbox hides
            # code under /tmp (where CI's clone lives), not imported while the state runs.
            async with mutex("inside_m1"):
                began = time.monotonic()
                time.sleep(0.05)  # the work: long enough for a second child to overlap, were it let in
                context.set_state("span", [began, time.monotonic()])

        coordinator = Coordinator()
        agents = []
        for i in range(3):
            agent = create_coordinated_agent(f"taker{i}", coordinator=coordinator, isolation=isolation)
            agent.add_state("write", write, context_keys=["span"])
            agents.append(agent)
        await asyncio.gather(*(a.run() for a in agents))
        spans = sorted(a.context.get_state("span") for a in agents)
        assert all(earlier[1] <= later[0] for earlier, later in zip(spans, spans[1:])), spans
        assert coordinator.primitive("inside_m1") is None  # made by mutex() on first use: forgotten once free
        await coordinator.aclose()

    @pytest.mark.parametrize("isolation", ["inline", "process", "worker"])
    async def test_tasks_a_state_started_wait_for_each_other(self, isolation: str) -> None:
        # Each is an owner of its own: the second waits, as with asyncio.Lock, instead of
        # being refused as the attempt taking the mutex twice.
        async def sections(context: Context):
            import time

            async def section() -> list[float]:
                async with mutex("sections_m1"):
                    began = time.monotonic()
                    await asyncio.sleep(0.05)  # long enough for the other to overlap, were it let in
                    return [began, time.monotonic()]

            context.set_state("spans", sorted(await asyncio.gather(section(), section(), section())))

        coordinator = Coordinator()
        agent = create_coordinated_agent("sections", coordinator=coordinator, isolation=isolation)
        agent.add_state("sections", sections)
        spans = (await agent.run()).get_state("spans")
        assert len(spans) == 3 and all(earlier[1] <= later[0] for earlier, later in zip(spans, spans[1:])), spans
        assert coordinator.primitive("sections_m1") is None  # nothing holds it: forgotten
        await coordinator.aclose()

    @pytest.mark.parametrize("isolation", ["inline", "process"])
    async def test_a_wrong_amount_is_refused_alike_in_the_supervisor_and_a_child(self, isolation: str) -> None:
        async def allocate(context: Context):
            from agent.coordination import ResourceAllocation
            from agent.errors import CoordinationError

            refused = []
            for amount in (True, "2", "x"):
                try:
                    async with ResourceAllocation("amounts_q", amount):
                        refused.append("taken")
                except CoordinationError as exc:
                    refused.append(str(exc))
            context.set_state("refused", refused)

        coordinator = Coordinator()
        agent = create_coordinated_agent("amounts", coordinator=coordinator, isolation=isolation)
        agent.add_state_coordination("amounts_q", PrimitiveType.QUOTA, quota_limit=5.0)
        agent.add_state("allocate", allocate, context_keys=["refused"])
        refused = (await agent.run()).get_state("refused")
        prefix = "ResourceAllocation('amounts_q'): amount must be a finite number > 0 (the units to draw), got "
        assert refused == [prefix + "bool True", prefix + "str '2'", prefix + "str 'x'"]
        assert coordinator.primitive("amounts_q").status()["acquisitions"] == 0
        await coordinator.aclose()

    async def test_the_resource_pools_example_runs_as_written(self) -> None:
        coordinator = Coordinator()
        agent = create_coordinated_agent("pools", coordinator=coordinator)  # the default isolation: a child
        agent.add_state_coordination("shared_resource", PrimitiveType.QUOTA, quota_limit=100.0, ttl=60.0)

        async def use_resource(context: Context):
            from agent.coordination import ResourceAllocation

            allocation = 10.0
            async with ResourceAllocation("shared_resource", allocation):
                context.set_state("used", allocation)
            return None

        agent.add_state("use_resource", use_resource)
        assert (await agent.run()).get_state("used") == 10.0
        assert coordinator.primitive("shared_resource").status()["acquisitions"] == 1  # the block took it there
        assert coordinator.primitive("shared_resource").owners() == []
        await coordinator.aclose()

    async def test_what_a_killed_child_held_is_given_back(self) -> None:
        async def die(context: Context):
            import os
            import signal

            from agent.coordination import mutex

            async with mutex("inside_m2"):
                os.kill(os.getpid(), signal.SIGKILL)

        async def take(context: Context):
            from agent.coordination import mutex

            async with mutex("inside_m2", timeout=10.0):
                context.set_state("took", True)

        coordinator = Coordinator()
        killed = create_coordinated_agent("killed", coordinator=coordinator, isolation="process")
        killed.add_state("die", die)
        with pytest.raises(StateFailedError, match="killed by SIGKILL"):
            await killed.run()
        assert coordinator.primitive("inside_m2") is None  # given back for it, and forgotten
        after = create_coordinated_agent("after", coordinator=coordinator, isolation="process")
        after.add_state("take", take)
        assert (await after.run()).get_state("took") is True
        await coordinator.aclose()

    async def test_a_wait_past_its_timeout_raises_in_the_child(self) -> None:
        async def wait(context: Context):
            from agent.coordination import mutex

            try:
                async with mutex("inside_m3", timeout=0.1):
                    context.set_state("error", None)
            except Exception as exc:  # what the state's code sees
                context.set_state("error", f"{type(exc).__name__}: {exc}")

        coordinator = Coordinator()
        held = coordinator.add_primitive("inside_m3", PrimitiveType.MUTEX)
        assert held.try_acquire("someone else")
        agent = create_coordinated_agent("waits", coordinator=coordinator, isolation="process")
        agent.add_state("wait", wait)
        error = (await agent.run()).get_state("error")
        assert error.startswith("CoordinationTimeoutError") and "inside_m3" in error
        assert held.owners() == ["someone else"] and held.waiters() == []
        held.release("someone else")
        await coordinator.aclose()

    async def test_a_bad_timeout_raises_in_the_child_although_the_mutex_is_free(self) -> None:
        async def take(context: Context):
            from agent.coordination import mutex

            try:
                mutex("inside_m5", timeout=-1)
                context.set_state("error", None)
            except Exception as exc:
                context.set_state("error", f"{type(exc).__name__}: {exc}")

        coordinator = Coordinator()
        agent = create_coordinated_agent("bad_timeout", coordinator=coordinator, isolation="process")
        agent.add_state("take", take)
        error = (await agent.run()).get_state("error")
        assert error.startswith("CoordinationError") and "timeout must be" in error
        await coordinator.aclose()

    async def test_a_wait_cut_short_by_the_run_leaves_no_waiter(self) -> None:
        async def wait(context: Context):
            from agent.coordination import mutex

            async with mutex("inside_m4"):
                context.set_state("entered", True)

        coordinator = Coordinator()
        held = coordinator.add_primitive("inside_m4", PrimitiveType.MUTEX)
        assert held.try_acquire("someone else")
        agent = create_coordinated_agent("cut", coordinator=coordinator, isolation="process")
        agent.add_state("wait", wait)
        with pytest.raises(RunTimeoutError):
            await agent.run(timeout=0.5)
        assert held.owners() == ["someone else"] and held.waiters() == []
        assert agent.context.get_state("entered") is None
        held.release("someone else")
        await coordinator.aclose()


@pytest.mark.skipif(__import__("os").geteuid() != 0, reason="sandboxes need root")
class TestWhatASandboxMayDoToTrustedCoordination:
    """The coordinator is shared with trusted code: untrusted code takes from it, but cannot
    set what trusted holders depend on, act as their owners, or fill it with names."""

    async def test_no_ttl_and_no_trusted_owner(self) -> None:
        from agent.errors import CoordinationError

        async def untrusted(context: Context):
            refused = []
            try:
                async with mutex("sbx_db", ttl=0.05):  # would take it from trusted holders after
                    refused.append("taken")
            except CoordinationError as exc:
                refused.append(str(exc))
            context.set_state("refused", refused)
            async with mutex("sbx_writes", owner="writer"):
                import time

                time.sleep(0.5)  # the work, while the trusted state finds it held

        async def trusted(context: Context):
            while not coordinator.primitive("sbx_writes") or not coordinator.primitive("sbx_writes").owners():
                await asyncio.sleep(0.01)
            context.set_state("held_by", coordinator.primitive("sbx_writes").owners())
            async with mutex("sbx_writes", owner="writer"):  # waits: it was refused as its own re-entry
                context.set_state("trusted_took", True)

        async def start(context: Context):
            return ["untrusted", "trusted"]

        coordinator = Coordinator()
        agent = create_coordinated_agent("tenant", coordinator=coordinator, isolation="inline")
        agent.add_state("start", start)
        agent.add_state("untrusted", untrusted, isolation="sandbox", context_keys=["refused"])
        agent.add_state("trusted", trusted)
        result = await agent.run()
        [refused] = result.get_state("refused")
        assert "a sandboxed state cannot give a primitive a ttl" in refused
        assert result.get_state("held_by") == ["sandbox tenant/writer"]
        assert result.get_state("trusted_took") is True
        assert coordinator.primitive("sbx_db") is None and coordinator.primitive("sbx_writes") is None
        await coordinator.aclose()

    async def test_names_it_makes_are_bounded_and_forgotten(self) -> None:
        from agent.supervisor.child import SANDBOX_NAMES

        async def many(context: Context):
            from agent.errors import CoordinationError

            made, refused = 0, ""
            for i in range(SANDBOX_NAMES + 5):
                try:
                    async with mutex(f"sbx_file_{i}"):
                        made += 1
                except CoordinationError as exc:
                    refused = str(exc)
                    break
            context.set_state("made", made)
            context.set_state("refused", refused)

        coordinator = Coordinator()
        agent = create_coordinated_agent("names", coordinator=coordinator, isolation="sandbox")
        # Declared by trusted code: taking it makes nothing, and it stays.
        coordinator.add_primitive("sbx_file_0", PrimitiveType.MUTEX, declarer=agent)
        agent.add_state("many", many, context_keys=["made", "refused"])
        result = await agent.run()
        assert result.get_state("made") == SANDBOX_NAMES + 1
        assert f"a sandboxed state may make at most {SANDBOX_NAMES} primitives" in result.get_state("refused")
        assert coordinator.get_status()["primitives"].keys() == {"sbx_file_0"}
        await coordinator.aclose()

    async def test_human_questions_open_at_once_are_bounded(self) -> None:
        from agent.human import QueueInputProvider
        from agent.supervisor.child import SANDBOX_QUESTIONS

        async def flood(context: Context):
            from agent.errors import HumanInputError

            async def ask(i: int) -> str:
                try:
                    return await context.human_in_the_loop(f"question {i}?", timeout=60)
                except HumanInputError as exc:
                    context.set_state("refused", context.get_state("refused", 0) + 1)
                    return str(exc)

            context.set_state("answers", await asyncio.gather(*(ask(i) for i in range(SANDBOX_QUESTIONS + 3))))

        async def answer_them(provider: QueueInputProvider) -> int:
            # Open questions are answered only once the rest were refused: an answer given
            # sooner would make room for one asked later.
            asked = [await provider.wait_for_request() for _ in range(SANDBOX_QUESTIONS)]
            for _ in range(3000):
                if agent.context.get_state("refused", 0) == 3:
                    break
                await asyncio.sleep(0.01)
            for request in asked:
                provider.answer(request.id, "yes")
            return len(provider.pending())

        provider = QueueInputProvider()
        agent = Agent("asks", isolation="sandbox", human_input=provider)
        agent.add_state("flood", flood, context_keys=["answers", "refused"])
        answering = asyncio.create_task(answer_them(provider))
        answers = (await agent.run()).get_state("answers")
        assert await answering == 0
        assert answers.count("yes") == SANDBOX_QUESTIONS
        refused = [a for a in answers if a != "yes"]
        assert len(refused) == 3 and all(f"at most {SANDBOX_QUESTIONS} questions open at once" in a for a in refused)

