"""Coordination overhead: primitive and rate-limiter operations, and admission per state.

Run: python bench/coordination.py [--quick]. Prints one JSON object:
- ``mutex_uncontended_ops_s``: acquire + release pairs per second, nobody waiting;
- ``mutex_handoff_ops_s``: hand-overs per second between 100 tasks queued on one mutex;
- ``token_bucket_try_acquire_ops_s``: try_acquire calls per second (always admitted);
- ``chain_states_s`` plain vs coordinated: inline 3-state chain runs, states per second,
  with a MUTEX on every state of the coordinated agent (the admission-hook cost).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

from inline import add_chain

from agent import Agent
from agent.coordination import Coordinator, Mutex, PrimitiveType, TokenBucket, create_coordinated_agent


async def mutex_uncontended(n: int) -> float:
    m = Mutex("bench")
    t0 = time.perf_counter()
    for _ in range(n):
        await m.acquire("a")
        m.release("a")
    return n / (time.perf_counter() - t0)


async def mutex_handoff(n: int, tasks: int = 100) -> float:
    m = Mutex("bench")
    per = n // tasks

    async def worker(i: int) -> None:
        for _ in range(per):
            await m.acquire(f"w{i}")
            await asyncio.sleep(0)
            m.release(f"w{i}")

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(tasks)))
    return per * tasks / (time.perf_counter() - t0)


def token_bucket(n: int) -> float:
    bucket = TokenBucket("bench", 1e12, burst_size=1e12)
    t0 = time.perf_counter()
    for _ in range(n):
        bucket.try_acquire()
    return n / (time.perf_counter() - t0)


async def chain(agent: Agent, runs: int) -> float:
    await agent.run()  # warm-up
    t0 = time.perf_counter()
    for _ in range(runs):
        await agent.run()
    return 3 * runs / (time.perf_counter() - t0)


async def main(quick: bool) -> dict[str, float]:
    n = 20_000 if quick else 200_000
    runs = 300 if quick else 3000
    plain = add_chain(Agent("plain", isolation="inline"))
    coordinated = add_chain(create_coordinated_agent("coordinated", isolation="inline", coordinator=Coordinator()))
    for name in ("s1", "s2", "s3"):
        coordinated.add_state_coordination(name, PrimitiveType.MUTEX)
    return {
        "mutex_uncontended_ops_s": round(await mutex_uncontended(n)),
        "mutex_handoff_ops_s": round(await mutex_handoff(n // 4)),
        "token_bucket_try_acquire_ops_s": round(token_bucket(n)),
        "chain_states_s_plain": round(await chain(plain, runs)),
        "chain_states_s_coordinated": round(await chain(coordinated, runs)),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main(args.quick))))
