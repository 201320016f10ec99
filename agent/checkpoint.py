"""A snapshot of a run that can be written as JSON and resumed from."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from .errors import CheckpointError

CHECKPOINT_FORMAT_VERSION = 1


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

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (context values in the tagged JSON form of :mod:`agent.jsoncodec`)."""
        from .jsoncodec import to_json_value

        return {
            "format_version": self.format_version,
            "timestamp": self.timestamp,
            "agent_name": self.agent_name,
            "agent_status": self.agent_status,
            "run_id": self.run_id,
            "completed_states": sorted(self.completed_states),
            "pending_states": list(self.pending_states),
            "running_states": list(self.running_states),
            "state_metadata": to_json_value(self.state_metadata),
            "context": to_json_value(self.context),
            "frames": to_json_value(self.frames),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AgentCheckpoint":
        """Rebuild a checkpoint from :meth:`to_dict` output; raises CheckpointError when malformed."""
        from .jsoncodec import from_json_value

        if not isinstance(data, dict):
            raise CheckpointError(f"a checkpoint is a JSON object, got {type(data).__name__}")
        version = data.get("format_version")
        if version != CHECKPOINT_FORMAT_VERSION:
            raise CheckpointError(
                f"checkpoint format version {version!r} is not supported (this version reads "
                f"{CHECKPOINT_FORMAT_VERSION}): resume it with the release that wrote it"
            )
        try:
            return cls(
                agent_name=str(data["agent_name"]),
                agent_status=str(data["agent_status"]),
                completed_states=set(data["completed_states"]),
                pending_states=list(data["pending_states"]),
                running_states=list(data["running_states"]),
                state_metadata=from_json_value(data.get("state_metadata", {})),
                context=from_json_value(data["context"]),
                run_id=str(data.get("run_id", "")),
                frames=from_json_value(data.get("frames", {})),
                timestamp=float(data["timestamp"]),
                format_version=version,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"malformed checkpoint: {exc!r}") from exc


Checkpoint = AgentCheckpoint
