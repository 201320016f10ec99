"""Decoding what another process sent is bounded: no crash, no stack overflow, bounded memory."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import tracemalloc
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.errors import BoundExceededError, ProtocolError, UnencodableValueError
from agent.ipc import FROM_CHILD, PROTOCOL_VERSION, Result, decode_message, encode_message
from agent.supervisor.child import decode_frame
from agent.values import MAX_DEPTH, Bounds, check, decode, encode

from .test_model import values

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TUPLE_MARK = b"\xc7\x00\x01"  # an empty extension of code 1: "this array is a tuple"


def nested_tuples_flat(levels: int) -> bytes:
    """``((((0,),),),)...``, ``levels + 1`` deep, as the wire carries it: arrays [marker, inner]."""
    return (b"\x92" + TUPLE_MARK) * levels + b"\x92" + TUPLE_MARK + b"\x00"


def refused_within(frame: bytes, bound: str) -> int:
    """Decode ``frame``, which must pass ``bound``; return the peak memory it took."""
    tracemalloc.start()
    try:
        with pytest.raises(BoundExceededError, match=bound):
            decode(frame)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


class TestBounds:
    """Each bound stops decoding with BoundExceededError naming it."""

    def test_depth_past_64_is_refused_however_deep(self):
        assert decode(nested_tuples_flat(MAX_DEPTH - 1)).value is not None
        for levels in (MAX_DEPTH, 300, 5000, 200_000):
            with pytest.raises(BoundExceededError, match="64 levels|depth"):
                decode(nested_tuples_flat(levels))

    @pytest.mark.parametrize("levels", [63, 64, 65])
    @pytest.mark.parametrize("bottom", [[], [0], {}, {"k": 0}, (), frozenset({1})])
    def test_the_decoder_counts_depth_as_check_does(self, levels, bottom):
        value: Any = bottom
        for i in range(levels - 1):
            value = [value] if i % 3 == 0 else {"k": value} if i % 3 == 1 else (value,)
        try:
            check(value)
            accepted = True
        except UnencodableValueError:
            accepted = False
        try:
            decode(encode(value))
            assert accepted
        except BoundExceededError:
            assert not accepted

    def test_inflating_frame_stops_at_the_objects_bound_with_bounded_memory(self):
        # 12 MB of empty arrays: each byte would become a 72-byte list (~860 MB).
        chunk = b"\xdd" + (600_000).to_bytes(4, "big") + b"\x90" * 600_000
        frame = b"\xdc" + (20).to_bytes(2, "big") + chunk * 20
        assert refused_within(frame, "objects") < 10 * len(frame)

    def test_container_items_bound(self):
        with pytest.raises(BoundExceededError, match="max_array_len|items"):
            decode(msgpack.packb(list(range(1_000_005))))
        with pytest.raises(BoundExceededError):
            decode(encode(list(range(600))), Bounds(max_items=500))

    def test_a_short_frame_cannot_declare_huge_containers(self):
        frame = b"\xdd\x00\x0f\x42\x40" * 1000  # a thousand nested arrays of a million elements each
        assert refused_within(frame, "max_array_len") < 64 * len(frame)

    def test_bytes_bound(self):
        with pytest.raises(BoundExceededError, match="frame bound"):
            decode(encode(b"x" * 100_000), Bounds(max_frame=1024))
        with pytest.raises(BoundExceededError, match="max_bin_len"):
            decode(encode(b"x" * 2048), Bounds(max_frame=1024))

    @pytest.mark.parametrize("fields", [b"\xa0", b"\xa3abc", b"\xc4\x00"])
    def test_a_malformed_leaf_is_a_protocol_error(self, fields):
        for marker in range(5, 12):  # datetime, date, time, timedelta, Decimal, UUID, big int
            with pytest.raises(ProtocolError, match=f"under marker {marker}"):
                decode(b"\x92\xc7\x00" + bytes([marker]) + fields)

    def test_frames_carry_the_same_bounds(self):
        head = msgpack.packb({"v": PROTOCOL_VERSION, "t": "result"})
        frame = bytes([head[0] + 1]) + head[1:] + msgpack.packb("value") + nested_tuples_flat(300)
        with pytest.raises(BoundExceededError, match="nested deeper than 64 levels"):
            decode_message(frame, Bounds(), FROM_CHILD)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid frame or value with bytes flipped, inserted or cut."""
    value = draw(values)
    data = bytearray(
        encode(value) if draw(st.booleans()) else encode_message(Result(value=value))
    )
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "insert", "cut"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif data:
            del data[pos : pos + draw(st.integers(1, 8))]
    return bytes(data)


class TestFuzz:
    """Random and mutated bytes give a value or a ProtocolError: never a crash, never a blow-up."""

    @settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.binary(max_size=512) | mutated())
    def test_decoders_fail_cleanly(self, data):
        def both() -> None:
            for decoder in (decode, lambda d: decode_frame(d, Bounds())):
                try:
                    decoder(data)
                except ProtocolError:
                    pass

        both()  # once untraced: first-use caches are not what this measures
        tracemalloc.start()
        try:
            both()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 65536 + 400 * len(data)  # a fixed multiple of the input, and a constant


HOSTILE = textwrap.dedent("""
    import asyncio, gc, sys
    from agent import Agent
    from agent.errors import StateFailedError
    import msgpack
    from agent.ipc.zmtp import DealerTransport

    async def deep_write(context):
        t = ()
        [t := (t,) for _ in range(300)]
        context.set_state("x", t)

    async def deep_frame(context):
        (own,) = [o for o in gc.get_objects() if isinstance(o, DealerTransport) and o._sock.fileno() >= 0]
        deep = (b"\\x92\\xc7\\x00\\x01") * 300 + b"\\x91\\xc7\\x00\\x01"
        head = msgpack.packb({"v": 2, "t": "context_write", "key": "x", "deleted": False})
        own.send(bytes([head[0] + 1]) + head[1:] + msgpack.packb("value") + deep)
        await asyncio.sleep(60)

    async def normal(context):
        context.set_state("ok", True)

    async def main(isolation):
        for hostile in (deep_write, deep_frame):
            agent = Agent("hostile", isolation=isolation)
            agent.add_state("hostile", hostile, context_keys=["x"])
            try:
                await agent.run()
            except StateFailedError as exc:
                print(hostile.__name__, exc.reason.kind, exc.reason.message.splitlines()[0])
        agent = Agent("normal", isolation=isolation)
        agent.add_state("normal", normal, context_keys=["ok"])
        print("normal", (await agent.run()).get_state("ok"))

    asyncio.run(main(sys.argv[1]))
""")


@pytest.mark.parametrize("isolation", ["process", "sandbox"])
def test_a_deep_value_no_longer_kills_the_process(tmp_path, isolation):
    """The issue's one-liner crashed the supervisor's process with SIGSEGV (exit 139)."""
    if isolation == "sandbox" and os.geteuid() != 0:
        pytest.skip("sandboxes need root")
    script = tmp_path / "hostile_flow.py"
    script.write_text(HOSTILE)
    os.chmod(tmp_path, 0o755)
    os.chmod(script, 0o644)
    env = {**os.environ, "PYTHONPATH": ROOT, "AGENT_STOP_GRACE": "0.5"}
    done = subprocess.run([sys.executable, str(script), isolation], capture_output=True, text=True,
                          timeout=60, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("deep_write exception") and "nested deeper than 64 levels" in lines[0]
    assert lines[1].startswith("deep_frame bound") and "nested deeper than 64 levels" in lines[1]
    assert lines[2] == "normal True"


INHERITED = textwrap.dedent("""
    import sys
    from dataclasses import dataclass
    from agent import Agent, TypedContextData

    @dataclass
    class Base(TypedContextData):
        x: int

    @dataclass
    class Derived(Base):
        extra: str = "e"

    class Undecorated(Base):
        pass

    async def writes(context):
        context.set_typed("d", Derived(1, "x"))
        context.set_typed("u", Undecorated(2))
        return "reads"

    async def reads(context):
        context.set_state("seen", [repr(context.get_typed("d", Derived)), repr(context.get_typed("u", Undecorated))])

    agent = Agent("inherit", isolation=sys.argv[1])
    agent.add_state("writes", writes)
    agent.add_state("reads", reads)
    print(agent.run_sync().get_state("seen"))
""")


@pytest.mark.parametrize("isolation", ["process", "worker"])
def test_a_script_typed_class_that_derives_from_another_reads_back_in_a_child(tmp_path, isolation):
    """A script's classes travel by value: rebuilding them in a child left an empty skeleton
    of the subclass under its name, which had only its base's fields."""
    script = tmp_path / "inherit.py"
    script.write_text(INHERITED)
    env = {**os.environ, "PYTHONPATH": ROOT, "AGENT_STOP_GRACE": "0.5"}
    done = subprocess.run([sys.executable, str(script), isolation], capture_output=True, text=True,
                          timeout=60, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[\"Derived(x=1, extra='x')\", 'Undecorated(x=2)']"
