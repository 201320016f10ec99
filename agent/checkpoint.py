"""A snapshot of a run that can be written as JSON and resumed from.

``to_dict()`` is plain JSON data (context values in the tagged form of
:mod:`agent.values`); ``from_dict()`` checks everything it reads, so corrupt or
truncated data, a checkpoint from a newer release, or one that does not fit the agent
it is applied to each raise :class:`~agent.errors.CheckpointError` with what to do.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .errors import CheckpointError
from .status import AgentStatus, StateStatus

CHECKPOINT_FORMAT_VERSION = 1

_REQUIRED_FIELDS = (
    "timestamp", "agent_name", "agent_status", "completed_states", "pending_states",
    "running_states", "state_metadata", "context",
)


@dataclass
class AgentCheckpoint:
    """Status, completed/pending/running states, per-state metadata and the context.

    ``frames`` holds the scheduler's fan-out structure (which branches are still
    open, which joins are held) so a resumed run joins exactly as the original would.
    """

    agent_name: str
    agent_status: str
    completed_states: set[str]
    pending_states: list[str]
    running_states: list[str]
    state_metadata: dict[str, dict[str, Any]]
    context: dict[str, Any]
    run_id: str = ""
    frames: dict[str, Any] = field(default_factory=dict)
    timestamp: float = field(default_factory=time.time)
    format_version: int = CHECKPOINT_FORMAT_VERSION

    # --- plain data -------------------------------------------------------------------

    def header_dict(self, *, with_metadata: bool = True) -> dict[str, Any]:
        """Everything but the context as plain JSON data (a store keeps context apart).

        ``with_metadata=False`` leaves ``state_metadata`` out too (stored per state).
        """
        from .values import to_json

        data = {
            "format_version": self.format_version,
            "timestamp": self.timestamp,
            "agent_name": self.agent_name,
            "agent_status": self.agent_status,
            "run_id": self.run_id,
            "completed_states": sorted(self.completed_states),
            "pending_states": list(self.pending_states),
            "running_states": list(self.running_states),
            "frames": to_json(self.frames, "frames"),
        }
        if with_metadata:
            data["state_metadata"] = to_json(self.state_metadata, "state_metadata")
        return data

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (context values in the tagged JSON form of :mod:`agent.values`)."""
        from .values import to_json

        data = self.header_dict()
        data["context"] = to_json(self.context, "context", levels_above=1)
        return data

    def to_json(self) -> str:
        """:meth:`to_dict` as JSON text."""
        return json.dumps(self.to_dict(), separators=(",", ":"), ensure_ascii=False, allow_nan=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> "AgentCheckpoint":
        """Read :meth:`to_json` output; corrupt or truncated text raises CheckpointError."""
        try:
            data = json.loads(text)
        except (ValueError, TypeError, RecursionError) as exc:
            raise CheckpointError(
                f"checkpoint text is corrupt or truncated ({exc}): use an earlier checkpoint"
            ) from exc
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Any) -> "AgentCheckpoint":
        """Rebuild a checkpoint from :meth:`to_dict` output; raises CheckpointError when malformed."""
        from .values import from_json

        if not isinstance(data, dict):
            raise CheckpointError(f"a checkpoint is a JSON object, got {type(data).__name__}")
        version = check_format_version(data.get("format_version"))
        missing = [k for k in _REQUIRED_FIELDS if k not in data]
        if missing:
            raise CheckpointError(
                f"checkpoint is missing {', '.join(missing)}: it is truncated or not a checkpoint"
            )
        context = from_json(data["context"], levels_above=1)
        if not isinstance(context, dict) or not all(isinstance(k, str) for k in context):
            raise CheckpointError("checkpoint context must be an object with string keys")
        status = _text(data, "agent_status")
        if status not in _AGENT_STATUSES:
            raise CheckpointError(f"checkpoint field agent_status is {status!r}, not an agent status: it is corrupt")
        return cls(
            agent_name=_text(data, "agent_name"),
            agent_status=status,
            completed_states=set(_names(data, "completed_states")),
            pending_states=_names(data, "pending_states"),
            running_states=_names(data, "running_states"),
            state_metadata=_state_metadata(from_json(data["state_metadata"])),
            context=context,
            run_id=_text(data, "run_id") if "run_id" in data else "",
            frames=_frames(from_json(data.get("frames", {}))),
            timestamp=_number(data, "timestamp"),
            format_version=version,
        )

    # --- applying to an agent ------------------------------------------------------------

    def state_names(self) -> set[str]:
        """Every state name the checkpoint refers to (its lists, and what its frames hold or wait for)."""
        frames = self.frames
        names = set(self.completed_states) | set(self.pending_states) | set(self.running_states)
        names.update(a["state"] for a in frames.get("activations", ()))
        names.update(frames.get("watch", ()))
        for group in frames.get("groups", ()):
            names.update(group.get("held", ()))
            names.update(group.get("cancelled", ()))
        return names

    def validate_for(self, agent_name: str | None, state_names: Iterable[str]) -> None:
        """Raise CheckpointError unless this checkpoint can be applied to that agent.

        ``agent_name=None`` skips the name check (restoring into an agent of another
        name, as ``Agent("restored").restore_from_checkpoint(cp)`` does); the states
        the checkpoint refers to must all exist in ``state_names``.
        """
        if agent_name is not None and agent_name != self.agent_name:
            raise CheckpointError(
                f"checkpoint of run {self.run_id or '?'} belongs to agent {self.agent_name!r}, "
                f"not {agent_name!r}: resume it with the agent that wrote it"
            )
        known = set(state_names)
        missing = sorted(self.state_names() - known)
        if missing:
            raise CheckpointError(
                f"checkpoint of agent {self.agent_name!r} refers to state(s) "
                f"{', '.join(map(repr, missing))} that this agent does not have: add them "
                "before restoring, or start a new run"
            )


Checkpoint = AgentCheckpoint


def check_format_version(version: Any) -> int:
    """The format version if this release reads it; CheckpointError otherwise."""
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointError(
            f"checkpoint has no valid format_version ({version!r}): it is corrupt or not a checkpoint"
        )
    if version > CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint format version {version} was written by a newer release (this one reads "
            f"up to {CHECKPOINT_FORMAT_VERSION}): upgrade the agent package to resume it"
        )
    return version


def _text(data: dict[str, Any], key: str) -> str:
    value = data[key]
    if not isinstance(value, str):
        raise CheckpointError(f"checkpoint field {key} must be a string, got {type(value).__name__}")
    return value


def _number(data: dict[str, Any], key: str) -> float:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CheckpointError(f"checkpoint field {key} must be a number, got {type(value).__name__}")
    return float(value)


def _names(data: dict[str, Any], key: str) -> list[str]:
    value = data[key]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CheckpointError(f"checkpoint field {key} must be a list of state names")
    return list(value)


_AGENT_STATUSES = frozenset(s.value for s in AgentStatus)
_STATE_STATUSES = frozenset(s.value for s in StateStatus)


def _state_metadata(value: Any) -> dict[str, dict[str, Any]]:
    for name, meta in _mapping(value, "state_metadata").items():
        if not isinstance(meta, dict):
            raise CheckpointError(
                f"checkpoint state_metadata of {name!r} is a {type(meta).__name__}, not an object: it is corrupt")
        if "status" in meta and meta["status"] not in _STATE_STATUSES:
            raise CheckpointError(f"checkpoint state_metadata of {name!r} has status {meta['status']!r}, "
                                  "not a state status: it is corrupt")
    return value  # type: ignore[no-any-return]


# The fields of the scheduler's frames (Run.snapshot), the first of each required.
_FRAME_FIELDS: dict[str, dict[str, Any]] = {
    "activations": {"state": str, "group": int, "attempt": int, "via_dependency": bool, "counted": bool,
                    "ended": bool},
    "groups": {"id": int, "parent": (int, None), "unfinished": int, "active": int, "opener": (str, None),
               "held": (dict, list), "cancelled": list},
}


def _frames(value: Any) -> dict[str, Any]:
    """The scheduler's frames, every field checked, so that a corrupt one is refused here and
    not met half-way through a resumed run."""
    frames = _mapping(value, "frames")

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise CheckpointError(f"checkpoint frames.{what}: it is corrupt")

    for key, fields in _FRAME_FIELDS.items():
        items = frames.get(key, [])
        need(_is(items, list) and _all(items, dict), f"{key} is not a list of objects")
        for item in items:
            need(next(iter(fields)) in item, f"{key} has an entry without {next(iter(fields))}")
            for name, expected in fields.items():
                need(name not in item or _is(item[name], expected), f"{key} has {name}={item.get(name)!r}")
    for group in frames.get("groups", []):
        held = group.get("held", {})
        need(_all(held, str) and _all(held.values() if isinstance(held, dict) else (), int)
             and _all(group.get("cancelled", []), str), "groups holds a state name that is not a string")
    need(_is(frames.get("watch", []), list) and _all(frames.get("watch", []), str), "watch is not a list of names")
    need(_is(frames.get("steps", 0), int), "steps is not an integer")
    dependencies = frames.get("dependencies", {})
    need(_is(dependencies, dict), "dependencies is not an object")
    consumed = dependencies.get("consumed", [])
    need(_is(consumed, list) and all(_is(c, list) and len(c) == 3 and _is(c[0], str) and _is(c[1], str)
                                     and _is(c[2], int) for c in consumed),
         "dependencies.consumed is not a list of [name, name, count]")
    for where, key, number in (
        (frames, "completions", int), (dependencies, "starts", int), (dependencies, "finishes", int),
        (dependencies, "last_completion", (int, float)), (dependencies, "last_start", (int, float)),
    ):
        counts = where.get(key, {})
        need(_is(counts, dict) and _all(counts.values(), number), f"{key} does not map names to numbers")
    return frames


def _all(items: Any, expected: Any) -> bool:
    return all(_is(item, expected) for item in items)


def _is(value: Any, expected: Any) -> bool:
    """``isinstance`` where a bool is no number, and None in a tuple allows None."""
    kinds = expected if isinstance(expected, tuple) else (expected,)
    if value is None:
        return None in kinds
    if isinstance(value, bool):
        return bool in kinds
    return isinstance(value, tuple(k for k in kinds if k is not None))


def _mapping(value: Any, key: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise CheckpointError(f"checkpoint field {key} must be an object, got {type(value).__name__}")
    return value
