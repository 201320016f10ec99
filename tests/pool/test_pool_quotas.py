"""Per-state and per-priority quotas, in fail and wait mode."""

from __future__ import annotations

import pytest

from agent.errors import QuotaExceededError, ResourceRequestError
from agent.quotas import Quota, QuotaMode
from agent.resources import Priority, ResourcePool, ResourceType

from .helpers import req


def pool8() -> ResourcePool:
    return ResourcePool(total_cpu=8, total_memory=1000, total_io=10, total_network=10, total_gpu=0,
                        enable_quotas=True)


class TestQuotaSetup:
    """Quotas need enable_quotas and at least one limit."""

    def test_off_by_default(self) -> None:
        pool = ResourcePool(total_cpu=8, total_memory=1000, total_gpu=0)
        with pytest.raises(ResourceRequestError, match="enable_quotas=True"):
            pool.set_quota("embed", cpu=2)

    def test_needs_a_limit(self) -> None:
        with pytest.raises(ResourceRequestError, match="at least one limit"):
            pool8().set_quota("embed")

    def test_bad_mode(self) -> None:
        with pytest.raises(ResourceRequestError, match="'fail' or 'wait'"):
            pool8().set_quota("embed", cpu=1, mode="maybe")

    def test_negative_limit(self) -> None:
        with pytest.raises(ResourceRequestError, match="must be a number >= 0"):
            pool8().set_quota("embed", cpu=-1)

    def test_get_quotas(self) -> None:
        pool = pool8()
        pool.set_quota("embed", cpu=2, mode="fail")
        pool.set_priority_quota(Priority.LOW, memory=100)
        quotas = pool.get_quotas()
        assert quotas["state"]["embed"] == Quota({ResourceType.CPU: 2.0}, QuotaMode.FAIL)
        assert quotas["priority"][Priority.LOW].limits == {ResourceType.MEMORY: 100}


class TestFailMode:
    """A request past a fail-mode quota raises with the quota, the request and the fix."""

    def test_state_quota_fails(self) -> None:
        pool = pool8()
        pool.set_quota(state="embed", cpu=2, mode="fail")
        assert pool.try_acquire("run1:embed", req(cpu=2), state="embed")
        with pytest.raises(QuotaExceededError) as info:
            pool.try_acquire("run2:embed", req(cpu=1), state="embed")
        text = str(info.value)
        assert "asks for 1 CPU core(s)" in text
        assert "quota of state 'embed' is 2 (2 in use)" in text
        assert "pool.set_quota('embed', cpu=...)" in text
        assert "mode='wait'" in text
        assert pool.statistics().rejected == 1

    def test_enqueue_fails_too(self) -> None:
        pool = pool8()
        pool.set_priority_quota(Priority.LOW, cpu=1, mode="fail")
        pool.enqueue("a", req(cpu=1, priority=Priority.LOW))
        with pytest.raises(QuotaExceededError, match=r"set_priority_quota\(Priority.LOW, cpu=...\)"):
            pool.enqueue("b", req(cpu=1, priority=Priority.LOW))
        assert pool.queued() == []

    def test_a_requeued_request_waits_instead(self) -> None:
        """A request at the front (a preempted holder, a grant given back while held up)
        passed its quota when it was first made: it waits its turn under it."""
        pool = pool8()
        pool.set_quota("embed", cpu=1, mode="fail")
        pool.enqueue("run1:embed", req(cpu=1), state="embed")
        pool.enqueue("run2:embed", req(cpu=1), state="embed", front=True)
        assert pool.grant_next() == ["run1:embed"]
        assert pool.statistics().rejected == 0
        pool.release("run1:embed")
        assert pool.grant_next() == ["run2:embed"]

    def test_other_states_are_not_limited(self) -> None:
        pool = pool8()
        pool.set_quota("embed", cpu=1, mode="fail")
        assert pool.try_acquire("embed", req(cpu=1))
        assert pool.try_acquire("train", req(cpu=6))

    def test_release_frees_quota(self) -> None:
        pool = pool8()
        pool.set_quota("embed", cpu=1, mode="fail")
        assert pool.try_acquire("embed", req(cpu=1))
        pool.release("embed")
        assert pool.try_acquire("embed", req(cpu=1))


class TestWaitMode:
    """A request past a wait-mode quota waits until its quota has room."""

    def test_never_fits_raises_even_in_wait_mode(self) -> None:
        pool = pool8()
        pool.set_quota("embed", cpu=2, mode="wait")
        with pytest.raises(QuotaExceededError, match="it can never fit"):
            pool.enqueue("embed", req(cpu=3))

    def test_state_quota_waits_and_steps_aside(self) -> None:
        pool = pool8()
        pool.set_quota("embed", cpu=2, mode="wait")
        pool.enqueue("e1", req(cpu=2), state="embed")
        pool.enqueue("e2", req(cpu=1), state="embed")
        pool.enqueue("other", req(cpu=1))  # not held up by embed's quota
        assert pool.grant_next() == ["e1", "other"]
        assert pool.get_waiting_states()["e2"] == "quota of state 'embed': needs 1 CPU core(s), 2 of 2 in use"
        assert not pool.try_acquire("e3", req(cpu=1), state="embed")
        pool.release("e1")
        assert pool.grant_next() == ["e2"]

    def test_priority_quota_blocks_its_level_only(self) -> None:
        pool = pool8()
        pool.set_priority_quota(Priority.LOW, cpu=2)
        for name in ("l1", "l2", "l3"):
            pool.enqueue(name, req(cpu=1, priority=Priority.LOW))
        pool.enqueue("n1", req(cpu=1))  # NORMAL is not held up by LOW's quota
        assert pool.grant_next() == ["l1", "l2", "n1"]
        assert pool.get_waiting_states()["l3"] == "quota of priority LOW: needs 1 CPU core(s), 2 of 2 in use"
        pool.release("l1")
        assert pool.grant_next() == ["l3"]

    def test_raising_a_quota_admits_waiters(self) -> None:
        pool = pool8()
        pool.set_quota("embed", cpu=1)
        pool.enqueue("e1", req(cpu=1), state="embed")
        pool.enqueue("e2", req(cpu=1), state="embed")
        assert pool.grant_next() == ["e1"]
        pool.set_quota("embed", cpu=2)
        assert pool.grant_next() == ["e2"]

    def test_removing_a_quota_admits_waiters(self) -> None:
        pool = pool8()
        pool.set_quota("embed", cpu=1)
        pool.set_priority_quota(Priority.NORMAL, cpu=1)
        pool.enqueue("e1", req(cpu=1), state="embed")
        pool.enqueue("e2", req(cpu=1), state="embed")
        pool.remove_quota(state="embed")
        assert pool.grant_next() == ["e1"]
        pool.remove_quota(priority=Priority.NORMAL)
        assert pool.grant_next() == ["e2"]

    def test_cancel_parked_waiter(self) -> None:
        pool = pool8()
        pool.set_quota("embed", cpu=1)
        pool.enqueue("e1", req(cpu=1), state="embed")
        pool.enqueue("e2", req(cpu=1), state="embed")
        assert pool.grant_next() == ["e1"]
        assert pool.cancel("e2")
        pool.release("e1")
        assert pool.grant_next() == []
        assert pool.statistics().waiting == 0

    def test_parked_waiters_keep_their_order(self) -> None:
        pool = pool8()
        pool.set_quota("embed", cpu=1)
        pool.enqueue("e1", req(cpu=1), state="embed")
        pool.enqueue("e2", req(cpu=1), state="embed")
        pool.enqueue("e3", req(cpu=1), state="embed")
        granted = pool.grant_next()
        for _ in range(3):
            pool.release(granted[-1])
            granted += pool.grant_next()
        assert granted == ["e1", "e2", "e3"]


class TestQuotasAndBackfill:
    """What a request its state's quota holds back would need is not set aside for it."""

    def test_a_request_held_back_by_its_quota_sets_nothing_aside(self) -> None:
        pool = ResourcePool(total_cpu=4, total_memory=1000, total_io=10, total_network=10, total_gpu=0,
                            enable_quotas=True)
        pool.set_quota("S", cpu=1)
        assert pool.try_acquire("hog", req(cpu=1, memory=1000))
        assert pool.try_acquire("s-running", req(cpu=1), state="S")  # S's quota is used up
        pool.enqueue("high-1", req(cpu=1, memory=100, priority=Priority.HIGH))  # waits for memory
        pool.enqueue("high-S", req(cpu=1, priority=Priority.HIGH), state="S")  # waits for S's quota
        pool.enqueue("low", req(cpu=1, priority=Priority.LOW))  # 2 CPUs free, 1 set aside for high-1
        assert pool.grant_next() == ["low"]
        assert not pool.try_acquire("low-2", req(cpu=1, priority=Priority.LOW))  # the last one is high-1's
        pool.release("hog")
        assert pool.grant_next() == ["high-1"]
        assert "quota of state 'S'" in pool.get_waiting_states()["high-S"]

    def test_switching_quotas_off_lets_what_they_held_back_queue_again(self) -> None:
        pool = pool8()
        pool.set_quota("S", cpu=1)
        assert pool.try_acquire("a", req(cpu=1), state="S")
        pool.enqueue("b", req(cpu=1), state="S")  # held back by S's quota
        assert pool.grant_next() == []
        pool.enable_quotas = False
        assert pool.grant_next() == ["b"]  # was: parked for good once quotas were off
