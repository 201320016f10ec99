"""The one place where bytes on the process boundary are made and read (msgpack).

Two layers use it. Frames (:mod:`agent.ipc.messages`) are plain msgpack maps, unpacked
with ``raw=False``, ``strict_map_key=True`` and length caps, and no extension types.
Context values are packed separately by :func:`encode_value` into bytes that a frame
carries; they may use the extension types below, and :func:`decode_value` turns them
back into Python objects without ever unpickling: a TypedContextData value names its
class, and only a TypedContextData dataclass found by that name is built.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import importlib
import sys
from dataclasses import dataclass
from typing import Any

import msgpack

from ..context import TypedContextData
from ..errors import ProtocolError, UnencodableValueError, ValueTooLargeError

DEFAULT_MAX_FRAME = 64 * 1024 * 1024
"""Default cap on one frame, and so on one encoded context value (64 MiB)."""

FRAME_OVERHEAD = 64 * 1024
"""Room for the message around a value of the cap: what a channel lets through on top."""

EXT_TUPLE = 1
EXT_SET = 2
EXT_FROZENSET = 3
EXT_DATETIME = 4
EXT_DATE = 5
EXT_TYPED = 6

_PLAIN = (type(None), bool, int, float, str, bytes)
_FIX = (
    "store primitives (None, bool, int, float, str, bytes), lists, tuples, sets, "
    "datetimes, dicts with str keys or TypedContextData dataclasses, "
    "or run this state with isolation='inline'"
)


@dataclass(frozen=True)
class Limits:
    """Caps applied when unpacking bytes that came from another process."""

    max_frame: int = DEFAULT_MAX_FRAME
    max_items: int = 4_000_000

    def unpack_kwargs(self) -> dict[str, int]:
        return {
            "max_bin_len": self.max_frame,
            "max_str_len": self.max_frame,
            "max_ext_len": self.max_frame,
            "max_array_len": self.max_items,
            "max_map_len": self.max_items,
        }


# --- frames ------------------------------------------------------------------------------


def pack(obj: Any, *, strict: bool = True) -> bytes:
    """Pack plain data (no extension types); raises TypeError on anything else.

    ``strict`` keeps tuples and subclasses of primitives out; without it tuples pack as lists.
    """
    return msgpack.packb(obj, use_bin_type=True, strict_types=strict, datetime=False)


def unpack(data: bytes, limits: Limits) -> Any:
    """Unpack plain data with caps; raises :class:`ProtocolError` when malformed."""
    if len(data) > limits.max_frame:
        raise ProtocolError(f"frame of {len(data)} bytes is over the {limits.max_frame}-byte cap")
    try:
        return msgpack.unpackb(
            data, raw=False, strict_map_key=True, use_list=True, timestamp=0, **limits.unpack_kwargs()
        )
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as exc:
        raise ProtocolError(f"malformed frame: {exc}") from None


# --- values ------------------------------------------------------------------------------


def encode_value(
    value: Any,
    *,
    key: str | None = None,
    max_size: int | None = None,
    classes: set[type] | None = None,
) -> bytes:
    """Encode a context value with the safe codec.

    Raises :class:`UnencodableValueError` naming the key, the offending type and the fix,
    or :class:`ValueTooLargeError` when the bytes would exceed ``max_size``. The
    TypedContextData classes met on the way are added to ``classes`` when given.
    """
    where = f"context key {key!r}" if key is not None else "value"
    data = _pack_ext(_to_wire(value, where, classes))
    if max_size is not None and len(data) > max_size:
        raise ValueTooLargeError(
            f"{where}: the value encodes to {_size(len(data))}, over the {_size(max_size)} "
            "limit of one message between processes: keep large data in a file and store "
            "its path, raise AGENT_IPC_MAX_FRAME, or run this state with isolation='inline'"
        )
    return data


def _pack_ext(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True, strict_types=True, datetime=False)


def _to_wire(value: Any, path: str, classes: set[type] | None = None) -> Any:
    """``value`` as msgpack-native data, special types as ExtType; checks as it goes."""
    tp = type(value)
    if tp in _PLAIN:
        if tp is int and not -(2**63) <= value < 2**64:
            raise UnencodableValueError(
                f"{path}: the int {value} does not fit in 64 bits; store it as a str"
            )
        return value
    if tp is list:
        return [_to_wire(v, f"{path}[{i}]", classes) for i, v in enumerate(value)]
    if tp is dict:
        out = {}
        for k, v in value.items():
            if type(k) is not str:
                raise UnencodableValueError(
                    f"{path}: dict keys must be str, found a {type(k).__name__} key {k!r}; "
                    f"convert the keys to str, or {_FIX}"
                )
            out[k] = _to_wire(v, f"{path}[{k!r}]", classes)
        return out
    if tp is tuple:
        return msgpack.ExtType(EXT_TUPLE, _pack_ext([_to_wire(v, path, classes) for v in value]))
    if tp is set or tp is frozenset:
        code = EXT_SET if tp is set else EXT_FROZENSET
        return msgpack.ExtType(code, _pack_ext([_to_wire(v, path, classes) for v in value]))
    if tp is bytearray:
        return bytes(value)
    if tp is _dt.datetime:
        return msgpack.ExtType(EXT_DATETIME, _pack_ext(value.isoformat()))
    if tp is _dt.date:
        return msgpack.ExtType(EXT_DATE, _pack_ext(value.isoformat()))
    if isinstance(value, TypedContextData) and dataclasses.is_dataclass(value):
        name = _class_path(tp, path)
        if classes is not None:
            classes.add(tp)
        fields = {f.name: _to_wire(getattr(value, f.name), f"{path}.{f.name}", classes) for f in dataclasses.fields(value)}
        return msgpack.ExtType(EXT_TYPED, _pack_ext([name, fields]))
    raise UnencodableValueError(
        f"{path}: a {tp.__module__}.{tp.__qualname__} cannot cross the process boundary; {_FIX}"
    )


def _class_path(cls: type, path: str) -> str:
    if "<locals>" in cls.__qualname__:
        raise UnencodableValueError(
            f"{path}: {cls.__qualname__} is defined inside a function, so the other process "
            "cannot find it; define the TypedContextData class at module level"
        )
    return f"{cls.__module__}:{cls.__qualname__}"


def decode_value(data: bytes, limits: Limits, *, import_modules: bool = False) -> Any:
    """Decode what :func:`encode_value` made; raises :class:`ProtocolError` when malformed.

    TypedContextData classes are looked up among modules already imported; with
    ``import_modules`` (only for data from the trusted side) their module is imported.
    """
    if len(data) > limits.max_frame:
        raise ProtocolError(f"value of {len(data)} bytes is over the {limits.max_frame}-byte cap")
    kwargs = limits.unpack_kwargs()

    def ext_hook(code: int, payload: bytes) -> Any:
        inner = msgpack.unpackb(
            payload, raw=False, strict_map_key=True, ext_hook=ext_hook, timestamp=0, **kwargs
        )
        if code == EXT_TUPLE and type(inner) is list:
            return tuple(inner)
        if code == EXT_SET and type(inner) is list:
            return set(inner)
        if code == EXT_FROZENSET and type(inner) is list:
            return frozenset(inner)
        if code == EXT_DATETIME and type(inner) is str:
            return _dt.datetime.fromisoformat(inner)
        if code == EXT_DATE and type(inner) is str:
            return _dt.date.fromisoformat(inner)
        if code == EXT_TYPED and type(inner) is list and len(inner) == 2:
            name, fields = inner
            if type(name) is str and type(fields) is dict:
                return _build_typed(name, fields, import_modules)
        raise ProtocolError(f"malformed value: extension type {code} with a {type(inner).__name__}")

    try:
        return msgpack.unpackb(
            data, raw=False, strict_map_key=True, ext_hook=ext_hook, timestamp=0, **kwargs
        )
    except ProtocolError:
        raise
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as exc:
        raise ProtocolError(f"malformed value: {exc}") from None


def _build_typed(name: str, fields: dict[str, Any], import_modules: bool) -> TypedContextData:
    module_name, _, qualname = name.partition(":")
    module = sys.modules.get(module_name)
    if module is None and import_modules:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            module = None
    obj: Any = module
    for part in qualname.split("."):
        obj = getattr(obj, part, None) if obj is not None else None
    if obj is None:
        obj = _loaded_subclass(module_name, qualname)
    if not (isinstance(obj, type) and issubclass(obj, TypedContextData) and dataclasses.is_dataclass(obj)):
        raise ProtocolError(
            f"typed value names {name!r}, which is not an imported TypedContextData dataclass: "
            "import the module that defines it in the supervising process"
        )
    try:
        value = obj(**fields)
        value.validate()
    except Exception as exc:
        raise ProtocolError(f"typed value {name!r} does not match its class: {exc}") from None
    return value


def _loaded_subclass(module_name: str, qualname: str) -> type | None:
    """A TypedContextData subclass defined in this process under that name (the latest).

    Finds classes whose module is no longer in ``sys.modules`` (a script run with runpy,
    a class sent by value), without importing anything.
    """
    found = None
    stack = list(TypedContextData.__subclasses__())
    while stack:
        cls = stack.pop(0)
        # (cloudpickle can leave unfilled skeletons of a class it already had: not dataclasses)
        if cls.__module__ == module_name and cls.__qualname__ == qualname and dataclasses.is_dataclass(cls):
            found = cls
        stack.extend(cls.__subclasses__())
    return found


def _size(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MiB" if n >= 1024 * 1024 else f"{n} bytes"
