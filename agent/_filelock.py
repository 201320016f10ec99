"""An exclusive lock on a file that exists only while it is held (``flock``, never waiting).

The holder removes the file before it unlocks: a process that opened the old file meanwhile
then holds a lock on a file nobody sees, which :func:`try_lock` notices (the path names
another inode, or none) and tries again. A lock dies with its process, so a crash never
keeps one; the file a crashed holder left says so to the next taker.
"""

from __future__ import annotations

import fcntl
import os


def try_lock(path: str) -> tuple[int, bool] | None:
    """(descriptor, whether a holder that crashed left the file) once locked; None when taken."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            left_by_crash = False
        except FileExistsError:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
            except FileNotFoundError:
                continue  # released meanwhile: create it afresh
            left_by_crash = True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd, left_by_crash
        except FileNotFoundError:
            pass
        os.close(fd)  # its holder removed it between our open and flock: take the one there now


def unlock(path: str, fd: int) -> None:
    """Remove ``path``, then release its lock (``fd``): in that order, see the module doc."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    os.close(fd)
