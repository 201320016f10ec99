"""A state function's pickle, made once and reused while nothing it copies has changed.

cloudpickle copies a closure, a lambda or a function of the program's script by value:
its code, defaults, closure cells, the globals it reads and, recursively, the functions
among them. Doing that for every attempt took most of the supervisor's time to build a
``run`` message (about 40 µs of 45 for a small state, and more with cold caches).

A pickle is reused only while everything cloudpickle would copy is the very same objects
as when it was made, and each of them is immutable: ``None``, numbers, strings, bytes,
code, tuples and frozensets of such, modules, builtins, functions and classes pickled by
reference, and functions passing the same test. The cache holds those objects, so their
identities cannot be reused by others. A function that captures anything else (a list,
a dict, an instance, a class defined in a function) is pickled for every attempt, as is
a callable that is not a plain function; so is every function once the set of loaded
modules changed (cloudpickle names the loaded submodules a function uses) or a module
was registered to be pickled by value, until its next pickle.

A program that builds its agent again for each run (a service, per request) makes new
closures from the same code each time: those are told apart by what they copy, not by
their identity. Such a closure reuses the pickle of one made before from the same code
object whose copied values are equal and of the same types (strings, numbers, bytes),
and the very same objects otherwise (code, modules, classes, functions); a float must
be the same to the bit. The function a state's process unpickles then is what its own
pickle would give, except that two equal values it copies might come out as one object
(immutable values, whose identity Python does not promise). At most
:data:`KEPT_PER_CODE` closures of each code object are kept, the most recently used, and
:data:`BYTES_PER_CODE` bytes of their pickles.
Pickling a small closure took a third of a ``worker`` state's supervisor time in a chain
built for each run (0.13 of 0.4 ms).
"""

from __future__ import annotations

import io
import struct
import sys
import threading
import types
import weakref
from operator import is_
from typing import Any, Callable

import cloudpickle

try:  # cloudpickle's own rules, so that the fingerprint sees what it would copy
    from cloudpickle.cloudpickle import _PICKLE_BY_VALUE_MODULES as _BY_VALUE
    from cloudpickle.cloudpickle import _extract_code_globals as _code_globals
    from cloudpickle.cloudpickle import _should_pickle_by_reference as _by_reference
except ImportError:  # another cloudpickle: every function is pickled every time
    _BY_VALUE = _code_globals = _by_reference = None

MAX_KEPT = 64 * 1024
"""Pickles over this many bytes are not kept: a function carrying that much is rare, and
holding a second copy of it for the function's life is not worth a few microseconds."""

KEPT_PER_CODE = 1024
"""Pickles kept per code object for closures made again from it (a chain's states, say):
the most recently used, with what they copied (about 1.5 KiB a small closure)."""

BYTES_PER_CODE = 1024 * 1024
"""At most this many bytes of those pickles per code object (what they copied is about as
much again): a builder of closures over large, ever new values keeps few of them."""

_Kept = tuple[bytes, tuple[Any, ...]]  # a pickle and the mark of what it copied


class _SameCode(dict[tuple[Any, ...], _Kept]):
    """The kept closures of one code object, by what they copy, least recently used first."""

    size = 0  # bytes of pickles held

    def keep(self, key: tuple[Any, ...], kept: _Kept) -> None:
        old = self.pop(key, None)
        if old is not None:
            self.size -= len(old[0])
        self[key] = kept
        self.size += len(kept[0])
        while len(self) > KEPT_PER_CODE or self.size > BYTES_PER_CODE:
            self.size -= len(self.pop(next(iter(self)))[0])

_IMMUTABLE = frozenset({type(None), bool, int, float, complex, str, bytes, type(...), types.CodeType})
_BASE_GLOBALS = ("__package__", "__name__", "__path__", "__file__")  # what cloudpickle keeps of a module
_ABSENT = object()
_EMPTY_CELL = object()
_END = object()  # after a mapping's items


class PickledFunctions:
    """``dumps(func)``: :func:`dumps` of ``func``, from the cache when still the same."""

    def __init__(self) -> None:
        self._kept: weakref.WeakKeyDictionary[Callable[..., Any], _Kept] = weakref.WeakKeyDictionary()
        # Closures made again from the same code: by code object, then by what they copy.
        self._by_code: weakref.WeakKeyDictionary[types.CodeType, _SameCode] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()  # agents on other threads' loops share the supervisor

    def dumps(self, func: Callable[..., Any]) -> bytes:
        if _by_reference is None or type(func) is not types.FunctionType:
            return dumps(func)
        mark = fingerprint(func)
        if mark is None:
            return dumps(func)
        with self._lock:
            kept = self._kept.get(func)
        if kept is not None and _same(kept[1], mark):
            return kept[0]
        key = _values_key(mark) if len(mark) > _OWN_REF + 1 else None  # copied by value, not named
        data = None
        if key is not None:
            with self._lock:
                alike = self._by_code.get(func.__code__, {}).get(key)
            if alike is not None and _alive(alike[1]):
                data = alike[0]
        if data is None:
            data = dumps(func)
            if len(data) > MAX_KEPT:
                return data
        with self._lock:
            self._kept[func] = (data, mark)
            if key is not None:
                self._by_code.setdefault(func.__code__, _SameCode()).keep(key, (data, mark))
        return data


def unsendable(state: str, func: Any, error: Exception, where: str = "its process") -> str:
    """Why ``func`` cannot be pickled for ``where``, naming the values it uses that cannot."""
    from ..workflow import values_used

    names: list[str] = []
    for name, value in values_used(func).items():
        try:
            cloudpickle.dumps(value)
        except Exception:
            names.append(f"{name!r} (of type {type(value).__name__})")
    if not names:
        return (f"state {state!r} cannot be sent to {where} ({error!r}): define it at module level "
                "or use isolation='inline'")
    return (f"state {state!r} cannot be sent to {where}: it uses {', '.join(names)}, which cannot be "
            f"copied into another process ({error!r}); a state in a child process gets copies of the "
            "values its code uses: pass what it needs through the context, or give this state "
            "isolation='inline'")


def dumps(obj: Any) -> bytes:
    """``cloudpickle.dumps(obj)``, keeping the qualified name of each class it copies.

    cloudpickle makes a class it copies with its bare ``__name__``: a class defined in a
    function (``main.<locals>.Point``) or in another class (``Holder.Nested``) came out
    as ``Point`` or ``Nested``, so a state's process took a local TypedContextData class
    for one it could name to others, and reprs and tracebacks named the wrong class.
    """
    with io.BytesIO() as file:
        _QualnamePickler(file, protocol=cloudpickle.DEFAULT_PROTOCOL).dump(obj)
        return file.getvalue()


class _QualnamePickler(cloudpickle.Pickler):
    def reducer_override(self, obj: Any) -> Any:
        reduced = super().reducer_override(obj)
        if (isinstance(obj, type) and isinstance(reduced, tuple) and len(reduced) == 6
                and obj.__qualname__ != obj.__name__):
            state = reduced[2]
            if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):
                # _class_setstate sets each item of the class's state on the class made
                reduced = (*reduced[:2], ({**state[0], "__qualname__": obj.__qualname__}, state[1]), *reduced[3:])
        return reduced


def fingerprint(func: types.FunctionType) -> tuple[Any, ...] | None:
    """Everything cloudpickle copies of ``func``, in order (None: something is mutable)."""
    out: list[Any] = [len(sys.modules), frozenset(_BY_VALUE)]
    return tuple(out) if _walk(func, out, set()) else None


_OWN_REF = 2
"""Where a function's mark holds the function itself (after the two module-set figures)."""
_EQUAL_WHEN_EQUAL = frozenset({str, bytes, int, bool})
_TWO_DOUBLES = struct.Struct("<dd")


def _values_key(mark: tuple[Any, ...]) -> tuple[Any, ...]:
    """What a closure's mark says it copies, as a key equal for another closure of the same
    code that copies the same (see the module doc), its own identity left out.

    Objects that must be the very same are keyed by identity: a kept mark holds each (the
    weakly held ones, while :func:`_alive` says they are), so no other object has its id.
    """
    key: list[Any] = [mark[0], mark[1]]
    for item in mark[_OWN_REF + 1:]:
        kind = type(item)
        if kind is weakref.ReferenceType:
            key.append(id(item()))
        elif kind in _EQUAL_WHEN_EQUAL:
            key.append((kind, item))
        elif kind is float or kind is complex:
            key.append(_bits(item))  # the same to the bit: -0.0 is not 0.0
        else:
            key.append(id(item))  # code, a container's type, a marker: only the same one
    return tuple(key)


def _alive(mark: tuple[Any, ...]) -> bool:
    """Whether every object a kept mark holds weakly (its own function aside) still lives:
    else an object made since may have its id, and the key would match it wrongly."""
    return all(item() is not None for item in mark[_OWN_REF + 1:] if type(item) is weakref.ReferenceType)


def _bits(number: float | complex) -> bytes:
    value = complex(number)
    return _TWO_DOUBLES.pack(value.real, value.imag) + (b"j" if type(number) is complex else b"")


def _same(kept: tuple[Any, ...], now: tuple[Any, ...]) -> bool:
    if len(kept) != len(now) or kept[0] != now[0] or kept[1] != now[1]:
        return False
    kept, now = kept[2:], now[2:]
    return all(map(is_, kept, now))  # the very same objects (the first two are equal already)


def _walk(obj: Any, out: list[Any], seen: set[int]) -> bool:
    """Append what identifies ``obj``'s pickle to ``out``; False when it may change in place.

    Immutable values are held (their identities cannot be reused while held); functions,
    classes, modules and code by weak reference (the same object while it lives: a kept
    mark must not keep a function, and the closures it holds, alive).
    """
    kind = type(obj)
    if kind in _IMMUTABLE or obj is _ABSENT or obj is _EMPTY_CELL:
        out.append(obj)
        return True
    if kind is tuple or kind is frozenset:
        out.append(kind)
        for item in obj:
            if not _walk(item, out, seen):
                return False
        out.append(_END)
        return True
    if kind is types.BuiltinFunctionType:  # len, time.monotonic; a bound one ([].append) copies its object
        out.append(obj.__name__)
        return _walk(obj.__self__, out, seen)
    if kind is types.ModuleType:
        out.append(weakref.ref(obj))
        return True
    if isinstance(obj, type):
        out.append(weakref.ref(obj))
        return bool(_by_reference(obj))
    if kind is not types.FunctionType:
        return False
    out.append(weakref.ref(obj))
    if id(obj) in seen or _named(obj):  # a recursive function, or one named, not copied
        return True
    seen.add(id(obj))
    out.extend((weakref.ref(obj.__code__), obj.__name__, obj.__qualname__, obj.__module__, obj.__doc__))
    for mapping in (obj.__dict__, obj.__annotations__, obj.__kwdefaults__ or {}):
        for key, value in mapping.items():
            if not (_walk(key, out, seen) and _walk(value, out, seen)):
                return False
        out.append(_END)
    if not _walk(obj.__defaults__, out, seen):
        return False
    for cell in obj.__closure__ or ():
        try:
            value = cell.cell_contents
        except ValueError:
            value = _EMPTY_CELL
        if not _walk(value, out, seen):
            return False
    module_globals = obj.__globals__
    for name in (*_code_globals(obj.__code__), *_BASE_GLOBALS):
        out.append(name)
        if not _walk(module_globals.get(name, _ABSENT), out, seen):
            return False
    return True


def _named(func: types.FunctionType) -> bool:
    """Whether cloudpickle pickles ``func`` by reference; the two commonest cases it copies
    (a function of the program's script, one defined in a function) are told first, for
    less than its own lookup costs."""
    if func.__module__ == "__main__" or "<locals>" in func.__qualname__:
        return False
    return bool(_by_reference(func))
