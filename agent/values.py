"""The one value model: what a context value may be, in every isolation level.

A value is one of: None, bool, int (up to 8192 bits), float, str, bytes, list, tuple,
set, frozenset, dict with str keys, datetime, date, time (naive, or with a
``datetime.timezone`` or a keyed ``zoneinfo.ZoneInfo``), timedelta, Decimal, UUID, and
:class:`TypedContextData` dataclasses defined at module level, nested at most
:data:`MAX_DEPTH` levels and holding at most ``max_objects`` objects. Types are exact:
a subclass (an enum, a ``pathlib.Path``, a numpy scalar) is refused with the fix.

Everything that handles values goes through this module, so a value behaves the same
inline, in a child process and in a checkpoint:

* :func:`check` is run by every ``set_state``: it refuses what the model cannot carry
  (naming the key, the type and the fix) and returns the value's exact size on the wire,
  which the run's context budget counts;
* :func:`encode` / :func:`decode` are the process boundary (msgpack). Decoding is
  bounded (bytes, depth, objects, items per container) and never recursive: containers
  msgpack cannot tell apart (tuple, set, ...) and leaf types are arrays tagged by an empty
  extension marker as first element, turned back into objects by a hook as each array
  completes, so a hostile frame cannot overflow the C stack (the earlier codec nested an
  ``unpackb`` call per level and crashed the process at ~300 levels);
* :func:`to_json` / :func:`from_json` are the checkpoint form: plain JSON with tagged
  objects ``{"$type": ..., "value": ...}``;
* :func:`matches` is the one runtime type check, used for TypedContextData fields and
  for the schema of IPC frames.
"""

from __future__ import annotations

import base64
import copy as copy_module
import dataclasses
import datetime as _dt
import decimal
import enum
import functools
import importlib
import json
import os
import sys
import threading
import types
import typing
import uuid
import weakref
import zoneinfo
from collections.abc import Mapping
from itertools import repeat
from dataclasses import dataclass
from typing import Any, TypeVar, Union

import msgpack

from . import _env
from .errors import (
    BoundExceededError,
    CheckpointError,
    ContextTypeError,
    InvalidConfigurationError,
    ProtocolError,
    UnencodableValueError,
    ValueTooLargeError,
    utf8_text,
)

MIB = 1024 * 1024

MAX_DEPTH = 64
"""Containers (and typed dataclasses) nest at most this many levels (an empty one at the
bottom adds none)."""

MAX_OBJECTS = 1_000_000
"""Objects one value may hold: every element of every container, dict keys included."""

MAX_ITEMS = 1_000_000
"""Elements one container may hold."""

MAX_INT_BITS = 8192
"""Ints beyond 64 bits are carried up to this size (about 2,466 decimal digits)."""

DEFAULT_MAX_FRAME = 64 * MIB
"""Default cap on one message between processes (``AGENT_IPC_MAX_FRAME``)."""

FRAME_OVERHEAD = 64 * 1024
"""Room for the message around a value of the cap: what a channel lets through on top."""

FRAME_OBJECTS = 64
"""Objects a message's own fields (and their names) may add to those of the value it
carries: a value ``set_state`` accepted is never refused for the frame around it."""

def snapshot_room(max_frame: int) -> int:
    """What a child's start message can give the context: the frame cap less the room kept
    for the state function and the other fields (1 MiB, or a sixteenth of a smaller cap)."""
    return max_frame - min(MIB, max_frame // 16)

ATTEMPT_FRAMES = 64
"""One attempt may send at most this many frame caps of data, and objects, in all."""

_FIX = (
    "store None, bool, int, float, str, bytes, lists, tuples, sets, dicts with str keys, "
    "datetimes, dates, times, timedeltas, Decimal, UUID or TypedContextData dataclasses"
)


MAX_FRAME_MOST = 1 << 40
"""The largest frame cap ``AGENT_IPC_MAX_FRAME`` may set (1 TiB: more than a machine holds;
the socket library refuses caps past 2**63)."""


def max_frame_from_env() -> int:
    """The frame cap: ``AGENT_IPC_MAX_FRAME`` bytes, else 64 MiB."""
    raw = _env.get("AGENT_IPC_MAX_FRAME")
    if not raw:
        return DEFAULT_MAX_FRAME
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not MIB <= value <= MAX_FRAME_MOST:
        raise InvalidConfigurationError(
            f"AGENT_IPC_MAX_FRAME={raw!r}: give a number of bytes from {MIB} to {MAX_FRAME_MOST}")
    return value


@dataclass(frozen=True)
class Bounds:
    """Caps on what one process may make the other decode, per frame and per attempt."""

    max_frame: int = DEFAULT_MAX_FRAME
    max_depth: int = MAX_DEPTH
    max_objects: int = MAX_OBJECTS
    max_items: int = MAX_ITEMS

    @property
    def attempt_bytes(self) -> int:
        """Bytes of frames one attempt may send in all."""
        return ATTEMPT_FRAMES * self.max_frame

    @property
    def attempt_objects(self) -> int:
        """Decoded objects one attempt may send in all."""
        return ATTEMPT_FRAMES * self.max_objects


DEFAULT_BOUNDS = Bounds()


# --- TypedContextData ----------------------------------------------------------------------

T = TypeVar("T", bound="TypedContextData")


class TypedContextData:
    """Base class for structured context values; subclasses are ``@dataclass`` classes.

    Field values are checked against the annotations on ``set_typed`` and
    ``update_typed``, and only subclasses of this class, defined at module level, are
    rebuilt when a value comes back from another process or a checkpoint.
    """

    _registry: dict[str, type["TypedContextData"]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        TypedContextData._registry[f"{cls.__module__}:{cls.__qualname__}"] = cls

    @staticmethod
    def lookup(name: str) -> type["TypedContextData"] | None:
        """A dataclass subclass by ``"module:qualname"``, if this process has defined it.

        The latest class of that name is registered, and cloudpickle makes an empty
        skeleton of a class it rebuilds (then may keep the class it built before): a
        skeleton of a subclass is a dataclass through its base alone, so the class with
        fields of its own is taken first.
        """
        cls = TypedContextData._registry.get(name)
        if cls is not None and "__dataclass_fields__" in cls.__dict__:
            return cls
        module_name, _, qualname = name.partition(":")
        found = _defined_subclass(module_name, qualname)
        if found is not None:
            return found
        return cls if cls is not None and dataclasses.is_dataclass(cls) else None

    def validate(self) -> None:
        """Raise :class:`ContextTypeError` when a field does not match its annotation."""
        cls = type(self)
        mismatch = self._mismatch()
        if mismatch is not None:
            raise ContextTypeError(mismatch)
        hints = _type_hints(cls)
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            expected = hints.get(f.name, Any)
            if _may_hold_typed(expected):
                try:
                    _validate_within(value)
                except ContextTypeError as exc:
                    raise ContextTypeError(f"{cls.__name__}.{f.name}: {exc}") from None

    def _mismatch(self) -> str | None:
        """What is wrong with this value's own fields (not those of typed values inside them)."""
        cls = type(self)
        if not dataclasses.is_dataclass(self):
            return f"{cls.__name__} derives from TypedContextData but is not a dataclass: decorate it with @dataclass"
        hints = _type_hints(cls)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            expected = hints.get(f.name, Any)
            if not matches(value, expected):
                return f"{cls.__name__}.{f.name} must be {_type_name(expected)}, got {type(value).__name__} {value!r}"
        return None


def _validate_within(value: Any) -> None:
    """Validate the typed data ``value`` holds, at any depth (a field of a typed value is
    checked against its own class's annotations too)."""
    t = type(value)
    if t in _IMMUTABLE:
        return
    if isinstance(value, TypedContextData):
        value.validate()
    elif t is list or t is tuple or t is set or t is frozenset:
        for item in value:
            _validate_within(item)
    elif t is dict:
        for item in value.values():
            _validate_within(item)


@functools.cache
def _may_hold_typed(tp: Any) -> bool:
    """Whether a value of annotation ``tp`` may hold typed data (else it is not walked)."""
    if isinstance(tp, type):
        return issubclass(tp, TypedContextData) or tp in (object, list, tuple, dict, set, frozenset)
    args = typing.get_args(tp)
    return not args and typing.get_origin(tp) is None or any(_may_hold_typed(a) for a in args)


_hints: weakref.WeakKeyDictionary[type, dict[str, Any]] = weakref.WeakKeyDictionary()


def _type_hints(cls: type) -> dict[str, Any]:
    """``cls``'s resolved annotations, worked out once per class (every set_state of typed
    data checks them)."""
    hints = _hints.get(cls)
    if hints is None:
        try:
            hints = _hints[cls] = typing.get_type_hints(cls)
        except Exception:  # unresolved forward references: no checking (until they resolve)
            return {}
    return hints


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is not None:  # list[str], not list
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def class_path(cls: type) -> str:
    """``"module:qualname"`` of a TypedContextData class another process can find."""
    if "<locals>" in cls.__qualname__:
        raise UnencodableValueError(
            f"{cls.__qualname__} is defined inside a function, so another process or a "
            "resumed run cannot find it; define the TypedContextData class at module level"
        )
    return f"{cls.__module__}:{cls.__qualname__}"


WORKFLOW_MODULE = "__agent_workflow__"
"""The module a workflow file runs as under ``agent run`` (``python flow.py`` runs it as
``__main__``): a class defined in it is the same class under either name."""
_SCRIPT_ALIASES = {"__main__": WORKFLOW_MODULE, WORKFLOW_MODULE: "__main__"}


class TypedClassMissing(CheckpointError):
    """A checkpoint holds typed data of a class this process cannot find."""


def typed_class(name: str, *, import_modules: bool) -> type[TypedContextData] | None:
    """The TypedContextData dataclass named ``"module:qualname"``, or None.

    Looks among the classes this process defined (a workflow run as ``__main__``, a class
    sent by value), then in loaded modules; imports the module only with
    ``import_modules`` (data from a trusted side: the supervisor, a local checkpoint).
    """
    found: Any = TypedContextData.lookup(name)
    module_name, _, qualname = name.partition(":")
    if found is None:
        module = sys.modules.get(module_name)
        if module is None and import_modules and module_name:
            try:
                module = importlib.import_module(module_name)
            except Exception:
                module = None
        found = module
        for part in qualname.split("."):
            found = getattr(found, part, None) if found is not None else None
    if found is None:
        found = _defined_subclass(module_name, qualname)
    if isinstance(found, type) and issubclass(found, TypedContextData) and dataclasses.is_dataclass(found):
        return found
    alias = _SCRIPT_ALIASES.get(module_name)
    if alias is not None and alias in sys.modules:  # the same script, run the other way
        return typed_class(f"{alias}:{qualname}", import_modules=False)
    return None


def _defined_subclass(module_name: str, qualname: str) -> type | None:
    """The latest dataclass subclass of that name, one with fields of its own first
    (cloudpickle may leave skeletons, which are dataclasses only through their bases)."""
    found = inherited = None
    stack = list(TypedContextData.__subclasses__())
    while stack:
        cls = stack.pop()
        if cls.__module__ == module_name and cls.__qualname__ == qualname and dataclasses.is_dataclass(cls):
            if "__dataclass_fields__" in cls.__dict__:
                found = cls
            else:
                inherited = cls
        stack.extend(cls.__subclasses__())
    return found or inherited


def build_typed(cls: type[T], fields: dict[str, Any]) -> T:
    """The instance of ``cls`` that held these field values, as it was: its fields are set,
    its ``__init__`` and ``__post_init__`` are not run again (they ran when it was made;
    a class with an ``__init__`` of its own, or a ``__post_init__`` that changes a field,
    reads back the same in every process, as :func:`detached` copies it inline). A field
    the values lack gets its default (a checkpoint written before the field was added).

    Raises ValueError for unknown or missing fields, and :class:`ContextTypeError` for
    fields that do not match their annotations.
    """
    by_name = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(fields) - set(by_name))
    if unknown:
        raise ValueError(f"{cls.__qualname__} has no field(s) {', '.join(unknown)}")
    obj = object.__new__(cls)
    for name, f in by_name.items():
        if name in fields:
            value = fields[name]
        elif f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            raise ValueError(f"{cls.__qualname__} needs field {name!r}, which the value lacks")
        object.__setattr__(obj, name, value)  # works for frozen classes too
    obj.validate()
    return obj


# --- the one runtime type check ---------------------------------------------------------------


def matches(value: Any, tp: Any) -> bool:
    """Whether ``value`` fits the annotation ``tp`` (containers checked element by element).

    ``int`` excludes bool, ``float`` accepts int; an annotation that cannot be checked at run
    time (a Protocol, a TypeVar) accepts anything.
    """
    try:
        check = _CHECKS[tp]
    except KeyError:
        check = _CHECKS[tp] = checker(tp)
    except TypeError:  # unhashable (an Annotated with unhashable metadata): not cached
        check = checker(tp)
    return check(value)


_CHECKS: dict[Any, typing.Callable[[Any], bool]] = {}


def _anything(value: Any) -> bool:
    return True


def checker(tp: Any) -> typing.Callable[[Any], bool]:
    """:func:`matches` for one annotation, worked out once: every frame of the child
    protocol is checked against its message's fields, so the annotation is read only here."""
    if tp is Any or tp is object:
        return _anything
    origin = typing.get_origin(tp)
    if origin is None:
        if tp is None or tp is type(None):
            return lambda v: v is None
        if tp is float:
            return lambda v: (type(v) is float or type(v) is int
                              or (isinstance(v, (int, float)) and not isinstance(v, bool)))
        if tp is int:
            return lambda v: type(v) is int or (isinstance(v, int) and not isinstance(v, bool))
        if isinstance(tp, type):
            return lambda v: isinstance(v, tp)
        return _anything
    args = typing.get_args(tp)
    if origin is Union or origin is types.UnionType:
        options = tuple(checker(a) for a in args)
        return lambda v: any(c(v) for c in options)
    if origin is typing.Literal:
        return lambda v: v in args
    if origin is typing.Annotated:
        return checker(args[0])
    if origin in (list, set, frozenset):
        if not args:
            return lambda v: isinstance(v, origin)
        item = checker(args[0])
        return lambda v: isinstance(v, origin) and all(map(item, v))
    if origin is tuple:
        if not args:
            return lambda v: isinstance(v, tuple)
        if len(args) == 2 and args[1] is Ellipsis:
            each = checker(args[0])
            return lambda v: isinstance(v, tuple) and all(map(each, v))
        fields = tuple(checker(a) for a in args)
        return lambda v: (isinstance(v, tuple) and len(v) == len(fields)
                          and all(c(x) for c, x in zip(fields, v)))
    if origin in (dict, Mapping, typing.Mapping):
        if not args:
            return lambda v: isinstance(v, Mapping)
        key, val = checker(args[0]), checker(args[1])
        return lambda v: isinstance(v, Mapping) and all(key(k) and val(x) for k, x in v.items())
    if isinstance(origin, type):
        return lambda v: isinstance(v, origin)
    return _anything


# --- sizes on the wire (msgpack) ---------------------------------------------------------------


def _str_size(n: int) -> int:
    return n + (1 if n < 32 else 2 if n < 256 else 3 if n < 65536 else 5)


def _bin_size(n: int) -> int:
    return n + (2 if n < 256 else 3 if n < 65536 else 5)


def _array_header(n: int) -> int:
    return 1 if n < 16 else 3 if n < 65536 else 5


def _int_size(v: int) -> int:
    if v >= 0:
        return 1 if v < 128 else 2 if v < 256 else 3 if v < 65536 else 5 if v < 4294967296 else 9
    return 1 if v >= -32 else 2 if v >= -128 else 3 if v >= -32768 else 5 if v >= -2147483648 else 9


def entry_check(key: str, value: Any) -> int:
    """``entry_size(key, check(value, key=key))`` in one call: the hot path of ``set_state``."""
    t = type(value)
    if t is int and 0 <= value < 128 or value is None or t is bool:
        n = 1
    elif t is str and value.isascii() and len(value) < 32:
        n = 1 + len(value)
    elif t is float:
        n = 9
    else:
        n = check(value, key=key)
    if key.isascii():
        k = len(key)
        key_head = 1 if k < 32 else 2 if k < 256 else 3 if k < 65536 else 5
        return k + key_head + n + (2 if n < 256 else 3 if n < 65536 else 5)
    return entry_size(key, n)


def entry_size(key: str, value_size: int) -> int:
    """What one context entry adds to a child's start message: its key and its value."""
    if key.isascii():
        return _str_size(len(key)) + _bin_size(value_size)
    try:
        return _str_size(len(key.encode("utf-8"))) + _bin_size(value_size)
    except UnicodeEncodeError:
        raise UnencodableValueError(f"context key {key!r} is not valid UTF-8 text: clean it") from None


_IMMUTABLE: frozenset[type] = frozenset({
    type(None), bool, int, float, str, bytes, frozenset,
    _dt.datetime, _dt.date, _dt.time, _dt.timedelta, decimal.Decimal, uuid.UUID,
})


def detached(value: Any) -> Any:
    """A copy of a value of the model that shares nothing mutable with it (the value itself
    when nothing in it can change): what the context stores and hands out, so that changing
    a value in place is never a write, in any isolation level."""
    t = type(value)
    if t in _IMMUTABLE:
        return value
    if t is list:
        return [v if type(v) in _IMMUTABLE else detached(v) for v in value]
    if t is dict:
        return {k: v if type(v) in _IMMUTABLE else detached(v) for k, v in value.items()}
    if t is tuple:
        if all(type(v) in _IMMUTABLE for v in value):
            return value
        items = tuple(detached(v) for v in value)
        return value if all(a is b for a, b in zip(items, value)) else items
    if t is set:
        return set(value)  # its elements are hashable, so immutable as far as the model goes
    if isinstance(value, TypedContextData) and dataclasses.is_dataclass(value):
        copy = copy_module.copy(value)
        for f in dataclasses.fields(value):
            object.__setattr__(copy, f.name, detached(getattr(value, f.name)))
        return copy
    return value


_MARK_SIZE = 3  # an empty extension type: 0xc7, length 0, code
_INT64_MIN = -(2**63)
_UINT64_END = 2**64

# Extension codes: each is an empty marker heading the array that carries the value.
_TUPLE, _SET, _FROZENSET, _TYPED = 1, 2, 3, 4
_DATETIME, _DATE, _TIME, _TIMEDELTA, _DECIMAL, _UUID, _BIGINT = 5, 6, 7, 8, 9, 10, 11
_CONTAINER_MARKS: dict[type, int] = {tuple: _TUPLE, set: _SET, frozenset: _FROZENSET}


class _Marker:
    """What an extension marker decodes to until its array becomes the value it tags."""

    __slots__ = ("code",)

    def __init__(self, code: int) -> None:
        self.code = code

    def __repr__(self) -> str:
        return f"<value marker {self.code}>"


_MARKERS = {code: _Marker(code) for code in range(_TUPLE, _BIGINT + 1)}
_EXT_MARKS = {code: msgpack.ExtType(code, b"") for code in _MARKERS}


class _Refused(Exception):
    """Raised while walking a value; ``parts`` is the path to the culprit, innermost first."""

    def __init__(self, message: str, error: type[Exception] = UnencodableValueError) -> None:
        self.message = message
        self.error = error
        self.parts: list[str] = []


def _tz_fields(tz: _dt.tzinfo | None) -> tuple[str | None, int | None, str | None]:
    """``(zone key, offset in µs, custom name)`` of a supported tzinfo."""
    if tz is None:
        return None, None, None
    if type(tz) is zoneinfo.ZoneInfo and tz.key:
        return tz.key, None, None
    if type(tz) is _dt.timezone:
        offset = tz.utcoffset(None)
        name = tz.tzname(None)
        fixed_name = _dt.timezone(offset).tzname(None)
        return None, offset // _dt.timedelta(microseconds=1), None if name == fixed_name else name
    raise _Refused(
        f"a {type(tz).__module__}.{type(tz).__qualname__} time zone cannot be carried; use "
        "datetime.timezone or zoneinfo.ZoneInfo('Area/City')"
    )


def _tz_from(zone: Any, offset: Any, name: Any) -> _dt.tzinfo | None:
    if zone is not None:
        if type(zone) is not str:
            raise ValueError("zone key is not a str")
        return zoneinfo.ZoneInfo(zone)
    if offset is None:
        return None
    if type(offset) is not int or (name is not None and type(name) is not str):
        raise ValueError("malformed time zone offset")
    delta = _dt.timedelta(microseconds=offset)
    return _dt.timezone(delta) if name is None else _dt.timezone(delta, name)


def _leaf_fields(value: Any, t: type) -> tuple[int, list[Any]]:
    """The marker code and the fields of a leaf value carried as a tagged array."""
    if t is _dt.datetime:
        return _DATETIME, [value.replace(tzinfo=None).isoformat(), value.fold, *_tz_fields(value.tzinfo)]
    if t is _dt.date:
        return _DATE, [value.isoformat()]
    if t is _dt.time:
        return _TIME, [value.replace(tzinfo=None).isoformat(), value.fold, *_tz_fields(value.tzinfo)]
    if t is _dt.timedelta:
        return _TIMEDELTA, [value.days, value.seconds, value.microseconds]
    if t is decimal.Decimal:
        return _DECIMAL, [str(value)]
    if t is uuid.UUID:
        return _UUID, [value.bytes]
    if t is int:
        if value.bit_length() > MAX_INT_BITS:
            raise _Refused(f"an int of {value.bit_length()} bits is over the {MAX_INT_BITS}-bit "
                           "limit; store it as a str or as bytes")
        return _BIGINT, [value.to_bytes((value.bit_length() + 8) // 8, "big", signed=True)]
    raise _Refused(_refusal(value, t))


def _leaf_from(code: int, fields: list[Any]) -> Any:
    """The leaf value a tagged array carries; raises (ValueError, mostly) on anything malformed."""
    n = len(fields)
    if (code == _DATETIME or code == _TIME) and n == 5:
        iso, fold, zone, offset, name = fields
        if type(iso) is str and type(fold) is int and fold in (0, 1):
            cls = _dt.datetime if code == _DATETIME else _dt.time
            return cls.fromisoformat(iso).replace(tzinfo=_tz_from(zone, offset, name), fold=fold)
    elif code == _TIMEDELTA and n == 3 and all(type(f) is int for f in fields):
        return _dt.timedelta(days=fields[0], seconds=fields[1], microseconds=fields[2])
    elif n == 1:
        only = fields[0]
        if code == _DATE and type(only) is str:
            return _dt.date.fromisoformat(only)
        if code == _DECIMAL and type(only) is str:
            return decimal.Decimal(only)
        if code == _UUID and type(only) is bytes:
            return uuid.UUID(bytes=only)
        if code == _BIGINT and type(only) is bytes and 8 < len(only) <= MAX_INT_BITS // 8 + 1:
            return int.from_bytes(only, "big", signed=True)
    raise ValueError(f"malformed value under marker {code}")


def _refusal(value: Any, t: type) -> str:
    """Why ``value`` is refused, and what to store instead."""
    if isinstance(value, (bytearray, memoryview)):
        fix = "store bytes(value)"
    elif isinstance(value, enum.Enum):
        fix = "store its .value or its .name"
    elif isinstance(value, os.PathLike):
        fix = "store str(path)"
    elif isinstance(value, (str, int, float, bytes)):
        base = next(b for b in (str, int, float, bytes) if isinstance(value, b))
        fix = f"store {base.__name__}(value)"
    else:
        fix = _FIX
    return f"a {t.__module__}.{t.__qualname__} cannot be stored (types are exact); {fix}"


_FIXED_SIZES: dict[type, int] = {type(None): 1, bool: 1, float: 9}


class _Walk:
    """One check of one value: its size on the wire, its object count, every rule on the way."""

    __slots__ = ("max_depth", "max_items", "max_objects", "objects")

    def __init__(self, bounds: Bounds) -> None:
        self.max_depth = bounds.max_depth
        self.max_items = bounds.max_items
        self.max_objects = bounds.max_objects
        self.objects = 1

    def _enter(self, n: int, depth: int, what: str) -> None:
        if n and depth >= self.max_depth:  # an empty container adds no level
            raise _Refused(
                f"nested deeper than {self.max_depth} levels (a reference cycle?); store flatter "
                "data, or serialise deep structures yourself (e.g. to JSON text)"
            )
        if n > self.max_items:
            raise _Refused(f"a {what} of {n:,} elements is over the {self.max_items:,}-element limit "
                           "of one container; keep bulk data in a file or in bytes", ValueTooLargeError)
        self.objects += n
        if self.objects > self.max_objects:
            raise _Refused(f"the value holds more than {self.max_objects:,} objects; keep bulk data "
                           "in a file or in bytes", ValueTooLargeError)

    def size(self, value: Any, depth: int) -> int:
        t = type(value)
        if t is str:
            n = len(value) if value.isascii() else _utf8_len(value)
            return _str_size(n)
        if t is int:
            if _INT64_MIN <= value < _UINT64_END:
                return _int_size(value)
        elif t in _FIXED_SIZES:
            return _FIXED_SIZES[t]
        elif t is bytes:
            return _bin_size(len(value))
        elif t is list or t in _CONTAINER_MARKS:
            return self._sequence(value, t, depth)
        elif t is dict:
            return self._dict(value, depth)
        elif isinstance(value, TypedContextData) and dataclasses.is_dataclass(value):
            return self._typed(value, t, depth)
        code, fields = _leaf_fields(value, t)
        return _array_header(len(fields) + 1) + _MARK_SIZE + sum(self.size(f, depth) for f in fields)

    def _sequence(self, value: Any, t: type, depth: int) -> int:
        n = len(value)
        self._enter(n, depth, t.__name__)
        total = _array_header(n) if t is list else _array_header(n + 1) + _MARK_SIZE
        label = _index if t is list or t is tuple else _item
        return total + self._elements(enumerate(value), depth + 1, label)

    def _dict(self, value: dict[Any, Any], depth: int) -> int:
        n = len(value)
        self._enter(2 * n, depth, "dict")
        total = _array_header(n)
        for k in value:
            if type(k) is not str:
                raise _Refused(
                    f"dict keys must be str, found a {type(k).__name__} key {k!r}; convert the keys "
                    "to str (or store a list of pairs)"
                )
            total += _str_size(len(k) if k.isascii() else _utf8_len(k))
        return total + self._elements(value.items(), depth + 1, _key)

    def _elements(self, pairs: Any, depth: int, label: Any) -> int:
        """The size of a container's elements; ``label(tag)`` names one in an error's path."""
        total = 0
        for tag, item in pairs:
            it = type(item)
            if it is int and _INT64_MIN <= item < _UINT64_END:  # the common cases, inline
                total += _int_size(item)
            elif it is str and item.isascii():
                total += _str_size(len(item))
            else:
                try:
                    total += self.size(item, depth)
                except _Refused as exc:
                    exc.parts.append(label(tag))
                    raise
        return total

    def _typed(self, value: Any, t: type, depth: int) -> int:
        try:
            name = class_path(t)
        except UnencodableValueError as exc:
            raise _Refused(str(exc)) from None
        mismatch = value._mismatch()
        if mismatch is not None:  # it could not be rebuilt anywhere else: refused where it is set
            raise _Refused(f"{mismatch}; give each field a value of its annotated type", ContextTypeError)
        fields = dataclasses.fields(value)
        self._enter(2 * len(fields), depth, t.__qualname__)
        total = 1 + _MARK_SIZE + _str_size(len(name.encode())) + _array_header(len(fields))
        inner = depth + 1
        for f in fields:
            total += _str_size(len(f.name.encode()))
            try:
                total += self.size(getattr(value, f.name), inner)
            except _Refused as exc:
                exc.parts.append(f".{f.name}")
                raise
        return total


def _index(i: int) -> str:
    return f"[{i}]"


def _item(_: int) -> str:
    return " item"


def _key(k: str) -> str:
    return f"[{k!r}]"


def _utf8_len(text: str) -> int:
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise _Refused(
            "a str with a lone surrogate cannot be encoded as UTF-8; clean the text, or store it "
            "as bytes (text.encode('utf-8', 'surrogateescape'))"
        ) from None


def _path(where: str, parts: list[str]) -> str:
    """``where`` and the path inside the value (shortened when very deep)."""
    inner = list(reversed(parts))
    if len(inner) > 12:
        inner = inner[:6] + ["..."] + inner[-3:]
    return where + "".join(inner)


def check(value: Any, where: str = "value", bounds: Bounds = DEFAULT_BOUNDS, *, key: str | None = None) -> int:
    """Check ``value`` against the model; return its exact encoded size in bytes.

    Raises :class:`UnencodableValueError` (or :class:`ValueTooLargeError` for the object
    and item limits) naming ``where`` (``context key <key>`` when ``key`` is given) with
    the path inside the value, the type, and the fix.
    """
    t = type(value)
    if t is int and _INT64_MIN <= value < _UINT64_END:  # the common cases, first
        return _int_size(value)
    if t is str and value.isascii():
        return _str_size(len(value))
    if t in _FIXED_SIZES:
        return _FIXED_SIZES[t]
    if key is not None:
        where = f"context key {key!r}"
    try:
        return _Walk(bounds).size(value, 0)
    except _Refused as exc:
        raise exc.error(f"{_path(where, exc.parts)}: {exc.message}") from None
    except RecursionError:  # only reachable with a max_depth above Python's own limit
        raise UnencodableValueError(f"{where}: nested too deeply; store flatter data") from None


# --- the process boundary ----------------------------------------------------------------------


def _wire_default(value: Any, classes: set[type] | None = None) -> Any:
    """How msgpack packs what it has no native form for (called by msgpack per object)."""
    t = type(value)
    code = _CONTAINER_MARKS.get(t)
    if code is not None:
        return [_EXT_MARKS[code], *value]
    if isinstance(value, TypedContextData) and dataclasses.is_dataclass(value):
        if classes is not None:
            classes.add(t)
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return [_EXT_MARKS[_TYPED], class_path(t), fields]
    try:
        code, fields = _leaf_fields(value, t)
    except _Refused as exc:
        raise UnencodableValueError(exc.message) from None
    return [_EXT_MARKS[code], *fields]


_packers = threading.local()


def _packer(default: Any = _wire_default) -> msgpack.Packer:
    return msgpack.Packer(use_bin_type=True, strict_types=True, datetime=False, default=default)


def encode(value: Any, classes: set[type] | None = None) -> bytes:
    """The wire form of a value the model carries (check it with :func:`check` first).

    The TypedContextData classes met on the way are added to ``classes`` when given.
    Each thread reuses one packer (a new one allocates a 256 KiB buffer), and lets it go
    after a big value rather than keep its grown buffer.
    """
    if classes is None:
        packer = getattr(_packers, "packer", None) or _packer()
        _packers.packer = packer
    else:
        packer = _packer(lambda v: _wire_default(v, classes))
    try:
        data: bytes = packer.pack(value)
    except UnencodableValueError:
        raise
    except (TypeError, ValueError, OverflowError) as exc:
        raise UnencodableValueError(f"cannot encode the value: {exc}; {_FIX}") from None
    if len(data) > MIB:
        _packers.packer = None
    return data


class _Decoding:
    """Hooks msgpack calls as each container of a value completes, innermost first.

    They turn tagged arrays into tuples, sets, dates, typed data...; count the objects
    made; and record each non-empty container's depth by ``id`` (one C-level pass over
    its elements), so no Python loop visits every element. msgpack itself can only make
    model types, plus the markers, which must each head an array: any left over means a
    malformed value. Every container made is also kept in ``made`` (children before their
    parents), so that when decoding stops half-way, what was built is freed a slice at a
    time (:meth:`release`) rather than in one long stretch of C with the GIL held.
    """

    __slots__ = ("objects", "max_objects", "max_depth", "extra_depth", "import_modules", "made",
                 "depths", "depth_of", "markers")

    def __init__(self, bounds: Bounds, import_modules: bool, extra_depth: int = 0) -> None:
        self.objects = 1
        self.max_objects = bounds.max_objects + (FRAME_OBJECTS if extra_depth else 0)
        self.max_depth = bounds.max_depth + extra_depth  # a frame's own map is one level
        self.extra_depth = extra_depth
        self.import_modules = import_modules
        self.made: list[Any] = []
        self.depths: dict[int, int] = {}
        self.depth_of = self.depths.get
        self.markers = 0  # made, not yet heading an array

    def _admit(self, made: Any, elements: Any, n: int) -> None:
        """Count ``n`` objects, and record the depth of container ``made`` (the hooks' hot path)."""
        self.objects += n
        if elements:
            depth = 1 + max(map(self.depth_of, map(id, elements), repeat(0)))
            if depth > self.max_depth or self.objects > self.max_objects:
                self._refuse(depth)
            self.depths[id(made)] = depth
        elif self.objects > self.max_objects:
            self._refuse(0)

    def _refuse(self, depth: int) -> None:
        if self.objects > self.max_objects:
            limit = self.max_objects - (FRAME_OBJECTS if self.extra_depth else 0)
            raise BoundExceededError(f"a value holds more than {limit:,} objects (the objects bound)")
        limit = self.max_depth - self.extra_depth
        raise BoundExceededError(f"a value nested deeper than {limit} levels (the depth bound)")

    def release(self) -> None:
        made = self.made
        while made:
            del made[-4096:]

    def ext(self, code: int, data: bytes) -> Any:
        marker = _MARKERS.get(code)
        if marker is None or data:
            raise ProtocolError(f"malformed value: extension type {code} with {len(data)} bytes")
        self.markers += 1
        return marker

    def array(self, items: list[Any]) -> Any:
        self.made.append(items)
        if items and type(items[0]) is _Marker:
            self.markers -= 1
            return self._tagged(items)
        self._admit(items, items, len(items))
        return items

    def map(self, items: dict[str, Any]) -> dict[str, Any]:
        self.made.append(items)
        try:
            "".join(items)  # every key a str (msgpack also lets bytes keys through), in C
        except TypeError:
            raise ProtocolError("malformed value: a map key is not a str") from None
        self._admit(items, items.values(), 2 * len(items))
        return items

    def plain_array(self, items: list[Any]) -> list[Any]:
        self.made.append(items)
        self._admit(items, (), len(items))
        return items

    def _tagged(self, items: list[Any]) -> Any:
        code = items[0].code
        del items[0]
        if code == _TUPLE or code == _SET or code == _FROZENSET:
            out: Any = tuple(items) if code == _TUPLE else set(items) if code == _SET else frozenset(items)
            self._admit(out, items, len(items))
        elif code == _TYPED:
            out = self._typed(items)
            depth = self.depths.get(id(items[1]))  # a level, as its fields dict
            if depth is not None:
                self.depths[id(out)] = depth
        else:
            try:
                out = _leaf_from(code, items)
            except Exception as exc:  # ValueError, decimal.InvalidOperation, ZoneInfoNotFoundError...
                raise ProtocolError(f"malformed value under marker {code}: {shortened(repr(exc))}") from None
        self.made.append(out)
        return out

    def _typed(self, items: list[Any]) -> Any:
        if len(items) != 2 or type(items[0]) is not str or type(items[1]) is not dict:
            raise ProtocolError("malformed value: a typed value is not [class, fields]")
        name, fields = items
        cls = typed_class(name, import_modules=self.import_modules)
        if cls is None:
            raise ProtocolError(
                f"typed value names {short_repr(name)}, which is not an imported TypedContextData dataclass: "
                "import the module that defines it in the supervising process"
            )
        if "<locals>" in cls.__qualname__:  # found under another name (a module-level alias)
            raise ProtocolError(
                f"typed value names {name!r}, which is {cls.__qualname__}: defined inside a function, no "
                "other process or resumed run can find it; define the TypedContextData class at module level"
            )
        try:
            return build_typed(cls, fields)
        except Exception as exc:
            raise ProtocolError(f"typed value {name!r} does not match its class: {shortened(str(exc))}") from None


class Decoded(typing.NamedTuple):
    """A decoded value, its size on the wire, and the objects it holds."""

    value: Any
    size: int
    objects: int


def unpack(
    data: bytes | memoryview, bounds: Bounds = DEFAULT_BOUNDS, *, import_modules: bool = False, framed: bool = False
) -> tuple[Any, int]:
    """Wire data back into objects within ``bounds``: ``(value, objects made)``.

    Never unpickles and never recurses per level: msgpack's decoder keeps its own fixed
    stack, and hooks check each container as it completes (:class:`_Decoding`). ``framed``
    data is a frame whose fields hold values: one level more. Raises
    :class:`BoundExceededError` past a bound and :class:`ProtocolError` for anything
    malformed. TypedContextData classes are found among those this process knows; their
    module is imported only with ``import_modules``.
    """
    if len(data) > bounds.max_frame + FRAME_OVERHEAD:
        raise BoundExceededError(f"{len(data):,} bytes are over the {bounds.max_frame:,}-byte frame bound")
    hooks = _Decoding(bounds, import_modules, 1 if framed else 0)
    try:
        value = msgpack.unpackb(data, ext_hook=hooks.ext, list_hook=hooks.array, object_hook=hooks.map,
                                **_unpack_options(len(data), bounds, 1))
        if hooks.markers:
            raise ProtocolError("malformed value: an extension marker that heads no array")
        return value, hooks.objects
    except (BoundExceededError, ProtocolError):
        hooks.release()
        raise
    except MemoryError:
        hooks.release()
        raise BoundExceededError("decoding ran out of memory") from None
    except msgpack.StackError:
        hooks.release()
        raise BoundExceededError(f"data nested deeper than {bounds.max_depth} levels (the depth bound)") from None
    except (ValueError, TypeError, KeyError, OverflowError, msgpack.UnpackException, RecursionError) as exc:
        hooks.release()
        raise _malformed(exc) from None


def decode(data: bytes | memoryview, bounds: Bounds = DEFAULT_BOUNDS, *, import_modules: bool = False) -> Decoded:
    """A value from its wire form (one :func:`encode` made): checked like :func:`check`."""
    value, objects = unpack(data, bounds, import_modules=import_modules)
    return Decoded(value, len(data), objects)


def pack_plain(obj: Any) -> bytes:
    """Plain msgpack data (tuples as lists, no extension types): the zygote's control messages."""
    data: bytes = msgpack.packb(obj, use_bin_type=True, strict_types=False, datetime=False)
    return data


def unpack_plain(data: bytes, bounds: Bounds = DEFAULT_BOUNDS) -> Any:
    """What :func:`pack_plain` made, bounded like :func:`unpack`; raises ProtocolError when malformed."""
    if len(data) > bounds.max_frame:
        raise BoundExceededError(f"{len(data):,} bytes are over the {bounds.max_frame:,}-byte frame bound")
    hooks = _Decoding(bounds, False)
    try:
        return msgpack.unpackb(data, ext_hook=_no_ext, list_hook=hooks.plain_array, object_hook=hooks.map,
                               **_unpack_options(len(data), bounds, 0))
    except BoundExceededError:
        raise
    except msgpack.StackError:
        raise BoundExceededError("data nested too deeply (the depth bound)") from None
    except (ValueError, TypeError, KeyError, msgpack.UnpackException, RecursionError) as exc:
        raise _malformed(exc) from None


def _unpack_options(size: int, bounds: Bounds, marker: int) -> dict[str, Any]:
    """msgpack's options: exact types, and length caps no larger than the data could fill.

    msgpack allocates a container's slots when it reads the header, so a length is capped
    at what the remaining bytes could hold (an element takes at least one byte, a map
    entry two): a short frame cannot declare a huge container.
    """
    return {
        "raw": False, "strict_map_key": True, "use_list": True, "max_ext_len": 0,  # only empty markers
        "max_bin_len": min(bounds.max_frame, size), "max_str_len": min(bounds.max_frame, size),
        "max_array_len": min(bounds.max_items + marker, size), "max_map_len": min(bounds.max_items, size // 2),
    }


def _malformed(exc: Exception) -> ProtocolError:
    text = str(exc)
    if "max_ext_len" in text:  # the model's extensions are empty markers: one with data is none of them
        return ProtocolError("malformed value: an extension type that carries data")
    if "exceeds max_" in text:  # msgpack's own length caps, checked before it allocates
        return BoundExceededError(f"a container or string over its bound ({text})")
    return ProtocolError(f"malformed data: {type(exc).__name__}: {shortened(str(exc))}")


def _no_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(f"malformed data: extension type {code} in a control message")


# --- the checkpoint form (JSON) ------------------------------------------------------------------

_TAG = "$type"
_INF = float("inf")
_NINF = float("-inf")


def to_json(value: Any, where: str = "value", *, levels_above: int = 0) -> Any:
    """``value`` as JSON-compatible data; raises UnencodableValueError naming where.

    Nesting is bounded as :func:`check` bounds it (:data:`MAX_DEPTH`, an empty container
    at the bottom adding no level), counted from ``levels_above`` levels down: a mapping
    of values (a checkpoint's context) passes 1, so each of its values may nest as deep
    as ``set_state`` let it.
    """
    try:
        return _to_json(value, -levels_above)
    except _Refused as exc:
        raise exc.error(f"{_path(where, exc.parts)}: {exc.message}") from None


def _deeper(value: Any, depth: int) -> int:
    """The depth of the elements of container ``value``, which sits at ``depth``."""
    if value and depth >= MAX_DEPTH:
        raise _Refused(f"nested deeper than {MAX_DEPTH} levels (a reference cycle?); store flatter data")
    return depth + 1


def _to_json(value: Any, depth: int) -> Any:
    t = type(value)
    if t is str or t is bool or value is None:
        return value
    if t is int:
        if value.bit_length() > MAX_INT_BITS:
            _leaf_fields(value, t)  # raises with the fix
        return value
    if t is float:
        if value != value or value in (_INF, _NINF):
            return {_TAG: "float", "value": repr(value)}
        return value
    if t is dict:
        d = _deeper(value, depth)
        plain = _TAG not in value
        items = []
        for k, v in value.items():
            if type(k) is not str:
                raise _Refused(f"dict keys must be str, found a {type(k).__name__} key {k!r}")
            try:
                items.append((k, _to_json(v, d)))
            except _Refused as exc:
                exc.parts.append(f"[{k!r}]")
                raise
        return dict(items) if plain else {_TAG: "dict", "value": [list(i) for i in items]}
    if t is list or t is tuple:
        d = _deeper(value, depth)
        out = []
        for i, v in enumerate(value):
            try:
                out.append(_to_json(v, d))
            except _Refused as exc:
                exc.parts.append(f"[{i}]")
                raise
        return out if t is list else {_TAG: "tuple", "value": out}
    if t is set or t is frozenset:
        d = _deeper(value, depth)
        try:
            items = [_to_json(v, d) for v in value]
        except _Refused as exc:
            exc.parts.append(" item")
            raise
        # A stable order, so equal sets give equal JSON (the store compares texts).
        items.sort(key=lambda x: json.dumps(x, sort_keys=True))
        return {_TAG: t.__name__, "value": items}
    if t is bytes:
        return {_TAG: "bytes", "value": base64.b64encode(value).decode("ascii")}
    if t is _dt.datetime or t is _dt.time:
        zone, offset, name = _tz_fields(value.tzinfo)
        data: dict[str, Any] = {_TAG: t.__name__, "value": value.replace(tzinfo=None).isoformat(),
                                "fold": value.fold}
        if zone is not None:
            data["zone"] = zone  # the zone itself, not just today's offset
        elif offset is not None:
            data["offset"] = offset  # µs: fromisoformat drops an offset's microseconds
        if name is not None:
            data["tzname"] = name
        return data
    if t is _dt.date:
        return {_TAG: "date", "value": value.isoformat()}
    if t is _dt.timedelta:
        return {_TAG: "timedelta", "value": [value.days, value.seconds, value.microseconds]}
    if t is decimal.Decimal:
        return {_TAG: "decimal", "value": str(value)}
    if t is uuid.UUID:
        return {_TAG: "uuid", "value": str(value)}
    if isinstance(value, TypedContextData) and dataclasses.is_dataclass(value):
        try:
            name = class_path(t)
        except UnencodableValueError as exc:
            raise _Refused(str(exc)) from None
        fields = {}
        d = _deeper(dataclasses.fields(value), depth)
        for f in dataclasses.fields(value):
            try:
                fields[f.name] = _to_json(getattr(value, f.name), d)
            except _Refused as exc:
                exc.parts.append(f".{f.name}")
                raise
        return {_TAG: "typed", "class": name, "value": fields}
    raise _Refused(_refusal(value, t))


def from_json(data: Any, *, levels_above: int = 0) -> Any:
    """Decode what :func:`to_json` produced (given the same ``levels_above``); raises
    CheckpointError when malformed, or nested deeper than :func:`to_json` writes."""
    return _from_json(data, -levels_above)


def _from_json(data: Any, depth: int) -> Any:
    if isinstance(data, list):
        d = _nested(data, depth)
        return [_from_json(v, d) for v in data]
    if not isinstance(data, dict):
        return data
    tag = data.get(_TAG)
    if tag is None:
        d = _nested(data, depth)
        return {k: _from_json(v, d) for k, v in data.items()}
    raw = data.get("value")
    try:
        return _from_tagged(tag, raw, data, depth)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"malformed {tag!r} value in checkpoint: {exc!r}") from exc


def _nested(container: Any, depth: int) -> int:
    """:func:`_deeper` for a checkpoint being read: the depth of ``container``'s elements."""
    if container and depth >= MAX_DEPTH:
        raise CheckpointError(
            f"a value in the checkpoint is nested deeper than {MAX_DEPTH} levels, which no checkpoint "
            "written by this framework holds: it was altered; use an earlier checkpoint"
        )
    return depth + 1


def _from_tagged(tag: str, raw: Any, data: dict[str, Any], depth: int) -> Any:
    if tag == "dict":
        out = {}
        d = _nested(raw, depth)
        for k, v in raw:
            if type(k) is not str:
                raise ValueError(f"a dict key is a {type(k).__name__}")
            out[k] = _from_json(v, d)
        return out
    if tag == "tuple":
        d = _nested(raw, depth)
        return tuple(_from_json(v, d) for v in raw)
    if tag == "set":
        d = _nested(raw, depth)
        return {_from_json(v, d) for v in raw}
    if tag == "frozenset":
        d = _nested(raw, depth)
        return frozenset(_from_json(v, d) for v in raw)
    if tag == "bytes":
        return base64.b64decode(raw, validate=True)
    if tag == "datetime" or tag == "time":
        cls = _dt.datetime if tag == "datetime" else _dt.time
        moment = cls.fromisoformat(raw)
        if "zone" in data or "offset" in data:
            moment = moment.replace(tzinfo=_tz_from(data.get("zone"), data.get("offset"), data.get("tzname")))
        elif "tzname" in data and (offset := moment.utcoffset()) is not None:  # written before "offset"
            moment = moment.replace(tzinfo=_dt.timezone(offset, data["tzname"]))
        return moment.replace(fold=int(data.get("fold", 0)))
    if tag == "date":
        return _dt.date.fromisoformat(raw)
    if tag == "timedelta":
        days, seconds, micros = raw
        return _dt.timedelta(days=days, seconds=seconds, microseconds=micros)
    if tag == "decimal":
        return decimal.Decimal(raw)
    if tag == "uuid":
        return uuid.UUID(raw)
    if tag == "float":
        if raw not in ("nan", "inf", "-inf"):
            raise ValueError(f"not a special float: {raw!r}")
        return float(raw)
    if tag == "typed":
        return _typed_from_json(data, depth)
    raise CheckpointError(f"unknown value tag {tag!r} in checkpoint: it was written by a newer release")


def _typed_from_json(data: dict[str, Any], depth: int) -> TypedContextData:
    name = data["class"]
    cls = typed_class(name, import_modules=True)
    if cls is None:
        module = name.partition(":")[0]
        if module in _SCRIPT_ALIASES:
            raise TypedClassMissing(
                f"checkpoint holds typed data of class {name!r}, defined in the script that ran the "
                "workflow, and this program has no such class: resume it from that script "
                "(python flow.py, or agent run flow.py --resume RUN_ID)"
            )
        if module and module not in sys.modules:
            try:
                importlib.import_module(module)
            except Exception as exc:
                raise TypedClassMissing(
                    f"checkpoint holds typed data of class {name!r}, which cannot be imported: "
                    "import the module that defines it before restoring"
                ) from exc
        raise CheckpointError(f"{name!r} in a checkpoint is not a TypedContextData dataclass")
    raw = data["value"]
    if not isinstance(raw, dict):
        raise CheckpointError(f"typed value of {name!r} has no field map")
    d = _nested(raw, depth)
    fields = {k: _from_json(v, d) for k, v in raw.items()}
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]  # checked to be a dataclass above
    unknown = sorted(set(fields) - known)
    if unknown:
        raise CheckpointError(
            f"checkpoint has field(s) {', '.join(unknown)} that {cls.__qualname__} no longer "
            "defines: restore with the code that wrote the checkpoint"
        )
    return build_typed(cls, fields)


def dumps(value: Any) -> str:
    """``value`` as compact JSON text (deterministic for equal values)."""
    return json.dumps(to_json(value), separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def loads(text: str | bytes) -> Any:
    """The value :func:`dumps` wrote; raises CheckpointError for corrupt or truncated text."""
    try:
        data = json.loads(text)
    except (ValueError, TypeError, RecursionError) as exc:
        raise CheckpointError(f"corrupt or truncated checkpoint JSON: {exc}") from exc
    return from_json(data)


_ONLY_STR = {str}


class NotATransition:
    """What an isolated state returned instead of a transition, as its process described it
    (the value itself may not be able to cross): refused as :func:`transition_problem` says."""

    __slots__ = ("problem",)

    def __init__(self, problem: str) -> None:
        self.problem = problem


def transition_problem(result: Any) -> str | None:
    """Why a state's return value cannot be a transition (None, a name, a list or tuple of
    names), or None when it can; the same words in every isolation level."""
    if result is None or isinstance(result, str):
        return None
    if type(result) is NotATransition:
        return result.problem
    if isinstance(result, (list, tuple)):
        for n in result:
            if not isinstance(n, str):
                return (f"returned a list containing {type(n).__name__} {short_repr(n)}: "
                        "a list may hold only state names (str)")
        return None
    return (f"returned {type(result).__name__} {short_repr(result)}: return the next state's name (str), "
            "a list of names to run in parallel, or None to end this branch")


def names_as_text(names: str | list[str] | tuple[str, ...]) -> str | list[str]:
    """A transition that cannot be encoded (a name with a lone surrogate) as one that can:
    no state has such a name (``add_state`` refuses them), so the supervisor refuses it as
    an unknown state, quoting it, as inline."""
    if isinstance(names, str):
        return utf8_text(names)
    return [utf8_text(n) for n in names]


def short_repr(value: Any) -> str:
    """``repr(value)``, cut to 200 characters: for error messages that quote what they refuse."""
    try:
        text = repr(value)
    except Exception as exc:  # a broken __repr__ of the user's
        text = f"<unprintable: {type(exc).__name__}>"
    return shortened(text)


def printable(text: str, keep: str = "") -> str:
    """``text`` with each character that is not printable (but those in ``keep``) written
    out as ``repr`` writes it (``\\n``, ``\\x1b``, ``\\u202e``), without quotes: text from
    another process's code, shown on a terminal, must not move its cursor, retitle it or
    forge a line. Ordinary unicode stays as it is."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() or ch in keep else repr(ch)[1:-1] for ch in text)


def shortened(text: str, limit: int = 200) -> str:
    """``text`` cut to ``limit`` characters."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit:,} characters more)"


def plain_names(result: Any) -> Any:
    """``result`` with each state name a plain ``str``: a name may be an instance of a str
    subclass (a ``StrEnum`` member), and means the name it spells in every isolation level
    (the value model, which carries a child's return, takes exact types only)."""
    if isinstance(result, str):
        return result if type(result) is str else str.__str__(result)
    if (isinstance(result, (list, tuple)) and set(map(type, result)) != _ONLY_STR  # a C loop: the common case
            and any(isinstance(n, str) and type(n) is not str for n in result)):
        return [str.__str__(n) if isinstance(n, str) else n for n in result]
    return result
