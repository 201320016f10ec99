"""The checkpoint (JSON) form of the value model: every value comes back equal and of the same type."""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import json
import math
import uuid
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.checkpoint import AgentCheckpoint
from agent.context import TypedContextData
from agent.errors import CheckpointError, UnencodableValueError
from agent.values import MAX_DEPTH, check, dumps, from_json, loads, to_json


@dataclasses.dataclass
class Point(TypedContextData):
    x: int
    y: float
    tags: set[str] = dataclasses.field(default_factory=set)


@dataclasses.dataclass(frozen=True)
class Labelled(TypedContextData):
    label: str
    inner: Any = None
    derived: int = dataclasses.field(default=0, init=False)


class Color(str, enum.Enum):
    RED = "red"


def same(a: Any, b: Any) -> bool:
    """Equal values with equal types all the way down (1, 1.0 and True differ here)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a) and all(
            type(k1) is type(k2) for k1, k2 in zip(a, b)
        )
    if isinstance(a, TypedContextData):
        return all(same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    return a == b


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(),
    st.binary(),
    st.datetimes(timezones=st.none() | st.timezones()),
    st.dates(),
    st.times(timezones=st.none() | st.builds(
        dt.timezone, st.timedeltas(min_value=dt.timedelta(hours=-23), max_value=dt.timedelta(hours=23)),
    )),
    st.timedeltas(),
    st.decimals(allow_nan=False, allow_infinity=False),
    st.uuids(),
)
hashables = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.text(), st.binary(), st.dates()),
    lambda inner: st.tuples(inner, inner) | st.frozensets(inner, max_size=3),
    max_leaves=6,
)


def _containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=4).map(tuple),
        st.dictionaries(st.text(), inner, max_size=4),
        st.dictionaries(st.sampled_from(["$type", "value", "class"]), inner, max_size=3),
        st.sets(hashables, max_size=4),
        st.frozensets(hashables, max_size=4),
        st.builds(Point, st.integers(), st.floats(allow_nan=False), st.sets(st.text(), max_size=3)),
        st.builds(Labelled, st.text(), inner),
    )


values = st.recursive(scalars, _containers, max_leaves=20)


class TestRoundTrip:
    """decode(encode(v)) is v, through JSON text too."""

    @settings(max_examples=300, deadline=None)
    @given(values)
    def test_every_supported_value_round_trips(self, value):
        data = to_json(value)
        text = json.dumps(data, allow_nan=False)  # plain JSON: no NaN, no custom types
        assert same(from_json(json.loads(text)), value)
        assert same(loads(dumps(value)), value)

    @given(st.sets(hashables, max_size=6))
    def test_equal_sets_encode_equally(self, value):
        assert dumps(value) == dumps(set(reversed(list(value))))

    @pytest.mark.parametrize("special", [math.inf, -math.inf, math.nan])
    def test_special_floats(self, special):
        text = dumps([special])
        json.loads(text)  # still plain JSON
        back = loads(text)[0]
        assert (math.isnan(back) and math.isnan(special)) or back == special

    def test_init_false_field_of_frozen_class_is_restored(self):
        value = Labelled("a", inner=(1, 2))
        object.__setattr__(value, "derived", 9)
        back = loads(dumps(value))
        assert back == value and back.derived == 9

    def test_enum_is_refused_with_the_fix(self):
        refused = r"Color cannot be stored \(types are exact\); store its .value"
        with pytest.raises(UnencodableValueError, match=refused):
            dumps({"c": Color.RED})


def _nest(bottom: Any, levels: int) -> Any:
    value = bottom
    for _ in range(levels - 1):
        value = [value]
    return value


class TestDepth:
    """A checkpoint holds exactly the values ``set_state`` takes (:func:`check`), and reading
    one never nests deeper than that."""

    @pytest.mark.parametrize("levels", [MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 1])
    @pytest.mark.parametrize("bottom", [[], [0], {}, {"k": 0}, (), frozenset({1})])
    def test_what_set_state_takes_is_checkpointed(self, levels, bottom):
        value = _nest(bottom, levels)
        try:
            check(value)
        except UnencodableValueError:
            with pytest.raises(UnencodableValueError, match="nested deeper than 64 levels"):
                dumps(value)
            with pytest.raises(UnencodableValueError, match=r"context\['v'\]"):
                _checkpoint({"v": value}).to_json()
            return
        assert same(loads(dumps(value)), value)
        back = AgentCheckpoint.from_json(_checkpoint({"v": value, "$type": 1}).to_json())
        assert same(back.context["v"], value) and back.context["$type"] == 1

    @pytest.mark.parametrize("levels", [MAX_DEPTH + 1, 900, 10_000])
    def test_data_nested_deeper_than_any_checkpoint_holds_is_refused(self, levels):
        plain: Any = 1
        tagged: Any = 1
        for _ in range(levels):
            plain = [plain]
            tagged = {"$type": "tuple", "value": [tagged]}
        for data in (plain, tagged, {"$type": "typed", "class": f"{__name__}:Point", "value": {"x": plain}}):
            with pytest.raises(CheckpointError, match="nested deeper than 64 levels"):
                from_json(data)
        with pytest.raises(CheckpointError, match="nested deeper than 64 levels"):
            AgentCheckpoint.from_dict({**_checkpoint({}).to_dict(), "context": {"v": plain}})

    def test_text_nested_past_the_json_parser_is_corrupt(self):
        text = "[" * 100_000 + "]" * 100_000
        with pytest.raises(CheckpointError, match="corrupt or truncated"):
            loads(text)
        with pytest.raises(CheckpointError, match="corrupt or truncated"):
            AgentCheckpoint.from_json(text)


def _checkpoint(context: dict[str, Any]) -> AgentCheckpoint:
    return AgentCheckpoint(agent_name="deep", agent_status="completed", completed_states={"s"},
                           pending_states=[], running_states=[], state_metadata={}, context=context)


class TestRejects:
    """What cannot be encoded, or decoded, raises a typed error saying what to do."""

    def test_unencodable_value_names_its_path(self):
        with pytest.raises(UnencodableValueError, match=r"value\['job'\]\[1\]: a builtins.object cannot"):
            to_json({"job": [1, object()]})

    def test_local_typed_class_is_refused_when_encoding(self):
        @dataclasses.dataclass
        class Local(TypedContextData):
            a: int

        with pytest.raises(UnencodableValueError, match="module level"):
            dumps(Local(1))

    def test_reference_cycle_is_refused(self):
        cycle: list[Any] = []
        cycle.append(cycle)
        with pytest.raises(UnencodableValueError, match="cycle"):
            dumps(cycle)

    @pytest.mark.parametrize(
        "data, message",
        [
            ({"$type": "nope", "value": 1}, "unknown value tag"),
            ({"$type": "bytes", "value": "!!!"}, "malformed 'bytes'"),
            ({"$type": "float", "value": "1.5"}, "malformed 'float'"),
            ({"$type": "tuple", "value": None}, "malformed 'tuple'"),
            ({"$type": "typed", "class": "no.such.module:X", "value": {}}, "cannot be imported"),
            ({"$type": "typed", "class": "os.path:join", "value": {}}, "not a TypedContextData"),
            ({"$type": "typed", "class": f"{__name__}:Point", "value": {"x": 1, "y": 2.0, "z": 3}},
             "no longer defines"),
        ],
    )
    def test_malformed_data(self, data, message):
        with pytest.raises(CheckpointError, match=message):
            from_json(data)

    @pytest.mark.parametrize("text", ['{"a": [1, 2', "", "\x00\x01", '{"a": NaN'])
    def test_corrupt_or_truncated_text(self, text):
        with pytest.raises(CheckpointError, match="corrupt or truncated"):
            loads(text)

    def test_supported_types_are_exact(self):
        value = {
            "when": dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc),
            "amount": decimal.Decimal("1.10"),
            "id": uuid.UUID(int=7),
            "pair": (1, "a"),
        }
        assert same(loads(dumps(value)), value)


class TestScriptClasses:
    """A class defined in the workflow's script is found whichever way the script ran:
    ``python flow.py`` (``__main__``) or ``agent run flow.py`` (``__agent_workflow__``)."""

    @staticmethod
    def _script(monkeypatch: pytest.MonkeyPatch, module_name: str, class_name: str) -> Any:
        import sys
        import types

        module = types.ModuleType(module_name)
        monkeypatch.setitem(sys.modules, module_name, module)
        exec(  # noqa: S102 - defines the class as that module's own
            "import dataclasses\nfrom agent.context import TypedContextData\n"
            f"@dataclasses.dataclass\nclass {class_name}(TypedContextData):\n    step: int\n",
            module.__dict__,
        )
        return getattr(module, class_name)

    @pytest.mark.parametrize(("saved_in", "restored_in"), [
        ("__agent_workflow__", "__main__"), ("__main__", "__agent_workflow__"),
    ])
    def test_saved_one_way_restored_the_other(self, monkeypatch, saved_in: str, restored_in: str) -> None:
        name = f"Progress_{saved_in.strip('_')}"  # one per case: the class registry is the process's
        progress = self._script(monkeypatch, restored_in, name)
        # What the other way of running the script saved (this process has only one of the two).
        saved = dumps(progress(step=3)).replace(f"{restored_in}:{name}", f"{saved_in}:{name}")
        assert f"{saved_in}:{name}" in saved
        restored = loads(saved)
        assert type(restored) is progress and restored.step == 3

    def test_a_class_no_longer_in_the_script_is_not_called_corrupt(self, monkeypatch) -> None:
        from agent.values import TypedClassMissing

        saved = dumps(self._script(monkeypatch, "__main__", "Kept")(step=3)).replace("__main__:Kept",
                                                                                   "__agent_workflow__:Gone")
        with pytest.raises(TypedClassMissing, match="resume it from that script"):
            loads(saved)
