"""CoordinatedAgent: the spec's coordination examples, run through the engine (inline states)."""

from __future__ import annotations

import asyncio
import re
import weakref
from collections.abc import AsyncIterator

import pytest

from agent import Agent, AgentStatus, Context, RetryPolicy, StateFailedError, StateStatus
from agent import events as ev
from agent.coordination import (
    CoordinatedAgent,
    Coordinator,
    FakeClock,
    PrimitiveType,
    RateLimitStrategy,
    ResourceAllocation,
    create_coordinated_agent,
    enhance_agent,
    mutex,
)
from agent.clock import settle
from agent.coordination.allocation import current_owner
from agent.errors import CoordinationError, CoordinationTimeoutError

from ._support import within


@pytest.fixture
async def coord(clock: FakeClock) -> AsyncIterator[Coordinator]:
    c = Coordinator(clock)
    yield c
    await c.aclose()


def _agent(name: str, coord: Coordinator, **kwargs) -> CoordinatedAgent:
    return create_coordinated_agent(name, coordinator=coord, isolation="inline", **kwargs)


class _Inside:
    """Counts how many attempts are inside a section at once."""

    def __init__(self) -> None:
        self.now = self.peak = 0
        self.log: list[tuple[str, float]] = []

    def enter(self, who: str, t: float) -> None:
        self.now += 1
        self.peak = max(self.peak, self.now)
        self.log.append((who, t))

    def leave(self) -> None:
        self.now -= 1


class TestCreation:
    """create_coordinated_agent and enhance_agent return composed agents."""

    @pytest.mark.parametrize("make,what", [
        (lambda: create_coordinated_agent("c", coordinator=5), "create_coordinated_agent"),
        (lambda: CoordinatedAgent("c", coordinator=5), "CoordinatedAgent"),  # type: ignore[arg-type]
        (lambda: enhance_agent(Agent("c"), coordinator=5), "enhance_agent"),  # type: ignore[arg-type]
    ], ids=["create_coordinated_agent", "CoordinatedAgent", "enhance_agent"])
    def test_coordinator_must_be_a_coordinator(self, make, what) -> None:  # type: ignore[no-untyped-def]
        with pytest.raises(CoordinationError, match=rf"^{what}\(coordinator=...\) must be a Coordinator .* got int 5$"):
            make()

    def test_create(self) -> None:
        agent = create_coordinated_agent("coordinated_workflow")
        assert isinstance(agent, CoordinatedAgent) and isinstance(agent, Agent)
        assert agent._coordinator is create_coordinated_agent("other")._coordinator  # one per process

    async def test_enhance_carries_states_and_config(self, coord: Coordinator, clock: FakeClock) -> None:
        async def first(context: Context):
            context.set_state("seen", current_owner())
            return "second"

        async def second(context: Context):
            return None

        plain = Agent("my_workflow", max_steps=7, isolation="inline")
        plain.add_state("first", first)
        plain.add_state("second", second, dependencies=["first"], max_retries=2)
        agent = enhance_agent(plain, coordinator=coord)
        assert isinstance(agent, CoordinatedAgent) and agent is not plain
        assert agent.max_steps == 7 and list(agent._states) == ["first", "second"]
        assert agent._states["second"].max_retries == 2
        assert plain._admission_hooks == []  # the original is not patched
        assert enhance_agent(agent) is agent
        context = await agent.run()
        assert context.get_state("seen").endswith("/first#1")

    def test_enhance_carries_every_setting_of_a_state(self, coord: Coordinator) -> None:
        async def bad(context: Context):
            raise RuntimeError("boom")

        plain = Agent("my_workflow", isolation="inline")
        plain.add_state("bad", bad, on_failure="continue", next_states=[], context_keys=["x", "out_*"])
        spec = enhance_agent(plain, coordinator=coord)._states["bad"]
        assert spec == plain._states["bad"]
        assert (spec.on_failure, spec.next_states, spec.context_keys) == ("continue", frozenset(), ("x", "out_*"))

    def test_enhance_refuses_non_agents(self) -> None:
        with pytest.raises(CoordinationError, match="takes an Agent"):
            enhance_agent(object())  # type: ignore[arg-type]


class TestRateLimit:
    """Rate limiting is handled automatically before each start."""

    async def test_token_bucket_spec_example(self, coord: Coordinator, clock: FakeClock) -> None:
        agent = _agent("coordinated_workflow", coord, max_steps=20)
        agent.add_state_rate_limit("api_call", max_rate=10.0, strategy=RateLimitStrategy.TOKEN_BUCKET, burst_size=5)
        starts: list[float] = []

        async def api_call(context: Context):
            starts.append(clock.monotonic())
            return "api_call" if len(starts) < 20 else None

        agent.add_state("api_call", api_call)
        async with clock.autojump():
            await agent.run()
        assert starts[:5] == [0.0] * 5
        assert starts[5:] == pytest.approx([0.1 * i for i in range(1, 16)])

    async def test_sliding_and_leaky_replace_each_other(self, coord: Coordinator, clock: FakeClock) -> None:
        agent = _agent("advanced", coord, max_steps=4)
        agent.add_state_rate_limit(
            "api_call", max_rate=100.0, strategy=RateLimitStrategy.SLIDING_WINDOW, window_size=60.0,
        )
        agent.add_state_rate_limit(
            "data_ingestion", max_rate=50.0, strategy=RateLimitStrategy.LEAKY_BUCKET, window_size=1.0,
        )
        starts: list[float] = []

        async def data_ingestion(context: Context):
            starts.append(clock.monotonic())
            return "data_ingestion" if len(starts) < 4 else None

        agent.add_state("data_ingestion", data_ingestion)
        async with clock.autojump():
            await agent.run()
        assert starts == pytest.approx([0.0, 0.02, 0.04, 0.06])
        status = await agent.get_coordination_status()
        assert status["rate_limiters"]["api_call"]["limit"] == 6000
        assert status["rate_limiters"]["data_ingestion"]["admitted"] == 4


    async def test_burst_size_only_with_a_token_bucket(self, coord: Coordinator) -> None:
        agent = _agent("bursty", coord)
        others = (RateLimitStrategy.SLIDING_WINDOW, RateLimitStrategy.FIXED_WINDOW, RateLimitStrategy.LEAKY_BUCKET)
        for strategy in others:
            with pytest.raises(CoordinationError, match="burst_size=3 applies to TOKEN_BUCKET only"):
                agent.add_state_rate_limit("api_call", max_rate=5.0, strategy=strategy, burst_size=3)
        assert (await agent.get_coordination_status())["agent"]["rate_limited_states"] == []


async def _concurrent_runs(coord: Coordinator, clock: FakeClock, n: int, configure, hold: float, inside: _Inside):
    """``n`` agents sharing ``coord``, each running one state 'guarded' that holds for ``hold`` s."""

    async def guarded(context: Context):
        inside.enter(current_owner() or "?", clock.monotonic())
        try:
            await clock.sleep(hold)
        finally:
            inside.leave()
        return None

    agents = []
    for i in range(n):
        agent = _agent(f"worker{i}", coord)
        configure(agent)
        agent.add_state("guarded", guarded)
        agents.append(agent)
    return await within(clock, 3600, asyncio.gather(*(a.run() for a in agents), return_exceptions=True))


class TestDeclarationsThatCouldNeverRun:
    """A declaration no attempt could ever be admitted under is refused when it is made."""

    @pytest.mark.parametrize("kind, settings, message", [
        (PrimitiveType.MUTEX, {"amount": 2}, "a MUTEX has one holder: leave amount out"),
        (PrimitiveType.LEASE, {"ttl": 5.0, "amount": 5}, "a LEASE has one holder"),
        (PrimitiveType.BARRIER, {"max_count": 3, "amount": 3}, "a BARRIER counts arrivals"),
        (PrimitiveType.SEMAPHORE, {"max_count": 2, "amount": 3}, "which holds only 2: lower amount"),
        (PrimitiveType.SEMAPHORE, {"max_count": 0}, "max_count must be an int >= 1, got 0"),
        (PrimitiveType.QUOTA, {"quota_limit": -1.0}, "quota_limit must be a number > 0, got -1.0"),
    ])
    async def test_it_is_refused_saying_what_to_change(self, coord: Coordinator, kind, settings, message) -> None:
        agent = _agent("never", coord)
        with pytest.raises(CoordinationError, match=re.escape(message)):
            agent.add_state_coordination("guarded", kind, **settings)
        assert "guarded" not in (await agent.get_coordination_status())["agent"]["coordinated_states"]


class TestOneSettingPerName:
    """Agents that declare a state name share its primitive and rate limit, or are refused."""

    async def test_another_agent_cannot_turn_the_mutex_into_a_semaphore(
        self, coord: Coordinator, clock: FakeClock,
    ) -> None:
        a = _agent("a", coord)
        a.add_state_coordination("guarded", PrimitiveType.MUTEX, ttl=30.0)
        b = _agent("b", coord)
        with pytest.raises(CoordinationError, match=r"MUTEX\(ttl=30\).*SEMAPHORE\(max_count=3\)"):
            b.add_state_coordination("guarded", PrimitiveType.SEMAPHORE, max_count=3)
        assert "guarded" not in (await b.get_coordination_status())["agent"]["coordinated_states"]
        assert coord.primitive("guarded").type is PrimitiveType.MUTEX

    async def test_an_agent_built_again_per_run_shares_the_primitive(
        self, coord: Coordinator, clock: FakeClock,
    ) -> None:
        inside = _Inside()
        results = await _concurrent_runs(  # each agent declares it anew, with the same settings
            coord, clock, 3, lambda a: a.add_state_coordination("guarded", PrimitiveType.MUTEX, ttl=30.0), 1.0, inside
        )
        assert not [r for r in results if isinstance(r, BaseException)]
        assert inside.peak == 1

    async def test_rebuilt_with_new_settings_once_the_old_agent_is_gone(
        self, coord: Coordinator, clock: FakeClock,
    ) -> None:
        async def guarded(context: Context):
            return None

        old = _agent("service", coord)
        old.add_state_coordination("guarded", PrimitiveType.MUTEX)
        old.add_state("guarded", guarded)
        await old.run()
        gone = weakref.ref(old)
        del old
        await settle()  # the finished run lets go of its agent on the loop's next turn
        new = _agent("service", coord)
        new.add_state_coordination("guarded", PrimitiveType.SEMAPHORE, max_count=3)
        new.add_state("guarded", guarded)
        await new.run()
        assert gone() is None and coord.primitive("guarded").type is PrimitiveType.SEMAPHORE

    async def test_a_withdrawn_declaration_lets_other_settings_in(self, coord: Coordinator) -> None:
        a = _agent("a", coord)
        a.add_state_coordination("guarded", PrimitiveType.MUTEX)
        a.add_state_rate_limit("api_call", max_rate=10.0)
        b = _agent("b", coord)
        with pytest.raises(CoordinationError, match="remove_state_rate_limit"):
            b.add_state_rate_limit("api_call", max_rate=1.0, strategy=RateLimitStrategy.LEAKY_BUCKET)
        a.remove_state_coordination("guarded")
        a.remove_state_rate_limit("api_call")
        b.add_state_coordination("guarded", PrimitiveType.SEMAPHORE, max_count=3)
        b.add_state_rate_limit("api_call", max_rate=1.0, strategy=RateLimitStrategy.LEAKY_BUCKET)
        assert coord.primitive("guarded").type is PrimitiveType.SEMAPHORE
        assert coord.rate_limiter("api_call").strategy is RateLimitStrategy.LEAKY_BUCKET
        status = (await a.get_coordination_status())["agent"]
        assert status["coordinated_states"] == [] and status["rate_limited_states"] == []


class TestPrimitivesThroughTheEngine:
    """A state's primitive holds across concurrent runs of different agents."""

    async def test_mutex_across_runs(self, coord: Coordinator, clock: FakeClock) -> None:
        inside = _Inside()
        results = await _concurrent_runs(
            coord, clock, 4, lambda a: a.add_state_coordination("guarded", PrimitiveType.MUTEX, ttl=30.0), 1.0, inside
        )
        assert not [r for r in results if isinstance(r, BaseException)]
        assert inside.peak == 1 and [t for _, t in inside.log] == [0.0, 1.0, 2.0, 3.0]
        assert coord.get_status()["primitives"]["guarded"]["state"] == "unlocked"

    async def test_a_state_waiting_for_its_primitive_has_not_started(
        self, coord: Coordinator, clock: FakeClock,
    ) -> None:
        events: list[tuple[str, str]] = []
        waiting: list[str | None] = []
        agents = []

        async def guarded(context: Context):
            await clock.sleep(0.5)  # the other agent's run has reached the mutex by now
            waiting.extend(a.state_metadata["guarded"].waiting_for for a in agents)
            await clock.sleep(0.5)

        for i in range(2):
            agent = _agent(f"worker{i}", coord)
            agent.add_state_coordination("guarded", PrimitiveType.MUTEX)
            agent.add_state("guarded", guarded)
            agent.add_observer(lambda e: events.append((e.kind, e.agent_name)))
            agents.append(agent)
        await within(clock, 60, asyncio.gather(*(a.run() for a in agents)))
        assert waiting[:2] == [None, "coordination: MUTEX 'guarded'"]  # while the first holds it
        started = [name for kind, name in events if kind in (ev.STATE_STARTED, ev.STATE_COMPLETED)]
        assert started == ["worker0", "worker0", "worker1", "worker1"]  # started once let in, not before

    async def test_mutex_ttl_takes_it_from_a_hung_state(self, coord: Coordinator, clock: FakeClock) -> None:
        inside = _Inside()
        results = await _concurrent_runs(
            coord, clock, 2, lambda a: a.add_state_coordination("guarded", PrimitiveType.MUTEX, ttl=30.0), 100.0, inside
        )
        assert not [r for r in results if isinstance(r, BaseException)]
        assert [t for _, t in inside.log] == [0.0, 30.0]  # the second got in when the ttl ran out
        assert coord.primitive("guarded").statistics().expirations == 2  # both outlived the ttl

    async def test_semaphore_of_three(self, coord: Coordinator, clock: FakeClock) -> None:
        inside = _Inside()
        results = await _concurrent_runs(
            coord, clock, 8, lambda a: a.add_state_coordination("guarded", PrimitiveType.SEMAPHORE, max_count=3),
            1.0, inside,
        )
        assert not [r for r in results if isinstance(r, BaseException)]
        assert inside.peak == 3 and sorted(t for _, t in inside.log) == [0, 0, 0, 1, 1, 1, 2, 2]

    async def test_quota_amounts(self, coord: Coordinator, clock: FakeClock) -> None:
        inside = _Inside()

        def configure(agent: CoordinatedAgent) -> None:
            agent.add_state_coordination("guarded", PrimitiveType.QUOTA, quota_limit=16.0, ttl=3600.0, amount=8.0)

        results = await _concurrent_runs(coord, clock, 4, configure, 1.0, inside)
        assert not [r for r in results if isinstance(r, BaseException)]
        assert inside.peak == 2

    async def test_quota_bounds_what_is_drawn_at_once_not_per_period(
        self, coord: Coordinator, clock: FakeClock,
    ) -> None:
        agent = _agent("trainer", coord)
        agent.add_state_coordination("gpu_task", PrimitiveType.QUOTA, quota_limit=16.0, ttl=3600.0)

        async def gpu_task(context: Context):
            return None

        agent.add_state("gpu_task", gpu_task)
        for _ in range(20):  # twenty draws of 1 from 16 within the hour: each came back when its attempt ended
            await agent.run()
        assert coord.primitive("gpu_task").status()["in_use"] == 0 and clock.monotonic() == 0.0

    async def test_quota_ttl_takes_back_the_draw_of_a_hung_holder(self, coord: Coordinator, clock: FakeClock) -> None:
        entered: list[float] = []

        async def gpu_task(context: Context):
            entered.append(clock.monotonic())
            if len(entered) == 1:
                await clock.sleep(7200.0)  # hangs, holding all 16 units past the ttl
            return None

        agents = []
        for i in range(2):
            agent = _agent(f"trainer{i}", coord)
            agent.add_state_coordination("gpu_task", PrimitiveType.QUOTA, quota_limit=16.0, ttl=3600.0, amount=16.0)
            agent.add_state("gpu_task", gpu_task)
            agents.append(agent)
        await within(clock, 7200, asyncio.gather(*(a.run() for a in agents)))
        assert entered == [0.0, 3600.0]  # the second got in when the first's draw stopped counting
        assert coord.primitive("gpu_task").statistics().expirations == 1

    async def test_lease(self, coord: Coordinator, clock: FakeClock) -> None:
        inside = _Inside()
        results = await _concurrent_runs(
            coord, clock, 3, lambda a: a.add_state_coordination("guarded", PrimitiveType.LEASE, ttl=600.0), 1.0, inside
        )
        assert not [r for r in results if isinstance(r, BaseException)]
        assert inside.peak == 1

    async def test_wait_timeout_fails_the_attempt(self, coord: Coordinator, clock: FakeClock) -> None:
        inside = _Inside()

        def configure(agent: CoordinatedAgent) -> None:
            agent.add_state_coordination("guarded", PrimitiveType.MUTEX, wait_timeout=5.0)

        results = await _concurrent_runs(coord, clock, 2, configure, 10.0, inside)
        errors = [r for r in results if isinstance(r, BaseException)]
        assert len(errors) == 1 and isinstance(errors[0], StateFailedError)
        assert "waited 5s" in str(errors[0])


def _barrier_agent(coord: Coordinator, chunks: int) -> tuple[CoordinatedAgent, list[float]]:
    agent = _agent("barrier", coord)
    agent.add_state_coordination("merge_results", PrimitiveType.BARRIER, max_count=5, wait_timeout=30.0)
    merged: list[float] = []

    async def process_chunk(context: Context):
        return "merge_results"

    async def merge_results(context: Context):
        merged.append(coord.clock.monotonic())
        return None

    for i in range(chunks):
        agent.add_state(f"process_chunk_{i}", process_chunk)
    agent.add_state("merge_results", merge_results)
    return agent, merged


class TestBarrier:
    """merge_results starts when 5 chunks have handed over to it; with 4 it times out."""

    async def test_five_chunks(self, coord: Coordinator, clock: FakeClock) -> None:
        agent, merged = _barrier_agent(coord, 5)
        await within(clock, 600, agent.run(start=[f"process_chunk_{i}" for i in range(5)]))
        assert merged == [0.0]
        assert coord.primitive("merge_results").status()["rounds"] == 1

    async def test_four_chunks_time_out(self, coord: Coordinator, clock: FakeClock) -> None:
        agent, merged = _barrier_agent(coord, 4)

        async def elsewhere(context: Context):  # still running: it could yet hand over
            await clock.sleep(100)

        agent.add_state("elsewhere", elsewhere)
        with pytest.raises(StateFailedError, match=r"merge_results.*only 4 of 5 arrived within 30s"):
            await within(clock, 600, agent.run(start=[*(f"process_chunk_{i}" for i in range(4)), "elsewhere"]))
        assert merged == [] and clock.monotonic() == pytest.approx(30.0)
        assert coord.primitive("merge_results").status()["arrived"] == {}  # the run's round is forgotten

    async def test_a_branch_that_hangs_short_of_the_join_times_the_round_out(
        self, coord: Coordinator, clock: FakeClock,
    ) -> None:
        # The join holds merge_results until every branch that could return it has ended
        # (DESIGN item 3), so it never reaches the gate: the round's wait_timeout runs from
        # its first arrival instead, and the run fails saying how many came.
        agent, merged = _barrier_agent(coord, 4)
        cancelled = asyncio.Event()

        async def hangs(context: Context):
            try:
                await clock.sleep(1000)
            except asyncio.CancelledError:
                cancelled.set()
                raise
            return "merge_results"

        agent.add_state("process_chunk_4", hangs)
        seen: list[ev.RunEvent] = []
        agent.add_observer(seen.append)
        with pytest.raises(CoordinationTimeoutError, match=r"only 4 of 5 arrived within 30s of the first"):
            await within(clock, 600, agent.run(start=[f"process_chunk_{i}" for i in range(5)]))
        assert merged == [] and clock.monotonic() == pytest.approx(30.0)
        assert cancelled.is_set()  # the hanging branch was stopped with the run
        # The state that could not start timed out, as its attempt would have at the gate:
        # its status says so, and the monitor counts it as failed.
        meta = agent.state_metadata["merge_results"]
        assert meta.status is StateStatus.TIMEOUT and "only 4 of 5" in meta.error.message
        assert [(e.state, e.data["final"], e.data["kind"]) for e in seen if e.kind == ev.STATE_FAILED] == [
            ("merge_results", True, "timeout")]

    async def test_without_a_wait_timeout_it_fails_once_nothing_else_can_arrive(
        self, coord: Coordinator, clock: FakeClock,
    ) -> None:
        agent = _agent("barrier", coord)
        agent.add_state_coordination("merge_results", PrimitiveType.BARRIER, max_count=5)  # waits for ever
        merged: list[float] = []

        async def start(context: Context):
            return [f"chunk_{i}" for i in range(4)]

        async def chunk(context: Context):
            return "merge_results"

        async def merge_results(context: Context):
            merged.append(clock.monotonic())

        agent.add_state("start", start)
        for i in range(4):
            agent.add_state(f"chunk_{i}", chunk)
        agent.add_state("merge_results", merge_results)
        with pytest.raises(StateFailedError, match=r"only 4 of 5 arrived, and nothing else of the run can arrive"):
            await within(clock, 600, agent.run())
        assert merged == [] and clock.monotonic() == 0.0

    async def test_a_retry_after_the_gate_passes_again(self, coord: Coordinator, clock: FakeClock) -> None:
        agent = _agent("barrier", coord)
        agent.add_state_coordination("merge_results", PrimitiveType.BARRIER, max_count=5, wait_timeout=30.0)
        tries: list[float] = []

        async def process_chunk(context: Context):
            return "merge_results"

        async def merge_results(context: Context):
            tries.append(clock.monotonic())
            if len(tries) == 1:
                raise RuntimeError("transient")
            return None

        for i in range(5):
            agent.add_state(f"process_chunk_{i}", process_chunk)
        agent.add_state("merge_results", merge_results,
                        retry_policy=RetryPolicy(max_retries=2, initial_delay=0.0, jitter=False))
        await within(clock, 600, agent.run(start=[f"process_chunk_{i}" for i in range(5)]))
        assert tries == [0.0, 0.0]  # the retry did not wait for five more arrivals (30 s)
        assert coord.primitive("merge_results").status()["rounds"] == 1

    async def test_the_next_activation_waits_for_a_round_of_its_own(self, coord: Coordinator, clock: FakeClock) -> None:
        agent = _agent("barrier", coord)
        agent.add_state_coordination("merge_results", PrimitiveType.BARRIER, max_count=3, wait_timeout=30.0)
        merged: list[float] = []

        async def fan(context: Context):
            return [f"chunk_{i}" for i in range(3 if not merged else 2)]  # the second time, one short

        async def chunk(context: Context):
            return "merge_results"

        async def merge_results(context: Context):
            merged.append(clock.monotonic())
            return "fan"

        agent.add_state("fan", fan)
        for i in range(3):
            agent.add_state(f"chunk_{i}", chunk)
        agent.add_state("merge_results", merge_results)
        with pytest.raises(StateFailedError, match=r"only 2 of 3 arrived, and nothing else of the run can arrive"):
            await within(clock, 600, agent.run())
        assert merged == [0.0]


class TestDeadlock:
    """Two states taking two mutexes in opposite order: detected, resolved, no hang."""

    @staticmethod
    def _opposite(coord: Coordinator, retries: int) -> CoordinatedAgent:
        agent = _agent("deadlocky", coord)
        holding = {"a": asyncio.Event(), "b": asyncio.Event()}

        def take(first: str, second: str, me: str, other: str):
            async def state(context: Context):
                async with mutex(first, owner=context.state_name):
                    holding[me].set()
                    await holding[other].wait()
                    async with mutex(second, owner=context.state_name):
                        context.set_state(f"{me}_done", True)
                return None

            return state

        async def start(context: Context):
            return ["a", "b"]

        agent.add_state("start", start)
        agent.add_state("a", take("m1", "m2", "a", "b"))
        agent.add_state("b", take("m2", "m1", "b", "a"), max_retries=retries)
        return agent

    async def test_resolved_with_deadlock_error(self, coord: Coordinator, clock: FakeClock) -> None:
        agent = self._opposite(coord, retries=0)
        agent._coordinator.deadlock_detector.detection_interval = 1.0
        agent._coordinator.deadlock_detector.max_cycles = 100
        with pytest.raises(StateFailedError, match=r"DeadlockError.*deadlock: .*failing"):
            await within(clock, 600, agent.run())
        status = await agent.get_coordination_status()
        assert status["deadlock_detector"]["cycle_count"] == 1
        assert status["primitives"] == {}  # made by mutex() on first use, forgotten once free

    async def test_retry_after_resolution_completes(self, coord: Coordinator, clock: FakeClock) -> None:
        agent = self._opposite(coord, retries=1)
        context = await within(clock, 600, agent.run())
        assert context.get_state("a_done") and context.get_state("b_done")
        assert coord.deadlock_detector.cycle_count == 1

    async def test_a_cycle_through_a_task_the_state_started(self, coord: Coordinator, clock: FakeClock) -> None:
        """The second mutex is taken by a section the state gathers, an owner of its own: the
        state that holds the first waits for it, which closes the cycle (it hung, undetected)."""
        agent = _agent("sections", coord)
        agent._coordinator.deadlock_detector.detection_interval = 1.0
        holding = {"a": asyncio.Event(), "b": asyncio.Event()}

        def take(first: str, second: str, me: str, other: str):
            async def state(context: Context):
                async with mutex(first):
                    holding[me].set()
                    await holding[other].wait()

                    async def section() -> None:
                        async with mutex(second):
                            context.set_state(f"{me}_done", True)

                    await asyncio.gather(section())
                return None

            return state

        async def start(context: Context):
            return ["a", "b"]

        agent.add_state("start", start)
        agent.add_state("a", take("s1", "s2", "a", "b"), max_retries=1)
        agent.add_state("b", take("s2", "s1", "b", "a"), max_retries=1)
        context = await within(clock, 600, agent.run())
        assert context.get_state("a_done") and context.get_state("b_done")
        assert coord.deadlock_detector.cycle_count == 1
        assert (await agent.get_coordination_status())["primitives"] == {}


class TestStatusAndCleanup:
    """get_coordination_status and reset_coordination, from inside states too."""

    async def test_monitoring_and_reset_from_states(self, coord: Coordinator, clock: FakeClock) -> None:
        agent = _agent("monitored", coord)
        agent.add_state_coordination("database_write", PrimitiveType.MUTEX, ttl=30.0)
        agent.add_state_coordination("shared_resource", PrimitiveType.QUOTA, quota_limit=100.0, ttl=60.0)
        agent._coordinator.cleanup_interval = 60.0
        seen: dict = {}

        async def database_write(context: Context):
            async with ResourceAllocation("shared_resource", 10.0):
                status = await agent.get_coordination_status()
                seen["db"] = status["primitives"]["database_write"]
                seen["quota"] = status["primitives"]["shared_resource"]["in_use"]
            return "cleanup_resources"

        async def cleanup_resources(context: Context):
            await agent.reset_coordination()
            status = await agent.get_coordination_status()
            seen["detector"] = status["deadlock_detector"]["cycle_count"]
            return None

        agent.add_state("database_write", database_write)
        agent.add_state("cleanup_resources", cleanup_resources)
        await agent.run()
        assert seen["db"]["state"] == "locked" and len(seen["db"]["owners"]) == 1 and seen["db"]["wait_count"] == 0
        assert seen["quota"] == 10.0 and seen["detector"] == 0
        assert coord.primitive("database_write").owners() == []


@pytest.mark.parametrize("method", ["add_state_rate_limit", "add_state_coordination", "get_coordination_status"])
def test_a_plain_agent_asked_for_coordination_says_where_it_is(method: str) -> None:
    with pytest.raises(AttributeError, match="create_coordinated_agent.*enhance_agent"):
        getattr(Agent("plain"), method)
    with pytest.raises(AttributeError, match="no attribute 'elsewhere'"):
        Agent("plain").elsewhere  # noqa: B018


class TestWaitsAreMeasured:
    """The time a state waited for its primitive is its STATE_STARTED's coordination_wait
    and the monitor's latency.coordination_wait; turnaround counts it."""

    async def test_the_second_holder_waited(self) -> None:
        from agent.monitor import MetricsCollector

        coord = Coordinator()
        release = asyncio.Event()
        collector = MetricsCollector()
        started: dict[str, float] = {}
        agents = []

        async def guarded(context: Context):
            await release.wait()

        def note(event: ev.RunEvent) -> None:
            if event.kind == ev.STATE_STARTED:
                started[event.agent_name] = event.data["coordination_wait"]

        for i in range(2):
            agent = _agent(f"holder{i}", coord)
            agent.add_state_coordination("guarded", PrimitiveType.MUTEX)
            agent.add_state("guarded", guarded)
            agent.add_observer(collector)
            agent.add_observer(note)
            agents.append(agent)
        runs = asyncio.gather(*(a.run() for a in agents))
        while agents[1].state_metadata["guarded"].waiting_for is None:
            await asyncio.sleep(0.01)
        release.set()
        await asyncio.wait_for(runs, 30)
        await coord.aclose()
        assert started["holder1"] > 0 and started["holder0"] < started["holder1"]
        waits = collector.metrics()["latency"]["coordination_wait"]
        assert waits["count"] == 2 and waits["max"] == pytest.approx(started["holder1"] * 1000)
        turnaround = collector.metrics()["latency"]["turnaround"]
        assert turnaround["max"] >= waits["max"]

    async def test_a_states_timeout_counts_from_when_it_is_let_in(self) -> None:
        # Its wait for the primitive is not its run time (wait_timeout bounds that).
        coord = Coordinator()
        release = asyncio.Event()
        holder, quick = _agent("holder", coord), _agent("quick", coord)

        async def held(context: Context):
            await release.wait()

        async def brief(context: Context):
            await asyncio.sleep(0)

        for agent in (holder, quick):
            agent.add_state_coordination("guarded", PrimitiveType.MUTEX)
        holder.add_state("guarded", held)
        quick.add_state("guarded", brief, timeout=0.2, max_retries=0)
        first = asyncio.ensure_future(holder.run())
        while coord.primitive("guarded").owners() == []:
            await asyncio.sleep(0.01)
        second = asyncio.ensure_future(quick.run())
        began = asyncio.get_running_loop().time()
        while asyncio.get_running_loop().time() < began + 0.5:  # well past its timeout, waiting
            await asyncio.sleep(0.05)
        assert quick.state_metadata["guarded"].waiting_for == "coordination: MUTEX 'guarded'"
        release.set()
        await asyncio.wait_for(asyncio.gather(first, second), 30)
        assert quick.status is AgentStatus.COMPLETED
        await coord.aclose()
