"""The child's ZMTP DEALER against a real libzmq ROUTER, and against peers that are not one."""

from __future__ import annotations

import asyncio
import os
import socket
import threading

import pytest
import zmq

from agent.errors import ProtocolError
from agent.ipc.zmtp import GREETING, DealerTransport, frame, parse_properties, ready_command


@pytest.fixture
def router(tmp_path):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 5000)
    endpoint = f"ipc://{tmp_path}/router.sock"
    sock.bind(endpoint)
    yield sock, endpoint
    sock.close()
    ctx.term()


class FakePeer:
    """A plain Unix socket server that answers a connection with ``reply`` bytes."""

    def __init__(self, path: str, reply: bytes) -> None:
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        self.server.listen(1)
        self.reply = reply
        self.received = b""
        self.thread = threading.Thread(target=self._serve)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.server.accept()
        with conn:
            self.received = conn.recv(1024)
            conn.sendall(self.reply)

    def close(self) -> None:
        self.thread.join(5)
        self.server.close()


ROUTER_READY = ready_command(b"ROUTER", b"")


class TestAgainstLibzmq:
    async def test_messages_both_ways_under_the_routing_id(self, router):
        sock, endpoint = router
        dealer = DealerTransport(endpoint, b"c-secret")
        try:
            dealer.send(b"hello")
            assert sock.recv_multipart() == [b"c-secret", b"hello"]
            sock.send_multipart([b"c-secret", b"first"])
            sock.send_multipart([b"c-secret", b"second"])
            assert await dealer.recv() == b"first"
            assert await dealer.recv() == b"second"
        finally:
            dealer.close()

    async def test_long_frames_both_ways(self, router):
        sock, endpoint = router
        dealer = DealerTransport(endpoint, b"c-long")
        big = os.urandom(3 * 1024 * 1024 + 7)
        try:
            # A 3 MiB frame exceeds the socket buffer: the send waits for libzmq to read.
            sender = asyncio.get_running_loop().run_in_executor(None, dealer.send, big)
            assert await asyncio.get_running_loop().run_in_executor(None, sock.recv_multipart) == [
                b"c-long", big]
            await sender
            sock.send_multipart([b"c-long", big])
            sock.send_multipart([b"c-long", b"x" * 300])
            assert await dealer.recv() == big
            assert await dealer.recv() == b"x" * 300
        finally:
            dealer.close()

    async def test_long_frame_on_a_non_blocking_socket(self, router):
        # uvloop makes a descriptor it watches non-blocking: a send must still write it all.
        sock, endpoint = router
        dealer = DealerTransport(endpoint, b"c-nonblocking")
        big = os.urandom(5 * 1024 * 1024)
        try:
            dealer._sock.setblocking(False)
            loop = asyncio.get_running_loop()
            sender = loop.run_in_executor(None, dealer.send, big)
            assert await loop.run_in_executor(None, sock.recv_multipart) == [b"c-nonblocking", big]
            await sender
            dealer.send(b"next")
            assert sock.recv_multipart() == [b"c-nonblocking", b"next"]
        finally:
            dealer.close()

    async def test_frames_sent_before_close_arrive(self, router):
        sock, endpoint = router
        dealer = DealerTransport(endpoint, b"c-close")
        for i in range(50):
            dealer.send(b"m%d" % i)
        dealer.close()
        assert [sock.recv_multipart()[1] for _ in range(50)] == [b"m%d" % i for i in range(50)]

    async def test_close_waits_until_a_router_at_its_high_water_mark_has_read_all(self, tmp_path):
        # libzmq stops reading at the high-water mark and drops what is unread if the peer
        # has gone by then: close() must not return before the ROUTER has read everything.
        ctx = zmq.Context()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.RCVHWM, 10)
        sock.setsockopt(zmq.RCVTIMEO, 5000)
        sock.setsockopt(zmq.LINGER, 0)
        endpoint = f"ipc://{tmp_path}/hwm.sock"
        sock.bind(endpoint)
        try:
            dealer = DealerTransport(endpoint, b"c-hwm")
            for i in range(40):  # fits in the socket buffers: nothing blocks
                dealer.send(b"%d." % i + b"x" * 1000)
            closer = threading.Thread(target=dealer.close)
            closer.start()
            closer.join(0.5)
            assert closer.is_alive(), "close() returned while the ROUTER still had frames to read"
            received = [sock.recv_multipart()[1].split(b".")[0] for _ in range(40)]
            closer.join(10)
            assert not closer.is_alive()
            assert received == [b"%d" % i for i in range(40)]
        finally:
            sock.close()
            ctx.term()

    async def test_few_messages_close_at_once_and_still_arrive(self, router):
        # Below half the ROUTER's high-water mark it cannot stop reading: no need to wait.
        sock, endpoint = router
        # A linger past the test's timeout: waiting for the ROUTER here would fail the test.
        dealer = DealerTransport(endpoint, b"c-few", peer_hwm=1000, linger=120)
        for i in range(3):
            dealer.send(b"m%d" % i)
        dealer.close()  # returns before the ROUTER has read anything
        assert [sock.recv_multipart()[1] for _ in range(3)] == [b"m0", b"m1", b"m2"]

    async def test_router_gone_is_a_connection_error(self, router):
        sock, endpoint = router
        dealer = DealerTransport(endpoint, b"c-gone")
        try:
            dealer.send(b"hello")
            sock.recv_multipart()
            sock.close()
            with pytest.raises(ConnectionError):
                await asyncio.wait_for(dealer.recv(), 5)
            # An ended stream stays readable: still watched, it would wake the loop at every turn.
            assert asyncio.get_running_loop().remove_reader(dealer._sock.fileno()) is False
        finally:
            dealer.close()

    @staticmethod
    async def _rejects(router, parts: list[bytes], match: str, **kwargs) -> None:
        sock, endpoint = router
        dealer = DealerTransport(endpoint, b"c-bad", **kwargs)
        try:
            dealer.send(b"hello")
            sock.recv_multipart()
            sock.send_multipart([b"c-bad", *parts])
            with pytest.raises(ProtocolError, match=match):
                await dealer.recv()
        finally:
            dealer.close()

    async def test_multipart_message_is_a_protocol_error(self, router):
        await self._rejects(router, [b"part1", b"part2"], "multipart")

    async def test_frame_over_the_cap_is_a_protocol_error(self, router):
        await self._rejects(router, [b"y" * 1001], "over the cap", max_frame=1000)


class TestAgainstOtherPeers:
    async def _first_recv(self, tmp_path, reply: bytes):
        path = f"{tmp_path}/peer.sock"
        peer = FakePeer(path, reply)
        dealer = DealerTransport(f"ipc://{path}", b"c-x")
        try:
            with pytest.raises(ProtocolError) as info:
                await asyncio.wait_for(dealer.recv(), 5)
        finally:
            dealer.close()
            peer.close()
        assert peer.received.startswith(GREETING)
        return info.value

    async def test_not_zmtp(self, tmp_path):
        exc = await self._first_recv(tmp_path, b"HTTP/1.1 400 Bad Request\r\n" + b"\0" * 64)
        assert "not a ZMTP 3" in str(exc)

    async def test_other_security_mechanism(self, tmp_path):
        greeting = GREETING[:12] + b"CURVE".ljust(20, b"\0") + GREETING[32:]
        exc = await self._first_recv(tmp_path, greeting + ROUTER_READY)
        assert "CURVE" in str(exc)

    async def test_not_a_router(self, tmp_path):
        exc = await self._first_recv(tmp_path, GREETING + ready_command(b"PUB", b""))
        assert "PUB" in str(exc)

    async def test_no_ready_command(self, tmp_path):
        exc = await self._first_recv(tmp_path, GREETING + frame(b"data"))
        assert "READY" in str(exc)

    def test_only_ipc_endpoints(self):
        with pytest.raises(ValueError, match="ipc://"):
            DealerTransport("tcp://127.0.0.1:5555", b"c-x")


def test_ready_metadata_round_trip():
    body = ready_command(b"DEALER", b"c-id")[2:]
    assert body.startswith(b"\x05READY")
    assert parse_properties(body[6:]) == {b"socket-type": b"DEALER", b"identity": b"c-id"}
    with pytest.raises(ProtocolError, match="truncated"):
        parse_properties(body[6:-8])


class TestHandshakeReadAhead:
    """A parked child reads the supervisor's half of the handshake while it waits."""

    def test_read_ahead_then_the_first_send_waits_for_nothing(self):
        ours, peer = socket.socketpair()
        dealer = DealerTransport.over(ours, b"", announced=True, linger=0)
        peer.sendall(GREETING + ROUTER_READY[:3])  # part of it, so far
        dealer.read_handshake_ahead()  # returns: it does not wait for the rest
        peer.sendall(ROUTER_READY[3:] + frame(b"after"))
        dealer.read_handshake_ahead()
        # Nothing more comes: a send that still waited for the handshake would never return.
        sender = threading.Thread(target=dealer.send, args=(b"hello",), daemon=True)
        sender.start()
        sender.join(5)
        assert not sender.is_alive()
        assert peer.recv(64) == frame(b"hello")
        assert asyncio.run(dealer.recv()) == b"after"  # what came after the handshake is kept
        dealer.close()
        peer.close()

    def test_a_peer_that_is_not_a_router_is_refused_ahead(self):
        ours, peer = socket.socketpair()
        dealer = DealerTransport.over(ours, b"", announced=True, linger=0)
        peer.sendall(GREETING + ready_command(b"PUB", b""))
        with pytest.raises(ProtocolError, match="PUB"):
            dealer.read_handshake_ahead()
        dealer.close()
        peer.close()

    def test_a_peer_gone_before_its_handshake_is_a_connection_error(self):
        ours, peer = socket.socketpair()
        dealer = DealerTransport.over(ours, b"", announced=True, linger=0)
        peer.close()
        with pytest.raises(ConnectionError):
            dealer.read_handshake_ahead()
        dealer.close()
