"""Checks for the numbers the public API takes: one place, one wording.

A setting is checked when it is given, not when it is first used: a NaN compares false
with everything (a ``nan`` retry delay never elapses), an infinity is rarely what was
meant (``None`` says "no limit" where there can be none), a bool is an ``int`` to
Python but never a count or a duration here, and a string is a mistake. Each check
raises the calling module's typed error (``error=``) with a message that names the
setting, the value and what to give instead, and returns the value as the type the
engine works with.
"""

from __future__ import annotations

import enum
import inspect
import math
from typing import Any

from .errors import AgentError

ErrorType = type[AgentError]


def number(
    value: Any,
    what: str,
    *,
    error: ErrorType,
    minimum: float = 0.0,
    above: bool = False,
    none: bool = False,
    unit: str | None = None,
) -> float | None:
    """``value`` as a finite float ``>= minimum`` (``> minimum`` with ``above``); None if ``none``.

    ``unit`` ("seconds") only words the message: "a number of seconds > 0".
    """
    if value is None and none:
        return None
    kind = f"a number of {unit}" if unit else "a number"
    bound = f"{'>' if above else '>='} {minimum:g}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise error(f"{what} must be {kind} {bound}{_or_none(none)}, got {shown(value)}")
    as_float = finite_float(value)
    if math.isnan(as_float) or math.isinf(as_float):
        hint = ": use None for no limit" if none and as_float > 0 else ""
        raise error(f"{what} must be a finite {kind[2:]} {bound}{_or_none(none)}, got {shown(value)}{hint}")
    if as_float < minimum or (above and as_float == minimum):
        raise error(f"{what} must be {kind} {bound}{_or_none(none)}, got {value!r}")
    return as_float


def finite_float(value: Any) -> float:
    """Real number ``value`` as a float; one too large for a float (``10**400``) as an infinity
    of its sign, which the caller then refuses as it refuses ``inf``, rather than an ``OverflowError``."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def integer(
    value: Any, what: str, *, error: ErrorType, minimum: int = 0, none: bool = False,
    maximum: int | None = None, why_maximum: str = "",
) -> int | None:
    """``value`` as an int ``>= minimum`` (bools and floats refused); None if ``none``.

    ``maximum`` (with ``why_maximum``, what sets it) bounds it too."""
    if value is None and none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise error(f"{what} must be an int >= {minimum}{_or_none(none)}, got {shown(value)}")
    if value < minimum:
        raise error(f"{what} must be an int >= {minimum}{_or_none(none)}, got {value!r}")
    if maximum is not None and value > maximum:
        raise error(f"{what} must be at most {maximum}{why_maximum}, got {shown(value)}")
    return int(value)


def flag(value: Any, what: str, *, error: ErrorType) -> bool:
    """``value`` when it is a bool: ``"yes"`` or ``1`` is a mistake, not a truth value."""
    if not isinstance(value, bool):
        raise error(f"{what} must be True or False, got {shown(value)}")
    return value


def _or_none(none: bool) -> str:
    return " (or None)" if none else ""


SHOWN_REPR_CHARS = 80
"""Characters of a refused value's ``repr`` a message quotes (a wrong value may be huge)."""


def shown(value: Any) -> str:
    """``str 'x'``: the type and a ``repr`` cut to :data:`SHOWN_REPR_CHARS`, for a message."""
    try:
        text = repr(value)
    except Exception as exc:  # noqa: BLE001 - a broken __repr__ must not hide the refusal
        text = f"<unprintable: {type(exc).__name__}>"
    if len(text) > SHOWN_REPR_CHARS:
        text = f"{text[:SHOWN_REPR_CHARS]}..."
    return f"{type(value).__name__} {text}"


def member(enum_type: Any, value: Any, what: str, *, error: ErrorType) -> Any:
    """``value`` as a member of ``enum_type`` (a member, or its value; never a bool)."""
    if isinstance(value, enum_type):
        return value
    if not isinstance(value, (bool, float)):  # 1.0 is no priority, True no flag
        try:
            found = enum_type(value)
        except (ValueError, TypeError):
            pass
        else:
            if not isinstance(found, enum.Flag) or value & ~_all_flags(enum_type) == 0:  # no stray bits
                return found
    choices = ", ".join(f"{enum_type.__name__}.{m.name}" for m in enum_type)
    if issubclass(enum_type, enum.Flag):
        choices += " (or several joined with |)"
    raise error(f"{what} must be one of {choices}, got {shown(value)}")


def _all_flags(flag_type: Any) -> int:
    bits = 0
    for flag in flag_type:
        bits |= flag.value
    return bits


MAX_STATE_NAME_BYTES = 255
"""A state name names files (its attempt logs) and cgroups: at most NAME_MAX bytes."""


def state_name(name: Any, *, error: ErrorType) -> str:
    """A state name: a non-empty str of at most :data:`MAX_STATE_NAME_BYTES` UTF-8 bytes."""
    if not isinstance(name, str) or not name:
        raise error(f"a state name must be a non-empty str, got {name!r}")
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise error(
            f"state name {name[:40]!r} holds a lone surrogate (an undecodable byte, as os.listdir gives "
            "them), which is no text: names go into files, cgroups and messages between processes as "
            "UTF-8; decode such bytes with errors='replace' or name the state otherwise"
        ) from None
    if size > MAX_STATE_NAME_BYTES:
        raise error(
            f"state name {name[:40]!r}... is {size} bytes long; the limit is "
            f"{MAX_STATE_NAME_BYTES} (names become file and cgroup names): use a shorter name"
        )
    return name


def function(value: Any, what: str, *, error: ErrorType, expected: str, none: bool = False) -> Any:
    """``value`` when it is callable (a clock, a sleep, a callback); None if ``none``.

    ``expected`` words what to give: "a function returning seconds, like time.monotonic".
    """
    if value is None and none:
        return None
    if not callable(value):
        raise error(f"{what} must be {expected}{_or_none(none)}, got {shown(value)}")
    return value


def methods(value: Any, what: str, names: tuple[str, ...], *, error: ErrorType, expected: str,
            none: bool = False) -> Any:
    """``value`` when it has a callable attribute for each of ``names`` (a duck-typed
    collaborator: a random source, a clock object, a GPU inventory); None if ``none``.

    The check is by attribute, not by class, so a test double passes as the real thing.
    """
    if value is None and none:
        return None
    missing = [name for name in names if not callable(getattr(value, name, None))]
    if missing:
        lacks = ", ".join(f"{name}()" for name in missing)
        raise error(f"{what} must be {expected}{_or_none(none)}, got {shown(value)} (it has no {lacks})")
    return value


def one_argument(func: Any, what: str, *, error: ErrorType, takes: str, not_async: str | None = None) -> None:
    """Refuse callable ``func`` when it cannot be called with one argument (``takes`` names
    it); and, with ``not_async`` (what to do instead), when it is an ``async def`` one,
    for a caller that does not await what it returns. Checked when it is given: else it
    fails at every call, far from the mistake. A callable without a signature to read
    (some builtins) is taken as it is."""
    name = getattr(func, "__name__", func)
    call = getattr(type(func), "__call__", None)  # noqa: B004 (an object's own __call__)
    if not_async is not None and (inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(call)):
        raise error(f"{what} {name!r} is an async function, which would be called and never awaited: {not_async}")
    try:
        inspect.signature(func).bind(object())
    except TypeError:
        raise error(f"{what} {name!r} must take one argument, {takes}") from None
    except ValueError:
        pass
