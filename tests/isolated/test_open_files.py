"""A fan-out wider than the open-files limit allows waits for room instead of failing.

Each case runs in a process of its own, under the limit it sets (``ulimit -n``), so that
the supervisor it starts reads that limit.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil

from agent.supervisor.descriptors import HEADROOM, PER_CHILD, PER_WORKER, Budget
from agent.supervisor.service import get_supervisor

from .helpers import make_attempt, run

ROOT = str(Path(__file__).resolve().parents[2])

SCRIPT = textwrap.dedent(
    """
    import asyncio, json, os, resource, sys
    soft, hard, width, level, timeout = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    from agent import Agent
    from agent.errors import RunTimeoutError
    from agent.supervisor import current_supervisor

    async def nap(context):
        import asyncio, os, resource, time
        began = time.monotonic()
        await asyncio.sleep(float(os.environ["NAP"]))
        context.set_state("span:" + context.state_name,
                          [began, time.monotonic(), os.getpid(), resource.getrlimit(resource.RLIMIT_NOFILE)[0]])
        return None

    async def one(context):
        return None

    def fan_out(name, width):
        names = [f"s{i}" for i in range(width)]
        async def start(context):
            return names
        agent = Agent(name, isolation=level, max_steps=width + 10)
        agent.add_state("start", start, isolation="inline", next_states=names)
        for state in names:
            agent.add_state(state, nap, next_states=[])
        return agent

    async def main():
        out = {}
        agent = fan_out("wide", width)
        try:
            context = await agent.run(timeout=float(timeout) if timeout != "none" else None)
            spans = [v for k, v in context.to_dict().items() if k.startswith("span:")]
        except RunTimeoutError:
            spans = None
        out["spans"] = spans
        after = Agent("after", isolation=level)
        after.add_state("one", one)
        await after.run()
        out["after"] = after.status.value
        sup = current_supervisor()
        out["budget"] = [sup.budget.children, sup.budget.workers]
        out["soft_now"] = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        out["zygote"] = sup.zygote.pid
        print(json.dumps(out), flush=True)

    asyncio.run(main())
    """
)


def run_script(soft: int, hard: int, width: int, level: str, timeout: str = "none", nap: float = 0.3) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT, NAP=str(nap))
    done = subprocess.run([sys.executable, "-P", "-c", SCRIPT, str(soft), str(hard), str(width), level, timeout],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert not psutil.pid_exists(out["zygote"]) or psutil.Process(out["zygote"]).status() == psutil.STATUS_ZOMBIE
    return out


def most_at_once(spans: list[list[float]]) -> int:
    """The most states whose spans (start, end) overlapped at one moment."""
    edges = sorted([(s[0], 1) for s in spans] + [(s[1], -1) for s in spans])
    most = running = 0
    for _, step in edges:
        running += step
        most = max(most, running)
    return most


def test_budget_leaves_room_for_what_is_open_and_at_least_one_of_each():
    for soft, in_use in ((1024, 20), (20000, 300), (256, 200), (64, 100)):
        budget = Budget.of(soft, in_use)
        assert budget.children >= 1 and budget.workers >= 1
        if budget.children > 1 or budget.workers > 1:
            assert budget.children * PER_CHILD + budget.workers * PER_WORKER + in_use + HEADROOM <= soft
    assert Budget.of(20000, 300).children > Budget.of(1024, 20).children


def test_process_fan_out_wider_than_the_limit_runs_a_budget_at_a_time():
    out = run_script(256, 256, 100, "process")  # 100 at once would need more than 256 descriptors
    children, _ = out["budget"]
    assert 1 < children < 100  # the limit allows fewer than the fan-out: some had to wait
    assert len(out["spans"]) == 100  # every state ran
    assert most_at_once(out["spans"]) <= children
    assert out["after"] == "completed"


def test_worker_fan_out_wider_than_the_limit_uses_as_many_workers_as_fit():
    out = run_script(256, 256, 24, "worker")  # 24 workers at once would need more than 256
    _, workers = out["budget"]
    assert workers < 24
    assert len(out["spans"]) == 24
    assert most_at_once(out["spans"]) <= workers
    assert len({span[2] for span in out["spans"]}) <= workers  # the workers served every state
    assert out["after"] == "completed"


def test_supervisor_raises_its_soft_limit_and_states_keep_the_original():
    out = run_script(512, 4096, 3, "process")
    assert out["soft_now"] == 4096
    assert {span[3] for span in out["spans"]} == {512}
    assert out["budget"][0] > Budget.of(512, 0).children


def test_states_waiting_for_room_are_let_go_at_a_timeout_and_leave_room_behind():
    out = run_script(256, 256, 100, "process", timeout="1.5", nap=30)
    assert out["spans"] is None  # the run timed out with states waiting for room
    assert out["after"] == "completed"  # and the room they held or waited for is free again


async def test_waiting_state_processes_start_in_order_and_a_cancelled_one_passes_its_turn_on():
    async def report(context):
        import time
        context.set_state("began", time.monotonic())
        return None

    sup = get_supervisor()
    budget = sup.budget
    sup.budget = Budget(children=1, workers=budget.workers)  # one state process at a time
    try:
        attempts = [make_attempt(report, state=f"s{i}") for i in range(4)]
        tasks = [asyncio.ensure_future(run(a)) for a in attempts]
        await asyncio.sleep(0)  # one turn of the loop: each task asks for room
        assert len(sup._room_waiters) == 3  # the first runs; the other three wait, in order
        tasks[1].cancel()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(outcomes[1], asyncio.CancelledError)
        assert all(not isinstance(o, BaseException) for i, o in enumerate(outcomes) if i != 1)
        began = [attempts[i].context.get_state("began") for i in (0, 2, 3)]
        assert began == sorted(began)  # first come, first served
        assert not sup._room_waiters and sup._reserved == 0 and not sup._state_children
        assert (await run(make_attempt(report))).result is None  # no room was lost
    finally:
        sup.budget = budget


async def _nothing(context):
    return None


async def test_a_live_worker_costs_no_more_descriptors_than_its_budget_counts():
    # Its cgroup's files stay open for its life: a budget that counted fewer let idle
    # workers and a fan-out run a process out of descriptors (libzmq then aborts it).
    from agent import Agent, ResourceRequirements

    warm = Agent("warm", isolation="worker")
    warm.add_state("s", _nothing)
    await warm.run()
    before = psutil.Process().num_fds()
    shapes = 5
    for i in range(shapes):  # a worker of a shape of its own each, left idle
        agent = Agent(f"shape{i}", isolation="worker")
        agent.add_state("s", _nothing, resources=ResourceRequirements(memory_mb=200 + i))
        await agent.run()
    assert psutil.Process().num_fds() - before <= shapes * PER_WORKER
