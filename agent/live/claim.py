"""One process at a time resumes a run: a lock held for as long as it runs it here.

Two resumes of one run started together each asked the others whether the run was live
(:func:`agent.live.client.live_run_ids`) before either had registered it, and both ran
every state. Each resume now first takes an exclusive ``flock`` on a file named for the
run in this user's runtime directory, without waiting: one that finds it taken is
refused, as one that finds the run live is. The lock goes with the process that holds
it (a crash releases it), and the file is removed when it is released.
"""

from __future__ import annotations

import fcntl
import hashlib
import os

from . import protocol


class RunClaim:
    """The lock on one run id, held from :meth:`take` to :meth:`release`."""

    def __init__(self, run_id: str, directory: str | None = None) -> None:
        name = hashlib.sha256(run_id.encode(errors="surrogatepass")).hexdigest()[:32]
        self.path = os.path.join(directory or protocol.runtime_dir(), f"{name}.resume.lock")
        self._fd: int | None = None

    def take(self) -> bool:
        """Take it; False when another process holds it."""
        protocol.ensure_private(os.path.dirname(self.path))
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            try:
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    self._fd = fd
                    return True
            except FileNotFoundError:
                pass
            os.close(fd)  # its holder removed it as we opened it: take the one there now

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.unlink(self.path)  # while still held: a taker of the old file sees it is gone
        except OSError:
            pass
        os.close(fd)
