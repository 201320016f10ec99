"""Jobs and their runners, inside agentd: start, steer, watch, finish.

A queued job starts when a runner slot is free (``max_running_jobs`` box-wide and per
user; higher priority first, then submission order). Starting one: its directories
(``<state>/jobs/<id>`` for its checkpoints, ``<logs>/<id>`` for its output, both its
user's), its delegated cgroup, a socketpair, and a runner forked by the spawner as the
user. The runner's connection is a :class:`~agent.daemon.boxpool.Session` of the box's
admission plus the job's own messages (see :mod:`agent.daemon.runner`).

A runner's end decides the job's status: what it reported (``finished``, ``paused``),
else ``cancelled`` when a cancel was asked, else ``failed`` with the runner's exit status
and the tail of its log. Whatever the end, the job's cgroup is removed (killing any
process the job left) and its resources go back to the box. When agentd stops, its
runners are killed and their jobs stay ``running`` on disk: the next agentd resumes them
from their last checkpoint.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pwd
import shutil
import signal
import socket
import stat
import time
from collections.abc import Callable
from typing import Any

from .._types import Priority
from ..errors import AgentError, JobAccessError, JobError, JobNotFoundError
from ..supervisor.logs import file_component as log_component
from .boxpool import BoxAdmission, Session
from .config import DaemonConfig, user_groups
from .jobcgroups import JobCgroup, JobCgroups
from .jobs import Job, JobStatus, JobStore
from .protocol import Link
from .spawner import Spawner
from .userfiles import list_dir, read_file

log = logging.getLogger("agentd")

CANCEL_GRACE = 10.0
"""Seconds a runner has to end a cancelled or paused run before its cgroup is killed."""
MAX_PENDING_QUESTIONS = 100
MAX_QUESTION_TEXT = 4000
"""Characters of a question's prompt (its default, its rejection) agentd keeps for agentctl."""
MAX_LOG_READ = 1 << 20
_PASS_ENV = ("AGENT_GPUS", "AGENT_CGROUP_BACKEND", "AGENT_STOP_GRACE", "AGENT_PRELOAD", "TZ")
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class RunnerHandle:
    """A running job's runner, as agentd sees it."""

    def __init__(self, job: Job, cgroup: JobCgroup, link: Link) -> None:
        self.job = job
        self.cgroup = cgroup
        self.link = link
        self.session: Session | None = None
        self.pid: int | None = None
        self.pending: dict[str, dict[str, Any]] = {}  # human questions by id
        self.outcome: tuple[str, str | None] | None = None  # ("completed" | ... | "paused", error)
        self.requested: str | None = None  # "cancel" or "pause"
        self.waiters: list[Callable[[], None]] = []
        self.timer: asyncio.TimerHandle | None = None


class JobSupervisor:
    """Every job's life in agentd (see the module docstring)."""

    def __init__(self, config: DaemonConfig, store: JobStore, box: BoxAdmission, cgroups: JobCgroups,
                 state_dir: str, log_dir: str, loop: asyncio.AbstractEventLoop,
                 on_change: Callable[[], None]) -> None:
        self.config = config
        self.store = store
        self.box = box
        self.cgroups = cgroups
        self.jobs_dir = os.path.join(state_dir, "jobs")
        self.log_dir = log_dir
        self.loop = loop
        self.on_change = on_change
        self.running: dict[str, RunnerHandle] = {}
        self.by_pid: dict[int, RunnerHandle] = {}
        self.stopping = False
        self._kicked = False
        self._flush_due = False
        self.spawner = Spawner(self.on_spawner_report, self.on_spawner_lost)
        self.spawner.attach(loop)
        self.spawner_lost: asyncio.Future[None] = loop.create_future()

    # --- starting -------------------------------------------------------------------------

    def kick(self) -> None:
        """Start queued jobs soon (once per loop iteration, however often it is called)."""
        if not self._kicked:
            self._kicked = True
            self.loop.call_soon(self._start_queued)

    def _start_queued(self) -> None:
        self._kicked = False
        if self.stopping:
            return
        queued = sorted((j for j in self.store.jobs.values() if j.status is JobStatus.QUEUED),
                        key=lambda j: (-j.priority, int(j.id)))
        per_user: dict[int, int] = {}
        for handle in self.running.values():
            per_user[handle.job.uid] = per_user.get(handle.job.uid, 0) + 1
        for job in queued:
            if len(self.running) >= self.config.max_running_jobs:
                break
            limit = self.config.policy_for(job.uid).max_running_jobs
            if limit is not None and per_user.get(job.uid, 0) >= limit:
                continue
            try:
                self.start(job)
            except (AgentError, OSError) as exc:
                log.error("job %s cannot start: %s", job.id, exc)
                job.error = f"cannot start its runner: {exc}"
                job.move(JobStatus.FAILED)
                self.store.save(job)
                continue
            per_user[job.uid] = per_user.get(job.uid, 0) + 1
        self.on_change()

    def start(self, job: Job) -> None:
        try:
            pw = pwd.getpwuid(job.uid)
        except KeyError:
            raise JobError(f"its user (uid {job.uid}) no longer exists") from None
        job_dir = self._user_dir(self.jobs_dir, job)
        log_dir = self._user_dir(self.log_dir, job)
        tmp_dir = self._fresh_tmp(job)
        policy = self.config.policy_for(job.uid)
        cgroup = self.cgroups.create(job.id, job.uid, job.gid, policy.quota, self.config.job_pids_max)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            env = {
                "PATH": _PATH, "HOME": pw.pw_dir, "USER": pw.pw_name, "LOGNAME": pw.pw_name,
                "SHELL": pw.pw_shell or "/bin/sh", "LANG": os.environ.get("LANG", "C.UTF-8"),
                "AGENT_DAEMON": "1", "AGENT_JOB": job.id, "AGENT_STATE_DIR": job_dir, "AGENT_LOG_DIR": log_dir,
                "TMPDIR": tmp_dir,
                **{k: os.environ[k] for k in _PASS_ENV if k in os.environ},
                **cgroup.env,
            }
            spec = {
                "job": job.id, "uid": job.uid, "gid": job.gid, "groups": user_groups(job.uid, job.gid),
                "job_dir": job_dir, "cwd": job.cwd, "path": job.path, "log": os.path.join(log_dir, "runner.log"),
                "env": env, "cgroup_procs": cgroup.procs_files,
            }
            self.spawner.spawn(job.id, spec, theirs.fileno())
        except BaseException:
            ours.close()
            cgroup.remove()
            raise
        finally:
            theirs.close()
        handle = RunnerHandle(job, cgroup, Link(ours, self.loop, lambda m: None, lambda why: None))
        handle.link.on_message = lambda message: self.on_runner_message(handle, message)
        handle.link.on_lost = lambda why: self.on_runner_lost(handle, why)
        handle.session = self.box.session(
            f"job {job.id}", job.uid, job.user, policy, handle.link.send, job_priority=job.priority,
            on_devices=cgroup.set_gpus,
        )
        self.running[job.id] = handle
        handle.link.send({
            "op": "job", "job": job.id, "name": job.name, "path": job.path, "source": self.store.source(job.id),
            "params": job.params, "user": job.user, "box": self.box.info(),
            "quota": policy.quota, "fork_zygote": cgroup.backend != "v2",
        })
        job.move(JobStatus.RUNNING)
        job.error = None
        job.started = job.started or time.time()
        job.starts += 1
        self.store.save(job)
        log.info("job %s (%s, user %s) started", job.id, job.name, job.user)

    def _fresh_tmp(self, job: Job) -> str:
        """The runner's TMPDIR, ``<job dir>/tmp``: emptied before each runner and after it.

        The job's directory belongs to its user, who may swap ``tmp`` for a link at any
        moment: it is made and handed over through descriptors that follow no link, so no
        swap makes root chown anything else.
        """
        job_dir = os.path.join(self.jobs_dir, job.id)
        parent = os.open(job_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            _remove_entry(parent, "tmp")
            os.mkdir("tmp", 0o700, dir_fd=parent)
            fd = os.open("tmp", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
            try:
                os.fchown(fd, job.uid, job.gid)
            finally:
                os.close(fd)
        finally:
            os.close(parent)
        return os.path.join(job_dir, "tmp")

    def _empty_tmp(self, job: Job) -> None:
        """Remove the job's TMPDIR (its runner has ended), following no link."""
        try:
            parent = os.open(os.path.join(self.jobs_dir, job.id),
                             os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return  # no job directory (yet): nothing to empty
        try:
            _remove_entry(parent, "tmp")
        finally:
            os.close(parent)

    @staticmethod
    def _user_dir(parent: str, job: Job) -> str:
        path = os.path.join(parent, job.id)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode):  # a link is not followed: lstat sees the link itself
            raise JobError(f"{path} is not a directory")
        if st.st_uid != job.uid or st.st_gid != job.gid:
            os.chown(path, job.uid, job.gid, follow_symlinks=False)
        return path

    # --- the spawner and the runners --------------------------------------------------------

    def on_spawner_report(self, report: dict[str, Any]) -> None:
        op = report.get("op")
        if op == "spawned":
            handle = self.running.get(str(report.get("job")))
            if handle is not None and handle.pid is None:
                handle.pid = int(report["pid"])
                self.by_pid[handle.pid] = handle
        elif op == "exited":
            handle = self.by_pid.pop(int(report["pid"]), None)
            if handle is not None:
                self.finalize(handle, int(report["status"]))
        elif op == "spawn_failed":
            handle = self.running.get(str(report.get("job")))
            if handle is not None:
                handle.outcome = ("failed", f"cannot fork its runner: {report.get('error')}")
                self.finalize(handle, None)

    def on_spawner_lost(self) -> None:
        if not self.stopping and not self.spawner_lost.done():
            log.error("agentd's spawner died: every runner died with it; stopping so that a restart resumes them")
            self.spawner_lost.set_result(None)

    def on_runner_message(self, handle: RunnerHandle, message: dict[str, Any]) -> None:
        try:
            self._runner_message(handle, message)
        except (KeyError, TypeError, ValueError) as exc:
            self._violation(handle, f"malformed {message.get('op')!r} message: {exc!r}")

    def _runner_message(self, handle: RunnerHandle, message: dict[str, Any]) -> None:
        op = message["op"]
        job = handle.job
        session = handle.session
        if session is not None and session.on_message(message):
            return
        if op in ("started", "states"):
            states = message["states"]
            if not isinstance(states, dict) or len(job.states) + len(states) > 100_000:
                raise ValueError("states must be a map of state name to status")
            job.states.update({str(k)[:200]: str(v)[:20] for k, v in states.items()})
            if op == "started":
                job.run_id = str(message["run_id"])[:64]
                self.store.save(job)
            else:
                self._touch(job)
        elif op == "ask":
            request = dict(message["request"])
            rid = str(request["id"])
            if rid not in handle.pending and len(handle.pending) >= MAX_PENDING_QUESTIONS:
                raise ValueError(f"more than {MAX_PENDING_QUESTIONS} open questions")
            question = {k: request.get(k) for k in
                        ("id", "prompt", "state", "attempt", "rejected", "default", "timeout", "created")}
            for key in ("prompt", "rejected", "default"):  # what agentctl shows: bounded, as state names are
                if isinstance(question[key], str) and len(question[key]) > MAX_QUESTION_TEXT:
                    question[key] = question[key][:MAX_QUESTION_TEXT] + " [...]"
            handle.pending[rid] = question
            self.on_change()
        elif op == "withdraw":
            handle.pending.pop(str(message["id"]), None)
            self.on_change()
        elif op in ("finished", "paused"):
            status = "paused" if op == "paused" else str(message["status"])
            if status not in ("completed", "failed", "cancelled", "paused"):
                raise ValueError(f"unknown status {status!r}")
            handle.outcome = (status, message.get("error"))
            if handle.timer is None:  # it has said all it will: it must exit now
                handle.timer = self.loop.call_later(CANCEL_GRACE, self._kill, handle)
        else:
            raise ValueError(f"unknown op {op!r}")

    def _violation(self, handle: RunnerHandle, why: str) -> None:
        log.warning("job %s: its runner broke the protocol (%s); it is stopped", handle.job.id, why)
        if handle.outcome is None:
            handle.outcome = ("failed", f"its runner broke agentd's protocol: {why}")
        self._kill(handle)

    def on_runner_lost(self, handle: RunnerHandle, why: str) -> None:
        if handle.session is not None:
            handle.session.close()  # its resources go back to the box now
        if handle.outcome is None and handle.requested is None and not self.stopping:
            log.warning("job %s: lost its runner's connection (%s)", handle.job.id, why)
        self._kill(handle)

    def _kill(self, handle: RunnerHandle) -> None:
        """Kill the job's runner and everything in its cgroup (its exit report follows)."""
        if handle.cgroup.handle is None and handle.pid is not None:  # no cgroups: the runner alone
            try:
                os.kill(handle.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return
        try:
            handle.cgroup.remove()
        except (AgentError, OSError) as exc:
            log.error("job %s: cannot remove its cgroup: %s", handle.job.id, exc)

    def finalize(self, handle: RunnerHandle, wait_status: int | None) -> None:
        """The runner is gone: settle the job's status, free what it held."""
        job = handle.job
        self.running.pop(job.id, None)
        if handle.pid is not None:
            self.by_pid.pop(handle.pid, None)
            handle.pid = None  # reaped: the number may belong to someone else now
        handle.link.drain()  # its last words ("finished") may still wait in the socket
        if handle.timer is not None:
            handle.timer.cancel()
        if handle.session is not None:
            handle.session.close()
        handle.link.close()
        handle.pending.clear()
        try:
            handle.cgroup.remove()
        except Exception as exc:  # noqa: BLE001 - logged; the job's status must still be settled
            log.error("job %s: cannot remove its cgroup: %s", job.id, exc)
        self._empty_tmp(job)
        if not self.stopping:
            status, error = self._outcome(handle, wait_status)
            job.error = error
            if handle.outcome is None:  # it went without saying how its states ended
                job.states = _interrupted(job.states, status)
            job.move(JobStatus(status))
            self.store.save(job)
            log.info("job %s %s%s", job.id, status, f": {error}" if error else "")
        for waiter in handle.waiters:
            waiter()
        self.kick()

    def _outcome(self, handle: RunnerHandle, wait_status: int | None) -> tuple[str, str | None]:
        if handle.outcome is not None:
            if handle.outcome[0] == "paused" and handle.requested == "cancel":
                return "cancelled", None  # cancelled while it paused: nothing is left to resume
            return handle.outcome
        if handle.requested == "cancel":
            return "cancelled", None
        if handle.requested == "pause":
            return "paused", None
        if wait_status is None:
            how = "never started"
        elif os.WIFSIGNALED(wait_status):
            how = f"was killed by {signal.Signals(os.WTERMSIG(wait_status)).name}"
        else:
            how = f"exited with status {os.waitstatus_to_exitcode(wait_status)}"
        tail = self.runner_log_tail(handle.job)
        return "failed", f"its runner {how}" + (f"; its log ends: {tail}" if tail else "")

    def runner_log_tail(self, job: Job, lines: int = 5) -> str:
        try:
            data, size = read_file(self.log_dir, [job.id, "runner.log"], job.uid, 0, MAX_LOG_READ)
            if size > len(data):
                data, _ = read_file(self.log_dir, [job.id, "runner.log"], job.uid, size - 4096, 4096)
        except (OSError, JobError):
            return ""
        return " | ".join(data.decode(errors="replace").strip().splitlines()[-lines:])

    def _touch(self, job: Job) -> None:
        self.store.touch(job)
        if not self._flush_due:
            self._flush_due = True
            self.loop.call_later(0.05, self._flush)

    def _flush(self) -> None:
        self._flush_due = False
        self.store.flush()
        self.on_change()

    # --- steering -------------------------------------------------------------------------

    def job_for(self, job_id: Any, uid: int, admin: bool) -> Job:
        """The job ``job_id`` if ``uid`` may see it; raises JobNotFoundError / JobAccessError."""
        job = self.store.jobs.get(str(job_id))
        if job is None:
            raise JobNotFoundError(f"no job {job_id} (agentctl list shows your jobs)")
        if job.uid != uid and not admin:
            raise JobAccessError(
                f"job {job_id} belongs to another user: you can see and steer only your own jobs"
            )
        return job

    def cancel(self, job: Job, done: Callable[[], None]) -> bool:
        """Cancel ``job``; False when ``done`` will be called once its runner has ended."""
        if job.status in (JobStatus.QUEUED, JobStatus.PAUSED):
            job.move(JobStatus.CANCELLED)
            self.store.save(job)
            self.on_change()
            return True
        if job.status is not JobStatus.RUNNING:
            raise JobError(f"job {job.id} is {job.status.value}: there is nothing to cancel")
        handle = self.running[job.id]
        self._ask(handle, "cancel", done)
        return False

    def pause(self, job: Job, done: Callable[[], None]) -> bool:
        """Pause ``job`` (checkpoint, stop); False when ``done`` will be called once it is paused."""
        if job.status is JobStatus.QUEUED:
            job.move(JobStatus.PAUSED)
            self.store.save(job)
            self.on_change()
            return True
        if job.status is JobStatus.PAUSED:
            return True
        if job.status is not JobStatus.RUNNING:
            raise JobError(f"job {job.id} is {job.status.value}: only a queued or running job can be paused")
        self._ask(self.running[job.id], "pause", done)
        return False

    def _ask(self, handle: RunnerHandle, what: str, done: Callable[[], None]) -> None:
        handle.waiters.append(done)
        if handle.requested is None or (what == "cancel" and handle.requested == "pause"):
            handle.requested = what
            handle.link.send({"op": what})
            if handle.timer is not None:
                handle.timer.cancel()
            handle.timer = self.loop.call_later(CANCEL_GRACE, self._kill, handle)

    def resume(self, job: Job) -> None:
        if job.status not in (JobStatus.PAUSED, JobStatus.FAILED):
            raise JobError(f"job {job.id} is {job.status.value}: only a paused or failed job can be resumed")
        job.move(JobStatus.QUEUED)
        job.error = None
        self.store.save(job)
        self.kick()

    def respond(self, job: Job, request_id: str, answer: str) -> None:
        handle = self.running.get(job.id)
        if handle is None:
            hint = f": its questions are asked again, with new ids, once it runs (agentctl resume {job.id})" if (
                job.status in (JobStatus.PAUSED, JobStatus.QUEUED)) else ""
            raise JobError(f"job {job.id} is {job.status.value}, so it has no open question{hint}")
        pending = handle.pending
        if request_id not in pending:
            open_ids = ", ".join(pending) or "none"
            raise JobNotFoundError(f"job {job.id} has no open question {request_id!r} (open: {open_ids})")
        del pending[request_id]
        handle.link.send({"op": "answer", "id": request_id, "text": answer})  # type: ignore[union-attr]
        self.on_change()

    # --- what agentctl shows ------------------------------------------------------------------

    def describe(self, job: Job) -> dict[str, Any]:
        out: dict[str, Any] = {
            "job": job.id, "name": job.name, "user": job.user, "uid": job.uid,
            "priority": Priority(job.priority).name.lower(), "status": job.status.value,
            "states": dict(job.states), "run_id": job.run_id, "error": job.error, "created": job.created,
            "started": job.started, "finished": job.finished, "starts": job.starts,
            "pending": [], "waiting": {}, "holding": {},
        }
        handle = self.running.get(job.id)
        if handle is not None:
            out["pending"] = list(handle.pending.values())
            out["pid"] = handle.pid
            if handle.session is not None:
                out["waiting"] = handle.session.waiting()
                out["holding"] = handle.session.holding()
        return out

    def read_log(self, job: Job, state: str | None, offset: int) -> dict[str, Any]:
        """Output from ``offset``: the runner's (no state), or every attempt of ``state`` in order."""
        done = job.status.is_terminal or job.status is JobStatus.PAUSED
        if state is None:
            try:
                data, _ = read_file(self.log_dir, [job.id, "runner.log"], job.uid, offset, MAX_LOG_READ)
            except FileNotFoundError:
                data = b""
            return {"text": data.decode(errors="replace"), "offset": offset + len(data), "done": done}
        if state not in job.states:
            if not job.states and not done:  # queued, or loading: its states come as it starts
                return {"text": "", "offset": offset, "done": done}
            known = ", ".join(sorted(job.states)) or "none reported yet"
            raise JobNotFoundError(f"job {job.id} has no state {state!r} (its states: {known})")
        if not job.run_id:
            return {"text": "", "offset": offset, "done": done}
        run_dir = [job.id, log_component(job.run_id)]
        prefix = f"{log_component(state)}.attempt-"
        attempts = sorted(
            int(name[len(prefix):-4]) for name in list_dir(self.log_dir, run_dir)
            if name.startswith(prefix) and name.endswith(".log") and name[len(prefix):-4].isdigit()
        )
        # The attempts' logs one after the other: ``offset`` counts into that whole.
        chunk, start = b"", 0
        for number in attempts:
            if len(chunk) >= MAX_LOG_READ:
                break
            parts = [*run_dir, f"{prefix}{number}.log"]
            try:
                data, size = read_file(self.log_dir, parts, job.uid, max(0, offset + len(chunk) - start),
                                       MAX_LOG_READ - len(chunk))
            except FileNotFoundError:
                continue
            if offset + len(chunk) < start + size:
                chunk += data
            start += size
        reply = {"text": chunk.decode(errors="replace"), "offset": offset + len(chunk), "done": done}
        if not attempts and job.states.get(state) not in (None, "pending", "ready"):
            reply["note"] = (f"state {state!r} kept no output of its own (an inline state prints to the "
                             f"job's log: agentctl logs {job.id})")
        return reply

    def counts(self) -> dict[str, int]:
        out = {s.value: 0 for s in JobStatus}
        for job in self.store.jobs.values():
            out[job.status.value] += 1
        return out

    # --- stopping -----------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Kill every runner; their jobs stay ``running`` on disk and resume at the next start."""
        self.stopping = True
        self.spawner.close()  # it SIGKILLs every runner
        for handle in list(self.running.values()):
            if handle.session is not None:
                handle.session.close()
            handle.link.close()
            try:
                handle.cgroup.remove()
            except Exception as exc:  # noqa: BLE001 - keep stopping the others
                log.error("job %s: cannot remove its cgroup: %s", handle.job.id, exc)
            self._empty_tmp(handle.job)  # as when a runner ends: its TMPDIR goes with it
        self.running.clear()
        self.by_pid.clear()
        self.store.flush()


def _remove_entry(parent: int, name: str) -> None:
    """Remove ``name`` in the directory open as ``parent``, whatever it is, following no link."""
    try:
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=parent, ignore_errors=True)
    else:
        os.unlink(name, dir_fd=parent)


def _interrupted(states: dict[str, str], status: str) -> dict[str, str]:
    """A job's states once its runner went (killed, or stopped past its grace) without
    reporting them: what still ran went with it, failed, cancelled, or to run again on
    resume (``pending``) as the job itself did; a cancel ends the states yet to run too,
    as ``cancel_all()`` does."""
    if status == "cancelled":
        return {name: "cancelled" if state in ("running", "ready", "pending") else state
                for name, state in states.items()}
    ended = {"failed": "failed", "paused": "pending"}.get(status)
    if ended is None:
        return states
    return {name: ended if state == "running" else state for name, state in states.items()}
