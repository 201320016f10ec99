"""A state function's pickle is reused only while it would come out the same."""

from __future__ import annotations

import gc
import math
import sys
import types
import weakref

import cloudpickle
import pytest

from agent import Agent
from agent.supervisor.pickled import BYTES_PER_CODE, KEPT_PER_CODE, MAX_KEPT, PickledFunctions, dumps, fingerprint

SETTING = 1
TABLE = {"x": 1}


def closure_over(value: object) -> tuple[types.FunctionType, types.CellType]:
    async def state(context):
        return value

    assert state.__closure__ is not None
    return state, state.__closure__[0]  # type: ignore[return-value]


def helper() -> int:
    return SETTING


def test_an_unchanged_function_is_pickled_once() -> None:
    state, _ = closure_over("s1")
    pickled = PickledFunctions()
    first = pickled.dumps(state)
    assert first == cloudpickle.dumps(state)
    assert pickled.dumps(state) is first


def _rebind_setting() -> None:
    global SETTING
    SETTING = SETTING + 1000  # a new int object


def _set_code(func: types.FunctionType) -> None:
    func.__code__ = func.__code__.replace(co_consts=(*func.__code__.co_consts, "another constant"))


CHANGES = {
    "closure cell": lambda func, cell: setattr(cell, "cell_contents", "changed"),
    "defaults": lambda func, cell: setattr(func, "__defaults__", ("d",)),
    "keyword defaults": lambda func, cell: setattr(func, "__kwdefaults__", {"k": 2}),
    "attribute": lambda func, cell: setattr(func, "tag", "new"),
    "annotations": lambda func, cell: func.__annotations__.update(context=int),
    "code": lambda func, cell: _set_code(func),
    "name": lambda func, cell: setattr(func, "__qualname__", "renamed"),
    "a global it reads, rebound": lambda func, cell: _rebind_setting(),
}


@pytest.mark.parametrize("change", list(CHANGES), ids=list(CHANGES))
def test_any_change_to_what_is_copied_makes_a_new_pickle(change: str) -> None:
    state, cell = closure_over(helper if "global" in change else "s1")
    pickled = PickledFunctions()
    if "global" in change:  # a function it holds reads the global: copied with it, by value
        helper.__module__ = "__main__"
    try:
        pickled.dumps(state)
        CHANGES[change](state, cell)
        assert pickled.dumps(state) == cloudpickle.dumps(state)
    finally:
        helper.__module__ = __name__


def test_a_function_that_holds_something_mutable_is_pickled_every_time() -> None:
    state, cell = closure_over([1])
    assert fingerprint(state) is None
    pickled = PickledFunctions()
    first = pickled.dumps(state)
    cell.cell_contents.append(2)
    assert pickled.dumps(state) == cloudpickle.dumps(state) != first


def test_a_bound_builtin_method_counts_as_its_object() -> None:
    assert fingerprint(closure_over([].append)[0]) is None
    assert fingerprint(closure_over(len)[0]) is not None


def test_a_newly_loaded_module_makes_a_new_pickle() -> None:
    state, _ = closure_over("s1")
    mark = fingerprint(state)
    sys.modules["_agent_test_new_module"] = types.ModuleType("_agent_test_new_module")
    try:
        assert fingerprint(state) != mark
    finally:
        del sys.modules["_agent_test_new_module"]


def test_other_callables_are_pickled_as_they_are() -> None:
    class Step:
        async def __call__(self, context):
            return None

    pickled = PickledFunctions()
    step = Step()
    assert pickled.dumps(step) == dumps(step)  # cloudpickle's, the class's qualified name kept
    assert pickled.dumps(len) == cloudpickle.dumps(len)


async def test_each_launch_sees_what_the_state_closes_over_then(level) -> None:
    value = "first"

    async def read(context):
        context.set_state("seen", value)
        return "read_table"

    async def read_table(context):  # reads a dict: pickled for every launch
        context.set_state("table", TABLE["x"])

    agent = Agent("pickled_closure", isolation=level)
    agent.add_state("read", read)
    agent.add_state("read_table", read_table)
    await agent.run()
    assert (agent.context.get_state("seen"), agent.context.get_state("table")) == ("first", 1)
    value = "second"
    TABLE["x"] = 2
    try:
        await agent.run()
    finally:
        TABLE["x"] = 1
    assert (agent.context.get_state("seen"), agent.context.get_state("table")) == ("second", 2)


def test_a_kept_pickle_does_not_keep_its_function_alive() -> None:
    def make() -> types.FunctionType:
        async def ping(context):
            return pong

        async def pong(context):
            return ping

        return ping  # type: ignore[return-value]

    pickled = PickledFunctions()
    state = make()
    pickled.dumps(state)
    assert pickled.dumps(state) is pickled.dumps(state)  # kept
    gone = weakref.ref(state)
    del state
    gc.collect()
    assert gone() is None


def fresh(text: str) -> str:
    """An equal string that is another object."""
    return "".join(list(text))


def test_a_closure_made_again_from_the_same_code_reuses_the_pickle() -> None:
    # A program that builds its agent per request makes new closures each time.
    pickled = PickledFunctions()
    first = pickled.dumps(closure_over("s1")[0])
    again, _ = closure_over(fresh("s1"))
    assert pickled.dumps(again) is first
    assert first == cloudpickle.dumps(again)


@pytest.mark.parametrize(("before", "now"), [
    ("s1", "s2"), (1, True), (1, 1.0), (0.0, -0.0), (b"x", "x"), (1.5, 1.5000000000000002), (helper, len),
], ids=["str", "int-bool", "int-float", "zero-sign", "bytes-str", "float-bits", "function"])
def test_a_closure_made_again_over_other_values_is_pickled_for_them(before: object, now: object) -> None:
    pickled = PickledFunctions()
    first = pickled.dumps(closure_over(before)[0])
    state, _ = closure_over(now)
    assert pickled.dumps(state) == cloudpickle.dumps(state) != first


def test_a_closure_over_functions_made_with_it_is_pickled_each_time_made() -> None:
    def make(value: str) -> types.FunctionType:
        async def ping(context):
            return pong

        async def pong(context):
            return value

        return ping  # type: ignore[return-value]

    pickled = PickledFunctions()
    first = pickled.dumps(make("a"))
    state = make("b")  # its pong is a new function, which reads another value
    assert pickled.dumps(state) == cloudpickle.dumps(state) != first


def test_the_closures_kept_per_code_are_the_most_recently_used() -> None:
    pickled = PickledFunctions()
    oldest = pickled.dumps(closure_over("v0")[0])
    for n in range(1, KEPT_PER_CODE + 1):
        pickled.dumps(closure_over(f"v{n}")[0])
    newest = pickled.dumps(closure_over(f"v{KEPT_PER_CODE}")[0])
    assert pickled.dumps(closure_over(fresh(f"v{KEPT_PER_CODE}"))[0]) is newest
    again = pickled.dumps(closure_over(fresh("v0"))[0])
    assert again == oldest and again is not oldest  # pickled again: the oldest went


def test_the_closures_kept_per_code_hold_a_bounded_size() -> None:
    # A builder of closures over large values, new for every run, keeps a few of them.
    pickled = PickledFunctions()
    big = MAX_KEPT // 2

    def over(n: int) -> types.FunctionType:
        return closure_over(fresh(f"{n:08}" * (big // 8)))[0]

    first = pickled.dumps(over(0))
    assert pickled.dumps(over(0)) is first  # kept
    for n in range(1, 2 * BYTES_PER_CODE // big):
        pickled.dumps(over(n))
    again = pickled.dumps(over(0))
    assert again == first and again is not first  # pickled again: it went for the newer ones


async def test_an_agent_built_again_runs_what_it_was_built_with(level) -> None:
    def build(value: object) -> Agent:
        async def keep(context):
            context.set_state("kept", value)

        agent = Agent("built_per_request", isolation=level)
        agent.add_state("keep", keep)
        return agent

    seen = []
    for value in ("first", "second", fresh("first"), 0.0, -0.0, 1, True):
        agent = build(value)
        await agent.run()
        seen.append(agent.context.get_state("kept"))
    assert seen == ["first", "second", "first", 0.0, -0.0, 1, True]
    assert [type(v) for v in seen[-2:]] == [int, bool]
    assert math.copysign(1.0, seen[3]) == 1.0 and math.copysign(1.0, seen[4]) == -1.0


def test_a_closure_over_a_function_born_where_a_gone_one_was_is_pickled_for_it() -> None:
    # A function pickled by name is known by identity; once the one a kept pickle names is
    # gone, a new function may take its id, and must not take its pickle too.
    pickled = PickledFunctions()
    for n in range(50):
        name = f"_agent_test_gone_{n}"
        module = sys.modules[name] = types.ModuleType(name)
        try:
            exec(f"async def step(context):\n    return {n}", module.__dict__)
            state, _ = closure_over(module.step)
            assert pickled.dumps(state) == cloudpickle.dumps(state)
        finally:
            del sys.modules[name]
        del module, state
        gc.collect()


def test_a_copied_class_keeps_its_qualified_name_in_another_process() -> None:
    """cloudpickle alone makes it with its bare name (``Point``), in a process that lacks it."""
    import subprocess

    def make():
        class Point:
            class Inner:
                pass

        return Point

    point = make()
    read = "import pickle, sys; p = pickle.loads(sys.stdin.buffer.read()); print(p.__qualname__, p.Inner.__qualname__)"
    done = subprocess.run([sys.executable, "-c", read], input=dumps(point), capture_output=True, timeout=60,
                          check=True)
    assert done.stdout.decode().split() == [point.__qualname__, f"{point.__qualname__}.Inner"]
    assert point.__qualname__.endswith("make.<locals>.Point")
