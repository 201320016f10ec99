"""Bad workflow definitions are rejected before anything runs, with typed errors."""

from __future__ import annotations

import pytest

from agent import (
    Agent,
    DependencyConfig,
    DependencyCycleError,
    DependencyType,
    DuplicateStateError,
    GPUUnavailableError,
    InvalidConfigurationError,
    InvalidStateFunctionError,
    ResourcePool,
    ResourceRequestError,
    ResourceRequirements,
    RetryPolicy,
    UnknownStateError,
    WorkflowDefinitionError,
)


async def noop(context):
    return None


class TestAddState:
    """add_state validates names, functions and settings."""

    def test_duplicate(self):
        agent = Agent("a", isolation="inline")
        agent.add_state("s", noop)
        with pytest.raises(DuplicateStateError, match="'s' is already added"):
            agent.add_state("s", noop)

    def test_not_async(self):
        def sync_state(context):
            return None

        with pytest.raises(InvalidStateFunctionError, match="not a coroutine function"):
            Agent("a").add_state("s", sync_state)

    def test_wrong_signature(self):
        async def two_args(context, other):
            return None

        async def no_args():
            return None

        agent = Agent("a")
        with pytest.raises(InvalidStateFunctionError, match="exactly one positional"):
            agent.add_state("s", two_args)
        with pytest.raises(InvalidStateFunctionError, match="exactly one positional"):
            agent.add_state("t", no_args)

    def test_extra_parameters_with_defaults_are_fine(self):
        async def chunk(context, chunk_id=3):
            return None

        Agent("a").add_state("s", chunk)

    def test_not_callable(self):
        with pytest.raises(InvalidStateFunctionError):
            Agent("a").add_state("s", 42)  # type: ignore[arg-type]

    @pytest.mark.parametrize("kwargs", [{"timeout": -1}, {"timeout": 0}, {"max_retries": -1}, {"max_retries": 1.5}])
    def test_negative_settings(self, kwargs):
        with pytest.raises(InvalidConfigurationError):
            Agent("a").add_state("s", noop, **kwargs)

    def test_negative_retry_policy(self):
        with pytest.raises(InvalidConfigurationError, match="max_retries"):
            RetryPolicy(max_retries=-1)
        with pytest.raises(InvalidConfigurationError, match="initial_delay"):
            RetryPolicy(initial_delay=-1)

    def test_bad_agent_settings(self):
        with pytest.raises(InvalidConfigurationError):
            Agent("a", max_concurrent=0)
        with pytest.raises(InvalidConfigurationError):
            Agent("a", max_steps=-3)
        with pytest.raises(InvalidConfigurationError):
            Agent("")

    def test_request_larger_than_pool(self):
        agent = Agent("a", resource_pool=ResourcePool(total_cpu=2, total_memory=1024, total_gpu=0))
        with pytest.raises(ResourceRequestError, match="asks for 4 CPU"):
            agent.add_state("s", noop, resources=ResourceRequirements(cpu_units=4))
        assert "s" not in agent.states

    def test_gpu_request_without_gpus(self):
        agent = Agent("a", resource_pool=ResourcePool(total_gpu=0))
        with pytest.raises(GPUUnavailableError, match="no NVIDIA driver"):
            agent.add_state("s", noop, resources=ResourceRequirements(gpu_units=1))

    def test_bad_resource_values(self):
        with pytest.raises(ResourceRequestError):
            ResourceRequirements(cpu_units=-1)
        with pytest.raises(ResourceRequestError):
            ResourceRequirements(gpu_units=1.5)


class TestGraphChecks:
    """Unknown dependencies and cycles fail run() before any state runs."""

    async def test_dependency_on_missing_state(self):
        ran = []

        async def first(context):
            ran.append("first")

        agent = Agent("a", isolation="inline")
        agent.add_state("first", first, dependencies={"ghost": DependencyType.REQUIRED})
        with pytest.raises(UnknownStateError, match="'first' depends on 'ghost'"):
            await agent.run()
        assert ran == []

    async def test_cycle(self):
        agent = Agent("a", isolation="inline")
        agent.add_state("x", noop, dependencies={"z": DependencyType.REQUIRED})
        agent.add_state("y", noop, dependencies={"x": DependencyType.REQUIRED})
        agent.add_state("z", noop, dependencies={"y": DependencyConfig(type=DependencyType.SEQUENTIAL)})
        with pytest.raises(DependencyCycleError, match="x -> z -> y -> x|y -> x -> z -> y|z -> y -> x -> z"):
            await agent.run()

    def test_self_dependency(self):
        with pytest.raises(DependencyCycleError, match="depends on itself"):
            Agent("a").add_state("x", noop, dependencies={"x": DependencyType.REQUIRED})

    async def test_no_states(self):
        with pytest.raises(WorkflowDefinitionError, match="no states"):
            await Agent("a").run()

    async def test_unknown_start(self):
        agent = Agent("a", isolation="inline")
        agent.add_state("x", noop)
        with pytest.raises(UnknownStateError, match="'nope'"):
            await agent.run(start="nope")

    async def test_negative_run_timeout(self):
        agent = Agent("a", isolation="inline")
        agent.add_state("x", noop)
        with pytest.raises(InvalidConfigurationError):
            await agent.run(timeout=-1)
