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
"""

from __future__ import annotations

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

_IMMUTABLE = frozenset({type(None), bool, int, float, complex, str, bytes, type(...), types.CodeType})
_BASE_GLOBALS = ("__package__", "__name__", "__path__", "__file__")  # what cloudpickle keeps of a module
_ABSENT = object()
_EMPTY_CELL = object()
_END = object()  # after a mapping's items


class PickledFunctions:
    """``dumps(func)``: ``cloudpickle.dumps(func)``, from the cache when still the same."""

    def __init__(self) -> None:
        self._kept: weakref.WeakKeyDictionary[Callable[..., Any], tuple[bytes, tuple[Any, ...]]] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()  # agents on other threads' loops share the supervisor

    def dumps(self, func: Callable[..., Any]) -> bytes:
        if _by_reference is None or type(func) is not types.FunctionType:
            return _dumps(func)
        mark = fingerprint(func)
        if mark is not None:
            with self._lock:
                kept = self._kept.get(func)
            if kept is not None and _same(kept[1], mark):
                return kept[0]
        data = _dumps(func)
        if mark is not None and len(data) <= MAX_KEPT:
            with self._lock:
                self._kept[func] = (data, mark)
        return data


def _dumps(func: Callable[..., Any]) -> bytes:
    data: bytes = cloudpickle.dumps(func)
    return data


def fingerprint(func: types.FunctionType) -> tuple[Any, ...] | None:
    """Everything cloudpickle copies of ``func``, in order (None: something is mutable)."""
    out: list[Any] = [len(sys.modules), frozenset(_BY_VALUE)]
    return tuple(out) if _walk(func, out, set()) else None


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
