"""A real deadlock, found and broken: two states take two mutexes in opposite order.

State ``a`` holds m1 and wants m2; state ``b`` holds m2 and wants m1. The deadlock
detector sees the cycle in the wait-for graph and fails the youngest waiter with
DeadlockError; with a retry, that state runs again once the other has finished.

Run: python examples/coordination_deadlock.py
"""

import asyncio

from agent import Context, StateResult, coordination
from agent.coordination import create_coordinated_agent

agent = create_coordinated_agent("deadlock_demo", isolation="inline")
agent._coordinator.deadlock_detector.detection_interval = 0.1
holding = {"a": asyncio.Event(), "b": asyncio.Event()}


def take(first: str, second: str, me: str, other: str):
    async def state(context: Context) -> StateResult:
        async with coordination.mutex(first):
            holding[me].set()
            await holding[other].wait()
            async with coordination.mutex(second):
                context.set_state(f"{me}_done", True)
        return None

    return state


async def start(context: Context) -> StateResult:
    return ["a", "b"]


agent.add_state("start", start)
agent.add_state("a", take("m1", "m2", "a", "b"), max_retries=1)
agent.add_state("b", take("m2", "m1", "b", "a"), max_retries=1)


async def main() -> None:
    context = await agent.run(timeout=30)
    status = await agent.get_coordination_status()
    print("a done:", context.get_state("a_done"), "b done:", context.get_state("b_done"))
    print("cycles detected:", status["deadlock_detector"]["cycle_count"])
    for cycle in status["deadlock_detector"]["recent_cycles"]:
        print("  ", cycle["cycle"], "-> failed", cycle["victim"])


if __name__ == "__main__":
    asyncio.run(main())
