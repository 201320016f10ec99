"""Which context keys a state may see: ``add_state(..., context_keys=[...])``.

A scope is a list of exact key names and ``"prefix*"`` patterns; it covers reads and
writes alike. A sandboxed state without ``context_keys`` gets the empty scope (it sees
no key: untrusted code is given data, it does not go looking for it); inline and
process states without one see the whole context, as before.

The supervisor enforces the scope: it sends a child only the keys in scope and kills a
child that writes outside it (a protocol violation). The child enforces it too, so that
state code gets a clear :class:`~agent.errors.ContextScopeError` at the offending call
rather than a killed process.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from . import values
from .context import Context, TypedContextData
from .errors import ContextScopeError, InvalidConfigurationError
from .executor import Isolation


class ContextScope:
    """A set of key names and ``"prefix*"`` patterns (immutable)."""

    __slots__ = ("patterns", "_exact", "_prefixes")

    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns: tuple[str, ...] = tuple(patterns)
        self._exact = frozenset(p for p in self.patterns if not p.endswith("*"))
        self._prefixes = tuple(p[:-1] for p in self.patterns if p.endswith("*"))

    def allows(self, key: str) -> bool:
        return key in self._exact or key.startswith(self._prefixes)

    def __repr__(self) -> str:
        return f"ContextScope({list(self.patterns)!r})"


def check_context_keys(state: str, keys: Any) -> tuple[str, ...] | None:
    """``add_state``'s ``context_keys`` as a tuple, or raise naming what is wrong."""
    if keys is None:
        return None
    if isinstance(keys, str) or not isinstance(keys, Iterable):
        raise InvalidConfigurationError(
            f"state {state!r}: context_keys must be a list of key names or 'prefix*' patterns, "
            f"got {keys!r}"
        )
    out = []
    for key in keys:
        if not isinstance(key, str) or not key or "*" in key[:-1]:
            raise InvalidConfigurationError(
                f"state {state!r}: context_keys entry {key!r} is not a key name or a 'prefix*' "
                "pattern (a non-empty str with at most one '*', at its end)"
            )
        out.append(key)
    return tuple(out)


def scope_for(isolation: Isolation, context_keys: tuple[str, ...] | None) -> ContextScope | None:
    """The scope of a state: its ``context_keys``, none for a sandbox without them, else all."""
    if context_keys is not None:
        return ContextScope(context_keys)
    if isolation is Isolation.SANDBOX:
        return ContextScope(())
    return None


class ScopedContext(Context):
    """A :class:`Context` that raises :class:`ContextScopeError` outside its scope."""

    __slots__ = ("scope",)

    def __init__(self, data: dict[str, Any] | None, scope: ContextScope, **kwargs: Any) -> None:
        super().__init__(data, **kwargs)
        self.scope = scope

    @classmethod
    def over(cls, context: Context, scope: ContextScope) -> "ScopedContext":
        """A scoped view on the same store as ``context``, with its hooks."""
        scoped = cls(
            context._data, scope, state_name=context.state_name, attempt=context.attempt,
            run_id=context.run_id, on_write=context._on_write, human_input=context._human_hook(),
            budget=context._budget,
        )
        scoped._failures = context._failures
        return scoped

    def view(self, **kwargs: Any) -> "ScopedContext":
        return ScopedContext.over(super().view(**kwargs), self.scope)

    def _check(self, key: Any, verb: str) -> None:
        if isinstance(key, str) and not self.scope.allows(key):
            given = list(self.scope.patterns)
            hint = (f"its context_keys are {given}" if given
                    else "a sandboxed state sees no context key unless it is given context_keys")
            raise ContextScopeError(
                f"state {self.state_name!r} may not {verb} context key {key!r}: {hint}; "
                f"add it to add_state({self.state_name!r}, ..., context_keys=[...])"
            )

    def set_state(self, key: str, value: Any) -> None:
        self._check(key, "write")
        super().set_state(key, value)

    def get_state(self, key: str, default: Any = None) -> Any:
        self._check(key, "read")
        return super().get_state(key, default)

    def remove_state(self, key: str) -> bool:
        self._check(key, "write")
        return super().remove_state(key)

    def has_state(self, key: str) -> bool:
        self._check(key, "read")
        return super().has_state(key)

    def __contains__(self, key: object) -> bool:
        self._check(key, "read")
        return super().__contains__(key)

    def get_typed(self, key: str, expected: type[Any]) -> Any:
        self._check(key, "read")
        return super().get_typed(key, expected)

    def update_typed(self, key: str, **changes: Any) -> TypedContextData:
        self._check(key, "write")
        return super().update_typed(key, **changes)

    def keys(self) -> list[str]:
        return [k for k in self._data if self.scope.allows(k)]

    def to_dict(self) -> dict[str, Any]:
        return {k: values.detached(v) for k, v in self._data.items() if self.scope.allows(k)}

    def _stored(self) -> Iterable[tuple[str, Any]]:
        return [(k, v) for k, v in self._data.items() if self.scope.allows(k)]

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def __repr__(self) -> str:
        return f"ScopedContext(state={self.state_name!r}, keys={self.keys()!r}, scope={list(self.scope.patterns)!r})"
