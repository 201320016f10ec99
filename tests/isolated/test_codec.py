"""The safe value codec and the message schema: what crosses, what is refused, and why."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.context import TypedContextData
from agent.errors import ProtocolError, UnencodableValueError, ValueTooLargeError
from agent.ipc import (
    FROM_CHILD,
    PROTOCOL_VERSION,
    ContextWrite,
    HumanInputRequest,
    Limits,
    Run,
    decode_message,
    decode_value,
    encode_message,
    encode_value,
)
from agent.ipc.codec import EXT_TYPED

LIMITS = Limits()


@dataclass
class Point(TypedContextData):
    x: int
    y: float
    tags: list[str]


class NotTyped:
    pass


def roundtrip(value):
    return decode_value(encode_value(value), LIMITS)


scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) | st.text() | st.binary()
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner)
    | st.lists(st.integers(-1000, 1000) | st.text(), max_size=5).map(tuple)
    | st.sets(st.integers(-1000, 1000) | st.text()),
    max_leaves=20,
)


class TestValueCodec:
    """Every documented type comes back equal and of the same type."""

    @given(values)
    def test_roundtrip(self, value):
        assert roundtrip(value) == value

    def test_special_types_keep_their_type(self):
        now = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
        value = {"t": (1, (2, 3)), "s": {1, 2}, "f": frozenset({"a"}), "d": now, "day": now.date(), "b": bytearray(b"x")}
        back = roundtrip(value)
        assert back == {**value, "b": b"x"}
        assert type(back["t"]) is tuple and type(back["t"][1]) is tuple
        assert type(back["f"]) is frozenset and back["d"].tzinfo is not None

    def test_typed_data_comes_back_as_its_class(self):
        back = roundtrip({"p": Point(1, 2.5, ["a"])})
        assert back == {"p": Point(1, 2.5, ["a"])} and type(back["p"]) is Point

    @pytest.mark.parametrize(
        "value, words",
        [
            (NotTyped(), ["context key 'k'", "NotTyped", "TypedContextData", "inline"]),
            ({1: "a"}, ["dict keys must be str", "int key"]),
            ([1, {"deep": object()}], ["context key 'k'[1]['deep']", "builtins.object"]),
            (2**70, ["64 bits"]),
        ],
    )
    def test_unencodable_names_key_type_and_fix(self, value, words):
        with pytest.raises(UnencodableValueError) as info:
            encode_value(value, key="k")
        for word in words:
            assert word in str(info.value)

    def test_local_typed_class_is_refused(self):
        @dataclass
        class Local(TypedContextData):
            a: int

        with pytest.raises(UnencodableValueError, match="module level"):
            encode_value(Local(1), key="k")

    def test_size_cap(self):
        with pytest.raises(ValueTooLargeError, match="over the"):
            encode_value(b"x" * 2000, key="k", max_size=1000)


class TestDecodingIsSafe:
    """Decoding builds only TypedContextData classes already imported, and checks them."""

    def _typed(self, name, fields):
        payload = msgpack.packb([name, fields], use_bin_type=True)
        return msgpack.packb(msgpack.ExtType(EXT_TYPED, payload), use_bin_type=True)

    def test_non_typed_class_is_refused(self):
        with pytest.raises(ProtocolError, match="not an imported TypedContextData"):
            decode_value(self._typed("os:system", {"command": "true"}), LIMITS)

    def test_unimported_module_is_not_imported(self):
        with pytest.raises(ProtocolError):
            decode_value(self._typed("antigravity:Anything", {}), LIMITS)
        import sys

        assert "antigravity" not in sys.modules

    def test_fields_are_checked_against_annotations(self):
        with pytest.raises(ProtocolError, match="does not match"):
            decode_value(self._typed(f"{__name__}:Point", {"x": "one", "y": 1.0, "tags": []}), LIMITS)

    def test_non_str_map_keys_and_garbage_are_refused(self):
        with pytest.raises(ProtocolError):
            decode_value(msgpack.packb({1: 2}), LIMITS)
        with pytest.raises(ProtocolError):
            decode_value(b"\xc1", LIMITS)
        with pytest.raises(ProtocolError, match="cap"):
            decode_value(b"\x00" * 100, Limits(max_frame=10))


class TestMessages:
    """Frames are validated against their dataclass after decoding."""

    def test_roundtrip(self):
        msg = Run("r", "a", "s", 2, b"fn", b"classes", {"k": encode_value(1)}, 1024)
        assert decode_message(encode_message(msg), LIMITS) == msg

    @pytest.mark.parametrize(
        "body, words",
        [
            ({"v": 2, "t": "hello", "pid": 1}, "protocol version 2"),
            ({"v": PROTOCOL_VERSION, "t": "nope"}, "not allowed"),
            ({"v": PROTOCOL_VERSION, "t": "run"}, "not allowed"),  # supervisor-only type
            ({"v": PROTOCOL_VERSION, "t": "hello"}, "fields"),
            ({"v": PROTOCOL_VERSION, "t": "hello", "pid": 1, "extra": 2}, "fields"),
            ({"v": PROTOCOL_VERSION, "t": "hello", "pid": "1"}, "hello.pid"),
            ({"v": PROTOCOL_VERSION, "t": "context_write", "key": "k", "value": 5, "deleted": False}, "value"),
            ([1, 2], "not a map"),
        ],
    )
    def test_bad_frames_are_protocol_errors(self, body, words):
        with pytest.raises(ProtocolError, match=words):
            decode_message(msgpack.packb(body), LIMITS, FROM_CHILD)

    def test_optional_and_numeric_fields(self):
        msg = HumanInputRequest(request_id=1, prompt="p", timeout=None, default="d")
        assert decode_message(encode_message(msg), LIMITS, FROM_CHILD) == msg
        write = ContextWrite(key="k", value=None, deleted=True)
        assert decode_message(encode_message(write), LIMITS, FROM_CHILD) == write

    def test_oversized_frame(self):
        with pytest.raises(ProtocolError, match="cap"):
            decode_message(encode_message(ContextWrite("k", b"x" * 100, False)), Limits(max_frame=50))
