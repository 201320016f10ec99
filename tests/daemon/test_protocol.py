"""The control protocol: versioned, bounded, and a bad client only ever loses its own connection."""

from __future__ import annotations

import os
import socket
import struct

import pytest

from agent.daemon import ctl, protocol
from agent.errors import DaemonProtocolError

from .helpers import Agentd, User


class TestFrames:
    """Length-prefixed msgpack maps, decoded with bounds."""

    def test_round_trip_in_pieces(self) -> None:
        data = protocol.encode({"op": "x", "n": 1}) + protocol.encode({"op": "y", "blob": b"\0" * 1000})
        frames = protocol.FrameBuffer()
        got = []
        for i in range(0, len(data), 7):
            got += frames.feed(data[i:i + 7])
        assert got == [{"op": "x", "n": 1}, {"op": "y", "blob": b"\0" * 1000}]

    @pytest.mark.parametrize("body", [b"\xc1", b"\x93\x01\x02\x03", b"\x81\xa1a\x01", b"\x81\xa2op\x05"])
    def test_not_a_message(self, body: bytes) -> None:
        with pytest.raises(DaemonProtocolError):
            protocol.FrameBuffer().feed(struct.pack("!I", len(body)) + body)

    def test_oversized_frame_is_refused_before_it_is_read(self) -> None:
        with pytest.raises(DaemonProtocolError, match="over the"):
            protocol.FrameBuffer().feed(struct.pack("!I", protocol.MAX_FRAME + 1))

    def test_version_mismatch_names_the_fix(self) -> None:
        assert protocol.version_mismatch(protocol.PROTOCOL_VERSION, "x") is None
        assert "same release" in (protocol.version_mismatch(99, "agentctl") or "")


def _raw(agentd: Agentd) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(agentd.socket)
    return sock


def _read(sock: socket.socket) -> dict | None:
    frames = protocol.FrameBuffer()
    while True:
        data = sock.recv(65536)
        if not data:
            return None
        got = frames.feed(data)
        if got:
            return got[0]


@pytest.mark.timeout(120)
class TestAgainstAgentd:
    """What agentd does with clients of another version, and with garbage."""

    def test_client_of_another_version_gets_a_clear_error(self, agentd: Agentd, users: tuple[User, User],
                                                           monkeypatch: pytest.MonkeyPatch, capsys) -> None:
        agentd.start()
        monkeypatch.setattr(protocol, "PROTOCOL_VERSION", protocol.PROTOCOL_VERSION + 1)
        code = ctl.main(["--socket", agentd.socket, "list"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == ctl.EXIT_VERSION
        assert len(err) == 1 and "protocol" in err[0] and "same release" in err[0]

    def test_garbage_costs_only_that_connection(self, agentd: Agentd, users: tuple[User, User]) -> None:
        agentd.start()
        for junk in (b"\x00\x00\x00\x03abc", struct.pack("!I", protocol.MAX_FRAME + 1),
                     protocol.encode({"op": "list"}),  # a request before hello
                     protocol.encode({"op": "hello", "version": protocol.PROTOCOL_VERSION, "role": "root"})):
            with _raw(agentd) as sock:
                sock.sendall(junk)
                reply = _read(sock)
                assert reply is None or not reply["ok"]
                assert _read(sock) is None  # agentd closed it
        with _raw(agentd) as sock:  # an unknown request is refused; the connection stays usable
            sock.sendall(protocol.encode(protocol.hello("control")))
            assert _read(sock)["op"] == "welcome"
            sock.sendall(protocol.encode({"op": "format_disk"}))
            assert _read(sock) == {"op": "reply", "ok": False, "error": "unknown request 'format_disk'",
                                   "code": protocol.INVALID}
            sock.sendall(protocol.encode({"op": "list"}))
            assert _read(sock)["ok"]
        assert agentd.ctl("list").returncode == 0  # agentd serves on

    def test_a_burst_of_connections_from_two_users_each_gets_its_own_answers(
        self, agentd: Agentd, users: tuple[User, User]
    ) -> None:
        """Connections accepted together are told apart (a reply never reaches another user)."""
        ann, _ = users
        agentd.start()
        mine = [_raw(agentd) for _ in range(10)]
        r, w = os.pipe()
        child = os.fork()
        if child == 0:  # ann's connections, opened while root's wait unread in the same backlog
            code = 1
            try:
                os.setgroups([])
                os.setresgid(ann.gid, ann.gid, ann.gid)
                os.setresuid(ann.uid, ann.uid, ann.uid)
                theirs = [_raw(agentd) for _ in range(10)]
                os.write(w, b"x")
                users_seen = set()
                for sock in theirs:
                    sock.sendall(protocol.encode(protocol.hello("control")))
                    users_seen.add(_read(sock)["user"])
                code = 0 if users_seen == {ann.name} else 2
            finally:
                os._exit(code)
        assert os.read(r, 1) == b"x"
        for sock in mine:
            sock.sendall(protocol.encode(protocol.hello("control")))
        assert [_read(sock)["user"] for sock in mine] == ["root"] * 10
        for sock in mine:
            sock.sendall(protocol.encode({"op": "list"}))
        assert all(_read(sock)["op"] == "reply" for sock in mine)
        assert os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]) == 0
        for sock in mine:
            sock.close()
        os.close(r)
        os.close(w)

    def test_no_agentd_is_a_clear_error(self, tmp_path, capsys) -> None:
        code = ctl.main(["--socket", str(tmp_path / "none.sock"), "list"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == ctl.EXIT_UNAVAILABLE and len(err) == 1 and "cannot reach agentd" in err[0]
