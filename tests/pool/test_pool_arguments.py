"""The pool's public methods refuse wrong arguments with ResourceRequestError, and change nothing."""

from __future__ import annotations

import math
import time
from typing import Any

import pytest

from agent.devices import StaticInventory
from agent.errors import ResourceRequestError
from agent.preemption import PreemptionPolicy
from agent.resources import Priority, ResourcePool, ResourceRequirements

from .helpers import req

PRIORITY_CHOICES = "must be one of Priority.LOW, Priority.NORMAL, Priority.HIGH, Priority.CRITICAL"


def small_pool(**kw: Any) -> ResourcePool:
    return ResourcePool(total_cpu=4, total_memory=1000, total_io=10, total_network=10, total_gpu=0, **kw)


def unchanged(pool: ResourcePool) -> tuple[Any, ...]:
    """What a refused call must leave as it was."""
    stats = pool.statistics()
    return stats.allocated, stats.holders, stats.waiting, stats.rejected, pool.get_quotas(), pool.get_measured()


class TestConstructor:
    """The injectables are checked when the pool is made."""

    @pytest.mark.parametrize("kwargs,message", [
        ({"clock": None}, r"ResourcePool\(clock=...\) must be a function returning seconds, like time.monotonic, "
                          r"got NoneType None"),
        ({"clock": 5}, r"ResourcePool\(clock=...\) must be a function .* got int 5"),
        ({"gpu_inventory": 5}, r"ResourcePool\(gpu_inventory=...\) must be a GPUInventory .* got int 5 "
                               r"\(it has no devices\(\)\)"),
        ({"preemption_policy": 5}, r"ResourcePool\(preemption_policy=...\) must be an "
                                   r"agent.preemption.PreemptionPolicy \(or None\), got int 5 "
                                   r"\(it has no choose\(\)\)"),
    ])
    def test_wrong_injectable(self, kwargs: dict[str, Any], message: str) -> None:
        with pytest.raises(ResourceRequestError, match=message):
            small_pool(**kwargs)

    def test_right_injectables(self) -> None:
        pool = small_pool(clock=time.monotonic, gpu_inventory=StaticInventory(), preemption_policy=PreemptionPolicy())
        assert pool.try_acquire("a", req(cpu=1))


class TestRequestArguments:
    """try_acquire, enqueue, acquire and find_victims name the argument they cannot take."""

    @pytest.mark.parametrize("priority,shown", [(9, "int 9"), (-1, "int -1"), (1.5, "float 1.5"), ("x", "str 'x'"),
                                                (True, "bool True"), (math.nan, "float nan")])
    def test_try_acquire_priority(self, priority: Any, shown: str) -> None:
        pool = small_pool()
        before = unchanged(pool)
        with pytest.raises(ResourceRequestError, match=rf"try_acquire\(priority=...\) {PRIORITY_CHOICES}, got {shown}"):
            pool.try_acquire("o", req(cpu=1), priority=priority)
        assert unchanged(pool) == before

    def test_try_acquire_priority_as_member_or_value(self) -> None:
        pool = small_pool()
        assert pool.try_acquire("a", req(cpu=1), priority=Priority.HIGH)
        assert pool.try_acquire("b", req(cpu=1), priority=3)

    @pytest.mark.parametrize("owner,requirements,state,message", [
        (None, req(cpu=1), None, r"try_acquire\(owner=...\) takes the requester's name \(a non-empty str\), "
                                 r"got NoneType None"),
        ("", req(cpu=1), None, r"try_acquire\(owner=...\) .* got str ''"),
        (("a", 1), req(cpu=1), None, r"try_acquire\(owner=...\) .* got tuple \('a', 1\)"),
        ("o", None, None, r"try_acquire\(requirements=...\) takes a ResourceRequirements, e.g. "
                          r"ResourceRequirements\(cpu_units=1\), got NoneType None"),
        ("o", {"cpu_units": 1}, None, r"try_acquire\(requirements=...\) .* got dict"),
        ("o", req(cpu=1), 5, r"try_acquire\(state=...\) takes a state name \(a non-empty str\) or None, got int 5"),
    ])
    def test_try_acquire_request(self, owner: Any, requirements: Any, state: Any, message: str) -> None:
        pool = small_pool()
        before = unchanged(pool)
        with pytest.raises(ResourceRequestError, match=message):
            pool.try_acquire(owner, requirements, state=state)
        assert unchanged(pool) == before

    def test_a_requirements_subclass_is_a_request(self) -> None:
        class Mine(ResourceRequirements):
            pass

        assert small_pool().try_acquire("o", Mine(cpu_units=1))

    def test_enqueue(self) -> None:
        pool = small_pool()
        before = unchanged(pool)
        with pytest.raises(ResourceRequestError, match=rf"enqueue\(priority=...\) {PRIORITY_CHOICES}, got int 9"):
            pool.enqueue("o", req(cpu=1), 9)
        with pytest.raises(ResourceRequestError, match=r"enqueue\(owner=...\) .* got NoneType None"):
            pool.enqueue(None, req(cpu=1))  # type: ignore[arg-type]
        with pytest.raises(ResourceRequestError, match=r"enqueue\(requirements=...\) .* got int 5"):
            pool.enqueue("o", 5)  # type: ignore[arg-type]
        with pytest.raises(ResourceRequestError, match=r"enqueue\(notify=...\) must be a function taking the owner"):
            pool.enqueue("o", req(cpu=1), notify=5)  # type: ignore[arg-type]
        assert unchanged(pool) == before  # not even counted as rejected

    async def test_acquire(self) -> None:
        pool = small_pool()
        with pytest.raises(ResourceRequestError, match=rf"acquire\(priority=...\) {PRIORITY_CHOICES}, got float 1.5"):
            await pool.acquire("o", req(cpu=1), 1.5)  # type: ignore[arg-type]
        assert not pool.is_queued("o") and not pool.holds("o")

    def test_find_victims(self) -> None:
        pool = small_pool(enable_preemption=True)
        with pytest.raises(ResourceRequestError, match=rf"find_victims\(priority=...\) {PRIORITY_CHOICES}, got int 7"):
            pool.find_victims("o", req(cpu=1), 7)
        with pytest.raises(ResourceRequestError, match=r"find_victims\(requirements=...\)"):
            pool.find_victims("o", None)  # type: ignore[arg-type]
        assert pool.pending_evictions() == {}


class TestQuotaArguments:
    """remove_quota checks both arguments before it drops anything."""

    def test_remove_quota_priority(self) -> None:
        pool = small_pool(enable_quotas=True)
        pool.set_quota("s", cpu=1)
        before = unchanged(pool)
        with pytest.raises(ResourceRequestError, match=rf"remove_quota\(priority=...\) {PRIORITY_CHOICES}, got int 9"):
            pool.remove_quota(state="s", priority=9)
        assert unchanged(pool) == before  # the state's quota is still there

    def test_remove_quota_state(self) -> None:
        pool = small_pool(enable_quotas=True)
        with pytest.raises(ResourceRequestError,
                           match=r"remove_quota\(state=...\) takes a state name or None, got int 5"):
            pool.remove_quota(state=5)  # type: ignore[arg-type]

    def test_remove_quota_by_value(self) -> None:
        pool = small_pool(enable_quotas=True)
        pool.set_priority_quota(Priority.HIGH, cpu=1)
        pool.remove_quota(priority=2)
        assert pool.get_quotas()["priority"] == {}


class TestRecordMeasured:
    """record_measured takes a mapping of numbers >= 0 (None: not measured)."""

    @pytest.mark.parametrize("usage,message", [
        (5, r"record_measured\(usage=...\) takes a mapping such as .* got int 5"),
        (None, r"record_measured\(usage=...\) .* got NoneType None"),
        ({"cpu_seconds": "x"}, r"record_measured\(usage\['cpu_seconds'\]\) must be a number >= 0, got str 'x'"),
        ({"cpu_seconds": math.nan}, r"record_measured\(usage\['cpu_seconds'\]\) must be a finite number"),
        ({"cpu_seconds": -1.0}, r"record_measured\(usage\['cpu_seconds'\]\) must be a number >= 0, got -1.0"),
        ({"peak_memory_mb": True}, r"record_measured\(usage\['peak_memory_mb'\]\) .* got bool True"),
        ({"peak_memory_bytes": math.inf}, r"record_measured\(usage\['peak_memory_bytes'\]\) must be a finite"),
    ])
    def test_wrong_usage(self, usage: Any, message: str) -> None:
        pool = small_pool()
        assert pool.try_acquire("o", req(cpu=1))
        pool.record_measured("o", {"cpu_seconds": 1.0, "peak_memory_bytes": 2 ** 20})
        before = unchanged(pool)
        with pytest.raises(ResourceRequestError, match=message):
            pool.record_measured("o", usage)
        assert unchanged(pool) == before

    def test_wrong_owner(self) -> None:
        with pytest.raises(ResourceRequestError, match=r"record_measured\(owner=...\) .* got NoneType None"):
            small_pool().record_measured(None, {})  # type: ignore[arg-type]

    def test_none_is_not_measured(self) -> None:
        pool = small_pool()
        assert pool.try_acquire("o", req(cpu=1))
        pool.record_measured("o", {"cpu_seconds": None, "peak_memory_bytes": 3 * 2 ** 20})
        assert pool.get_measured() == {"o": {"cpu_seconds": 0.0, "peak_memory_mb": 3.0}}
