"""agentd: the box-wide supervisor, as a service or in the foreground.

``agentd --socket PATH --state-dir DIR [--log-dir DIR] [--config FILE]`` runs in the
foreground on uvloop until SIGTERM or SIGINT; under systemd it is ``Type=notify``
(``READY=1`` once it serves, ``STATUS=`` as jobs change, ``WATCHDOG=1`` pings, see
:mod:`agent.daemon.notify`). At start it takes the state directory's lock (one agentd
per state directory), reaps the cgroups of an agentd that died, queues again every job
that was running, and starts them: each resumes from its last checkpoint.

Clients connect to the Unix socket; each is identified by its peer credentials
(``SO_PEERCRED``), never by what it says. A user sees and steers only their own jobs;
root and members of ``admin_group`` see all. Control requests are answered in order,
one reply each; ``cancel`` and ``pause`` of a running job answer once the job has
stopped. Anything malformed ends that connection only.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import grp
import logging
import os
import signal
import socket
import stat
import struct
import sys
import time
from typing import Any

from .._version import __version__
from ..errors import (
    AgentError,
    DaemonConfigError,
    DaemonError,
    DaemonProtocolError,
    JobAccessError,
    JobError,
    JobNotFoundError,
)
from . import protocol
from .boxpool import BoxAdmission, Session
from .config import DaemonConfig, load_config, parse_priority, user_name
from .jobcgroups import JobCgroups
from .jobs import Job, JobStatus, JobStore
from .notify import Notifier
from .protocol import Link
from .supervise import JobSupervisor

log = logging.getLogger("agentd")
_PEERCRED = struct.Struct("3i")
MAX_PARAMS = 256


class Client:
    """One connection: its identity (from the kernel), its role, and what it asked for."""

    def __init__(self, daemon: "Daemon", conn: socket.socket, pid: int, uid: int, gid: int, number: int) -> None:
        self.daemon = daemon
        self.link = Link(conn, asyncio.get_running_loop(), self.on_message, self.on_lost)
        self.pid, self.uid, self.gid = pid, uid, gid
        self.number = number
        self.user = user_name(uid)
        self.admin = daemon.config.is_admin(uid, gid)
        self.role: str | None = None
        self.session: Session | None = None

    def on_message(self, message: dict[str, Any]) -> None:
        try:
            if self.role is None:
                self._hello(message)
            elif self.role == "control":
                self._control(message)
            else:
                self._admission(message)
        except (KeyError, TypeError, ValueError, ArithmeticError) as exc:  # int(inf): OverflowError
            self._refuse(f"malformed {message.get('op')!r} request: {exc!r}", protocol.INVALID, close=True)

    def on_lost(self, why: str) -> None:
        if self.session is not None:
            self.session.close()
        self.daemon.clients.discard(self)

    def _hello(self, message: dict[str, Any]) -> None:
        if message["op"] != "hello":
            self._refuse("a connection must start with hello", protocol.INVALID, close=True)
            return
        mismatch = protocol.version_mismatch(message.get("version"), "this client")
        if mismatch:
            self._refuse(mismatch, protocol.VERSION, close=True)
            return
        role = message.get("role")
        if role not in ("control", "admission"):
            self._refuse(f"unknown role {role!r}: use control or admission", protocol.INVALID, close=True)
            return
        self.role = role
        policy = self.daemon.config.policy_for(self.uid)
        welcome = {"op": "welcome", "version": protocol.PROTOCOL_VERSION, "agentd": __version__,
                   "user": self.user, "uid": self.uid, "admin": self.admin}
        if role == "admission":
            box = self.daemon.box
            welcome.update(box=box.info(), quota=policy.quota)
            self.session = box.session(f"{self.user} pid {self.pid} #{self.number}", self.uid, self.user,
                                       policy, self.link.send)
        self.link.send(welcome)

    def _admission(self, message: dict[str, Any]) -> None:
        assert self.session is not None
        if not self.session.on_message(message):
            self._refuse(f"unknown admission op {message['op']!r}", protocol.INVALID, close=True)

    def _control(self, message: dict[str, Any]) -> None:
        op = message["op"]
        handler = getattr(self.daemon, f"op_{op}", None)
        if handler is None:
            self._refuse(f"unknown request {op!r}", protocol.INVALID)
            return
        try:
            reply = handler(self, message)
        except JobNotFoundError as exc:
            self._refuse(str(exc), protocol.NOT_FOUND)
        except JobAccessError as exc:
            self._refuse(str(exc), protocol.DENIED)
        except DaemonConfigError as exc:  # a value the request gives that cannot be (a priority)
            self._refuse(str(exc), protocol.INVALID)
        except JobError as exc:
            self._refuse(str(exc), protocol.CONFLICT)
        else:
            if reply is not None:
                self.reply(reply)

    def reply(self, fields: dict[str, Any]) -> None:
        if self.link.closed:
            return
        try:
            self.link.send({"op": "reply", "ok": True, **fields})
        except DaemonProtocolError as exc:  # over the frame cap: the client still gets an answer
            self._refuse(f"the reply is too large to send ({exc}): ask about fewer jobs", protocol.INVALID)

    def _refuse(self, error: str, code: str, close: bool = False) -> None:
        if self.link.closed:
            return
        self.link.send({"op": "reply" if self.role == "control" else "error", "ok": False,
                        "error": error, "code": code})
        if close:
            self.link.close()
            self.on_lost(error)


class Daemon:
    """agentd (see the module docstring)."""

    def __init__(self, socket_path: str, state_dir: str, log_dir: str | None, config: DaemonConfig) -> None:
        self.socket_path = os.path.abspath(socket_path)
        self.state_dir = os.path.abspath(state_dir)
        self.log_dir = os.path.abspath(log_dir or os.path.join(state_dir, "logs"))
        self.config = config
        self.notifier = Notifier()
        self.clients: set[Client] = set()
        self._numbers = 0
        self._status_due = False
        self.started = time.time()

    # --- life --------------------------------------------------------------------------

    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        self._lock()
        for path, mode in ((self.state_dir, 0o711), (os.path.join(self.state_dir, "jobs"), 0o711),
                           (self.log_dir, 0o711)):
            os.makedirs(path, mode=mode, exist_ok=True)
            os.chmod(path, mode)
        self.store = JobStore(os.path.join(self.state_dir, "agentd.sqlite3"))
        from ..devices import machine_inventory
        from ..supervisor.gpus import machine_gpu_minors

        inventory = machine_inventory()
        self.cgroups = JobCgroups(gpu_minors=machine_gpu_minors() or [d.minor_number for d in inventory.devices()])
        self.box = BoxAdmission(self.config, inventory)
        self.jobs = JobSupervisor(self.config, self.store, self.box, self.cgroups, self.state_dir, self.log_dir,
                                  loop, self.status_changed)
        self.listener = self._listen()
        loop.add_reader(self.listener.fileno(), self._accept)
        resumed = 0
        for job in self.store.jobs.values():
            if job.status is JobStatus.RUNNING:  # its runner died with the last agentd
                job.move(JobStatus.QUEUED)
                self.store.save(job)
                resumed += 1
        self.jobs.kick()
        stop = loop.create_future()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
        log.info("agentd %s serving on %s (cgroups %s, %d stale reaped; %d job(s) to resume)",
                 __version__, self.socket_path, self.cgroups.backend, self.cgroups.reaped, resumed)
        self.notifier.ready(self.status_line())
        watchdog = loop.create_task(self._watchdog()) if self.notifier.watchdog_interval else None
        try:
            await asyncio.wait([stop, self.jobs.spawner_lost], return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.notifier.stopping("stopping: running jobs will resume at the next start")
            if watchdog is not None:
                watchdog.cancel()
            self._close(loop)
        return 1 if self.jobs.spawner_lost.done() else 0

    def _lock(self) -> None:
        os.makedirs(self.state_dir, mode=0o711, exist_ok=True)
        self._lock_fd = os.open(os.path.join(self.state_dir, "agentd.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                                0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(self._lock_fd, 32, 0).decode(errors="replace").strip() or "?"
            raise DaemonError(f"another agentd (pid {other}) serves state directory {self.state_dir}") from None
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, f"{os.getpid()}\n".encode(), 0)

    def _listen(self) -> socket.socket:
        path = self.socket_path
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                if _answers(path):  # another agentd (of another state directory) serves it
                    raise DaemonError(f"another agentd serves {path}: stop it first, or choose another --socket")
                os.unlink(path)  # left by an agentd that died
            else:
                raise DaemonError(f"{path} exists and is not a socket: remove it or choose another --socket")
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.bind(path)
        group = self.config.client_group
        if group:
            os.chown(path, 0, grp.getgrnam(group).gr_gid)
            os.chmod(path, 0o660)
        else:
            os.chmod(path, 0o666)  # anyone may connect; identity comes from SO_PEERCRED
        sock.listen(128)
        sock.setblocking(False)
        return sock

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("accept failed: %s", exc)
                return
            pid, uid, gid = _PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
            self._numbers += 1
            self.clients.add(Client(self, conn, pid, uid, gid, self._numbers))

    def _close(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.remove_reader(self.listener.fileno())
        self.listener.close()
        try:
            os.unlink(self.socket_path)
        except OSError:
            pass
        for client in list(self.clients):
            client.link.close()
            client.on_lost("agentd is stopping")
        self.jobs.shutdown()
        self.cgroups.close()
        self.store.close()
        self.notifier.close()
        log.info("agentd stopped")

    async def _watchdog(self) -> None:
        interval = self.notifier.watchdog_interval or 1.0
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    def status_line(self) -> str:
        counts = self.jobs.counts()
        return (f"{counts['running']} running, {counts['queued']} queued, {counts['paused']} paused; "
                f"{self.box.pool.statistics().waiting} state(s) waiting for resources")

    def status_changed(self) -> None:
        if not self._status_due and self.notifier.address is not None:
            self._status_due = True
            asyncio.get_running_loop().call_later(0.5, self._send_status)

    def _send_status(self) -> None:
        self._status_due = False
        self.notifier.status(self.status_line())

    # --- control requests (agentctl) -------------------------------------------------

    def _visible(self, client: Client) -> list[Job]:
        return [j for j in self.store.jobs.values() if client.admin or j.uid == client.uid]

    def op_submit(self, client: Client, message: dict[str, Any]) -> dict[str, Any]:
        source, path = message["source"], str(message.get("path") or "workflow.py")
        if not isinstance(source, str):
            raise DaemonConfigError("the workflow's source must be text")
        policy = self.config.policy_for(client.uid)
        asked = message.get("priority")
        priority = policy.default_priority if asked is None else parse_priority(asked)
        if priority > policy.priority_ceiling:
            raise JobAccessError(
                f"priority {priority.name.lower()} is above your ceiling "
                f"({policy.priority_ceiling.name.lower()}): ask for less, or ask the operator to raise "
                "priority_ceiling for you in /etc/agent/agentd.toml"
            )
        params = message.get("params") or {}
        if not isinstance(params, dict) or len(params) > MAX_PARAMS or not all(isinstance(k, str) for k in params):
            raise DaemonConfigError(f"params must be a map of at most {MAX_PARAMS} names to values")
        name = str(message.get("name") or os.path.splitext(os.path.basename(path))[0] or "job")[:200]
        if not name.isprintable():  # it is shown to every admin's terminal (agentctl list, top)
            raise DaemonConfigError(f"a job name must be printable text, got {name!r}: drop the control characters")
        job = Job(id="", uid=client.uid, gid=client.gid, user=client.user, name=name, priority=int(priority),
                  path=path[:4096], cwd=str(message.get("cwd") or "")[:4096], params=params)
        self.store.add(job, source)
        log.info("job %s (%s) submitted by %s at priority %s", job.id, name, client.user, priority.name.lower())
        self.jobs.kick()
        return {"job": job.id, "status": job.status.value, "name": name}

    def op_list(self, client: Client, message: dict[str, Any]) -> dict[str, Any]:
        return {"jobs": [self.jobs.describe(j) for j in self._visible(client)]}

    def op_status(self, client: Client, message: dict[str, Any]) -> dict[str, Any]:
        return {"job": self.jobs.describe(self.jobs.job_for(message["job"], client.uid, client.admin))}

    def op_logs(self, client: Client, message: dict[str, Any]) -> dict[str, Any]:
        job = self.jobs.job_for(message["job"], client.uid, client.admin)
        state = message.get("state")
        return self.jobs.read_log(job, None if state is None else str(state), max(0, int(message.get("offset") or 0)))

    def _steer(self, client: Client, message: dict[str, Any], act: Any) -> dict[str, Any] | None:
        job = self.jobs.job_for(message["job"], client.uid, client.admin)

        def done() -> None:
            client.reply({"job": self.jobs.describe(job)})

        return {"job": self.jobs.describe(job)} if act(job, done) else None

    def op_cancel(self, client: Client, message: dict[str, Any]) -> dict[str, Any] | None:
        return self._steer(client, message, self.jobs.cancel)

    def op_pause(self, client: Client, message: dict[str, Any]) -> dict[str, Any] | None:
        return self._steer(client, message, self.jobs.pause)

    def op_resume(self, client: Client, message: dict[str, Any]) -> dict[str, Any]:
        job = self.jobs.job_for(message["job"], client.uid, client.admin)
        self.jobs.resume(job)
        return {"job": self.jobs.describe(job)}

    def op_respond(self, client: Client, message: dict[str, Any]) -> dict[str, Any]:
        job = self.jobs.job_for(message["job"], client.uid, client.admin)
        self.jobs.respond(job, str(message["request"]), str(message["answer"]))
        return {"job": job.id}

    def op_top(self, client: Client, message: dict[str, Any]) -> dict[str, Any]:
        return {
            "agentd": {"version": __version__, "pid": os.getpid(), "uptime": time.time() - self.started,
                       "cgroups": self.cgroups.backend, "user": client.user, "admin": client.admin},
            "pool": self.box.statistics(),
            "coordination": self.box.coordination(None if client.admin else client.uid),
            "jobs": [self.jobs.describe(j) for j in self._visible(client)],
        }


def _answers(path: str) -> bool:
    """Whether a process listens on the unix socket ``path`` (an agentd serving it)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError:  # refused (nobody listens: left by an agentd that died), or gone
        return False
    finally:
        probe.close()
    return True


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agentd", description="agentd: the box-wide workflow supervisor.")
    parser.add_argument("--socket", default=None, help="the control socket (default /run/agent/agentd.sock)")
    parser.add_argument("--state-dir", required=True, help="jobs and their checkpoints (e.g. /var/lib/agent)")
    parser.add_argument("--log-dir", default=None, help="jobs' output (default STATE_DIR/logs)")
    parser.add_argument("--config", default=None, help="the configuration file (default /etc/agent/agentd.toml)")
    parser.add_argument("--version", action="version", version=f"agentd {__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import faulthandler

    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <agentd>` writes where it is to its log
    logging.basicConfig(level=logging.INFO, format="agentd: %(message)s", stream=sys.stderr)
    if os.geteuid() != 0:
        print("agentd: must run as root (it starts each job as the user who submitted it)", file=sys.stderr)
        return 2
    try:
        config = load_config(args.config)
        daemon = Daemon(protocol.socket_path(args.socket), args.state_dir, args.log_dir, config)
        import uvloop

        return int(uvloop.run(daemon.serve()))
    except (AgentError, OSError) as exc:
        print(f"agentd: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
