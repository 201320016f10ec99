"""Choosing preemption victims: strictly lower priority, fewest, lowest, most recent."""

from __future__ import annotations

import pytest

from agent.errors import ResourceRequestError
from agent.preemption import Holder, PreemptionPolicy
from agent.resources import Priority, ResourcePool, ResourceRequirements, ResourceType

from .helpers import FakeClock, req

CPU, MEM = ResourceType.CPU, ResourceType.MEMORY


def holder(owner: str, priority: int, cpu: float, started: float, memory: float = 0.0) -> Holder:
    return Holder(owner, priority, {CPU: cpu, MEM: memory}, started)


class TestPolicy:
    """The victim-choice rules, on the policy object alone."""

    policy = PreemptionPolicy()

    def test_fits_already(self) -> None:
        assert self.policy.choose({CPU: 1}, {CPU: 2}, 2, [holder("a", 0, 4, 0)]) == []

    def test_only_strictly_lower_priorities(self) -> None:
        holders = [holder("same", 2, 4, 0), holder("higher", 3, 4, 0)]
        assert self.policy.choose({CPU: 4}, {CPU: 0}, 2, holders) is None

    def test_fewest_victims_first(self) -> None:
        holders = [holder("low1", 0, 1, 1), holder("low2", 0, 1, 2), holder("normal-big", 1, 2, 0)]
        # Two LOW states would also do, but one NORMAL state is fewer victims.
        assert self.policy.choose({CPU: 2}, {CPU: 0}, 3, holders) == ["normal-big"]

    def test_then_lowest_priority(self) -> None:
        holders = [holder("normal", 1, 2, 5), holder("low", 0, 2, 1)]
        assert self.policy.choose({CPU: 2}, {CPU: 0}, 2, holders) == ["low"]

    def test_then_most_recently_started(self) -> None:
        holders = [holder("old", 0, 2, 1), holder("new", 0, 2, 9), holder("mid", 0, 2, 5)]
        assert self.policy.choose({CPU: 2}, {CPU: 0}, 2, holders) == ["new"]

    def test_pairs_compared_by_highest_victim_priority(self) -> None:
        holders = [holder("low-a", 0, 1, 9), holder("normal", 1, 1, 8), holder("low-b", 0, 1, 1)]
        assert self.policy.choose({CPU: 2}, {CPU: 0}, 2, holders) == ["low-a", "low-b"]

    def test_only_what_is_short_matters(self) -> None:
        holders = [holder("cpu-only", 0, 4, 9), holder("mem", 0, 0.5, 1, memory=500)]
        assert self.policy.choose({CPU: 1, MEM: 400}, {CPU: 4, MEM: 0}, 2, holders) == ["mem"]

    def test_impossible(self) -> None:
        holders = [holder("low", 0, 1, 0)]
        assert self.policy.choose({CPU: 4}, {CPU: 1}, 2, holders) is None

    def test_free_capacity_counts(self) -> None:
        holders = [holder("small", 0, 1, 9), holder("big", 0, 3, 1)]
        assert self.policy.choose({CPU: 4}, {CPU: 3}, 2, holders) == ["small"]

    def test_greedy_fallback_when_search_is_too_large(self) -> None:
        policy = PreemptionPolicy(max_combinations=5)
        holders = [holder(f"h{i}", 0, 1, i) for i in range(30)]
        chosen = policy.choose({CPU: 3}, {CPU: 0}, 1, holders)
        assert chosen is not None and len(chosen) == 3
        assert chosen == ["h29", "h28", "h27"]


class TestPoolFindVictims:
    """find_victims on a live pool remembers evictions under way."""

    def make(self, preemption: bool = True) -> tuple[ResourcePool, FakeClock]:
        clock = FakeClock()
        pool = ResourcePool(total_cpu=4, total_memory=1000, total_io=10, total_network=10, total_gpu=0,
                            enable_preemption=preemption, clock=clock)
        return pool, clock

    def test_off_means_none(self) -> None:
        pool, _ = self.make(preemption=False)
        pool.try_acquire("low", req(cpu=4, priority=Priority.LOW))
        assert pool.find_victims("high", req(cpu=4, priority=Priority.HIGH)) is None

    def test_two_low_states_for_the_whole_pool(self) -> None:
        pool, clock = self.make()
        pool.try_acquire("low1", req(cpu=2, priority=Priority.LOW))
        clock.now = 1
        pool.try_acquire("low2", req(cpu=2, priority=Priority.LOW))
        pool.enqueue("high", req(cpu=4, priority=Priority.HIGH))
        assert pool.find_victims("high", req(cpu=4, priority=Priority.HIGH)) == ["low2", "low1"]
        assert pool.pending_evictions() == {"low1": "high", "low2": "high"}
        assert pool.statistics().preempted == 2
        # Asking again while the evictions run does not pick more victims.
        assert pool.find_victims("high", req(cpu=4, priority=Priority.HIGH)) == []
        pool.release("low1")
        assert pool.grant_next() == []
        pool.release("low2")
        assert pool.grant_next() == ["high"]
        assert pool.pending_evictions() == {}
        # The victims requeue at the front of their level and run after "high".
        pool.enqueue("low1", req(cpu=2, priority=Priority.LOW), front=True)
        pool.enqueue("low2", req(cpu=2, priority=Priority.LOW), front=True)
        pool.release("high")
        assert pool.grant_next() == ["low1", "low2"]

    def test_second_requester_does_not_reuse_promised_capacity(self) -> None:
        pool, clock = self.make()
        for i in range(4):
            clock.now = i
            pool.try_acquire(f"low{i}", req(cpu=1, priority=Priority.LOW))
        assert pool.find_victims("h1", req(cpu=2, priority=Priority.HIGH)) == ["low3", "low2"]
        assert pool.find_victims("h2", req(cpu=2, priority=Priority.HIGH)) == ["low1", "low0"]
        assert pool.find_victims("h3", req(cpu=1, priority=Priority.HIGH)) is None

    def test_victims_must_be_lower_than_requester(self) -> None:
        pool, _ = self.make()
        pool.try_acquire("normal", req(cpu=4, priority=Priority.NORMAL))
        assert pool.find_victims("n2", req(cpu=1, priority=Priority.NORMAL)) is None
        assert pool.find_victims("hi", req(cpu=1, priority=Priority.HIGH)) == ["normal"]

    def test_cancelled_requester_drops_its_claim(self) -> None:
        pool, _ = self.make()
        pool.try_acquire("low", req(cpu=4, priority=Priority.LOW))
        pool.enqueue("high", req(cpu=4, priority=Priority.HIGH))
        assert pool.find_victims("high", req(cpu=4, priority=Priority.HIGH)) == ["low"]
        pool.cancel("high")
        pool.release("low")
        assert pool.try_acquire("other", req(cpu=4, priority=Priority.LOW))
        # Nothing is promised to "high" any more: all of "other" may be claimed.
        assert pool.find_victims("h2", req(cpu=4, priority=Priority.HIGH)) == ["other"]


class TestRequeue:
    """requeue gives back and queues again at the front, in one step."""

    def test_victim_keeps_its_turn(self) -> None:
        pool = ResourcePool(total_cpu=4, total_memory=1000, total_io=10, total_network=10, total_gpu=0,
                            enable_preemption=True)
        pool.try_acquire("victim", req(cpu=4, priority=Priority.LOW))
        pool.enqueue("later", req(cpu=4, priority=Priority.LOW))
        pool.enqueue("high", req(cpu=4, priority=Priority.HIGH))
        assert pool.find_victims("high", req(cpu=4, priority=Priority.HIGH)) == ["victim"]
        pool.requeue("victim")
        assert pool.grant_next() == ["high"]
        assert pool.queued() == ["victim", "later"]
        pool.release("high")
        assert pool.grant_next() == ["victim"]

    def test_a_victim_that_lent_its_cpu_asks_for_it_again(self) -> None:
        # Its state waits for a human (lend_cpu): requeued, it came back asking for no CPU
        # and ran beside the state that had taken it, past the pool's CPUs.
        pool = ResourcePool(total_cpu=2, total_memory=1000, total_gpu=0, enable_preemption=True)
        pool.try_acquire("victim", req(cpu=2, priority=Priority.LOW))
        assert pool.lend_cpu("victim")
        assert pool.try_acquire("filler", req(cpu=2, priority=Priority.NORMAL))
        pool.requeue("victim")
        assert pool.grant_next() == []  # the filler holds the CPUs
        pool.release("filler")
        assert pool.grant_next() == ["victim"]
        assert pool.get_state_allocations()["victim"][ResourceType.CPU] == 2

    def test_requeue_of_nothing(self) -> None:
        pool = ResourcePool(total_cpu=4, total_memory=1000, total_gpu=0)
        with pytest.raises(ResourceRequestError, match="holds nothing"):
            pool.requeue("ghost")


class TestPreemptionAndQuotas:
    """Evicting frees capacity, not quota: a quota-blocked request evicts nobody."""

    def test_quota_blocked_request_finds_no_victims(self) -> None:
        pool = ResourcePool(total_cpu=4, total_memory=1000, total_io=10, total_network=10, total_gpu=0,
                            enable_preemption=True, enable_quotas=True)
        pool.set_priority_quota(Priority.HIGH, cpu=2)
        assert pool.try_acquire("low", req(cpu=3, priority=Priority.LOW))
        assert pool.try_acquire("high1", req(cpu=1, priority=Priority.HIGH))
        assert pool.find_victims("high2", req(cpu=2, priority=Priority.HIGH)) is None  # 1 + 2 > quota 2
        assert pool.find_victims("high3", req(cpu=1, priority=Priority.HIGH)) == ["low"]  # within quota


class TestGPUPlacement:
    """Victims for a GPU request must free devices it can be placed on, not just a share."""

    @staticmethod
    def make() -> tuple[ResourcePool, FakeClock]:
        from agent.devices import GPUDevice, StaticInventory

        clock = FakeClock()
        gpus = [GPUDevice(i, f"GPU-{i}", "T", 1000, minor_number=i) for i in range(2)]
        pool = ResourcePool(total_cpu=8, total_memory=1000, total_io=10, total_network=10, total_gpu=2,
                            enable_preemption=True, clock=clock, gpu_inventory=StaticInventory(gpus))
        for t, (owner, units, priority) in enumerate([("a", 0.5, Priority.LOW), ("b", 0.5, Priority.NORMAL),
                                                      ("c", 0.5, Priority.LOW), ("d", 0.4, Priority.NORMAL)]):
            clock.now = t
            assert pool.try_acquire(owner, gpu(units, priority))
        assert {o: [d.uuid for d in pool.devices(o)] for o in "abcd"} == {
            "a": ["GPU-0"], "b": ["GPU-0"], "c": ["GPU-1"], "d": ["GPU-1"]}
        return pool, clock

    def test_the_victims_free_a_whole_gpu(self) -> None:
        # Evicting the two LOW states would free 1 GPU in all, half of each: no whole one.
        pool, _ = self.make()
        pool.enqueue("h", gpu(1, Priority.HIGH))
        victims = pool.find_victims("h", gpu(1, Priority.HIGH))
        assert victims is not None and set(victims) == {"c", "d"}  # both on GPU-1, and not "a" for nothing
        for victim in victims:
            pool.release(victim)
        assert pool.grant_next() == ["h"]
        assert [d.uuid for d in pool.devices("h")] == ["GPU-1"]

    def test_a_victim_the_others_make_unneeded_is_spared(self) -> None:
        # The youngest LOW holder shares GPU-0 with a NORMAL one, so evicting it frees no
        # whole GPU; the other LOW holder, alone on GPU-1, is enough by itself.
        from agent.devices import GPUDevice, StaticInventory

        clock = FakeClock()
        gpus = [GPUDevice(i, f"GPU-{i}", "T", 1000, minor_number=i) for i in range(2)]
        pool = ResourcePool(total_cpu=8, total_memory=1000, total_io=10, total_network=10, total_gpu=2,
                            enable_preemption=True, clock=clock, gpu_inventory=StaticInventory(gpus))
        for t, (owner, priority) in enumerate([("c", Priority.NORMAL), ("y", Priority.NORMAL), ("a", Priority.LOW)]):
            clock.now = t
            assert pool.try_acquire(owner, gpu(0.5, priority))
        pool.release("y")
        clock.now = 5
        assert pool.try_acquire("b", gpu(0.5, Priority.LOW))
        assert {o: [d.uuid for d in pool.devices(o)] for o in "cab"} == {"c": ["GPU-0"], "a": ["GPU-1"], "b": ["GPU-0"]}
        assert pool.find_victims("h", gpu(1, Priority.HIGH)) == ["a"]

    def test_enough_share_spread_over_gpus_is_not_room(self) -> None:
        pool, _ = self.make()
        pool.release("a")
        pool.release("c")  # 1.1 GPUs free, 0.5 of GPU-0 and 0.6 of GPU-1
        pool.enqueue("h", gpu(1, Priority.HIGH))
        assert "spread over GPUs other states use" in pool.get_waiting_states()["h"]
        assert pool.find_victims("h", gpu(1, Priority.HIGH)) == ["d"]  # the youngest frees GPU-1


def gpu(units: float, priority: Priority) -> ResourceRequirements:
    return ResourceRequirements(cpu_units=0.1, memory_mb=0, io_weight=0, network_weight=0, gpu_units=units,
                                priority=priority)
