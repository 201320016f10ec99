"""One execution of an agent's states, from start to a terminal status (DESIGN.md "Execution semantics").

``Run`` is the only owner of a run's queues: what is ready, queued in the pool,
running, waiting on dependencies, sleeping before a retry, paused or held for a join.
Everything that changes them is a method here; the :class:`~agent.agent.Agent` facade
and the :mod:`~agent.engine.driver` call those methods and never edit the queues.

**Joins (dataflow).** A run is a tree of *groups*: the run itself is the root group,
and a state that returns a list opens a child group (a fan-out) whose branches are the
listed states. A name returned by a branch starts at once, continuing that branch,
unless something else in the branch's group (another branch still running, directly or
through nested fan-outs, or a name already held there) could still return it,
directly or through the states it leads to (:class:`~agent.workflow.ReturnGraph`; in a
fan-out, never through the state that opened it: running that again starts a new round,
which joins on its own), or, failing that, something in a group above, outside the branch. Then the name is *held*
in that group and runs **once**, when nothing else in the group can return it any
more. A group whose branches have all ended or met in one name has joined: that name
continues the branch that opened the group, one level up. So
``[a, b]`` where both return ``"merge"`` runs ``merge`` once, after both; a fast branch
never waits for a slow sibling that cannot meet it; and nested fan-outs join at their
own level first. What each activation could return is only worked out once a group
has more than one thing in it, so a plain chain pays nothing for it.

**Admission.** States without ``ResourceRequirements`` start as soon as
``max_concurrent`` allows. States with them are admitted by the pool's one queue
(:mod:`~agent.engine.admission`), shared with every other run of the pool, which wakes
this run through :meth:`Run.on_grant`.
"""

from __future__ import annotations

import contextvars
import logging
import time
import weakref
from collections import deque
from typing import TYPE_CHECKING, Any, Final

from .. import events as ev
from .. import values
from .._types import StopReason
from ..dependencies import DependencyLifecycle as Life
from ..dependencies import DependencyType as Dep
from ..errors import (
    AgentError,
    DependencyTimeoutError,
    FailureReason,
    InvalidTransitionError,
    MaxStepsExceededError,
    QuotaExceededError,
    RunTimeoutError,
    StateFailedError,
    StateTimeoutError,
    UnknownNextStateError,
    exception_type_name,
)
from ..executor import Attempt, Isolation
from ..scope import ScopedContext, scope_for
from ..state import HISTORY_LIMIT, AttemptRecord, StateMetadata
from ..status import AgentStatus, StateStatus
from .admission import Admission, Admitter
from ..workflow import cannot_suspend, uses_an_agent
from .driver import Driver, Returned, exception_reason, inline_runner

_NO_USAGE: Final[dict[str, Any]] = {}  # what an inline attempt measured (nothing); never written to
_monotonic: Final = time.monotonic
_time: Final = time.time
_proxy: Final = weakref.proxy
_ProxyType: Final = weakref.ProxyType

if TYPE_CHECKING:
    from ..agent import Agent
    from ..context import Context
    from ..retry import RetryPolicy
    from ..workflow import ReturnGraph, StateSpec

# Enum members as module names: reading a member from its class goes through the enum
# metaclass's __getattr__ hook in CPython 3.11, which is slow on the hot path.
_BLOCKED: Final = StateStatus.BLOCKED
_CANCELLED: Final = StateStatus.CANCELLED
_COMPLETED: Final = StateStatus.COMPLETED
_FAILED: Final = StateStatus.FAILED
_PENDING: Final = StateStatus.PENDING
_READY: Final = StateStatus.READY
_RUNNING: Final = StateStatus.RUNNING
_TIMEOUT: Final = StateStatus.TIMEOUT
_STOP_CANCEL: Final = StopReason.CANCEL
_STOP_PAUSE: Final = StopReason.PAUSE
_STOP_PREEMPT: Final = StopReason.PREEMPT
_STOP_TIMEOUT: Final = StopReason.TIMEOUT
_INLINE: Final = Isolation.INLINE
_SANDBOX: Final = Isolation.SANDBOX
# The agent's own levels at which a state gets copies of what its code uses; a state that
# uses an agent then runs inline unless add_state() chose its isolation.
_BY_COPY: Final = frozenset((Isolation.PROCESS, Isolation.WORKER))

_FINISHED_FOR_GOOD: Final = (_FAILED, _TIMEOUT, _CANCELLED, _BLOCKED)
_PAUSED_WAIT: Final = "the run to resume: it is paused"
_CONDITION_POLL: Final = 0.05
"""Seconds between two looks at a dependency condition that did not hold: it may read
anything (the context as a state writes it, a file), so nothing else says when it changes."""
_HELD: Final = "its fan-out's branches that may still return it (a join)"  # what a held join waits for
_RUN_COMPLETED: Final = AgentStatus.COMPLETED
_RUN_FAILED: Final = AgentStatus.FAILED
_RUN_CANCELLED: Final = AgentStatus.CANCELLED
# Names from interpreted modules used per state or per run: a Final name is a C static
# here, any other global a dictionary lookup at each use.
_Returned: Final = Returned
_inline_runner: Final = inline_runner
_copy_context: Final = contextvars.copy_context
_deque: Final = deque

# Where an activation is (Activation.where).
NEW: Final = 0
READY: Final = 1
QUEUED: Final = 2
GRANTED: Final = 3
RUNNING: Final = 4
WAITING: Final = 5
RETRYING: Final = 6
PAUSED: Final = 7
GONE: Final = 8


class Activation:
    """One scheduled run of a state within a run (retries are further attempts of it).

    Attributes that most activations never change are class-level defaults, so making
    one (once per state started: the hot path) sets only what differs.
    """

    attempt = 0
    via_dependency = False
    waiting_since = 0.0
    task: Any = None
    stop_reason: StopReason | None = None
    started_at = 0.0
    timer: Any = None
    attempt_obj: Attempt | None = None
    where = NEW
    front = False  # requeued after a preemption: ahead of its level
    holds = False  # holds a grant from the pool
    regrant: Any = None  # gave its grant back while its admission hooks waited (True), then the wait for it again
    counted = False  # its start is counted (once, whatever retries or restarts follow)
    reach: frozenset[str] | None  # what it could return (ReturnGraph.reach), once a run tracks joins

    def __init__(self, aid: int, state: str, priority: int, group: "Group") -> None:
        self.id = aid
        self.state = state
        self.owner = state  # the pool key, qualified when another run uses the same name
        self.priority = priority
        self.group = group

    def __repr__(self) -> str:
        return f"<Activation {self.state!r} #{self.id} attempt {self.attempt}>"


class Group:
    """The root of a run, or a fan-out: branches, names held for their join, what lies below."""

    __slots__ = ("id", "parent", "opener", "unfinished", "held", "items", "pot", "wild", "held_pot", "held_wild",
                 "cancelled")

    def __init__(self, gid: int, parent: "Group | None", opener: str | None = None) -> None:
        self.id = gid
        self.parent = parent
        self.opener = opener  # the state that returned the fan-out (None: the run's own branches)
        self.unfinished = 0  # branches neither ended nor arrived at a held name
        self.held: dict[str, int] = {}  # name -> branches that arrived at it
        self.items = 0  # live activations and held names in this group and the groups below
        self.pot: dict[str, int] = {}  # name -> items below that could return it (once tracked)
        self.wild = 0  # items below whose returns cannot be read
        self.held_pot: dict[str, int] = {}  # the part of pot and wild due to this group's own holds
        self.held_wild = 0
        self.cancelled: set[str] | None = None  # held names cancelled here: branches reaching them end

    def chain(self) -> "list[Group]":
        out = []
        g: Group | None = self
        while g is not None:
            out.append(g)
            g = g.parent
        return out


class Run:
    """One execution of an agent's states, from start to a terminal status."""

    __slots__ = (
        "agent",
        "name",
        "run_id",
        "context",
        "observers",
        "cleanup_timeout",
        "clock",
        "specs",
        "metadata",
        "completed",
        "max_concurrent",
        "max_steps",
        "hooks",
        "default_isolation",
        "human_for",
        "sessions",
        "wall_offset",
        "caller_context",
        "runner",
        "unstarted",
        "started",
        "_driver",
        "_next_id",
        "_admission",
        "loop",
        "ready",
        "n_ready",
        "granted",
        "queued",
        "pooled",
        "running",
        "current",
        "retrying",
        "paused",
        "root",
        "groups",
        "live",
        "live_states",
        "held_names",
        "graph",
        "completions",
        "tracks_deps",
        "waiting",
        "watch",
        "chain_lengths",
        "touched",
        "touched_all",
        "dependents",
        "timed",
        "declared_at",
        "consumed",
        "finishes",
        "starts",
        "last_completion",
        "last_start",
        "rechecks",
        "polling",
        "steps",
        "error",
        "failures",
        "failed_after",
        "failed_frames",
        "failed_groups",
        "done",
        "final_status",
        "pause_requested",
        "paused_at",
        "paused_total",
        "pumping",
    )

    def __init__(
        self,
        agent: "Agent",
        run_id: str,
        context: "Context",
        observers: tuple[ev.Observer, ...],
        cleanup_timeout: float,
    ) -> None:
        self.agent = agent
        self.name = agent.name
        self.run_id = run_id
        self.context = context
        context._failures = {}  # shared by every view of this run: context.failed_states()
        self.observers = observers
        self.cleanup_timeout = cleanup_timeout
        self.clock = _monotonic
        self.specs: dict[str, StateSpec] = agent._states
        self.metadata = agent.state_metadata
        self.completed = agent.completed_states
        self.max_concurrent = agent.max_concurrent
        self.max_steps = agent.max_steps
        self.hooks = agent._admission_hooks
        self.default_isolation = agent.isolation
        self.human_for = agent._human_hook
        self.sessions = agent._session_completions
        self.started = started = _monotonic()
        self.wall_offset = _time() - started  # wall time = offset + the run's clock
        # The context variables of run()'s caller: each attempt's task runs in a copy of them.
        self.caller_context = _copy_context()
        self.runner: Any = None  # steps the inline states that cannot suspend (driver.inline_runner)
        self.unstarted: set[Any] = set()  # tasks of inline attempts whose first line has not run yet
        self._driver: Driver | None = None  # made when something must wait on the loop
        self._next_id = 1  # activations and groups
        self._admission: Admitter | None = None
        self.loop: Any = None  # the event loop it runs on, once admission asked (agent.engine.admission)
        # The queues (see the module docstring). ``running`` is keyed by state: a state
        # never runs concurrently with itself within a run.
        # Ready activations, one FIFO per priority (index = Priority value, made on first
        # use); ``n_ready`` in all.
        self.ready: list[deque[Activation] | None] = [None, None, None, None]
        self.n_ready = 0
        self.granted: list[Activation] = []
        self.queued: dict[str, Activation] = {}  # by pool owner key
        self.pooled: dict[str, None] = {}  # states queued in or granted by the pool, not started yet
        self.running: dict[str, Activation] = {}
        # Each state's activation from its launch until it ends for good (its retries and
        # restarts included): another activation of the state waits for it.
        self.current: dict[str, Activation] = {}
        self.retrying: dict[int, Activation] = {}  # sleeping before a retry
        self.paused: list[Activation] = []
        # Joins: the group tree, live activations, what they could return.
        self.root = root = Group(0, None)
        self.groups: dict[int, Group] = {0: root}
        self.live: dict[int, Activation] = {}
        self.held_names: dict[str, int] = {}  # name -> groups holding it
        self.graph: ReturnGraph | None = None  # set once a join needs it
        self.completions: dict[str, int] = {}
        # Dependencies: their bookkeeping exists only in a run with dependencies
        # (track_dependencies); until then these are empty and never written.
        self.tracks_deps = False
        self.waiting: list[Activation] = []  # whose dependencies are not met
        self.watch: set[str] = set()  # dependency-driven states not (re)triggered yet
        self.chain_lengths: dict[str, int] = {}  # chain_length's, found so far
        # Which watched states to look at (see _watched_to_look_at): those depending on a
        # state touched since the last look, or everyone.
        self.touched: set[str] = set()
        self.touched_all = True
        self.dependents: dict[str, list[str]] | None = None  # who depends on each state
        self.timed: set[str] = set()  # whose dependencies also move with time or conditions
        self.declared_at: dict[str, int] = {}  # each state's place in the order they were added
        if agent._has_dependencies:
            self.track_dependencies()
        # Outcome.
        self.steps = 0
        self.error: BaseException | None = None
        self.failures: dict[str, FailureReason] = {}  # failed for good under on_failure="continue"
        self.failed_after: dict[str, int] = {}  # the attempts of each, kept from a later activation's
        self.failed_frames: list[dict[str, Any]] = []  # what a resume of a failed run re-runs
        self.failed_groups: list[dict[str, Any]] | None = None  # and the groups they were in, then
        self.done = False
        self.final_status = _RUN_COMPLETED
        self.pause_requested = False
        self.paused_at: float | None = None  # when the pause under way began
        self.paused_total = 0.0  # seconds paused before it: dependency timeouts do not count them
        self.pumping = False

    def track_dependencies(self) -> None:
        """Keep the bookkeeping dependencies need (a state with dependencies exists)."""
        if self.tracks_deps:
            return
        self.tracks_deps = True
        self.waiting = []
        self.watch = set()
        self.touched_all = True
        self.live_states: dict[str, int] = {}  # name -> its live activations
        for act in self.live.values():
            self.live_states[act.state] = self.live_states.get(act.state, 0) + 1
        self.consumed: dict[tuple[str, str], int] = {}
        # Starts, finishes and their times matter only to dependencies.
        self.finishes: dict[str, int] = {}
        self.starts: dict[str, int] = {}
        self.last_completion: dict[str, float] = {}
        self.last_start: dict[str, float] = {}
        self.rechecks: set[float] = set()
        self.polling = False  # a look at conditions that did not hold is due (_poll_conditions)

    @property
    def log(self) -> logging.Logger:
        return self.agent._log

    @property
    def default_on_failure(self) -> str:
        return self.agent.on_failure

    @property
    def driver(self) -> Driver:
        """The run's asyncio side, made on first use: a run whose states never await needs none."""
        driver = self._driver
        if driver is None:
            driver = self._driver = Driver(self)
        return driver

    def new_id(self) -> int:
        aid = self._next_id
        self._next_id = aid + 1
        return aid

    # --- events ---------------------------------------------------------------------

    def emit(self, kind: str, state: str | None = None, **fields: Any) -> None:
        if not self.observers:
            return
        event = ev.RunEvent(kind=kind, agent_name=self.name, run_id=self.run_id, state=state, **fields)
        for observer in self.observers:
            try:
                observer(event)
            except Exception:  # an observer must never break a run
                self.observers = tuple(o for o in self.observers if o is not observer)
                self.log.exception("observer %r raised and was detached", observer)

    @property
    def admission(self) -> Admitter:
        if self._admission is None:
            self._admission = Admission.of(self.agent.resource_pool)
        return self._admission

    # --- activations ----------------------------------------------------------------

    def start(self, names: list[str]) -> None:
        """Schedule the start states and watch every dependency-driven state."""
        if self.observers:
            self.emit(ev.RUN_STARTED)
        if self.tracks_deps:
            for name, spec in self.specs.items():
                if spec.dependencies and name not in names:
                    self.watch.add(name)
                    self.add_dependency_timers(name, self.started)
        if len(names) > 1:
            names = list(dict.fromkeys(names))
        self.root.unfinished += len(names)
        for name in names:
            self.activate(name, self.root)

    def activate(self, name: str, group: Group, *, via_dependency: bool = False,
                 attempt: int = 0) -> Activation | None:
        """A new live activation of ``name`` in ``group`` (whose branch the caller counted)."""
        if self.done:
            return None
        spec = self.specs[name]
        self.steps += 1
        if self.max_steps is not None and self.steps > self.max_steps:
            self.fail(MaxStepsExceededError(
                f"run exceeded max_steps={self.max_steps} state activations (last: {name!r}); "
                "a state probably loops forever: add an exit condition or raise Agent(max_steps=...)"
            ))
            return None
        aid = self._next_id
        self._next_id = aid + 1
        priority = spec.priority._value_
        act = Activation(aid, name, priority, group)
        if via_dependency:
            act.via_dependency = True
        if attempt:
            act.attempt = attempt
        # It is live: it counts for joins.
        self.live[act.id] = act
        if self.tracks_deps:
            live_states = self.live_states
            live_states[name] = live_states.get(name, 0) + 1
            self.touched.add(name)
        g: Group | None = group
        if self.graph is None:
            while g is not None:
                g.items += 1
                g = g.parent
        else:  # _count(group, name, 1), inlined into the same walk up the groups
            graph = self.graph
            act.reach = full = graph.reach(name)
            while g is not None:
                g.items += 1
                opener = g.opener  # each fan-out counts what the item reaches in its own round
                reach = full if opener is None or (full is not None and opener not in full) else graph.reach_within(
                    name, opener)
                if reach is None:
                    g.wild += 1
                else:
                    pot = g.pot
                    for target in reach:
                        pot[target] = pot.get(target, 0) + 1
                g = g.parent
        # While another activation of the state is current (running, or between its
        # attempts), this one waits for it (launch_ready) and the state's metadata goes on
        # describing that one until it ends.
        meta = None if name in self.current else self.metadata[name]
        if meta is not None:
            meta.attempts = attempt
            if meta.error is not None or meta.blocked_reason is not None:
                meta.error = meta.blocked_reason = None
        if spec.dependencies and not via_dependency:
            if meta is not None:
                self.set_status(meta, _PENDING)
                meta.waiting_for = "dependencies"
            act.where = WAITING
            act.waiting_since = self.clock()
            self.waiting.append(act)
            self.add_dependency_timers(name, act.waiting_since)
            return act
        # make_ready(act), inlined: the hot path (READY is allowed after every status).
        if meta is not None:
            meta.status = _READY
            if meta.waiting_for is not None:
                meta.waiting_for = None
        act.where = READY
        level = self.ready[priority]
        if level is None:
            level = self.ready[priority] = _deque()
        level.append(act)
        self.n_ready += 1
        return act

    def make_ready(self, act: Activation) -> None:
        if self.current.get(act.state, act) is act:  # else its metadata is the current activation's
            meta = self.metadata[act.state]
            self.set_status(meta, _READY)
            meta.waiting_for = None
        act.where = READY
        self._ready_level(act.priority).append(act)
        self.n_ready += 1

    def _ready_level(self, priority: int) -> deque[Activation]:
        level = self.ready[priority]
        if level is None:
            level = self.ready[priority] = _deque()
        return level

    # --- joins ----------------------------------------------------------------------------

    def _leave(self, act: Activation) -> None:
        """``act`` has ended or moved on: it no longer counts for joins."""
        if self.live.pop(act.id, None) is None:
            return
        act.where = GONE
        name = act.state
        if self.current.get(name) is act:
            del self.current[name]
        if self.tracks_deps:
            left = self.live_states[name] - 1
            if left:
                self.live_states[name] = left
            else:
                del self.live_states[name]
            self.touched.add(name)
        g: Group | None = act.group
        if self.graph is None:
            while g is not None:
                g.items -= 1
                g = g.parent
        else:  # _count(act.group, act.state, -1), inlined into the same walk up the groups
            graph = self.graph
            full = act.reach
            while g is not None:
                g.items -= 1
                opener = g.opener
                reach = full if opener is None or (full is not None and opener not in full) else graph.reach_within(
                    name, opener)
                if reach is None:
                    g.wild -= 1
                else:
                    pot = g.pot
                    for target in reach:
                        pot[target] = pot.get(target, 0) - 1
                g = g.parent

    def _hold(self, group: Group, name: str) -> None:
        group.held[name] = 1
        self.held_names[name] = self.held_names.get(name, 0) + 1
        if self.tracks_deps:
            self.touched.add(name)
        meta = self.metadata[name]
        if meta.waiting_for is None and meta.status is _PENDING:
            meta.waiting_for = _HELD
        for g in group.chain():
            g.items += 1
        if self.graph is not None:
            self._count(group, name, 1)
            self._count_held(group, self.graph.reach_within(name, group.opener), 1)

    def _unhold(self, group: Group, name: str) -> int:
        arrivals = group.held.pop(name)
        left = self.held_names[name] - 1
        if self.tracks_deps:
            self.touched.add(name)
        if left:
            self.held_names[name] = left
        else:
            del self.held_names[name]
            meta = self.metadata[name]
            if meta.waiting_for == _HELD:
                meta.waiting_for = None
        for g in group.chain():
            g.items -= 1
        if self.graph is not None:
            self._count(group, name, -1)
            self._count_held(group, self.graph.reach_within(name, group.opener), -1)
        return arrivals

    def _track(self) -> None:
        """Start counting what everything live or held could return (a group has company now)."""
        self.graph = graph = self.agent._return_graph()
        count = self._count
        # Counted per (group, state), not per activation: a fan-out's branches share both.
        tally: dict[tuple[Group, str], int] = {}
        for act in self.live.values():
            act.reach = graph.reach(act.state)
            key = (act.group, act.state)
            tally[key] = tally.get(key, 0) + 1
        for (group, name), n in tally.items():
            count(group, name, n)
        for group in self.groups.values():
            for name in group.held:
                count(group, name, 1)
                self._count_held(group, graph.reach_within(name, group.opener), 1)

    def retrack(self) -> None:
        """The workflow changed mid-run (a state was added): count what is reachable anew."""
        self.chain_lengths.clear()
        self.dependents = None
        self.touched_all = True
        if self.graph is not None:
            for group in self.groups.values():
                group.pot.clear()
                group.held_pot.clear()
                group.wild = group.held_wild = 0
            self._track()

    def _count_held(self, group: Group, reach: frozenset[str] | None, delta: int) -> None:
        if reach is None:
            group.held_wild += delta
            return
        pot = group.held_pot
        for target in reach:
            pot[target] = pot.get(target, 0) + delta

    def _count(self, group: Group, name: str, delta: int) -> None:
        """Count an item ``name`` in ``group`` and those above, each by what it could return
        in that group's round (:meth:`~agent.workflow.ReturnGraph.reach_within`)."""
        graph = self.graph
        g: Group | None = group
        while g is not None:
            reach = graph.reach_within(name, g.opener)  # type: ignore[union-attr]
            if reach is None:
                g.wild += delta
            else:
                pot = g.pot
                for target in reach:
                    pot[target] = pot.get(target, 0) + delta
            g = g.parent

    def _reachable(self, group: Group, name: str) -> bool:
        """Whether another branch of ``group`` could still return ``name``, handed over by one.

        What counts is what the other branches still run, and the names held here that could
        return ``name`` and that ``name`` could not return: such a name runs first (as soon
        as nothing can return it, which may be now: the branch that handed ``name`` over was
        its last). Two that could return each other are a tie the held one loses: it waits
        for the branches still running, ``name`` among them. (For a held name, see
        :meth:`_release_held`.)
        """
        if group.items <= 0:
            return False
        if self.graph is None:
            self._track()
        if group.wild - group.held_wild > 0 or group.pot.get(name, 0) - group.held_pot.get(name, 0) > 0:
            return True  # a branch still running
        if group.held_wild <= 0 and group.held_pot.get(name, 0) <= 0:
            return False
        graph = self.graph
        reach = graph.reach_within(name, group.opener)  # type: ignore[union-attr]
        for held in group.held:
            returns = graph.reach_within(held, group.opener)  # type: ignore[union-attr]
            if (returns is None or name in returns) and reach is not None and held not in reach:
                return True
        return False

    def hand_over(self, group: Group, names: str | list[str], opener: str | None = None) -> None:
        """A branch of ``group`` returned ``names`` (see the module docstring); ``opener``:
        the state that returned them."""
        if type(names) is list:
            if len(names) > 1:  # a fan-out: each name starts at once as a branch of a new group,
                # but one held above, or that something above, outside this branch, is known to
                # return (its readable returns name it), meets it there, as a single name would
                # (a sibling whose returns cannot be read does not hold a name listed here).
                child = Group(self.new_id(), group, opener)
                self.groups[child.id] = child
                child.unfinished = len(names)
                met = False
                # Looked for before any of them is counted: a sibling listed here that leads to
                # a name only through the opener (a new round) must not hold it above.
                outers = [self._join_above(child, name, wild=False) for name in names]
                for name, outer in zip(names, outers):
                    if outer is not None:
                        self._meet_above(outer, name)
                        child.unfinished -= 1
                        met = True
                    elif self.activate(name, child) is None:
                        return
                if met or self.held_names:  # the branch that left may have been all that could return one
                    self.settle(child)
                return
            name = names[0]
        else:
            name = names  # type: ignore[assignment]
        while True:
            if name in group.held:
                group.held[name] += 1
                group.unfinished -= 1
                self.settle(group)
                return
            if group.cancelled is not None and name in group.cancelled:  # its join was cancelled
                group.unfinished -= 1
                self.settle(group)
                return
            if self._reachable(group, name):
                self._hold(group, name)
                group.unfinished -= 1
                self.settle(group)
                return
            if group.unfinished == 1 and not group.held and group.parent is not None:
                group = self._joined(group)  # the last branch continues the one that opened it
                continue
            outer = self._join_above(group, name) if group.parent is not None else None
            if outer is None:
                self.activate(name, group)
                if self.held_names:  # the branch that ended may have been all that could return them,
                    self.settle(group)  # here or in a group above
                return
            self._meet_above(outer, name)
            group.unfinished -= 1
            self.settle(group)
            return

    def _meet_above(self, outer: Group, name: str) -> None:
        """A branch below ``outer`` reached ``name``, which waits in ``outer``: that branch
        ends here; the branch of ``outer`` it is part of goes on (its other parts may still
        run), so ``outer`` counts no arrival."""
        if name in outer.held:
            outer.held[name] += 1
        elif outer.cancelled is None or name not in outer.cancelled:
            self._hold(outer, name)

    def _join_above(self, group: Group, name: str, wild: bool = True) -> Group | None:
        """The nearest group above ``group`` where ``name``, handed over by a branch of
        ``group`` that nothing in ``group`` can meet, must wait: it is held or cancelled
        there, or something there outside ``group``'s branch could still return it (with
        ``wild`` false: is known to, by its readable returns)."""
        below = group
        g = group.parent
        while g is not None:
            if name in g.held or (g.cancelled is not None and name in g.cancelled):
                return g
            if g.items - len(g.held) - below.items > 0:
                if self.graph is None:
                    self._track()
                if ((wild and g.wild - g.held_wild - below.wild > 0)
                        or g.pot.get(name, 0) - g.held_pot.get(name, 0) - below.pot.get(name, 0) > 0):
                    return g
            below = g
            g = g.parent
        return None

    def _joined(self, group: Group) -> Group:
        del self.groups[group.id]
        return group.parent  # type: ignore[return-value]

    def branch_ends(self, act: Activation) -> None:
        """``act``'s branch ended without handing over (None, cancelled, blocked, failed)."""
        self._leave(act)
        group = act.group
        group.unfinished -= 1
        self.settle(group)

    def settle(self, group: Group) -> None:
        """After ``group`` lost something: start held names nothing can return any more, and
        close groups whose branches have all ended, here and in every group above."""
        g: Group | None = group
        while g is not None and not self.done:
            if g.held:
                self._release_held(g)
            parent = g.parent
            if g.unfinished == 0 and not g.held and parent is not None and g.id in self.groups:
                del self.groups[g.id]  # every branch ended: so has the branch that opened it
                parent.unfinished -= 1
            g = parent

    def _release_held(self, group: Group) -> None:
        """Start the names held in ``group`` that nothing else in it can return any more.

        For a held name, everything else in the group counts, the other held names too
        (one that leads to ``name`` runs first).
        """
        held = group.held
        if len(held) == 1 and group.items > 1 and self.graph is not None:
            # The common case (branches meeting in one name, others still on their way):
            # the loop below for one name, without copying the names.
            name = next(iter(held))
            reach = self.graph.reach_within(name, group.opener)
            if reach is None:
                if group.wild > 1 or group.pot.get(name, 0) > 0:
                    return
            elif group.wild > 0 or group.pot.get(name, 0) - (name in reach) > 0:
                return
        released = False
        for name in list(held):
            if name not in held:
                continue
            if group.items > 1:  # something besides ``name`` itself: could it return ``name``?
                graph = self.graph
                if graph is None:
                    self._track()
                    graph = self.graph
                reach = graph.reach_within(name, group.opener)  # type: ignore[union-attr]
                wild, pot = group.wild, group.pot.get(name, 0)
                if reach is None:
                    wild -= 1
                elif name in reach:
                    pot -= 1
                if wild > 0 or pot > 0:
                    continue
            self._start_held(group, name)
            released = True
            if self.done:
                return
        # Held names can only wait for each other (two that lead to each other): with
        # nothing else left in the group, the oldest starts, which breaks the tie.
        if not released and held and group.items == len(held):
            self._start_held(group, next(iter(held)))

    def _start_held(self, group: Group, name: str) -> None:
        self._unhold(group, name)
        group.unfinished += 1  # the branches that met in ``name`` continue as one
        if group.unfinished == 1 and not group.held and group.parent is not None:
            self.hand_over(self._joined(group), name)
        else:
            self.activate(name, group)

    # --- the pump --------------------------------------------------------------------

    def pump(self) -> None:
        """Do everything that can be done now, without awaiting."""
        if self.pumping:
            return
        self.pumping = True
        try:
            while not self.done:
                progressed = False
                if self.granted:
                    progressed = self.launch_granted()
                if self.waiting or self.watch:
                    progressed |= self.check_dependencies()
                if self.n_ready and not self.pause_requested:
                    progressed |= self.launch_ready()
                # A grant may have come meanwhile (a request this pass queued preempted one
                # granted to this run): it is launched on the next pass, not left for a kick.
                if not progressed and not self.granted and not self.check_quiescent():
                    break
        finally:
            self.pumping = False

    def kick(self) -> None:
        if not self.pumping and self._driver is not None:
            self._driver.kick()

    def on_grant(self, act: Activation) -> None:
        """The pool granted ``act``'s queued request (called while the pool settles)."""
        waiter = act.regrant
        if waiter is not None and waiter is not True:  # its grant again (grant_again)
            act.regrant = None
            act.holds = True
            if not waiter.done():
                waiter.set_result(None)
            return
        if self.queued.pop(act.owner, None) is not act:
            return
        act.holds = True
        act.where = GRANTED
        self.granted.append(act)
        self.kick()

    def launch_granted(self) -> bool:
        granted, self.granted = self.granted, []
        launched = False
        for act in granted:
            if self.done:
                break
            if act.where != GRANTED:  # preempted meanwhile (by a release this loop made): queued again
                continue
            if self.pause_requested:
                self.pooled.pop(act.state, None)
                self._release(act, {})
                self.hold_paused(act)
                continue
            launched = True
            self.launch(act)
        return launched

    def launch_ready(self) -> bool:
        """Start ready activations, highest priority first, first come first served within one."""
        launched = False
        deferred: list[Activation] = []
        levels = self.ready
        limit = self.max_concurrent
        running = self.running
        specs = self.specs
        while self.n_ready:
            if limit is not None and len(running) + len(self.queued) + len(self.granted) >= limit:
                currents = self.current
                why = f"max_concurrent={limit}"
                for act in self.ready_activations():
                    if currents.get(act.state, act) is act:  # else its metadata is the current one's
                        meta = self.metadata[act.state]
                        if meta.waiting_for != why:  # said once: the next pass finds it said
                            meta.waiting_for = why
                            if self.observers:
                                self.emit(ev.STATE_QUEUED, act.state, data={"waiting_for": why})
                break
            level = levels[3] or levels[2] or levels[1] or levels[0]
            act = level.popleft()  # type: ignore[union-attr]  # n_ready > 0: some level holds one
            self.n_ready -= 1
            name = act.state
            current = self.current.get(name)
            if (current is not None and current is not act) or name in self.pooled:
                # One at a time: it waits, and the state's metadata goes on describing the other.
                deferred.append(act)
                continue
            req = specs[name].resources
            # Its admission hooks would wait (a MUTEX held, say): the pool is asked once they
            # let it in (grant_again), so that waiting keeps no cores from states that can run.
            after_hooks = req is not None and self.hooks and self.held_up_ahead(act)
            if req is not None and not after_hooks and not self.admit(act, req):
                continue
            launched = True
            self.launch(act)
            if after_hooks and running.get(name) is act:
                act.regrant = True
            if self.done:
                break
            if (self.waiting or self.watch) and running.get(name) is not act:
                # It ran at once and ended: states its end lets in (dependencies) are
                # activated before anything else starts, as they are after any other end.
                break
        for act in reversed(deferred):  # back at the front, in their order
            self._ready_level(act.priority).appendleft(act)
            self.n_ready += 1
        return launched

    def ready_activations(self) -> list[Activation]:
        """The ready activations in the order they would start."""
        return [act for level in reversed(self.ready) if level is not None for act in level]

    def admit(self, act: Activation, req: Any) -> bool:
        """Ask the pool for ``act``'s resources; True when granted now, else it waits in the queue."""
        admission = self._admission or self.admission
        act.owner = admission.owner_for(act.state, self.run_id)
        try:
            granted = admission.request(self, act, req)
        except QuotaExceededError as exc:  # a quota in "fail" mode refused it
            meta = self.metadata[act.state]
            self.set_status(meta, _BLOCKED)
            meta.blocked_reason = str(exc)
            self._leave(act)
            self.fail(exc)
            return False
        if granted:
            act.holds = True
            return True
        act.where = QUEUED
        self.queued[act.owner] = act
        self.pooled[act.state] = None
        why = "resources: " + admission.why_waiting(act.owner)
        self.metadata[act.state].waiting_for = why
        self.emit(ev.STATE_QUEUED, act.state, data={"waiting_for": why})
        admission.preempt_for(act, req)
        return False

    def preempt(self, act: Activation) -> None:
        """Admission chose ``act`` as a preemption victim: stop it, it will be requeued."""
        if act.where == RUNNING:
            self.stop_activation(act, _STOP_PREEMPT)
        elif act.where == GRANTED:  # granted but not started yet: straight back to the queue
            if act in self.granted:  # else launch_granted holds it, and skips it now
                self.granted.remove(act)
            act.holds = False
            act.front = True
            act.where = QUEUED
            self.queued[act.owner] = act
            self.admission.requeue(act.owner)

    # --- running an attempt -------------------------------------------------------------

    def launch(self, act: Activation) -> None:
        name = act.state
        spec = self.specs[name]
        act.attempt = number = act.attempt + 1
        if act.stop_reason is not None:
            act.stop_reason = None
        if act.regrant is not None:  # an earlier attempt's, stopped while its hooks held it up
            act.regrant = None
        act.where = RUNNING
        if self.pooled:
            self.pooled.pop(name, None)
        act.started_at = now = self.clock()
        self.running[name] = act
        self.current[name] = act
        if self.tracks_deps:
            if not act.counted:  # a start, for PARALLEL dependencies: not each retry or restart
                act.counted = True
                self.starts[name] = self.starts.get(name, 0) + 1
            self.last_start[name] = now
            self.touched.add(name)
        meta = self.metadata[name]
        if meta.status is _READY:
            meta.status = _RUNNING
        else:
            if _RUNNING not in meta.status._next:  # type: ignore[union-attr]
                self.set_status(meta, _READY)  # it waited for an earlier activation, which has ended
            self.set_status(meta, _RUNNING)
        meta.attempts = number
        meta.total_attempts += 1
        if meta.waiting_for is not None:
            meta.waiting_for = None
        meta.started_at = now
        meta.last_execution = self.wall_offset + now
        if self.observers and not self.hooks:  # with hooks: once they let it in (admitted())
            self.emit(ev.STATE_STARTED, name, attempt=number,  # what it holds, for the allocation metrics
                      data={"resources": spec.resources} if spec.resources is not None else {})
        view = self.context._attempt_view(name, number, self.human_for)
        isolation = spec.isolation or self.default_isolation
        if isolation is not _INLINE and spec.isolation is None and isolation in _BY_COPY and uses_an_agent(spec.func):
            isolation = _INLINE  # see uses_an_agent(): where that agent lives
        if spec.context_keys is not None or isolation is _SANDBOX:  # add_state(context_keys=...)
            view = ScopedContext.over(view, scope_for(isolation, spec.context_keys))  # type: ignore[arg-type]
        if isolation is _INLINE and not self.hooks:
            if cannot_suspend(spec.func) and not self.unstarted:  # else it would start before them
                self._run_at_once(act, spec.func, view, meta, now, spec.effective_timeout)
                return
            self.driver.start_inline(act, spec.func, view)
        else:
            attempt = Attempt(
                run_id=self.run_id,
                agent_name=self.name,
                state_name=name,
                func=spec.func,
                number=act.attempt,
                context=view,
                resources=spec.resources,
                isolation=isolation,
                timeout=spec.effective_timeout,
            )
            if act.holds:
                attempt.assignment = self.admission.assignment(act.owner)
            self.driver.start_attempt(act, attempt)
        timeout = spec.effective_timeout
        if self.done:
            self.stop_activation(act, _STOP_CANCEL)
        elif timeout is not None and not self.hooks:  # with hooks: from when they let it in (admitted())
            act.timer = self.driver.loop.call_later(timeout, self.stop_activation, act, _STOP_TIMEOUT)

    def _run_at_once(self, act: Activation, func: Any, view: Any, meta: StateMetadata, began: float,
                     limit: float | None) -> None:
        """An inline attempt that cannot suspend (see :mod:`agent.engine.driver`): stepped
        here, in a copy of the caller's context variables, and accounted for at once."""
        runner = self.runner
        try:
            coro = func(view)
            if runner is None:
                self.runner = runner = _inline_runner(coro)
                coro = None  # the new runner starts on it
            out = self.caller_context.copy().run(runner.send, coro)
        except KeyboardInterrupt:  # Ctrl-C stops the program, inline as anywhere
            self.runner = None
            raise
        except BaseException as exc:  # noqa: BLE001 - the state's own failure (it ended the runner)
            self.runner = None
            self.finished(act, None, exception_reason(exc), _NO_USAGE)
            return
        if type(out) is not _Returned:  # cannot happen: cannot_suspend() read its code
            self.runner = None
            self.fail(RuntimeError(f"state {act.state!r} suspended, though its code awaits nothing"))
            return
        if limit is not None and self.clock() - began > limit:
            act.stop_reason = _STOP_TIMEOUT  # it blocked the event loop past its timeout
            self.finished(act, None, None, _NO_USAGE)
            return
        # What finished() does for an attempt that returned, for this common case.
        try:
            del self.running[act.state]
            meta.finished_at = end = self.clock()
            if act.holds:
                self._release(act, _NO_USAGE)
            self.succeeded(act, out.value, end - began, _NO_USAGE, end)
        except Exception as exc:  # an engine bug must end the run visibly, not hang it
            self.log.exception("internal error while finishing %r", act.state)
            self.fail(exc)

    def held_up_ahead(self, act: Activation) -> bool:
        """Whether an admission hook says ``act``'s attempt would wait now (``would_wait``;
        a hook without it is taken to let it in)."""
        for hook in self.hooks:
            would_wait = getattr(hook, "would_wait", None)
            if would_wait is not None and would_wait(act.state, self.run_id):
                return True
        return False

    def give_back_while_held_up(self, act: Activation) -> None:
        """An admission hook of ``act``'s attempt is about to wait (a primitive, a rate
        limit): its grant goes back to the pool meanwhile, for states that can run now
        (else a state waiting for a MUTEX would keep cores nobody uses, and could even
        preempt others for them); :meth:`grant_again` asks for it once the hooks let it in."""
        if act.holds and act.regrant is None and self.running.get(act.state) is act:
            self._release(act, _NO_USAGE)
            act.regrant = True
            self.kick()

    async def grant_again(self, act: Activation, attempt: Attempt) -> None:
        """Ask the pool again for what ``act`` gave back while its hooks held it up, ahead
        of its priority level (it was granted before); waits while the pool is full. What
        the hooks let it take (a MUTEX, say) it holds meanwhile."""
        admission = self._admission or self.admission
        req = self.specs[act.state].resources
        assert req is not None  # it held a grant
        act.owner = admission.owner_for(act.state, self.run_id)
        act.front = True
        if admission.request(self, act, req):
            act.regrant = None
            act.holds = True
        else:
            act.regrant = waiter = self.driver.loop.create_future()
            self.metadata[act.state].waiting_for = "resources: " + admission.why_waiting(act.owner)
            admission.preempt_for(act, req)
            try:
                await waiter
            except BaseException:
                if act.regrant is waiter:  # not granted: the request is withdrawn
                    act.regrant = None
                    admission.release(act.owner)
                raise
        attempt.assignment = admission.assignment(act.owner)

    def admitted(self, act: Activation) -> None:
        """The admission hooks let ``act``'s attempt in: it starts now. What it waited for
        there (a coordination primitive, a rate limit) is not its run time: its
        ``STATE_STARTED`` says how long it was (``coordination_wait``, seconds)."""
        waited = (now := self.clock()) - act.started_at
        act.started_at = now
        timeout = self.specs[act.state].effective_timeout
        if timeout is not None:  # its timeout counts from now too (start() left it to here)
            act.timer = self.driver.loop.call_later(timeout, self.stop_activation, act, _STOP_TIMEOUT)
        meta = self.metadata[act.state]
        meta.started_at = now
        meta.last_execution = self.wall_offset + now
        meta.waiting_for = None
        if self.observers:
            resources = self.specs[act.state].resources
            data: dict[str, Any] = {"coordination_wait": waited}
            if resources is not None:
                data["resources"] = resources
            self.emit(ev.STATE_STARTED, act.state, attempt=act.attempt, data=data)

    def stop_activation(self, act: Activation, reason: StopReason) -> None:
        """Ask a running activation to stop: timeout, cancel, preempt or pause."""
        if self.running.get(act.state) is not act or act.task is None:
            return
        if (reason is _STOP_PREEMPT or reason is _STOP_TIMEOUT) and act.stop_reason is not None:
            # Stopping already (a cancel, a pause, a preemption, a timeout): that is how it
            # ends. Its timer firing in the stop's grace made a cancelled state TIMEOUT (and
            # failed the run that cancel_state() had meant to go on).
            return
        act.stop_reason = reason
        if act.attempt_obj is not None:
            act.attempt_obj.stop_reason = reason
        self.driver.stop(act)

    def finished(self, act: Activation, result: Any, failure: FailureReason | None, usage: dict[str, Any]) -> None:
        """Account for an attempt that ended, then decide what comes next."""
        try:
            self._finished(act, result, failure, usage)
        except Exception as exc:  # an engine bug must end the run visibly, not hang it
            self.log.exception("internal error while finishing %r", act.state)
            self.fail(exc)

    def finished_here(self, act: Activation, result: Any, failure: FailureReason | None,
                      usage: dict[str, Any] = _NO_USAGE) -> None:
        """An attempt ended, in its own task: account for it and start what follows from
        there, without waking the drive loop for it (a chain then costs one loop iteration
        per state)."""
        self.pumping = True
        try:
            self.finished(act, result, failure, usage)
        finally:
            self.pumping = False
        self.pump()

    def _finished(self, act: Activation, result: Any, failure: FailureReason | None, usage: dict[str, Any]) -> None:
        name = act.state
        if self.running.get(name) is not act:
            return
        del self.running[name]
        stop = act.stop_reason
        timer = act.timer
        if timer is not None:
            timer.cancel()
            act.timer = None
            if stop is None and failure is None and self.driver.loop.time() >= timer.when():
                # It returned past its timeout, before the timer could stop it (an inline
                # state that blocked the event loop): it timed out all the same.
                stop = act.stop_reason = _STOP_TIMEOUT
        act.task = None
        now = self.clock()
        meta = self.metadata[name]
        meta.finished_at = now
        if usage:
            meta.usage = dict(usage)
        duration = now - act.started_at
        if stop is None and failure is None:  # the common case: it returned
            if act.holds:
                self._release(act, usage)
            if not self.pumping and self._driver is not None:
                self._driver.kick()
            self.succeeded(act, result, duration, usage, now)
            return
        if stop is _STOP_PREEMPT or stop is _STOP_PAUSE:
            act.attempt -= 1  # not a failed attempt
            meta.attempts = act.attempt
            meta.total_attempts -= 1
            meta.record(AttemptRecord(act.attempt + 1, act.started_at, now,
                                      "preempted" if stop is _STOP_PREEMPT else "paused", usage=usage))
            self.set_status(meta, _PENDING)
            if stop is _STOP_PREEMPT:
                meta.preemptions += 1
                self.emit(ev.STATE_PREEMPTED, name, attempt=act.attempt + 1, duration=duration, usage=usage)
            elif self.observers:
                self.emit(ev.STATE_PAUSED, name, attempt=act.attempt + 1, duration=duration, usage=usage)
            if stop is _STOP_PREEMPT and not self.pause_requested and act.holds and not self.done:
                act.front = True
                act.holds = False
                act.where = QUEUED
                self.set_status(meta, _READY)
                meta.waiting_for = "resources: requeued after a preemption"
                self.queued[act.owner] = act
                self.pooled[name] = None
                if usage:
                    self.agent.resource_pool.record_measured(act.owner, usage)
                self.emit(ev.STATE_QUEUED, name, data={"waiting_for": meta.waiting_for})
                self.admission.requeue(act.owner)  # back in the queue, ahead of its level
            else:
                self._release(act, usage)
                if self.pause_requested:  # (a pause resumed before its attempts stopped: it runs again now)
                    self.hold_paused(act)
                else:
                    self.make_ready(act)
            self.kick()
            return
        if act.holds:
            self._release(act, usage)
        self.kick()
        if stop is _STOP_CANCEL:
            meta.record(AttemptRecord(act.attempt, act.started_at, now, "cancelled", usage=usage))
            self.set_status(meta, _CANCELLED)
            self.emit(ev.STATE_CANCELLED, name, attempt=act.attempt, duration=duration, usage=usage)
            if self.tracks_deps:
                self.finishes[name] = self.finishes.get(name, 0) + 1
                self.touched.add(name)
            self.branch_ends(act)
            return
        if stop is _STOP_TIMEOUT:
            limit = self.specs[name].effective_timeout
            # A limit its process hit meanwhile (a fork bomb that ignores its refused forks
            # runs until its timeout) is said too.
            hit = f"; meanwhile, {failure.message}" if failure is not None and failure.kind == "limit" else ""
            failure = FailureReason(
                kind="timeout",
                message=f"timed out after {limit:g} s (attempt {act.attempt}){hit}",
                details={"timeout": limit, **(failure.details if hit and failure is not None else {})},
            )
        if failure is None:
            self.succeeded(act, result, duration, usage, now)
        else:
            self.attempt_failed(act, failure, duration, usage, now)

    def _release(self, act: Activation, usage: dict[str, Any]) -> None:
        if act.holds:
            act.holds = False
            (self._admission or self.admission).release(act.owner, usage)

    def succeeded(self, act: Activation, result: Any, duration: float, usage: dict[str, Any], now: float) -> None:
        name = act.state
        meta = self.metadata[name]
        try:
            if result is None:
                nexts: str | list[str] | None = None
            elif type(result) is str and result in self.specs and self.specs[name].next_states is None:
                nexts = result  # the common case, checked inline
            else:
                nexts = self.validate_result(name, result)
        except AgentError as exc:
            meta.record(AttemptRecord(act.attempt, act.started_at, now, "failed", str(exc), usage))
            meta.error = FailureReason(kind="exception", message=str(exc),
                                       exception_type=exception_type_name(type(exc)))
            self.set_status(meta, _FAILED)
            self.emit(ev.STATE_FAILED, name, attempt=act.attempt, duration=duration, usage=usage, error=str(exc),
                      data={"final": True, "kind": "exception", "run_goes_on": False})
            self._leave(act)
            self.fail(exc)
            return
        # meta.record(...), inlined: the hot path.
        history = meta.history
        history.append(AttemptRecord(act.attempt, act.started_at, now, "completed", None, usage))
        if len(history) > HISTORY_LIMIT:
            del history[0]
        if meta.status is _RUNNING:
            meta.status = _COMPLETED
        else:
            self.set_status(meta, _COMPLETED)  # raises, naming the transition
        meta.runs += 1
        meta.last_success = (meta.last_execution or 0.0) + duration
        if meta.error is not None:
            meta.error = None  # an earlier attempt's, retried: its history keeps it
        self.completed.add(name)
        self.completions[name] = self.completions.get(name, 0) + 1
        if self.tracks_deps:
            self.finishes[name] = self.finishes.get(name, 0) + 1
            self.last_completion[name] = now
            self.touched.add(name)
        sessions = self.sessions
        sessions[name] = sessions.get(name, 0) + 1
        if self.observers:
            handed_to = [] if nexts is None else [nexts] if isinstance(nexts, str) else list(nexts)
            self.emit(ev.STATE_COMPLETED, name, attempt=act.attempt, duration=duration, usage=usage,
                      data={"next": handed_to})
        if nexts is None:
            self.branch_ends(act)
        else:
            self._leave(act)
            group = act.group
            if type(nexts) is str and group.items == 0 and group.parent is None and nexts not in group.held:
                self.activate(nexts, group)  # a chain in the root: nothing else could meet it
            else:
                self.hand_over(group, nexts, name)
        # Checkpoint only now: the completion and the transitions it caused are saved
        # together, so a run resumed from this checkpoint continues where this state led.
        if self.agent.checkpoint_store is not None:
            self.agent._after_step(self)

    def validate_result(self, name: str, result: Any) -> str | list[str] | None:
        if result is None:
            return None
        result = values.plain_names(result)
        problem = values.transition_problem(result)
        if problem is not None:
            raise InvalidTransitionError(f"state {name!r} {problem}")
        declared = self.specs[name].next_states
        if isinstance(result, str):
            if result not in self.specs:
                raise UnknownNextStateError(_unknown_next(name, result, self.specs))
            if declared is not None and result not in declared:
                raise InvalidTransitionError(_undeclared(name, result, declared))
            return result
        if isinstance(result, (list, tuple)):
            names = list(dict.fromkeys(result))
            for n in names:
                if n not in self.specs:
                    raise UnknownNextStateError(_unknown_next(name, n, self.specs))
                if declared is not None and n not in declared:
                    raise InvalidTransitionError(_undeclared(name, n, declared))
            return names or None
        raise AssertionError(f"transition_problem() let {type(result).__name__} through")

    def attempt_failed(self, act: Activation, failure: FailureReason, duration: float, usage: dict[str, Any],
                       now: float) -> None:
        name = act.state
        spec = self.specs[name]
        meta = self.metadata[name]
        meta.error = failure
        outcome = "timeout" if failure.kind == "timeout" else "failed"
        meta.record(AttemptRecord(act.attempt, act.started_at, now, outcome, failure.message, usage))
        max_retries = spec.max_retries_with(self.agent.retry_policy)
        policy = spec.retry_policy or self.agent.retry_policy
        # A permanent failure (a limit, a bound, ...) would happen again: not retried unless asked.
        final = act.attempt > max_retries or (failure.permanent and not (policy is not None and policy.retry_permanent))
        goes_on = final and (spec.on_failure or self.default_on_failure) == "continue"
        told = {"attempt": act.attempt, "duration": duration, "usage": usage, "error": failure.message,
                "data": {"final": final, "kind": failure.kind, "run_goes_on": goes_on}}
        if not final:
            self.emit(ev.STATE_FAILED, name, **told)
            delay = policy.delay(act.attempt) if policy is not None else 0.0
            self.set_status(meta, _READY)
            meta.waiting_for = f"retry {act.attempt} of {max_retries} in {delay:.3g} s"
            self.emit(ev.STATE_RETRYING, name, attempt=act.attempt, data={"delay": delay})
            if delay <= 0:
                self.make_ready(act)
            else:
                act.where = RETRYING
                self.retrying[act.id] = act
                act.timer = self.driver.call_at(now + delay, self.retry_due, act)
            if self.agent.checkpoint_store is not None:  # a crash now resumes with this attempt counted
                self.agent._after_step(self)
            return
        self.set_status(meta, _TIMEOUT if failure.kind == "timeout" else _FAILED)
        # Its final status is set first: an observer reads it as the event says, as it reads
        # COMPLETED at STATE_COMPLETED.
        self.emit(ev.STATE_FAILED, name, **told)
        if self.tracks_deps:
            self.finishes[name] = self.finishes.get(name, 0) + 1
            self.touched.add(name)
        if goes_on:
            self.failures[name] = failure
            self.failed_after[name] = act.attempt
            self.context._failures[name] = failure.message  # for context.failed_states()
            self.failed_frames.append(_frame(act, 0, ended=True))
            self.branch_ends(act)
            return
        self.failed_frames.append(_frame(act, 0))
        self._leave(act)
        self.fail(_failed_for_good(name, act.attempt, failure, policy))

    def retry_due(self, act: Activation) -> None:
        if self.retrying.pop(act.id, None) is None:
            return
        act.timer = None
        if self.pause_requested:
            self.hold_paused(act)
        else:
            self.make_ready(act)

    # --- dependencies --------------------------------------------------------------------

    def check_dependencies(self) -> bool:
        progressed = False
        now = self.clock()
        if self.waiting:
            still: list[Activation] = []
            for act in self.waiting:
                verdict = self.deps_verdict(act.state, self._bounded_since(act.state, act.waiting_since, now), now)
                if verdict is True:
                    if self.observers:
                        self.emit(ev.DEPENDENCY_RESOLVED, act.state, duration=now - act.waiting_since,
                                  data={"chain_length": self.chain_length(act.state)})
                    self.consume(act.state)
                    self.make_ready(act)
                    progressed = True
                elif isinstance(verdict, tuple):
                    self.dependency_gave_up(act, *verdict)
                    progressed = True
                    if self.done:
                        return True
                else:
                    self.metadata[act.state].waiting_for = verdict
                    still.append(act)
            self.waiting = still
        for name in self._watched_to_look_at():
            if name not in self.watch or name in self.running or self.has_live(name):
                continue
            verdict = self.deps_verdict(name, self._bounded_since(name, self.started + self.paused_total, now), now)
            if verdict is True:
                if self.observers:
                    self.emit(ev.DEPENDENCY_RESOLVED, name, duration=now - self.started,
                              data={"chain_length": self.chain_length(name)})
                self.consume(name)
                self.root.unfinished += 1  # a branch of its own
                self.activate(name, self.root, via_dependency=True)
                progressed = True
            elif isinstance(verdict, tuple):
                self.watch.discard(name)
                status, message = verdict
                if self.metadata[name].status in _FINISHED_FOR_GOOD:
                    continue  # a waiting activation of it was stopped already, and said why
                if status is _TIMEOUT:
                    self.fail_unstarted(name, DependencyTimeoutError(message))
                    return True
                meta = self.metadata[name]
                meta.blocked_reason = message
                self.set_status(meta, status)
                self.emit(ev.STATE_BLOCKED, name, error=message)
        return progressed

    def _bounded_since(self, name: str, since: float, now: float) -> float:
        """When the wait of ``name`` its dependencies' timeouts bound began: ``since``, or
        ``now`` (no bound) once it started in this run. A timeout bounds the wait of a
        state that never started: one that ran (an ALWAYS dependency's state, waiting to
        run again) may wait for its dependency's next completion for good."""
        return now if name in self.last_start else since

    def has_live(self, name: str) -> bool:
        """Whether ``name`` has an activation queued, waiting, retrying, held or running."""
        return name in self.live_states or name in self.held_names

    def set_status(self, meta: StateMetadata, status: StateStatus) -> None:
        """``meta``'s state changes status (which those depending on it may be waiting for);
        one that ended waits for nothing any more (a queued state cancelled, say)."""
        meta.set_status(status)
        if status.is_finished and meta.waiting_for is not None:
            meta.waiting_for = None
        if self.tracks_deps:
            self.touched.add(meta.name)

    def _watched_to_look_at(self) -> list[str]:
        """The watched states whose dependencies may have changed since the last look.

        A state's verdict (:meth:`deps_verdict`) reads only what the engine records of its
        dependencies (status, live activations, starts, finishes, completions), which marks
        each state it changes as touched; those depending on a touched state (or touched
        themselves) are looked at, and those whose dependencies also move with time
        (timeouts, TEMPORARY and PERIODIC lifecycles) or a condition, every time. Without
        that, each state that ended had every watched state looked at: a chain of n states
        cost n^2 looks. They are looked at in the order they were added."""
        dependents = self.dependents
        if dependents is None:
            dependents = self._index_dependents()
        if self.touched_all:
            self.touched_all = False
            self.touched.clear()
            return sorted(self.watch, key=self.declared_at.__getitem__)
        watch = self.watch
        names = [name for name in self.timed if name in watch] if self.timed else []
        if self.touched:
            touched, self.touched = self.touched, set()
            for state in touched:
                if state in watch:
                    names.append(state)
                for name in dependents.get(state, ()):
                    if name in watch:
                        names.append(name)
        # In the order the states were added: where two resolve (or time out) at once, the
        # first added goes first, in every process.
        return sorted(set(names), key=self.declared_at.__getitem__) if len(names) > 1 else names

    def _index_dependents(self) -> dict[str, list[str]]:
        dependents: dict[str, list[str]] = {}
        self.timed = set()
        self.declared_at = {name: i for i, name in enumerate(self.specs)}
        for name, spec in self.specs.items():
            for dep, cfg in spec.dependencies.items():
                dependents.setdefault(dep, []).append(name)
                if cfg.timeout is not None or cfg.condition is not None \
                        or cfg.lifecycle in (Life.TEMPORARY, Life.PERIODIC):
                    self.timed.add(name)
        self.dependents = dependents
        return dependents

    def consume(self, name: str) -> None:
        """Record that ``name`` starts on its dependencies as they are now."""
        deps = self.specs[name].dependencies
        for dep, cfg in deps.items():
            self.consumed[(name, dep)] = self._seen(dep, cfg.type)
        self.last_start[name] = self.clock()
        if not any(c.lifecycle in (Life.ALWAYS, Life.PERIODIC) for c in deps.values()):
            self.watch.discard(name)  # triggered once per run: a returned activation counts

    def _seen(self, dep: str, kind: Dep) -> int:
        """What of ``dep`` a dependency of ``kind`` counts (an ALWAYS or PERIODIC one is met
        again only by a new one): its starts (PARALLEL), its finishes (SEQUENTIAL), else its
        completions."""
        if kind is Dep.PARALLEL:
            return self.starts.get(dep, 0)
        if kind is Dep.SEQUENTIAL:
            return self.finishes.get(dep, 0)
        return self.completions.get(dep, 0)

    def deps_verdict(self, name: str, since: float, now: float, conditions: bool = True,
                     timeouts: bool = True) -> Any:
        """True when met; a reason string while waiting; (status, message) when it never can be.
        Without ``conditions``: as if every condition held; without ``timeouts``: as if none passed."""
        spec = self.specs[name]
        sessions = self.agent._session_completions
        for dep, cfg in spec.dependencies.items():
            dmeta = self.metadata[dep]
            life = cfg.lifecycle
            if timeouts and cfg.timeout is not None and now - since > cfg.timeout and self.paused_at is None:
                # What it waited for (a condition that raised, say) is the cause to give.
                waited = self.deps_verdict(name, since, now, conditions, timeouts=False)
                return (_TIMEOUT,
                        f"state {name!r} waited more than {cfg.timeout:g} s for its dependency {dep!r}"
                        + (f": it was waiting for {waited}" if isinstance(waited, str) else ""))
            if cfg.type is Dep.REQUIRED:
                if dmeta.status in _FINISHED_FOR_GOOD and not self.has_live(dep) and self.completions.get(dep, 0) == 0 \
                        and not (life is Life.SESSION and sessions.get(dep, 0)):
                    return (_BLOCKED,
                            f"state {name!r} is blocked: its required dependency {dep!r} ended {dmeta.status.value}")
                count = self.completions.get(dep, 0)
                if life is Life.SESSION:
                    count = max(count, sessions.get(dep, 0))
                if life in (Life.ALWAYS, Life.PERIODIC):
                    met = count > self.consumed.get((name, dep), 0)
                elif life is Life.TEMPORARY:
                    last = self.last_completion.get(dep)
                    met = last is not None and now - last <= (cfg.expiry or 0.0)
                    if not met and last is not None:
                        return (f"dependency {dep!r} to complete again (its completion "
                                f"{now - last:.3g} s ago is past the TEMPORARY expiry of {cfg.expiry:g} s)")
                else:
                    met = count >= 1
                if not met:
                    return f"dependency {dep!r} to complete"
            elif cfg.type is Dep.OPTIONAL:
                if self.has_live(dep):
                    return f"optional dependency {dep!r}, which is scheduled"
                # Run again (ALWAYS, PERIODIC) only on a new completion: else a dependency
                # that is not scheduled would trigger it again and again.
                if life in (Life.ALWAYS, Life.PERIODIC) and (name, dep) in self.consumed \
                        and self.completions.get(dep, 0) <= self.consumed[(name, dep)]:
                    return f"optional dependency {dep!r} to complete again"
            elif cfg.type is Dep.PARALLEL:
                started = self.starts.get(dep, 0)
                if life in (Life.ALWAYS, Life.PERIODIC):
                    if started <= self.consumed.get((name, dep), 0):
                        return f"parallel dependency {dep!r} to start"
                elif started == 0:
                    return f"parallel dependency {dep!r} to start"
            elif cfg.type is Dep.SEQUENTIAL:
                finished = self.finishes.get(dep, 0)
                if life in (Life.ALWAYS, Life.PERIODIC):
                    if finished <= self.consumed.get((name, dep), 0):
                        return f"sequential dependency {dep!r} to finish"
                elif finished == 0:
                    return f"sequential dependency {dep!r} to finish"
            if life is Life.PERIODIC and cfg.interval:
                last = self.last_start.get(name)
                if last is not None and now - last < cfg.interval:
                    self.recheck_at(last + cfg.interval)
                    return f"periodic interval of {cfg.interval:g} s since its last run"
            if cfg.condition is not None and conditions:
                try:
                    ok = bool(cfg.condition(self.agent))
                except Exception as exc:  # a broken condition keeps the state waiting, visibly
                    return f"condition on {dep!r} raised {exc!r}"
                if not ok:
                    self._poll_conditions()
                    return f"condition on dependency {dep!r} to hold"
        return True

    def _poll_conditions(self) -> None:
        if not self.polling:
            self.polling = True
            self.driver.call_at(self.clock() + _CONDITION_POLL, self._polled)

    def _polled(self) -> None:
        self.polling = False

    def _waits_out_a_timeout(self) -> bool:
        """Whether a state that never ran waits only for a condition, on a dependency whose
        ``timeout`` has not passed: the run stays for it (the condition may read anything,
        and still come true; else the state times out), although nothing else is left.
        A dependency that can no longer complete blocks the state at once instead."""
        now = self.clock()
        waits = [(act.state, act.waiting_since) for act in self.waiting if act.state not in self.last_start]
        waits += [(name, self.started) for name in self.watch
                  if self.metadata[name].status is _PENDING and self.metadata[name].runs == 0]
        for name, since in waits:
            if any(cfg.condition is not None and cfg.timeout is not None and now - since <= cfg.timeout
                   for cfg in self.specs[name].dependencies.values()) \
                    and self.deps_verdict(name, since, now, conditions=False) is True:
                return True
        return False

    def chain_length(self, name: str) -> int:
        """The longest chain of dependencies behind ``name``: 1 when those it depends on
        depend on nothing, and so on (a dependency that closes a cycle, which the
        dependencies cannot have, is not followed).

        Walked without recursion (a chain of thousands of states is no deeper a stack) and
        remembered for the run until a state is added (:meth:`retrack`): each state's length
        is then found once, not once per state that depends on it."""
        lengths = self.chain_lengths
        if name in lengths:
            return lengths[name]
        specs = self.specs
        on_path = {name}
        stack = [(name, iter(specs[name].dependencies))]
        while stack:
            state, deps = stack[-1]
            for dep in deps:
                if dep in specs and dep not in lengths and dep not in on_path:
                    on_path.add(dep)
                    stack.append((dep, iter(specs[dep].dependencies)))
                    break
            else:
                stack.pop()
                on_path.discard(state)
                known = [lengths[d] for d in specs[state].dependencies if d in lengths]
                lengths[state] = 1 + max(known) if known else 0
        return lengths[name]

    def _block_if_a_requirement_failed(self, name: str) -> None:
        """As the run ends: ``name``, which never ran, is BLOCKED when a REQUIRED dependency
        of it ended for good without completing (else it stays as it is)."""
        meta = self.metadata[name]
        for dep, cfg in self.specs[name].dependencies.items():
            status = self.metadata[dep].status
            if cfg.type is Dep.REQUIRED and status in _FINISHED_FOR_GOOD and self.completions.get(dep, 0) == 0:
                meta.blocked_reason = f"state {name!r} is blocked: its required dependency {dep!r} ended {status.value}"
                self.set_status(meta, _BLOCKED)
                self.emit(ev.STATE_BLOCKED, name, error=meta.blocked_reason)
                return

    def recheck_at(self, when: float) -> None:
        """Look at dependencies again at ``when`` (a periodic interval or a wait timeout ends)."""
        if when not in self.rechecks:
            self.rechecks.add(when)
            self.driver.call_at(when, self.rechecks.discard, when)

    def add_dependency_timers(self, name: str, since: float) -> None:
        for cfg in self.specs[name].dependencies.values():
            if cfg.timeout is not None:
                self.recheck_at(since + cfg.timeout + 1e-3)

    def dependency_gave_up(self, act: Activation, status: StateStatus, message: str) -> None:
        meta = self.metadata[act.state]
        meta.blocked_reason = message
        self.set_status(meta, status)
        if status is _TIMEOUT:
            self._leave(act)
            self.fail(DependencyTimeoutError(message))
            return
        self.emit(ev.STATE_BLOCKED, act.state, error=message)
        self.branch_ends(act)

    # --- steering ---------------------------------------------------------------------------

    def cancel_state(self, name: str) -> bool:
        """Cancel ``name`` wherever it is (running, queued, waiting, held); its branch ends."""
        if self.done:
            return False
        running = self.running.get(name)
        meta = self.metadata[name]
        # Every activation of it: one waiting behind another (its retries, or one that runs)
        # ends with it, and so do the branches held for it at a join or on their way there;
        # the state's one status and event are the current activation's.
        waiting = [a for a in self.live.values() if a.state == name and a.where != RUNNING]
        current = self.current.get(name)
        found = running is not None or bool(waiting)
        for act in waiting:
            self._withdraw(act)
        for act in waiting:
            self.branch_ends(act)
        if name in self.held_names:
            found = True
            for group in [g for g in self.groups.values() if name in g.held]:
                self._unhold(group, name)  # the branches that met there end, and those still on their way
                if group.cancelled is None:
                    group.cancelled = set()
                group.cancelled.add(name)
                self.settle(group)
        if name in self.watch:
            self.watch.discard(name)
            found = True
        if running is not None:
            if not self.done:
                self.stop_activation(running, _STOP_CANCEL)  # its end says CANCELLED
        elif found and _CANCELLED in meta.status._next:  # type: ignore[attr-defined]  # else it ended already
            self.set_status(meta, _CANCELLED)
            shown = current if current in waiting else waiting[0] if waiting else None
            self.emit(ev.STATE_CANCELLED, name, attempt=shown.attempt if shown is not None else 0)
        if found:
            self.kick()
        return found

    def _withdraw(self, act: Activation) -> None:
        """Take a not-running activation out of whichever queue holds it."""
        where = act.where
        if where == READY:
            self._ready_level(act.priority).remove(act)
            self.n_ready -= 1
        elif where == QUEUED:
            self.queued.pop(act.owner, None)
            self.pooled.pop(act.state, None)
            self.admission.release(act.owner)
        elif where == GRANTED:
            self.granted.remove(act)
            self.pooled.pop(act.state, None)
            self._release(act, {})
        elif where == WAITING:
            self.waiting.remove(act)
        elif where == RETRYING:
            self.retrying.pop(act.id, None)
            if act.timer is not None:
                act.timer.cancel()
                act.timer = None
        elif where == PAUSED:
            self.paused.remove(act)

    def cancel_all(self) -> None:
        """Cancel every state and end the run with status CANCELLED. Each state it makes
        CANCELLED says so (``STATE_CANCELLED``), as :meth:`cancel_state` does; a running one
        when its attempt ends."""
        for act in list(self.live.values()):
            if act.where != RUNNING:
                self._withdraw(act)
                meta = self.metadata[act.state]
                if not meta.status.is_finished and act.state not in self.running:  # else the running one's
                    self.set_status(meta, _CANCELLED)
                    self.emit(ev.STATE_CANCELLED, act.state, attempt=act.attempt)
                self._leave(act)
        for group in self.groups.values():
            for name in list(group.held):
                self._unhold(group, name)
                meta = self.metadata[name]
                if meta.status is _PENDING:  # a join that never ran: cancelled with the rest
                    self.set_status(meta, _CANCELLED)
                    self.emit(ev.STATE_CANCELLED, name)
        if self.tracks_deps:  # waiting on dependencies: cancelled with the rest
            for name in self.watch:
                meta = self.metadata[name]
                if meta.status is _PENDING:
                    self.set_status(meta, _CANCELLED)
                    self.emit(ev.STATE_CANCELLED, name)
        self.pause_requested = False
        self.finish(_RUN_CANCELLED)

    def pause(self) -> list[Any]:
        """Stop launching; stop running attempts (they re-run on resume); the tasks to wait for."""
        self.pause_requested = True
        if self.paused_at is None:
            self.paused_at = self.clock()
        for act in list(self.queued.values()):
            if self.queued.pop(act.owner, None) is not act:
                continue  # granted meanwhile (giving back another request let the pool settle)
            self.pooled.pop(act.state, None)
            self.admission.release(act.owner)
            self.hold_paused(act)
        return self.stop_all(_STOP_PAUSE)

    def hold_paused(self, act: Activation) -> None:
        """``act`` starts once the run resumes, and its state says so."""
        act.where = PAUSED
        self.paused.append(act)
        if self.current.get(act.state, act) is act:  # else its metadata is the current activation's
            self.metadata[act.state].waiting_for = _PAUSED_WAIT

    def resume(self) -> None:
        self.pause_requested = False
        if self.paused_at is not None:  # the time paused is no dependency's wait
            gap = self.clock() - self.paused_at
            self.paused_at = None
            self.paused_total += gap
            if self.tracks_deps:
                for act in self.waiting:
                    act.waiting_since += gap
                    self.add_dependency_timers(act.state, act.waiting_since)
                for name in self.watch:
                    self.add_dependency_timers(name, self.started + self.paused_total)
        paused, self.paused = self.paused, []
        for act in paused:
            self.make_ready(act)
        self.kick()

    def stop_all(self, reason: StopReason) -> list[Any]:
        tasks = []
        for act in list(self.running.values()):
            if act.task is not None:
                tasks.append(act.task)
                self.stop_activation(act, reason)
        return tasks

    # --- ending ----------------------------------------------------------------------------

    def close(self) -> None:
        """The run is over and accounted for: let go of the agent and the event loop.

        A run and its agent refer to each other (and a run to its driver, and back): left
        so, every finished run would wait for the garbage collector. Afterwards the run
        still answers what it holds (its queues, snapshot()), and reaches its agent only
        while the agent lives.
        """
        agent: Any = self.agent
        if type(agent) is not _ProxyType:
            self.agent = _proxy(agent)  # type: ignore[assignment]  # stands for the agent while it lives
        self._driver = None
        self.human_for = None  # type: ignore[assignment]
        self.runner = None

    def settle_now(self) -> bool:
        """Pump once; True when the run ended with nothing left on the event loop (then
        it is closed: no driver needed), else the driver takes over."""
        self.pump()
        if not self.done or self.running or self._driver is not None:
            return False
        self.abandon()
        return True

    def check_quiescent(self) -> bool:
        """End the run when nothing can change any more; True when it scheduled something instead."""
        # Retry delays keep a run alive; a periodic re-run that is not due yet does not.
        if self.running or self.n_ready or self.retrying or self.queued or self.granted or self.pause_requested:
            return False
        if (self.waiting or self.watch) and self._waits_out_a_timeout():
            return False  # its timer wakes the run
        # Nothing can change any more: whatever still waits on dependencies is blocked,
        # and its branch ends (a join it would have reached may run now).
        waiting = self.waiting
        if waiting:
            self.waiting = []
        for act in waiting:
            meta = self.metadata[act.state]
            if meta.status is not _BLOCKED:  # else another activation of it was blocked just now
                reason = meta.waiting_for or "dependencies"
                ran = "did not run again" if meta.runs else "never ran"
                meta.blocked_reason = f"state {act.state!r} {ran}: it was waiting for {reason}"
                self.set_status(meta, _BLOCKED)
                self.emit(ev.STATE_BLOCKED, act.state, error=meta.blocked_reason)
            self.branch_ends(act)
        if self.live:
            return True
        for name in self.watch:
            meta = self.metadata[name]
            if meta.status is _PENDING and meta.runs == 0:
                verdict = self.deps_verdict(name, self.started + self.paused_total, self.clock())
                reason = verdict if isinstance(verdict, str) else "its dependencies"
                meta.blocked_reason = f"state {name!r} never ran: it was waiting for {reason}"
                self.set_status(meta, _BLOCKED)
                self.emit(ev.STATE_BLOCKED, name, error=meta.blocked_reason)
        if self.watch:
            self.watch.clear()
        if self.failures:
            first = next(iter(self.failures))
            error = _failed_for_good(first, self.failed_after[first], self.failures[first],
                                     self.specs[first].retry_policy or self.agent.retry_policy)
            error.failures = dict(self.failures)  # type: ignore[attr-defined]
            if len(self.failures) > 1:
                others = ", ".join(repr(n) for n in list(self.failures)[1:])
                error.args = (f"{error.args[0]}\n(also failed for good: {others})",)
            self.error = error
            self.finish(_RUN_FAILED)
            return False
        self.finish(_RUN_COMPLETED)
        return False

    def fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
            # What a resume of this failed run starts from: whatever was still live, in its
            # groups as they were (stopping it afterwards ends branches there).
            self.failed_frames.extend(_frame(a, a.attempt - (a.where == RUNNING)) for a in self.live.values())
            self.failed_groups = self._groups_frame()
        self.finish(_RUN_FAILED)

    def fail_unstarted(self, name: str, error: BaseException) -> None:
        """``name`` timed out before it could start (a dependency's or a barrier's
        ``timeout``): it ends TIMEOUT, seen as a final failed attempt, and so does the run."""
        meta = self.metadata[name]
        meta.blocked_reason = str(error)
        meta.error = FailureReason(kind="timeout", message=str(error), exception_type=exception_type_name(type(error)))
        self.set_status(meta, _TIMEOUT)
        self.emit(ev.STATE_FAILED, name, attempt=0, error=str(error),
                  data={"final": True, "kind": "timeout", "run_goes_on": False})
        self.fail(error)

    def time_out(self, timeout: float) -> None:
        """``run(timeout=...)`` expired: the run fails, saying what was still to do."""
        if self.done:
            return
        waiting = sorted({a.state for a in self.live.values() if a.where != RUNNING} | set(self.held_names)
                         | (self.watch if self.tracks_deps else set()))
        self.error = RunTimeoutError(
            f"run of agent {self.name!r} did not finish within its timeout of {timeout:g} s; "
            f"still running: {sorted(self.running) or 'nothing'}"
            + (f"; still to run (queued, waiting or retrying): {waiting}" if waiting else "")
        )
        self.failed_frames.extend(_frame(a, a.attempt - (a.where == RUNNING)) for a in self.live.values())
        self.failed_groups = self._groups_frame()
        self.finish(_RUN_FAILED)

    def caller_cancelled(self) -> None:
        self.error = None
        self.final_status = _RUN_CANCELLED
        self.done = True

    def finish(self, status: AgentStatus) -> None:
        if self.done:
            return
        self.final_status = status
        self.done = True
        if self._driver is not None:
            self._driver.kick()

    def abandon(self) -> None:
        """After the run ended: what never ran is CANCELLED, and nothing is left in the pool."""
        cut_off: list[str] = []  # waited for dependencies: BLOCKED if a REQUIRED one failed
        for act in list(self.live.values()) if self.live else ():
            meta = self.metadata[act.state]
            if act.where == WAITING and meta.status is _PENDING:
                cut_off.append(act.state)
            stubborn = act.where == RUNNING and self.running.get(act.state) is act  # ignored cancellation in time
            if stubborn:
                del self.running[act.state]
            if act.where in (READY, RETRYING, QUEUED, GRANTED, RUNNING, PAUSED) and not meta.status.is_finished:
                self.set_status(meta, _CANCELLED)
                if stubborn:  # what never ran was not started either: only a started state is told cancelled
                    self.emit(ev.STATE_CANCELLED, act.state, attempt=act.attempt)
            if act.where == QUEUED:
                self.admission.release(act.owner)
            elif act.holds:
                self._release(act, {})
            if act.timer is not None:
                act.timer.cancel()
            self._leave(act)
        if self.n_ready:
            for level in self.ready:
                if level is not None:
                    level.clear()
            self.n_ready = 0
        # Each emptied only when it holds something: after a clean end, all are empty.
        if self.granted:
            self.granted.clear()
        if self.queued:
            self.queued.clear()
        if self.pooled:
            self.pooled.clear()
        if self.running:
            self.running.clear()
        if self.current:
            self.current.clear()
        if self.retrying:
            self.retrying.clear()
        for name in self.held_names:  # joins the run ended before: they wait for nothing now
            meta = self.metadata[name]
            if meta.waiting_for == _HELD:
                meta.waiting_for = None
        if self.tracks_deps:
            self.rechecks.clear()
            for name in self.watch:  # never triggered: some may never be now
                meta = self.metadata[name]
                if meta.status is _PENDING and meta.runs == 0:
                    cut_off.append(name)
        if cut_off:
            self._block_cut_off(cut_off)

    def _block_cut_off(self, names: list[str]) -> None:
        """As the run ends: each of ``names`` (which never ran) that a failed REQUIRED
        dependency cut off is BLOCKED, also through dependents BLOCKED in turn (a chain
        ``a -> b -> c`` whose ``a`` failed leaves ``b`` and ``c`` BLOCKED, in any order
        they were added)."""
        left = set(names)
        order = [name for name in self.specs if name in left]
        while order:
            still = []
            for name in order:
                self._block_if_a_requirement_failed(name)
                if self.metadata[name].status is not _BLOCKED:
                    still.append(name)
            if len(still) == len(order):
                return
            order = still

    # --- checkpoints ----------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The run's groups, live activations and holds, as plain data (``AgentCheckpoint.frames``)."""
        groups = None
        failed: dict[str, Any] = {}
        if self.done and self.final_status is _RUN_FAILED:
            activations = list(self.failed_frames)  # what failed runs again on resume
            groups = self.failed_groups
        else:
            # A running attempt re-runs on resume, so it is not counted as done.
            activations = [_frame(a, a.attempt - (a.where == RUNNING)) for a in self.live.values()]
            if self.failures:  # failed for good while the run went on: the resumed run fails in the end
                # too, and a resume of that failed run runs them again
                failed = {"failed_for_good": [
                    {"state": n, "attempts": self.failed_after[n], "kind": r.kind, "message": r.message,
                     "exception_type": r.exception_type} for n, r in self.failures.items()],
                    "failed_frames": [f for f in self.failed_frames if f.get("ended")]}
        return {
            **failed,
            "groups": self._groups_frame() if groups is None else groups,
            "activations": activations,
            "watch": sorted(self.watch),
            "completions": dict(self.completions),
            "steps": self.steps,
            **({"dependencies": self._dependencies_frame()} if self.tracks_deps else {}),
        }

    def _dependencies_frame(self) -> dict[str, Any]:
        """What dependencies were met by, so that a resumed run meets them alike: starts and
        finishes (PARALLEL, SEQUENTIAL), what each dependent consumed (ALWAYS, PERIODIC), and
        when (TEMPORARY, PERIODIC; wall-clock seconds, since another process resumes it)."""
        wall = self.wall_offset
        return {
            "starts": dict(self.starts),
            "finishes": dict(self.finishes),
            "consumed": [[name, dep, n] for (name, dep), n in self.consumed.items()],
            "last_completion": {k: wall + t for k, t in self.last_completion.items()},
            "last_start": {k: wall + t for k, t in self.last_start.items()},
        }

    def _restore_dependencies(self, frame: dict[str, Any]) -> None:
        self.track_dependencies()
        self.touched_all = True
        specs, wall = self.specs, self.wall_offset
        self.starts = {k: int(v) for k, v in frame.get("starts", {}).items() if k in specs}
        self.finishes = {k: int(v) for k, v in frame.get("finishes", {}).items() if k in specs}
        self.consumed = {(name, dep): int(n) for name, dep, n in frame.get("consumed", [])
                         if name in specs and dep in specs}
        self.last_completion = {k: float(t) - wall for k, t in frame.get("last_completion", {}).items() if k in specs}
        self.last_start = {k: float(t) - wall for k, t in frame.get("last_start", {}).items() if k in specs}

    def _groups_frame(self) -> list[dict[str, Any]]:
        return [
            {"id": g.id, "parent": g.parent.id if g.parent is not None else None,
             "unfinished": g.unfinished, "held": dict(g.held),
             **({"opener": g.opener} if g.opener is not None else {}),
             **({"cancelled": sorted(g.cancelled)} if g.cancelled else {})}
            for g in self.groups.values()
        ]

    def restore(self, frames: dict[str, Any], running: list[str], pending: list[str]) -> None:
        """Rebuild the groups, live activations and holds of a checkpointed run; running states re-run.

        A failed run's checkpoint holds what failed and what the failure cut off: those
        run again.
        """
        specs = self.specs
        self.emit(ev.RUN_STARTED, data={"resumed": True})
        # BLOCKED by a dependency that failed: waits again (a failed run's failed states
        # run again; else the dependency's verdict says BLOCKED again at once).
        unblocked = {n for n, spec in specs.items() if spec.dependencies and self.metadata[n].status is _BLOCKED}
        for name in unblocked:
            meta = self.metadata[name]
            meta.status = _PENDING
            meta.blocked_reason = None
        if "activations" not in frames:  # a checkpoint without frames: restart what was pending
            names = [n for n in dict.fromkeys(list(running) + list(pending)) if n in specs]
            for name, spec in specs.items():
                if spec.dependencies and name not in self.completed and name not in names:
                    self.watch.add(name)
            self.root.unfinished += len(names)
            for name in names:
                self.activate(name, self.root)
            return
        watch = {n for n in frames.get("watch", []) if n in specs} | unblocked
        if isinstance(frames.get("dependencies"), dict):
            self._restore_dependencies(frames["dependencies"])
        if watch:
            self.track_dependencies()
            self.watch = watch
            self.touched_all = True
        self.completions = {k: int(v) for k, v in frames.get("completions", {}).items()}
        self.steps = int(frames.get("steps", 0))  # max_steps counts the whole run, across a resume
        for f in frames.get("failed_for_good", []):
            name = f.get("state")
            if name in specs and isinstance(f.get("message"), str):
                self.failures[name] = FailureReason(kind=str(f.get("kind") or "exception"), message=f["message"],
                                                    exception_type=f.get("exception_type"))
                self.failed_after[name] = int(f.get("attempts") or 1)
                self.context._failures[name] = f["message"]
        self.failed_frames.extend(f for f in frames.get("failed_frames", [])
                                  if isinstance(f, dict) and f.get("state") in specs)
        self.groups = {}
        for data in sorted(frames.get("groups", []), key=lambda d: int(d["id"])):
            parent = self.groups.get(data["parent"]) if data.get("parent") is not None else None
            opener = data.get("opener")
            group = Group(int(data["id"]), parent if parent is not None or data.get("parent") is None else self.root,
                          opener if isinstance(opener, str) and opener in specs else None)
            # "active" is what the format before dataflow joins called unfinished branches.
            group.unfinished = int(data.get("unfinished", data.get("active", 0)))
            self.groups[group.id] = group
        self.root = self.groups.setdefault(0, Group(0, None))
        self._next_id = max(self.groups) + 1
        for data in frames.get("groups", []):
            group = self.groups[int(data["id"])]
            if data.get("cancelled"):
                group.cancelled = {n for n in data["cancelled"] if n in specs}
            held = data.get("held", {})
            for name, arrivals in (held.items() if isinstance(held, dict) else ((n, 1) for n in held)):
                if name in specs and name not in group.held:
                    self._hold(group, name)
                    group.held[name] = int(arrivals)
                    self.metadata[name].status = _PENDING
        for a in frames.get("activations", []):
            name = a["state"]
            if name not in specs:
                continue
            found = self.groups.get(int(a.get("group", 0)))
            group = found if found is not None else self.root
            if found is None or a.get("ended"):  # its branch had ended: it opens again
                group.unfinished += 1
            self.steps -= 1  # activate() counts it again
            act = self.activate(name, group, via_dependency=bool(a.get("via_dependency")),
                                attempt=int(a.get("attempt", 0)))
            if act is not None and a.get("counted"):
                act.counted = True  # it started before: re-running it is a restart, not a new start
        for group in list(self.groups.values()):
            if group.held and group.id in self.groups:
                self.settle(group)


def _failed_for_good(
    name: str, attempts: int, failure: FailureReason, policy: RetryPolicy | None,
) -> StateFailedError:
    """What ``run()`` raises for ``name``, failed for good (a run that went on raises it too)."""
    cls = StateTimeoutError if failure.kind == "timeout" else StateFailedError
    return cls(name, attempts, failure, retry_permanent=policy is not None and policy.retry_permanent)


def _frame(act: Activation, attempts_done: int, ended: bool = False) -> dict[str, Any]:
    frame = {"state": act.state, "group": act.group.id, "attempt": max(0, attempts_done),
             "via_dependency": act.via_dependency}
    if act.counted:
        frame["counted"] = True
    if ended:
        frame["ended"] = True
    return frame


def _unknown_next(name: str, target: str, specs: dict[str, Any]) -> str:
    import difflib

    # Another state first: a state naming itself by its own name is a loop, not a typo of it.
    close = (difflib.get_close_matches(target, [other for other in specs if other != name], n=1)
             or difflib.get_close_matches(target, [name], n=1))
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return (f"state {name!r} returned {target!r}, which is not a state of this agent{hint}: "
            "add it with add_state() or return an existing name")


def _undeclared(name: str, target: str, declared: frozenset[str]) -> str:
    return (f"state {name!r} returned {target!r}, which is not among its declared next_states "
            f"{sorted(declared)}: add it to add_state(..., next_states=[...]) or return a declared name")
