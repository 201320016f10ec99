"""Environment variables: read on hot paths (every ``Agent()``, every run), and parsed
as settings with one rule for every ``AGENT_*`` number.

``os.environ.get`` encodes the name, decodes the value and, for a name that is not set,
raises and catches a KeyError inside ``os._Environ``: thousands of instructions for a
lookup that usually finds nothing. Reading the bytes mapping behind ``os.environ`` costs
a dict lookup and sees exactly what ``os.environ`` sees (every change made through it,
``monkeypatch.setenv`` included).
"""

from __future__ import annotations

import math
import os
from typing import Any

from .errors import InvalidConfigurationError

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


def seconds(name: str, default: float, *, above_zero: bool = False) -> float:
    """The setting ``name`` as a number of seconds (``default`` when unset or blank).

    Anything else (text, ``inf``, ``nan``, a negative number, or 0 where ``above_zero``)
    raises :class:`~agent.errors.InvalidConfigurationError` naming the variable and what
    to give: a mistyped setting is never silently replaced by the default.
    """
    text = (get(name) or "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and (value > 0 if above_zero else value >= 0)):
        least = "above 0" if above_zero else "0 or more"
        raise InvalidConfigurationError(f"{name}={text!r}: give a number of seconds ({least})")
    return value


COUNT_MOST = 2**31 - 1
"""The most any count setting may be: what a C ``int`` holds (the zygote's messages and the
kernel's calls carry them); more than any machine can use."""


def count(name: str, default: int, *, least: int = 0) -> int:
    """The setting ``name`` as a whole number from ``least`` to :data:`COUNT_MOST`
    (``default`` when unset or blank); ASCII digits only, so ``1e3``, ``+5`` or ``1_000`` are
    refused as :func:`seconds` refuses what it cannot read."""
    text = (get(name) or "").strip()
    if not text:
        return default
    if not (text.isascii() and text.isdigit()) or int(text) < least:
        raise InvalidConfigurationError(f"{name}={text!r}: give a whole number ({least} or more)")
    if int(text) > COUNT_MOST:
        raise InvalidConfigurationError(f"{name}={text!r}: give a whole number from {least} to {COUNT_MOST}")
    return int(text)

