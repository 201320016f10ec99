"""The value model: what is carried, its exact wire size, and what is refused with which fix."""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import math
import pathlib
import threading
import uuid
import zoneinfo
from typing import Annotated, Any, Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import ContextTypeError, ProtocolError, UnencodableValueError, ValueTooLargeError
from agent.values import (
    MAX_DEPTH,
    MAX_INT_BITS,
    Bounds,
    TypedContextData,
    check,
    decode,
    dumps,
    encode,
    entry_check,
    entry_size,
    loads,
    matches,
)


@dataclasses.dataclass
class Reading(TypedContextData):
    sensor: str
    value: float
    when: dt.datetime | None = None
    tags: frozenset[str] = frozenset()


@dataclasses.dataclass(frozen=True)
class Frozen(TypedContextData):
    label: str
    derived: int = dataclasses.field(default=0, init=False)


@dataclasses.dataclass(init=False)
class OwnInit(TypedContextData):
    a: int
    b: str

    def __init__(self, raw: str) -> None:
        self.a, self.b = len(raw), raw


@dataclasses.dataclass
class Counted(TypedContextData):
    n: int = 0

    def __post_init__(self) -> None:
        self.n += 1


class Mode(enum.Enum):
    FAST = "fast"


class MyInt(int):
    pass


class OwnZone(dt.tzinfo):
    def utcoffset(self, moment):
        return dt.timedelta(hours=1)


def same(a: Any, b: Any) -> bool:
    """Equal, with equal types all the way down (1, 1.0 and True differ here)."""
    if type(a) is not type(b):
        return False
    if type(a) is float:
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if type(a) in (list, tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if type(a) is dict:
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, TypedContextData):
        return all(same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    if type(a) is decimal.Decimal:
        return str(a) == str(b)  # NaN and signalling NaN included
    if type(a) in (dt.datetime, dt.time):
        return a == b and a.fold == b.fold and a.tzinfo == b.tzinfo and str(a.tzinfo) == str(b.tzinfo)
    return a == b


offsets = st.timedeltas(min_value=dt.timedelta(hours=-23), max_value=dt.timedelta(hours=23))
zones = (
    st.none() | st.timezones() | st.builds(dt.timezone, offsets)
    | st.builds(dt.timezone, offsets, st.text("ABCXYZ", min_size=1, max_size=5))
)
scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(), st.integers(-(2**70), 2**70), st.integers(-(2**MAX_INT_BITS) + 1, 2**MAX_INT_BITS - 1),
    st.floats(), st.text(), st.binary(),
    st.datetimes(timezones=zones), st.dates(), st.times(timezones=st.none() | st.builds(dt.timezone, offsets)),
    st.timedeltas(), st.decimals(), st.uuids(),
)
hashables = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.text(), st.binary(), st.dates(), st.uuids()),
    lambda inner: st.tuples(inner, inner) | st.frozensets(inner, max_size=3),
    max_leaves=6,
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=4).map(tuple),
        st.dictionaries(st.text(), inner, max_size=4),
        st.dictionaries(st.sampled_from(["$type", "value"]), inner, max_size=2),
        st.sets(hashables, max_size=4),
        st.frozensets(hashables, max_size=4),
        st.builds(Reading, st.text(), st.floats(allow_nan=False), st.none() | st.datetimes(),
                  st.frozensets(st.text(), max_size=3)),
    ),
    max_leaves=24,
)


class TestOneModelEverywhere:
    """A value comes back identical from the wire and from a checkpoint, and its size is exact."""

    @settings(max_examples=400, deadline=None)
    @given(values)
    def test_wire_and_checkpoint_round_trips_are_identical(self, value):
        size = check(value)
        data = encode(value)
        assert size == len(data)  # the budget counts exactly what crosses the boundary
        back = decode(data)
        assert back.size == size
        assert same(back.value, value)
        assert same(loads(dumps(value)), value)

    @given(st.text(max_size=40), values)
    def test_the_fast_entry_size_is_the_exact_one(self, key, value):
        try:
            expected = entry_size(key, check(value))
        except UnencodableValueError:
            with pytest.raises(UnencodableValueError):
                entry_check(key, value)
            return
        assert entry_check(key, value) == expected == len(encode(key)) + len(encode(encode(value)))

    def test_each_type_keeps_its_type(self):
        paris = zoneinfo.ZoneInfo("Europe/Paris")
        value = {
            "t": (1, (2, 3)), "s": {1, 2}, "f": frozenset({"a"}), "b": b"\0\xff",
            "when": dt.datetime(2026, 10, 25, 2, 30, fold=1, tzinfo=paris),
            "day": dt.date(2026, 1, 2), "at": dt.time(3, 4, tzinfo=dt.timezone(dt.timedelta(hours=5), "X")),
            "dur": dt.timedelta(days=-1, microseconds=3), "price": decimal.Decimal("9.990"),
            "nan": decimal.Decimal("NaN"), "id": uuid.UUID(int=7), "big": -(2**200), "u64": 2**64 - 1,
            "typed": Reading("t1", 20.5, dt.datetime(2026, 1, 1), frozenset({"x"})),
        }
        for back in (decode(encode(value)).value, loads(dumps(value))):
            assert same(back, value)
            assert back["when"].fold == 1 and back["when"].tzinfo is paris
            assert back["at"].tzname() == "X"

    def test_an_offset_keeps_its_microseconds(self):
        odd = dt.timezone(dt.timedelta(hours=-3, microseconds=1))
        value = [dt.time(0, 0, tzinfo=odd), dt.datetime(2026, 1, 1, tzinfo=odd),
                 dt.time(1, tzinfo=dt.timezone(dt.timedelta(microseconds=-7), "Odd"))]
        for back in (decode(encode(value)).value, loads(dumps(value))):
            assert [v.utcoffset() for v in back] == [v.utcoffset() for v in value]
            assert back[2].tzname() == "Odd"

    def test_a_checkpoint_written_with_the_offset_in_the_text_still_reads(self):
        old = '{"$type": "datetime", "value": "2026-01-01T00:00:00+05:00", "fold": 0, "tzname": "X"}'
        back = loads(old)
        assert back == dt.datetime(2026, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=5)))
        assert back.tzname() == "X"

    def test_a_typed_value_is_rebuilt_as_it_was_not_made_again(self):
        # Its __init__ and __post_init__ ran when it was made: not again when it is read.
        for value in (OwnInit("abc"), Counted()):
            for back in (decode(encode(value)).value, loads(dumps(value))):
                assert back == value and type(back) is type(value)

    def test_a_field_a_checkpoint_lacks_gets_its_default(self):
        back = loads('{"$type": "typed", "class": "%s:Reading", "value": {"sensor": "s", "value": 1.5}}'
                     % __name__)
        assert back == Reading("s", 1.5)

    def test_init_false_field_survives(self):
        value = Frozen("a")
        object.__setattr__(value, "derived", 9)
        assert decode(encode(value)).value.derived == 9
        assert loads(dumps(value)).derived == 9


class TestRefusals:
    """Anything outside the model is refused by check() with the path, the type and the fix."""

    @pytest.mark.parametrize(
        "value, words",
        [
            (threading.Lock(), ["_thread.lock", "cannot be stored", "TypedContextData"]),
            ({"job": [1, object()]}, ["k['job'][1]", "builtins.object"]),
            ({1: "a"}, ["dict keys must be str", "int key 1"]),
            (Mode.FAST, ["Mode", "types are exact", "store its .value"]),
            (pathlib.Path("/tmp"), ["PosixPath", "store str(path)"]),
            (bytearray(b"x"), ["bytearray", "store bytes(value)"]),
            (MyInt(5), ["MyInt", "store int(value)"]),
            ("bad \ud800 text", ["lone surrogate"]),
            (2**(MAX_INT_BITS + 1), ["bits is over the 8192-bit limit"]),
            (dt.datetime(2026, 1, 1, tzinfo=OwnZone()), ["time zone cannot be carried", "zoneinfo.ZoneInfo"]),
        ],
    )
    def test_refused_with_the_fix(self, value, words):
        with pytest.raises(UnencodableValueError) as info:
            check(value, "k")
        for word in words:
            assert word in str(info.value)

    def test_a_typed_value_whose_fields_break_their_annotations_is_refused(self):
        # It could be rebuilt nowhere else (another process, a checkpoint): refused where it
        # is set, naming the key, the path and the fix, at any depth.
        with pytest.raises(ContextTypeError, match=r"context key 'r': Reading.value must be float, got str 'x'; "
                                                   "give each field"):
            check(Reading("s", "x"), key="r")  # type: ignore[arg-type]
        with pytest.raises(ContextTypeError, match=r"context key 'r'\['inner'\]\[0\]: Reading.sensor must be str"):
            check({"inner": [Reading(1, 2.0)]}, key="r")  # type: ignore[arg-type]

    def test_depth_is_capped_at_64_levels(self):
        nested: Any = (0,)
        for _ in range(MAX_DEPTH):
            nested = (nested,)
        check(nested[0])  # 64 levels
        with pytest.raises(UnencodableValueError, match="nested deeper than 64 levels"):
            check(nested)  # 65
        check(((((),),),))  # an empty container at the bottom adds no level

    def test_a_reference_cycle_is_refused(self):
        cycle: list[Any] = []
        cycle.append(cycle)
        with pytest.raises(UnencodableValueError, match="cycle"):
            check(cycle)

    def test_objects_and_items_are_capped(self):
        bounds = Bounds(max_objects=1000, max_items=600)
        check([[0] * 400, [0] * 400], bounds=bounds)
        with pytest.raises(ValueTooLargeError, match="more than 1,000 objects"):
            check([[0] * 500, [0] * 500], bounds=bounds)
        with pytest.raises(ValueTooLargeError, match="601 elements"):
            check({"k": [0] * 601}, bounds=bounds)

    def test_local_typed_class_is_refused(self):
        @dataclasses.dataclass
        class Local(TypedContextData):
            a: int

        with pytest.raises(UnencodableValueError, match="module level"):
            check(Local(1))


class TestTypedDecoding:
    """Only TypedContextData dataclasses this process knows are built, and their fields checked."""

    def _typed(self, name: str, fields: dict[str, Any]) -> bytes:
        import msgpack

        return msgpack.packb([msgpack.ExtType(4, b""), name, fields], use_bin_type=True)

    def test_other_classes_are_refused(self):
        with pytest.raises(ProtocolError, match="not an imported TypedContextData"):
            decode(self._typed("os:system", {"command": "true"}))

    def test_modules_are_not_imported_for_the_other_side(self):
        import sys

        with pytest.raises(ProtocolError):
            decode(self._typed("antigravity:Anything", {}))
        assert "antigravity" not in sys.modules

    def test_fields_are_checked_against_annotations(self):
        with pytest.raises(ProtocolError, match="does not match"):
            decode(self._typed(f"{__name__}:Reading", {"sensor": 1, "value": 1.0}))


class TestMatches:
    """The one runtime type check: TypedContextData fields and IPC frames both use it."""

    @pytest.mark.parametrize(
        "value, tp, ok",
        [
            (1, int, True), (True, int, False), (1, float, True), (True, float, False),
            (None, int | None, True), ([1, 2], list[int], True), ([1, "a"], list[int], False),
            ({"a": b"x"}, dict[str, bytes], True), ({"a": 1}, dict[str, bytes], False),
            ((1, "a"), tuple[int, str], True), ((1, 2, 3), tuple[int, ...], True),
            (frozenset({"a"}), frozenset[str], True),
            ((1, 2), tuple[int, str], False), ((1,), tuple[int, str], False), ([1], tuple[int, ...], False),
            ({"a": [1, 2]}, dict[str, list[int]], True), ({"a": [1, "b"]}, dict[str, list[int]], False),
            ("b", Literal["a", "b"], True), ("c", Literal["a", "b"], False),
            (3, Annotated[int, "units"], True), ("3", Annotated[int, "units"], False),
            (3, Annotated[int, ["unhashable"]], True), (object(), Any, True), (1.5, int | str, False),
        ],
    )
    def test_matches(self, value, tp, ok):
        assert matches(value, tp) is ok
        assert matches(value, tp) is ok  # again, from the checker worked out the first time
