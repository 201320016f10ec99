"""Data analysis: split a large dataset into chunks processed in parallel, then merge."""

import statistics
from dataclasses import dataclass
from typing import List

from agent import Agent, Context, StateResult, TypedContextData

CHUNKS = 5


@dataclass
class Dataset(TypedContextData):
    name: str
    data: List[float]


def split_data(data: list, parts: int) -> list:
    size = -(-len(data) // parts)
    return [data[i:i + size] for i in range(0, len(data), size)]


def analyze_data(data: list) -> dict:
    return {"count": len(data), "sum": sum(data), "max": max(data)}


agent = Agent("data_analysis")


async def load_dataset(context: Context) -> StateResult:
    if not context.has_state("dataset"):
        context.set_typed("dataset", Dataset(name="sensor", data=[float(i % 97) for i in range(20_000)]))
    return "analyze_dataset"


async def analyze_dataset(context: Context) -> StateResult:
    dataset = context.get_typed("dataset", Dataset)
    if len(dataset.data) > 10000:
        chunks = split_data(dataset.data, CHUNKS)
        for i, chunk in enumerate(chunks):
            context.set_state(f"chunk_{i}", chunk)
        context.set_state("chunk_count", len(chunks))
        return [f"process_chunk_{i}" for i in range(len(chunks))]
    else:
        return "simple_process"


def make_chunk_state(chunk_id: int):
    async def process_chunk(context: Context) -> StateResult:
        data = context.get_state(f"chunk_{chunk_id}")
        context.set_state(f"results_{chunk_id}", analyze_data(data))
        return "merge_results"

    return process_chunk


async def simple_process(context: Context) -> StateResult:
    dataset = context.get_typed("dataset", Dataset)
    context.set_state("summary", {**analyze_data(dataset.data), "mean": statistics.fmean(dataset.data),
                                  "parallel": False})
    return None


async def merge_results(context: Context) -> StateResult:
    parts = [context.get_state(f"results_{i}") for i in range(context.get_state("chunk_count"))]
    count = sum(p["count"] for p in parts)
    total = sum(p["sum"] for p in parts)
    summary = {"count": count, "sum": total, "max": max(p["max"] for p in parts),
               "mean": total / count, "parallel": True}
    context.set_state("summary", summary)
    print(f"merged {len(parts)} chunks: {summary['count']:,} values, mean {summary['mean']:.2f}")
    return None


agent.add_state("load_dataset", load_dataset)
agent.add_state("analyze_dataset", analyze_dataset)
for i in range(CHUNKS):
    agent.add_state(f"process_chunk_{i}", make_chunk_state(i))
agent.add_state("simple_process", simple_process)
agent.add_state("merge_results", merge_results)

if __name__ == "__main__":
    agent.run_sync()
    summary = agent.context.get_state("summary")
    print(f"values: {summary['count']:,}  sum: {summary['sum']:,.1f}  max: {summary['max']:.1f}  "
          f"mean: {summary['mean']:.2f}  (in parallel: {'yes' if summary['parallel'] else 'no'})")
