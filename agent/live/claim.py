"""One process at a time resumes a run: a lock held for as long as it runs it here.

Two resumes of one run started together each asked the others whether the run was live
(:func:`agent.live.client.live_run_ids`) before either had registered it, and both ran
every state. Each resume now first takes an exclusive lock on a file named for the run
in this user's runtime directory (:mod:`agent._filelock`), without waiting: one that
finds it taken is refused, as one that finds the run live is. The lock goes with the
process that holds it (a crash releases it), and the file is removed when it is released.
"""

from __future__ import annotations

import hashlib
import os

from .._filelock import try_lock, unlock
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
        locked = try_lock(self.path)
        if locked is None:
            return False
        self._fd = locked[0]
        return True

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            unlock(self.path, fd)
