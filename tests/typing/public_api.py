"""A user's program, as the API guide writes it: `mypy --strict` must accept it (scripts/test.sh).

Not a test module (pytest does not collect it): it proves the public API is typed the
way users call it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from agent import (
    Agent,
    AgentStatus,
    Context,
    DependencyConfig,
    DependencyLifecycle,
    DependencyType,
    Priority,
    ResourcePool,
    ResourceRequirements,
    ResourceType,
    RetryPolicy,
    StateResult,
    StateStatus,
    TypedContextData,
)


@dataclass
class UserProfile(TypedContextData):
    name: str
    age: int
    scores: list[float]


async def process_data(context: Context) -> StateResult:
    context.set_state("greeting", "Hello, World!")
    context.set_typed("user", UserProfile(name="Alice", age=28, scores=[95.0, 87.5]))
    context.update_typed("user", age=29)
    user = context.get_typed("user", UserProfile)
    assert user.age == 29
    return ["left", "right"]


async def branch(context: Context) -> StateResult:
    answer = await context.human_in_the_loop(prompt="ok?", timeout=1.0, validator=lambda x: bool(x), default="y")
    context.set_state(f"answer_{context.state_name}", answer)
    return "merge"


async def merge(context: Context) -> StateResult:
    failed: dict[str, str] = context.failed_states()
    print(context.get_state("greeting", default=""), sorted(failed))
    return None


async def main() -> None:
    pool = ResourcePool(total_cpu=8.0, total_memory=16384, total_io=100.0, total_network=100.0, total_gpu=2.0,
                        enable_preemption=True, enable_quotas=True)
    agent = Agent("typed", resource_pool=pool, max_concurrent=5, retry_policy=RetryPolicy(max_retries=3),
                  isolation="inline", on_failure="continue")
    agent.add_state("process_data", process_data, resources=ResourceRequirements(
        cpu_units=2.0, memory_mb=1024, gpu_units=1.0, priority=Priority.HIGH, timeout=300,
        resource_types=ResourceType.ALL))
    agent.add_state("left", branch, next_states=["merge"], max_retries=1)
    agent.add_state("right", branch, next_states=["merge"], timeout=30.0)
    agent.add_state("merge", merge, dependencies={
        "left": DependencyType.REQUIRED,
        "right": DependencyConfig(type=DependencyType.SEQUENTIAL, lifecycle=DependencyLifecycle.ONCE, timeout=60),
    })
    context: Context = await agent.run(timeout=3600, cleanup_timeout=60)
    status: AgentStatus = agent.status
    state_status: StateStatus = agent.state_metadata["merge"].status
    checkpoint = agent.create_checkpoint()
    print(json.dumps(checkpoint.to_dict()), status, state_status, context.keys())
    stats = agent.resource_pool.get_usage_stats()
    print(stats[ResourceType.CPU].current_usage, agent.resource_pool.get_waiting_states())
    await agent.restore_from_checkpoint(checkpoint)
    agent.cancel_state("merge")
    await agent.cancel_all()
