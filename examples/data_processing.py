"""Example 3: data processing pipeline (load -> validate + transform -> join)."""

import time
from dataclasses import dataclass
from typing import List

from agent import Agent, Context, ResourceRequirements, StateResult, TypedContextData


@dataclass
class DataBatch(TypedContextData):
    data: List[dict]
    batch_id: str
    timestamp: float


agent = Agent("data_processor")


async def load_data(context: Context) -> StateResult:
    records = context.get_state("records", [{"id": 1, "value": "test"}, {"id": 2, "value": "more"}])
    batch = DataBatch(data=records, batch_id="batch_001", timestamp=time.time())
    context.set_typed("batch", batch)
    return ["validate_data", "transform_data"]


async def validate_data(context: Context) -> StateResult:
    batch = context.get_typed("batch", DataBatch)
    valid = all(isinstance(record.get("id"), int) for record in batch.data)
    if not valid:
        return "handle_error"
    context.set_state("validation_passed", True)
    return "await_processing"


async def transform_data(context: Context) -> StateResult:
    batch = context.get_typed("batch", DataBatch)
    context.set_state("transformed", [{**r, "value": str(r.get("value", "")).upper()} for r in batch.data])
    return "await_processing"


async def handle_error(context: Context) -> StateResult:
    context.set_state("validation_passed", False)
    context.set_state("error", "records without an integer id")
    return None


async def await_processing(context: Context) -> StateResult:
    if context.get_state("validation_passed"):
        context.set_state("output", context.get_state("transformed"))
    return None


agent.add_state("load_data", load_data, resources=ResourceRequirements(cpu_units=1.0, memory_mb=512))
agent.add_state("validate_data", validate_data)
agent.add_state("transform_data", transform_data)
agent.add_state("handle_error", handle_error)
agent.add_state("await_processing", await_processing)

if __name__ == "__main__":
    agent.run_sync()
    output = agent.context.get_state("output") or []
    print(f"validation passed: {'yes' if agent.context.get_state('validation_passed') else 'no'}")
    print(f"output: {len(output)} record(s): {', '.join(str(r['value']) for r in output)}")
