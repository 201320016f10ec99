"""Where checkpoints live between processes: an embedded SQLite file by default.

Every run has an id; each save appends a checkpoint with the next sequence number in
one transaction, so a process killed at any moment leaves the last committed
checkpoint intact. The context (and the per-state metadata) is stored per key, in its
own table keyed by ``(run_id, kind, key, seq)``: a save writes only the keys whose
encoded value changed since the run's previous save (``NULL`` marks a deletion), and
reading checkpoint ``S`` takes, for each key, its newest row with ``seq <= S``.
Retention (``keep``) drops old checkpoints and the rows only they could see.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sqlite3
import threading
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from . import _validate, values
from .checkpoint import AgentCheckpoint, check_format_version
from .errors import CheckpointError, UnencodableValueError

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    agent_name TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    status TEXT NOT NULL,
    latest_seq INTEGER NOT NULL,
    pruned_through INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS checkpoints (
    run_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    timestamp REAL NOT NULL,
    header TEXT NOT NULL,
    PRIMARY KEY (run_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS run_values (
    run_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    seq INTEGER NOT NULL,
    value TEXT,
    PRIMARY KEY (run_id, kind, key, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS run_values_by_seq ON run_values (run_id, seq);
"""



def _is_empty(path: str) -> bool:
    """Whether ``path`` holds no database yet (missing or empty: SQLite creates it)."""
    try:
        return os.stat(path).st_size == 0
    except FileNotFoundError:
        return True
    except OSError:
        return False


def _check_keep(keep: Any, fix: str, *, none: bool) -> None:
    """Refuse a retention that is not a whole number >= 1 (``None``: keep all, where ``none``).

    A float, a bool or NaN would be taken as given (``keep=True`` keeping one, ``nan`` none
    ever pruned): the engine compares it with sequence numbers.
    """
    if keep is None and none:
        return
    if isinstance(keep, bool) or not isinstance(keep, int):
        raise CheckpointError(f"keep must be an int, got {_validate.shown(keep)}: {fix}")
    if keep < 1:
        raise CheckpointError(f"keep={keep!r}: {fix}")


def default_store_path() -> Path:
    """``$AGENT_STATE_DIR/checkpoints.sqlite3``, else ``~/.local/state/agent/checkpoints.sqlite3``."""
    base = os.environ.get("AGENT_STATE_DIR")
    root = Path(base) if base else Path.home() / ".local" / "state" / "agent"
    return root / "checkpoints.sqlite3"


def open_default_store(*, keep: int | None = 20) -> "SQLiteCheckpointStore":
    """The store at :func:`default_store_path` (created on first use)."""
    return SQLiteCheckpointStore(default_store_path(), keep=keep)


def new_run_id() -> str:
    """A fresh, unique run id (32 hex digits)."""
    return uuid.uuid4().hex


@dataclass(frozen=True)
class RunInfo:
    """One run in a store, as :meth:`CheckpointStore.list_runs` reports it."""

    run_id: str
    agent_name: str
    status: str
    created: float
    updated: float
    latest_seq: int
    checkpoints: int


@runtime_checkable
class CheckpointStore(Protocol):
    """Keeps the checkpoints of runs, newest last."""

    def save(
        self, run_id: str, checkpoint: AgentCheckpoint, *, changed_keys: Iterable[str] | None = None
    ) -> int:
        """Append ``checkpoint`` to run ``run_id`` atomically; returns its sequence number."""
        ...

    def latest(self, run_id: str) -> AgentCheckpoint | None:
        """The newest checkpoint of the run, or None when the store has none."""
        ...

    def list_runs(self) -> list[RunInfo]:
        """Every run in the store, most recently updated first."""
        ...

    def prune(self, run_id: str, keep: int) -> int:
        """Keep the newest ``keep`` checkpoints of the run; returns how many were removed."""
        ...

    def delete_run(self, run_id: str) -> bool:
        """Forget the run; returns whether it was there."""
        ...

    def close(self) -> None: ...


CONTEXT = "context"
STATE = "state"
_KINDS = (CONTEXT, STATE)


@dataclass
class _Values:
    """The last saved JSON text (and fingerprint) of each key of one kind."""

    texts: dict[str, str] = dataclasses.field(default_factory=dict)
    prints: dict[str, bytes] = dataclasses.field(default_factory=dict)


_FINISHED = frozenset({"completed", "failed", "cancelled"})
"""Statuses of a run that saves no more checkpoints unless resumed (``AgentStatus`` values)."""
_CACHED_RUNS = 64
"""Runs whose last save a store keeps in memory, to write only the difference next time."""


@dataclass
class _RunCache:
    """What the last save of a run wrote, so the next one can write only the difference."""

    seq: int
    kinds: dict[str, _Values]


def _create_private(path: str) -> None:
    """Create the store's file readable by its owner only, if it does not exist: SQLite gives
    its WAL and shared-memory files the database's mode, and checkpoints hold whole
    contexts (secrets included), which other users of the machine must not read. An
    existing file keeps the mode it has."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
    except OSError:
        pass  # sqlite3.connect says why it cannot open it


class SQLiteCheckpointStore:
    """The embedded default store: one SQLite file in WAL mode, one transaction per save.

    ``path`` is the SQLite file (None: :func:`default_store_path`; ``":memory:"``: a store
    that lives as long as this object; ``""`` is refused, as SQLite would make it a private
    temporary database). ``keep`` is the retention: after each save only the newest
    ``keep`` (an int >= 1) checkpoints of that run remain (None keeps all).
    ``durable=True`` syncs every commit to disk (power-loss safe); the default syncs at
    WAL checkpoints, which survives any crash of the process but may lose the last
    commits on power loss. Saves may pass
    ``changed_keys`` (every key written since the run's previous save) to skip comparing
    the other keys; without it every mutable value is encoded and compared.

    Without ``durable``, a new store (no file, or an empty one) is set up (WAL mode, the
    tables, in one transaction) without waiting for the disk: it holds nothing yet, and
    those syncs (a rollback journal's, the WAL's first, their directory's: 3 to 10 ms
    here, more on a busy disk) were the largest part of a daemon job's start. A power
    cut before the kernel has written the new file out leaves it empty, or at worst
    unreadable (CheckpointError then says to move it away).
    """

    def __init__(
        self, path: str | os.PathLike[str] | None = None, *, keep: int | None = 20, durable: bool = False
    ) -> None:
        _check_keep(keep, "keep at least 1 checkpoint per run, or None for all", none=True)
        _validate.flag(durable, "SQLiteCheckpointStore(durable=...)", error=CheckpointError)
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise CheckpointError(
                f"SQLiteCheckpointStore(path=...) must be the path of an SQLite file (str or os.PathLike), "
                f"or None for the default store, got {_validate.shown(path)}"
            )
        self.path = str(default_store_path() if path is None else os.fspath(path))
        if not self.path:  # sqlite3 would open a private temporary database: every save lost
            raise CheckpointError(
                "SQLiteCheckpointStore(path='') names no file (SQLite would keep the checkpoints in a "
                "temporary database, lost when it closes): give the path of an SQLite file, None for the "
                "default store, or ':memory:' for one that lives as long as the store object"
            )
        self.keep = keep
        self._indexed = self.path == ":memory:"  # added to the store index at its first save
        self._lock = threading.Lock()
        self._cache: dict[str, _RunCache] = {}
        creating = False
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            _create_private(self.path)
            creating = not durable and _is_empty(self.path)
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise CheckpointError(f"cannot open checkpoint store {self.path}: {exc}") from exc
        try:
            self._db.execute("PRAGMA busy_timeout = 10000")
            if creating:  # see the class docstring
                self._db.execute("PRAGMA synchronous = OFF")
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.executescript(f"BEGIN;{_SCHEMA}COMMIT;")  # one commit for every table, not one each
            self._check_schema()
            self._db.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")
        except sqlite3.DatabaseError as exc:
            self._db.close()
            elsewhere = "set AGENT_STATE_DIR to use another directory" if path is None else "give another path"
            raise CheckpointError(
                f"{self.path} is not a usable checkpoint database ({exc}): move it away, or {elsewhere}"
            ) from exc
        except CheckpointError:
            self._db.close()
            raise

    def _check_schema(self) -> None:
        row = self._db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None:
            self._db.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
            )
        elif not row[0].isdigit() or int(row[0]) > SCHEMA_VERSION:
            raise CheckpointError(
                f"checkpoint store {self.path} has schema version {row[0]!r}, newer than this "
                f"release reads ({SCHEMA_VERSION}): upgrade the agent package"
            )

    # --- life cycle ------------------------------------------------------------------

    def close(self) -> None:
        """Close the database (idempotent)."""
        with self._lock:
            self._cache.clear()
            self._db.close()

    def __enter__(self) -> "SQLiteCheckpointStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SQLiteCheckpointStore({self.path!r}, keep={self.keep!r})"

    # --- writing ---------------------------------------------------------------------

    def save(
        self, run_id: str, checkpoint: AgentCheckpoint, *, changed_keys: Iterable[str] | None = None
    ) -> int:
        """Append ``checkpoint`` to run ``run_id`` in one transaction; returns its sequence number.

        Raises CheckpointError when the run belongs to another agent or a value cannot be
        encoded (nothing is written then).
        """
        if not isinstance(run_id, str) or not run_id:
            raise CheckpointError(f"run_id must be a non-empty string, got {run_id!r}")
        if not self._indexed:  # so that `agent runs` and `agent top` find this store (not one only read)
            from .store_index import remember

            remember(self.path)
            self._indexed = True
        try:
            header = json.dumps(
                {**checkpoint.header_dict(with_metadata=False), "run_id": run_id},
                separators=(",", ":"), allow_nan=False,
            )
        except (UnencodableValueError, ValueError) as exc:
            raise CheckpointError(f"checkpoint of run {run_id} cannot be written: {exc}") from exc
        context = checkpoint.context
        with self._lock:
            with self._transaction():
                row = self._db.execute(
                    "SELECT agent_name, latest_seq, pruned_through FROM runs WHERE run_id = ?", (run_id,)
                ).fetchone()
                if row is not None and row[0] != checkpoint.agent_name:
                    raise CheckpointError(
                        f"run {run_id} belongs to agent {row[0]!r}, not {checkpoint.agent_name!r}: "
                        "use a new run id for another agent"
                    )
                last_seq, pruned_through = (row[1], row[2]) if row else (0, 0)
                cache = self._cache.pop(run_id, None)
                if cache is None or cache.seq != last_seq:
                    # First save of this run in this process, or another process wrote meanwhile.
                    cache = self._load_cache(run_id, last_seq)
                    changed_keys = None
                seq = last_seq + 1
                writes = [(CONTEXT, k, t) for k, t in _diff(cache.kinds[CONTEXT], context, changed_keys)]
                writes += [(STATE, k, t) for k, t in _diff(cache.kinds[STATE], checkpoint.state_metadata, None)]
                self._db.execute(
                    "INSERT INTO checkpoints (run_id, seq, timestamp, header) VALUES (?, ?, ?, ?)",
                    (run_id, seq, checkpoint.timestamp, header),
                )
                if writes:
                    self._db.executemany(
                        "INSERT INTO run_values (run_id, kind, key, seq, value) VALUES (?, ?, ?, ?, ?)",
                        [(run_id, kind, key, seq, text) for kind, key, text in writes],
                    )
                self._db.execute(
                    "INSERT INTO runs (run_id, agent_name, created, updated, status, latest_seq) "
                    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (run_id) DO UPDATE SET "
                    "updated = excluded.updated, status = excluded.status, latest_seq = excluded.latest_seq",
                    (run_id, checkpoint.agent_name, checkpoint.timestamp, checkpoint.timestamp,
                     checkpoint.agent_status, seq),
                )
                if self.keep is not None and seq - self.keep > pruned_through:
                    self._compact(run_id, seq - self.keep + 1, pruned_through)
            # Committed: only now does the cache move on (a failed save leaves none behind).
            for kind, key, text in writes:
                stored = cache.kinds[kind]
                if text is None:
                    stored.texts.pop(key, None)
                    stored.prints.pop(key, None)
                else:
                    stored.texts[key] = text
            cache.seq = seq
            # Kept for the run's next save only while it may make one: a finished run's goes
            # (a resumed one reads it back), and so do the least recently saved beyond a few
            # dozen runs, so that a store outliving many runs keeps no copy of each.
            if checkpoint.agent_status not in _FINISHED:
                self._cache[run_id] = cache
                while len(self._cache) > _CACHED_RUNS:
                    del self._cache[next(iter(self._cache))]
        return seq

    def prune(self, run_id: str, keep: int) -> int:
        """Keep only the newest ``keep`` (>= 1) checkpoints of the run; returns how many went."""
        _check_keep(keep, "keep at least 1 checkpoint, or delete_run() the run", none=False)
        with self._lock, self._transaction():
            row = self._db.execute(
                "SELECT latest_seq, pruned_through FROM runs WHERE run_id = ?", (run_id,)
            ).fetchone()
            if row is None:
                return 0
            latest, pruned = row
            cut = latest - keep + 1
            if cut <= pruned + 1:
                return 0
            return self._compact(run_id, cut, pruned)

    def _compact(self, run_id: str, cut: int, pruned_through: int) -> int:
        """Drop checkpoints before ``cut`` and context rows no kept checkpoint can see."""
        removed = self._db.execute(
            "DELETE FROM checkpoints WHERE run_id = ? AND seq < ?", (run_id, cut)
        ).rowcount
        # Keys written since the last compaction: their rows older than their newest row
        # at or before ``cut`` are invisible to every kept checkpoint.
        self._db.execute(
            "DELETE FROM run_values WHERE run_id = :r AND seq < :cut "
            "AND (kind, key) IN (SELECT kind, key FROM run_values WHERE run_id = :r AND seq > :old AND seq <= :cut) "
            "AND seq < (SELECT MAX(m.seq) FROM run_values AS m WHERE m.run_id = :r "
            "           AND m.kind = run_values.kind AND m.key = run_values.key AND m.seq <= :cut)",
            {"r": run_id, "cut": cut, "old": pruned_through},
        )
        # A deletion marker with nothing older left hides nothing.
        self._db.execute(
            "DELETE FROM run_values WHERE run_id = ? AND value IS NULL AND seq > ? AND seq <= ?",
            (run_id, pruned_through, cut),
        )
        self._db.execute("UPDATE runs SET pruned_through = ? WHERE run_id = ?", (cut - 1, run_id))
        return removed

    def delete_run(self, run_id: str) -> bool:
        """Forget every checkpoint of the run; returns whether it was there."""
        with self._lock, self._transaction():
            self._cache.pop(run_id, None)
            self._db.execute("DELETE FROM checkpoints WHERE run_id = ?", (run_id,))
            self._db.execute("DELETE FROM run_values WHERE run_id = ?", (run_id,))
            return self._db.execute("DELETE FROM runs WHERE run_id = ?", (run_id,)).rowcount > 0

    # --- reading ---------------------------------------------------------------------

    def latest(self, run_id: str) -> AgentCheckpoint | None:
        """The newest checkpoint of the run, or None when the store has none.

        Raises CheckpointError naming the run, the sequence number and the key when a
        stored row is corrupt; other runs stay readable.
        """
        return self.load(run_id)

    def load(self, run_id: str, seq: int | None = None) -> AgentCheckpoint | None:
        """Checkpoint ``seq`` of the run (the newest when None), or None when it is not kept."""
        with self._lock, self._transaction(write=False):
            if seq is None:
                row = self._db.execute(
                    "SELECT seq, header FROM checkpoints WHERE run_id = ? ORDER BY seq DESC LIMIT 1", (run_id,)
                ).fetchone()
            else:
                row = self._db.execute(
                    "SELECT seq, header FROM checkpoints WHERE run_id = ? AND seq = ?", (run_id, seq)
                ).fetchone()
            if row is None:
                return None
            seq, header_text = row
            rows = self._values_at(run_id, seq)
        where = f"checkpoint {seq} of run {run_id} in {self.path}"
        header = _decode_header(header_text, where)
        loaded: dict[str, dict[str, Any]] = {kind: {} for kind in _KINDS}
        for kind, key, text in rows:
            try:
                loaded[kind][key] = values.loads(text)
            except values.TypedClassMissing as exc:
                raise CheckpointError(f"{where}: {kind} key {key!r}: {exc}") from exc
            except (CheckpointError, KeyError) as exc:
                raise CheckpointError(
                    f"{where}: {kind} key {key!r} is corrupt ({exc}); delete the run or resume "
                    "from a fresh start"
                ) from exc
        header["context"] = {}
        header["state_metadata"] = {}
        try:
            checkpoint = AgentCheckpoint.from_dict(header)
        except CheckpointError as exc:
            raise CheckpointError(f"{where} is corrupt: {exc}") from exc
        checkpoint.context = loaded[CONTEXT]
        checkpoint.state_metadata = loaded[STATE]
        return checkpoint

    def checkpoints(self, run_id: str) -> list[int]:
        """Sequence numbers of the checkpoints kept for the run, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq FROM checkpoints WHERE run_id = ? ORDER BY seq", (run_id,)
            ).fetchall()
        return [r[0] for r in rows]

    def list_runs(self, agent_name: str | None = None) -> list[RunInfo]:
        """Every run (of ``agent_name`` when given), most recently updated first."""
        sql = (
            "SELECT r.run_id, r.agent_name, r.status, r.created, r.updated, r.latest_seq, "
            "(SELECT COUNT(*) FROM checkpoints c WHERE c.run_id = r.run_id) FROM runs r"
        )
        params: tuple[Any, ...] = ()
        if agent_name is not None:
            sql += " WHERE r.agent_name = ?"
            params = (agent_name,)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY r.updated DESC, r.run_id", params).fetchall()
        return [RunInfo(*r) for r in rows]

    # --- helpers ---------------------------------------------------------------------

    @contextlib.contextmanager
    def _transaction(self, write: bool = True) -> Iterator[None]:
        try:
            self._db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        except sqlite3.Error as exc:
            raise CheckpointError(f"checkpoint store {self.path}: {exc}") from exc
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        try:
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._db.execute("ROLLBACK")
            raise CheckpointError(f"checkpoint store {self.path}: commit failed: {exc}") from exc

    def _values_at(self, run_id: str, seq: int) -> list[tuple[str, str, str]]:
        """``(kind, key, text)`` of every key as it was at checkpoint ``seq`` (deleted ones left out)."""
        rows = self._db.execute(
            "SELECT kind, key, value, MAX(seq) FROM run_values WHERE run_id = ? AND seq <= ? "
            "GROUP BY kind, key",
            (run_id, seq),
        ).fetchall()
        return [(kind, key, text) for kind, key, text, _ in rows if text is not None]

    def _load_cache(self, run_id: str, seq: int) -> _RunCache:
        cache = _RunCache(seq=seq, kinds={kind: _Values() for kind in _KINDS})
        for kind, key, text in self._values_at(run_id, seq):
            if kind in cache.kinds:
                cache.kinds[kind].texts[key] = text
        return cache


def _diff(
    cache: _Values, context: Mapping[str, Any], changed_keys: Iterable[str] | None
) -> list[tuple[str, str | None]]:
    """``(key, new JSON text, or None when deleted)`` for every key that changed.

    A value whose fingerprint equals the one it had at the last save is unchanged and is
    not encoded again; a key without a fingerprint is encoded and its text compared. The
    fingerprints are kept in ``cache.prints`` (also for values that did not change).
    """
    if changed_keys is None:
        candidates: Iterable[str] = context
    else:
        candidates = [k for k in set(changed_keys) if k in context]
    writes: list[tuple[str, str | None]] = []
    texts, prints = cache.texts, cache.prints
    for key in candidates:
        if not isinstance(key, str):
            raise CheckpointError(f"context key {key!r} is not a string: context keys are strings")
        value = context[key]
        fp = _fingerprint(value)
        if fp is not None and key in texts and prints.get(key) == fp:
            continue
        try:
            text = values.dumps(value)
        except Exception as exc:
            raise CheckpointError(f"context key {key!r} cannot be checkpointed: {exc}") from exc
        if fp is None:
            prints.pop(key, None)
        else:
            prints[key] = fp
        if text != texts.get(key):
            writes.append((key, text))
    writes.extend((key, None) for key in texts.keys() - context.keys())
    return writes


def _fingerprint(value: Any) -> bytes | None:
    """Bytes equal for two values only if their checkpoint JSON is equal; None when unsure.

    The value's wire form (:func:`agent.values.encode`, exact types, msgpack) is ten times
    faster to make than JSON, so comparing these is how a save of a large, mostly
    unchanged context stays cheap.
    """
    try:
        return values.encode(value)
    except UnencodableValueError:
        return None


def _decode_header(text: str, where: str) -> dict[str, Any]:
    try:
        header = json.loads(text)
    except (ValueError, TypeError, RecursionError) as exc:
        raise CheckpointError(f"{where} is corrupt or truncated ({exc}): delete the run or prune it") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{where} is corrupt: its header is not a JSON object")
    check_format_version(header.get("format_version"))
    return header
