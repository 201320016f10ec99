"""Priorities and preemption: an urgent job evicts two batch jobs, which resume later.

The pool has 2 CPUs. Two LOW-priority embedding jobs take one CPU each and record
their progress in the context as they go. An urgent HIGH-priority inference job then
arrives needing both CPUs: with ``enable_preemption`` the scheduler evicts both batch
jobs (PREEMPT; not counted as failed attempts), runs the urgent job, and restarts the
batch jobs, which continue from the progress they had written.

The batch and urgent jobs run as isolated processes (the default); the dispatcher that
watches the batch jobs' progress runs inline, because only the supervisor's context sees
every child's writes as they arrive (a child sees its snapshot plus its own writes).

Run it: ``python examples/priorities_preemption.py`` (prints a timeline).
"""

import asyncio
import time

from agent import Agent, Context, Priority, ResourcePool, ResourceRequirements, StateResult
from agent import events as ev

ROWS = 40
pool = ResourcePool(total_cpu=2, total_memory=2048, total_gpu=0, enable_preemption=True)
agent = Agent("shared_box", resource_pool=pool)
timeline: list[str] = []
_t0 = time.monotonic()


def _log(event: ev.RunEvent) -> None:
    if event.kind in (ev.STATE_STARTED, ev.STATE_PREEMPTED, ev.STATE_COMPLETED) and event.state != "dispatch":
        timeline.append(f"{time.monotonic() - _t0:6.2f}s  {event.kind.replace('state_', ''):<10} {event.state}")


agent.add_observer(_log)


async def dispatch(context: Context) -> StateResult:
    return ["embed_shard_a", "embed_shard_b", "urgent_request"]


def embed_shard(key: str):
    async def embed(context: Context) -> StateResult:
        done = context.get_state(key, 0)
        if done:
            context.set_state(f"{key}_resumed_at", done)
        while done < ROWS:
            await asyncio.sleep(0.01)  # embed one row
            done += 1
            context.set_state(key, done)  # progress survives an eviction
        return None

    return embed


async def urgent_request(context: Context) -> StateResult:
    while context.get_state("rows_a", 0) < 10 or context.get_state("rows_b", 0) < 10:
        await asyncio.sleep(0.01)  # the request arrives while both batch jobs are busy
    return ["urgent_inference"]  # a fan-out of one: it starts now instead of joining later


async def urgent_inference(context: Context) -> StateResult:
    await asyncio.sleep(0.1)
    context.set_state("answer", 42)
    return None


batch = ResourceRequirements(cpu_units=1, memory_mb=256, priority=Priority.LOW)
urgent = ResourceRequirements(cpu_units=2, memory_mb=512, priority=Priority.HIGH)
agent.add_state("dispatch", dispatch)
agent.add_state("embed_shard_a", embed_shard("rows_a"), resources=batch)
agent.add_state("embed_shard_b", embed_shard("rows_b"), resources=batch)
# Inline: it watches the live context, which isolated children only write to.
agent.add_state("urgent_request", urgent_request, isolation="inline")
agent.add_state("urgent_inference", urgent_inference, resources=urgent)

if __name__ == "__main__":
    agent.run_sync(timeout=60)
    print("\n".join(timeline))
    ctx = agent.context
    for shard, key in (("embed_shard_a", "rows_a"), ("embed_shard_b", "rows_b")):
        meta = agent.state_metadata[shard]
        print(f"{shard}: {ctx.get_state(key)} rows, preempted {meta.preemptions}x, "
              f"resumed at row {ctx.get_state(key + '_resumed_at')}, attempts {meta.attempts}")
    print("urgent answer:", ctx.get_state("answer"))
