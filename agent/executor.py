"""The one interface between the scheduler and the places where a state's code runs.

The scheduler decides *when* an attempt runs; an executor decides *where* and *how*.
``inline`` runs the coroutine on the scheduler's own loop. Isolated levels (``worker``,
``process``, ``sandbox``) live in :mod:`agent.supervisor`, which is looked up by name the first time
an isolated attempt runs (:data:`ISOLATED`), so the engine never imports cgroup, zygote
or GPU code, and a run of inline states never loads any of it. ``ray`` is served the
same way by :data:`RAY`, so nothing imports Ray before a Ray attempt runs.

Contract for :meth:`Executor.run_attempt`:

* return an :class:`AttemptOutcome` holding what the state returned (unvalidated);
* raise :class:`AttemptFailed` with a :class:`~agent.errors.FailureReason` when the
  attempt failed for a reason the executor observed (child exception, exit code, signal,
  limit hit, lost connection); an inline state's own exception may simply propagate;
* when the awaiting task is cancelled, stop the attempt for good (kill the child and
  reap it, remove its cgroup) *before* re-raising ``CancelledError``.
  ``attempt.stop_reason`` says why: ``"timeout"``, ``"cancel"`` or ``"preempt"``.
"""

from __future__ import annotations

import contextvars
import enum
import importlib
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Protocol, runtime_checkable

from .errors import FailureReason, InvalidConfigurationError, IsolationUnavailableError, RayUnavailableError

if TYPE_CHECKING:
    import asyncio

    from .context import Context
    from .resources import ResourceRequirements


class Isolation(str, enum.Enum):
    """Where a state's code runs (DESIGN.md item 9)."""

    INLINE = "inline"
    WORKER = "worker"
    PROCESS = "process"
    SANDBOX = "sandbox"
    RAY = "ray"

    @classmethod
    def parse(cls, value: "Isolation | str") -> "Isolation":
        """The level named by ``value``; a level this machine cannot serve at all is refused here."""
        level = _BY_NAME.get(value) if type(value) is str else None  # the common case: a level's name
        if level is None:
            if isinstance(value, Isolation):
                level = value
            else:
                try:
                    level = _BY_NAME[value]
                except (KeyError, TypeError):
                    try:
                        level = cls(str(value).lower())
                    except ValueError:
                        choices = ", ".join(repr(m.value) for m in cls)
                        raise IsolationUnavailableError(
                            f"unknown isolation level {value!r}: use one of {choices}"
                        ) from None
        if level is _RAY:
            require_ray()
        return level


_BY_NAME: dict[str, Isolation] = {level.value: level for level in Isolation}
_RAY = Isolation.RAY
parse_isolation = Isolation.parse
"""``Isolation.parse`` as a plain name (an Enum class's attributes are slow to read in 3.11)."""

RAY_MISSING = (
    "isolation='ray' needs Ray, which is not installed in this environment: install the "
    "project's ray extra (pip install 'agent-isolation[ray]')"
)


def require_ray() -> None:
    """Raise :class:`RayUnavailableError` unless Ray can be imported (without importing it)."""
    import importlib.util

    try:
        found = importlib.util.find_spec("ray") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise RayUnavailableError(RAY_MISSING)


@dataclass
class Attempt:
    """One attempt of one state, as handed to an executor."""

    run_id: str
    agent_name: str
    state_name: str
    func: Callable[..., Awaitable[Any]]
    number: int
    context: "Context"
    resources: "ResourceRequirements | None" = None
    isolation: Isolation = Isolation.INLINE
    timeout: float | None = None
    # Set by the scheduler before it cancels the attempt's task.
    stop_reason: str | None = None
    # Set by the scheduler with stop_reason when the attempt must stop sooner than the
    # supervisor's grace period (a run ending early: its cleanup_timeout): then it is killed.
    stop_grace: float | None = None
    # Set by the executor while it stops the attempt's process (killed once its grace is over).
    stopping: bool = False
    # Set by the executor with ``stopping``: kills the process now, whatever grace its stop began with.
    hurry: Callable[[], None] | None = None
    # Filled by the executor: measured usage (cpu_seconds, peak_memory_bytes, ...).
    usage: dict[str, Any] = field(default_factory=dict)
    # Filled by the executor when it stopped the attempt (a timeout, say) and its process
    # had hit a limit meanwhile: a fork bomb that ignores its refused forks runs until then.
    limit_hit: FailureReason | None = None
    # Filled by the scheduler from the resource pool (e.g. {"gpus": [uuid, ...]}).
    assignment: dict[str, Any] = field(default_factory=dict)
    # Set by a caller that takes the outcome before the attempt's process is gone: the
    # executor may then return as soon as the result is in, leaving the rest (the process
    # exiting, its cgroup removed, its log closed) to a task it adds here. The caller awaits
    # every task of the set before it reports the work finished (the engine: before a run
    # returns), so nothing outlives the run.
    settle: set[asyncio.Task[None]] | None = None


HELD_UP: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar(
    "agent_admission_held_up", default=None)
"""Set by the engine around an attempt's admission hooks: what :func:`admission_held_up` calls."""


FAIL_RUN: contextvars.ContextVar[Callable[[BaseException], None] | None] = contextvars.ContextVar(
    "agent_fail_run", default=None)
"""Set by the engine in each attempt's task: fails the attempt's run with the error given,
for what can no longer be promised to it (a box-wide primitive its code holds, lost with
agentd: the run must not go on as if it still excluded the other jobs)."""


def admission_held_up() -> None:
    """An admission hook is about to wait (a coordination primitive, a rate limit, a
    barrier): the attempt gives its pool grant back meanwhile, for others to use, and asks
    for it again once the hooks let it in. Nothing outside an attempt's hooks."""
    give_back = HELD_UP.get()
    if give_back is not None:
        give_back()


@dataclass
class AttemptOutcome:
    """What a finished attempt returned, plus what the executor measured."""

    result: Any
    usage: dict[str, Any] = field(default_factory=dict)


class AttemptFailed(Exception):
    """Raised by an executor when an attempt failed for an observed reason."""

    def __init__(self, reason: FailureReason, usage: dict[str, Any] | None = None) -> None:
        super().__init__(reason.message)
        self.reason = reason
        self.usage = usage or {}


@runtime_checkable
class Executor(Protocol):
    """Runs attempts of states somewhere."""

    async def run_attempt(self, attempt: Attempt) -> AttemptOutcome: ...

    async def aclose(self) -> None: ...


class InlineExecutor:
    """Runs the state coroutine on the scheduler's loop: fastest, trusted code only."""

    async def run_attempt(self, attempt: Attempt) -> AttemptOutcome:
        return AttemptOutcome(await attempt.func(attempt.context))

    async def aclose(self) -> None:
        return None


_INLINE = InlineExecutor()

ISOLATED = "agent.supervisor"
"""The module that serves every level but ``inline``: it provides ``get_executor(isolation)``
and ``read_attempt_log(run_id, state, attempt)``."""


RAY = "agent.ray.executor"
"""The module that serves ``ray``: it provides ``get_executor()`` and
``read_attempt_log(run_id, state, attempt)`` (None when it holds no such log)."""


def _isolated() -> Any:
    try:
        return importlib.import_module(ISOLATED)
    except ImportError as exc:  # pragma: no cover - only when the supervisor is missing
        raise IsolationUnavailableError(f"isolated execution needs {ISOLATED}, which failed to import: {exc}") from exc


def _ray() -> Any:
    try:
        # Not sys.modules.get(): on another thread the module may be still importing, and
        # import_module waits for that import to finish.
        return importlib.import_module(RAY)
    except ImportError as exc:
        if exc.name == "ray" or (exc.name or "").startswith("ray."):
            raise RayUnavailableError(RAY_MISSING) from exc
        raise IsolationUnavailableError(f"isolation='ray' needs {RAY}, which failed to import: {exc}") from exc


def executor_for(isolation: Isolation) -> Executor:
    """The executor serving ``isolation`` in this process (isolated ones are shared)."""
    if isolation is Isolation.INLINE:
        return _INLINE
    if isolation is Isolation.RAY:
        ray_executor: Executor = _ray().get_executor()
        return ray_executor
    executor: Executor = _isolated().get_executor(isolation)
    return executor


async def prepare_for(level: Isolation, timeout: float | None = None) -> None:
    """Have the executor of ``level`` (one the supervisor serves) start what its first
    attempt would otherwise wait for (the supervisor and its zygote, a few tenths of a
    second when cold), waiting at most ``timeout`` seconds. A run calls this before any
    state starts, so that no state's duration or timeout counts that start. Raises only
    :class:`InvalidConfigurationError` (a setting such as ``AGENT_STOP_GRACE=-1``: the run
    is refused before anything runs); a level that cannot start otherwise says so at its
    first attempt, which also waits for what is not ready yet."""
    try:
        await executor_for(level).prepare(timeout)  # type: ignore[attr-defined]
    except InvalidConfigurationError:
        raise
    except Exception:  # said again, with its reason, by the first attempt
        pass


def read_attempt_log(run_id: str, state: str, attempt: int) -> str:
    """The captured stdout/stderr of one isolated (or Ray) attempt."""
    ray_side = sys.modules.get(RAY)  # only once a Ray attempt ran in this process
    if ray_side is not None:
        found: str | None = ray_side.read_attempt_log(run_id, state, attempt)
        if found is not None:
            return found
    text: str = _isolated().read_attempt_log(run_id, state, attempt)
    return text
