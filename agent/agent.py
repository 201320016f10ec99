"""``Agent``: build a workflow of named async states, run it, steer it, checkpoint it."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import heapq
import itertools
import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

from . import events as ev
from .checkpoint import AgentCheckpoint
from .context import Context, budget_from_mb
from .dependencies import DependencyConfig, DependencyType
from .errors import (
    AgentBusyError,
    CheckpointError,
    DependencyCycleError,
    DuplicateStateError,
    InvalidConfigurationError,
    UnknownStateError,
    WorkflowDefinitionError,
)
from .executor import Isolation
from .resources import Priority, ResourcePool, ResourceRequirements, ResourceType
from .retry import RetryPolicy
from .scheduler import Run, _Activation, _Group
from .state import StateFunction, StateMetadata, StateSpec, check_state_function
from .status import AgentStatus, StateStatus, check_agent_transition

DEFAULT_ISOLATION = Isolation.PROCESS
"""Used when neither ``Agent(isolation=...)`` nor ``$AGENT_ISOLATION`` says otherwise."""

_log = logging.getLogger("agent")


def _non_negative(name: str, value: Any, *, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
        raise InvalidConfigurationError(f"{name} must be a number >= 0, got {value!r}")


class Agent:
    """A workflow: named async states, their dependencies, resources and retry rules.

    A state is ``async def state(context) -> StateResult``: it returns the next state's
    name, a list of names to run in parallel, or ``None`` to end its branch. See the
    module :mod:`agent.scheduler` for the exact join and dependency semantics.
    """

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
        context_budget_mb: float | None = None,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise InvalidConfigurationError(f"an agent needs a non-empty str name, got {name!r}")
        if max_concurrent is not None and (not isinstance(max_concurrent, int) or max_concurrent < 1):
            raise InvalidConfigurationError(f"max_concurrent must be an int >= 1, got {max_concurrent!r}")
        if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
            raise InvalidConfigurationError(f"max_steps must be an int >= 1, got {max_steps!r}")
        _non_negative("checkpoint_interval", checkpoint_interval)
        _non_negative("cleanup_timeout", cleanup_timeout, allow_none=False)
        if isolation is None:
            isolation = os.environ.get("AGENT_ISOLATION") or DEFAULT_ISOLATION
        self.name = name
        self.isolation = Isolation.parse(isolation)
        self.resource_pool = resource_pool if resource_pool is not None else ResourcePool()
        self.max_concurrent = max_concurrent
        self.max_steps = max_steps
        self.retry_policy = retry_policy
        self.checkpoint_interval = checkpoint_interval
        self.checkpoint_store = checkpoint_store
        self.human_input = human_input
        self.cleanup_timeout = cleanup_timeout
        self.context_budget = budget_from_mb(context_budget_mb)  # bytes; checked at every write
        self._config: dict[str, Any] = {
            "resource_pool": resource_pool,
            "max_concurrent": max_concurrent,
            "max_steps": max_steps,
            "retry_policy": retry_policy,
            "isolation": isolation,
            "checkpoint_interval": checkpoint_interval,
            "checkpoint_store": checkpoint_store,
            "human_input": human_input,
            "cleanup_timeout": cleanup_timeout,
            "context_budget_mb": context_budget_mb,
        }
        self._states: dict[str, StateSpec] = {}
        self.state_metadata: dict[str, StateMetadata] = {}
        self.completed_states: set[str] = set()
        self.priority_queue: list[_Activation] = []
        self._running_states: dict[str, _Activation] = {}
        self.context = Context(budget=self.context_budget)
        self.status = AgentStatus.IDLE
        self.run_id: str | None = None
        self.last_error: BaseException | None = None
        self.last_checkpoint: AgentCheckpoint | None = None
        self._run: Run | None = None
        self._run_closed: asyncio.Event | None = None
        self._observers: list[ev.Observer] = []
        self._admission_hooks: list[Any] = []
        self._session_completions: dict[str, int] = {}
        self._restored: AgentCheckpoint | None = None
        self._fresh_context = True
        self._graph_checked = False
        self._log = _log

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
    ) -> None:
        """Add a state. Checks everything that can be checked before a run starts."""
        if not isinstance(name, str) or not name:
            raise WorkflowDefinitionError(f"a state name must be a non-empty str, got {name!r}")
        if name in self._states:
            raise DuplicateStateError(f"state {name!r} is already added to agent {self.name!r}: use another name")
        check_state_function(name, func)
        deps = self._parse_dependencies(name, dependencies)
        if resources is not None and not isinstance(resources, ResourceRequirements):
            raise InvalidConfigurationError(
                f"state {name!r}: resources must be a ResourceRequirements, got {type(resources).__name__}"
            )
        if retry_policy is not None and not isinstance(retry_policy, RetryPolicy):
            raise InvalidConfigurationError(
                f"state {name!r}: retry_policy must be a RetryPolicy, got {type(retry_policy).__name__}"
            )
        if max_retries is not None and (
            not isinstance(max_retries, int) or isinstance(max_retries, bool) or max_retries < 0
        ):
            raise InvalidConfigurationError(f"state {name!r}: max_retries must be an int >= 0, got {max_retries!r}")
        if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
            raise InvalidConfigurationError(f"state {name!r}: timeout must be > 0 seconds, got {timeout!r}")
        if resources is not None:
            self.resource_pool.check_request(resources, name)
        level = Isolation.parse(isolation) if isolation is not None else None
        if priority is None:
            priority = resources.priority if resources is not None else Priority.NORMAL
        spec = StateSpec(
            name=name,
            func=func,
            dependencies=deps,
            resources=resources,
            retry_policy=retry_policy,
            max_retries=max_retries,
            isolation=level,
            timeout=timeout,
            priority=Priority(priority),
        )
        run = self._run if self._run is not None and not self._run.done.is_set() else None
        if run is not None:
            self._check_graph(extra=spec)
        self._states[name] = spec
        self._graph_checked = False
        self.state_metadata[name] = StateMetadata(
            name=name,
            max_retries=spec.max_retries_with(self.retry_policy),
            resources=resources,
            priority=spec.priority,
            dependencies=deps,
            isolation=level,
        )
        if run is not None and deps:
            run.watch.add(name)
            run.kick()

    def _parse_dependencies(self, name: str, dependencies: Any) -> dict[str, DependencyConfig]:
        if dependencies is None:
            return {}
        if isinstance(dependencies, str):
            dependencies = [dependencies]
        if not isinstance(dependencies, Mapping):
            dependencies = {dep: DependencyType.REQUIRED for dep in dependencies}
        deps: dict[str, DependencyConfig] = {}
        for dep, value in dependencies.items():
            if not isinstance(dep, str):
                raise WorkflowDefinitionError(f"state {name!r}: dependency names are str, got {dep!r}")
            if dep == name:
                raise DependencyCycleError(f"state {name!r} depends on itself: remove that dependency")
            deps[dep] = DependencyConfig.of(value)
        return deps

    def _check_graph(self, extra: StateSpec | None = None) -> None:
        """Unknown dependencies and dependency cycles are rejected before anything runs."""
        specs = dict(self._states)
        if extra is not None:
            specs[extra.name] = extra
        for spec in specs.values():
            for dep in spec.dependencies:
                if dep not in specs:
                    raise UnknownStateError(
                        f"state {spec.name!r} depends on {dep!r}, which is not a state of agent "
                        f"{self.name!r}: add {dep!r} with add_state() or remove the dependency"
                    )
        white, grey, black = 0, 1, 2
        color = dict.fromkeys(specs, white)
        for root in specs:
            if color[root] != white:
                continue
            stack: list[tuple[str, Iterable[str]]] = [(root, iter(specs[root].dependencies))]
            path = [root]
            color[root] = grey
            while stack:
                node, it = stack[-1]
                nxt = next(it, None)
                if nxt is None:
                    color[node] = black
                    stack.pop()
                    path.pop()
                elif color[nxt] == grey:
                    cycle = path[path.index(nxt):] + [nxt]
                    raise DependencyCycleError(
                        "dependency cycle: " + " -> ".join(cycle) + ": remove one of these dependencies"
                    )
                elif color[nxt] == white:
                    color[nxt] = grey
                    path.append(nxt)
                    stack.append((nxt, iter(specs[nxt].dependencies)))

    def add_observer(self, observer: ev.Observer) -> None:
        """Send this agent's run events to ``observer`` (see :mod:`agent.events`)."""
        self._observers.append(observer)

    def remove_observer(self, observer: ev.Observer) -> None:
        self._observers.remove(observer)

    def add_admission_hook(self, hook: Any) -> None:
        """Register ``hook.acquire(state, run_id, attempt)`` / ``hook.release(..., ok)`` around attempts."""
        self._admission_hooks.append(hook)

    @property
    def states(self) -> dict[str, StateSpec]:
        """The states added so far, by name (read-only view for tools)."""
        return dict(self._states)

    def get_state(self, key: str, default: Any = None) -> Any:
        """A value of the run's context (used by dependency conditions)."""
        return self.context.get_state(key, default)

    # --- running ------------------------------------------------------------------------------

    async def run(
        self,
        timeout: float | None = None,
        cleanup_timeout: float | None = None,
        start: str | list[str] | None = None,
        initial_context: Mapping[str, Any] | None = None,
    ) -> Context:
        """Run the workflow to its end and return the run's context.

        Raises :class:`~agent.errors.StateFailedError` when a state fails for good,
        :class:`~agent.errors.RunTimeoutError` when ``timeout`` expires; what still runs is
        cancelled within ``cleanup_timeout`` seconds first. :meth:`cancel_all` ends the run
        with status CANCELLED and ``run()`` returns normally.
        """
        _non_negative("timeout", timeout)
        _non_negative("cleanup_timeout", cleanup_timeout)
        if self.status is AgentStatus.RUNNING or (self._run is not None and not self._run.done.is_set()):
            raise AgentBusyError(f"agent {self.name!r} is already running: await the current run first")
        if not self._states:
            raise WorkflowDefinitionError(f"agent {self.name!r} has no states: add some with add_state()")
        if not self._graph_checked:
            self._check_graph()
            self._graph_checked = True
        restored = self._restored
        names = self._start_names(start) if restored is None else []
        if restored is None and not self._fresh_context:
            self.context = Context(budget=self.context_budget)
        if initial_context:
            for key, value in initial_context.items():
                self.context.set_state(key, value)
        if restored is None:
            self.completed_states.clear()
            for meta in self.state_metadata.values():
                if meta.status is not StateStatus.PENDING:
                    meta.status = StateStatus.PENDING
                meta.runs = 0
                meta.waiting_for = None
                meta.blocked_reason = None
        self.run_id = restored.run_id if restored is not None and restored.run_id else os.urandom(16).hex()
        self.context.run_id = self.run_id
        self._fresh_context = False
        if self.checkpoint_store is None and self.checkpoint_interval:
            from .checkpoint_store import open_default_store

            self.checkpoint_store = open_default_store()  # DESIGN item 11: the embedded default
        # An observer attached both ways (agent and ambient) sees each event once.
        observers = tuple(dict.fromkeys(self._observers + list(ev.ambient_observers())))
        cleanup = self.cleanup_timeout if cleanup_timeout is None else cleanup_timeout
        run = Run(self, self.run_id, self.context, observers, cleanup)
        self._run = run
        self._run_closed = asyncio.Event()
        self.last_error = None
        self._set_status(AgentStatus.RUNNING)
        deadline = None if timeout is None else run.clock() + timeout
        saver = None
        if self.checkpoint_interval:
            saver = asyncio.get_running_loop().create_task(self._save_periodically(run))
        try:
            if restored is not None:
                self._restored = None
                _restore_frames(run, restored)
                run.emit(ev.RUN_STARTED, data={"resumed": True})
            else:
                run.start(names)
                if self.checkpoint_store is not None:
                    self._after_completion(run)  # the run is resumable before its first completion
            await run.drive(deadline)
        except asyncio.CancelledError:
            self._set_status(AgentStatus.CANCELLED)
            raise
        finally:
            if saver is not None:
                saver.cancel()
            self._run_closed.set()
        status = getattr(run, "final_status", AgentStatus.COMPLETED)
        if run.error is not None:
            status = AgentStatus.FAILED
        self._set_status(status)
        self.last_error = run.error
        if run.observers:
            run.emit(ev.RUN_FINISHED, status=status.value, error=str(run.error) if run.error else None)
        if self.checkpoint_store is not None:
            self._save_checkpoint()
        if run.error is not None:
            raise run.error
        return self.context

    def run_sync(self, **kwargs: Any) -> Context:
        """Run on a fresh uvloop event loop owned by the engine (for scripts and the CLI)."""
        import uvloop

        return uvloop.run(self.run(**kwargs))

    def _start_names(self, start: str | list[str] | None) -> list[str]:
        if start is None:
            return [next(iter(self._states))]
        names = [start] if isinstance(start, str) else list(start)
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
        return functools.partial(self._ask_human, state)

    async def _ask_human(self, state: str, *, prompt: str, timeout: float | None, validator: Any, default: str | None) -> str:
        """Ask through the provider; the state's CPU is lent to others while a human thinks.

        Memory, GPUs and the rest stay reserved (an isolated child still holds them); the
        CPU share goes back to the pool for the wait and is taken again, in priority
        order, before the answer is handed to the state.
        """
        from .human import ask_human, default_provider

        provider = self.human_input if self.human_input is not None else default_provider()
        lent = self._lend_cpu(state)
        try:
            return await ask_human(
                provider, prompt=prompt, timeout=timeout, validator=validator, default=default,
                run_id=self.run_id or "", state=state,
            )
        except asyncio.CancelledError:
            lent = None  # the attempt is ending: the scheduler releases what it holds
            raise
        finally:
            if lent is not None:
                act, req = lent
                self.resource_pool.release(act.owner)
                await self.resource_pool.acquire(act.owner, req, act.priority, state=state)

    def _lend_cpu(self, state: str) -> tuple[_Activation, ResourceRequirements] | None:
        """Give back the CPU part of ``state``'s reservation; returns what to take again."""
        run = self._run
        act = run.running.get(state) if run is not None else None
        req = self._states[state].resources
        if act is None or not act.holds_resources or req is None or not req.amounts().get(ResourceType.CPU):
            return None
        self.resource_pool.release(act.owner)
        waiting = dataclasses.replace(req, cpu_units=0.0)
        if not self.resource_pool.try_acquire(act.owner, waiting, state=state, priority=act.priority):
            self.resource_pool.try_acquire(act.owner, req, state=state, priority=act.priority)
            return None  # someone queued ahead: keep the reservation as it was
        run.kick()  # states waiting for CPU may start now
        return act, req

    def _choose_victims(self, run: Run, act: _Activation, req: ResourceRequirements) -> list[_Activation]:
        """Lower-priority running states of this run to preempt so ``req`` fits (DESIGN.md item 10).

        The choice is the pool's (agent.preemption): fewest victims, then the lowest
        priorities, then the most recently started; evictions already under way count.
        """
        holders = {a.owner: a for a in run.running.values() if a.holds_resources}
        victims = self.resource_pool.find_victims(act.owner, req, act.priority, among=holders, state=act.state)
        return [holders[name] for name in victims or ()]

    # --- steering -------------------------------------------------------------------------------

    async def pause(self) -> AgentCheckpoint:
        """Stop launching states, stop the running ones (they re-run on resume), return a checkpoint."""
        run = self._run
        if run is None or run.done.is_set():
            if self.status is AgentStatus.IDLE:
                self._set_status(AgentStatus.PAUSED)
            return self.create_checkpoint()
        if not run.pause_requested:
            run.pause_requested = True
            tasks = run.stop_all("pause")
            if tasks:
                await asyncio.wait(tasks, timeout=run.cleanup_timeout or None)
            if self.status is AgentStatus.RUNNING:
                self._set_status(AgentStatus.PAUSED)
        checkpoint = self.create_checkpoint()
        if self.checkpoint_store is not None:
            self._save_checkpoint(checkpoint)
        return checkpoint

    async def resume(self) -> None:
        """Continue a paused run; with no run in progress, resume the restored or paused state."""
        run = self._run
        if run is not None and not run.done.is_set():
            if run.pause_requested:
                run.pause_requested = False
                self._set_status(AgentStatus.RUNNING)
                for act in run.paused:
                    run.make_ready(act)
                run.paused.clear()
                run.kick()
            return
        if self._restored is None and self.status is AgentStatus.PAUSED:
            self._restored = self.create_checkpoint()
        await self.run()

    def cancel_state(self, name: str) -> bool:
        """Cancel one state wherever it is (running, queued, waiting); its branch ends."""
        if name not in self._states:
            raise UnknownStateError(f"cannot cancel {name!r}: agent {self.name!r} has no such state")
        run = self._run
        if run is None or run.done.is_set():
            return False
        act = run.running.get(name)
        if act is not None:
            run.stop_activation(act, "cancel")
            return True
        found = False
        meta = self.state_metadata[name]
        for bucket in (run.ready, run.waiting, run.paused):
            keep = [a for a in bucket if a.state != name]
            for a in bucket:
                if a.state == name:
                    found = True
                    meta.set_status(StateStatus.CANCELLED)
                    run.end_branch(a)
            bucket[:] = keep
        heapq.heapify(run.ready)
        for aid, a in list(run.retrying.items()):
            if a.state == name:
                found = True
                del run.retrying[aid]
                meta.set_status(StateStatus.CANCELLED)
                run.end_branch(a)
        for group in list(run.groups.values()):
            if name in group.held:
                found = True
                del group.held[name]
                meta.status = StateStatus.CANCELLED
                if group.active == 0:
                    group.active = 1
                    run.branch_done(group)
        if name in run.watch:
            run.watch.discard(name)
            found = True
            meta.set_status(StateStatus.CANCELLED)
        if found:
            run.kick()
        return found

    async def cancel_all(self) -> None:
        """Cancel every state and end the run with status CANCELLED."""
        run = self._run
        if run is None or run.done.is_set():
            if self.status in (AgentStatus.IDLE, AgentStatus.PAUSED):
                self._set_status(AgentStatus.CANCELLED)
            return
        run.cancelled = True
        for act in list(run.waiting) + list(run.paused) + list(run.retrying.values()):
            self.state_metadata[act.state].set_status(StateStatus.CANCELLED)
        run.waiting.clear()
        run.paused.clear()
        run.retrying.clear()
        run.pause_requested = False
        run.finish(AgentStatus.CANCELLED)
        closed = self._run_closed
        current = asyncio.current_task()
        if closed is not None and not any(a.task is current for a in run.running.values()):
            await closed.wait()

    # --- checkpoints ------------------------------------------------------------------------------

    def create_checkpoint(self) -> AgentCheckpoint:
        """A snapshot of status, completed/pending/running states, metadata and context."""
        run = self._run
        frames: dict[str, Any] = {}
        pending: list[str] = []
        running: list[str] = []
        if self._restored is not None:
            cp = self._restored
            frames = cp.frames
            pending, running = list(cp.pending_states), list(cp.running_states)
        elif run is not None and (not run.done.is_set() or self.status is AgentStatus.PAUSED):
            frames = _snapshot_frames(run)
            running = sorted(run.running)
            pending = sorted({a["state"] for a in frames["activations"]} - set(running))
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

    async def restore_from_checkpoint(self, checkpoint: AgentCheckpoint | Mapping[str, Any], *, strict: bool = True) -> None:
        """Adopt a checkpoint; the next ``run()`` or ``resume()`` continues from it.

        Completed states are not re-run; states that were running re-run. With
        ``strict`` (the default) a checkpoint of another agent name, or one naming states
        this agent does not have, is refused — unless this agent has no states yet, in
        which case it only adopts the data (states may be added afterwards).
        """
        if not isinstance(checkpoint, AgentCheckpoint):
            checkpoint = AgentCheckpoint.from_dict(dict(checkpoint))
        if self._run is not None and not self._run.done.is_set():
            raise AgentBusyError(f"agent {self.name!r} is running: pause or finish it before restoring")
        if self._states and strict:
            if checkpoint.agent_name != self.name:
                raise CheckpointError(
                    f"checkpoint belongs to agent {checkpoint.agent_name!r}, not {self.name!r}: "
                    "restore it into an agent of that name, or pass strict=False"
                )
            named = set(checkpoint.completed_states) | set(checkpoint.pending_states) | set(checkpoint.running_states)
            missing = sorted(named - set(self._states))
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
        terminal = {s.value for s in (AgentStatus.COMPLETED, AgentStatus.FAILED, AgentStatus.CANCELLED)}
        self.status = AgentStatus(checkpoint.agent_status) if checkpoint.agent_status in terminal else AgentStatus.PAUSED
        self._restored = checkpoint if checkpoint.agent_status not in terminal else None
        self._fresh_context = True
        self.last_checkpoint = checkpoint

    async def resume_run(self, run_id: str, store: Any = None) -> Context:
        """Continue run ``run_id`` from its newest checkpoint in ``store`` and return its context.

        This is how a run survives its process: with ``checkpoint_store`` set, every state
        completion is saved; after a crash, a new process builds the same agent and calls
        this. Completed states are not run again; states that were running re-run. The
        store defaults to this agent's ``checkpoint_store``, else the default SQLite file.
        A run that already completed is restored without running anything.
        """
        from .checkpoint_store import open_default_store

        if store is None:
            store = self.checkpoint_store if self.checkpoint_store is not None else open_default_store()
        self.checkpoint_store = store
        checkpoint = store.latest(run_id)
        if checkpoint is None:
            raise CheckpointError(
                f"no checkpoint of run {run_id!r} in {store!r}: check the run id (list_runs() "
                "shows the runs a store holds) and that the agent saved to this store"
            )
        checkpoint.validate_for(self.name, self._states)
        if checkpoint.agent_status in (AgentStatus.FAILED.value, AgentStatus.CANCELLED.value):
            raise CheckpointError(
                f"run {run_id} ended {checkpoint.agent_status}: there is nothing to resume; "
                "start a new run"
            )
        await self.restore_from_checkpoint(checkpoint)
        if checkpoint.agent_status != AgentStatus.COMPLETED.value:
            await self.resume()
        return self.context

    def _after_completion(self, run: Run) -> None:
        if self.checkpoint_store is not None:
            try:
                self._save_checkpoint()
            except CheckpointError as exc:  # e.g. a context value JSON cannot hold
                run.fail(CheckpointError(f"run {run.run_id} cannot be checkpointed: {exc}"))

    def _save_checkpoint(self, checkpoint: AgentCheckpoint | None = None) -> None:
        checkpoint = checkpoint or self.create_checkpoint()
        if self.checkpoint_store is not None:
            self.checkpoint_store.save(checkpoint.run_id, checkpoint)

    async def _save_periodically(self, run: Run) -> None:
        assert self.checkpoint_interval
        while not run.done.is_set():
            await asyncio.sleep(self.checkpoint_interval)
            if not run.done.is_set():
                self._save_checkpoint()

    # --- logs ---------------------------------------------------------------------------------

    def logs(self, state: str, attempt: int | None = None) -> str:
        """Captured stdout/stderr of an isolated state's attempt (the last one by default)."""
        if state not in self._states:
            raise UnknownStateError(f"agent {self.name!r} has no state {state!r}")
        from .supervisor.logs import read_attempt_log

        number = attempt if attempt is not None else self.state_metadata[state].attempts
        return read_attempt_log(self.run_id or "", state, number)

    def __repr__(self) -> str:
        return f"Agent({self.name!r}, states={len(self._states)}, status={self.status.value})"


def _snapshot_frames(run: Run) -> dict[str, Any]:
    """The run's fan-out groups and live activations, as plain data."""
    def frame(a: _Activation, attempts_done: int) -> dict[str, Any]:
        return {"state": a.state, "group": a.group, "attempt": attempts_done, "via_dependency": a.via_dependency}

    queued = list(run.ready) + list(run.waiting) + list(run.retrying.values()) + list(run.paused)
    # A running attempt re-runs on resume, so it is not counted as done.
    acts = [frame(a, a.attempt) for a in queued] + [frame(a, a.attempt - 1) for a in run.running.values()]
    return {
        "groups": [{"id": g.id, "parent": g.parent, "active": g.active, "held": list(g.held)} for g in run.groups.values()],
        "activations": acts,
        "watch": sorted(run.watch),
        "completions": dict(run.completions),
        "steps": run.steps,
    }


def _restore_frames(run: Run, checkpoint: AgentCheckpoint) -> None:
    """Rebuild groups and activations of a checkpointed run; running states re-run."""
    frames = checkpoint.frames or {}
    groups = frames.get("groups")
    specs = run.specs
    if not groups:  # a checkpoint without frames: pending and running states restart at the root
        names = [n for n in list(checkpoint.running_states) + list(checkpoint.pending_states) if n in specs]
        for name, spec in specs.items():
            if spec.dependencies and name not in run.completed and name not in names:
                run.watch.add(name)
        for name in dict.fromkeys(names):
            run.root.active += 1
            run.activate(name, run.root)
        return
    run.groups.clear()
    for g in groups:
        group = _Group(int(g["id"]), g["parent"])
        group.active = int(g["active"])
        group.held = dict.fromkeys(n for n in g["held"] if n in specs)
        run.groups[group.id] = group
    run.root = run.groups.setdefault(0, _Group(0, None))
    top = max(run.groups) if run.groups else 0
    run._ids = itertools.count(top + 1)
    run.watch = {n for n in frames.get("watch", []) if n in specs}
    run.completions = {k: int(v) for k, v in frames.get("completions", {}).items()}
    run.steps = int(frames.get("steps", 0))  # max_steps counts the whole run, across a resume
    for a in frames.get("activations", []):
        name = a["state"]
        if name not in specs:
            continue
        group = run.groups.get(int(a["group"]), run.root)
        act = _Activation(next(run._ids), name, group.id, int(specs[name].priority), run.clock())
        act.attempt = int(a.get("attempt", 0))
        act.via_dependency = bool(a.get("via_dependency"))
        meta = run.metadata[name]
        meta.status = StateStatus.PENDING
        if specs[name].dependencies and not act.via_dependency:
            run.waiting.append(act)
        else:
            run.make_ready(act)
