"""``Agent``: build a workflow of named async states, run it, steer it, checkpoint it.

A thin facade: what ``add_state`` builds lives in :mod:`agent.workflow`, a run's queues
in :class:`agent.engine.run.Run`, admission in :mod:`agent.engine.admission`. The
agent keeps what outlives a run: its states, their metadata, the last context, the
observers and the checkpoint store.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from . import _env, _validate
from . import events as ev
from . import live
from ._loops import LoopGone, awaited_on, call_on, run_to_end, runs_elsewhere
from ._types import Priority, StopReason
from .checkpoint import AgentCheckpoint
from .context import Context, budget_from_mb, default_budget
from .dependencies import DependencyConfig, DependencyType
from .engine.run import READY, RUNNING, Activation, Run
from .errors import (
    AgentBusyError,
    AttemptLogNotFoundError,
    CheckpointError,
    EventLoopRunningError,
    InvalidConfigurationError,
    RunTimeoutError,
    UnknownStateError,
    WorkflowDefinitionError,
)
from .executor import Isolation, parse_isolation, prepare_for
from .resources import ResourcePool, ResourceRequirements, default_pool
from .retry import RetryPolicy
from .state import StateFunction, StateMetadata
from .status import AgentStatus, StateStatus, check_agent_transition
from .workflow import ReturnGraph, StateSpec, check_graph, check_on_failure, enter_state, uses_an_agent

_UNKNOWN: Any = object()

DEFAULT_ISOLATION = Isolation.PROCESS
"""Used when neither ``Agent(isolation=...)`` nor ``$AGENT_ISOLATION`` says otherwise."""

# Enum members as module names: in CPython 3.11 reading a member from its class goes
# through the enum metaclass's __getattr__ hook, which is slow on the hot path.
_IDLE, _RUNNING, _PAUSED = AgentStatus.IDLE, AgentStatus.RUNNING, AgentStatus.PAUSED
_COMPLETED, _FAILED, _CANCELLED = AgentStatus.COMPLETED, AgentStatus.FAILED, AgentStatus.CANCELLED
_PENDING = StateStatus.PENDING

_log = logging.getLogger("agent")
_run_ids: list[str] = []


def _checkpoint_store(store: Any) -> Any:
    """``checkpoint_store=``: a store, or a path for an SQLite store there."""
    if isinstance(store, (str, os.PathLike)):
        from .checkpoint_store import SQLiteCheckpointStore

        return SQLiteCheckpointStore(store)
    if not all(callable(getattr(store, method, None)) for method in ("save", "latest")):
        raise InvalidConfigurationError(
            f"checkpoint_store must be a CheckpointStore (save, latest, ...) or the path of an SQLite file, "
            f"got {type(store).__name__}"
        )
    return store


def _new_run_id() -> str:
    """A random 128-bit run id in hex: from the OS's random source, 64 at a time."""
    try:
        return _run_ids.pop()
    except IndexError:
        raw = os.urandom(16 * 64).hex()
        _run_ids.extend(raw[i:i + 32] for i in range(0, len(raw), 32))
        return _run_ids.pop()


os.register_at_fork(after_in_child=_run_ids.clear)  # a forked child never repeats its parent's ids
_TERMINAL = frozenset(s.value for s in (AgentStatus.COMPLETED, AgentStatus.FAILED, AgentStatus.CANCELLED))


def _non_negative(name: str, value: Any, *, allow_none: bool = True) -> None:
    _validate.number(value, name, error=InvalidConfigurationError, none=allow_none, unit="seconds")


_COORDINATION_METHODS = frozenset({
    "add_state_rate_limit", "remove_state_rate_limit", "add_state_coordination", "remove_state_coordination",
    "get_coordination_status", "reset_coordination",
})


_A = TypeVar("_A", bound="Agent")
_T = TypeVar("_T")


def _on_the_runs_loop(method: Callable[[_A], Awaitable[_T]]) -> Callable[[_A], Awaitable[_T]]:
    """Make ``method`` safe from any thread or event loop: called elsewhere than on the loop
    ``run()`` goes on, it is done there (:func:`~agent._loops.awaited_on`), and its outcome
    comes back; once that ``run()`` has returned, it is done here."""

    @functools.wraps(method)
    async def on_the_runs_loop(self: _A) -> _T:
        loop = self._loop
        if loop is not None and runs_elsewhere(loop):
            try:
                return await awaited_on(loop, lambda: method(self))
            except LoopGone:
                pass  # its run() returned meanwhile: as if called there afterwards
        return await method(self)

    return on_the_runs_loop


class Agent:
    """A workflow: named async states, their dependencies, resources and retry rules.

    A state is ``async def state(context) -> StateResult``: it returns the next state's
    name, a list of names to run in parallel, or ``None`` to end its branch. See
    :mod:`agent.engine.run` for the exact join and dependency semantics.
    """

    _has_dependencies = False  # a state with dependencies was added (its run keeps their bookkeeping)

    def __init__(
        self,
        name: str,
        *,
        resource_pool: ResourcePool | None = None,
        max_concurrent: int | None = None,
        max_steps: int | None = None,
        retry_policy: RetryPolicy | None = None,
        isolation: Isolation | str | None = None,
        checkpoint_interval: float | None = None,
        checkpoint_store: Any = None,
        human_input: Any = None,
        cleanup_timeout: float = 10.0,
        on_failure: str = "fail",
        context_budget_mb: float | None = None,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise InvalidConfigurationError(f"an agent needs a non-empty str name, got {name!r}")
        # Each check only when the setting is given: building agents is a hot path too.
        if max_concurrent is not None:
            _validate.integer(max_concurrent, "max_concurrent", error=InvalidConfigurationError, minimum=1, none=True)
        if max_steps is not None:
            _validate.integer(max_steps, "max_steps", error=InvalidConfigurationError, minimum=1, none=True)
        if checkpoint_interval is not None:
            _validate.number(checkpoint_interval, "checkpoint_interval", error=InvalidConfigurationError,
                             above=True, none=True, unit="seconds")
        if cleanup_timeout != 10.0:
            _non_negative("cleanup_timeout", cleanup_timeout, allow_none=False)
        if resource_pool is not None and not isinstance(resource_pool, ResourcePool):
            raise InvalidConfigurationError(f"resource_pool must be a ResourcePool, got {type(resource_pool).__name__}")
        if retry_policy is not None and not isinstance(retry_policy, RetryPolicy):
            raise InvalidConfigurationError(f"retry_policy must be a RetryPolicy, got {type(retry_policy).__name__}")
        if on_failure != "fail":
            check_on_failure(on_failure, f"agent {name!r}")
        if checkpoint_store is not None:
            checkpoint_store = _checkpoint_store(checkpoint_store)
        if human_input is not None and not callable(getattr(human_input, "ask", None)):
            raise InvalidConfigurationError(
                f"human_input must be a provider with an async ask(request) method (QueueInputProvider, "
                f"ConsoleInputProvider, or your own), got {type(human_input).__name__}"
            )
        if isolation is None:
            isolation = _env.get("AGENT_ISOLATION") or DEFAULT_ISOLATION
        self.name = name
        self.isolation = isolation if type(isolation) is Isolation else parse_isolation(isolation)
        self._pool = resource_pool
        self.max_concurrent = max_concurrent
        self.max_steps = max_steps
        self.retry_policy = retry_policy
        self.checkpoint_interval = checkpoint_interval
        self.checkpoint_store = checkpoint_store
        self.human_input = human_input
        self.cleanup_timeout = cleanup_timeout
        self.on_failure = on_failure
        self._budget_mb = context_budget_mb
        # bytes; checked at every write
        self.context_budget = default_budget() if context_budget_mb is None else budget_from_mb(context_budget_mb)
        self._states: dict[str, StateSpec] = {}
        self.state_metadata: dict[str, StateMetadata] = {}
        self.completed_states: set[str] = set()
        self.context = Context.empty(self.context_budget)
        self.status = _IDLE
        self.run_id: str | None = None
        self.last_error: BaseException | None = None
        self.last_checkpoint: AgentCheckpoint | None = None
        self._run: Run | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # run()'s, while it runs
        self._run_closed: asyncio.Event | None = None
        self._observers: list[ev.Observer] = []
        self._admission_hooks: list[Any] = []
        self._session_completions: dict[str, int] = {}
        self._human_hooks: dict[str, Any] = {}
        self._restored: AgentCheckpoint | None = None
        self._finished_restored = False  # a completed run's checkpoint was restored
        self._held = False  # pause() before any run: the next run() starts paused
        self._starting = False  # run() waits for the supervisor before its run exists
        self._cancel_at_start = False  # cancel_all() came meanwhile
        self._first_names: set[str] = set()  # what the run starts with, while it is starting
        self._run_ambient: tuple[ev.Observer, ...] = ()  # the ambient observers (events.observing) of the last run
        self._cancel_early: set[str] = set()  # cancel_state() of them meanwhile
        self._supervised: Any = _UNKNOWN  # _supervised_levels(), worked out again once states are added
        self._fresh_context = True
        self._metadata_fresh = True  # no run has touched state_metadata yet
        self._graph_checked = True  # no state has dependencies or next_states (add_state clears it)
        self._graph: ReturnGraph | None = None
        self._log = _log

    @property
    def _config(self) -> dict[str, Any]:
        """The constructor's settings, to build an equivalent agent (``enhance_agent``)."""
        return {
            "resource_pool": self._pool,
            "max_concurrent": self.max_concurrent,
            "max_steps": self.max_steps,
            "retry_policy": self.retry_policy,
            "isolation": self.isolation,
            "checkpoint_interval": self.checkpoint_interval,
            "checkpoint_store": self.checkpoint_store,
            "human_input": self.human_input,
            "cleanup_timeout": self.cleanup_timeout,
            "on_failure": self.on_failure,
            "context_budget_mb": self._budget_mb,
        }

    @property
    def resource_pool(self) -> ResourcePool:
        """The pool this agent's states are admitted by (the process's default one unless given)."""
        if self._pool is None:
            self._pool = default_pool()
        return self._pool

    @resource_pool.setter
    def resource_pool(self, pool: ResourcePool) -> None:
        if not isinstance(pool, ResourcePool):
            raise InvalidConfigurationError(f"resource_pool must be a ResourcePool, got {type(pool).__name__}")
        if self._run is not None and not self._run.done:
            raise AgentBusyError(f"agent {self.name!r} is running: change its pool between runs")
        self._pool = pool

    # --- building ---------------------------------------------------------------------------

    def add_state(
        self,
        name: str,
        func: StateFunction,
        dependencies: Mapping[str, DependencyType | DependencyConfig | str] | Iterable[str] | None = None,
        resources: ResourceRequirements | None = None,
        retry_policy: RetryPolicy | None = None,
        max_retries: int | None = None,
        isolation: Isolation | str | None = None,
        timeout: float | None = None,
        priority: Priority | int | None = None,
        next_states: Iterable[str] | None = None,
        on_failure: str | None = None,
        context_keys: Iterable[str] | None = None,
    ) -> None:
        """Add a state. Checks everything that can be checked before a run starts.

        ``next_states`` declares the names the state may return (a state returning
        another name fails); the engine then need not read them from its code to know
        which joins it can reach. ``on_failure="continue"`` lets a permanent failure
        of this state end only its branch (default: the agent's ``on_failure``).
        ``context_keys`` (key names and ``"prefix*"`` patterns) are the only context keys
        the state may read and write; a sandboxed state without them sees none.
        """
        run = enter_state(self, name, func, dependencies, resources, retry_policy, max_retries, isolation, timeout,
                          priority, next_states, on_failure, context_keys)
        self._supervised = _UNKNOWN
        if run is not None:
            run.retrack()
            if self._states[name].dependencies:
                run.track_dependencies()
                run.watch.add(name)
                run.kick()

    def _return_graph(self) -> ReturnGraph:
        if self._graph is None:
            self._graph = ReturnGraph(self._states)
        return self._graph

    def add_observer(self, observer: ev.Observer) -> None:
        """Send this agent's run events to ``observer`` (see :mod:`agent.events`), from now
        on: a run in progress included."""
        if not callable(observer):
            raise InvalidConfigurationError(
                f"an observer is called with each RunEvent: give a callable, got {type(observer).__name__}")
        _validate.one_argument(
            observer, "observer", error=InvalidConfigurationError, takes="the RunEvent: observer(event)",
            not_async="make it a plain def (a run does not wait for its observers), which may start a task of its "
                      "own (asyncio.get_running_loop().create_task(...)) or put the event on a queue")
        self._observers.append(observer)
        run = self._run
        if run is not None and not run.done and observer not in run.observers:
            run.observers = (*run.observers, observer)

    def remove_observer(self, observer: ev.Observer) -> None:
        """Stop sending run events to ``observer``; one never added is a mistake."""
        try:
            self._observers.remove(observer)
        except ValueError:
            raise InvalidConfigurationError(f"{observer!r} is not an observer of agent {self.name!r}") from None
        run = self._run
        if run is not None and observer not in self._observers and observer not in self._run_ambient:
            run.observers = tuple(o for o in run.observers if o != observer)

    def add_admission_hook(self, hook: Any) -> None:
        """Register ``hook.acquire(state, run_id, attempt)`` / ``hook.release(..., ok)`` around attempts."""
        if not all(callable(getattr(hook, method, None)) for method in ("acquire", "release")):
            raise InvalidConfigurationError(
                f"an admission hook has acquire(state, run_id, attempt) and release(state, run_id, attempt, ok) "
                f"methods, got {type(hook).__name__}")
        self._admission_hooks.append(hook)

    @property
    def states(self) -> dict[str, StateSpec]:
        """The states added so far, by name (read-only view for tools)."""
        return dict(self._states)

    def get_state(self, key: str, default: Any = None) -> Any:
        """A value of the run's context (used by dependency conditions)."""
        return self.context.get_state(key, default)

    # --- what the current run holds (read-only views) ----------------------------------------

    @property
    def priority_queue(self) -> list[Activation]:
        """Activations to run that are not running (the spec's "pending"): those ready to
        start, highest priority first, then, oldest first, those queued for resources,
        granted, waiting to retry, held by a pause or waiting on their dependencies. A
        checkpoint's ``pending_states`` names their states (and the joins still held)."""
        run = self._run
        if run is None or run.done:
            return []
        ready = run.ready_activations()
        if len(ready) == len(run.live) - len(run.running):  # nothing else waits: the common case
            return ready
        return ready + [a for a in run.live.values() if a.where not in (READY, RUNNING)]

    @property
    def _running_states(self) -> dict[str, Activation]:
        run = self._run
        return {} if run is None or run.done else dict(run.running)

    # --- running ------------------------------------------------------------------------------

    async def run(
        self,
        timeout: float | None = None,
        cleanup_timeout: float | None = None,
        start: str | list[str] | None = None,
        initial_context: Mapping[str, Any] | None = None,
    ) -> Context:
        """Run the workflow to its end and return the run's context.

        Raises :class:`~agent.errors.StateFailedError` when a state fails for good (with
        ``on_failure="continue"``: after everything that could run has run, naming every
        state that failed), :class:`~agent.errors.RunTimeoutError` when ``timeout``
        expires; what still runs is cancelled within ``cleanup_timeout`` seconds first.
        :meth:`cancel_all` ends the run with status CANCELLED and ``run()`` returns.
        """
        _validate.number(timeout, "run(timeout=...)", error=InvalidConfigurationError, above=True, none=True,
                         unit="seconds")  # 0 would end every run at once, as add_state's timeout says
        if cleanup_timeout is not None:
            _non_negative("cleanup_timeout", cleanup_timeout)
        if self.status is _RUNNING or self._starting or (self._run is not None and not self._run.done):
            raise AgentBusyError(f"agent {self.name!r} is already running: await the current run first")
        if not self._states:
            raise WorkflowDefinitionError(f"agent {self.name!r} has no states: add some with add_state()")
        self._loop = asyncio.get_running_loop()  # where pause() and the like from elsewhere go
        try:
            return await self._run_here(timeout, cleanup_timeout, start, initial_context)
        finally:
            self._loop = None

    async def _run_here(
        self, timeout: float | None, cleanup_timeout: float | None, start: str | list[str] | None,
        initial_context: Mapping[str, Any] | None,
    ) -> Context:
        if not self._graph_checked:
            check_graph(self.name, self._states)
            self._graph_checked = True
        if self._finished_restored:  # a completed run was restored: resuming it runs nothing
            self._finished_restored = False
            self._fresh_context = False  # and the run after it starts afresh
            return self.context
        names = [] if self._restored is not None else self._start_names(start)
        # The run's context first: a bad initial_context is refused before anything starts.
        if initial_context is not None and not isinstance(initial_context, Mapping):
            raise InvalidConfigurationError(
                f"run(initial_context=...) takes a mapping of keys to values, got {type(initial_context).__name__}"
            )
        if self._restored is None and not self._fresh_context:
            self.context = Context.empty(self.context_budget)
        if initial_context:
            self.context._set_all(initial_context.items())
        levels = self._supervised
        if levels is _UNKNOWN:  # states were added since the last run
            levels = self._supervised = self._supervised_levels()
        self._cancel_early = set()
        cancelled_at_start = False
        if levels:
            restored = self._restored
            self._first_names = set(names) if restored is None else {*restored.running_states,
                                                                     *restored.pending_states}
            # cancel_all() came meanwhile: the run begins and is cancelled at once, as one that
            # had begun would be (its states CANCELLED, its events sent), before anything runs.
            cancelled_at_start = not await self._supervisor_ready(levels, timeout)
        restored = self._restored
        # pause() before this run began (a run() task not started yet): it starts paused.
        paused_first = restored is None and self.status is AgentStatus.PAUSED
        self._held = False
        if restored is None and not self._metadata_fresh:
            self.completed_states.clear()
            for meta in self.state_metadata.values():
                if meta.status is not _PENDING:
                    meta.status = _PENDING
                meta.runs = 0
                meta.attempts = 0  # of this run's activation: a state this run never reaches has none
                meta.error = None
                meta.waiting_for = None
                meta.blocked_reason = None
        self._metadata_fresh = False
        self.run_id = restored.run_id if restored is not None and restored.run_id else _new_run_id()
        self.context.run_id = self.run_id
        self._fresh_context = False
        if self.checkpoint_store is None and self.checkpoint_interval:
            from .checkpoint_store import open_default_store

            self.checkpoint_store = open_default_store()  # DESIGN item 11: the embedded default
        ambient = ev.ambient_observers()
        # An observer attached both ways (agent and ambient) sees each event once.
        observers = tuple(dict.fromkeys(self._observers + list(ambient))) if ambient else tuple(self._observers)
        self._run_ambient = ambient  # remove_observer() leaves these to the run
        cleanup = self.cleanup_timeout if cleanup_timeout is None else cleanup_timeout
        run = Run(self, self.run_id, self.context, observers, cleanup)
        self._run = run
        self._run_closed = None
        self.last_error = None
        if paused_first:
            run.pause_requested = True  # nothing starts until resume()
        else:
            if self.status is not _RUNNING and _RUNNING not in self.status._next:  # type: ignore[attr-defined]
                self._set_status(_RUNNING)  # raises, naming the transition
            self.status = _RUNNING
        live.register(self, run.wall_offset + run.started, run.started)  # O(1): for `agent top`, `agent run`
        deadline = None if timeout is None else run.clock() + timeout
        saver = None
        if self.checkpoint_interval:
            saver = asyncio.get_running_loop().create_task(self._save_periodically(run))
        try:
            if restored is not None:
                self._restored = None
                run.restore(restored.frames or {}, list(restored.running_states), list(restored.pending_states))
            else:
                run.start(names)
                if self.checkpoint_store is not None:
                    self._after_step(run)  # the run is resumable before its first completion
            early, self._cancel_early = self._cancel_early, set()
            for name in early:  # cancel_state() while the supervisor started
                run.cancel_state(name)
            if cancelled_at_start:
                run.cancel_all()
            if not run.settle_now():  # a run whose states never await ends here, without the loop
                await run.driver.drive(deadline, timeout or 0.0)
        except asyncio.CancelledError:
            self._set_status(AgentStatus.CANCELLED)
            if run.observers:  # its caller went away: the run ended all the same
                run.emit(ev.RUN_FINISHED, status=AgentStatus.CANCELLED.value, error=None)
            raise
        except BaseException as exc:  # a store, a hook or the engine raised out of the run: it ends FAILED
            await self._end_broken_run(run, exc)
        finally:
            live.finished(self)
            if saver is not None:
                saver.cancel()
            if self._run_closed is not None:
                self._run_closed.set()
        if deadline is not None and run.error is None and run.final_status is _COMPLETED and run.clock() > deadline:
            # Its timer could not fire in time: an inline state blocked the event loop past it.
            run.error = RunTimeoutError(
                f"run of agent {self.name!r} did not finish within its timeout of {timeout:g} s: an inline "
                "state blocked the event loop past it (time.sleep, a busy loop); run such code with "
                "isolation='process' or 'worker', or await instead of blocking"
            )
        status = _FAILED if run.error is not None else run.final_status
        if status not in self.status._next:  # type: ignore[attr-defined]
            self._set_status(status)  # raises, naming the transition
        self.status = status
        self.last_error = run.error
        try:
            if run.observers:
                run.emit(ev.RUN_FINISHED, status=status.value, error=str(run.error) if run.error else None)
            if self.checkpoint_store is not None:
                self._save_checkpoint()
        finally:
            run.close()
        if run.error is not None:
            raise run.error
        return self.context

    async def _supervisor_ready(self, levels: tuple[Isolation, ...], timeout: float | None) -> bool:
        """Wait for a cold supervisor (a process's first isolated run) before the run exists:
        its start is then in no state's duration or timeout, nor in the run's clock (the
        run's ``timeout`` bounds this wait too, for a preload that never ends). Meanwhile
        the agent is starting, and RUNNING (unless a pause came first: run() has begun): a
        second run() is refused, pause() holds what follows, and cancel_all() ends it before
        anything runs (False). Each of ``levels`` is prepared: a bad setting of any of them
        refuses the run before anything runs."""
        self._starting, self._cancel_at_start = True, False
        before = self.status
        if before is not AgentStatus.PAUSED:  # held, or restored: it stays so until its run exists
            self._set_status(_RUNNING)
        try:
            for level in levels:
                await prepare_for(level, timeout)
        except BaseException:
            if self.status is _RUNNING:  # nothing ran
                self.status = before
            raise
        finally:
            self._starting = False
        if self._cancel_at_start:
            self._cancel_at_start = False
            return False
        return True

    def _supervised_levels(self) -> tuple[Isolation, ...]:
        """The isolation levels of this agent's states that the supervisor serves, in the order
        of their first state, as the engine picks them: a state that uses an Agent runs inline."""
        levels: dict[Isolation, None] = {}
        for spec in self._states.values():
            level = spec.isolation or self.isolation
            if level is Isolation.INLINE or level is Isolation.RAY:
                continue
            if spec.isolation is None and level in (Isolation.PROCESS, Isolation.WORKER) and uses_an_agent(spec.func):
                continue
            levels[level] = None
        return tuple(levels)

    async def _end_broken_run(self, run: Run, exc: BaseException) -> None:
        """End ``run`` as failed with ``exc`` (raised by ``run()`` afterwards), stopping what
        still runs, so that the agent is not left RUNNING with nothing to finish it."""
        run.fail(exc)
        try:
            if run._driver is not None:
                await run.driver.cleanup(StopReason.CANCEL)
            else:
                run.abandon()
        except Exception:
            self._log.exception("cleaning up after %r failed", exc)

    def run_sync(self, **kwargs: Any) -> Context:
        """Run on a fresh uvloop event loop owned by the engine (for scripts and the CLI).

        Takes :meth:`run`'s arguments. It returns (or raises) once the run has ended and the
        tasks left on its loop have been cancelled: a task that ignores its cancellation (an
        inline state that swallows ``CancelledError``) is waited for ``cleanup_timeout``
        seconds more, then abandoned with a warning, never waited for forever.
        """
        if asyncio._get_running_loop() is None:
            grace = kwargs.get("cleanup_timeout")
            return run_to_end(self.run(**kwargs), self.cleanup_timeout if grace is None else grace)
        raise EventLoopRunningError(
            f"agent {self.name!r}: run_sync() starts an event loop of its own, and one runs here "
            "already (async code, a notebook): use `await agent.run()` instead"
        )

    def _start_names(self, start: str | list[str] | None) -> list[str]:
        if start is None:
            return [next(iter(self._states))]
        if isinstance(start, str):
            names = [start]
        elif isinstance(start, (list, tuple, set, frozenset)) and all(isinstance(n, str) for n in start):
            names = list(start)
        else:
            raise WorkflowDefinitionError(
                f"run(start=...) takes a state name or a list of them, got {type(start).__name__} {start!r}"
            )
        if not names:
            raise WorkflowDefinitionError("run(start=[]) names no state: give at least one")
        for n in names:
            if n not in self._states:
                raise UnknownStateError(f"run(start=...) names {n!r}, which is not a state of agent {self.name!r}")
        return names

    def _set_status(self, status: AgentStatus) -> None:
        check_agent_transition(self.status, status, self.name)
        self.status = status

    def _human_hook(self, state: str) -> Any:
        """The human-input hook of ``state``'s attempts (made once per state)."""
        hook = self._human_hooks.get(state)
        if hook is None:
            hook = self._human_hooks[state] = functools.partial(self._ask_human, state)
        return hook

    async def _ask_human(self, state: str, *, prompt: str, timeout: float | None, validator: Any,
                         default: str | None, **asked: Any) -> str:
        """Ask through the provider; the state's CPU is lent to others while a human thinks.

        Memory, GPUs and the rest stay reserved (an isolated child still holds them); the
        CPU share goes back to the pool for the wait (:meth:`ResourcePool.lend_cpu`) and is
        taken again before the answer is handed to the state (``take_cpu_back``).
        """
        from .human import ask_human, default_provider

        provider = self.human_input if self.human_input is not None else default_provider()
        run = self._run
        act = run.running.get(state) if run is not None else None
        pool = self.resource_pool
        lent = act is not None and act.holds and pool.lend_cpu(act.owner)
        try:
            return await ask_human(
                provider, prompt=prompt, timeout=timeout, validator=validator, default=default,
                run_id=self.run_id or "", state=state, **asked,  # asked: a relayed re-ask (ask_relayed)
            )
        except asyncio.CancelledError:
            lent = False  # the attempt is ending: the engine releases what it holds
            raise
        finally:
            if lent:
                await pool.take_cpu_back(act.owner)  # type: ignore[union-attr]

    # --- steering -------------------------------------------------------------------------------

    @_on_the_runs_loop
    async def pause(self) -> AgentCheckpoint:
        """Stop launching states, stop the running ones (they re-run on resume), return a checkpoint.

        Safe from any thread or event loop: done on the run's own loop."""
        run = self._run
        if run is None or run.done:
            if self.status is AgentStatus.IDLE or (self._starting and self.status is _RUNNING):
                self._set_status(AgentStatus.PAUSED)
                self._held = True
            return self._snapshot()
        if not run.pause_requested:
            tasks = run.pause()
            if self.status is AgentStatus.RUNNING:  # paused now: what still stops re-runs on resume
                self._set_status(AgentStatus.PAUSED)
            current = asyncio.current_task()
            tasks = [t for t in tasks if t is not current]  # called from a state: it stops as it returns
            if tasks:
                await asyncio.wait(tasks, timeout=run.cleanup_timeout or None)
        checkpoint = self._snapshot()
        if self.checkpoint_store is not None:
            self._save_checkpoint(checkpoint)
        return checkpoint

    @_on_the_runs_loop
    async def resume(self) -> None:
        """Continue a paused run; with no run in progress, run the restored or paused state.

        With nothing paused or restored (an agent that never ran, or whose run has ended)
        there is nothing to resume, and nothing runs: start a new run with ``run()``.
        Safe from any thread or event loop, as :meth:`pause` is.
        """
        run = self._run
        if run is not None and not run.done:
            if run.pause_requested:
                self._set_status(AgentStatus.RUNNING)
                run.resume()
            return
        if self._held and self._restored is None:  # paused before any run began, and none has
            self._held = False
            self._set_status(AgentStatus.IDLE)
            return
        if self._restored is None and self.status is not AgentStatus.PAUSED:
            self._finished_restored = False
            return
        if self._restored is None:
            self._restored = self.create_checkpoint()
        await self.run()

    if not TYPE_CHECKING:  # type checkers keep flagging unknown attributes

        def __getattr__(self, name: str) -> Any:
            # Only for names no Agent has: coordination methods asked of a plain Agent say
            # where they are instead of a bare AttributeError.
            if name in _COORDINATION_METHODS:
                raise AttributeError(
                    f"{type(self).__name__} {self.__dict__.get('name', '?')!r} has no {name}(): coordination "
                    "belongs to coordinated agents; make it with agent.coordination.create_coordinated_agent(...) "
                    "or wrap this one with agent.coordination.enhance_agent(agent)"
                )
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def cancel_state(self, name: str) -> bool:
        """Cancel one state wherever it is (running, queued, waiting, held); its branch ends.

        Safe from any thread: called off the run's event loop (a web request's thread),
        it is done on that loop, and returns once it is.
        """
        if not isinstance(name, str) or name not in self._states:
            raise UnknownStateError(f"cannot cancel {name!r}: agent {self.name!r} has no such state")
        run = self._run
        if run is None or run.done:
            return self._starting and call_on(self._loop, lambda: self._cancel_ahead(name))
        return call_on(self._loop, lambda: run.cancel_state(name))

    def _cancel_ahead(self, name: str) -> bool:
        """cancel_state() while run() waits for the supervisor: a state the run starts with
        (or that waits on dependencies from its start) is cancelled as the run begins."""
        run = self._run
        if run is not None and not run.done:  # it began meanwhile
            return run.cancel_state(name)
        if not self._starting or (name not in self._first_names and not self._states[name].dependencies):
            return False
        self._cancel_early.add(name)
        return True

    @_on_the_runs_loop
    async def cancel_all(self) -> None:
        """Cancel every state and end the run with status CANCELLED; returns once it has ended.

        Safe from any thread or event loop, as :meth:`pause` is."""
        run = self._run
        if run is None or run.done:
            if self.status in (AgentStatus.IDLE, AgentStatus.PAUSED) or self._starting:
                self._set_status(AgentStatus.CANCELLED)
                self._held = False
                self._cancel_at_start = self._starting
            return
        run.cancel_all()
        current = asyncio.current_task()
        if any(a.task is current for a in run.running.values()):
            return  # called from inside a state of this run: the run ends when it returns
        if self._run_closed is None:
            self._run_closed = asyncio.Event()
        await self._run_closed.wait()

    # --- checkpoints ------------------------------------------------------------------------------

    def create_checkpoint(self) -> AgentCheckpoint:
        """A snapshot of status, completed/pending/running states, metadata and context.

        Safe from any thread: while the run goes on another thread's loop (``run_sync`` in
        a thread), it is taken there, between two of the run's steps, so it is whole; one
        taken here while a run began there is taken again."""
        while True:
            loop, run = self._loop, self._run
            if runs_elsewhere(loop):
                return call_on(loop, self._snapshot)
            try:
                checkpoint = self._snapshot()
            except RuntimeError:  # a dictionary changed size under it: a run began meanwhile?
                if self._loop is loop and self._run is run:
                    raise
                continue
            if self._loop is loop and self._run is run:
                return checkpoint

    def _snapshot(self) -> AgentCheckpoint:
        run = self._run
        frames: dict[str, Any] = {}
        pending: list[str] = []
        running: list[str] = []
        if self._restored is not None:
            cp = self._restored
            frames = cp.frames
            pending, running = list(cp.pending_states), list(cp.running_states)
        elif run is not None and (not run.done or self.status in (AgentStatus.PAUSED, AgentStatus.FAILED)):
            frames = run.snapshot()
            running = sorted(run.running)
            held = {name for g in frames["groups"] for name in g["held"]}  # joins waiting for branches
            pending = sorted(({a["state"] for a in frames["activations"]} | held) - set(running))
        checkpoint = AgentCheckpoint(
            agent_name=self.name,
            agent_status=self.status.value,
            completed_states=set(self.completed_states),
            pending_states=pending,
            running_states=running,
            state_metadata={n: m.to_dict() for n, m in self.state_metadata.items()},
            context=self.context.to_dict(),
            run_id=self.run_id or "",
            frames=frames,
        )
        self.last_checkpoint = checkpoint
        return checkpoint

    async def restore_from_checkpoint(self, checkpoint: AgentCheckpoint | Mapping[str, Any], *,
                                      strict: bool = True) -> None:
        """Adopt a checkpoint; the next ``run()`` or ``resume()`` continues from it.

        Completed states are not re-run; states that were running re-run. With
        ``strict`` (the default) a checkpoint naming states this agent does not have is
        refused — unless this agent has no states yet, in which case it only adopts the
        data (states may be added afterwards). The checkpoint may come from an agent of
        another name (``Agent("restored_workflow")`` taking over a run): the run it
        continues is then this agent's, under a new run id, so that no store or log mixes
        it up with the other agent's run. A FAILED run's checkpoint resumes too: its
        failed states (and the states cut off by the failure) run again.
        """
        if not isinstance(checkpoint, AgentCheckpoint):
            if not isinstance(checkpoint, Mapping):
                raise CheckpointError(
                    f"restore_from_checkpoint() takes an AgentCheckpoint or its to_dict() data, "
                    f"got {type(checkpoint).__name__}"
                )
            checkpoint = AgentCheckpoint.from_dict(dict(checkpoint))
        if self._run is not None and not self._run.done:
            raise AgentBusyError(f"agent {self.name!r} is running: pause or finish it before restoring")
        if checkpoint.agent_name != self.name:
            checkpoint = dataclasses.replace(checkpoint, agent_name=self.name, run_id="")
        if self._states and strict:
            missing = sorted(checkpoint.state_names() - set(self._states))
            if missing:
                raise CheckpointError(
                    f"checkpoint names states this agent does not have: {', '.join(missing)}: "
                    "add them before restoring"
                )
        self.context = Context(dict(checkpoint.context), budget=self.context_budget)
        self.completed_states = set(checkpoint.completed_states)
        for name, data in checkpoint.state_metadata.items():
            meta = self.state_metadata.get(name)
            if meta is not None and isinstance(data, dict):
                meta.load_dict(data)
                if meta.status is StateStatus.RUNNING:
                    meta.status = StateStatus.PENDING
        self.run_id = checkpoint.run_id or None
        status = checkpoint.agent_status
        # An agent that never ran has nothing to continue: its next run starts from its
        # first state, on the restored context. So has one paused before its run began (a
        # hold): nothing of a run is in its checkpoint.
        begun = bool(checkpoint.state_names()) or bool((checkpoint.frames or {}).get("activations"))
        if not begun and status in (AgentStatus.PAUSED.value, AgentStatus.RUNNING.value):
            status = AgentStatus.IDLE.value
        resumable = status != AgentStatus.IDLE.value and (
            status not in _TERMINAL or (status == AgentStatus.FAILED.value and bool(checkpoint.frames)))
        self.status = AgentStatus.PAUSED if resumable else AgentStatus(status)
        self._restored = checkpoint if resumable else None
        self._finished_restored = status == AgentStatus.COMPLETED.value
        self._fresh_context = True
        self._metadata_fresh = False
        self.last_checkpoint = checkpoint

    async def resume_run(self, run_id: str, store: Any = None, *, timeout: float | None = None,
                         cleanup_timeout: float | None = None) -> Context:
        """Continue run ``run_id`` from its newest checkpoint in ``store`` and return its context.

        This is how a run survives its process: with ``checkpoint_store`` set, every state
        completion is saved; after a crash, a new process builds the same agent and calls
        this. Completed states are not run again; states that were running re-run. A
        FAILED run re-runs the states that failed (and what they lead to), so a batch
        continues after its code is fixed. The store defaults to this agent's
        ``checkpoint_store``, else the default SQLite file. A run that already completed
        is restored without running anything. ``timeout`` and ``cleanup_timeout`` bound
        what is left of the run, as :meth:`run`'s do.
        """
        from .checkpoint_store import open_default_store
        from .live.claim import RunClaim

        if not isinstance(run_id, str) or not run_id:
            raise CheckpointError(f"resume_run() takes the run id (a str) list_runs() shows, got {run_id!r}")
        if store is None:
            store = self.checkpoint_store if self.checkpoint_store is not None else open_default_store()
        else:
            store = _checkpoint_store(store)
        checkpoint = store.latest(run_id)
        if checkpoint is None:
            raise CheckpointError(
                f"no checkpoint of run {run_id!r} in {store!r}: check the run id (list_runs() "
                "shows the runs a store holds) and that the agent saved to this store"
            )
        checkpoint.validate_for(self.name, self._states)
        if checkpoint.agent_status == AgentStatus.CANCELLED.value:
            raise CheckpointError(f"run {run_id} was cancelled: there is nothing to resume; start a new run")
        if checkpoint.agent_status == AgentStatus.FAILED.value and not checkpoint.frames:
            raise CheckpointError(
                f"run {run_id} failed before it could be checkpointed mid-run: there is nothing to resume; "
                "start a new run"
            )
        if checkpoint.agent_status == AgentStatus.COMPLETED.value:
            await self.restore_from_checkpoint(checkpoint)  # nothing to run
            self.checkpoint_store = store
            self._finished_restored = False
            return self.context
        claim = RunClaim(run_id)
        if not claim.take():
            raise AgentBusyError(f"run {run_id} is being resumed by another process: resume it once that process "
                                 "has stopped or paused it")
        try:
            self._refuse_a_run_live_elsewhere(run_id)
            await self.restore_from_checkpoint(checkpoint)
            self.checkpoint_store = store  # the resumed run saves where it was found
            if self._restored is not None:  # what resume() would do, with the bounds given
                await self.run(timeout=timeout, cleanup_timeout=cleanup_timeout)
            else:
                await self.resume()
        finally:
            claim.release()
        self._finished_restored = False  # resumed: a run() from now on is a new run
        return self.context

    def _refuse_a_run_live_elsewhere(self, run_id: str) -> None:
        """Two copies of one run would each run its states (twice the side effects, two
        writers of its checkpoints): a run that another agent object of this process, or
        another live process of this user, still runs is not resumed here (one paused
        there may be: its checkpoint is where it stopped). Other processes are asked
        through their status endpoints (``agent runs``), so one started with
        ``AGENT_STATUS_ENDPOINT=off`` cannot be seen."""
        from .live.client import live_run_ids

        entry = live.find(run_id)
        other = entry.agent if entry is not None else None
        if other is not None and other is not self and other.run_id == run_id and other.status is AgentStatus.RUNNING:
            raise AgentBusyError(
                f"run {run_id} is still running in this process (agent {other.name!r}): resume it once it has ended"
            )
        elsewhere = live_run_ids(running_only=True)
        if run_id in elsewhere:
            where = f"process {elsewhere[run_id]}" if elsewhere[run_id] else "another process"
            raise AgentBusyError(
                f"run {run_id} is still running in {where} (`agent runs` shows it): "
                "resume it once that process has stopped or paused it"
            )

    def _after_step(self, run: Run) -> None:
        """A state completed, or an attempt failed and waits for its retry: save the run,
        which a crash then resumes from there (the failed attempts still count)."""
        if self.checkpoint_store is not None:
            try:
                self._save_checkpoint()
            except CheckpointError as exc:  # e.g. a context value JSON cannot hold
                run.fail(CheckpointError(f"run {run.run_id} cannot be checkpointed: {exc}"))

    def _save_checkpoint(self, checkpoint: AgentCheckpoint | None = None) -> None:
        checkpoint = checkpoint or self._snapshot()
        if self.checkpoint_store is not None:
            self.checkpoint_store.save(checkpoint.run_id, checkpoint)

    async def _save_periodically(self, run: Run) -> None:
        assert self.checkpoint_interval
        while not run.done:
            await asyncio.sleep(self.checkpoint_interval)
            if not run.done:
                self._save_checkpoint()

    # --- logs ---------------------------------------------------------------------------------

    def logs(self, state: str, attempt: int | None = None) -> str:
        """Captured stdout/stderr of an isolated state's attempt (the last one by default)."""
        if not isinstance(state, str) or state not in self._states:
            raise UnknownStateError(f"agent {self.name!r} has no state {state!r}")
        _validate.integer(attempt, "logs(attempt=...)", error=InvalidConfigurationError, minimum=1, none=True)
        from .executor import read_attempt_log

        number = attempt if attempt is not None else self.state_metadata[state].attempts
        if not self.run_id or number < 1:
            raise AttemptLogNotFoundError(
                f"state {state!r} of agent {self.name!r} has not run yet"
                + (" in this run" if self.run_id else "") + ": there is no log to read"
            )
        return read_attempt_log(self.run_id, state, number)

    def __repr__(self) -> str:
        return f"Agent({self.name!r}, states={len(self._states)}, status={self.status.value})"
