"""Jobs: what a user submitted to agentd, its status machine, and the SQLite file that keeps them.

A job is one workflow file run by one runner process as the submitting uid. Its status
is an explicit state machine (:data:`TRANSITIONS`): ``queued`` (waiting for a runner
slot, or to be resumed), ``running`` (its runner is up), ``paused`` (checkpointed and
stopped; ``resume`` queues it again), and the ends ``completed``, ``failed`` and
``cancelled``. A failed job may be resumed: its failed states run again.

The store is one SQLite file in WAL mode under agentd's state directory (root only).
Every job is also kept in memory; status changes are committed at once, the states
map (what ``agentctl status`` shows per state) is written in batches by :meth:`flush`.
"""

from __future__ import annotations

import enum
import json
import os
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any

from ..errors import DaemonError, JobError


class JobStatus(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED)


_Q, _R, _P, _C, _F, _X = JobStatus
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    _Q: frozenset({_R, _P, _X, _F}),  # -> failed: its runner could not be started
    _R: frozenset({_C, _F, _X, _P, _Q}),  # -> queued: its runner was lost (agentd restarted)
    _P: frozenset({_Q, _X}),
    _F: frozenset({_Q}),  # resume re-runs the failed states
    _C: frozenset(),
    _X: frozenset(),
}


@dataclass
class Job:
    """One submitted workflow (see the module docstring)."""

    id: str
    uid: int
    gid: int
    user: str
    name: str
    priority: int
    path: str
    cwd: str
    params: dict[str, Any]
    status: JobStatus = JobStatus.QUEUED
    run_id: str | None = None
    error: str | None = None
    states: dict[str, str] = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    starts: int = 0  # runners started for it (more than one: it was resumed)

    def move(self, to: JobStatus) -> None:
        """Change status along :data:`TRANSITIONS`; anything else is a bug and raises."""
        if to is self.status:
            return
        if to not in TRANSITIONS[self.status]:
            raise JobError(f"job {self.id}: illegal status change {self.status.value} -> {to.value}")
        self.status = to
        if to.is_terminal:
            self.finished = time.time()
        elif to is JobStatus.QUEUED:
            self.finished = None


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    uid INTEGER NOT NULL, gid INTEGER NOT NULL, user TEXT NOT NULL,
    name TEXT NOT NULL, priority INTEGER NOT NULL, status TEXT NOT NULL,
    path TEXT NOT NULL, cwd TEXT NOT NULL, source TEXT NOT NULL, params TEXT NOT NULL,
    run_id TEXT, error TEXT, states TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL, started REAL, finished REAL, starts INTEGER NOT NULL DEFAULT 0
);
"""
SCHEMA_VERSION = 1
_COLUMNS = (
    "id, uid, gid, user, name, priority, status, path, cwd, params, run_id, error, states, created, started, "
    "finished, starts"
)


class JobStore:
    """Every job, in memory and in ``path`` (SQLite, WAL)."""

    def __init__(self, path: str) -> None:
        self.path = path
        # Every user's jobs (their code, their parameters) are in it: readable by its owner
        # only, and so are the WAL files SQLite makes beside it (with the database's mode).
        os.close(os.open(path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600))
        _owner_only(path)
        try:
            self._db = sqlite3.connect(path, isolation_level=None)
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = NORMAL")
            self._db.executescript(_SCHEMA)
            row = self._db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except sqlite3.DatabaseError as exc:
            raise DaemonError(f"{path} is not a usable agentd database ({exc}): move it away") from None
        _owner_only(path)
        if row is None:
            self._db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        elif int(row[0]) > SCHEMA_VERSION:
            raise DaemonError(f"{path} was written by a newer agentd (schema {row[0]}): upgrade this one")
        self.jobs: dict[str, Job] = {}
        for values in self._db.execute(f"SELECT {_COLUMNS} FROM jobs ORDER BY id"):
            job = _from_row(values)
            self.jobs[job.id] = job
        self._dirty: set[str] = set()

    def add(self, job: Job, source: str) -> Job:
        """Insert a new job (its id is assigned here) and commit."""
        cur = self._db.execute(
            "INSERT INTO jobs (uid, gid, user, name, priority, status, path, cwd, source, params, created) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (job.uid, job.gid, job.user, job.name, job.priority, job.status.value, job.path, job.cwd,
             source, json.dumps(job.params), job.created),
        )
        job.id = str(cur.lastrowid)
        self.jobs[job.id] = job
        return job

    def source(self, job_id: str) -> str:
        row = self._db.execute("SELECT source FROM jobs WHERE id = ?", (int(job_id),)).fetchone()
        if row is None:
            raise JobError(f"no job {job_id}")
        return str(row[0])

    def save(self, job: Job) -> None:
        """Commit ``job``'s status and fields now."""
        self._dirty.discard(job.id)
        self._write([job])

    def touch(self, job: Job) -> None:
        """``job`` changed in a way that can wait for the next :meth:`flush`."""
        self._dirty.add(job.id)

    def flush(self) -> None:
        if self._dirty:
            jobs = [self.jobs[i] for i in self._dirty if i in self.jobs]
            self._dirty.clear()
            self._write(jobs)

    def _write(self, jobs: list[Job]) -> None:
        rows = [
            (j.status.value, j.run_id, j.error, json.dumps(j.states), j.started, j.finished, j.starts, int(j.id))
            for j in jobs
        ]
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany(
                "UPDATE jobs SET status = ?, run_id = ?, error = ?, states = ?, started = ?, finished = ?, "
                "starts = ? WHERE id = ?", rows,
            )

    def close(self) -> None:
        self.flush()
        self._db.close()


def _from_row(values: tuple[Any, ...]) -> Job:
    (jid, uid, gid, user, name, priority, status, path, cwd, params, run_id, error, states,
     created, started, finished, starts) = values
    return Job(
        id=str(jid), uid=uid, gid=gid, user=user, name=name, priority=priority, path=path, cwd=cwd,
        params=json.loads(params), status=JobStatus(status), run_id=run_id, error=error,
        states=json.loads(states), created=created, started=started, finished=finished, starts=starts,
    )


def _owner_only(path: str) -> None:
    """The database and its WAL files (left by an earlier agentd, perhaps more open) mode 0600."""
    for name in (path, f"{path}-wal", f"{path}-shm"):
        try:
            os.chmod(name, 0o600)
        except FileNotFoundError:
            pass
