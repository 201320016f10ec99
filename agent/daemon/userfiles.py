"""Reading a job's files as root without being tricked: agentd serves logs the user's runner wrote.

A job's log directory belongs to its user, who could replace anything in it with a
symbolic link (to ``/etc/shadow``), a hard link, a FIFO or a device. So every path is
walked one component at a time from a directory only root controls, with
``O_NOFOLLOW`` (a link is refused, not followed) and ``O_NONBLOCK`` (a FIFO cannot hang
agentd), and the file must be a regular file owned by the job's uid (a hard link to
someone else's file is not).
"""

from __future__ import annotations

import os
import stat

from ..errors import JobError

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _check_part(part: str) -> None:
    if not part or part in (".", "..") or "/" in part or "\0" in part:
        raise JobError(f"invalid path component {part!r}")


def _open_dir(base: str, parts: list[str]) -> int:
    fd = os.open(base, _DIR)
    try:
        for part in parts:
            _check_part(part)
            nfd = os.open(part, _DIR, dir_fd=fd)
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


def list_dir(base: str, parts: list[str]) -> list[str]:
    """Names in ``base/parts...`` (links along the way refused); [] when it does not exist."""
    try:
        fd = _open_dir(base, parts)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise JobError(f"cannot read the job's files: {exc.strerror}") from None
    try:
        return os.listdir(fd)
    finally:
        os.close(fd)


def read_file(base: str, parts: list[str], uid: int, offset: int = 0, limit: int = 1 << 20) -> tuple[bytes, int]:
    """Up to ``limit`` bytes of ``base/parts...`` from ``offset``, and the file's size.

    Raises FileNotFoundError when it does not exist and JobError when it is not a
    regular file of ``uid`` reached without links.
    """
    *dirs, name = parts
    _check_part(name)
    try:
        dfd = _open_dir(base, dirs)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise JobError(f"refused to read {'/'.join(parts)}: {exc.strerror}") from None
    try:
        try:
            fd = os.open(name, _FILE, dir_fd=dfd)
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise JobError(f"refused to read {'/'.join(parts)}: {exc.strerror}") from None
    finally:
        os.close(dfd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != uid:
            raise JobError(f"refused to read {'/'.join(parts)}: not a regular file of the job's user")
        data = os.pread(fd, limit, offset) if offset < st.st_size else b""
        return data, st.st_size
    finally:
        os.close(fd)
