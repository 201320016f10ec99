"""Dataflow joins: branches do not wait for siblings they cannot meet; joins still run once."""

from __future__ import annotations

import asyncio
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import (
    Agent,
    AgentStatus,
    DependencyType,
    InvalidTransitionError,
    Priority,
    ResourcePool,
    ResourceRequirements,
    StateFailedError,
    StateStatus,
    UnknownStateError,
)
from agent.checkpoint_store import SQLiteCheckpointStore


class Gates:
    """One event per name; a state waits for its own gate (no sleeps)."""

    def __init__(self) -> None:
        self.events: dict[str, asyncio.Event] = {}

    def __getitem__(self, name: str) -> asyncio.Event:
        return self.events.setdefault(name, asyncio.Event())


class TestIndependentBranches:
    """Eight pipelines started by one fan-out finish each on its own."""

    async def test_each_eval_starts_right_after_its_own_train(self) -> None:
        gates = Gates()
        log: list[str] = []
        agent = Agent("pipelines", isolation="inline")

        async def start(context):
            return [f"prepare_{i}" for i in range(8)]

        def step(kind: str, i: int, nxt: str | None):
            async def run_step(context):
                log.append(f"{kind}_{i}")
                await gates[f"{kind}_{i}"].wait()
                return nxt

            return run_step

        for i in range(8):
            agent.add_state(f"prepare_{i}", step("prepare", i, f"train_{i}"), next_states=[f"train_{i}"])
            agent.add_state(f"train_{i}", step("train", i, f"eval_{i}"), next_states=[f"eval_{i}"])
            agent.add_state(f"eval_{i}", step("eval", i, None), next_states=[])
        agent.add_state("start", start)
        runner = asyncio.create_task(agent.run(start="start"))

        async def until(name: str) -> None:
            while name not in log:
                await asyncio.sleep(0)

        # Pipeline 3 goes all the way through while every other one is stuck in prepare.
        for kind in ("prepare", "train"):
            await until(f"{kind}_3")
            gates[f"{kind}_3"].set()
        await until("eval_3")
        assert [e for e in log if e.startswith(("train", "eval"))] == ["train_3", "eval_3"]
        for name in list(gates.events) + [f"{k}_{i}" for k in ("prepare", "train", "eval") for i in range(8)]:
            gates[name].set()
        await asyncio.wait_for(runner, 10)
        assert agent.status is AgentStatus.COMPLETED
        assert sorted(log) == sorted(f"{k}_{i}" for k in ("prepare", "train", "eval") for i in range(8))

    async def test_returns_are_read_from_the_code(self) -> None:
        """Literal returns need no declaration: a fast branch's next step does not wait."""
        slow_gate = asyncio.Event()
        log: list[str] = []
        agent = Agent("literal", isolation="inline")

        async def start(context):
            return ["fast", "slow"]

        async def fast(context):
            return "fast_next"

        async def fast_next(context):
            log.append("fast_next")
            slow_gate.set()

        async def slow(context):
            await slow_gate.wait()  # released only by fast_next: a wave would deadlock here
            log.append("slow")

        for fn in (start, fast, fast_next, slow):
            agent.add_state(fn.__name__, fn)
        await asyncio.wait_for(agent.run(), 10)
        assert log == ["fast_next", "slow"]


class TestJoinsRunOnce:
    """A name several branches can return waits for all of them and runs once."""

    async def test_join_waits_for_a_sibling_that_can_still_return_it(self) -> None:
        gate = asyncio.Event()
        log: list[str] = []
        agent = Agent("join", isolation="inline")

        async def start(context):
            return ["a", "b"]

        async def a(context):
            log.append("a")
            return "merge"

        async def b(context):
            await gate.wait()
            log.append("b")
            return "merge"

        async def merge(context):
            log.append("merge")

        for fn in (start, a, b, merge):
            agent.add_state(fn.__name__, fn)
        runner = asyncio.create_task(agent.run())
        while "a" not in log:
            await asyncio.sleep(0)
        meta = agent.state_metadata["merge"]
        assert meta.status is StateStatus.PENDING  # held for b, and it says so
        assert meta.waiting_for == "its fan-out's branches that may still return it (a join)"
        assert agent.create_checkpoint().pending_states == ["merge"]  # b runs
        gate.set()
        await asyncio.wait_for(runner, 10)
        assert log == ["a", "b", "merge"]
        assert meta.waiting_for is None

    async def test_a_join_held_when_its_run_fails_waits_for_nothing_after(self) -> None:
        agent = Agent("join_failed", isolation="inline")

        async def start(context):
            return ["a", "b"]

        async def a(context):
            return "merge"

        async def b(context):
            while agent.state_metadata["merge"].waiting_for is None:  # until merge is held
                await asyncio.sleep(0)
            if context.get_state("never"):
                return "merge"  # it could: merge is held for it
            raise ValueError("b failed")

        async def merge(context):
            return None

        for fn in (start, a, b, merge):
            agent.add_state(fn.__name__, fn)
        with pytest.raises(StateFailedError):
            await asyncio.wait_for(agent.run(), 10)
        assert agent.state_metadata["merge"].status is StateStatus.PENDING  # never ran
        assert agent.state_metadata["merge"].waiting_for is None

    async def test_a_computed_return_counts_as_able_to_return_anything(self) -> None:
        gate = asyncio.Event()
        log: list[str] = []
        agent = Agent("computed", isolation="inline")

        async def start(context):
            return ["a", "router"]

        async def a(context):
            log.append("a")
            return "after_a"

        async def router(context):
            await gate.wait()
            log.append("router")
            target = context.get_state("target", "after_a")
            return target  # cannot be read: it might return after_a too

        async def after_a(context):
            log.append("after_a")

        for fn in (start, a, router, after_a):
            agent.add_state(fn.__name__, fn)
        runner = asyncio.create_task(agent.run())
        while "a" not in log:
            await asyncio.sleep(0)
        for _ in range(5):
            await asyncio.sleep(0)
        assert "after_a" not in log  # held: the router has not finished
        gate.set()
        await asyncio.wait_for(runner, 10)
        assert log == ["a", "router", "after_a"]  # once, after both

    async def test_next_states_declares_what_a_computed_return_can_be(self) -> None:
        gate = asyncio.Event()
        log: list[str] = []
        agent = Agent("declared", isolation="inline")

        async def start(context):
            return ["a", "router"]

        async def a(context):
            log.append("a")
            return "after_a"

        async def router(context):
            await gate.wait()
            log.append("router")
            return context.get_state("target", "done")

        async def after_a(context):
            log.append("after_a")
            gate.set()

        async def done(context):
            log.append("done")

        for fn in (start, a, after_a, done):
            agent.add_state(fn.__name__, fn)
        agent.add_state("router", router, next_states=["done"])
        await asyncio.wait_for(agent.run(), 10)
        assert log == ["a", "after_a", "router", "done"]  # after_a did not wait for router

    async def test_returning_an_undeclared_name_fails_clearly(self) -> None:
        agent = Agent("undeclared", isolation="inline")

        async def start(context):
            return context.get_state("next", "other")

        async def other(context):
            return None

        agent.add_state("start", start, next_states=["start"])
        agent.add_state("other", other)
        with pytest.raises(InvalidTransitionError, match="not among its declared next_states"):
            await agent.run()

    async def test_next_states_must_name_states(self) -> None:
        agent = Agent("unknown", isolation="inline")

        async def start(context):
            return None

        agent.add_state("start", start, next_states=["nowhere"])
        with pytest.raises(UnknownStateError, match="nowhere"):
            await agent.run()

    async def test_nested_fan_outs_join_at_their_own_level_with_unreadable_returns(self) -> None:
        log: list[str] = []
        agent = Agent("nested", isolation="inline")

        def make(name: str, result):
            async def state(context):
                log.append(name)
                return result  # a closure variable: unreadable, counts as "anything"

            agent.add_state(name, state)

        make("root", ["left", "right"])
        make("left", ["l1", "l2"])
        make("l1", "left_join")
        make("l2", "left_join")
        make("left_join", "final")
        make("right", "final")
        make("final", None)
        await agent.run()
        assert log.count("left_join") == 1 and log.count("final") == 1
        assert log.index("final") > log.index("left_join") > max(log.index("l1"), log.index("l2"))

    @pytest.mark.parametrize("order", [("c", "d", "b"), ("d", "c", "b"), ("b", "c", "d"), ("c", "b", "d")])
    async def test_a_branch_of_a_nested_fan_out_meets_an_outer_sibling(self, order: tuple[str, ...]) -> None:
        # start -> [a, b]; a -> [c, d]; c and b return "merge", d ends its branch. Nothing
        # in a's fan-out meets c there, but b can: merge waits for b and runs once, and
        # does not wait for d, which cannot return it.
        gates = Gates()
        log: list[str] = []
        agent = Agent("nested_meets_outer", isolation="inline")

        async def start(context):
            return ["a", "b"]

        async def a(context):
            return ["c", "d"]

        def gated(name: str, result: str | None):
            async def state(context):
                await gates[name].wait()
                log.append(name)
                return result

            agent.add_state(name, state, next_states=[result] if result else [])

        async def merge(context):
            log.append("merge")

        agent.add_state("start", start)
        agent.add_state("a", a)
        gated("c", "merge")
        gated("d", None)
        gated("b", "merge")
        agent.add_state("merge", merge)
        runner = asyncio.create_task(agent.run())
        for name in order:
            gates[name].set()
            while name not in log:
                await asyncio.sleep(0)
            if name != "b" and "b" not in log:
                assert "merge" not in log  # held for b
        await asyncio.wait_for(runner, 10)
        assert log.count("merge") == 1
        assert log.index("merge") > max(log.index("b"), log.index("c"))
        assert agent.state_metadata["merge"].runs == 1

    async def test_a_nested_branch_meeting_an_outer_sibling_does_not_wait_for_its_own_siblings(self) -> None:
        gates = Gates()
        log: list[str] = []
        agent = Agent("nested_meets_outer_early", isolation="inline")

        async def start(context):
            return ["a", "b"]

        async def a(context):
            return ["c", "d"]

        async def c(context):
            return "merge"

        async def d(context):
            await gates["d"].wait()  # still running when merge may start
            log.append("d")

        async def b(context):
            return "merge"

        async def merge(context):
            log.append("merge")
            gates["d"].set()

        for fn in (start, a, b, c, d, merge):
            agent.add_state(fn.__name__, fn)
        await asyncio.wait_for(agent.run(), 10)
        assert log == ["merge", "d"]

    @pytest.mark.parametrize("isolation", ["inline", "process"])
    async def test_a_nested_fan_out_naming_the_join_of_an_outer_sibling_holds_it(self, isolation: str) -> None:
        # start -> [a, b]; a -> ["merge", "x"] (a fan-out listing the join); b -> "merge".
        # merge waits for b, runs once, and does not wait for x, which cannot return it.
        agent = Agent("nested_list_meets_outer", isolation=isolation)

        async def start(context):
            return ["a", "b"]

        async def a(context):
            return ["merge", "x"]

        async def x(context):
            context.set_state("x_done", True)
            return None

        async def b(context):
            while not context.get_state("a_listed", False):  # a has handed merge over
                await asyncio.sleep(0.01)
            context.set_state("b_done", True)
            return "merge"

        async def merge(context):
            saw = context.get_state("merge_saw_b", [])
            context.set_state("merge_saw_b", [*saw, context.get_state("b_done", False)])
            return None

        async def mark(context):
            context.set_state("a_listed", True)
            return await a(context)

        for name, fn in (("start", start), ("a", mark), ("x", x), ("b", b), ("merge", merge)):
            agent.add_state(name, fn, isolation="inline" if name == "b" else None)
        await asyncio.wait_for(agent.run(), 30)
        assert agent.context.get_state("merge_saw_b") == [True]
        assert agent.state_metadata["merge"].runs == 1

    @pytest.mark.parametrize("nested", [False, True], ids=["fans-out-instead", "its-branch-goes-elsewhere"])
    async def test_a_held_join_starts_once_nothing_left_can_return_it(self, nested: bool) -> None:
        """``m`` is held while ``b`` could still return it; ``b`` fans out to ``c`` and ``d``
        instead (or ``c`` returns ``x``), which cannot: ``m`` starts then, not after them (they
        wait for ``m`` here: before, the run never ended)."""
        gates = Gates()
        log: list[str] = []
        agent = Agent("join_released", isolation="inline")

        async def start(context):
            return ["a", "b"]

        async def a(context):
            return "m"

        async def b(context):
            return "m" if context.get_state("ok") else ["c", "d"]

        async def goes_elsewhere(context):
            return "m" if context.get_state("ok") else "x"

        async def waits_for_m(context):
            await gates["m"].wait()

        async def m(context):
            log.append("m")
            gates["m"].set()

        c = goes_elsewhere if nested else waits_for_m
        for name, func in {"start": start, "a": a, "b": b, "c": c, "d": waits_for_m, "x": waits_for_m,
                           "m": m}.items():
            agent.add_state(name, func)
        await asyncio.wait_for(agent.run(), 30)
        assert log == ["m"] and agent.status is AgentStatus.COMPLETED

    async def test_checkpoint_mid_fan_out_resumes_with_the_same_hold(self) -> None:
        gate = asyncio.Event()
        log: list[str] = []

        def build() -> Agent:
            agent = Agent("resume_hold", isolation="inline")

            async def start(context):
                return ["a", "b"]

            async def a(context):
                log.append("a")
                return "merge"

            async def b(context):
                await gate.wait()
                log.append("b")
                return "merge"

            async def merge(context):
                log.append("merge")

            for fn in (start, a, b, merge):
                agent.add_state(fn.__name__, fn)
            return agent

        first = build()
        runner = asyncio.create_task(first.run())
        while "a" not in log:
            await asyncio.sleep(0)
        checkpoint = await first.pause()
        await first.cancel_all()
        await runner
        assert checkpoint.frames["groups"][1]["held"] == {"merge": 1}
        second = build()
        await second.restore_from_checkpoint(checkpoint)
        gate.set()
        await asyncio.wait_for(second.resume(), 10)
        assert log == ["a", "b", "merge"]  # a did not run again; merge once


def _computed_hand_overs(agent: Agent, n: int, rounds: int, order: list[str]) -> None:
    """``fan`` opens ``t0..tn``; each ``ti`` goes on to ``ri``, a name it computes (so it
    could return anything); every ``ri`` returns ``pick``, which loops to ``fan`` ``rounds`` times."""
    async def fan(context):
        order.append("fan")
        context.set_state("round", context.get_state("round", 0) + 1)
        return [f"t{i}" for i in range(n)]

    def step(i: int):
        async def t(context):
            return f"r{i}"

        async def r(context):
            order.append(f"r{i}")
            return "pick"

        return t, r

    async def pick(context):
        order.append("pick")
        return "fan" if context.get_state("round") < rounds else None

    agent.add_state("fan", fan)
    for i in range(n):
        t, r = step(i)
        agent.add_state(f"t{i}", t)
        agent.add_state(f"r{i}", r)
    agent.add_state("pick", pick)


class TestBranchesStartedByDependencies:
    """The run's start states and the states its dependencies start join like branches."""

    @pytest.mark.parametrize("isolation", ["inline", "process"])
    async def test_a_state_returned_by_a_chain_and_by_a_dependency_started_state_runs_once(
            self, isolation: str) -> None:
        # first -> mid -> sink; side starts on its REQUIRED dependency on first, and returns
        # sink too. Inline, these states cannot suspend and run at once: side must still be
        # started before mid's end is handed over, as it is when states run elsewhere.
        agent = Agent("dependency_branch_join", isolation=isolation)

        async def first(context):
            return "mid"

        async def mid(context):
            return "sink"

        async def side(context):
            return "sink"

        async def sink(context):
            context.set_state("sink_runs", context.get_state("sink_runs", 0) + 1)

        agent.add_state("first", first)
        agent.add_state("side", side, dependencies={"first": DependencyType.REQUIRED})
        agent.add_state("mid", mid)
        agent.add_state("sink", sink)
        context = await asyncio.wait_for(agent.run(), 30)
        assert context.get_state("sink_runs") == 1
        assert agent.state_metadata["sink"].runs == 1


    @pytest.mark.parametrize("isolation", ["inline", "process"])
    async def test_a_loop_through_a_fan_out_joins_each_round_beside_a_dependency_started_state(
            self, isolation: str) -> None:
        # head -> fan -> [a, b] -> head, twice; side starts on head. Each round's head runs
        # once, after a and b: a, which leads to b only through fan (the next round), does
        # not make b wait above.
        agent = Agent("loop_beside_side", isolation=isolation)

        def bump(context, key: str) -> int:
            n = context.get_state(key, 0) + 1
            context.set_state(key, n)
            return n

        async def head(context):
            return "fan" if bump(context, "head") <= 2 else None

        async def fan(context):
            bump(context, "fan")
            return ["a", "b"]

        async def a(context):
            bump(context, "a")
            return "head"

        async def b(context):
            bump(context, "b")
            await asyncio.sleep(0.01)
            return "head"

        async def side(context):
            bump(context, "side")

        for fn in (head, fan, a, b):
            agent.add_state(fn.__name__, fn)
        agent.add_state("side", side, dependencies={"head": DependencyType.REQUIRED})
        context = await asyncio.wait_for(agent.run(), 30)
        assert {k: context.get_state(k) for k in ("head", "fan", "a", "b", "side")} == {
            "head": 3, "fan": 2, "a": 2, "b": 2, "side": 1}


class TestComputedHandOvers:
    """Branches that go on to names they compute: the names held meanwhile are started as
    soon as nothing else could return them, and the join after them still runs once."""

    @pytest.mark.parametrize("rounds", [1, 3])
    async def test_the_join_runs_once_per_round_after_every_branch(self, rounds: int) -> None:
        order: list[str] = []
        agent = Agent("computed_hand_overs", isolation="inline")
        _computed_hand_overs(agent, 4, rounds, order)
        await asyncio.wait_for(agent.run(), 30)
        assert order.count("pick") == rounds
        for r in range(rounds):  # each round: fan, the four r's (any order), then pick
            piece = order[r * 6:(r + 1) * 6]
            assert piece[0] == "fan" and sorted(piece[1:5]) == ["r0", "r1", "r2", "r3"] and piece[5] == "pick", order
        assert {name: agent.state_metadata[name].runs for name in ("r0", "r1", "r2", "r3")} == dict.fromkeys(
            ("r0", "r1", "r2", "r3"), rounds)


class TestHeldNamesGoFirst:
    """A name handed over while a held join that could return it waits runs after that join,
    once; a held join it could return in turn waits for it instead (a tie the held one loses)."""

    @pytest.mark.parametrize("j_returns", ["read", "computed"])
    async def test_a_name_waits_for_the_held_join_that_leads_to_it(self, j_returns: str) -> None:
        log: list[str] = []
        following = {"b": "j", "c": "z", "j": "z"}
        agent = Agent("held_first", isolation="inline")

        async def start(context):
            return ["a", "b", "c"]

        async def a(context):
            return "j"

        async def b(context):
            await asyncio.sleep(0)
            return following["b"]  # computed: could return anything, so j is held for it

        async def c(context):
            for _ in range(3):
                await asyncio.sleep(0)
            return following["c"]  # computed: "z", once j is held and b is gone

        async def j_read(context):
            log.append("j")
            return "z"

        async def j_computed(context):
            log.append("j")
            return following["j"]

        async def z(context):
            log.append("z")

        for name, fn in (("start", start), ("a", a), ("b", b), ("c", c), ("z", z),
                         ("j", j_read if j_returns == "read" else j_computed)):
            agent.add_state(name, fn)
        await asyncio.wait_for(agent.run(), 10)
        assert log == ["j", "z"]


class TestLoopsAroundFanOuts:
    """A loop back to the state that opened a fan-out starts a new round: the round's join
    waits for its own branches only, and runs once per round (DESIGN items 3 and 4)."""

    @staticmethod
    def build(gates: Gates, log: list[str], rounds: int = 2) -> Agent:
        # start -> [a, b]; a -> a2 -> join; b -> join; join -> outer -> start, `rounds` times.
        # b can lead to a2, and a2 to join, only through start: the next round.
        agent = Agent("round_trip", isolation="inline")
        runs: dict[str, int] = {}

        def add(name: str, result: str | list[str] | None) -> None:
            async def state(context):
                runs[name] = runs.get(name, 0) + 1
                if name in ("a2", "b"):
                    await gates[f"{name}{runs[name]}"].wait()
                log.append(f"{name}{runs[name]}")
                if name == "outer":
                    return "start" if runs[name] < rounds else None
                return result

            agent.add_state(name, state, next_states=[] if result is None else [result] if isinstance(result, str)
                            else result)

        add("start", ["a", "b"])
        add("a", "a2")
        add("a2", "join")
        add("b", "join")
        add("join", "outer")
        add("outer", "start")
        return agent

    @pytest.mark.parametrize("first", ["a2", "b"])
    async def test_each_round_joins_once_after_both_branches(self, first: str) -> None:
        gates, log = Gates(), []
        agent = self.build(gates, log)
        runner = asyncio.create_task(agent.run())
        second = "b" if first == "a2" else "a2"
        for round_ in (1, 2):
            gates[f"{first}{round_}"].set()
            while f"{first}{round_}" not in log:
                await asyncio.sleep(0)
            assert f"join{round_}" not in log  # held for the other branch of this round
            gates[f"{second}{round_}"].set()
            while f"outer{round_}" not in log:
                await asyncio.sleep(0)
        await asyncio.wait_for(runner, 10)
        assert sorted(log) == sorted(f"{n}{r}" for n in ("start", "a", "a2", "b", "join", "outer") for r in (1, 2))
        for round_ in (1, 2):
            assert log.index(f"join{round_}") > max(log.index(f"a2{round_}"), log.index(f"b{round_}"))
        assert agent.state_metadata["join"].runs == 2

    async def test_a_loop_inside_a_branch_and_around_the_fan_out(self) -> None:
        log: list[str] = []
        laps = {"a_loop": 0, "outer": 0}
        agent = Agent("loops_in_and_around", isolation="inline")

        async def start(context):
            return ["a", "b"]

        async def a(context):
            log.append("a")
            return "a_loop"

        async def a_loop(context):  # back to a twice per round, then to the join
            laps["a_loop"] += 1
            return "a" if laps["a_loop"] % 3 else "join"

        async def b(context):
            log.append("b")
            return "join"

        async def join(context):
            log.append("join")
            return "outer"

        async def outer(context):
            laps["outer"] += 1
            return "start" if laps["outer"] < 2 else None

        for fn in (start, a, a_loop, b, join, outer):
            agent.add_state(fn.__name__, fn)
        await asyncio.wait_for(agent.run(), 10)
        assert log.count("a") == 6 and log.count("b") == 2 and log.count("join") == 2
        first_join = log.index("join")
        assert log[:first_join].count("a") == 3  # the first round's join after its third lap

    async def test_a_branch_looping_around_its_own_fan_out_still_holds_the_outer_join(self) -> None:
        # start -> [a, h]; h opens [x, y] -> k -> h twice, then returns j; a returns j at
        # once. For h's own fan-out, x cannot reach past h (a new round); for the outer
        # fan-out, x's branch still leads to j: j waits for it and runs once.
        log: list[str] = []
        agent = Agent("inner_rounds", isolation="inline")

        async def start(context):
            return ["a", "h"]

        async def a(context):
            log.append("a")
            return "j"

        async def h(context):
            lap = context.get_state("lap", 0)
            log.append(f"h{lap}")
            return ["x", "y"] if lap < 2 else "j"

        async def x(context):
            return "k"

        async def y(context):
            return "k"

        async def k(context):
            context.set_state("lap", context.get_state("lap", 0) + 1)
            return "h"

        async def j(context):
            log.append(f"j{context.get_state('lap', 0)}")

        for fn in (start, a, h, x, y, k, j):
            agent.add_state(fn.__name__, fn)
        await asyncio.wait_for(agent.run(), 10)
        assert [entry for entry in log if entry != "a"] == ["h0", "h1", "h2", "j2"]

    async def test_a_checkpoint_in_the_second_round_resumes_it(self) -> None:
        gates, log = Gates(), []
        first = self.build(gates, log)
        runner = asyncio.create_task(first.run())
        for name in ("a21", "b1", "a22"):  # round one, then a2 of round two
            gates[name].set()
        while "a22" not in log:
            await asyncio.sleep(0)
        checkpoint = await first.pause()
        await first.cancel_all()
        await runner
        round_two = [g for g in checkpoint.frames["groups"] if g.get("opener") == "start"]
        assert len(round_two) == 1 and round_two[0]["held"] == {"join": 1}
        resumed_log: list[str] = []
        second = self.build(gates, resumed_log, rounds=1)  # its counts start again: b's gate is b1
        await second.restore_from_checkpoint(checkpoint)
        await asyncio.wait_for(second.resume(), 10)
        assert resumed_log == ["b1", "join1", "outer1"]  # one join for the round, after b


class TestAStateAskedForWhileItRuns:
    """A branch returning a state that is running starts it again after it: never alongside it."""

    @pytest.mark.parametrize("second", ["completes", "fails"])
    async def test_it_runs_again_after_the_first_activation(self, second: str) -> None:
        gates = Gates()
        log: list[str] = []

        async def start(context):
            return ["a", "b"]

        async def a(context):
            log.append(f"a{len(log)} begins")
            if len(log) == 1:
                await gates["a"].wait()  # the first activation runs until b has asked for a again
            elif second == "fails":
                raise RuntimeError("the second activation fails")
            log.append("a ends")

        async def b(context):
            return "a"

        agent = Agent("again", isolation="inline", on_failure="continue")
        agent.add_state("start", start)
        agent.add_state("a", a)
        agent.add_state("b", b)
        run = asyncio.ensure_future(agent.run())
        while agent.state_metadata["b"].status is not StateStatus.COMPLETED:
            await asyncio.sleep(0)
        meta = agent.state_metadata["a"]
        assert meta.status is StateStatus.RUNNING and meta.attempts == 1  # still the first activation's
        gates["a"].set()
        if second == "fails":
            with pytest.raises(StateFailedError, match="the second activation fails"):
                await run
            assert meta.status is StateStatus.FAILED and meta.runs == 1
            assert agent.status is AgentStatus.FAILED
        else:
            await run
            assert meta.status is StateStatus.COMPLETED and meta.runs == 2
            assert agent.status is AgentStatus.COMPLETED
        assert log[:3] == ["a0 begins", "a ends", "a2 begins"]

    @pytest.mark.parametrize("isolation", ["inline", "process"])
    async def test_it_waits_for_the_first_activations_retries_too(self, isolation: str) -> None:
        # start -> [a, b]; a's first attempt fails and waits 60 s to retry; b asks for a again
        # meanwhile. The second activation waits for the first, its retry included, and the
        # state's metadata goes on describing the first.
        from agent import RetryPolicy

        async def start(context):
            return ["a", "b"]

        async def a(context):
            n = context.get_state("a_attempts", 0) + 1
            context.set_state("a_attempts", n)
            if n == 1:
                raise RuntimeError("the first attempt fails")

        async def b(context):
            return "a"

        agent = Agent("again_retrying", isolation=isolation)
        agent.add_state("start", start)
        agent.add_state("a", a, retry_policy=RetryPolicy(max_retries=1, initial_delay=60.0, jitter=False))
        agent.add_state("b", b, isolation="inline")
        run = asyncio.ensure_future(agent.run())
        meta = agent.state_metadata["a"]
        while not (agent.state_metadata["b"].status is StateStatus.COMPLETED and meta.error is not None):
            await asyncio.sleep(0.01)
        # Both have happened: a second activation that did not wait has been launched now.
        assert agent.context.get_state("a_attempts") == 1
        assert meta.status is StateStatus.READY and meta.attempts == 1  # still the first activation's
        assert meta.waiting_for is not None and meta.waiting_for.startswith("retry 1 of 1")
        await agent.cancel_all()
        await run


class TestCancellingAStateAskedForTwice:
    """cancel_state and cancel_all end every activation of a state: the one that runs or
    waits to retry, and one waiting behind it; each state ends once, CANCELLED."""

    @staticmethod
    def build(isolation: str, first: str, **options):
        from agent import RetryPolicy

        gates = Gates()

        async def start(context):
            return ["a", "b"]

        async def a(context):
            n = context.get_state("a_started", 0) + 1
            context.set_state("a_started", n)
            if first == "retrying":
                raise RuntimeError("the first attempt fails")
            await asyncio.sleep(60)

        async def b(context):
            return "a"

        agent = Agent("asked_twice", isolation=isolation, **options)
        agent.add_state("start", start)
        agent.add_state("a", a, retry_policy=RetryPolicy(max_retries=1, initial_delay=60.0, jitter=False))
        agent.add_state("b", b, isolation="inline")
        return agent, gates

    @staticmethod
    async def both_asked(agent, first: str) -> None:
        meta = agent.state_metadata["a"]
        while not (agent.state_metadata["b"].status is StateStatus.COMPLETED
                   and (meta.error is not None if first == "retrying" else meta.status is StateStatus.RUNNING)):
            await asyncio.sleep(0.01)

    @pytest.mark.parametrize("isolation", ["inline", "process"])
    @pytest.mark.parametrize("first", ["running", "retrying"])
    async def test_cancel_state_ends_both(self, isolation: str, first: str) -> None:
        events: list[tuple[str, str | None]] = []
        agent, _ = self.build(isolation, first)
        agent.add_observer(lambda e: events.append((e.kind, e.state)))
        run = asyncio.ensure_future(agent.run())
        await self.both_asked(agent, first)
        assert agent.cancel_state("a") is True
        await asyncio.wait_for(run, 30)
        assert agent.status is AgentStatus.COMPLETED
        assert agent.state_metadata["a"].status is StateStatus.CANCELLED
        assert agent.context.get_state("a_started") == 1  # the second activation never ran
        assert events.count(("state_cancelled", "a")) == 1

    @pytest.mark.parametrize("isolation", ["inline", "process"])
    async def test_cancel_all_ends_both(self, isolation: str) -> None:
        agent, _ = self.build(isolation, "running")
        run = asyncio.ensure_future(agent.run())
        await self.both_asked(agent, "running")
        await agent.cancel_all()
        await asyncio.wait_for(run, 30)
        assert agent.status is AgentStatus.CANCELLED
        assert agent.state_metadata["a"].status is StateStatus.CANCELLED

    @pytest.mark.parametrize("first", ["running", "failed"])
    async def test_cancel_state_ends_its_arrivals_held_at_a_join_too(self, first: str) -> None:
        # run(start=[j, f]); f -> [p, q]; p returns j, held for q. j runs (or failed for good
        # already): cancel_state ends it and the held arrival, and q's arrival ends there.
        gates = Gates()
        ran: list[str] = []

        async def j(context):
            ran.append("j")
            if first == "failed":
                raise RuntimeError("j fails for good")
            await gates["j"].wait()

        async def f(context):
            return ["p", "q"]

        async def p(context):
            return "j"

        async def q(context):
            await gates["q"].wait()
            return "j"

        agent = Agent("held_and_cancelled", isolation="inline", on_failure="continue")
        agent.add_state("j", j, next_states=[])
        agent.add_state("f", f, next_states=["p", "q"])
        agent.add_state("p", p, next_states=["j"])
        agent.add_state("q", q, next_states=["j"])
        run = asyncio.ensure_future(agent.run(start=["j", "f"]))
        while not (agent.state_metadata["p"].status is StateStatus.COMPLETED and ran):
            await asyncio.sleep(0.01)
        while first == "failed" and agent.state_metadata["j"].status is not StateStatus.FAILED:
            await asyncio.sleep(0.01)
        assert agent.cancel_state("j") is True
        gates["q"].set()
        gates["j"].set()
        if first == "failed":
            with pytest.raises(StateFailedError):
                await asyncio.wait_for(run, 30)
            assert agent.state_metadata["j"].status is StateStatus.FAILED  # how it ended, kept
        else:
            await asyncio.wait_for(run, 30)
            assert agent.state_metadata["j"].status is StateStatus.CANCELLED
        assert ran == ["j"]

    async def test_a_queued_second_activation_leaves_the_running_ones_metadata_alone(self) -> None:
        agent, _ = self.build("inline", "running", max_concurrent=2)
        run = asyncio.ensure_future(agent.run())
        await self.both_asked(agent, "running")
        meta = agent.state_metadata["a"]
        assert meta.status is StateStatus.RUNNING and meta.waiting_for is None
        await agent.cancel_all()
        await run


    @pytest.mark.parametrize("isolation", ["inline", "process"])
    async def test_the_error_counts_the_attempts_of_the_activation_that_failed(self, isolation: str) -> None:
        # on_failure="continue": a's first activation fails for good after 2 attempts; the
        # second (asked for by b meanwhile) runs after it and completes.
        from agent import RetryPolicy

        async def start(context):
            return ["a", "b"]

        async def a(context):
            n = context.get_state("a_started", 0) + 1
            context.set_state("a_started", n)
            if n <= 2:
                raise RuntimeError(f"fail {n}")

        async def b(context):
            return "a"

        agent = Agent("counted", isolation=isolation, on_failure="continue")
        agent.add_state("start", start)
        agent.add_state("a", a, retry_policy=RetryPolicy(max_retries=1, initial_delay=0.2, jitter=False))
        agent.add_state("b", b, isolation="inline")
        with pytest.raises(StateFailedError) as info:
            await asyncio.wait_for(agent.run(), 30)
        assert info.value.attempts == 2 and "fail 2" in str(info.value)
        assert agent.context.get_state("a_started") == 3


class TestPriorityAcrossBranches:
    """A CRITICAL state returned by a short branch starts at once and evicts its LOW siblings."""

    async def test_critical_state_preempts_long_low_siblings(self) -> None:
        started = {n: asyncio.Event() for n in ("long_a", "long_b")}
        log: list[str] = []
        pool = ResourcePool(total_cpu=2, total_memory=1000, total_gpu=0, enable_preemption=True)
        agent = Agent("critical", isolation="inline", resource_pool=pool)

        def long(name: str):
            async def run_long(context):
                if not context.get_state(f"{name}_evicted"):
                    context.set_state(f"{name}_evicted", True)
                    started[name].set()
                    await asyncio.Event().wait()  # until preempted
                log.append(name)

            return run_long

        async def start(context):
            return ["long_a", "long_b", "short"]

        async def short(context):
            await started["long_a"].wait()
            await started["long_b"].wait()
            return "urgent"

        async def urgent(context):
            log.append("urgent")

        low = ResourceRequirements(cpu_units=1, memory_mb=10, priority=Priority.LOW)
        agent.add_state("start", start)
        agent.add_state("long_a", long("long_a"), resources=low)
        agent.add_state("long_b", long("long_b"), resources=low)
        agent.add_state("short", short)
        agent.add_state("urgent", urgent, resources=ResourceRequirements(
            cpu_units=2, memory_mb=10, priority=Priority.CRITICAL))
        await asyncio.wait_for(agent.run(), 10)
        assert log[0] == "urgent"
        assert sorted(log[1:]) == ["long_a", "long_b"]
        assert agent.state_metadata["long_a"].preemptions == 1


class TestPartialFailure:
    """on_failure='continue' ends only the failing branch; the run still fails, after the rest."""

    def build(self, fail: bool, log: list[str]) -> Agent:
        agent = Agent("batch", isolation="inline", on_failure="continue")

        async def start(context):
            return ["w1", "w2", "w3"]

        def worker(name: str):
            async def work(context):
                if name == "w2" and context.get_state("broken", fail):
                    raise RuntimeError("bad shard")
                context.set_state(f"{name}_result", name.upper())
                log.append(name)
                return "join"

            return work

        async def join(context):
            log.append("join")
            context.set_state("failed_seen", context.failed_states())

        agent.add_state("start", start)
        for name in ("w1", "w2", "w3"):
            agent.add_state(name, worker(name), next_states=["join"])
        agent.add_state("join", join)
        return agent

    async def test_join_runs_and_sees_the_failure(self) -> None:
        log: list[str] = []
        agent = self.build(True, log)
        with pytest.raises(StateFailedError, match="'w2'") as raised:
            await agent.run()
        assert sorted(log) == ["join", "w1", "w3"] and log[-1] == "join"
        seen = agent.context.get_state("failed_seen")
        assert list(seen) == ["w2"] and "bad shard" in seen["w2"]
        assert set(raised.value.failures) == {"w2"}  # type: ignore[attr-defined]
        assert agent.status is AgentStatus.FAILED
        assert agent.state_metadata["w1"].status is StateStatus.COMPLETED  # not reported cancelled
        assert agent.state_metadata["w2"].status is StateStatus.FAILED

    async def test_every_failed_state_is_named(self) -> None:
        agent = Agent("many", isolation="inline", on_failure="continue")

        async def start(context):
            return ["x", "y"]

        async def boom(context):
            raise ValueError("no")

        agent.add_state("start", start)
        agent.add_state("x", boom)
        agent.add_state("y", boom)
        with pytest.raises(StateFailedError) as raised:
            await agent.run()
        assert set(raised.value.failures) == {"x", "y"}  # type: ignore[attr-defined]
        assert "also failed for good" in str(raised.value)

    @pytest.mark.parametrize("isolation", ["process", "sandbox"])
    async def test_an_isolated_join_sees_the_failure(self, isolation: str) -> None:
        """The failures reach the join's own process (sent in its start message)."""
        agent = Agent("isolated-batch", isolation=isolation, on_failure="continue")

        async def start(context):
            return ["good", "bad"]

        async def good(context):
            return "join"

        async def bad(context):
            raise RuntimeError("bad shard")

        async def join(context):
            context.set_state("failed_seen", context.failed_states())

        agent.add_state("start", start)
        agent.add_state("good", good)
        agent.add_state("bad", bad, next_states=["join"])
        agent.add_state("join", join, context_keys=["failed_seen"])
        with pytest.raises(StateFailedError, match="'bad'"):
            await agent.run()
        seen = agent.context.get_state("failed_seen")
        assert list(seen) == ["bad"]
        # Why may quote what another state saw: a sandbox is told only which failed.
        assert ("bad shard" in seen["bad"]) is (isolation == "process")

    async def test_per_state_setting_overrides_the_agent(self) -> None:
        agent = Agent("strict", isolation="inline")  # default: fail the run
        log: list[str] = []

        async def start(context):
            return ["tolerated", "other"]

        async def tolerated(context):
            raise RuntimeError("fine")

        async def other(context):
            log.append("other")

        agent.add_state("start", start)
        agent.add_state("tolerated", tolerated, on_failure="continue")
        agent.add_state("other", other)
        with pytest.raises(StateFailedError):
            await agent.run()
        assert log == ["other"]

    async def test_failed_run_is_resumed_after_the_fix(self, tmp_path) -> None:
        store = SQLiteCheckpointStore(str(tmp_path / "runs.sqlite3"))
        log: list[str] = []
        first = self.build(True, log)
        first.checkpoint_store = store
        with pytest.raises(StateFailedError):
            await first.run()
        run_id = first.run_id
        assert run_id is not None
        log.clear()
        fixed = self.build(False, log)
        context = await fixed.resume_run(run_id, store)
        assert log == ["w2", "join"]  # only the failed branch, and what it leads to
        assert fixed.status is AgentStatus.COMPLETED
        assert context.get_state("w2_result") == "W2" and context.get_state("w1_result") == "W1"
        assert context.get_state("failed_seen") == {}

    async def test_a_failure_while_a_sibling_runs_is_resumed_after_the_fix(self, tmp_path) -> None:
        # b1 fails while a still runs: a is stopped, and the resumed run starts both
        # branches again and joins them once (it raised KeyError in the join bookkeeping).
        store = SQLiteCheckpointStore(str(tmp_path / "runs.sqlite3"))
        log: list[str] = []

        def build(broken: bool) -> Agent:
            agent = Agent("cut_short", isolation="inline", checkpoint_store=store)

            async def fan(context):
                return ["a", "b1"]

            async def a(context):
                if broken:
                    await asyncio.Event().wait()  # still running when b1 fails
                log.append("a")
                return "join"

            async def b1(context):
                if broken:
                    raise RuntimeError("broken")
                log.append("b1")
                return "b2"

            async def b2(context):
                log.append("b2")
                return "join"

            async def join(context):
                log.append("join")

            for fn in (fan, a, b1, b2, join):
                agent.add_state(fn.__name__, fn)
            return agent

        first = build(True)
        with pytest.raises(StateFailedError):
            await first.run()
        assert log == []
        fixed = build(False)
        await asyncio.wait_for(fixed.resume_run(first.run_id, store), 10)
        assert sorted(log) == ["a", "b1", "b2", "join"] and log[-1] == "join"
        assert fixed.status is AgentStatus.COMPLETED

    @pytest.mark.parametrize("value", ["ignore", 1])
    def test_bad_setting(self, value) -> None:
        from agent import InvalidConfigurationError

        with pytest.raises(InvalidConfigurationError, match="on_failure"):
            Agent("x", on_failure=value)


class TestPartialFailureAcrossACheckpoint:
    @pytest.mark.parametrize("isolation", ["inline", "process"])
    async def test_a_failure_before_the_checkpoint_fails_the_restored_run(self, isolation: str) -> None:
        # on_failure="continue": bad fails for good, gate is paused; restored elsewhere from
        # the checkpoint (through JSON), the run goes on and still ends FAILED, naming bad.
        from agent import AgentCheckpoint

        async def start(context):
            return ["bad", "gate"]

        async def bad(context):
            raise ValueError("bad fails for good")

        async def gate(context):
            context.set_state("gate_runs", context.get_state("gate_runs", 0) + 1)
            if context.get_state("gate_runs") == 1:
                await asyncio.sleep(60)

        async def reads(context):
            context.set_state("failed_seen", context.failed_states())

        async def bad_fixed(context):
            return None

        def build(bad_state=bad) -> Agent:
            agent = Agent("failed_then_restored", isolation=isolation, on_failure="continue")
            agent.add_state("start", start)
            agent.add_state("bad", bad_state)
            agent.add_state("gate", gate, next_states=[])
            agent.add_state("reads", reads, dependencies=["gate"])
            return agent

        first = build()
        run = asyncio.ensure_future(first.run())
        while not (first.state_metadata["bad"].status is StateStatus.FAILED
                   and first.state_metadata["gate"].status is StateStatus.RUNNING):
            await asyncio.sleep(0.01)
        checkpoint = await first.pause()
        await first.cancel_all()
        await run  # cancelled: the checkpoint is what goes on
        second = build()
        await second.restore_from_checkpoint(AgentCheckpoint.from_dict(json.loads(json.dumps(checkpoint.to_dict()))))
        with pytest.raises(StateFailedError, match="bad fails for good") as info:
            await asyncio.wait_for(second.run(), 30)
        assert info.value.state == "bad" and second.status is AgentStatus.FAILED
        assert second.context.get_state("gate_runs") == 2
        assert second.context.get_state("failed_seen") == {"bad": "ValueError: bad fails for good"}
        # The restored run failed: resuming its checkpoint runs bad again (fixed now).
        fixed = build(bad_fixed)
        await fixed.restore_from_checkpoint(second.create_checkpoint())
        await asyncio.wait_for(fixed.run(), 30)
        assert fixed.status is AgentStatus.COMPLETED and fixed.state_metadata["bad"].status is StateStatus.COMPLETED


class TestWhatAStateCanReach:
    """The engine's reading of what each state can lead to (which joins must wait) is
    plain reachability, also when states share a function or loop back to themselves."""

    @staticmethod
    def _expected(returns: dict[str, frozenset[str] | None], name: str) -> frozenset[str] | None:
        seen: set[str] = set()
        todo = list(returns[name] or ())
        if returns[name] is None:
            return None
        while todo:
            node = todo.pop()
            if node in seen:
                continue
            seen.add(node)
            if returns[node] is None:
                return None
            todo.extend(returns[node])  # type: ignore[arg-type]
        return frozenset(seen)

    @given(st.data())
    @settings(max_examples=200, deadline=None)
    def test_reach_is_reachability(self, data: st.DataObject) -> None:
        from agent.workflow import ReturnGraph, StateSpec

        names = [f"s{i}" for i in range(data.draw(st.integers(1, 8)))]
        # A few deciders, each shared by some states: a set of next_states (None: a
        # function whose returns cannot be read, so it can lead anywhere).
        deciders = data.draw(st.lists(
            st.one_of(st.none(), st.frozensets(st.sampled_from(names), max_size=3)), min_size=1, max_size=4))

        async def computed(context):
            return context.get_state("next")

        specs, returns = {}, {}
        for name in names:
            declared = data.draw(st.sampled_from(deciders))
            specs[name] = StateSpec(name, computed, next_states=declared)
            returns[name] = declared
        graph = ReturnGraph(specs)
        for name in data.draw(st.permutations(names)):  # the order asked in must not matter
            assert graph.reach(name) == self._expected(returns, name), name
        opener = data.draw(st.sampled_from(names))  # a round of its fan-out: never through it
        for name in names:
            assert graph.reach_within(name, opener) == self._within(returns, name, opener), (name, opener)

    @staticmethod
    def _within(returns: dict[str, frozenset[str] | None], name: str, opener: str) -> frozenset[str] | None:
        """Reachability from ``name`` where paths end at ``opener`` (what lies past it, readable
        or not, is another round's)."""
        seen: set[str] = set()
        todo = [name]
        while todo:
            following = returns[todo.pop()]
            if following is None:
                return None
            for node in following:
                if node not in seen:
                    seen.add(node)
                    if node != opener:
                        todo.append(node)
        return frozenset(seen)


def _without_source(code: str, **names: object) -> object:
    """The state function ``code`` defines (seeing ``names`` as globals), made where no
    source can be read back (as from a sourceless install): its returns are read from its
    bytecode."""
    namespace: dict[str, object] = dict(names)
    exec(compile(code, "<generated>", "exec"), namespace)
    return next(v for k, v in namespace.items() if k != "__builtins__" and k not in names)


class TestReturnsReadFromBytecode:
    """Without source, a return counts as known only where constants alone can feed it."""

    @pytest.mark.parametrize(("body", "expected"), [
        ('return "a"', frozenset({"a"})),
        ('return ["a", "b"]', frozenset({"a", "b"})),
        ('return ("a", "b")', frozenset({"a", "b"})),
        ('return {"a", "b", "c", "d"}', frozenset({"a", "b", "c", "d"})),
        ('if context:\n        return "a"\n    return None', frozenset({"a"})),
        # A jump lands on the return carrying another value: anything.
        ('return context.get_state("next") or None', None),
        ('return context and "a"', None),
        ('return "a" if context else context.get_state("next")', None),
        ('return context.get_state("next")', None),
    ])
    def test_what_a_sourceless_state_can_return(self, body: str, expected: frozenset[str] | None) -> None:
        from agent.workflow import function_returns

        func = _without_source(f"async def state(context):\n    {body}\n")
        assert function_returns(func) == expected

    async def test_a_sourceless_or_return_holds_the_join(self) -> None:
        log: list[str] = []
        gate = asyncio.Event()
        agent = Agent("sourceless", isolation="inline")

        async def start(context):
            return ["fast", "router"]

        async def fast(context):
            return "join"

        async def join(context):
            log.append("join")

        router = _without_source(
            "async def router(context):\n"
            "    await gate.wait()\n"
            "    return context.get_state('next') or None\n", gate=gate)
        for name, fn in (("start", start), ("fast", fast), ("router", router), ("join", join)):
            agent.add_state(name, fn)
        runner = asyncio.create_task(agent.run(initial_context={"next": "join"}))
        while agent.state_metadata["fast"].status is not StateStatus.COMPLETED:
            await asyncio.sleep(0)
        for _ in range(5):
            await asyncio.sleep(0)
        assert log == []  # held: the router could still return it
        gate.set()
        await asyncio.wait_for(runner, 10)
        assert log == ["join"]  # once, after the router
