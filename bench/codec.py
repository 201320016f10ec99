"""The value codec: encode/decode throughput, and how long a big frame holds the event loop.

Run: python bench/codec.py [--quick]. Prints one JSON object:

* ``throughput``: MB/s of :func:`agent.values.encode` and :func:`agent.values.decode`
  (the process boundary, both ways) and of :func:`agent.values.check` (what every
  ``set_state`` pays) for four payloads: JSON-like records, values of the special types
  (UUID, Decimal, datetime, tuples, sets), one 8 MiB bytes value, and nested dicts;
* ``loop``: the longest the supervisor's event loop went without running a 1 ms ticker
  while an isolated state sent a 40 MB value (decoded off the loop) and while a hostile
  one sent a 12 MB frame of empty arrays (stopped at the objects bound).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import decimal
import gc
import json
import os
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from agent.context import Context  # noqa: E402
from agent.executor import Attempt, AttemptFailed, Isolation  # noqa: E402
from agent.supervisor import get_executor, shutdown_supervisor  # noqa: E402
from agent.values import check, decode, encode  # noqa: E402


def payloads() -> dict[str, object]:
    return {
        "records_10k": [{"id": i, "name": f"row-{i}", "score": i / 7, "tags": ["a", "b"], "ok": i % 2 == 0}
                        for i in range(10_000)],
        "special_types_2k": [{"id": uuid.UUID(int=i), "price": decimal.Decimal(i) / 100,
                              "at": dt.datetime(2026, 1, 1) + dt.timedelta(seconds=i), "pair": (i, "x"),
                              "set": {i, i + 1}} for i in range(2_000)],
        "bytes_8mib": os.urandom(8 * 1024 * 1024),
        "nested_dicts": _nested(10, 3),
    }


def _nested(depth: int, width: int) -> object:
    return depth if depth == 0 else {f"k{i}": _nested(depth - 1, width) for i in range(width)}


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def throughput(repeat: int) -> dict[str, dict[str, float]]:
    out = {}
    for name, value in payloads().items():
        data = encode(value)
        mb = len(data) / 1e6
        out[name] = {
            "bytes": len(data),
            "encode_mb_s": round(mb / best(lambda value=value: encode(value), repeat), 1),
            "decode_mb_s": round(mb / best(lambda data=data: decode(data), repeat), 1),
            "check_mb_s": round(mb / best(lambda value=value: check(value), repeat), 1),
        }
    return out


async def big_write(context):
    context.set_state("blob", b"x" * (40 * 1024 * 1024))


async def inflating_frame(context):
    import msgpack

    from agent.ipc import PROTOCOL_VERSION
    from agent.ipc.zmtp import DealerTransport

    (own,) = [o for o in gc.get_objects() if isinstance(o, DealerTransport)]
    chunk = b"\xdd" + (600_000).to_bytes(4, "big") + b"\x90" * 600_000
    head = msgpack.packb({"v": PROTOCOL_VERSION, "t": "context_write", "key": "bomb", "deleted": False})
    own.send(bytes([head[0] + 1]) + head[1:] + msgpack.packb("value") + b"\xdc" + (20).to_bytes(2, "big") + chunk * 20)
    await asyncio.get_running_loop().create_future()


async def longest_gap(func) -> float:
    """The longest pause (ms) of a 1 ms ticker on this loop while ``func`` runs isolated."""
    gaps = [0.0]
    stop = asyncio.Event()

    async def tick() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticker = asyncio.ensure_future(tick())
    attempt = Attempt("bench-codec", "bench", func.__name__, func, 1, context=Context(),
                      isolation=Isolation.PROCESS)
    try:
        await get_executor(Isolation.PROCESS).run_attempt(attempt)
    except AttemptFailed:
        pass
    stop.set()
    await ticker
    return round(max(gaps) * 1000, 1)


async def loop_gaps(repeat: int) -> dict[str, float]:
    await get_executor(Isolation.PROCESS).run_attempt(  # start the supervisor first
        Attempt("bench-codec", "bench", "warm", _noop, 1, context=Context(), isolation=Isolation.PROCESS))
    out = {}
    for func in (big_write, inflating_frame):
        out[f"{func.__name__}_max_gap_ms"] = min([await longest_gap(func) for _ in range(repeat)])
    return out


async def _noop(context):
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repeats (smoke test)")
    args = parser.parse_args()
    repeat = 3 if args.quick else 10
    result = {"bench": "codec", "python": sys.version.split()[0], "throughput": throughput(repeat)}
    try:
        result["loop"] = asyncio.run(loop_gaps(1 if args.quick else 3))
    finally:
        shutdown_supervisor()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
