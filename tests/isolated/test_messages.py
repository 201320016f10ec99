"""The message schema: frames are validated against their dataclass after decoding."""

from __future__ import annotations

import msgpack
import pytest

from agent.errors import BoundExceededError, ProtocolError
from agent.ipc import (
    FROM_CHILD,
    PROTOCOL_VERSION,
    ContextWrite,
    Hello,
    HumanInputRequest,
    Run,
    decode_message,
    encode_message,
)
from agent.supervisor.child import decode_frame
from agent.values import Bounds, encode

BOUNDS = Bounds()
NESTED_300 = b"\x92\xc7\x00\x01" * 300 + b"\x91\xc7\x00\x01"


def raw_frame(msg, raw_value: bytes) -> bytes:
    """``msg`` on the wire with ``raw_value`` spliced in as its value: what a hostile child can send."""
    body = {"v": PROTOCOL_VERSION, "t": msg.TYPE, **{k: v for k, v in vars(msg).items() if k != "value"}}
    head = msgpack.packb(body)
    return bytes([head[0] + 1]) + head[1:] + msgpack.packb("value") + raw_value


class TestMessages:
    """Frames are validated against their dataclass after decoding."""

    def test_roundtrip(self):
        failures = {"load": "ValueError: bad row"}
        msg = Run("r", "a", "s", 2, b"fn", b"classes", {"k": encode(1)}, 1024, 4096, 12, failures)
        assert decode_message(encode_message(msg), BOUNDS) == msg

    @pytest.mark.parametrize(
        "body, words",
        [
            ({"v": 1, "t": "hello", "pid": 1, "secret": b"s"}, "protocol version 1"),
            ({"v": PROTOCOL_VERSION, "t": "nope"}, "not allowed"),
            ({"v": PROTOCOL_VERSION, "t": "run"}, "not allowed"),  # supervisor-only type
            ({"v": PROTOCOL_VERSION, "t": "hello"}, "fields"),
            ({"v": PROTOCOL_VERSION, "t": "hello", "pid": 1, "secret": b"s", "extra": 2}, "fields"),
            ({"v": PROTOCOL_VERSION, "t": "hello", "pid": "1", "secret": b"s"}, "hello.pid"),
            ({"v": PROTOCOL_VERSION, "t": "hello", "pid": True, "secret": b"s"}, "hello.pid"),
            ({"v": PROTOCOL_VERSION, "t": "context_write", "key": 5, "value": 5, "deleted": False}, "key"),
            ([1, 2], "not a map"),
        ],
    )
    def test_bad_frames_are_protocol_errors(self, body, words):
        with pytest.raises(ProtocolError, match=words):
            decode_message(msgpack.packb(body), BOUNDS, FROM_CHILD)

    def test_optional_and_numeric_fields(self):
        msg = HumanInputRequest(request_id=1, prompt="p", timeout=None, default="d")
        assert decode_message(encode_message(msg), BOUNDS, FROM_CHILD) == msg
        write = ContextWrite(key="k", value=None, deleted=True)
        assert decode_message(encode_message(write), BOUNDS, FROM_CHILD) == write
        hello = Hello(pid=7, secret=b"\0" * 16)
        assert decode_message(encode_message(hello), BOUNDS, FROM_CHILD) == hello

    def test_frames_are_bounded_like_values(self):
        small = Bounds(max_frame=1 << 20, max_objects=100)
        with pytest.raises(BoundExceededError, match="over the"):
            decode_message(encode_message(ContextWrite("k", False, b"x" * (2 << 20))), small)
        with pytest.raises(BoundExceededError, match="nested deeper than 64 levels"):
            decode_frame(raw_frame(ContextWrite("k", False, None), NESTED_300), BOUNDS)
        wide = msgpack.packb({"v": PROTOCOL_VERSION, "t": "checkpoint_snapshot", "keys": ["k"] * 200})
        with pytest.raises(BoundExceededError, match="objects"):
            decode_message(wide, small, FROM_CHILD)
        deep = msgpack.packb({"v": PROTOCOL_VERSION, "t": "log", "level": "info", "message": "m"})[:-2]
        with pytest.raises(ProtocolError):
            decode_message(deep + b"\x91" * 5000, BOUNDS, FROM_CHILD)
