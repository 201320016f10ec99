"""Environment variables read on hot paths (every ``Agent()``, every run).

``os.environ.get`` encodes the name, decodes the value and, for a name that is not set,
raises and catches a KeyError inside ``os._Environ``: thousands of instructions for a
lookup that usually finds nothing. Reading the bytes mapping behind ``os.environ`` costs
a dict lookup and sees exactly what ``os.environ`` sees (every change made through it,
``monkeypatch.setenv`` included).
"""

from __future__ import annotations

import os
from typing import Any

_data: dict[bytes, bytes] | None = getattr(os.environ, "_data", None)


def get(name: str) -> str | None:
    """``os.environ.get(name)``, without the exception when it is not set."""
    if _data is None:  # another platform's os.environ: no bytes mapping to read
        return os.environ.get(name)
    value = _data.get(name.encode())
    return None if value is None else os.fsdecode(value)


def snapshot() -> dict[Any, Any]:
    """A copy of the whole environment as ``os.environ`` holds it (bytes to bytes on CPython),
    for comparing it cheaply later: ``os.environ`` would decode every entry."""
    return dict(_data) if _data is not None else dict(os.environ)
