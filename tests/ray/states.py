"""State functions for the Ray tests, at module level so that Ray workers import them by name."""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import dataclass

from agent import Context, TypedContextData
from agent.ray import ray_options


@dataclass
class Progress(TypedContextData):
    step: int
    note: str


async def greet(context: Context) -> str:
    print("hello from a Ray worker", flush=True)
    print("a warning on stderr", file=sys.stderr, flush=True)
    os.write(1, b"written to fd 1 directly\n")
    context.set_state("greeting", f"hello from {os.getpid()}")
    return "shout"


async def times_out_inside(context: Context) -> None:
    task = asyncio.current_task()
    try:
        async with asyncio.timeout(0.05):  # cancels the task it was entered in
            await asyncio.Event().wait()
    except TimeoutError:
        context.set_state("timed_out", task is not None and asyncio.current_task() is task)


async def shout(context: Context) -> None:
    context.set_state("shouted", context.get_state("greeting").upper())
    context.set_state("seen_tuple", context.get_state("tuple"))
    context.remove_state("scratch")


async def fan_out(context: Context) -> list[str]:
    return [f"part_{i}" for i in range(4)] + ["on_gpu", "on_disk"]


async def measure(context: Context) -> str:
    import ray

    ctx = ray.get_runtime_context()
    context.set_state(f"assigned_{context.state_name}", ctx.get_assigned_resources())
    context.set_state(f"gpu_ids_{context.state_name}", [str(g) for g in ray.get_gpu_ids()])
    context.set_state(f"pid_{context.state_name}", os.getpid())
    return "merge"


@ray_options(resources={"disk": 1})
async def measure_on_disk(context: Context) -> str:
    return await measure(context)


async def merge(context: Context) -> None:
    parts = sorted(k for k in context.keys() if k.startswith("assigned_"))
    context.set_state("merged", parts)


async def crash_first(context: Context) -> None:
    print(f"attempt {context.attempt} starting", flush=True)
    context.set_state(f"before_crash_{context.attempt}", True)
    if context.attempt == 1:
        # Once the driver has the question, it has the write before it: crash after the answer.
        await context.human_in_the_loop("crash now?", timeout=60)
        os._exit(3)
    context.set_state("recovered_on", context.attempt)


async def always_crash(context: Context) -> None:
    os._exit(7)


async def raise_error(context: Context) -> None:
    raise ValueError("bad input 42")


async def sleep_forever(context: Context) -> None:
    context.set_state("sleeper_pid", os.getpid())
    await asyncio.Event().wait()


async def write_then_ask(context: Context) -> None:
    context.set_state("progress", "asked")
    answer = await context.human_in_the_loop(
        "Approve? (approve/reject)", timeout=60, validator=lambda a: a in ("approve", "reject"))
    context.set_state("decision", answer)


async def ask_nobody(context: Context) -> None:
    context.set_state("fallback", await context.human_in_the_loop("Anyone?", timeout=0.3, default="fallback"))


async def store_object(context: Context) -> None:
    context.set_state("handle", object())


async def typed_step(context: Context) -> None:
    progress = context.get_typed("progress", Progress)
    context.set_typed("progress", Progress(step=progress.step + 1, note=f"{progress.note}, ray"))


async def spoil_in_place(context: Context) -> str:
    context.get_state("items").append(object())  # not a write: changes a copy, not the stored value
    return "shout"


async def return_object(context: Context) -> object:
    return object()


async def return_unencodable_name(context: Context) -> str:
    return "\ud800"  # a lone surrogate: no state's name, and no value of the model


async def low_job(context: Context) -> None:
    """Counts to 10, keeping its place in the context; restarts where it was."""
    start = context.get_state("done", 0)
    context.set_state(f"started_at_{context.get_state('starts', 0)}", start)
    context.set_state("starts", context.get_state("starts", 0) + 1)
    for i in range(start, 10):
        context.set_state("done", i + 1)
        await asyncio.sleep(0.1)


async def high_job(context: Context) -> None:
    context.set_state("high_ran_after", context.get_state("done"))


MiB = 1024 * 1024


@ray_options(isolation="process")
async def confined_hog(context: Context) -> None:
    print(f"hog in {os.getpid()}", flush=True)
    block = b"\x01" * (200 * MiB)
    context.set_state("allocated", len(block))


@ray_options(isolation="process")
async def confined_worker(context: Context) -> None:
    import ray

    print(f"confined in {os.getpid()}", flush=True)
    context.set_state("confined_pid", os.getpid())
    context.set_state("in_ray_worker", ray.is_initialized())
    context.set_state("cgroup", open("/proc/self/cgroup").read())
    block = b"\x01" * (16 * MiB)
    context.set_state("allocated", len(block))
    answer = await context.human_in_the_loop("go on?", timeout=60)
    context.set_state("answer", answer)


async def two_writers(context: Context) -> list[str]:
    return ["writer_1", "writer_2"]


async def write_600kb(context: Context) -> None:
    context.set_state(f"part_{context.state_name}", b"x" * (600 * 1024))


async def blocks_after_writing(context: Context) -> None:
    import time

    context.set_state("before_blocking", 1)
    time.sleep(0.3)  # the event loop does not run: the write still reaches the driver
    context.set_state("while_blocking", 2)
    time.sleep(60)  # until its timeout stops it


async def rewrite_a_big_value(context: Context) -> None:
    """Overwrite one 10 MiB key a dozen times: more than one frame in all, one value in the end."""
    for i in range(12):
        context.set_state("big", bytes([i]) * (10 << 20))


async def lap(context: Context) -> str | None:
    """Runs three times in one run: laps 1 and 3 print, lap 2 prints nothing."""
    n = context.get_state("lap", 0) + 1
    context.set_state("lap", n)
    if n != 2:
        print(f"lap {n}")
    return "lap" if n < 3 else None


async def leave_a_child(context: Context) -> None:
    """Starts a subprocess (with a child of its own) and returns without waiting for it."""
    import subprocess

    proc = subprocess.Popen(["sh", "-c", "sleep 300 & wait"])
    context.set_state("child", proc.pid)
