"""SQLiteCheckpointStore: atomic saves of only what changed, retention, corruption, crashes."""

from __future__ import annotations

import math
import os
import re
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.checkpoint import CHECKPOINT_FORMAT_VERSION, AgentCheckpoint
from agent.checkpoint_store import (
    CheckpointStore,
    SQLiteCheckpointStore,
    default_store_path,
    new_run_id,
)
from agent.errors import CheckpointError

from tests.checkpoint.store_writer import expected_context

HERE = Path(__file__).parent


def checkpoint(context: dict[str, Any], *, name: str = "etl", status: str = "running",
               completed: set[str] | None = None) -> AgentCheckpoint:
    return AgentCheckpoint(
        agent_name=name,
        agent_status=status,
        completed_states=completed or set(),
        pending_states=["next"],
        running_states=[],
        state_metadata={"first": {"attempts": 1}},
        context=dict(context),
    )


def rows_at(store: SQLiteCheckpointStore, run_id: str, seq: int) -> dict[str, str | None]:
    with sqlite3.connect(store.path) as db:
        return dict(db.execute(
            "SELECT key, value FROM run_values WHERE run_id = ? AND seq = ? AND kind = 'context'",
            (run_id, seq),
        ).fetchall())


@pytest.fixture
def store(tmp_path):
    with SQLiteCheckpointStore(tmp_path / "cp.sqlite3", keep=None) as s:
        yield s


class TestSave:
    """Each save is one whole checkpoint; only changed context keys are written."""

    def test_round_trip(self, store):
        cp = checkpoint({"a": 1, "b": {"c": (1, 2)}}, completed={"first"})
        assert store.save("r1", cp) == 1
        back = store.latest("r1")
        assert back.context == cp.context
        assert back.completed_states == {"first"}
        assert back.state_metadata == {"first": {"attempts": 1}}
        assert back.run_id == "r1"
        assert isinstance(store, CheckpointStore)

    def test_unknown_run(self, store):
        assert store.latest("nope") is None
        assert store.load("nope", 1) is None

    def test_only_changed_keys_are_written(self, store):
        context = {f"k{i}": {"v": i} for i in range(1000)}
        store.save("r1", checkpoint(context))
        assert len(rows_at(store, "r1", 1)) == 1000
        context["k5"] = {"v": -5}
        context["new"] = [1]
        del context["k7"]
        assert store.save("r1", checkpoint(context)) == 2
        assert rows_at(store, "r1", 2) == {"k5": '{"v":-5}', "new": "[1]", "k7": None}
        assert store.latest("r1").context == context
        assert store.load("r1", 1).context["k5"] == {"v": 5}

    def test_a_store_outliving_many_runs_keeps_no_copy_of_each(self, store):
        """What a run's last save wrote is kept to write only the difference next time: not
        once the run finished, nor for more than a few dozen unfinished runs."""
        big = {"blob": "x" * 10_000}
        for i in range(100):
            store.save(f"done{i}", checkpoint(big))
            store.save(f"done{i}", checkpoint(big, status="completed"))
        assert not store._cache
        for i in range(100):
            store.save(f"open{i}", checkpoint(big))
        assert 0 < len(store._cache) <= 64
        # A finished run resumed saves the difference again, from what the file holds.
        store.save("done0", checkpoint({**big, "more": 1}))
        assert rows_at(store, "done0", 3) == {"more": "1"}

    def test_state_metadata_is_stored_per_state(self, store):
        cp = checkpoint({})
        cp.state_metadata = {f"s{i}": {"status": "pending", "runs": 0} for i in range(50)}
        store.save("r1", cp)
        cp.state_metadata["s3"] = {"status": "completed", "runs": 1}
        del cp.state_metadata["s4"]
        store.save("r1", cp)
        with sqlite3.connect(store.path) as db:
            rows = db.execute("SELECT key, value FROM run_values WHERE kind = 'state' AND seq = 2").fetchall()
        assert sorted(rows) == [("s3", '{"status":"completed","runs":1}'), ("s4", None)]
        assert store.latest("r1").state_metadata == cp.state_metadata
        assert store.load("r1", 1).state_metadata["s3"] == {"status": "pending", "runs": 0}

    def test_in_place_mutation_is_seen_without_a_hint(self, store):
        context = {"rows": [1, 2]}
        store.save("r1", checkpoint(context))
        context["rows"].append(3)
        store.save("r1", checkpoint(context))
        assert store.latest("r1").context["rows"] == [1, 2, 3]

    def test_changed_keys_hint_limits_the_comparison(self, store):
        context = {f"k{i}": i for i in range(10)}
        store.save("r1", checkpoint(context))
        context["k1"] = 100
        context["k2"] = 200  # not in the hint: the caller promised it did not change
        store.save("r1", checkpoint(context), changed_keys=["k1"])
        assert rows_at(store, "r1", 2) == {"k1": "100"}
        del context["k3"]
        store.save("r1", checkpoint(context), changed_keys=[])
        assert rows_at(store, "r1", 3) == {"k3": None}  # deletions are always found

    def test_types_that_compare_equal_are_kept_apart(self, store):
        context: dict[str, Any] = {"a": 1, "b": [1], "c": (1,), "d": {1}}
        store.save("r1", checkpoint(context))
        context.update(a=True, b=[1.0], c=[1], d=frozenset({1}))
        store.save("r1", checkpoint(context))
        back = store.latest("r1").context
        assert [type(back["a"]), type(back["b"][0]), type(back["c"]), type(back["d"])] == [
            bool, float, list, frozenset]

    def test_only_its_owner_reads_it(self, tmp_path):
        # Checkpoints hold whole contexts: a store in a directory others can enter (a
        # /var/lib of the application) must not be readable by them, WAL files included.
        shared = tmp_path / "shared"
        shared.mkdir(mode=0o755)
        os.chmod(shared, 0o755)
        old = os.umask(0o022)
        try:
            with SQLiteCheckpointStore(str(shared / "runs.sqlite3")) as store:
                store.save("r1", checkpoint({"api_key": "k-123"}))
                files = sorted(shared.iterdir())
                assert {f.name for f in files} >= {"runs.sqlite3", "runs.sqlite3-wal"}
                assert all(f.stat().st_mode & 0o077 == 0 for f in files), [oct(f.stat().st_mode) for f in files]
        finally:
            os.umask(old)

    def test_wal_mode(self, store):
        with sqlite3.connect(store.path) as db:
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"

    def test_run_of_another_agent_is_refused(self, store):
        store.save("r1", checkpoint({}, name="etl"))
        with pytest.raises(CheckpointError, match="belongs to agent 'etl', not 'billing'"):
            store.save("r1", checkpoint({}, name="billing"))
        assert store.checkpoints("r1") == [1]

    def test_failed_save_writes_nothing(self, store):
        context: dict[str, Any] = {"a": 1}
        store.save("r1", checkpoint(context))
        context["a"] = 2
        context["bad"] = object()
        with pytest.raises(CheckpointError, match="'bad' cannot be checkpointed"):
            store.save("r1", checkpoint(context))
        assert store.checkpoints("r1") == [1]
        assert store.latest("r1").context == {"a": 1}
        del context["bad"]
        assert store.save("r1", checkpoint(context)) == 2
        assert store.latest("r1").context == {"a": 2}

    def test_two_writers_on_one_file(self, tmp_path):
        path = tmp_path / "shared.sqlite3"
        with SQLiteCheckpointStore(path) as one, SQLiteCheckpointStore(path) as two:
            one.save("r", checkpoint({"a": 1, "b": 1}))
            two.save("r", checkpoint({"a": 2, "b": 1}))
            one.save("r", checkpoint({"a": 2, "b": 3}), changed_keys=["b"])
            assert two.latest("r").context == {"a": 2, "b": 3}
            assert one.checkpoints("r") == [1, 2, 3]

    @pytest.mark.parametrize("bad", ["", None, 5])
    def test_run_id_must_be_text(self, store, bad):
        with pytest.raises(CheckpointError, match="run_id"):
            store.save(bad, checkpoint({}))

    def test_list_and_delete_runs(self, store):
        store.save("a", checkpoint({}, name="etl", status="running"))
        store.save("b", checkpoint({}, name="other", status="completed"))
        store.save("a", checkpoint({}, name="etl", status="completed"))
        runs = {r.run_id: r for r in store.list_runs()}
        assert (runs["a"].agent_name, runs["a"].status, runs["a"].latest_seq, runs["a"].checkpoints) == (
            "etl", "completed", 2, 2)
        assert [r.run_id for r in store.list_runs(agent_name="other")] == ["b"]
        assert store.delete_run("a") is True
        assert store.delete_run("a") is False
        assert store.latest("a") is None
        assert [r.run_id for r in store.list_runs()] == ["b"]

    def test_new_run_ids_differ(self):
        assert len({new_run_id() for _ in range(100)}) == 100


class TestRetention:
    """Old checkpoints go; every kept one still reads back whole."""

    def test_keep_bounds_the_checkpoints(self, tmp_path):
        with SQLiteCheckpointStore(tmp_path / "cp.sqlite3", keep=3) as store:
            for n in range(10):
                store.save("r", checkpoint({"n": n, "fixed": "x"}))
            assert store.checkpoints("r") == [8, 9, 10]
            assert [store.load("r", s).context for s in (8, 9, 10)] == [
                {"n": n, "fixed": "x"} for n in (7, 8, 9)]
            with sqlite3.connect(store.path) as db:
                count = db.execute("SELECT COUNT(*) FROM run_values WHERE kind = 'context'").fetchone()[0]
            assert count == 4  # "fixed" once, "n" for each kept checkpoint

    def test_prune(self, store):
        for n in range(5):
            store.save("r", checkpoint({"n": n}))
        assert store.prune("r", keep=2) == 3
        assert store.checkpoints("r") == [4, 5]
        assert store.prune("r", keep=2) == 0
        assert store.prune("unknown", keep=1) == 0
        with pytest.raises(CheckpointError, match="keep at least 1"):
            store.prune("r", keep=0)
        with pytest.raises(CheckpointError, match="keep at least 1"):
            SQLiteCheckpointStore(":memory:", keep=0)

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(
        keep=st.none() | st.integers(1, 4),
        steps=st.lists(
            st.tuples(
                st.dictionaries(st.sampled_from("abcdef"), st.none() | st.integers(0, 3), max_size=4),
                st.none() | st.integers(1, 3),
                st.booleans(),
            ),
            min_size=1,
            max_size=15,
        ),
    )
    def test_every_kept_checkpoint_reads_back(self, tmp_path_factory, keep, steps):
        path = tmp_path_factory.mktemp("retention") / "cp.sqlite3"
        expected: dict[int, dict[str, Any]] = {}
        context: dict[str, Any] = {}
        with SQLiteCheckpointStore(path, keep=keep) as store:
            for changes, prune_to, hint in steps:
                for key, value in changes.items():
                    if value is None:
                        context.pop(key, None)
                    else:
                        context[key] = value
                seq = store.save("r", checkpoint(context), changed_keys=list(changes) if hint else None)
                expected[seq] = dict(context)
                if prune_to is not None:
                    store.prune("r", keep=prune_to)
            kept = store.checkpoints("r")
            assert kept[-1] == len(steps)
            assert kept == list(range(kept[0], len(steps) + 1))
            for seq in kept:
                assert store.load("r", seq).context == expected[seq]


class TestCorruption:
    """Corrupt rows raise CheckpointError naming the row; the store and other runs stay usable."""

    def corrupt(self, store, sql: str, *args: Any) -> None:
        with sqlite3.connect(store.path) as db:
            db.execute(sql, args)

    def test_corrupt_header(self, store):
        store.save("good", checkpoint({"a": 1}))
        store.save("bad", checkpoint({"a": 1}))
        self.corrupt(store, "UPDATE checkpoints SET header = '{\"format_ver' WHERE run_id = 'bad'")
        with pytest.raises(CheckpointError, match="checkpoint 1 of run bad .* corrupt or truncated"):
            store.latest("bad")
        assert store.latest("good").context == {"a": 1}
        with SQLiteCheckpointStore(store.path) as reopened:
            assert reopened.latest("good").context == {"a": 1}
            assert reopened.delete_run("bad")
            assert reopened.latest("bad") is None

    def test_corrupt_context_value(self, store):
        store.save("r", checkpoint({"a": 1, "b": 2}))
        self.corrupt(store, "UPDATE run_values SET value = '[1,' WHERE key = 'b'")
        with pytest.raises(CheckpointError, match="context key 'b' is corrupt"):
            store.latest("r")

    def test_header_of_wrong_shape(self, store):
        store.save("r", checkpoint({}))
        self.corrupt(store, "UPDATE checkpoints SET header = json_remove(header, '$.agent_name')")
        with pytest.raises(CheckpointError, match="missing agent_name"):
            store.latest("r")

    def test_checkpoint_from_a_newer_release(self, store):
        store.save("r", checkpoint({}))
        self.corrupt(store, "UPDATE checkpoints SET header = json_set(header, '$.format_version', ?)",
                     CHECKPOINT_FORMAT_VERSION + 1)
        with pytest.raises(CheckpointError, match="newer release"):
            store.latest("r")

    def test_file_that_is_not_a_database(self, tmp_path):
        path = tmp_path / "cp.sqlite3"
        path.write_bytes(b"this is not sqlite" * 100)
        with pytest.raises(CheckpointError, match="not a usable checkpoint database.*move it away"):
            SQLiteCheckpointStore(path)
        assert path.read_bytes() == b"this is not sqlite" * 100

    def test_store_from_a_newer_release(self, tmp_path):
        path = tmp_path / "cp.sqlite3"
        SQLiteCheckpointStore(path).close()
        with sqlite3.connect(path) as db:
            db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
        with pytest.raises(CheckpointError, match="schema version '99'.*upgrade"):
            SQLiteCheckpointStore(path)


class TestArguments:
    """A wrong ``keep``, ``durable`` or path is refused when the store is made, before any file is."""

    @pytest.mark.parametrize("keep,shown", [
        (math.nan, "float nan"), (2.5, "float 2.5"), (True, "bool True"), (False, "bool False"), ("x", "str 'x'"),
        ("3", "str '3'"), (math.inf, "float inf"),
    ])
    def test_keep_must_be_an_int(self, tmp_path, keep, shown):
        path = tmp_path / "cp.sqlite3"
        with pytest.raises(CheckpointError, match=re.escape(
                f"keep must be an int, got {shown}: keep at least 1 checkpoint per run, or None for all")):
            SQLiteCheckpointStore(path, keep=keep)
        assert not path.exists()

    def test_prune_keep_must_be_an_int(self, store):
        store.save("r", checkpoint({}))
        with pytest.raises(CheckpointError, match="keep must be an int, got float 1.5: keep at least 1 checkpoint, "
                                                  "or delete_run"):
            store.prune("r", keep=1.5)
        assert store.checkpoints("r") == [1]

    @pytest.mark.parametrize("keep", [1, 20, None])
    def test_good_keep(self, keep):
        with SQLiteCheckpointStore(":memory:", keep=keep) as store:
            assert store.keep == keep

    def test_durable_must_be_a_bool(self, tmp_path):
        with pytest.raises(CheckpointError, match=r"SQLiteCheckpointStore\(durable=...\) must be True or False, "
                                                  "got str 'no'"):
            SQLiteCheckpointStore(tmp_path / "cp.sqlite3", durable="no")

    def test_empty_path_is_refused(self):
        """SQLite makes "" a private temporary database: every checkpoint would be lost."""
        with pytest.raises(CheckpointError, match=r"SQLiteCheckpointStore\(path=''\) names no file .*: give the "
                                                  "path of an SQLite file"):
            SQLiteCheckpointStore("")

    def test_path_of_another_type_is_refused(self, tmp_path, monkeypatch):
        monkeypatch.chdir(tmp_path)
        with pytest.raises(CheckpointError, match=r"SQLiteCheckpointStore\(path=...\) must be the path of an SQLite "
                                                  r"file \(str or os.PathLike\), or None for the default store, "
                                                  r"got int 5"):
            SQLiteCheckpointStore(5)  # type: ignore[arg-type]
        assert list(tmp_path.iterdir()) == []  # no file named "5"

    def test_agent_with_an_empty_store_path_is_refused(self):
        from agent import Agent, AgentError

        with pytest.raises(AgentError, match="''"):
            Agent("cs", isolation="inline", checkpoint_store="")


class TestDefaultPath:
    """$AGENT_STATE_DIR wins, else the XDG-style state directory under home."""

    def test_state_dir(self, monkeypatch, tmp_path):
        monkeypatch.setenv("AGENT_STATE_DIR", str(tmp_path / "state"))
        assert default_store_path() == tmp_path / "state" / "checkpoints.sqlite3"
        with SQLiteCheckpointStore() as store:
            store.save("r", checkpoint({}))
        assert (tmp_path / "state" / "checkpoints.sqlite3").exists()
        assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700

    def test_home(self, monkeypatch, tmp_path):
        monkeypatch.delenv("AGENT_STATE_DIR", raising=False)
        monkeypatch.setenv("HOME", str(tmp_path))
        assert default_store_path() == tmp_path / ".local/state/agent/checkpoints.sqlite3"


class TestCrash:
    """A writer killed with SIGKILL mid-save leaves the last committed checkpoint whole."""

    def writer(self, path: Path, first: int) -> subprocess.Popen[str]:
        env = dict(os.environ, PYTHONPATH=str(HERE.parent.parent))
        return subprocess.Popen(
            [sys.executable, str(HERE / "store_writer.py"), str(path), "crash-run", str(first)],
            stdout=subprocess.PIPE, text=True, env=env,
        )

    def run_until(self, proc: subprocess.Popen[str], step: int) -> int:
        """Read committed steps until ``step``, then SIGKILL the writer; returns the last one seen."""
        last = 0
        try:
            for line in proc.stdout:  # bounded: the writer prints one line per step
                last = int(line.split()[0])
                if last >= step:
                    break
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            proc.stdout.close()
        assert proc.returncode == -signal.SIGKILL
        return last

    def check(self, path: Path, at_least: int) -> int:
        with SQLiteCheckpointStore(path, keep=5) as store:
            cp = store.latest("crash-run")
            (completed,) = cp.completed_states
            n = int(completed.removeprefix("s"))
            assert n >= at_least  # nothing committed was lost
            assert cp.context == expected_context(n)  # and the checkpoint is one whole step
            assert len(store.checkpoints("crash-run")) <= 5
        return n

    def test_kill_during_saves(self, tmp_path):
        path = tmp_path / "crash.sqlite3"
        first = 1
        for target in (150, 400, 700):
            seen = self.run_until(self.writer(path, first), target)
            n = self.check(path, seen)
            first = n + 1  # the next writer resumes where the store says
        assert first > 700
