"""The run's key/value store as a state sees it.

One store per run, owned by the supervisor. Each state attempt gets a ``Context``
view on it: inline states write straight into the run's store; an isolated child holds
a snapshot and every write is also handed to ``on_write`` (which sends it to the
supervisor). Typed data are :class:`TypedContextData` dataclasses, checked against
their annotations when stored and when updated.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Awaitable, TypeVar, Union

from .errors import ContextKeyError, ContextTypeError, HumanInputError

T = TypeVar("T", bound="TypedContextData")

WriteHook = Callable[[str, Any, bool], None]
"""``on_write(key, value, deleted)``, called after every write to the store."""

HumanInputHook = Callable[..., Awaitable[str]]

_MISSING = object()
_new_context = object.__new__
_NO_FAILURES: dict[str, str] = {}


class TypedContextData:
    """Base class for structured context values; subclasses are ``@dataclass`` classes.

    Field values are checked against the annotations on ``set_typed`` and
    ``update_typed``, and only subclasses of this class are decoded when a value
    comes back from an isolated state.
    """

    _registry: dict[str, type["TypedContextData"]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        TypedContextData._registry[f"{cls.__module__}:{cls.__qualname__}"] = cls

    @staticmethod
    def lookup(name: str) -> type["TypedContextData"] | None:
        """A subclass by ``"module:qualname"``, if this process has defined it.

        Codecs use this before importing, so classes defined in a workflow file that was
        run as a script (``__main__``) still decode.
        """
        return TypedContextData._registry.get(name)

    def validate(self) -> None:
        """Raise :class:`ContextTypeError` when a field does not match its annotation."""
        cls = type(self)
        if not dataclasses.is_dataclass(self):
            raise ContextTypeError(
                f"{cls.__name__} derives from TypedContextData but is not a dataclass: "
                "decorate it with @dataclass"
            )
        hints = _type_hints(cls)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            expected = hints.get(f.name, Any)
            if not _matches(value, expected):
                raise ContextTypeError(
                    f"{cls.__name__}.{f.name} must be {_type_name(expected)}, "
                    f"got {type(value).__name__} {value!r}"
                )


def _type_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # unresolved forward references: fall back to no checking
        return {}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _matches(value: Any, tp: Any) -> bool:
    """A small runtime check of ``value`` against an annotation (containers included)."""
    if tp is Any or tp is object:
        return True
    origin = typing.get_origin(tp)
    if origin is None:
        if tp is None or tp is type(None):
            return value is None
        if tp is float:
            return isinstance(value, (int, float)) and not isinstance(value, bool)
        if tp is int:
            return isinstance(value, int) and not isinstance(value, bool)
        if isinstance(tp, TypeVar):
            return True
        if isinstance(tp, type):
            return isinstance(value, tp)
        return True  # an annotation we cannot check at run time (e.g. a Protocol alias)
    args = typing.get_args(tp)
    if origin is Union or origin is types.UnionType:
        return any(_matches(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if origin is typing.Annotated:
        return _matches(value, args[0])
    if origin in (list, set, frozenset):
        if not isinstance(value, origin):
            return False
        return not args or all(_matches(v, args[0]) for v in value)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if not args:
            return True
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return len(args) == len(value) and all(_matches(v, a) for v, a in zip(value, args))
    if origin in (dict, Mapping, typing.Mapping):
        if not isinstance(value, Mapping):
            return False
        if not args:
            return True
        return all(_matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items())
    if isinstance(origin, type):
        return isinstance(value, origin)
    return True


class Context:
    """Key/value data shared by the states of one run."""

    __slots__ = ("_data", "_on_write", "_human_input", "_failures", "state_name", "attempt", "run_id")

    def __init__(
        self,
        data: dict[str, Any] | None = None,
        *,
        state_name: str | None = None,
        attempt: int = 0,
        run_id: str | None = None,
        on_write: WriteHook | None = None,
        human_input: HumanInputHook | None = None,
    ) -> None:
        self._data: dict[str, Any] = {} if data is None else data
        self._on_write = on_write
        self._human_input = human_input
        self._failures: dict[str, str] = _NO_FAILURES
        self.state_name = state_name
        self.attempt = attempt
        self.run_id = run_id

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
            human_input=human_input if human_input is not None else self._human_input,
        )
        view._failures = self._failures
        return view

    def _attempt_view(self, state_name: str, attempt: int, human_input: HumanInputHook | None) -> "Context":
        """:meth:`view` for the engine's hot path: positional, no keyword parsing, same result."""
        view = _new_context(Context)
        view._data = self._data
        view._on_write = self._on_write
        view._human_input = human_input if human_input is not None else self._human_input
        view._failures = self._failures
        view.state_name = state_name
        view.attempt = attempt
        view.run_id = self.run_id
        return view

    def failed_states(self) -> dict[str, str]:
        """States of this run that failed for good so far, with why (their last attempt's reason).

        Only a run whose states may fail without failing the run (``on_failure="continue"``)
        goes on after a failure, so this is where a join learns which branches did not
        make it.
        """
        return dict(self._failures)

    # --- plain values ---------------------------------------------------------------

    def set_state(self, key: str, value: Any) -> None:
        """Store ``value`` under ``key`` (last writer wins)."""
        if not isinstance(key, str):
            raise ContextTypeError(f"context keys are strings, got {type(key).__name__} {key!r}")
        if self._on_write is not None:
            self._on_write(key, value, False)
        self._data[key] = value

    def get_state(self, key: str, default: Any = None) -> Any:
        """The value under ``key``, or ``default`` when there is none."""
        return self._data.get(key, default)

    def remove_state(self, key: str) -> bool:
        """Remove ``key``; returns whether it was there."""
        if key not in self._data:
            return False
        if self._on_write is not None:
            self._on_write(key, None, True)
        del self._data[key]
        return True

    def has_state(self, key: str) -> bool:
        return key in self._data

    def keys(self) -> list[str]:
        return list(self._data)

    def to_dict(self) -> dict[str, Any]:
        """A shallow copy of the store."""
        return dict(self._data)

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
        value.validate()
        self.set_state(key, value)

    def get_typed(self, key: str, expected: type[T]) -> T:
        """The typed value under ``key``; raises when it is missing or of another type."""
        value = self._data.get(key, _MISSING)
        if value is _MISSING:
            raise ContextKeyError(f"no typed value under {key!r}: store one with set_typed first")
        if not isinstance(value, expected):
            raise ContextTypeError(
                f"context key {key!r} holds {type(value).__name__}, not {expected.__name__}"
            )
        return value

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
        updated = dataclasses.replace(current, **changes)  # type: ignore[type-var]
        updated.validate()
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
        if self._human_input is None:
            raise HumanInputError(
                "no human input provider is attached to this context: run the state "
                "through an Agent, or pass human_input= when building the Context"
            )
        return await self._human_input(
            prompt=prompt, timeout=timeout, validator=validator, default=default
        )
