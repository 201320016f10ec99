"""The run's key/value store as a state sees it.

One store per run, owned by the supervisor. Each state attempt gets a ``Context``
view on it: inline states write straight into the run's store; an isolated child holds
a snapshot and every write is also handed to ``on_write`` (which sends it to the
supervisor). Every write is checked against the one value model (:mod:`agent.values`),
in every isolation level, and counted against the run's byte budget, so a value that
works inline works in a child process and in a checkpoint, and no run can grow past
what a child's start message can carry.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Awaitable, TypeVar

from . import _env, _validate, values
from .errors import (
    ContextBudgetError,
    ContextKeyError,
    ContextTypeError,
    FailureReason,
    HumanInputError,
    InvalidConfigurationError,
    IsolationError,
    UnencodableValueError,
)
from .values import TypedContextData
from .human import check_question

T = TypeVar("T", bound=TypedContextData)

WriteHook = Callable[[str, Any, bool], None]
"""``on_write(key, value, deleted)``, called after every write to the store."""

HumanInputHook = Callable[..., Awaitable[str]]

_MISSING = object()
_new_context = object.__new__
_NO_FAILURES: dict[str, str] = {}

__all__ = ["Context", "ContextBudget", "TypedContextData", "default_budget", "budget_from_mb"]


_DEFAULT_BUDGET = values.DEFAULT_MAX_FRAME * 3 // 4
MIN_BUDGET = 1024
"""The smallest context budget, in bytes: room for a few small keys."""


def default_budget() -> int:
    """The default context budget: three quarters of the frame cap (48 MiB by default)."""
    if not _env.get("AGENT_IPC_MAX_FRAME"):
        return _DEFAULT_BUDGET  # read per Agent(): the common case without parsing
    return values.max_frame_from_env() * 3 // 4


def budget_from_mb(mb: float | None) -> int:
    """``Agent(context_budget_mb=...)`` in bytes; None gives :func:`default_budget`.

    A budget must leave room in a child's start message for the state function, so it is
    at most the frame cap (``AGENT_IPC_MAX_FRAME``) less 1 MiB, or a sixteenth of a smaller
    cap (:func:`agent.values.snapshot_room`).
    """
    if mb is None:
        return default_budget()
    _validate.number(mb, "context_budget_mb", error=InvalidConfigurationError, above=True)
    budget = int(mb * values.MIB)
    if budget < MIN_BUDGET:
        raise InvalidConfigurationError(
            f"context_budget_mb={mb:g} is {budget} bytes, too little for any key: give at least "
            f"{MIN_BUDGET / values.MIB:g} ({MIN_BUDGET:,} bytes)"
        )
    most = values.snapshot_room(values.max_frame_from_env())
    if budget > most:
        raise InvalidConfigurationError(
            f"context_budget_mb={mb:g} is over what one child's start message can carry "
            f"({most / values.MIB:g} MiB: the frame cap less "
            f"{(values.max_frame_from_env() - most) / values.MIB:g} MiB for the state function): "
            "lower it, or raise AGENT_IPC_MAX_FRAME"
        )
    return budget


class ContextBudget:
    """The byte budget of one run's context, and what each key takes of it.

    A key takes its encoded value plus its name (:func:`agent.values.entry_size`): what it
    adds to the start message of every isolated state. ``used`` may start above the sum
    of ``sizes`` in a child, whose snapshot may leave keys out.
    """

    __slots__ = ("limit", "used", "sizes")

    def __init__(self, limit: int, used: int = 0, sizes: dict[str, int] | None = None) -> None:
        self.limit = limit
        self.used = used
        self.sizes: dict[str, int] = sizes if sizes is not None else {}

    def admit(self, key: str, size: int) -> int:
        """The total once ``key`` takes ``size``; raises ContextBudgetError past the limit."""
        used = self.used - self.sizes.get(key, 0) + size
        if used > self.limit:
            raise ContextBudgetError(
                f"context key {key!r}: storing {_mib(size)} would take the run's context to "
                f"{_mib(used)}, over its budget of {_mib(self.limit)}: keep large data in files "
                "and store their paths, remove keys no longer needed, or raise "
                "Agent(context_budget_mb=...)"
            )
        return used


def _mib(n: int) -> str:
    return f"{n / values.MIB:.1f} MiB" if n >= values.MIB else f"{n:,} bytes"


class Context:
    """Key/value data shared by the states of one run."""

    __slots__ = ("_data", "_budget", "_on_write", "_human_input", "_human_for", "_failures", "state_name", "attempt",
                 "run_id")

    def __init__(
        self,
        data: dict[str, Any] | None = None,
        *,
        state_name: str | None = None,
        attempt: int = 0,
        run_id: str | None = None,
        on_write: WriteHook | None = None,
        human_input: HumanInputHook | None = None,
        budget: int | ContextBudget | None = None,
    ) -> None:
        """``data`` is taken over, each value checked and counted against ``budget`` (bytes;
        default :func:`default_budget`). A :class:`ContextBudget` is shared as it is: the
        views of one run, or a child's snapshot already counted."""
        self._data: dict[str, Any] = {} if data is None else data
        if not isinstance(budget, ContextBudget):
            budget = ContextBudget(default_budget() if budget is None else budget)
            for key, value in self._data.items():
                _check_key(key)
                size = values.entry_size(key, values.check(value, key=key))
                budget.used = budget.admit(key, size)
                budget.sizes[key] = size
        self._budget = budget
        self._on_write = on_write
        self._human_input = human_input
        self._human_for: Callable[[str], HumanInputHook] | None = None
        self._failures: dict[str, str] = _NO_FAILURES
        self.state_name = state_name
        self.attempt = attempt
        self.run_id = run_id

    @classmethod
    def empty(cls, budget: int) -> "Context":
        """``Context(budget=budget)``, without keyword parsing: one per ``Agent()`` and per run."""
        context = _new_context(cls)
        context._data = {}
        context._budget = ContextBudget(budget)
        context._on_write = context._human_input = context._human_for = None
        context._failures = _NO_FAILURES
        context.state_name = context.run_id = None
        context.attempt = 0
        return context

    def view(
        self,
        *,
        state_name: str | None,
        attempt: int = 0,
        on_write: WriteHook | None = None,
        human_input: HumanInputHook | None = None,
    ) -> "Context":
        """A context on the same store, for one state attempt."""
        view = Context(
            self._data,
            state_name=state_name,
            attempt=attempt,
            run_id=self.run_id,
            on_write=on_write if on_write is not None else self._on_write,
            human_input=human_input if human_input is not None else self._human_hook(),
            budget=self._budget,
        )
        view._failures = self._failures
        return view

    def _attempt_view(self, state_name: str, attempt: int, human_for: Callable[[str], HumanInputHook]) -> "Context":
        """:meth:`view` for the engine's hot path: positional, no keyword parsing. Its
        human-input hook is ``human_for(state_name)``, made when the state first asks (most
        never do)."""
        view = _new_context(Context)
        view._data = self._data
        view._budget = self._budget
        view._on_write = self._on_write
        view._human_input = self._human_input
        view._human_for = human_for
        view._failures = self._failures
        view.state_name = state_name
        view.attempt = attempt
        view.run_id = self.run_id
        return view

    def _human_hook(self) -> HumanInputHook | None:
        """Where :meth:`human_in_the_loop` asks (the engine's hook for this state is made here)."""
        if self._human_for is not None:
            self._human_input = self._human_for(self.state_name)  # type: ignore[arg-type]
            self._human_for = None
        return self._human_input

    def failed_states(self) -> dict[str, str]:
        """States of this run that failed for good so far, with why (their last attempt's reason).

        Only a run whose states may fail without failing the run (``on_failure="continue"``)
        goes on after a failure, so this is where a join learns which branches did not
        make it.
        """
        return dict(self._failures)

    @property
    def budget(self) -> ContextBudget:
        """The run's byte budget and what its keys take of it."""
        return self._budget

    # --- plain values ---------------------------------------------------------------

    def set_state(self, key: str, value: Any) -> None:
        """Store ``value`` under ``key`` (last writer wins).

        Raises :class:`~agent.errors.UnencodableValueError` for a value outside the value
        model and :class:`~agent.errors.ContextBudgetError` past the run's budget; nothing
        is stored then.
        """
        if type(key) is not str:
            _check_key(key)
        size = values.entry_check(key, value)
        self._store(key, values.detached(value), size)  # the caller's object stays the caller's

    def _set_all(self, items: Iterable[tuple[Any, Any]]) -> None:
        """:meth:`set_state` of each pair, all or nothing: a pair refused leaves the
        context as it was (``run(initial_context=...)``)."""
        budget = self._budget
        saved = dict(self._data), budget.used, dict(budget.sizes)
        try:
            for key, value in items:
                self.set_state(key, value)
        except BaseException:
            self._data.clear()
            self._data.update(saved[0])
            budget.used = saved[1]
            budget.sizes.clear()
            budget.sizes.update(saved[2])
            raise

    def _store(self, key: str, value: Any, size: int) -> None:
        """Store a value already checked (``size`` from :func:`agent.values.entry_size`)."""
        budget = self._budget
        used = budget.used - budget.sizes.get(key, 0) + size
        if used > budget.limit:
            budget.admit(key, size)  # raises, saying why
        if self._on_write is not None:
            self._on_write(key, value, False)
        budget.used = used
        budget.sizes[key] = size
        self._data[key] = value

    def get_state(self, key: str, default: Any = None) -> Any:
        """The value under ``key``, or ``default`` when there is none.

        A copy of what is stored when it could be changed in place (a list, a dict, a set,
        typed data): changing it is not a write; :meth:`set_state` is.
        """
        try:
            value = self._data.get(key, _MISSING)
        except TypeError:  # unhashable: no key
            _check_read_key(key)
            raise
        if value is _MISSING:
            _check_read_key(key)
            return default
        return values.detached(value)

    def remove_state(self, key: str) -> bool:
        """Remove ``key``; returns whether it was there."""
        _check_read_key(key)
        if type(key) is not str:
            key = str.__str__(key)  # a StrEnum member names the key as get_state finds it
        if key not in self._data:
            return False
        if self._on_write is not None:
            self._on_write(key, None, True)
        del self._data[key]
        self._budget.used -= self._budget.sizes.pop(key, 0)
        return True

    def has_state(self, key: str) -> bool:
        _check_read_key(key)
        return key in self._data

    def keys(self) -> list[str]:
        return list(self._data)

    def to_dict(self) -> dict[str, Any]:
        """A copy of the store (its values copied as :meth:`get_state` copies them)."""
        return {k: values.detached(v) for k, v in self._data.items()}

    def _stored(self) -> Iterable[tuple[str, Any]]:
        """The keys and values this context sees, as stored (not copied: for encoding)."""
        return self._data.items()

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._data))

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"Context(state={self.state_name!r}, keys={list(self._data)!r})"

    # --- typed values ---------------------------------------------------------------

    def set_typed(self, key: str, value: TypedContextData) -> None:
        """Store a :class:`TypedContextData` after checking its fields against their types."""
        if not isinstance(value, TypedContextData):
            raise ContextTypeError(
                f"set_typed({key!r}, ...) needs a TypedContextData dataclass, got "
                f"{type(value).__name__}: derive the class from TypedContextData, or use set_state"
            )
        self.set_state(key, value)  # checks every field, at any depth, within the value model's bounds

    def get_typed(self, key: str, expected: type[T]) -> T:
        """The typed value under ``key``; raises when it is missing or of another type."""
        value = self._data.get(key, _MISSING)
        if value is _MISSING:
            raise ContextKeyError(f"no typed value under {key!r}: store one with set_typed first")
        cls = typing.get_origin(expected) or expected  # Box[int] is a Box
        if not isinstance(cls, type):
            raise ContextTypeError(f"get_typed({key!r}, ...) takes a TypedContextData class, got {expected!r}")
        if not isinstance(value, cls):
            raise ContextTypeError(
                f"context key {key!r} holds {type(value).__name__}, not {cls.__name__}"
            )
        return values.detached(value)  # type: ignore[no-any-return]

    def update_typed(self, key: str, **changes: Any) -> TypedContextData:
        """Replace fields of the typed value under ``key``; unknown fields and wrong types raise."""
        current = self._data.get(key, _MISSING)
        if current is _MISSING:
            raise ContextKeyError(f"no typed value under {key!r}: store one with set_typed first")
        if not isinstance(current, TypedContextData):
            raise ContextTypeError(
                f"context key {key!r} holds {type(current).__name__}, not TypedContextData: "
                "use set_state to replace it"
            )
        names = {f.name for f in dataclasses.fields(current)}  # type: ignore[arg-type]
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ContextTypeError(
                f"{type(current).__name__} has no field(s) {', '.join(unknown)}; "
                f"its fields are {', '.join(sorted(names))}"
            )
        try:
            updated = dataclasses.replace(current, **changes)  # type: ignore[type-var]
        except (TypeError, ValueError) as exc:  # a field declared init=False, a __post_init__ that refuses
            raise ContextTypeError(f"update_typed({key!r}, ...): {type(current).__name__}: {exc}") from exc
        self.set_state(key, updated)
        return updated

    # --- human input ----------------------------------------------------------------

    async def human_in_the_loop(
        self,
        prompt: str,
        timeout: float | None = None,
        validator: Callable[[str], bool] | None = None,
        default: str | None = None,
    ) -> str:
        """Ask a human and wait for a valid answer (DESIGN.md item 13).

        An answer the validator rejects is asked for again. On timeout the default is
        returned, or :class:`~agent.errors.HumanInputTimeoutError` raised without one.
        """
        timeout = check_question(prompt, timeout, validator, default)
        hook = self._human_hook()
        if hook is None:
            raise HumanInputError(
                "no human input provider is attached to this context: run the state "
                "through an Agent, or pass human_input= when building the Context"
            )
        return await hook(
            prompt=prompt, timeout=timeout, validator=validator, default=default
        )


def filled_by_others(exc: ContextBudgetError, seen: int, size: int, limit: int) -> FailureReason | None:
    """Why an isolated attempt whose write of ``size`` bytes the budget refused is stopped,
    when by what it could see (``seen``: its snapshot and its own writes) the write fitted:
    other states' writes filled the budget meanwhile, so it is not judged, and its retry
    sees them. None when it did not fit even so: a bound it passed."""
    if seen + size > limit:
        return None
    return FailureReason(
        kind="exception",
        message=f"{exc} (other states wrote to the run's context while this one ran: by what it could "
                "see, its write fitted; it was stopped, and a retry sees their writes)",
    )


def encode_snapshot(
    context: Context, state: str, bounds: values.Bounds,
) -> tuple[dict[str, bytes], tuple[type, ...]]:
    """The context as a state process or Ray task gets it: each value encoded on its own,
    and the TypedContextData classes they hold.

    Every value was checked when it was written, and the store's values are its own, but
    ``bounds`` may be stricter than the write's: a value past them cannot start the
    attempt (IsolationError, naming the key).
    """
    snapshot: dict[str, bytes] = {}
    classes: set[type] = set()
    for key, value in context._stored():
        try:
            values.check(value, bounds=bounds, key=key)
            snapshot[key] = values.encode(value, classes)
        except UnencodableValueError as exc:
            raise IsolationError(f"state {state!r} cannot start: {exc}") from None
    return snapshot, tuple(classes)


def _check_read_key(key: Any) -> None:
    """A key to look up: a str (a StrEnum member names the key it spells)."""
    if not isinstance(key, str):
        raise ContextTypeError(f"context keys are strings, got {type(key).__name__} {values.short_repr(key)}")


def _check_key(key: Any) -> None:
    if type(key) is not str:
        raise ContextTypeError(f"context keys are strings, got {type(key).__name__} {key!r}")
