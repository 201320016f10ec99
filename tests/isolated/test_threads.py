"""Runs on several threads at once, each on an event loop of its own (``run_sync`` in a
thread pool, a threaded web server): they share the process's resource pool and
coordination primitives, and their isolated states are served at the same time."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import psutil

from agent import Agent, ResourcePool, ResourceRequirements
from agent.coordination import Coordinator, PrimitiveType, enhance_agent
from agent.executor import read_attempt_log
from agent.supervisor import service, shutdown_supervisor

from .helpers import describe, stray_processes

THREADS = 3


def on_threads(jobs: list[Callable[[], Any]]) -> list[Any]:
    """Each job on a thread of its own, all at once; their results (or what they raised)."""
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(job) for job in jobs]
        return [f.exception(timeout=120) or f.result() for f in futures]


class Turns:
    """Agents built by ``build(i, state)`` on a thread each, whose one state must take its
    turn (the whole pool, a mutex): how many ran it, and how many at once at most."""

    def __init__(self, build: Callable[[int, Any], Agent]) -> None:
        self._build = build
        self._lock = threading.Lock()
        self._now = self.most = self.entered = 0

    async def _state(self, context: Any) -> None:
        import asyncio

        with self._lock:
            self._now += 1
            self.entered += 1
            self.most = max(self.most, self._now)
        await asyncio.sleep(0.02)
        with self._lock:
            self._now -= 1
        context.set_state("ran", True)

    def run(self) -> list[Any]:
        def job(i: int) -> Callable[[], bool]:
            return lambda: self._build(i, self._state).run_sync(timeout=60).get_state("ran")
        return on_threads([job(i) for i in range(THREADS)])


class TestSharedPool:
    def test_agents_on_several_threads_take_turns_in_one_pool(self):
        # Each state needs the whole pool: one runs at a time, and every release wakes the
        # next waiter on its own thread's loop (a grant used to wake nobody there: 1 of 3
        # runs completed, the others hung).
        pool = ResourcePool(total_cpu=2, total_memory=1024)

        def build(i: int, state: Any) -> Agent:
            agent = Agent(f"thread{i}", isolation="inline", resource_pool=pool)
            agent.add_state("work", state, resources=ResourceRequirements(cpu_units=2, memory_mb=64))
            return agent

        turns = Turns(build)
        assert turns.run() == [True] * THREADS
        assert (turns.entered, turns.most) == (THREADS, 1)
        stats = pool.statistics()
        assert (stats.holders, stats.waiting) == (0, 0)


class TestSharedCoordination:
    def test_a_mutex_hands_over_to_a_waiter_on_another_thread(self):
        # The coordinator's own watch never runs in time (an hour): a waiter on another
        # thread's loop is woken by the release itself, or not at all.
        coordinator = Coordinator(detection_interval=3600)

        def build(i: int, state: Any) -> Agent:
            agent = enhance_agent(Agent(f"writer{i}", isolation="inline"), coordinator=coordinator)
            agent.add_state_coordination("database_write", PrimitiveType.MUTEX)
            agent.add_state("database_write", state)
            return agent

        turns = Turns(build)
        assert turns.run() == [True] * THREADS
        assert (turns.entered, turns.most) == (THREADS, 1)


class TestIsolatedOnSeveralLoops:
    def test_isolated_states_of_several_threads_run_at_once(self, level, tmp_path: Path):
        # Each state waits until the others run too: they can only complete together (the
        # second loop used to be refused with IsolationError while the first had a state out).
        async def meet(context):
            import os
            import time

            where = context.get_state("where")
            open(os.path.join(where, str(os.getpid())), "w").close()
            deadline = time.monotonic() + 60
            while len(os.listdir(where)) < context.get_state("threads"):
                if time.monotonic() > deadline:
                    raise TimeoutError("the other threads' states never ran alongside this one")
                time.sleep(0.005)
            print("met", flush=True)

        def job(i: int) -> Callable[[], str]:
            def run() -> str:
                agent = Agent(f"loop{i}", isolation=level)
                agent.add_state("meet", meet, resources=ResourceRequirements(cpu_units=0.1, memory_mb=64))
                agent.run_sync(timeout=90, initial_context={"where": str(tmp_path), "threads": THREADS})
                return read_attempt_log(agent.run_id, "meet", 1)
            return run

        try:
            logs = on_threads([job(i) for i in range(THREADS)])
            assert all(isinstance(log, str) and "met" in log for log in logs), logs
            pids = {int(name) for name in os.listdir(tmp_path)}
            assert len(pids) == THREADS and os.getpid() not in pids
            supervisors = [service.current_supervisor(), *service._others]
            assert len(supervisors) >= 2  # the loops that ran at once each had one
            owned = [(sup.ipc_dir, sup.zygote.pid) for sup in supervisors]
        finally:
            shutdown_supervisor()
        # Every supervisor went away with everything it started.
        assert not [d for d, _ in owned if os.path.exists(d)]
        assert not [pid for _, pid in owned if psutil.pid_exists(pid)]
        strays = stray_processes()
        assert not strays, describe(strays)

    def test_one_thread_after_another_shares_one_supervisor(self, level):
        # Loops that do not run at once keep using the process's one supervisor.
        async def noop(context):
            return None

        def run() -> None:
            agent = Agent("sequential", isolation=level)
            agent.add_state("noop", noop)
            agent.run_sync(timeout=60)

        first = threading.Thread(target=run)
        first.start()
        first.join()
        sup = service.current_supervisor()
        second = threading.Thread(target=run)
        second.start()
        second.join()
        assert service.current_supervisor() is sup and not service._others
