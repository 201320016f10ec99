"""The pool's books (agent/_ledger.py, compiled by setup.py): its quick grant and release
decide only the common case, and everything else still gets the pool's whole policy."""

from __future__ import annotations

import pytest

from agent._ledger import ASK_POOL, EPS, GRANTED, NO_ROOM, Ledger
from agent.devices import GPUDevice, StaticInventory
from agent.errors import ResourceRequestError
from agent.resources import Priority, ResourcePool, ResourceRequirements, ResourceType

CPU, MEMORY, GPU = ResourceType.CPU, ResourceType.MEMORY, ResourceType.GPU
TOTALS = {CPU: 4.0, MEMORY: 1024.0, ResourceType.IO: 10.0, ResourceType.NETWORK: 10.0, GPU: 0.0}


def cpu(units: float, priority: Priority = Priority.NORMAL, gpu: float = 0.0) -> ResourceRequirements:
    return ResourceRequirements(cpu_units=units, memory_mb=0, io_weight=0, network_weight=0, gpu_units=gpu,
                                priority=priority)


def pool(**options: object) -> ResourcePool:
    return ResourcePool(total_cpu=4, total_memory=1000, total_gpu=0, **options)  # type: ignore[arg-type]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def ledger(clock: Clock) -> Ledger:
    return Ledger(dict(TOTALS), clock, tuple(Priority), has_gpus=False, quotas=False)


def test_fits_within_what_is_free_less_what_is_set_aside():
    books = ledger(Clock())
    books.take("a", {CPU: 2.0, MEMORY: 512.0}, Priority.NORMAL, "a")
    assert books.fits({CPU: 2.0, MEMORY: 512.0}, None)
    assert books.fits({CPU: 2.0 + EPS / 2}, None)  # rounding slack
    assert not books.fits({CPU: 2.1}, None)
    assert not books.fits({CPU: 1.0, MEMORY: 513.0}, None)
    assert books.fits({CPU: 1.5}, {CPU: 0.5})
    assert not books.fits({CPU: 1.6}, {CPU: 0.5})
    assert books.fits({MEMORY: 512.0}, {CPU: 2.0})  # a reserve of another type does not count
    assert books.fits({}, None)


def test_grants_and_releases_keep_the_books():
    clock = Clock()
    books = ledger(clock)
    books.take("a", {CPU: 3.0, MEMORY: 100.0}, Priority.NORMAL, "a")
    assert books.try_take("b", cpu(0.5), "b", None) == GRANTED
    assert books.free.as_dict() == {**TOTALS, CPU: 0.5, MEMORY: 924.0}
    assert books.lowest.as_dict() == books.free.as_dict()
    assert books.holders["a"].amounts == {CPU: 3.0, MEMORY: 100.0}
    assert books.holders["b"].amounts == {CPU: 0.5}  # only the types it holds some of
    clock.now = 2.0
    assert books.try_release("a")
    assert books.free.as_dict() == {**TOTALS, CPU: 3.5}
    assert books.area.as_dict() == {**dict.fromkeys(TOTALS, 0.0), CPU: 6.0, MEMORY: 200.0}  # amount x seconds
    assert books.lowest.as_dict() == {**TOTALS, CPU: 0.5, MEMORY: 924.0}  # the low-water mark stays
    assert not books.try_release("a")  # held nothing any more: the pool decides
    assert (books.seq, books.granted) == (2, 2)


def test_a_release_never_frees_more_than_the_total():
    books = ledger(Clock())
    holding = books.take("a", {CPU: 1.0}, Priority.NORMAL, "a")
    books.give_back(holding)
    books.give_back(holding)  # once too often
    assert books.free.cpu == 4.0


def test_quick_grant_and_release_keep_the_same_books_as_the_pool():
    p = pool()
    assert p._ledger.try_take("a", cpu(3), "a", None) == GRANTED
    assert p._ledger.try_take("b", cpu(2), "b", None) == NO_ROOM  # never over-committed
    assert p.try_acquire("b", cpu(1))
    assert p.get_state_allocations() == {"a": {CPU: 3.0}, "b": {CPU: 1.0}}
    assert p.available(CPU) == 0.0
    assert p.statistics().granted == 2
    assert p._ledger.try_release("a")
    p.release("b")
    assert p.available(CPU) == 4.0
    assert p.get_state_allocations() == {}
    assert p.get_usage_stats()[CPU].peak_usage == 4.0


def test_a_queued_request_sends_every_grant_through_the_policy():
    p = pool()
    assert p.try_acquire("hog", cpu(3))
    p.enqueue("urgent", cpu(2, Priority.HIGH))  # blocked: 1 CPU free
    assert p._ledger.try_take("small", cpu(1), "small", None) == ASK_POOL
    assert not p.try_acquire("small", cpu(1))  # the free CPU is set aside for the HIGH request
    p.release("hog")
    assert p.grant_next() == ["urgent"]
    assert p.try_acquire("small", cpu(1))  # nothing queued any more: the quick path again


def test_an_owner_known_to_the_pool_gets_its_typed_error():
    p = pool()
    assert p.try_acquire("a", cpu(1))
    with pytest.raises(ResourceRequestError, match="already holds"):
        p.try_acquire("a", cpu(1))


def test_quotas_switched_on_later_are_enforced():
    p = pool()
    assert p.try_acquire("first", cpu(1))
    p.enable_quotas = True
    p.set_quota("embed", cpu=1, mode="wait")
    assert p.try_acquire("e1", cpu(1), state="embed")
    assert not p.try_acquire("e2", cpu(1), state="embed")  # over its quota, though 2 CPUs are free
    p.release("e1")
    assert p.try_acquire("e2", cpu(1), state="embed")
    with pytest.raises(ResourceRequestError, match="True or False"):
        p.enable_quotas = "yes"  # type: ignore[assignment]


def test_a_priority_given_as_a_member_or_a_number_is_the_same_level():
    for priority in (Priority.HIGH, int(Priority.HIGH)):
        p = pool()
        assert p.try_acquire("hog", cpu(3))
        p.enqueue("blocked", cpu(2, Priority.NORMAL))
        assert p.try_acquire("high", cpu(1), priority=priority)  # above the blocked level: not held back


def test_gpu_requests_get_devices_from_the_pool_not_the_quick_path():
    inventory = StaticInventory([GPUDevice(0, "GPU-aaaa", "T", 1000, minor_number=0),
                                 GPUDevice(1, "GPU-bbbb", "T", 1000, minor_number=1)])
    p = ResourcePool(total_cpu=4, total_memory=1000, gpu_inventory=inventory)
    assert p._ledger.try_take("g", cpu(1, gpu=1), "g", None) == ASK_POOL
    assert p.try_acquire("g", cpu(1, gpu=1))
    assert [d.uuid for d in p.devices("g")] == ["GPU-aaaa"]
    assert p.try_acquire("c", cpu(1))  # no GPU asked: the quick path, no devices
    assert p.devices("c") == []
    assert not p._ledger.try_release("g")  # its devices go back through the pool
    p.release("g")
    assert p.try_acquire("g2", cpu(1, gpu=1))
    assert [d.uuid for d in p.devices("g2")] == ["GPU-aaaa"]


def test_measured_use_is_recorded_at_the_release():
    p = pool()
    assert p.try_acquire("a", cpu(1))
    p.record_measured("a", {"cpu_seconds": 2.5, "peak_memory_mb": 10})
    assert not p._ledger.try_release("a")  # the measure goes through the pool
    p.release("a")
    assert p.get_usage_stats()[CPU].measured_usage == 2.5
