"""Usage statistics: current, peak and time-weighted average allocation, and measured use."""

from __future__ import annotations

import dataclasses

import pytest

from agent.resources import PoolStatistics, Priority, ResourcePool, ResourceType

from .helpers import FakeClock, req

CPU, MEM = ResourceType.CPU, ResourceType.MEMORY


@pytest.fixture
def clocked() -> tuple[ResourcePool, FakeClock]:
    clock = FakeClock(100.0)
    pool = ResourcePool(total_cpu=4, total_memory=1000, total_io=10, total_network=10, total_gpu=0, clock=clock)
    return pool, clock


class TestUsageStats:
    """Allocation statistics per resource type, on an injected clock."""

    def test_current_peak_average(self, clocked: tuple[ResourcePool, FakeClock]) -> None:
        pool, clock = clocked
        pool.try_acquire("a", req(cpu=2))  # t=100..110: 2 cores
        clock.now = 110
        pool.try_acquire("b", req(cpu=2))  # t=110..120: 4 cores
        clock.now = 120
        pool.release("a")  # t=120..140: 2 cores
        pool.release("b")
        pool.try_acquire("c", req(cpu=2))
        clock.now = 140
        cpu = pool.get_usage_stats()[CPU]
        assert cpu.total == 4
        assert cpu.current_usage == 2
        assert cpu.peak_usage == 4
        assert cpu.average_usage == pytest.approx((2 * 10 + 4 * 10 + 2 * 20) / 40)
        assert cpu.available == 2

    def test_average_of_idle_pool(self, clocked: tuple[ResourcePool, FakeClock]) -> None:
        pool, clock = clocked
        clock.now = 150
        assert pool.get_usage_stats()[MEM].average_usage == 0

    def test_all_types_reported(self, clocked: tuple[ResourcePool, FakeClock]) -> None:
        pool, _ = clocked
        assert set(pool.get_usage_stats()) == {CPU, MEM, ResourceType.IO, ResourceType.NETWORK, ResourceType.GPU}


class TestMeasured:
    """Measured use reported by executors is kept per holder and summed."""

    def test_measured_cpu_and_memory(self, clocked: tuple[ResourcePool, FakeClock]) -> None:
        pool, _ = clocked
        pool.try_acquire("a", req(cpu=1, memory=500))
        pool.try_acquire("b", req(cpu=1, memory=500))
        pool.record_measured("a", {"cpu_seconds": 1.0, "peak_memory_bytes": 100 * 1024 * 1024})
        pool.record_measured("a", {"cpu_seconds": 2.5, "peak_memory_bytes": 120 * 1024 * 1024})  # replaces
        pool.record_measured("b", {"cpu_seconds": 1.0, "peak_memory_mb": 30})
        stats = pool.get_usage_stats()
        assert stats[CPU].measured_usage == pytest.approx(3.5)
        assert stats[MEM].measured_usage == pytest.approx(150)
        assert stats[ResourceType.IO].measured_usage is None
        assert pool.get_measured()["a"] == {"cpu_seconds": 2.5, "peak_memory_mb": 120.0}
        pool.release("a")
        pool.record_measured("b", {"cpu_seconds": 2.0})
        pool.release("b")
        pool.record_measured("late", {"cpu_seconds": 0.5})  # reported after its release
        stats = pool.get_usage_stats()
        assert stats[CPU].measured_usage == pytest.approx(5.0)
        assert stats[MEM].measured_usage == 0
        assert pool.get_measured() == {}


class TestStatistics:
    """statistics() is a frozen snapshot."""

    def test_snapshot(self, clocked: tuple[ResourcePool, FakeClock]) -> None:
        pool, _ = clocked
        pool.try_acquire("a", req(cpu=3))
        pool.enqueue("b", req(cpu=2, priority=Priority.HIGH))
        pool.enqueue("c", req(cpu=2, priority=Priority.LOW))
        snap = pool.statistics()
        assert isinstance(snap, PoolStatistics)
        assert snap.holders == 1
        assert snap.waiting == 2
        assert snap.waiting_by_priority[Priority.HIGH] == 1
        assert snap.waiting_by_priority[Priority.LOW] == 1
        assert snap.allocated[CPU] == 3
        assert snap.granted == 1
        with pytest.raises(dataclasses.FrozenInstanceError):
            snap.holders = 5  # type: ignore[misc]
        pool.release("a")
        assert snap.holders == 1  # a snapshot does not move
        assert pool.statistics().granted == 3

    def test_repr(self, clocked: tuple[ResourcePool, FakeClock]) -> None:
        pool, _ = clocked
        pool.try_acquire("a", req(cpu=3))
        assert "CPU=1/4" in repr(pool)
