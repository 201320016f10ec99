"""The control protocol: versioned, bounded, and a bad client only ever loses its own connection."""

from __future__ import annotations

import os
import socket
import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | st.text()
    | st.binary(),
    lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner), max_leaves=40,
)


class TestClientCodec:
    """agentctl's own msgpack codec (no msgpack import) reads and writes what msgpack does."""

    @settings(max_examples=500, deadline=None)
    @given(_VALUES)
    def test_both_ways_with_msgpack(self, value: object) -> None:
        assert msgpack.unpackb(protocol.pack(value), raw=False) == value
        assert protocol.unpack(msgpack.packb(value, use_bin_type=True)) == value

    @pytest.mark.parametrize("value", [0, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1, -1, -32,
                                       -33, -128, -129, -(2**15) - 1, -(2**31) - 1, -(2**63), "a" * 31, "a" * 32,
                                       "a" * 256, "a" * 65536, b"x" * 300, list(range(16)), list(range(70000)),
                                       {str(i): i for i in range(16)}, 1.5])
    def test_the_same_bytes_as_msgpack(self, value: object) -> None:
        assert protocol.pack(value) == msgpack.packb(value, use_bin_type=True)

    def test_single_floats_from_other_writers(self) -> None:
        assert protocol.unpack(msgpack.packb(1.5, use_single_float=True)) == 1.5

    @pytest.mark.parametrize("body", [b"", b"\xc1", b"\xd9", b"\xd9\x05ab", b"\x92\x01", b"\xc7\x01\x01a",
                                      b"\x01\x02", b"\xa2\xff\xfe"])
    def test_malformed_input_is_a_protocol_error(self, body: bytes) -> None:
        with pytest.raises(DaemonProtocolError, match="undecodable"):
            protocol.unpack(body)

    @pytest.mark.parametrize("value", [2**64, -(2**63) - 1, object(), {1.5j: 1}, "/tmp/\udcff.py"])
    def test_what_msgpack_cannot_carry_is_refused(self, value: object) -> None:
        with pytest.raises(DaemonProtocolError):
            protocol.pack(value)


class TestQuickSubmit:
    """``agentctl submit`` read without argparse gives exactly what argparse gives, or steps aside."""

    @pytest.mark.parametrize("argv", [
        ["submit", "f.py"],
        ["submit", "f.py", "--json"],
        ["submit", "--json", "f.py", "--socket", "/s"],
        ["submit", "f.py", "--name", "n", "--priority", "high", "--param", "a=1", "--param", "b=x=y"],
        ["submit", "f.py", "--name=n", "--param=k=[1, 2]", "--param", "p=/tmp/x", "--param", "e="],
        ["submit", "f.py", "--param", "t=true", "--param", "s= null", "--param", "n=-5", "--param", "j={bad"],
        ["submit", "f.py", "--name", "first", "--name", "last"],
    ])
    def test_same_arguments_as_the_parser(self, argv: list[str]) -> None:
        quick = ctl._quick_submit(argv)
        full = ctl.build_parser().parse_args(argv)
        assert quick is not None
        for name in ("command", "func", "file", "name", "priority", "param"):
            assert getattr(quick, name) == getattr(full, name), name
        assert quick.json == getattr(full, "json", False)
        assert getattr(quick, "socket", None) == getattr(full, "socket", None)

    @pytest.mark.parametrize("argv", [
        [], ["list"], ["--json", "submit", "f.py"], ["submit"], ["submit", "a.py", "b.py"], ["submit", "-h"],
        ["submit", "f.py", "--nam", "n"], ["submit", "f.py", "--name"], ["submit", "f.py", "--name", "-x"],
        ["submit", "f.py", "--param", "novalue"], ["submit", "f.py", "--param", "=v"], ["submit", "--", "f.py"],
        ["submit", "-"], ["submit", "f.py", "--json=1"],
    ])
    def test_anything_else_goes_to_the_parser(self, argv: list[str]) -> None:
        assert ctl._quick_submit(argv) is None

    def test_a_bad_param_still_gets_the_parsers_message(self, capsys) -> None:
        with pytest.raises(SystemExit) as exit_:
            ctl.main(["submit", "f.py", "--param", "novalue"])
        assert exit_.value.code == ctl.EXIT_USAGE
        assert "--param takes NAME=VALUE, got 'novalue'" in capsys.readouterr().err


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

    def test_a_request_behind_a_refused_hello_is_not_served(self, agentd: Agentd, users: tuple[User, User]) -> None:
        """agentctl sends its hello and first request in one write: a refused hello ends it there."""
        agentd.start()
        hello = {**protocol.hello("control"), "version": protocol.PROTOCOL_VERSION + 1}
        with _raw(agentd) as sock:
            sock.sendall(protocol.encode(hello) + protocol.encode(
                {"op": "submit", "source": "from agent import Agent\nagent = Agent('x')\n", "path": "/tmp/x.py"}))
            reply = _read(sock)
            assert reply is not None and reply["code"] == protocol.VERSION
            assert _read(sock) is None  # closed, the submit never answered
        assert agentd.ctl_json("list") == []

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


@pytest.mark.timeout(180)
class TestSubmitSyntaxCheck:
    """``agentctl submit`` refuses a file that does not compile, and runs nothing of any file itself."""

    MARK = "import os\nwith open({mark!r}, 'a') as f:\n    f.write(os.environ.get('AGENT_JOB', 'agentctl') + '\\n')\n"
    FLOW = ("from agent import Agent\nagent = Agent('ok', isolation='inline')\n"
            "async def s(context):\n    return None\nagent.add_state('s', s)\n")

    @pytest.mark.parametrize("broken, line, message", [
        ("def f(:\n    pass\n", 4, "invalid syntax"),  # the parser's
        ("return 1\n", 4, "'return' outside function"),  # the compiler's
    ])
    def test_a_file_that_does_not_compile_is_refused(self, agentd: Agentd, users: tuple[User, User],
                                                     broken: str, line: int, message: str) -> None:
        agentd.start()
        mark = agentd.root / "ran"
        flow = agentd.root / "broken.py"
        flow.write_text(self.MARK.format(mark=str(mark)) + broken)
        done = agentd.ctl("submit", str(flow))
        assert done.returncode == ctl.EXIT_USAGE, done.stderr
        assert done.stderr.strip().splitlines() == [f"agentctl: {flow}:{line}: {message}: fix it before submitting"]
        assert not mark.exists()  # not a line of it ran
        assert agentd.ctl_json("list") == []

    def test_a_good_file_runs_in_its_job_only(self, agentd: Agentd, users: tuple[User, User]) -> None:
        agentd.start()
        mark = agentd.root / "ran"
        flow = agentd.root / "good.py"
        flow.write_text(self.MARK.format(mark=str(mark)) + self.FLOW)
        job = agentd.submit(flow)
        agentd.wait_status(job, "completed")
        assert mark.read_text().splitlines() == [job]  # written by the job's runner, never by agentctl
