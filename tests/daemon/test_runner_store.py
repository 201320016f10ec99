"""A runner opens its job's checkpoint store in a thread while it starts; what that thread meets reaches the job."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.daemon.runner import StoreOpening
from agent.errors import CheckpointError


def test_the_store_opened_aside_is_the_jobs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENT_STATE_DIR", str(tmp_path))
    store = StoreOpening().result()
    try:
        assert store.path == str(tmp_path / "checkpoints.sqlite3")
        assert store.list_runs() == []
    finally:
        store.close()


def test_an_unusable_store_fails_in_the_runners_own_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENT_STATE_DIR", str(tmp_path))
    (tmp_path / "checkpoints.sqlite3").write_bytes(b"not a database" * 100)
    opening = StoreOpening()
    with pytest.raises(CheckpointError, match="not a usable checkpoint database"):
        opening.result()
