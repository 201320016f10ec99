"""sd_notify by hand, against a real AF_UNIX datagram socket: READY, STATUS, WATCHDOG, STOPPING."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from agent.daemon.notify import Notifier

from .helpers import Agentd, User


@pytest.fixture
def listener(tmp_path: Path):
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(30)
    yield path, sock
    sock.close()


def _fields(data: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in data.decode().split("\n"))


class TestNotifier:
    """What systemd reads from a Type=notify service."""

    def test_ready_status_watchdog_stopping(self, listener) -> None:
        path, sock = listener
        notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())})
        assert notifier.watchdog_interval == 2.0  # pinged at half the unit's WatchdogSec
        assert notifier.ready("serving")
        assert _fields(sock.recv(4096)) == {"READY": "1", "STATUS": "serving", "MAINPID": str(os.getpid())}
        assert notifier.status("3 running")
        assert _fields(sock.recv(4096)) == {"STATUS": "3 running"}
        assert notifier.watchdog()
        assert _fields(sock.recv(4096)) == {"WATCHDOG": "1"}
        assert notifier.stopping("bye")
        assert _fields(sock.recv(4096)) == {"STOPPING": "1", "STATUS": "bye"}
        notifier.close()

    def test_abstract_socket(self) -> None:
        name = f"agentd-test-{os.getpid()}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind("\0" + name)
        sock.settimeout(30)
        try:
            assert Notifier({"NOTIFY_SOCKET": "@" + name}).watchdog()
            assert sock.recv(4096) == b"WATCHDOG=1"
        finally:
            sock.close()

    def test_without_systemd_nothing_is_sent(self, tmp_path: Path) -> None:
        notifier = Notifier({})
        assert notifier.address is None and notifier.watchdog_interval is None
        assert not notifier.ready("serving")
        gone = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
        assert not gone.status("x")  # never fatal to the service

    def test_a_watchdog_meant_for_another_process_is_ignored(self) -> None:
        assert Notifier({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}).watchdog_interval is None


@pytest.mark.timeout(180)
def test_agentd_notifies_systemd(agentd: Agentd, users: tuple[User, User]) -> None:
    """agentd itself: READY with a status line, watchdog pings, STOPPING on SIGTERM."""
    agentd.env["WATCHDOG_USEC"] = "200000"  # a ping every 0.1 s
    agentd.start()  # waits for READY=1 on the socket
    ready = _fields(agentd.ready_message.encode())
    assert ready["MAINPID"] == str(agentd.pid) and "0 running, 0 queued" in ready["STATUS"]
    for _ in range(3):
        assert agentd.wait_notify("WATCHDOG=1") == "WATCHDOG=1"
    assert agentd.proc is not None
    agentd.proc.terminate()
    assert "STOPPING=1" in agentd.wait_notify("STOPPING=1").split("\n")
    assert agentd.stop() == 0
