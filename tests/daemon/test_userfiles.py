"""agentd reads a job's logs as root: links, FIFOs and other users' files planted there are refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.daemon.userfiles import list_dir, read_file
from agent.errors import JobError

UID = 3199  # the job's user (no account needed: only ownership matters)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give files away")


@pytest.fixture
def logs(tmp_path: Path) -> Path:
    """<logs>/7/ owned by the job's user, holding a log of theirs."""
    job = tmp_path / "7"
    job.mkdir()
    (job / "runner.log").write_text("hello\n")
    for path in (job, job / "runner.log"):
        os.chown(path, UID, UID)
    return tmp_path


class TestReadUserFile:
    def test_reads_the_users_own_file_from_an_offset(self, logs: Path) -> None:
        assert read_file(str(logs), ["7", "runner.log"], UID) == (b"hello\n", 6)
        assert read_file(str(logs), ["7", "runner.log"], UID, offset=2) == (b"llo\n", 6)
        assert read_file(str(logs), ["7", "runner.log"], UID, offset=99) == (b"", 6)
        assert list_dir(str(logs), ["7"]) == ["runner.log"]

    def test_a_symlink_to_a_secret_is_refused(self, logs: Path) -> None:
        secret = logs / "secret"
        secret.write_text("root only\n")
        (logs / "7" / "runner.log").unlink()
        (logs / "7" / "runner.log").symlink_to(secret)
        with pytest.raises(JobError, match="refused"):
            read_file(str(logs), ["7", "runner.log"], UID)

    def test_a_symlinked_directory_is_refused(self, logs: Path) -> None:
        (logs / "8").symlink_to(logs / "7")
        with pytest.raises(JobError, match="refused"):
            read_file(str(logs), ["8", "runner.log"], UID)

    def test_a_hard_link_to_another_users_file_is_refused(self, logs: Path) -> None:
        secret = logs / "secret"
        secret.write_text("root only\n")
        os.link(secret, logs / "7" / "stolen.log")
        with pytest.raises(JobError, match="not a regular file of the job's user"):
            read_file(str(logs), ["7", "stolen.log"], UID)

    def test_a_fifo_does_not_hang_agentd(self, logs: Path) -> None:
        os.mkfifo(logs / "7" / "fifo.log")
        os.chown(logs / "7" / "fifo.log", UID, UID)
        with pytest.raises(JobError, match="not a regular file"):
            read_file(str(logs), ["7", "fifo.log"], UID)

    @pytest.mark.parametrize("parts", [["7", ".."], ["..", "7", "runner.log"], ["7/runner.log"], ["7", ""]])
    def test_path_tricks_are_refused(self, logs: Path, parts: list[str]) -> None:
        with pytest.raises(JobError, match="invalid path component"):
            read_file(str(logs), parts, UID)

    def test_missing_file(self, logs: Path) -> None:
        with pytest.raises(FileNotFoundError):
            read_file(str(logs), ["7", "nope.log"], UID)
        assert list_dir(str(logs), ["9"]) == []


class TestTheJobsTmp:
    """``<jobs>/<id>/tmp`` is made as root in a directory its user owns: no link they plant
    there, even one swapped in while it is made, makes root remove or give away anything else."""

    @staticmethod
    def fresh_tmp(jobs: Path) -> str:
        from types import SimpleNamespace

        from agent.daemon.supervise import JobSupervisor

        return JobSupervisor._fresh_tmp(SimpleNamespace(jobs_dir=str(jobs)),  # type: ignore[arg-type]
                                        SimpleNamespace(id="7", uid=UID, gid=UID))  # type: ignore[arg-type]

    @pytest.fixture
    def secret(self, tmp_path: Path) -> Path:
        path = tmp_path / "secret"
        path.mkdir(mode=0o700)
        (path / "key").write_text("root's")
        return path

    def test_made_for_the_user(self, logs: Path) -> None:
        made = self.fresh_tmp(logs)
        assert made == str(logs / "7" / "tmp") and os.stat(made).st_uid == UID and os.listdir(made) == []

    def test_a_link_left_in_its_place_is_removed_not_followed(self, logs: Path, secret: Path) -> None:
        (logs / "7" / "tmp").symlink_to(secret)
        made = self.fresh_tmp(logs)
        assert not os.path.islink(made) and os.stat(made).st_uid == UID
        assert os.stat(secret).st_uid == 0 and (secret / "key").read_text() == "root's"

    def test_a_link_swapped_in_as_it_is_made_gets_nothing(self, logs: Path, secret: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
        real_mkdir = os.mkdir

        def then_swap(path, mode=0o777, *, dir_fd=None):  # the user, between root's mkdir and chown
            real_mkdir(path, mode, dir_fd=dir_fd)
            os.rmdir(path, dir_fd=dir_fd)
            os.symlink(secret, path, dir_fd=dir_fd)

        monkeypatch.setattr(os, "mkdir", then_swap)
        with pytest.raises(OSError):
            self.fresh_tmp(logs)
        assert os.stat(secret).st_uid == 0 and os.stat(secret / "key").st_uid == 0
