"""What agent doctor says about Ray states, and the capacity check, without a cluster."""

from __future__ import annotations

import pytest

from agent.errors import RayCapacityError
from agent.ray import limits
from agent.ray.cluster import REFRESH_SECONDS, Capacity
from agent.supervisor.doctor import diagnose, render


class TestDoctor:
    """agent doctor lists what holds for a Ray state, and says so when Ray is missing."""

    def test_ray_installed(self, monkeypatch):
        monkeypatch.setattr(limits, "installed_version", lambda: "2.60.0")
        report = diagnose(mountinfo="", sandbox=False)
        rows = {row.name: row for row in report.ray}
        assert not rows["cpu"].enforceable and not rows["memory"].enforceable
        assert rows["placement"].enforceable
        assert not rows["confined state"].enforceable  # no cgroups in this (empty) mount table
        assert "needs cgroup v2 (this machine: none)" in rows["ray system reserve"].detail
        text = render(report)
        assert "ray: a state with isolation='ray' runs as a Ray task" in text
        assert "RAY_memory_usage_threshold" in text

    def test_ray_missing(self, monkeypatch):
        monkeypatch.setattr(limits, "installed_version", lambda: None)
        report = diagnose(mountinfo="", sandbox=False)
        assert report.ray == []
        assert "ray: not installed (pip install 'agent-isolation[ray]'" in render(report)

    @pytest.mark.parametrize("backend, holds", [("v1", True), ("v2", True), ("none", False)])
    def test_confined_states_follow_the_cgroup_backend(self, backend, holds):
        rows = {row.name: row for row in limits.findings(backend)}
        assert rows["confined state"].holds is holds
        assert rows["ray system reserve"].holds is (backend == "v2")


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def node(alive: bool = True, **resources: float) -> dict:
    return {"Alive": alive, "Resources": resources}


class TestCapacity:
    """A request is checked against each alive node, never the sum of them."""

    def test_fits_one_node_not_the_sum(self):
        capacity = Capacity(lambda: [node(CPU=4, GPU=2), node(CPU=4, GPU=2)])
        capacity.check("train", {"CPU": 4, "GPU": 2})
        with pytest.raises(RayCapacityError) as caught:
            capacity.check("train", {"CPU": 1, "GPU": 4})
        assert "asks Ray for 1 CPU, 4 GPU" in str(caught.value)
        assert "2 node(s); the most any node has: 4 CPU, 2 GPU" in str(caught.value)

    def test_dead_nodes_do_not_count(self):
        capacity = Capacity(lambda: [node(alive=False, CPU=64), node(CPU=2)])
        with pytest.raises(RayCapacityError):
            capacity.check("big", {"CPU": 8})

    def test_no_alive_node(self):
        capacity = Capacity(lambda: [])
        with pytest.raises(RayCapacityError, match="has no alive node"):
            capacity.check("any", {"CPU": 1})

    def test_memory_in_mib_and_custom_resources(self):
        capacity = Capacity(lambda: [node(CPU=2, memory=2**30)])
        with pytest.raises(RayCapacityError, match=r"2048 MiB of memory, 1 ssd.*1024 MiB of memory, 0 ssd"):
            capacity.check("load", {"memory": 2**31, "ssd": 1})

    def test_a_node_that_joins_is_seen_before_refusing(self):
        nodes = [node(CPU=2)]
        reads = []
        clock = FakeClock()

        def read():
            reads.append(clock.now)
            return list(nodes)

        capacity = Capacity(read, clock)
        capacity.check("small", {"CPU": 1})
        capacity.check("small", {"CPU": 1})
        assert len(reads) == 1  # a fitting request trusts a fresh reading
        nodes.append(node(CPU=16))
        capacity.check("large", {"CPU": 16})  # re-read before refusing
        assert len(reads) == 2
        clock.now += REFRESH_SECONDS + 1
        capacity.check("small", {"CPU": 1})
        assert len(reads) == 3  # stale: read again


class TestAClusterThatStopsAnswering:
    """Asking the cluster which nodes are alive blocks while it is gone: the driver's loop
    goes on turning, and the wait is bounded (a run's timeout must still fire)."""

    @pytest.fixture
    async def hung(self, monkeypatch):  # async: the thread is let go before the test's loop closes
        import threading

        import ray

        from agent.ray import executor

        released = threading.Event()
        monkeypatch.setattr(ray, "nodes", lambda: released.wait(60) and [])
        monkeypatch.setattr(executor, "LOG_SECONDS", 0.2)
        monkeypatch.setattr(executor, "NODES_SECONDS", 0.2)
        yield executor.RayExecutor()
        released.set()  # the thread left asking ends

    @staticmethod
    async def while_counting(coro):
        import asyncio

        ticks = 0

        async def tick():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.ensure_future(tick())
        try:
            return await coro, ticks
        finally:
            ticker.cancel()

    async def test_the_output_of_a_dead_worker_is_given_up_on(self, hung):
        log, ticks = await self.while_counting(hung._collect_log("token"))
        assert log == b"[the output of this attempt could not be collected from its node]\n"
        assert ticks > 0  # the loop kept turning meanwhile

    async def test_a_launch_fails_clearly_instead_of_freezing_the_loop(self, hung):
        from agent.errors import IsolationUnavailableError

        with pytest.raises(IsolationUnavailableError, match="did not say within 0.2 s which of its nodes are alive"):
            await self.while_counting(hung._check_capacity("s", {"CPU": 1}))
