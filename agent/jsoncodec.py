"""Context values as plain JSON, for checkpoints.

JSON has no sets, tuples, bytes, datetimes or dataclasses, so those become tagged
objects ``{"$type": ..., "value": ...}``. A dict that itself has a ``$type`` key is
wrapped too, so decoding is unambiguous. TypedContextData come back only as
importable subclasses of TypedContextData: a checkpoint never names arbitrary code.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as _dt
import importlib
from typing import Any

from .context import TypedContextData
from .errors import CheckpointError, UnencodableValueError

_TAG = "$type"


def to_json_value(value: Any, _path: str = "value") -> Any:
    """Encode ``value`` into JSON-compatible data; raises UnencodableValueError."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return {_TAG: "float", "value": repr(value)}
        return value
    if isinstance(value, list):
        return [to_json_value(v, f"{_path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and _TAG not in value:
            return {k: to_json_value(v, f"{_path}[{k!r}]") for k, v in value.items()}
        return {
            _TAG: "dict",
            "value": [[to_json_value(k, _path), to_json_value(v, f"{_path}[{k!r}]")] for k, v in value.items()],
        }
    if isinstance(value, tuple):
        return {_TAG: "tuple", "value": [to_json_value(v, _path) for v in value]}
    if isinstance(value, (set, frozenset)):
        items = [to_json_value(v, _path) for v in value]
        try:
            items.sort(key=lambda x: (str(type(x)), repr(x)))
        except Exception:
            pass
        return {_TAG: "frozenset" if isinstance(value, frozenset) else "set", "value": items}
    if isinstance(value, (bytes, bytearray)):
        return {_TAG: "bytes", "value": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, _dt.datetime):
        return {_TAG: "datetime", "value": value.isoformat()}
    if isinstance(value, _dt.date):
        return {_TAG: "date", "value": value.isoformat()}
    if isinstance(value, TypedContextData) and dataclasses.is_dataclass(value):
        cls = type(value)
        fields = {f.name: to_json_value(getattr(value, f.name), f"{_path}.{f.name}") for f in dataclasses.fields(value)}
        return {_TAG: "typed", "class": f"{cls.__module__}:{cls.__qualname__}", "value": fields}
    raise UnencodableValueError(
        f"{_path}: a {type(value).__name__} cannot be written to a checkpoint; store primitives, "
        "lists, dicts, sets, datetimes or TypedContextData dataclasses"
    )


def _load_typed_class(name: str) -> type[TypedContextData]:
    known = TypedContextData.lookup(name)
    if known is not None:
        return known
    module_name, _, qualname = name.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise CheckpointError(
            f"checkpoint holds typed data of class {name!r}, which cannot be imported: "
            "import the module that defines it before restoring"
        ) from exc
    if not (isinstance(obj, type) and issubclass(obj, TypedContextData)):
        raise CheckpointError(f"{name!r} in a checkpoint is not a TypedContextData class")
    return obj


def from_json_value(data: Any) -> Any:
    """Decode what :func:`to_json_value` produced."""
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
            return {_hashable(from_json_value(k)): from_json_value(v) for k, v in raw}
        if tag == "tuple":
            return tuple(from_json_value(v) for v in raw)
        if tag == "set":
            return {_hashable(from_json_value(v)) for v in raw}
        if tag == "frozenset":
            return frozenset(_hashable(from_json_value(v)) for v in raw)
        if tag == "bytes":
            return base64.b64decode(raw)
        if tag == "datetime":
            return _dt.datetime.fromisoformat(raw)
        if tag == "date":
            return _dt.date.fromisoformat(raw)
        if tag == "float":
            return float(raw)
        if tag == "typed":
            cls = _load_typed_class(data["class"])
            fields = {k: from_json_value(v) for k, v in raw.items()}
            return cls(**fields)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"malformed {tag!r} value in checkpoint: {exc!r}") from exc
    raise CheckpointError(f"unknown value tag {tag!r} in checkpoint")


def _hashable(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    return value
