"""Ray states that fail, crash, hang, ask too much or are preempted: our engine decides what next."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("ray")

from agent import (
    Agent,
    AgentStatus,
    Priority,
    ResourcePool,
    ResourceRequirements,
    RetryPolicy,
    StateFailedError,
    StateStatus,
    StateTimeoutError,
)
from agent.human import QueueInputProvider
from agent.ray import ray_options

from . import states
from .helpers import failure_of, worker_gone

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_cluster")]


@ray_options(resources={"tpu": 1})
async def wants_a_tpu(context):
    return None


class TestWorkerCrash:
    """A state that kills its Ray worker is a failed attempt with a clear reason, retried per policy."""

    async def test_crash_then_retry_succeeds(self):
        provider = QueueInputProvider()
        agent = Agent("crash_once", isolation="ray", human_input=provider,
                      retry_policy=RetryPolicy(max_retries=1, initial_delay=0))
        agent.add_state("crash_first", states.crash_first)
        run = asyncio.ensure_future(agent.run())
        question = await provider.wait_for_request()
        provider.answer(question.id, "yes")
        ctx = await run
        assert ctx.get_state("recovered_on") == 2
        assert ctx.get_state("before_crash_1") is True  # written before os._exit, kept
        meta = agent.state_metadata["crash_first"]
        first, second = list(meta.history)
        assert first.outcome == "failed"
        assert "the Ray worker running this state died" in first.reason
        assert second.outcome == "completed"
        # The output of the crashed attempt was collected from its node.
        assert "attempt 1 starting" in agent.logs("crash_first", 1)
        assert "attempt 2 starting" in agent.logs("crash_first", 2)

    async def test_a_state_that_always_crashes_fails_after_its_retries(self):
        agent = Agent("crash_always", isolation="ray", retry_policy=RetryPolicy(max_retries=1, initial_delay=0))
        agent.add_state("always_crash", states.always_crash)
        error = await failure_of(agent)
        assert error.attempts == 2
        assert error.reason.kind == "lost_connection"
        assert "os._exit" in error.reason.message
        assert agent.status is AgentStatus.FAILED

    async def test_an_exception_carries_the_worker_traceback(self):
        agent = Agent("raises", isolation="ray")
        agent.add_state("raise_error", states.raise_error)
        reason = (await failure_of(agent)).reason
        assert reason.kind == "exception"
        assert reason.message == "ValueError: bad input 42"
        assert reason.exception_type == "builtins.ValueError"
        assert 'raise ValueError("bad input 42")' in reason.traceback

    async def test_the_next_run_on_the_cluster_is_fine(self):
        agent = Agent("after_crashes", isolation="ray")
        agent.add_state("greet", states.greet)
        agent.add_state("shout", states.shout)
        ctx = await agent.run(initial_context={"tuple": 1, "scratch": 1})
        assert ctx.get_state("shouted").startswith("HELLO")


class TestCapacity:
    """A request no node can hold fails at once instead of waiting in Ray's queue for ever."""

    async def test_a_gpu_asked_of_a_cluster_pool_with_none_says_where_they_are_missing(self, monkeypatch):
        from agent.errors import GPUUnavailableError
        from agent.ray import cluster_pool
        from agent.ray.executor import get_executor

        capacity = get_executor().capacity
        monkeypatch.setattr(capacity, "totals", lambda: {"CPU": 2.0, "memory": 2.0 * 1024**3})  # no GPU node
        agent = Agent("no_gpu_node", isolation="ray", resource_pool=cluster_pool())
        with pytest.raises(GPUUnavailableError, match="no alive node of the Ray cluster has one") as info:
            agent.add_state("fit", states.measure, resources=ResourceRequirements(cpu_units=1, gpu_units=1))
        assert "this machine" not in str(info.value) and "add a node with GPUs" in str(info.value)

    async def test_more_gpus_than_any_node_has(self):
        agent = Agent("greedy", isolation="ray", resource_pool=ResourcePool(total_cpu=2, total_gpu=2))
        agent.add_state("measure", states.measure, resources=ResourceRequirements(cpu_units=1, gpu_units=2))
        reason = (await failure_of(agent)).reason
        assert reason.exception_type == "agent.errors.RayCapacityError"
        assert "asks Ray for 1 CPU, 2 GPU" in reason.message
        assert "the most any node has: 2 CPU, 1 GPU" in reason.message

    async def test_a_custom_resource_no_node_has(self):
        agent = Agent("tpu", isolation="ray")
        agent.add_state("wants_a_tpu", wants_a_tpu)
        with pytest.raises(StateFailedError, match="RayCapacityError: .* 1 tpu"):
            await agent.run()

    async def test_more_memory_than_any_node_has(self, ray_cluster):
        node_memory = max(n["Resources"]["memory"] for n in ray_cluster.nodes() if n["Alive"])
        too_much = node_memory / 2**20 + 1024
        agent = Agent("memory", isolation="ray",
                      resource_pool=ResourcePool(total_cpu=2, total_memory=too_much * 2))
        agent.add_state("measure", states.measure, resources=ResourceRequirements(cpu_units=1, memory_mb=too_much))
        with pytest.raises(StateFailedError, match="MiB of memory"):
            await agent.run()


class TestStopping:
    """Timeouts, cancellation and preemption stop the Ray task: its worker is killed."""

    async def test_timeout_kills_the_worker(self):
        agent = Agent("hangs", isolation="ray")
        agent.add_state("sleep_forever", states.sleep_forever, timeout=3)
        with pytest.raises(StateTimeoutError):
            await agent.run()
        assert worker_gone(agent.context.get_state("sleeper_pid")), "the timed-out state's worker still runs"

    async def test_cancel_all(self):
        agent = Agent("cancelled", isolation="ray")
        agent.add_state("sleep_forever", states.sleep_forever)
        run = asyncio.ensure_future(agent.run())
        while not agent.context.has_state("sleeper_pid"):
            await asyncio.sleep(0.02)  # the write arrives from the worker
        await agent.cancel_all()
        await run
        assert agent.state_metadata["sleep_forever"].status is StateStatus.CANCELLED
        assert worker_gone(agent.context.get_state("sleeper_pid"))

    async def test_preempted_state_is_requeued_and_resumes_from_its_writes(self):
        pool = ResourcePool(total_cpu=1, total_gpu=0, enable_preemption=True)
        agent = Agent("preempt", isolation="ray", resource_pool=pool)
        agent.add_state("low_job", states.low_job,
                        resources=ResourceRequirements(cpu_units=1, memory_mb=0, priority=Priority.LOW))
        agent.add_state("high_job", states.high_job,
                        resources=ResourceRequirements(cpu_units=1, memory_mb=0, priority=Priority.HIGH))

        async def start(context):
            return "low_job"

        async def watch(context):
            while (context.get_state("done") or 0) < 3:  # the low job's writes stream in
                await asyncio.sleep(0.02)
            return "high_job"

        agent.add_state("start", start, isolation="inline", next_states=["low_job"])
        agent.add_state("watch", watch, isolation="inline", next_states=["high_job"])
        ctx = await agent.run(start=["start", "watch"])
        meta = agent.state_metadata["low_job"]
        assert meta.preemptions == 1
        assert meta.attempts == 1  # a preemption is not a failed attempt
        assert ctx.get_state("high_ran_after") >= 3
        assert ctx.get_state("started_at_1") >= 3  # the second start resumed from its own writes
        assert ctx.get_state("done") == 10
