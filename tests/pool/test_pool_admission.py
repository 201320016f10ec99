"""The pool's admission rules: all-or-nothing, never over-commit, reject what can never fit."""

from __future__ import annotations

import pytest

from agent.errors import GPUUnavailableError, ResourceRequestError
from agent.resources import Priority, ResourcePool, ResourceRequirements, ResourceType

from .helpers import req


def small_pool(**kw) -> ResourcePool:  # type: ignore[no-untyped-def]
    return ResourcePool(total_cpu=4, total_memory=1000, total_io=10, total_network=10, total_gpu=0, **kw)


class TestDefaults:
    """Totals default to this machine's."""

    def test_machine_totals(self) -> None:
        import psutil

        pool = ResourcePool()
        assert pool.totals[ResourceType.CPU] == psutil.cpu_count()
        assert pool.totals[ResourceType.MEMORY] == psutil.virtual_memory().total // (1024 * 1024)
        from agent.devices import machine_inventory

        assert pool.totals[ResourceType.GPU] == len(machine_inventory().devices())

    def test_negative_total_is_rejected(self) -> None:
        with pytest.raises(ResourceRequestError, match=r"total_cpu=...\) must be a number >= 0, got -1"):
            ResourcePool(total_cpu=-1)


class TestTryAcquire:
    """try_acquire takes everything or nothing and release gives it back."""

    def test_all_or_nothing_across_types(self) -> None:
        pool = small_pool()
        assert pool.try_acquire("a", req(cpu=3, memory=100))
        # CPU would fit (1 left) but memory would not: nothing is taken.
        assert not pool.try_acquire("b", req(cpu=1, memory=950))
        assert pool.available(ResourceType.CPU) == 1
        assert pool.available(ResourceType.MEMORY) == 900
        assert pool.get_state_allocations() == {"a": {ResourceType.CPU: 3.0, ResourceType.MEMORY: 100.0}}

    def test_release_gives_back(self) -> None:
        pool = small_pool()
        assert pool.try_acquire("a", req(cpu=4))
        assert not pool.try_acquire("b", req(cpu=1))
        pool.release("a")
        assert pool.try_acquire("b", req(cpu=1))
        pool.release("b")
        assert pool.statistics().allocated[ResourceType.CPU] == 0

    def test_double_acquire_is_an_error(self) -> None:
        pool = small_pool()
        pool.try_acquire("a", req())
        with pytest.raises(ResourceRequestError, match="already holds"):
            pool.try_acquire("a", req())

    def test_release_of_nothing_is_a_no_op(self) -> None:
        pool = small_pool()
        pool.release("nobody")
        assert pool.statistics().holders == 0

    def test_resource_types_limit_accounting(self) -> None:
        pool = small_pool()
        only_cpu = ResourceRequirements(cpu_units=4, memory_mb=5000, resource_types=ResourceType.CPU)
        assert pool.try_acquire("a", only_cpu)
        assert pool.available(ResourceType.MEMORY) == 1000


class TestCheckRequest:
    """A request larger than the pool is rejected when it is added, not left waiting."""

    def test_too_much_cpu(self) -> None:
        with pytest.raises(ResourceRequestError, match=r"asks for 8 CPU core\(s\) but the pool has 4"):
            small_pool().check_request(req(cpu=8), "train")

    def test_gpu_on_a_machine_without_gpus(self) -> None:
        with pytest.raises(GPUUnavailableError, match="machine has none"):
            small_pool().check_request(req(gpu=1), "train")

    def test_more_gpus_than_the_pool_has(self) -> None:
        pool = ResourcePool(total_cpu=4, total_memory=1024, total_gpu=2)
        with pytest.raises(GPUUnavailableError, match=r"asks for 3 GPU\(s\) but the pool has 2 in total"):
            pool.check_request(req(gpu=3), "train")

    def test_gpu_error_is_a_request_error(self) -> None:
        assert issubclass(GPUUnavailableError, ResourceRequestError)

    def test_enqueue_rejects_and_counts(self) -> None:
        pool = small_pool()
        with pytest.raises(ResourceRequestError, match="enlarge the ResourcePool"):
            pool.enqueue("big", req(memory=5000))
        assert pool.statistics().rejected == 1
        assert pool.statistics().waiting == 0

    def test_fits_exactly(self) -> None:
        small_pool().check_request(req(cpu=4, memory=1000), "edge")


class TestWaitingStates:
    """get_waiting_states says who waits and for what."""

    def test_capacity_reason(self) -> None:
        pool = small_pool()
        pool.try_acquire("a", req(cpu=3))
        pool.enqueue("b", req(cpu=2))
        assert pool.get_waiting_states() == {"b": "needs 2 CPU core(s), 1 free"}

    def test_behind_head_reason(self) -> None:
        pool = small_pool()
        pool.try_acquire("a", req(cpu=4))
        pool.enqueue("b", req(cpu=2))
        pool.enqueue("c", req(cpu=1))
        assert "queued behind 'b'" in pool.get_waiting_states()["c"]

    def test_reserved_reason(self) -> None:
        pool = small_pool()
        pool.try_acquire("a", req(cpu=2))
        pool.enqueue("hi", req(cpu=3, priority=Priority.HIGH))
        pool.enqueue("lo", req(cpu=1, priority=Priority.LOW))
        assert pool.get_waiting_states()["lo"] == (
            "needs 1 CPU core(s), 2 free (3 set aside for higher priorities)"
        )

    def test_a_cancelled_request_leaves_no_entry(self) -> None:
        pool = small_pool()
        pool.try_acquire("a", req(cpu=4))
        pool.enqueue("x", req(cpu=1))
        assert pool.statistics().waiting == 1
        assert pool.cancel("x")
        assert pool.get_waiting_states() == {}
        assert pool.statistics().waiting == 0
