"""What a state does with its context reads back the same in a child as inline."""

from __future__ import annotations

import enum
import subprocess
import sys
import textwrap

import pytest

from agent import Agent

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
