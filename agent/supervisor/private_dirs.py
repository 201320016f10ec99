"""The temporary directories a process's supervisor makes for itself, and their sweep.

Each is ``<temp dir>/agent-KIND-PID-START-XXXXXXXX`` (its socket directory, its attempt
logs), mode 0700, named as its cgroups are (:class:`~.cgroups.base.SupervisorName`: the
pid and start time of the process that made it). That process removes it when it shuts
down, and its zygote does for a process killed outright. Where both are killed at once
(kill -9 of a whole tree, as Ray does to a worker's children), nothing is left to do it:
so a directory of a kind is made only after removing this user's others of that kind
whose process is gone.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from .cgroups.base import SupervisorName


def make_private_dir(kind: str) -> str:
    """A new private directory of ``kind`` (``ipc``, ``logs``), after the sweep of stale ones."""
    sweep_stale(kind)
    me = SupervisorName.mine()
    path = tempfile.mkdtemp(prefix=f"agent-{kind}-{me.pid}-{me.start}-")
    os.chmod(path, 0o700)
    return path


def sweep_stale(kind: str, root: str | None = None) -> list[str]:
    """Remove this user's directories of ``kind`` whose process is gone; returns their paths."""
    prefix = f"agent-{kind}-"
    uid = os.getuid()
    removed = []
    try:
        entries = list(os.scandir(root or tempfile.gettempdir()))
    except OSError:
        return removed
    for entry in entries:
        owner = SupervisorName.parse(entry.name[len(prefix):]) if entry.name.startswith(prefix) else None
        if owner is None or owner.alive():
            continue
        try:
            if not entry.is_dir(follow_symlinks=False) or entry.stat(follow_symlinks=False).st_uid != uid:
                continue
        except OSError:
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(entry.path)
    return removed
