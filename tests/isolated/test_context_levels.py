"""What a state does with its context reads back the same in a child as inline."""

from __future__ import annotations

import dataclasses
import enum
import subprocess
import sys
import textwrap

import pytest

from agent import Agent, TypedContextData, UnencodableValueError

from ..values.test_model import Counted, OwnInit


class Key(enum.StrEnum):
    DRAFT = "draft"


async def writes(context):
    context.set_state("draft", "x")
    context.set_typed("own", OwnInit("abc"))
    context.set_typed("counted", Counted())
    return "reads"


async def reads(context):
    context.set_state("removed", context.remove_state(Key.DRAFT))  # names "draft", as get_state finds it
    context.set_state("seen", [context.get_typed("own", OwnInit).b, context.get_typed("counted", Counted).n])


@pytest.mark.parametrize("level", ["inline", "process", "worker"])
async def test_keys_and_typed_values_read_back_as_inline(level):
    agent = Agent("context_levels", isolation=level)
    agent.add_state("writes", writes)
    agent.add_state("reads", reads)
    ctx = await agent.run()
    assert ctx.get_state("removed") is True and not ctx.has_state("draft")
    assert ctx.get_state("seen") == ["abc", 1]
    assert ctx.get_typed("counted", Counted).n == 1 and ctx.get_typed("own", OwnInit).a == 3


@pytest.mark.parametrize("level", ["inline", "process", "worker"])
async def test_a_typed_class_defined_in_a_function_is_refused_by_set_typed_as_inline(level):
    """The class reaches the state's process with its qualified name (``...<locals>.Local``),
    so ``set_typed`` refuses it there as inline, and the state can catch that; before, the
    copy was named ``Local`` and the whole attempt failed as a protocol violation."""
    @dataclasses.dataclass
    class Local(TypedContextData):
        x: int

    async def store(context):
        try:
            context.set_typed("k", Local(1))
        except UnencodableValueError as exc:
            context.set_state("refused", [str(exc), type(Local(1)).__qualname__])

    agent = Agent("local_class", isolation=level)
    agent.add_state("store", store)
    message, qualname = (await agent.run()).get_state("refused")
    assert qualname == Local.__qualname__ and qualname.endswith("<locals>.Local")
    assert message.startswith(f"context key 'k': {qualname} is defined inside a function")


SCRIPT = """
    import asyncio, dataclasses
    from agent import Agent, TypedContextData

    class Holder:
        @dataclasses.dataclass
        class Nested(TypedContextData):
            v: int = 1

    async def writes(context):
        context.set_typed("n", Holder.Nested(2))

    async def main():
        agent = Agent("nested", isolation="process")
        agent.add_state("writes", writes)
        value = (await agent.run()).get_typed("n", Holder.Nested)
        print(type(value).__qualname__, value.v)

    asyncio.run(main())
"""


def test_a_typed_class_nested_in_a_class_of_the_script_crosses_processes(tmp_path):
    script = tmp_path / "flow.py"
    script.write_text(textwrap.dedent(SCRIPT))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["Holder.Nested", "2"]
