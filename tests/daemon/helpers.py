"""A real agentd in the foreground, driven through agentctl as real users."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

BIN = Path(sys.executable).parent
AGENTD = str(BIN / "agentd")
AGENTCTL = str(BIN / "agentctl")
CGROUP_ROOT = "/sys/fs/cgroup"


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int


def wait_until(check: Callable[[], Any], what: str, timeout: float = 60.0, interval: float = 0.05) -> Any:
    """Poll ``check`` (state another process changes) until it returns something true; bounded."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(interval)


class Agentd:
    """One agentd process on a private socket and state directory (``root``: world-traversable)."""

    def __init__(self, root: Path, config: str | None = None, env: dict[str, str] | None = None) -> None:
        self.root = root
        self.socket = str(root / "agentd.sock")
        self.state_dir = str(root / "state")
        self.config_path: str | None = None
        if config is not None:
            self.configure(config)
        self.env = dict(os.environ, **(env or {}))
        self.env.pop("NOTIFY_SOCKET", None)
        self.proc: subprocess.Popen[bytes] | None = None
        self.notify_messages: list[str] = []
        self._notify: socket.socket | None = None

    def configure(self, text: str) -> None:
        """Use ``text`` as the configuration file (at the next start)."""
        self.config_path = str(self.root / "agentd.toml")
        Path(self.config_path).write_text(text)

    def start(self, timeout: float = 90.0) -> "Agentd":
        """Start it and wait for READY=1 on a real notify socket (as systemd would)."""
        notify_path = str(self.root / "notify.sock")
        if os.path.exists(notify_path):
            os.unlink(notify_path)
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._notify.bind(notify_path)
        argv = [AGENTD, "--socket", self.socket, "--state-dir", self.state_dir]
        if self.config_path:
            argv += ["--config", self.config_path]
        self.log = open(self.root / "agentd.log", "ab")
        self.proc = subprocess.Popen(argv, env=dict(self.env, NOTIFY_SOCKET=notify_path), stdout=self.log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.ready_message = self.wait_notify("READY=1", timeout)
        return self

    def wait_notify(self, key: str, timeout: float = 30.0) -> str:
        assert self._notify is not None
        deadline = time.monotonic() + timeout
        while True:
            for message in self.notify_messages:
                if key in message.split("\n"):
                    self.notify_messages.remove(message)
                    return message
            left = deadline - time.monotonic()
            assert left > 0, f"agentd sent no {key} (log: {self.log_text()[-2000:]})"
            assert self.proc is not None and self.proc.poll() is None, f"agentd exited: {self.log_text()[-3000:]}"
            self._notify.settimeout(min(left, 0.5))
            try:
                self.notify_messages.append(self._notify.recv(4096).decode())
            except TimeoutError:
                continue

    def log_text(self) -> str:
        return (self.root / "agentd.log").read_text(errors="replace")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def incarnation_dirs(self) -> list[str]:
        """This agentd's cgroup directories (one per v1 hierarchy)."""
        name = f"{self.pid}-"
        out = []
        for controller in os.listdir(CGROUP_ROOT):
            base = f"{CGROUP_ROOT}/{controller}/agentd"
            if os.path.isdir(base):
                out += [f"{base}/{d}" for d in os.listdir(base) if d.startswith(name)]
        return out

    def stop(self) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(60)
        self._close()
        return code

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self._close()

    def _close(self) -> None:
        self.proc = None
        self.log.close()
        if self._notify is not None:
            self._notify.close()
            self._notify = None

    # --- agentctl -------------------------------------------------------------------------

    ctl_path = AGENTCTL

    def ctl(self, *args: str, user: User | None = None, env: dict[str, str] | None = None,
            timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run agentctl as ``user`` (root when None), in the test's directory."""
        full_env = {"PATH": f"{BIN}:/usr/bin:/bin", "AGENT_SOCKET": self.socket, "LANG": "C.UTF-8", **(env or {})}
        kwargs: dict[str, Any] = {}
        if user is not None:
            kwargs = {"user": user.uid, "group": user.gid, "extra_groups": []}
        try:
            return subprocess.run([AGENTCTL, *args], env=full_env, cwd=self.root, capture_output=True, text=True,
                                  timeout=timeout, **kwargs)
        except subprocess.TimeoutExpired:  # say where agentd is stuck (faulthandler on SIGUSR1)
            if self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(signal.SIGUSR1)
                time.sleep(1)
            raise AssertionError(f"agentctl {' '.join(args)} hung; agentd's log: {self.log_text()[-6000:]}") from None

    def ctl_json(self, *args: str, user: User | None = None) -> Any:
        done = self.ctl(*args, "--json", user=user)
        assert done.returncode == 0, f"agentctl {' '.join(args)} failed ({done.returncode}): {done.stderr}"
        return json.loads(done.stdout)

    def submit(self, workflow: Path, *args: str, user: User | None = None) -> str:
        done = self.ctl("submit", str(workflow), *args, user=user)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    def status(self, job: str, user: User | None = None) -> dict[str, Any]:
        return self.ctl_json("status", job, user=user)  # type: ignore[no-any-return]

    def wait_status(self, job: str, *statuses: str, timeout: float = 120.0) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            data = self.status(job)
            return data if data["status"] in statuses else None

        return wait_until(check, f"job {job} to be {'/'.join(statuses)} (log: {self.log_text()[-1500:]})",
                          timeout, interval=0.1)

    def wait_state(self, job: str, state: str, status: str, timeout: float = 120.0) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            data = self.status(job)
            return data if data["states"].get(state) == status else None

        return wait_until(check, f"state {state} of job {job} to be {status}", timeout, interval=0.1)


def processes_of(uids: set[int]) -> list[psutil.Process]:
    """Live processes running as any of ``uids`` (zombies excepted)."""
    out = []
    for proc in psutil.process_iter(["uids", "status"]):
        try:
            if proc.info["uids"] and proc.info["uids"].real in uids and proc.info["status"] != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except psutil.Error:
            continue
    return out


def status_sockets_of(uid: int) -> list[str]:
    """The status sockets in ``uid``'s runtime directory (none once its processes are gone)."""
    return [str(path) for runtime in (Path(f"/tmp/agent-{uid}"), Path(f"/run/user/{uid}/agent"))
            for path in runtime.glob("*.sock")]


def write_workflow(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text)
    path.chmod(0o644)
    return path


def shared_file(directory: Path, name: str) -> Path:
    """An empty file that states of every user may append to."""
    path = directory / name
    path.touch()
    path.chmod(0o666)
    return path


@contextlib.contextmanager
def running_as(user: User, argv: list[str], env: dict[str, str], cwd: Path) -> Iterator[subprocess.Popen[str]]:
    """A process of ``user`` with piped output, killed and reaped if the block leaves it running."""
    proc = subprocess.Popen(argv, env=env, cwd=cwd, user=user.uid, group=user.gid, extra_groups=[],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
