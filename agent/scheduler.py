"""The scheduler of one run: what runs when (DESIGN.md "Execution semantics").

A run is a tree of *groups*. The run itself is the root group; a state that returns a
list opens a child group (a fan-out) whose branches are the listed states. A branch
that returns a name does not start it at once: the name is *held* in its group until
every branch of the group has finished. Then each distinct held name runs once. One
name left means the fan-out has joined, and that state continues the branch that
opened the fan-out; several names form the next wave of the same group. So
``[a, b]`` where both return ``"merge"`` runs ``merge`` once, after ``a`` and ``b``,
and nested fan-outs join at their own level.

States with declared dependencies also start when their dependencies are met, whether
or not anything returns them (they join the root group). A state never runs
concurrently with itself within a run; a second activation waits for the first.

Inline states without coordination hooks are started *eagerly*: the coroutine is
stepped synchronously, and only if it actually awaits something is it wrapped in a
task. A no-op state therefore costs no task, which is what makes inline runs fast.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import itertools
import time
import traceback
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

from . import events as ev
from .dependencies import DependencyLifecycle as Life
from .dependencies import DependencyType as Dep
from .errors import (
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
)
from .executor import Attempt, AttemptFailed, Isolation, executor_for
from .state import AttemptRecord, StateSpec
from .status import AgentStatus, StateStatus

if TYPE_CHECKING:
    from .agent import Agent
    from .context import Context

_FINISHED_FOR_GOOD = (StateStatus.FAILED, StateStatus.TIMEOUT, StateStatus.CANCELLED, StateStatus.BLOCKED)


class _Group:
    __slots__ = ("id", "parent", "active", "held")

    def __init__(self, gid: int, parent: int | None) -> None:
        self.id = gid
        self.parent = parent
        self.active = 0
        self.held: dict[str, None] = {}


class _Activation:
    __slots__ = (
        "id", "state", "group", "priority", "attempt", "via_dependency", "waiting_since",
        "task", "stop_reason", "started_at", "timer", "attempt_obj", "holds_resources", "owner",
    )

    def __init__(self, aid: int, state: str, group: int, priority: int, now: float) -> None:
        self.id = aid
        self.state = state
        self.group = group
        self.priority = priority
        self.attempt = 0
        self.via_dependency = False
        self.waiting_since = now
        self.task: asyncio.Task[Any] | None = None
        self.stop_reason: str | None = None
        self.started_at = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.attempt_obj: Attempt | None = None
        self.holds_resources = False
        self.owner = state  # the pool owner key; qualified when another run holds the same name

    def __lt__(self, other: "_Activation") -> bool:  # heap order: priority desc, FIFO
        return (-self.priority, self.id) < (-other.priority, other.id)


class _Resume:
    """Continues a coroutine that was stepped once eagerly, inside a Task."""

    __slots__ = ("coro", "first")

    def __init__(self, coro: Any, first: Any) -> None:
        self.coro = coro
        self.first = first

    def __await__(self) -> Generator[Any, Any, Any]:
        coro = self.coro
        yielded = self.first
        while True:
            try:
                sent = yield yielded
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # noqa: BLE001 - delivered into the coroutine
                try:
                    yielded = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    yielded = coro.send(sent)
                except StopIteration as stop:
                    return stop.value


class Run:
    """One execution of an agent's states, from start to a terminal status."""

    def __init__(
        self,
        agent: "Agent",
        run_id: str,
        context: "Context",
        observers: tuple[ev.Observer, ...],
        cleanup_timeout: float,
    ) -> None:
        self.agent = agent
        self.run_id = run_id
        self.context = context
        self.observers = observers
        self.cleanup_timeout = cleanup_timeout
        self.loop = asyncio.get_running_loop()
        self.clock = time.monotonic
        self._ids = itertools.count(1)
        self.groups: dict[int, _Group] = {0: _Group(0, None)}
        self.root = self.groups[0]
        self.ready: list[_Activation] = agent.priority_queue
        self.ready.clear()
        self.running: dict[str, _Activation] = agent._running_states
        self.running.clear()
        self.waiting: list[_Activation] = []  # activations whose dependencies are not met
        self.retrying: dict[int, _Activation] = {}  # activations sleeping before a retry
        self.paused: list[_Activation] = []
        self.watch: set[str] = set()  # dependency-driven states not (re)triggered yet
        self.consumed: dict[tuple[str, str], int] = {}
        self.completions: dict[str, int] = {}
        self.finishes: dict[str, int] = {}
        self.starts: dict[str, int] = {}
        self.last_completion: dict[str, float] = {}
        self.last_start: dict[str, float] = {}
        self.watch_since: float = self.clock()
        self.steps = 0
        self.error: BaseException | None = None
        self.done = asyncio.Event()
        self.wake = asyncio.Event()
        self.timers: list[tuple[float, int]] = []  # (deadline, activation id or 0 for a recheck)
        self.rechecks: set[float] = set()
        self.wake_handle: asyncio.TimerHandle | None = None
        self.pause_requested = False
        self.cancelled = False
        self.pumping = False
        self.specs = agent._states
        self.metadata = agent.state_metadata
        self.pool = agent.resource_pool
        self.max_concurrent = agent.max_concurrent
        self.max_steps = agent.max_steps
        self.hooks = agent._admission_hooks
        self.default_isolation = agent.isolation
        self.completed = agent.completed_states
        self.human_hooks: dict[str, Any] = {}

    # --- events ---------------------------------------------------------------------

    def emit(self, kind: str, state: str | None = None, **fields: Any) -> None:
        if not self.observers:
            return
        event = ev.RunEvent(kind=kind, agent_name=self.agent.name, run_id=self.run_id, state=state, **fields)
        for observer in self.observers:
            try:
                observer(event)
            except Exception:  # an observer must never break a run
                self.observers = tuple(o for o in self.observers if o is not observer)
                self.agent._log.exception("observer %r raised and was detached", observer)

    # --- building activations --------------------------------------------------------

    def start(self, names: list[str]) -> None:
        """Schedule the start states and watch every dependency-driven state."""
        self.emit(ev.RUN_STARTED)
        for name, spec in self.specs.items():
            if spec.dependencies and name not in names:
                self.watch.add(name)
                self.add_dependency_timers(name, self.watch_since)
        for name in dict.fromkeys(names):
            self.root.active += 1
            self.activate(name, self.root)

    def activate(self, name: str, group: _Group, *, via_dependency: bool = False) -> None:
        """Create an activation of ``name`` in ``group`` (the caller counted the branch)."""
        if self.done.is_set():
            return
        spec = self.specs[name]
        self.steps += 1
        if self.max_steps is not None and self.steps > self.max_steps:
            self.fail(MaxStepsExceededError(
                f"run exceeded max_steps={self.max_steps} state activations (last: {name!r}); "
                "a state probably loops forever: add an exit condition or raise Agent(max_steps=...)"
            ))
            return
        act = _Activation(next(self._ids), name, group.id, int(spec.priority), self.clock())
        act.via_dependency = via_dependency
        meta = self.metadata[name]
        meta.attempts = 0
        meta.error = None
        meta.blocked_reason = None
        if spec.dependencies and not via_dependency:
            meta.set_status(StateStatus.PENDING)
            meta.waiting_for = "dependencies"
            self.waiting.append(act)
            self.add_dependency_timers(name, act.waiting_since)
            return
        self.make_ready(act)

    def make_ready(self, act: _Activation) -> None:
        meta = self.metadata[act.state]
        meta.set_status(StateStatus.READY)
        meta.waiting_for = None
        heapq.heappush(self.ready, act)

    # --- the pump --------------------------------------------------------------------

    def pump(self) -> None:
        """Do everything that can be done now, without awaiting."""
        if self.pumping:
            return
        self.pumping = True
        try:
            while not self.done.is_set():
                progressed = self.fire_timers()
                if self.waiting or self.watch:
                    progressed |= self.check_dependencies()
                progressed |= self.launch_ready()
                if not progressed:
                    break
            if not self.done.is_set():
                self.check_quiescent()
        finally:
            self.pumping = False

    def fire_timers(self) -> bool:
        fired = False
        now = self.clock()
        while self.timers and self.timers[0][0] <= now:
            deadline, aid = heapq.heappop(self.timers)
            self.rechecks.discard(deadline)
            fired = True
            act = self.retrying.pop(aid, None)
            if act is not None and not self.pause_requested:
                self.make_ready(act)
            elif act is not None:
                self.paused.append(act)
        return fired

    def add_timer(self, deadline: float, aid: int = 0) -> None:
        """Wake the pump at ``deadline``: for a retry (``aid``) or a dependency recheck (0)."""
        if not aid:
            if deadline in self.rechecks:
                return
            self.rechecks.add(deadline)
        heapq.heappush(self.timers, (deadline, aid))

    def launch_ready(self) -> bool:
        if not self.ready or self.pause_requested:
            return False
        launched = False
        deferred: list[_Activation] = []
        blocked_priority: int | None = None
        ready = self.ready
        while ready:
            if self.max_concurrent is not None and len(self.running) >= self.max_concurrent:
                for act in ready:
                    self.metadata[act.state].waiting_for = f"max_concurrent={self.max_concurrent}"
                break
            act = heapq.heappop(ready)
            name = act.state
            if name in self.running:  # never concurrently with itself
                self.metadata[name].waiting_for = "the previous activation of the same state"
                deferred.append(act)
                continue
            spec = self.specs[name]
            req = spec.resources
            if req is not None:
                if blocked_priority is not None and act.priority <= blocked_priority:
                    deferred.append(act)
                    continue
                if self.pool.holder_priority(name) is not None:  # another agent's state of this name
                    act.owner = f"{name}@{self.run_id[:8]}"
                try:
                    got = self.pool.try_acquire(act.owner, req, state=name, priority=act.priority)
                except QuotaExceededError as exc:  # a quota in "fail" mode refused it
                    meta = self.metadata[name]
                    meta.set_status(StateStatus.BLOCKED)
                    meta.blocked_reason = str(exc)
                    self.fail(exc)
                    break
                if not got:
                    if not self.try_preempt(act, req):
                        short = self.pool.blocking_resource(req)
                        why = f"resources: not enough {short.name if short else 'capacity'} free"
                        self.metadata[name].waiting_for = why
                        self.pool.mark_waiting(act.owner, why)
                        self.emit(ev.STATE_QUEUED, name, data={"waiting_for": why})
                        blocked_priority = act.priority
                        deferred.append(act)
                        continue
                    if not self.pool.try_acquire(act.owner, req, state=name, priority=act.priority):
                        deferred.append(act)
                        blocked_priority = act.priority
                        continue
                act.holds_resources = True
            launched = True
            self.launch(act, spec)
            if self.done.is_set():
                break
        for act in deferred:
            heapq.heappush(ready, act)
        return launched

    def try_preempt(self, act: _Activation, req: Any) -> bool:
        """With preemption enabled, stop lower-priority holders so ``act`` fits (item 10)."""
        if not getattr(self.pool, "enable_preemption", False):
            return False
        victims = self.agent._choose_victims(self, act, req)
        if not victims:
            return False
        for victim in victims:
            self.stop_activation(victim, "preempt")
        return True

    # --- running an attempt -------------------------------------------------------------

    def launch(self, act: _Activation, spec: StateSpec) -> None:
        name = act.state
        act.attempt += 1
        act.stop_reason = None
        now = self.clock()
        act.started_at = now
        self.running[name] = act
        self.starts[name] = self.starts.get(name, 0) + 1
        self.last_start[name] = now
        meta = self.metadata[name]
        meta.set_status(StateStatus.RUNNING)
        meta.attempts = act.attempt
        meta.total_attempts += 1
        meta.waiting_for = None
        meta.started_at = now
        meta.last_execution = time.time()
        if spec.resources is not None:
            self.pool.unmark_waiting(act.owner)
        if self.observers:  # what it holds from the pool, for the allocation metrics
            self.emit(ev.STATE_STARTED, name, attempt=act.attempt,
                      data={"resources": spec.resources} if spec.resources is not None else {})
        isolation = spec.isolation or self.default_isolation
        hook = self.human_hooks.get(name)
        if hook is None:
            hook = self.human_hooks[name] = self.agent._human_hook(name)
        view = self.context.view(state_name=name, attempt=act.attempt, human_input=hook)
        timeout = spec.effective_timeout
        if isolation is Isolation.INLINE and not self.hooks:
            try:
                coro = spec.func(view)
                first = coro.send(None)
            except StopIteration as stop:
                self.finished(act, stop.value, None, {})
                return
            except BaseException as exc:  # noqa: BLE001 - the state's own failure
                if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    raise
                self.finished(act, None, _exception_reason(exc), {})
                return
            act.task = self.loop.create_task(self.continue_inline(act, coro, first))
        else:
            attempt = Attempt(
                run_id=self.run_id,
                agent_name=self.agent.name,
                state_name=name,
                func=spec.func,
                number=act.attempt,
                context=view,
                resources=spec.resources,
                isolation=isolation,
                timeout=timeout,
            )
            act.attempt_obj = attempt
            act.task = self.loop.create_task(self.run_attempt(act, attempt))
        act.task.add_done_callback(functools.partial(self.task_done, act))
        if self.done.is_set():
            self.stop_activation(act, "cancel")
        elif timeout is not None:
            act.timer = self.loop.call_later(timeout, self.stop_activation, act, "timeout")

    def task_done(self, act: _Activation, task: asyncio.Task[Any]) -> None:
        # A task cancelled before its first step never ran its own handler.
        if self.running.get(act.state) is act and act.task is task:
            self.finished(act, None, None, {})

    async def continue_inline(self, act: _Activation, coro: Any, first: Any) -> None:
        try:
            result = await _Resume(coro, first)
        except asyncio.CancelledError:
            self.finished(act, None, None, {})
            return
        except Exception as exc:
            self.finished(act, None, _exception_reason(exc), {})
            return
        self.finished(act, result, None, {})

    async def run_attempt(self, act: _Activation, attempt: Attempt) -> None:
        entered: list[Any] = []
        ok = False
        try:
            for hook in self.hooks:
                await hook.acquire(attempt.state_name, self.run_id, attempt.number)
                entered.append(hook)
            outcome = await executor_for(attempt.isolation).run_attempt(attempt)
        except asyncio.CancelledError:
            self.finished(act, None, None, dict(attempt.usage))
        except AttemptFailed as failed:
            self.finished(act, None, failed.reason, failed.usage)
        except Exception as exc:
            self.finished(act, None, _exception_reason(exc), dict(attempt.usage))
        else:
            ok = True
            self.finished(act, outcome.result, None, outcome.usage)
        finally:
            for hook in reversed(entered):
                try:
                    await hook.release(attempt.state_name, self.run_id, attempt.number, ok)
                except Exception:
                    self.agent._log.exception("admission hook %r failed to release", hook)
            if entered:
                self.kick()

    def stop_activation(self, act: _Activation, reason: str) -> None:
        """Ask a running activation to stop: timeout, cancel, preempt or pause."""
        if self.running.get(act.state) is not act or act.task is None:
            return
        act.stop_reason = reason
        if act.attempt_obj is not None:
            act.attempt_obj.stop_reason = reason
        act.task.cancel()

    def finished(self, act: _Activation, result: Any, failure: FailureReason | None, usage: dict[str, Any]) -> None:
        """Account for an attempt that ended, then decide what comes next."""
        try:
            self._finished(act, result, failure, usage)
        except Exception as exc:  # an engine bug must end the run visibly, not hang it
            self.agent._log.exception("internal error while finishing %r", act.state)
            self.fail(exc)

    def _finished(self, act: _Activation, result: Any, failure: FailureReason | None, usage: dict[str, Any]) -> None:
        name = act.state
        if self.running.get(name) is not act:
            return
        del self.running[name]
        if act.timer is not None:
            act.timer.cancel()
            act.timer = None
        act.task = None
        if act.holds_resources:
            self.pool.release(act.owner)
            act.holds_resources = False
            if usage:
                self.pool.record_measured(act.owner, usage)
        now = self.clock()
        meta = self.metadata[name]
        meta.finished_at = now
        if usage:
            meta.usage = dict(usage)
        stop = act.stop_reason
        duration = now - act.started_at
        if not self.pumping:
            self.kick()
        if stop in ("preempt", "pause"):
            act.attempt -= 1  # not a failed attempt
            meta.attempts = act.attempt
            meta.total_attempts -= 1
            meta.record(AttemptRecord(act.attempt + 1, act.started_at, now, "preempted" if stop == "preempt" else "paused", usage=usage))
            if stop == "preempt":
                meta.preemptions += 1
                self.emit(ev.STATE_PREEMPTED, name, attempt=act.attempt + 1, duration=duration, usage=usage)
            meta.set_status(StateStatus.PENDING)
            if stop == "pause" or self.pause_requested:
                self.paused.append(act)
            else:
                self.make_ready(act)
            return
        if stop == "cancel":
            meta.record(AttemptRecord(act.attempt, act.started_at, now, "cancelled", usage=usage))
            meta.set_status(StateStatus.CANCELLED)
            self.emit(ev.STATE_CANCELLED, name, attempt=act.attempt, duration=duration, usage=usage)
            self.finishes[name] = self.finishes.get(name, 0) + 1
            self.end_branch(act)
            return
        if stop == "timeout":
            limit = self.specs[name].effective_timeout
            failure = FailureReason(
                kind="timeout",
                message=f"timed out after {limit:g} s (attempt {act.attempt})",
                details={"timeout": limit},
            )
        if failure is None:
            self.succeeded(act, result, duration, usage, now)
        else:
            self.attempt_failed(act, failure, duration, usage, now)

    def succeeded(self, act: _Activation, result: Any, duration: float, usage: dict[str, Any], now: float) -> None:
        name = act.state
        meta = self.metadata[name]
        try:
            nexts = self.validate_result(name, result)
        except AgentError as exc:
            meta.record(AttemptRecord(act.attempt, act.started_at, now, "failed", str(exc), usage))
            meta.error = FailureReason(kind="exception", message=str(exc), exception_type=type(exc).__name__)
            meta.set_status(StateStatus.FAILED)
            self.fail(exc)
            return
        meta.record(AttemptRecord(act.attempt, act.started_at, now, "completed", usage=usage))
        meta.set_status(StateStatus.COMPLETED)
        meta.runs += 1
        meta.last_success = time.time()
        self.completed.add(name)
        self.completions[name] = self.completions.get(name, 0) + 1
        self.finishes[name] = self.finishes.get(name, 0) + 1
        self.last_completion[name] = now
        self.agent._session_completions[name] = self.agent._session_completions.get(name, 0) + 1
        if self.observers:
            handed_to = [] if nexts is None else [nexts] if isinstance(nexts, str) else list(nexts)
            self.emit(ev.STATE_COMPLETED, name, attempt=act.attempt, duration=duration, usage=usage,
                      data={"next": handed_to})
        group = self.groups[act.group]
        if nexts is None:
            self.end_branch(act)
        elif isinstance(nexts, str):
            group.held[nexts] = None
            self.branch_done(group)
        else:
            child = _Group(next(self._ids), group.id)
            self.groups[child.id] = child
            child.active = len(nexts)
            for n in nexts:
                self.activate(n, child)
        # Checkpoint only now: the completion and the transitions it caused are saved
        # together, so a run resumed from this checkpoint continues where this state led.
        if self.agent.checkpoint_store is not None:
            self.agent._after_completion(self)

    def validate_result(self, name: str, result: Any) -> str | list[str] | None:
        if result is None:
            return None
        if isinstance(result, str):
            if result not in self.specs:
                raise UnknownNextStateError(_unknown_next(name, result, self.specs))
            return result
        if isinstance(result, (list, tuple)):
            names = list(dict.fromkeys(result))
            for n in names:
                if not isinstance(n, str):
                    raise InvalidTransitionError(
                        f"state {name!r} returned a list containing {type(n).__name__} {n!r}: "
                        "a list may hold only state names (str)"
                    )
                if n not in self.specs:
                    raise UnknownNextStateError(_unknown_next(name, n, self.specs))
            return names or None
        raise InvalidTransitionError(
            f"state {name!r} returned {type(result).__name__} {result!r}: return the next state's "
            "name (str), a list of names to run in parallel, or None to end this branch"
        )

    def attempt_failed(self, act: _Activation, failure: FailureReason, duration: float, usage: dict[str, Any], now: float) -> None:
        name = act.state
        spec = self.specs[name]
        meta = self.metadata[name]
        meta.error = failure
        outcome = "timeout" if failure.kind == "timeout" else "failed"
        meta.record(AttemptRecord(act.attempt, act.started_at, now, outcome, failure.message, usage))
        max_retries = spec.max_retries_with(self.agent.retry_policy)
        policy = spec.retry_policy or self.agent.retry_policy
        final = act.attempt > max_retries or (failure.permanent and not (policy and policy.retry_permanent))
        self.emit(ev.STATE_FAILED, name, attempt=act.attempt, duration=duration, usage=usage,
                  error=failure.message, data={"final": final, "kind": failure.kind})
        if not final:
            delay = policy.delay(act.attempt) if policy is not None else 0.0
            meta.set_status(StateStatus.READY)
            meta.waiting_for = f"retry {act.attempt} of {max_retries} in {delay:.3g} s"
            self.emit(ev.STATE_RETRYING, name, attempt=act.attempt, data={"delay": delay})
            if delay <= 0:
                self.make_ready(act)
            else:
                self.retrying[act.id] = act
                self.add_timer(now + delay, act.id)
            return
        meta.set_status(StateStatus.TIMEOUT if failure.kind == "timeout" else StateStatus.FAILED)
        self.finishes[name] = self.finishes.get(name, 0) + 1
        cls = StateTimeoutError if failure.kind == "timeout" else StateFailedError
        self.fail(cls(name, act.attempt, failure))

    # --- groups and joins ----------------------------------------------------------------

    def end_branch(self, act: _Activation) -> None:
        group = self.groups.get(act.group)
        if group is not None:
            self.branch_done(group)

    def branch_done(self, group: _Group) -> None:
        group.active -= 1
        while group.active == 0:
            names = list(group.held)
            group.held.clear()
            parent = self.groups.get(group.parent) if group.parent is not None else None
            if not names:
                if parent is None:
                    return
                del self.groups[group.id]
                parent.active -= 1
                group = parent
                continue
            if len(names) == 1 and parent is not None:
                del self.groups[group.id]  # joined: continue the branch that opened it
                self.activate(names[0], parent)
                return
            group.active = len(names)
            for n in names:
                self.activate(n, group)
            return

    # --- dependencies --------------------------------------------------------------------

    def check_dependencies(self) -> bool:
        progressed = False
        now = self.clock()
        if self.waiting:
            still: list[_Activation] = []
            for act in self.waiting:
                verdict = self.deps_verdict(act.state, act.waiting_since, now)
                if verdict is True:
                    self.emit(ev.DEPENDENCY_RESOLVED, act.state, duration=now - act.waiting_since)
                    self.consume(act.state)
                    self.make_ready(act)
                    progressed = True
                elif isinstance(verdict, tuple):
                    self.dependency_gave_up(act, *verdict)
                    progressed = True
                    if self.done.is_set():
                        return True
                else:
                    self.metadata[act.state].waiting_for = verdict
                    still.append(act)
            self.waiting = still
        for name in list(self.watch):
            if name in self.running or self.has_live(name):
                continue
            verdict = self.deps_verdict(name, self.watch_since, now)
            if verdict is True:
                self.emit(ev.DEPENDENCY_RESOLVED, name, duration=now - self.watch_since)
                self.consume(name)
                self.root.active += 1
                self.activate(name, self.root, via_dependency=True)
                progressed = True
            elif isinstance(verdict, tuple):
                self.watch.discard(name)
                status, message = verdict
                meta = self.metadata[name]
                meta.blocked_reason = message
                meta.set_status(status)
                if status is StateStatus.TIMEOUT:
                    self.fail(DependencyTimeoutError(message))
                    return True
        return progressed

    def has_live(self, name: str) -> bool:
        """Whether ``name`` has an activation queued, waiting, retrying, held or running."""
        if name in self.running:
            return True
        if any(a.state == name for a in self.ready):
            return True
        if any(a.state == name for a in self.retrying.values()):
            return True
        if any(a.state == name for a in self.waiting):
            return True
        if any(a.state == name for a in self.paused):
            return True
        return any(name in g.held for g in self.groups.values())

    def consume(self, name: str) -> None:
        """Record that ``name`` starts on its dependencies as they are now."""
        deps = self.specs[name].dependencies
        for dep in deps:
            self.consumed[(name, dep)] = self.completions.get(dep, 0)
        self.last_start[name] = self.clock()
        if not any(c.lifecycle in (Life.ALWAYS, Life.PERIODIC) for c in deps.values()):
            self.watch.discard(name)  # triggered once per run: a returned activation counts

    def deps_verdict(self, name: str, since: float, now: float) -> Any:
        """True when met; a reason string while waiting; (status, message) when it never can be."""
        spec = self.specs[name]
        for dep, cfg in spec.dependencies.items():
            dmeta = self.metadata[dep]
            life = cfg.lifecycle
            if cfg.timeout is not None and now - since > cfg.timeout:
                return (StateStatus.TIMEOUT,
                        f"state {name!r} waited more than {cfg.timeout:g} s for its dependency {dep!r}")
            if cfg.type is Dep.REQUIRED:
                if dmeta.status in _FINISHED_FOR_GOOD and not self.has_live(dep) and self.completions.get(dep, 0) == 0 \
                        and not (life is Life.SESSION and self.agent._session_completions.get(dep, 0)):
                    return (StateStatus.BLOCKED,
                            f"state {name!r} is blocked: its required dependency {dep!r} ended {dmeta.status.value}")
                count = self.completions.get(dep, 0)
                if life is Life.SESSION:
                    count = max(count, self.agent._session_completions.get(dep, 0))
                if life in (Life.ALWAYS, Life.PERIODIC):
                    met = count > self.consumed.get((name, dep), 0)
                elif life is Life.TEMPORARY:
                    last = self.last_completion.get(dep)
                    met = last is not None and now - last <= (cfg.expiry or 0.0)
                else:
                    met = count >= 1
                if not met:
                    return f"dependency {dep!r} to complete"
            elif cfg.type is Dep.OPTIONAL:
                if self.has_live(dep):
                    return f"optional dependency {dep!r}, which is scheduled"
            elif cfg.type is Dep.PARALLEL:
                if self.starts.get(dep, 0) == 0:
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
                    self.add_timer(last + cfg.interval)
                    return f"periodic interval of {cfg.interval:g} s since its last run"
            if cfg.condition is not None:
                try:
                    ok = bool(cfg.condition(self.agent))
                except Exception as exc:  # a broken condition keeps the state waiting, visibly
                    return f"condition on {dep!r} raised {exc!r}"
                if not ok:
                    return f"condition on dependency {dep!r} to hold"
        return True

    def add_dependency_timers(self, name: str, since: float) -> None:
        for cfg in self.specs[name].dependencies.values():
            if cfg.timeout is not None:
                self.add_timer(since + cfg.timeout + 1e-3)

    def dependency_gave_up(self, act: _Activation, status: StateStatus, message: str) -> None:
        meta = self.metadata[act.state]
        meta.blocked_reason = message
        meta.set_status(status)
        if status is StateStatus.TIMEOUT:
            self.fail(DependencyTimeoutError(message))
            return
        self.emit(ev.STATE_BLOCKED, act.state, error=message)
        self.end_branch(act)

    # --- ending ----------------------------------------------------------------------------

    def check_quiescent(self) -> None:
        # Retry delays keep a run alive; a periodic re-run that is not due yet does not.
        if self.running or self.ready or self.retrying or self.pause_requested:
            return
        # Nothing can change any more: whatever still waits on dependencies is blocked.
        for act in self.waiting:
            meta = self.metadata[act.state]
            reason = meta.waiting_for or "dependencies"
            meta.blocked_reason = f"state {act.state!r} never ran: it was waiting for {reason}"
            meta.set_status(StateStatus.BLOCKED)
            self.emit(ev.STATE_BLOCKED, act.state, error=meta.blocked_reason)
        self.waiting.clear()
        for name in self.watch:
            meta = self.metadata[name]
            if meta.status is StateStatus.PENDING and meta.runs == 0:
                verdict = self.deps_verdict(name, self.watch_since, self.clock())
                reason = verdict if isinstance(verdict, str) else "its dependencies"
                meta.blocked_reason = f"state {name!r} never ran: it was waiting for {reason}"
                meta.set_status(StateStatus.BLOCKED)
        self.watch.clear()
        self.finish(AgentStatus.COMPLETED)

    def fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        self.finish(AgentStatus.FAILED)

    def finish(self, status: AgentStatus) -> None:
        if self.done.is_set():
            return
        self.final_status = status
        self.done.set()
        self.kick()

    def kick(self) -> None:
        self.wake.set()

    def stop_all(self, reason: str) -> list[asyncio.Task[Any]]:
        tasks = []
        for act in list(self.running.values()):
            if act.task is not None:
                tasks.append(act.task)
                self.stop_activation(act, reason)
        return tasks

    async def drive(self, deadline: float | None) -> None:
        """Pump until the run ends; raise its error, if any."""
        wake = self.wake
        loop = self.loop
        try:
            while True:
                wake.clear()
                self.pump()
                if self.done.is_set():
                    break
                next_at = self.timers[0][0] if self.timers else None
                if deadline is not None and (next_at is None or deadline < next_at):
                    next_at = deadline
                handle = loop.call_at(loop.time() + max(0.0, next_at - self.clock()), wake.set) if next_at is not None else None
                try:
                    await wake.wait()
                finally:
                    if handle is not None:
                        handle.cancel()
                if deadline is not None and self.clock() >= deadline and not self.done.is_set():
                    self.error = RunTimeoutError(
                        f"run of agent {self.agent.name!r} did not finish within its timeout; "
                        f"still running: {sorted(self.running) or 'nothing'}"
                    )
                    self.finish(AgentStatus.FAILED)
                    break
        except asyncio.CancelledError:
            self.error = None
            self.final_status = AgentStatus.CANCELLED
            await self.cleanup("cancel")
            raise
        await self.cleanup("cancel")

    async def cleanup(self, reason: str) -> None:
        """Stop whatever still runs and wait for it, up to ``cleanup_timeout``."""
        tasks = self.stop_all(reason)
        for act in self.ready:
            self.metadata[act.state].set_status(StateStatus.CANCELLED)
        if tasks:
            await asyncio.wait(tasks, timeout=self.cleanup_timeout or None)
        for act in list(self.running.values()):  # tasks that ignored cancellation in time
            meta = self.metadata[act.state]
            if not meta.status.is_finished:
                meta.set_status(StateStatus.CANCELLED)
            if act.holds_resources:
                self.pool.release(act.owner)
        self.running.clear()
        self.ready.clear()
        for act in self.retrying.values():
            meta = self.metadata[act.state]
            if meta.status is StateStatus.READY:
                meta.set_status(StateStatus.CANCELLED)
        self.retrying.clear()
        self.timers.clear()
        self.rechecks.clear()


def _exception_reason(exc: BaseException) -> FailureReason:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return FailureReason(
        kind="exception",
        message=f"{type(exc).__name__}: {exc}",
        traceback=tb,
        exception_type=type(exc).__name__,
    )


def _unknown_next(name: str, target: str, specs: dict[str, StateSpec]) -> str:
    import difflib

    close = difflib.get_close_matches(target, list(specs), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return (f"state {name!r} returned {target!r}, which is not a state of this agent{hint}: "
            "add it with add_state() or return an existing name")
