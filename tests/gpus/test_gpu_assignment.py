"""GPUs end to end: admission picks devices, the child is pinned to exactly those (AGENT_GPUS here)."""

from __future__ import annotations

import asyncio
import json

import pytest

from agent import Agent, Priority, ResourcePool, ResourceRequirements, ResourceType
from agent.devices import machine_inventory

from ..cgroups.helpers import BACKEND

GPUS = [
    {"index": i, "uuid": f"GPU-{i}0000000-aaaa-bbbb-cccc-dddddddddddd", "name": "Test GPU", "memory_mb": 81920,
     "minor": i}
    for i in range(2)
]


@pytest.fixture
def two_gpus(monkeypatch, tmp_path):
    """This process's inventory is two hand-configured GPUs (from a JSON file)."""
    path = tmp_path / "gpus.json"
    path.write_text(json.dumps(GPUS))
    monkeypatch.setenv("AGENT_GPUS", str(path))
    assert len(machine_inventory().devices()) == 2
    return GPUS


def gpu(units: float) -> ResourceRequirements:
    return ResourceRequirements(cpu_units=0.1, memory_mb=64, io_weight=0, network_weight=0, gpu_units=units)


async def what_i_see(context):
    """Record the GPUs this state's process sees: CUDA's variables and the devices cgroup."""
    import os

    seen = {"visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "order": os.environ.get("CUDA_DEVICE_ORDER")}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if "devices" in controllers.split(","):
                with open(f"/sys/fs/cgroup/devices{path}/devices.list") as listing:
                    seen["nvidia"] = sorted(r.strip() for r in listing if r.startswith("c 195:"))
    context.set_state(f"seen_{context.state_name}", seen)


class TestInventory:
    """AGENT_GPUS replaces NVML; the default pool counts its GPUs."""

    def test_json_text_and_file(self, monkeypatch, two_gpus) -> None:
        assert [d.uuid for d in machine_inventory().devices()] == [g["uuid"] for g in GPUS]
        monkeypatch.setenv("AGENT_GPUS", json.dumps(GPUS[:1]))
        assert [d.minor_number for d in machine_inventory().devices()] == [0]

    def test_default_pool_total_is_the_inventory(self, two_gpus) -> None:
        assert ResourcePool().totals[ResourceType.GPU] == 2
        assert Agent("any").resource_pool.totals[ResourceType.GPU] == 2

    @pytest.mark.parametrize("text, match", [
        ("[{\"uuid\": \"GPU-x\"}]", "lacks index"),
        ("{}", "JSON list"),
        ("/nonexistent/gpus.json", "neither a JSON list nor a readable file"),
        ("[{\"index\": 0, \"uuid\": \"a\"}, {\"index\": 0, \"uuid\": \"b\"}]", "share the same index"),
    ])
    def test_bad_values_are_refused_clearly(self, monkeypatch, text, match) -> None:
        from agent import InvalidConfigurationError

        monkeypatch.setenv("AGENT_GPUS", text)
        with pytest.raises(InvalidConfigurationError, match=match):
            machine_inventory()


@pytest.mark.cgroup
class TestPinnedChildren:
    """Each isolated state sees exactly the GPUs it was granted."""

    async def test_two_states_get_different_gpus(self, two_gpus) -> None:
        agent = Agent("two", isolation="process", resource_pool=ResourcePool(total_cpu=2, total_memory=1024))

        async def start(context):
            return ["a", "b"]

        agent.add_state("start", start)
        agent.add_state("a", what_i_see, resources=gpu(1))
        agent.add_state("b", what_i_see, resources=gpu(1))
        ctx = await agent.run(timeout=60)
        a, b = ctx.get_state("seen_a"), ctx.get_state("seen_b")
        uuids = {g["uuid"] for g in GPUS}
        assert {a["visible"], b["visible"]} == uuids  # one each, different
        assert a["order"] == b["order"] == "PCI_BUS_ID"
        if BACKEND == "v1":
            for seen in (a, b):
                minor = next(g["minor"] for g in GPUS if g["uuid"] == seen["visible"])
                gpus_allowed = [r for r in seen["nvidia"] if r not in ("c 195:254 rwm", "c 195:255 rwm")]
                assert gpus_allowed == [f"c 195:{minor} rwm"]

    async def test_two_halves_share_one_gpu(self, two_gpus) -> None:
        agent = Agent("halves", isolation="process", resource_pool=ResourcePool(total_cpu=2, total_memory=1024))

        async def start(context):
            return ["h1", "h2"]

        agent.add_state("start", start)
        agent.add_state("h1", what_i_see, resources=gpu(0.5))
        agent.add_state("h2", what_i_see, resources=gpu(0.5))
        ctx = await agent.run(timeout=60)
        h1, h2 = ctx.get_state("seen_h1"), ctx.get_state("seen_h2")
        assert h1["visible"] == h2["visible"] and h1["visible"] in {g["uuid"] for g in GPUS}

    async def test_a_worker_that_served_gpus_is_gone_before_they_go_to_another_state(self, two_gpus) -> None:
        # A process keeps the GPU memory it allocated (a CUDA context) until it exits: the
        # worker is not kept warm, and the next state gets the GPU once it is gone.
        agent = Agent("handover", resource_pool=ResourcePool(total_cpu=2, total_memory=1024))

        async def first(context):
            import os

            context.set_state("first", (os.getpid(), os.environ["CUDA_VISIBLE_DEVICES"]))
            return "second"

        async def second(context):
            import os

            pid, _ = context.get_state("first")
            context.set_state("second", (os.environ["CUDA_VISIBLE_DEVICES"], os.path.exists(f"/proc/{pid}")))

        agent.add_state("first", first, isolation="worker", resources=gpu(1))
        agent.add_state("second", second, isolation="process", resources=gpu(2))
        ctx = await agent.run(timeout=60)
        (_, had), (sees, worker_alive) = ctx.get_state("first"), ctx.get_state("second")
        assert had in sees.split(",") and not worker_alive

    async def test_a_state_without_gpus_sees_none(self, two_gpus) -> None:
        agent = Agent("none", isolation="process", resource_pool=ResourcePool(total_cpu=2, total_memory=1024))
        agent.add_state("plain", what_i_see, resources=gpu(0))
        ctx = await agent.run(timeout=60)
        seen = ctx.get_state("seen_plain")
        assert seen["visible"] == ""
        if BACKEND == "v1":
            assert seen["nvidia"] == []  # every GPU device node is denied


    async def test_gpus_of_a_pool_larger_than_the_inventory_are_not_pinned_nor_hidden(self, monkeypatch) -> None:
        # Counted for planning, as the pool says; the state sees what the program sees.
        monkeypatch.setenv("AGENT_GPUS", "[]")
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
        pool = ResourcePool(total_cpu=2, total_memory=1024, total_gpu=2)
        agent = Agent("counted", isolation="process", resource_pool=pool)

        async def start(context):
            return ["on_gpu", "plain"]

        agent.add_state("start", start)
        agent.add_state("on_gpu", what_i_see, resources=gpu(1))
        agent.add_state("plain", what_i_see, resources=gpu(0))
        ctx = await agent.run(timeout=60)
        assert ctx.get_state("seen_on_gpu")["visible"] == "3"
        assert ctx.get_state("seen_plain")["visible"] == ""


    @pytest.mark.parametrize("level", ["process", "worker"])
    async def test_a_state_that_leaves_gpu_out_of_its_resource_types_sees_none(self, two_gpus, level) -> None:
        # Not counted in the pool, so not given any: as a state that asked for 0 (it saw every GPU).
        untyped = ResourceRequirements(cpu_units=0.1, memory_mb=64, io_weight=0, network_weight=0, gpu_units=1,
                                       resource_types=ResourceType.CPU | ResourceType.MEMORY)
        agent = Agent("untyped", isolation=level, resource_pool=ResourcePool(total_cpu=2, total_memory=1024))
        agent.add_state("untyped", what_i_see, resources=untyped)
        seen = (await agent.run(timeout=60)).get_state("seen_untyped")
        assert seen["visible"] == ""
        if BACKEND == "v1":
            assert seen["nvidia"] == []

    @pytest.mark.parametrize("first", ["on_gpu", "plain"])
    async def test_a_worker_keeps_no_unpinned_gpus_for_a_state_without_them_nor_the_reverse(
        self, monkeypatch, first,
    ) -> None:
        # One state after the other on one pool: a worker made for the one is no worker for the other.
        monkeypatch.setenv("AGENT_GPUS", "[]")
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
        pool = ResourcePool(total_cpu=2, total_memory=1024, total_gpu=2)
        agent = Agent("counted_worker", isolation="worker", resource_pool=pool)
        second = "plain" if first == "on_gpu" else "on_gpu"

        async def then(context):
            await what_i_see(context)
            return second if context.state_name == first else None

        agent.add_state(first, then, resources=gpu(1 if first == "on_gpu" else 0))
        agent.add_state(second, then, resources=gpu(1 if second == "on_gpu" else 0))
        ctx = await agent.run(timeout=60)
        assert ctx.get_state("seen_on_gpu")["visible"] == "3"
        assert ctx.get_state("seen_plain")["visible"] == ""


class TestWaitingForAGPU:
    """A third whole-GPU request waits until one of the two GPUs is given back."""

    async def test_third_whole_gpu_waits(self, two_gpus) -> None:
        pool = ResourcePool(total_cpu=4, total_memory=1024)
        gates = {n: asyncio.Event() for n in ("g1", "g2")}
        inside: list[str] = []

        def hold(name: str):
            async def run_on_gpu(context):
                inside.append(name)
                if name in gates:
                    await gates[name].wait()
                inside.remove(name)

            return run_on_gpu

        agent = Agent("three", isolation="inline", resource_pool=pool)

        async def start(context):
            return ["g1", "g2", "g3"]

        agent.add_state("start", start)
        for name in ("g1", "g2", "g3"):
            agent.add_state(name, hold(name), resources=gpu(1), priority=Priority.NORMAL)
        runner = asyncio.create_task(agent.run())
        while sorted(inside) != ["g1", "g2"] or not pool.get_waiting_states():
            await asyncio.sleep(0)
        assert set(pool.get_waiting_states()) == {"g3"}
        assert {d.uuid for o in ("g1", "g2") for d in pool.devices(o)} == {g["uuid"] for g in GPUS}
        gates["g1"].set()
        gates["g2"].set()
        await asyncio.wait_for(runner, 10)
        assert pool.statistics().holders == 0 and pool.devices("g3") == []


def share(units: float, priority: Priority = Priority.LOW) -> ResourceRequirements:
    return ResourceRequirements(cpu_units=0.1, memory_mb=0, io_weight=0, network_weight=0, gpu_units=units,
                                priority=priority)


class TestBackfillAroundAWholeGPU:
    """A request waiting for a whole GPU is not delayed by a lower share placed meanwhile."""

    def test_no_lower_share_is_placed_while_it_waits(self, two_gpus) -> None:
        pool = ResourcePool(total_cpu=4, total_memory=1024)
        # A quarter of each GPU in use: 1.5 GPUs free by count, but no whole device.
        assert pool.try_acquire("x", share(1.0))
        assert pool.try_acquire("a", share(0.25)) and pool.try_acquire("b", share(0.75))
        pool.release("x")
        assert pool.try_acquire("c", share(0.25))
        pool.release("b")
        pool.enqueue("high", share(1.0, Priority.HIGH))
        assert pool.grant_next() == []
        # A share now could sit on the device that frees first: the one "high" needs.
        assert not pool.try_acquire("low", share(0.5))
        assert pool.try_acquire("cpu_only", share(0.0))  # asking for no GPU, it delays nobody
        pool.release("c")
        assert pool.grant_next() == ["high"]
        assert len(pool.devices("high")) == 1
