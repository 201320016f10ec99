"""Context values as plain JSON, for checkpoints.

JSON has no sets, tuples, bytes, datetimes or dataclasses, so those become tagged
objects ``{"$type": ..., "value": ...}``. A dict that itself has a ``$type`` key, or
keys that are not strings, is wrapped too, so decoding is unambiguous. Typed data come
back only as importable subclasses of TypedContextData: a checkpoint never names
arbitrary code.

Encoded exactly (``decode(encode(v)) == v`` with the same types): None, bool, int,
float (NaN and infinities included), str, bytes, bytearray, list, tuple, dict (any
hashable encodable keys), set, frozenset, datetime, date, time, timedelta, Decimal,
UUID and TypedContextData dataclasses. Subclasses of str/int/float (enums included)
are stored as their base value.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as _dt
import decimal
import importlib
import json
import uuid
import zoneinfo
from typing import Any

from .context import TypedContextData
from .errors import CheckpointError, UnencodableValueError

_TAG = "$type"
_MAX_DEPTH = 200
_INF = float("inf")
_NINF = float("-inf")


class _Unencodable(Exception):
    """Raised inside the encoder; carries the path to the bad value, innermost part first."""

    def __init__(self, message: str) -> None:
        self.message = message
        self.parts: list[str] = []


def to_json_value(value: Any, _path: str = "value") -> Any:
    """Encode ``value`` into JSON-compatible data; raises UnencodableValueError naming where."""
    try:
        return _encode(value, 0)
    except _Unencodable as exc:
        where = _path + "".join(reversed(exc.parts))
        raise UnencodableValueError(f"{where}: {exc.message}") from None


def _encode(value: Any, depth: int) -> Any:
    t = type(value)
    if t is str or t is int or t is bool or value is None:  # the common case, first
        return value
    if t is float:
        if value != value or value in (_INF, _NINF):
            return {_TAG: "float", "value": repr(value)}
        return value
    if depth >= _MAX_DEPTH:
        raise _Unencodable(
            f"nested more than {_MAX_DEPTH} levels deep (a reference cycle?); store flatter data"
        )
    d = depth + 1
    if isinstance(value, dict):
        plain = _TAG not in value and all(type(k) is str for k in value)
        items = []
        for k, v in value.items():
            try:
                if plain:
                    items.append((k, _encode(v, d)))
                else:
                    items.append([_encode(k, d), _encode(v, d)])
            except _Unencodable as exc:
                exc.parts.append(f"[{k!r}]")
                raise
        return dict(items) if plain else {_TAG: "dict", "value": items}
    if isinstance(value, (list, tuple)):
        out = []
        for i, v in enumerate(value):
            try:
                out.append(_encode(v, d))
            except _Unencodable as exc:
                exc.parts.append(f"[{i}]")
                raise
        return {_TAG: "tuple", "value": out} if isinstance(value, tuple) else out
    if isinstance(value, str):
        return str.__str__(value)  # a str enum's plain value, not "Cls.MEMBER"
    if isinstance(value, bool):  # a bool subclass is still a bool
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return _encode(float(value), depth)
    if isinstance(value, (set, frozenset)):
        try:
            items = [_encode(v, d) for v in value]
        except _Unencodable as exc:
            exc.parts.append(" item")
            raise
        # A stable order, so equal sets give equal JSON (the store compares texts).
        items.sort(key=lambda x: json.dumps(x, sort_keys=True))
        return {_TAG: "frozenset" if isinstance(value, frozenset) else "set", "value": items}
    if isinstance(value, bytes):
        return {_TAG: "bytes", "value": base64.b64encode(value).decode("ascii")}
    if isinstance(value, bytearray):
        return {_TAG: "bytearray", "value": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, _dt.datetime):
        zone = getattr(value.tzinfo, "key", None)
        if isinstance(value.tzinfo, zoneinfo.ZoneInfo) and zone:
            # Keep the zone itself, not just today's offset (and which of two repeated times).
            local = value.replace(tzinfo=None).isoformat()
            return {_TAG: "datetime", "value": local, "zone": zone, "fold": value.fold}
        return {_TAG: "datetime", "value": value.isoformat(), "fold": value.fold}
    if isinstance(value, _dt.date):
        return {_TAG: "date", "value": value.isoformat()}
    if isinstance(value, _dt.time):
        return {_TAG: "time", "value": value.isoformat()}
    if isinstance(value, _dt.timedelta):
        return {_TAG: "timedelta", "value": [value.days, value.seconds, value.microseconds]}
    if isinstance(value, decimal.Decimal):
        return {_TAG: "decimal", "value": str(value)}
    if isinstance(value, uuid.UUID):
        return {_TAG: "uuid", "value": str(value)}
    if isinstance(value, TypedContextData) and dataclasses.is_dataclass(value):
        return _encode_typed(value, d)
    raise _Unencodable(
        f"a {type(value).__name__} cannot be written to a checkpoint; store primitives, "
        "lists, dicts, sets, datetimes or TypedContextData dataclasses"
    )


def _encode_typed(value: Any, depth: int) -> dict[str, Any]:
    cls = type(value)
    if "<locals>" in cls.__qualname__:
        raise _Unencodable(
            f"{cls.__qualname__} is defined inside a function, so a resumed run could "
            "not import it; define the TypedContextData class at module level"
        )
    fields = {}
    for f in dataclasses.fields(value):
        try:
            fields[f.name] = _encode(getattr(value, f.name), depth)
        except _Unencodable as exc:
            exc.parts.append(f".{f.name}")
            raise
    return {_TAG: "typed", "class": f"{cls.__module__}:{cls.__qualname__}", "value": fields}


def _load_typed_class(name: str) -> type[TypedContextData]:
    known = TypedContextData.lookup(name)
    if known is not None:
        return known
    module_name, _, qualname = name.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint holds typed data of class {name!r}, which cannot be imported: "
            "import the module that defines it before restoring"
        ) from exc
    if not (isinstance(obj, type) and issubclass(obj, TypedContextData) and dataclasses.is_dataclass(obj)):
        raise CheckpointError(f"{name!r} in a checkpoint is not a TypedContextData dataclass")
    return obj


def _decode_typed(data: dict[str, Any]) -> TypedContextData:
    cls = _load_typed_class(data["class"])
    raw = data["value"]
    if not isinstance(raw, dict):
        raise CheckpointError(f"typed value of {data['class']!r} has no field map")
    fields = {k: from_json_value(v) for k, v in raw.items()}
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - set(by_name))
    if unknown:
        raise CheckpointError(
            f"checkpoint has field(s) {', '.join(unknown)} that {cls.__qualname__} no longer "
            "defines: restore with the code that wrote the checkpoint"
        )
    obj = cls(**{k: v for k, v in fields.items() if by_name[k].init})
    for k, v in fields.items():
        if not by_name[k].init:
            object.__setattr__(obj, k, v)  # fields with init=False (works for frozen too)
    return obj


def from_json_value(data: Any) -> Any:
    """Decode what :func:`to_json_value` produced; raises CheckpointError when malformed."""
    if isinstance(data, list):
        return [from_json_value(v) for v in data]
    if not isinstance(data, dict):
        return data
    tag = data.get(_TAG)
    if tag is None:
        return {k: from_json_value(v) for k, v in data.items()}
    raw = data.get("value")
    try:
        if tag == "dict":
            return {from_json_value(k): from_json_value(v) for k, v in raw}
        if tag == "tuple":
            return tuple(from_json_value(v) for v in raw)
        if tag == "set":
            return {from_json_value(v) for v in raw}
        if tag == "frozenset":
            return frozenset(from_json_value(v) for v in raw)
        if tag == "bytes":
            return base64.b64decode(raw, validate=True)
        if tag == "bytearray":
            return bytearray(base64.b64decode(raw, validate=True))
        if tag == "datetime":
            moment = _dt.datetime.fromisoformat(raw)
            if "zone" in data:
                moment = moment.replace(tzinfo=zoneinfo.ZoneInfo(data["zone"]))
            return moment.replace(fold=int(data.get("fold", 0)))
        if tag == "date":
            return _dt.date.fromisoformat(raw)
        if tag == "time":
            return _dt.time.fromisoformat(raw)
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
            return _decode_typed(data)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"malformed {tag!r} value in checkpoint: {exc!r}") from exc
    raise CheckpointError(f"unknown value tag {tag!r} in checkpoint: it was written by a newer release")


def dumps(value: Any) -> str:
    """``value`` as compact JSON text (deterministic for equal values)."""
    return json.dumps(to_json_value(value), separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def loads(text: str | bytes) -> Any:
    """The value :func:`dumps` wrote; raises CheckpointError for corrupt or truncated text."""
    try:
        data = json.loads(text)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"corrupt or truncated checkpoint JSON: {exc}") from exc
    return from_json_value(data)
