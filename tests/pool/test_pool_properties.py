"""Random requests, priorities, releases, cancels and preemptions never break the pool's promises."""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from agent.errors import ResourceError
from agent.resources import Priority, ResourcePool, ResourceRequirements, ResourceType

TYPES = (ResourceType.CPU, ResourceType.MEMORY, ResourceType.GPU)
STATES = ("embed", "train", "load", "eval")
EPS = 1e-6

amounts = st.fixed_dictionaries(
    {
        "cpu": st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.0, 8.0]),
        "memory": st.sampled_from([0.0, 100.0, 250.0, 1000.0, 5000.0]),
        "gpu": st.sampled_from([0.0, 0.0, 0.5, 1.0, 2.0]),
    }
)
priorities = st.sampled_from(list(Priority))


class PoolMachine(RuleBasedStateMachine):
    """A model of who asked for what, checked against the pool after every step."""

    def __init__(self) -> None:
        super().__init__()
        self.pool: ResourcePool
        self.counter = 0
        self.asked: dict[str, ResourceRequirements] = {}
        self.state_of: dict[str, str] = {}
        self.waiting: dict[str, tuple[int, int]] = {}  # owner -> (front?0:1, arrival)
        self.holding: set[str] = set()
        self.granted: list[str] = []
        self.rejected: dict[str, str] = {}
        self.withdrawn: set[str] = set()
        self.finished: set[str] = set()
        self.fifo = True
        self.requeued: dict[str, int] = {}

    @initialize(
        cpu=st.sampled_from([2.0, 4.0, 8.0]),
        memory=st.sampled_from([1000.0, 4000.0]),
        gpu=st.sampled_from([0.0, 1.0, 2.0]),
        quotas=st.booleans(),
        quota_mode=st.sampled_from(["wait", "fail"]),
    )
    def make_pool(self, cpu: float, memory: float, gpu: float, quotas: bool, quota_mode: str) -> None:
        self.pool = ResourcePool(
            total_cpu=cpu, total_memory=memory, total_io=10, total_network=10, total_gpu=gpu,
            enable_preemption=True, enable_quotas=quotas,
        )
        if quotas:
            self.pool.set_quota("embed", cpu=2, mode=quota_mode)
            self.pool.set_priority_quota(Priority.LOW, memory=1500, mode=quota_mode)
            self.fifo = False  # a state quota lets others step past a blocked request

    # --- helpers ----------------------------------------------------------------------

    def _requirements(self, a: dict[str, float], priority: Priority) -> ResourceRequirements:
        return ResourceRequirements(
            cpu_units=a["cpu"], memory_mb=a["memory"], gpu_units=a["gpu"], io_weight=0, network_weight=0,
            priority=priority,
        )

    def _collect(self) -> None:
        for owner in self.pool.grant_next():
            assert owner in self.waiting, f"{owner} granted without waiting"
            assert owner not in self.holding, f"{owner} granted twice"
            rank = self.waiting.pop(owner)
            if self.fifo:
                level = self.asked[owner].priority
                earlier = [o for o, r in self.waiting.items() if self.asked[o].priority == level and r < rank]
                assert not earlier, f"{owner} granted before earlier {earlier} of {level.name}"
            self.holding.add(owner)
            self.granted.append(owner)

    def _new_owner(self) -> str:
        self.counter += 1
        return f"s{self.counter}"

    # --- rules ----------------------------------------------------------------------------

    @rule(a=amounts, priority=priorities, state=st.sampled_from(STATES))
    def enqueue(self, a: dict[str, float], priority: Priority, state: str) -> None:
        owner = self._new_owner()
        requirements = self._requirements(a, priority)
        self.asked[owner] = requirements
        self.state_of[owner] = state
        try:
            self.pool.enqueue(owner, requirements, state=state)
        except ResourceError as exc:
            assert str(exc), "a rejection must say why"
            self.rejected[owner] = str(exc)
            return
        self.waiting[owner] = (1, self.counter)
        self._collect()

    @rule(a=amounts, priority=priorities)
    def try_acquire(self, a: dict[str, float], priority: Priority) -> None:
        owner = self._new_owner()
        requirements = self._requirements(a, priority)
        self.asked[owner] = requirements
        try:
            got = self.pool.try_acquire(owner, requirements)
        except ResourceError as exc:
            self.rejected[owner] = str(exc)
            return
        if got:
            self.holding.add(owner)
            self.granted.append(owner)
        else:
            self.rejected[owner] = "busy"

    @precondition(lambda self: self.holding)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        owner = data.draw(st.sampled_from(sorted(self.holding)))
        self.pool.release(owner)
        self.holding.discard(owner)
        self.finished.add(owner)
        self._collect()

    @precondition(lambda self: self.waiting)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        owner = data.draw(st.sampled_from(sorted(self.waiting)))
        assert self.pool.cancel(owner)
        del self.waiting[owner]
        self.withdrawn.add(owner)
        self._collect()

    @precondition(lambda self: self.waiting)
    @rule(data=st.data())
    def preempt(self, data: st.DataObject) -> None:
        owner = data.draw(st.sampled_from(sorted(self.waiting)))
        requirements = self.asked[owner]
        victims = self.pool.find_victims(owner, requirements)
        if not victims:
            return
        assert len(set(victims)) == len(victims)
        for victim in victims:
            assert victim in self.holding, f"victim {victim} holds nothing"
            assert self.asked[victim].priority < requirements.priority, "victim not of lower priority"
        for victim in victims:
            # The victim gives back and queues again at the front of its level, as the
            # scheduler does once its task has stopped.
            self.pool.requeue(victim)
            self.holding.discard(victim)
            self.counter += 1
            self.waiting[victim] = (0, self.counter)
            self.requeued[victim] = self.requeued.get(victim, 0) + 1
            self._collect()
        self._collect()

    # --- invariants -------------------------------------------------------------------------

    @invariant()
    def never_over_committed(self) -> None:
        if not hasattr(self, "pool"):
            return
        allocations = self.pool.get_state_allocations()
        assert set(allocations) == self.holding
        for rtype in TYPES:
            held = sum(a.get(rtype, 0.0) for a in allocations.values())
            assert held <= self.pool.totals[rtype] + EPS
            assert abs(self.pool.totals[rtype] - self.pool.available(rtype) - held) < EPS

    @invariant()
    def queue_matches_model(self) -> None:
        if not hasattr(self, "pool"):
            return
        assert set(self.pool.queued()) == set(self.waiting)
        assert not set(self.waiting) & self.holding
        assert set(self.pool.get_waiting_states()) == set(self.waiting)

    @invariant()
    def nobody_waits_on_an_empty_pool(self) -> None:
        if not hasattr(self, "pool"):
            return
        if not self.holding:
            assert not self.waiting, f"{sorted(self.waiting)} wait although nothing is held"

    def teardown(self) -> None:
        if not hasattr(self, "pool"):
            return
        # Release everything: whatever waits is granted as room appears, then released.
        while self.holding:
            owner = sorted(self.holding)[0]
            self.pool.release(owner)
            self.holding.discard(owner)
            self.finished.add(owner)
            self._collect()
        assert not self.waiting
        for rtype in TYPES:
            assert self.pool.available(rtype) == self.pool.totals[rtype]
        stats = self.pool.statistics()
        assert stats.holders == 0 and stats.waiting == 0 and stats.evicting == 0
        # Every request was granted or rejected with a reason (or withdrawn by cancel).
        accounted = set(self.granted) | set(self.rejected) | self.withdrawn
        assert accounted == set(self.asked)
        for owner in set(self.granted):  # once per request; a requeued victim once more per eviction
            assert self.granted.count(owner) <= 1 + self.requeued.get(owner, 0)


PoolMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestPoolProperties = PoolMachine.TestCase
TestPoolProperties.__doc__ = "Hundreds of random operations keep the pool within totals, fair and leak-free."
