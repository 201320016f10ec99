"""A child's spec memfd, as the child reads it: the spec, then the attempt's run message."""

from __future__ import annotations

import os

import pytest

from agent.runtime.child import SPEC_HEADER, read_run, read_spec
from agent.values import pack_plain


def memfd(data: bytes) -> int:
    fd = os.memfd_create("test-spec", os.MFD_CLOEXEC)
    os.write(fd, data)
    return fd


def test_a_long_spec_and_the_run_message_after_it() -> None:
    spec = {"sys_path": [f"/nonexistent/{i:04d}/" + "d" * 60 for i in range(400)], "endpoint": "ipc:///x"}
    head = pack_plain(spec)
    assert len(head) > 16384  # several pages
    fd = memfd(SPEC_HEADER.pack(len(head)) + head + b"the run message")
    try:
        got = read_spec(fd)
        assert got["sys_path"] == spec["sys_path"] and got["endpoint"] == "ipc:///x"
        assert read_run(fd, got) == b"the run message"
    finally:
        os.close(fd)


@pytest.mark.parametrize("data", [b"\x00\x00", SPEC_HEADER.pack(100) + b"\x80" * 40, SPEC_HEADER.pack(3) + b"\xc1" * 3],
                         ids=["no header", "shorter than it says", "not msgpack"])
def test_a_truncated_or_malformed_spec_is_refused(data: bytes) -> None:
    fd = memfd(data)
    try:
        with pytest.raises(OSError, match="truncated|could be read|malformed"):
            read_spec(fd)
    finally:
        os.close(fd)
