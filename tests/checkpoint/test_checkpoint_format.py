"""AgentCheckpoint: plain JSON out, checked on the way in."""

from __future__ import annotations

import dataclasses
import json

import pytest

from agent.checkpoint import CHECKPOINT_FORMAT_VERSION, AgentCheckpoint
from agent.context import TypedContextData
from agent.errors import CheckpointError


@dataclasses.dataclass
class Progress(TypedContextData):
    done: int
    seen: set[str]


def sample() -> AgentCheckpoint:
    return AgentCheckpoint(
        agent_name="etl",
        agent_status="running",
        completed_states={"extract", "transform"},
        pending_states=["load"],
        running_states=["notify"],
        state_metadata={"extract": {"attempts": 1, "status": "completed"}},
        context={"rows": 10, "progress": Progress(3, {"a", "b"}), "pair": (1, 2)},
        run_id="run-1",
        frames={"groups": [{"id": 0, "parent": None, "unfinished": 1, "held": {}}],
                "activations": [{"state": "load", "group": 0, "attempt": 0, "via_dependency": False}],
                "watch": [], "completions": {"extract": 1, "transform": 1}, "steps": 3},
        timestamp=1_800_000_000.5,
    )


class TestAgentCheckpoint:
    """to_dict is plain JSON; from_dict gives the same checkpoint back."""

    def test_round_trip_through_json_text(self):
        cp = sample()
        text = json.dumps(cp.to_dict())
        back = AgentCheckpoint.from_dict(json.loads(text))
        assert back == cp
        assert AgentCheckpoint.from_json(cp.to_json()) == cp

    def test_spec_fields_are_there(self):
        data = sample().to_dict()
        assert data["timestamp"] == 1_800_000_000.5
        assert data["agent_name"] == "etl"
        assert data["agent_status"] == "running"
        assert data["completed_states"] == ["extract", "transform"]
        assert data["format_version"] == CHECKPOINT_FORMAT_VERSION

    def test_truncated_text(self):
        text = sample().to_json()
        for cut in (1, len(text) // 2, len(text) - 1):
            with pytest.raises(CheckpointError, match="corrupt or truncated"):
                AgentCheckpoint.from_json(text[:cut])

    def test_future_format_version(self):
        data = sample().to_dict()
        data["format_version"] = CHECKPOINT_FORMAT_VERSION + 1
        with pytest.raises(CheckpointError, match="newer release.*upgrade"):
            AgentCheckpoint.from_dict(data)

    @pytest.mark.parametrize("version", [None, "1", 0, True, 1.0])
    def test_invalid_format_version(self, version):
        data = sample().to_dict()
        data["format_version"] = version
        with pytest.raises(CheckpointError, match="format_version"):
            AgentCheckpoint.from_dict(data)

    @pytest.mark.parametrize("field", ["agent_name", "context", "completed_states", "timestamp"])
    def test_missing_field(self, field):
        data = sample().to_dict()
        del data[field]
        with pytest.raises(CheckpointError, match=f"missing {field}"):
            AgentCheckpoint.from_dict(data)

    @pytest.mark.parametrize(
        "field, value",
        [
            ("completed_states", "extract"),
            ("pending_states", [1]),
            ("agent_name", 5),
            ("timestamp", "now"),
            ("state_metadata", []),
            ("context", {"$type": "dict", "value": [[1, 2]]}),
        ],
    )
    def test_wrong_field_type(self, field, value):
        data = sample().to_dict()
        data[field] = value
        with pytest.raises(CheckpointError):
            AgentCheckpoint.from_dict(data)

    def test_not_an_object(self):
        with pytest.raises(CheckpointError, match="JSON object"):
            AgentCheckpoint.from_dict([1, 2])

    @pytest.mark.parametrize(
        "field, value",
        [
            ("agent_status", "weird"),
            ("state_metadata", {"extract": {"status": "bogus"}}),
            ("state_metadata", {"extract": 5}),
            ("frames", {"groups": "x"}),
            ("frames", {"groups": [{"parent": None}]}),
            ("frames", {"groups": [{"id": "0"}]}),
            ("frames", {"groups": [{"id": 0, "held": {"load": "two"}}]}),
            ("frames", {"activations": [{"state": 5, "group": 0}]}),
            ("frames", {"activations": [{"state": "load", "group": True}]}),
            ("frames", {"activations": [{"group": 0}]}),
            ("frames", {"watch": [1]}),
            ("frames", {"steps": "3"}),
            ("frames", {"completions": {"load": None}}),
            ("frames", {"dependencies": {"consumed": [["load", 1, 2]]}}),
            ("frames", {"dependencies": {"last_start": {"load": "now"}}}),
        ],
    )
    def test_corrupt_status_metadata_or_frames(self, field, value):
        # Refused on the way in, not met half-way through a resumed run as a bare TypeError.
        data = sample().to_dict()
        data[field] = value
        with pytest.raises(CheckpointError, match="corrupt"):
            AgentCheckpoint.from_dict(data)


class TestValidateFor:
    """A checkpoint applies only to an agent of its name that has all its states."""

    def test_matching_agent(self):
        sample().validate_for("etl", ["extract", "transform", "load", "notify", "extra"])

    def test_other_agent_name(self):
        with pytest.raises(CheckpointError, match="belongs to agent 'etl', not 'billing'"):
            sample().validate_for("billing", ["extract", "transform", "load", "notify"])

    def test_name_check_can_be_skipped(self):
        sample().validate_for(None, ["extract", "transform", "load", "notify"])

    def test_states_that_no_longer_exist(self):
        with pytest.raises(CheckpointError, match="'load', 'notify'"):
            sample().validate_for("etl", ["extract", "transform"])

    @pytest.mark.parametrize("frames", [
        {"activations": [{"state": "gone", "group": 0}]},
        {"groups": [{"id": 0, "held": {"gone": 1}}]},
        {"groups": [{"id": 0, "cancelled": ["gone"]}]},
        {"watch": ["gone"]},
    ])
    def test_a_state_named_only_in_the_frames(self, frames):
        # Its pending work would otherwise be dropped without a word.
        cp = dataclasses.replace(sample(), frames=frames)
        with pytest.raises(CheckpointError, match="'gone'"):
            cp.validate_for("etl", ["extract", "transform", "load", "notify"])
