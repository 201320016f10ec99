"""An Agent whose states are admitted through coordination primitives and rate limits.

:class:`CoordinatedAgent` is an :class:`~agent.agent.Agent` that owns a
:class:`Coordinator` (``_coordinator``; the process's default one unless given
another) and registers an admission hook with itself. Before an attempt of a
coordinated state runs, in the attempt's own task and after its dependencies are
met, the hook takes the state's primitive and then waits for its rate limit (in that
order, so rate-limited *starts* stay spaced even behind a semaphore); after the
attempt, success or not, it gives the primitive back. Admission happens in the
supervisor, so it holds for isolated states as well as inline ones.

A BARRIER on a state is a gate: every state that hands over to it (returns its name)
counts as an arrival of that run, and the guarded state starts only once
``max_count`` arrivals are in, or fails after ``wait_timeout`` saying how many came
(counted from the round's first arrival: a join may hold the state until every branch
has ended, and one that hangs must not keep it waiting for good).
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import Any

from .. import _validate
from .. import events as ev
from ..agent import Agent
from ..errors import CoordinationError, CoordinationTimeoutError
from ..executor import admission_held_up
from .allocation import attempt_owner, set_current_owner
from .coordinator import Coordinator, check_coordinator, default_coordinator
from .primitives import Barrier, Primitive, PrimitiveType, primitive_type_of
from .ratelimit import RateLimitStrategy


_ACTIVATION_ENDS = frozenset((ev.STATE_COMPLETED, ev.STATE_FAILED, ev.STATE_CANCELLED))


@dataclass(frozen=True)
class _Held:
    primitive: Primitive
    owner: str
    amount: float


class _Admission:
    """The admission hook (and run observer) of one CoordinatedAgent."""

    def __init__(self, agent: "CoordinatedAgent") -> None:
        self.agent = agent
        self._held: dict[tuple[str, str, int], _Held] = {}
        # (state, run id) of barrier-guarded states whose activation passed its gate: its
        # retries and its relaunch after a preemption pass again, without a new round.
        self._passed: set[tuple[str, str]] = set()
        self._at_gate: set[tuple[str, str]] = set()  # (state, run id) waiting for a full round
        # (state, run id) -> the timer of its current round, started by the round's first
        # arrival, for a BARRIER with a wait_timeout: the state may be held by a join
        # (DESIGN item 3) until every branch has ended, and a branch that hangs would keep
        # it from the gate for good.
        self._rounds: dict[tuple[str, str], asyncio.Task[None]] = {}

    def owner(self, state: str, run_id: str, attempt: int) -> str:
        return attempt_owner(self.agent.name, run_id, state, attempt)

    async def acquire(self, state: str, run_id: str, attempt: int) -> None:
        agent = self.agent
        coordinator = agent._coordinator
        owner = self.owner(state, run_id, attempt)
        set_current_owner(owner, coordinator)
        held = None
        primitive = coordinator.primitive(state) if state in agent._coordinated_states else None
        if primitive is not None:
            if isinstance(primitive, Barrier):
                if (state, run_id) not in self._passed:
                    key = (state, run_id)
                    self._at_gate.add(key)
                    self._waiting(state, f"coordination: BARRIER {state!r} ({primitive.max_count} arrivals)")
                    asyncio.get_running_loop().call_soon(self._check_gates, run_id)
                    admission_held_up()
                    try:
                        await primitive.pass_when_full(owner, run_id)
                    finally:
                        self._at_gate.discard(key)
                    self._passed.add(key)
            else:
                amount = agent._coordinated_states[state]
                if not primitive.try_acquire(owner, amount):  # type: ignore[attr-defined]
                    coordinator.watch()  # about to wait: make sure deadlocks are looked for
                    self._waiting(state, f"coordination: {primitive.type.name} {state!r}")
                    admission_held_up()
                    await primitive.acquire(owner, amount)  # type: ignore[attr-defined]
                held = _Held(primitive, owner, amount)
        limiter = coordinator.rate_limiter(state) if state in agent._rate_limited_states else None
        if limiter is not None:
            self._waiting(state, f"rate limit of {state!r}")
            if limiter.would_wait():
                admission_held_up()
            try:
                await limiter.acquire()
            except BaseException:
                if held is not None:
                    held.primitive.release(owner, held.amount)  # type: ignore[call-arg]
                raise
        if held is not None:
            self._held[(state, run_id, attempt)] = held

    def would_wait(self, state: str, run_id: str) -> bool:
        """Whether :meth:`acquire` would wait now: the engine then asks the pool for the
        state's resources only once it is let in (a barrier's arrivals always wait)."""
        agent = self.agent
        coordinator = agent._coordinator
        primitive = coordinator.primitive(state) if state in agent._coordinated_states else None
        if primitive is not None:
            if isinstance(primitive, Barrier):
                if (state, run_id) not in self._passed:
                    return True
            else:
                peek = getattr(primitive, "would_wait", None)  # (agentd's is asked over its connection)
                if peek is None or peek(agent._coordinated_states[state]):
                    return True
        limiter = coordinator.rate_limiter(state) if state in agent._rate_limited_states else None
        return limiter is not None and limiter.would_wait()

    def _waiting(self, state: str, why: str) -> None:
        """Say what the state waits for (the run clears it once the state is let in)."""
        meta = self.agent.state_metadata.get(state)
        if meta is not None:
            meta.waiting_for = why

    async def release(self, state: str, run_id: str, attempt: int, ok: bool) -> None:
        held = self._held.pop((state, run_id, attempt), None)
        if held is not None:
            held.primitive.release(held.owner, held.amount)  # type: ignore[call-arg]

    def observe(self, event: ev.RunEvent) -> None:
        """Count hand-overs to barrier-guarded states; forget a run's barrier rounds at its end."""
        agent = self.agent
        kind = event.kind
        if self._at_gate and kind in _ACTIVATION_ENDS:
            asyncio.get_running_loop().call_soon(self._check_gates, event.run_id)  # once the engine moved on
        if self._passed and (kind in _ACTIVATION_ENDS and (kind != ev.STATE_FAILED or event.data.get("final"))):
            self._passed.discard((event.state or "", event.run_id))  # the next activation waits for a round
        if kind == ev.STATE_COMPLETED:
            for name in event.data.get("next", ()):
                if name in agent._coordinated_states:
                    primitive = agent._coordinator.primitive(name)
                    if isinstance(primitive, Barrier):
                        primitive.arrive(self.owner(event.state or "?", event.run_id, event.attempt), event.run_id)
                        self._time_round(primitive, name, event.run_id)
        elif kind == ev.RUN_FINISHED:
            self._passed = {key for key in self._passed if key[1] != event.run_id}
            for key in [key for key in self._rounds if key[1] == event.run_id]:
                self._rounds.pop(key).cancel()
            for name in agent._coordinated_states:
                primitive = agent._coordinator.primitive(name)
                if isinstance(primitive, Barrier):
                    primitive.forget(event.run_id)

    def _time_round(self, primitive: Barrier, state: str, run_id: str) -> None:
        """After an arrival: a round's first arrival starts its ``wait_timeout``; a full one ends it."""
        key = (state, run_id)
        arrived = primitive.arrived(run_id)
        if arrived == 0:  # it just filled
            timer = self._rounds.pop(key, None)
            if timer is not None:
                timer.cancel()
        elif arrived == 1 and primitive.wait_timeout is not None and not math.isinf(primitive.wait_timeout):
            self._rounds[key] = asyncio.ensure_future(self._expire(primitive, state, run_id, primitive.wait_timeout))

    async def _expire(self, primitive: Barrier, state: str, run_id: str, limit: float) -> None:
        """``limit`` after a round's first arrival, the round is not full: unless the state
        is at the gate already (which times its own wait), the run fails saying how many
        arrived."""
        await primitive.clock.sleep(limit)
        key = (state, run_id)
        self._rounds.pop(key, None)
        run = self.agent._run
        if key in self._at_gate or key in self._passed or run is None or run.run_id != run_id or run.done:
            return
        message = primitive._short_message(primitive.arrived(run_id), limit, f"of the first, so {state!r} cannot start")
        run.fail_unstarted(state, CoordinationTimeoutError(message))
        run.kick()

    def _check_gates(self, run_id: str) -> None:
        """Fail the barrier waits of run ``run_id`` when nothing else of it could arrive."""
        waiting = [state for state, run in self._at_gate if run == run_id]
        run = self.agent._run
        if not waiting or run is None or run.run_id != run_id or run.done:
            return
        if any((act.state, run_id) not in self._at_gate for act in run.live.values()):
            return  # something else of the run is still on its way
        for state in waiting:
            primitive = self.agent._coordinator.primitive(state)
            if isinstance(primitive, Barrier):
                primitive.give_up(run_id)


class CoordinatedAgent(Agent):
    """An Agent with per-state coordination primitives and rate limits."""

    def __init__(self, name: str, *, coordinator: Coordinator | None = None, **agent_kwargs: Any) -> None:
        if coordinator is not None:  # checked first: a refused agent registers nothing
            check_coordinator(coordinator, "CoordinatedAgent")
        super().__init__(name, **agent_kwargs)
        self._coordinator = coordinator if coordinator is not None else default_coordinator()
        self._coordinated_states: dict[str, float] = {}  # state -> amount drawn per attempt
        self._rate_limited_states: set[str] = set()
        self._admission = _Admission(self)
        self.add_admission_hook(self._admission)
        self.add_observer(self._admission.observe)

    def add_state_rate_limit(
        self,
        state: str,
        max_rate: float,
        strategy: RateLimitStrategy | str = RateLimitStrategy.TOKEN_BUCKET,
        burst_size: int | float | None = None,
        window_size: float = 1.0,
    ) -> None:
        """Limit how often ``state`` may start: ``max_rate`` starts per second, by ``strategy``.

        TOKEN_BUCKET allows bursts of ``burst_size`` (the only strategy that takes one);
        LEAKY_BUCKET spaces starts evenly; SLIDING_WINDOW / FIXED_WINDOW allow
        ``floor(max_rate * window_size)`` starts per ``window_size`` seconds, which must
        be at least one. The limit is keyed by the state's name and shared by every agent
        of the coordinator: declaring it again with the same settings shares it, other
        settings are refused while another live agent declares it (CoordinationError).
        """
        self._check_name(state)
        self._coordinator.add_rate_limit(
            state, max_rate, strategy, burst_size=burst_size, window_size=window_size, declarer=self,
        )
        self._rate_limited_states.add(state)

    def remove_state_rate_limit(self, state: str) -> None:
        """Stop limiting ``state`` in this agent and withdraw its declaration of the limit.

        The limiter itself stays for the other agents that declare it; once none does,
        the name may be limited with other settings.
        """
        self._rate_limited_states.discard(state)
        self._coordinator.withdraw_rate_limit(state, self)

    def add_state_coordination(
        self,
        state: str,
        primitive_type: PrimitiveType | str,
        ttl: float | None = None,
        max_count: int | None = None,
        quota_limit: float | None = None,
        wait_timeout: float | None = None,
        amount: float = 1.0,
    ) -> None:
        """Put ``state`` under a MUTEX, SEMAPHORE(max_count), BARRIER(max_count), LEASE(ttl) or QUOTA(quota_limit).

        ``ttl`` takes the primitive away from an attempt that keeps it longer (a holder
        that hangs; for a QUOTA too: each attempt's draw is given back when the attempt
        ends, and ``ttl`` only bounds how long one draw can count); ``wait_timeout``
        bounds the wait for admission (then the attempt fails with
        CoordinationTimeoutError and may be retried); ``amount`` is what one attempt
        draws from a QUOTA or SEMAPHORE. The primitive is keyed by the state's name and
        shared by every agent of the coordinator: declaring it again with the same
        settings shares it, other settings are refused while another live agent
        declares it (CoordinationError).
        """
        self._check_name(state)
        amount = _validate.number(amount, f"state {state!r}: amount", error=CoordinationError,  # type: ignore[assignment]
                                  above=True)
        kind = primitive_type_of(primitive_type)
        if amount != 1 and kind not in (PrimitiveType.QUOTA, PrimitiveType.SEMAPHORE):
            raise CoordinationError(
                f"state {state!r}: amount is what an attempt draws from a QUOTA or SEMAPHORE; a "
                f"{kind.name} {'counts arrivals' if kind is PrimitiveType.BARRIER else 'has one holder'}: "
                "leave amount out"
            )
        limit = quota_limit if kind is PrimitiveType.QUOTA else (
            max_count if kind is PrimitiveType.SEMAPHORE else None)
        # A limit that is no limit (0, negative) is refused by the coordinator, saying so.
        if isinstance(limit, (int, float)) and not isinstance(limit, bool) and 0 < limit < amount:
            raise CoordinationError(
                f"state {state!r}: each attempt would draw {amount:g} of {kind.name} {state!r}, "
                f"which holds only {limit:g}: lower amount"
            )
        self._coordinator.add_primitive(
            state,
            kind,
            ttl=ttl,
            max_count=max_count,
            quota_limit=quota_limit,
            wait_timeout=wait_timeout,
            declarer=self,
        )
        self._coordinated_states[state] = float(amount)

    def remove_state_coordination(self, state: str) -> None:
        """Stop guarding ``state`` in this agent and withdraw its declaration of the primitive.

        The primitive itself stays for the other agents that declare it (and for state
        code that takes it by name); once none declares it, the name may be coordinated
        with other settings. An attempt already admitted keeps what it holds until it ends.
        """
        self._coordinated_states.pop(state, None)
        self._coordinator.withdraw_primitive(state, self)

    async def get_coordination_status(self) -> dict[str, Any]:
        """The coordinator's status: ``primitives``, ``rate_limiters``, ``deadlock_detector``."""
        status = self._coordinator.get_status()
        status["agent"] = {
            "name": self.name,
            "coordinated_states": sorted(self._coordinated_states),
            "rate_limited_states": sorted(self._rate_limited_states),
        }
        return status

    async def reset_coordination(self) -> None:
        """Release every holding and fail every waiter of this agent's primitives; limiters start afresh."""
        self._coordinator.reset(sorted(set(self._coordinated_states) | self._rate_limited_states))

    @staticmethod
    def _check_name(state: str) -> None:
        if not isinstance(state, str) or not state:
            raise CoordinationError(f"a coordinated state needs a non-empty str name, got {state!r}")


def create_coordinated_agent(name: str, **agent_kwargs: Any) -> CoordinatedAgent:
    """A new :class:`CoordinatedAgent` (``coordinator=`` and every ``Agent`` keyword accepted)."""
    if agent_kwargs.get("coordinator") is not None:
        check_coordinator(agent_kwargs["coordinator"], "create_coordinated_agent")
    return CoordinatedAgent(name, **agent_kwargs)


def enhance_agent(agent: Agent, *, coordinator: Coordinator | None = None) -> CoordinatedAgent:
    """A CoordinatedAgent with ``agent``'s configuration, states, observers and hooks.

    ``agent`` itself is left as it was (nothing is patched onto it); use the returned
    agent from now on. A CoordinatedAgent is returned as it is.
    """
    if coordinator is not None:
        check_coordinator(coordinator, "enhance_agent")
    if isinstance(agent, CoordinatedAgent):
        return agent
    if not isinstance(agent, Agent):
        raise CoordinationError(f"enhance_agent() takes an Agent, got {type(agent).__name__}")
    enhanced = CoordinatedAgent(agent.name, coordinator=coordinator, **agent._config)
    for spec in agent._states.values():
        enhanced.add_state(
            spec.name,
            spec.func,
            dependencies=dict(spec.dependencies),
            resources=spec.resources,
            retry_policy=spec.retry_policy,
            max_retries=spec.max_retries,
            isolation=spec.isolation,
            timeout=spec.timeout,
            priority=spec.priority,
            next_states=spec.next_states,
            on_failure=spec.on_failure,
            context_keys=spec.context_keys,
        )
    for observer in agent._observers:
        enhanced.add_observer(observer)
    for hook in agent._admission_hooks:
        enhanced.add_admission_hook(hook)
    for key in agent.context.keys():
        enhanced.context.set_state(key, agent.context.get_state(key))
    return enhanced
