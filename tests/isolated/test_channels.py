"""The supervisor's channels: its ROUTER against real libzmq peers (frames and disconnects,
in order), and its zygote's reports (read without waiting)."""

from __future__ import annotations

import os
import socket
import time

import psutil
import pytest
import zmq

from agent.ipc.router import RouterChannel
from agent.supervisor.launcher import _receive_now


def _server_ends(path: str) -> int:
    """This process's unix sockets on ``path``: the listening one, and one per accepted peer."""
    return sum(1 for c in psutil.Process().net_connections(kind="unix") if c.laddr == path)


def test_a_connection_that_closed_before_its_frame_was_read_is_reported_after_the_frame(tmp_path) -> None:
    """A child that says hello and exits at once: its disconnect is known when its hello is read.

    Whoever that hello bound to the connection must still hear that the connection is gone
    (else a child that closed its connection would run unwatched).
    """
    seen: list[tuple[str, int]] = []
    channel = RouterChannel(str(tmp_path), max_frame=1024,
                            on_frame=lambda route, frames, fd: seen.append(("frame", fd)),
                            on_disconnect=lambda fd: seen.append(("gone", fd)))
    path = channel.endpoint[len("ipc://"):]
    ctx = zmq.Context()
    try:
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(channel.endpoint)
        dealer.send(b"hello")
        dealer.close(linger=5000)  # the frame is written before the connection closes
        poller = zmq.Poller()
        poller.register(channel._sock, zmq.POLLIN)
        assert poller.poll(10_000), "the frame never arrived"
        deadline = time.monotonic() + 10
        while _server_ends(path) > 1 and time.monotonic() < deadline:  # polled: libzmq closes its end
            time.sleep(0.001)                                          # after it queued the disconnect
        assert _server_ends(path) == 1, "libzmq never closed its end of the connection"
        channel.drain()
    finally:
        channel.close()
        ctx.term()
    frames = [i for i, (kind, _) in enumerate(seen) if kind == "frame"]
    assert len(frames) == 1, seen
    fd = seen[frames[0]][1]
    assert ("gone", fd) in seen[frames[0] + 1:], f"the disconnect was reported only before the frame: {seen}"


def test_reading_the_zygotes_reports_never_waits() -> None:
    """The supervisor reads its zygote's reports on the event loop (a stop of a launching
    state does too): with nothing there, the read returns at once, on a blocking socket."""
    ours, theirs = socket.socketpair()
    read, write = os.pipe()
    try:
        assert ours.getblocking()
        with pytest.raises(BlockingIOError):
            _receive_now(ours)  # socket.recv_fds(..., MSG_DONTWAIT) blocked here until the zygote wrote
        socket.send_fds(theirs, [b"report"], [read, write])
        data, fds = _receive_now(ours)
        assert data == b"report" and len(fds) == 2
        for fd in fds:
            os.close(fd)
    finally:
        for fd in (read, write):
            os.close(fd)
        ours.close()
        theirs.close()
