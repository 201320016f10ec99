"""Admission across several agents as a state machine: random requests, releases, cancels and evictions.

The real ``Admission`` over a real ``ResourcePool``; the runs are stand-ins that record
the grants they are woken with (what an engine run does in ``on_grant``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from agent.devices import GPUDevice, StaticInventory
from agent.engine.admission import Admission
from agent.resources import Priority, ResourcePool, ResourceRequirements, ResourceType

TOTALS = {ResourceType.CPU: 4.0, ResourceType.MEMORY: 400.0, ResourceType.GPU: 2.0}
_EPS = 1e-9


@dataclass
class FakeAct:
    """What admission needs of an activation."""

    state: str
    priority: int
    owner: str = ""
    front: bool = False


@dataclass
class FakeRun:
    """An agent's run: what it asked for, what it was granted, what it was told to give up."""

    run_id: str
    granted: list[FakeAct] = field(default_factory=list)
    evicted: list[FakeAct] = field(default_factory=list)
    loop: Any = None  # its event loop, which Admission notes at the first request

    def on_grant(self, act: FakeAct) -> None:
        self.granted.append(act)

    def preempt(self, act: FakeAct) -> None:
        self.evicted.append(act)


class AdmissionMachine(RuleBasedStateMachine):
    """Never over-committed, no idle capacity under a fitting head, no stale entries, no lost grants."""

    @initialize(preemption=st.booleans())
    def setup(self, preemption: bool) -> None:
        gpus = [GPUDevice(i, f"GPU-{i}", "t", 1, "", i) for i in range(2)]
        self.pool = ResourcePool(total_cpu=4, total_memory=400, total_io=0, total_network=0, total_gpu=2,
                                 enable_preemption=preemption, gpu_inventory=StaticInventory(gpus))
        self.admission = Admission.of(self.pool)
        self.runs = [FakeRun(f"run{i:02d}" + "0" * 30) for i in range(3)]
        self.waiting: dict[str, tuple[FakeRun, FakeAct, ResourceRequirements]] = {}
        self.holding: dict[str, tuple[FakeRun, FakeAct, ResourceRequirements]] = {}
        self.counter = 0

    def _collect_grants(self) -> None:
        for run in self.runs:
            for act in run.granted:
                assert act.owner in self.waiting, f"{act.owner} granted twice or never queued"
                self.holding[act.owner] = self.waiting.pop(act.owner)
            run.granted.clear()

    @rule(run=st.integers(0, 2), cpu=st.sampled_from([0.5, 1, 2, 4]), memory=st.sampled_from([10, 100, 400]),
          gpu=st.sampled_from([0, 0, 0.5, 1, 2]), priority=st.sampled_from(list(Priority)),
          name=st.sampled_from(["prep", "train", "eval"]))
    def request(self, run: int, cpu: float, memory: float, gpu: float, priority: Priority, name: str) -> None:
        owner_run = self.runs[run]
        self.counter += 1
        act = FakeAct(f"{name}{self.counter}", int(priority))
        act.owner = self.admission.owner_for(act.state, owner_run.run_id)
        req = ResourceRequirements(cpu_units=cpu, memory_mb=memory, io_weight=0, network_weight=0,
                                   gpu_units=gpu, priority=priority)
        self.waiting[act.owner] = (owner_run, act, req)
        if self.admission.request(owner_run, act, req):  # type: ignore[arg-type]
            self.holding[act.owner] = self.waiting.pop(act.owner)
        else:
            self.admission.preempt_for(act, req)  # type: ignore[arg-type]
        self._collect_grants()

    @precondition(lambda self: self.holding)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        owner = data.draw(st.sampled_from(sorted(self.holding)))
        del self.holding[owner]
        self.admission.release(owner, {"cpu_seconds": 0.1})
        self._collect_grants()

    @precondition(lambda self: self.waiting)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        owner = data.draw(st.sampled_from(sorted(self.waiting)))
        del self.waiting[owner]
        self.admission.release(owner)
        self._collect_grants()

    @precondition(lambda self: any(r.evicted for r in self.runs))
    @rule()
    def victims_give_way(self) -> None:
        """Evicted holders stop and wait again at the front of their level."""
        for run in self.runs:
            for act in run.evicted:
                if act.owner in self.holding:
                    self.waiting[act.owner] = self.holding.pop(act.owner)
                    self.admission.requeue(act.owner)
            run.evicted.clear()
        self._collect_grants()

    @invariant()
    def never_over_committed(self) -> None:
        stats = self.pool.statistics()
        for rtype, total in TOTALS.items():
            assert stats.allocated[rtype] <= total + _EPS
        used = [0.0, 0.0]
        for owner in self.holding:
            for device in self.pool.devices(owner):
                req = self.holding[owner][2]
                used[device.index] += min(req.gpu_units, 1.0)
        assert all(u <= 1.0 + _EPS for u in used)

    @invariant()
    def books_agree(self) -> None:
        assert set(self.pool.get_state_allocations()) == set(self.holding)
        assert set(self.pool.get_waiting_states()) == set(self.waiting)
        assert self.pool.statistics().waiting == len(self.waiting)
        assert set(self.admission.tickets) == set(self.holding) | set(self.waiting)

    @invariant()
    def whole_gpus_are_assigned(self) -> None:
        for owner, (_, _, req) in self.holding.items():
            devices = self.pool.devices(owner)
            assert len(devices) == (int(req.gpu_units) if req.gpu_units >= 1 else (1 if req.gpu_units else 0))

    @invariant()
    def no_fitting_head_waits_on_an_idle_pool(self) -> None:
        """With nothing evicting, the most important waiting request does not fit in what is free."""
        if not self.waiting or self.pool.pending_evictions():
            return
        top = max(int(req.priority) for _, _, req in self.waiting.values())
        heads = [o for o in self.pool.queued() if int(self.waiting[o][2].priority) == top]
        head = self.waiting[heads[0]][2]
        free = {r: self.pool.available(r) for r in TOTALS}
        fits = all(amount <= free[r] + _EPS for r, amount in head.amounts().items() if r in free)
        gpus_fit = head.gpu_units == 0 or self.pool._gpus is not None and self.pool._gpus.fits(head.gpu_units)
        assert not (fits and gpus_fit), f"{heads[0]} fits but waits"


TestAdmissionMachine = AdmissionMachine.TestCase
TestAdmissionMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
