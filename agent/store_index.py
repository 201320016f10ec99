"""The checkpoint stores this user's programs have opened, so ``agent runs`` and ``agent top`` find them.

A :class:`~agent.checkpoint_store.SQLiteCheckpointStore` adds its path to a small text
file beside the default store (``$AGENT_STATE_DIR/stores``, one absolute path a line)
the first time it is opened; ``agent runs`` then lists the runs of every store still
there, not only the default one. Appending one short line is atomic, so processes may
share the file; paths whose file is gone are dropped when the index is read.
"""

from __future__ import annotations

import os
from pathlib import Path


def index_path() -> Path:
    from .checkpoint_store import default_store_path

    return default_store_path().parent / "stores"


def remember(path: str | os.PathLike[str]) -> None:
    """Add ``path`` to the index (once); never raises: the index only helps find runs."""
    target = os.path.abspath(os.fspath(path))
    index = index_path()
    try:
        if target in _read(index):
            return
        index.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(index, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, (target + "\n").encode("utf-8", "surrogateescape"))
        finally:
            os.close(fd)
    except OSError:
        pass


def known_stores() -> list[Path]:
    """The default store (when it exists) and every indexed store that still exists."""
    from .checkpoint_store import default_store_path

    index = index_path()
    listed = _read(index)
    alive = [p for p in listed if os.path.isfile(p)]
    if len(alive) < len(listed):
        _rewrite(index, alive)
    out: list[Path] = []
    for candidate in [str(default_store_path()), *alive]:
        path = Path(os.path.abspath(candidate))
        if path.is_file() and path not in out:
            out.append(path)
    return out


def _read(index: Path) -> list[str]:
    try:
        text = index.read_bytes().decode("utf-8", "surrogateescape")
    except OSError:
        return []
    return list(dict.fromkeys(line for line in text.splitlines() if line.strip()))


def _rewrite(index: Path, paths: list[str]) -> None:
    temporary = index.with_name(f".{index.name}.{os.getpid()}")
    try:
        temporary.write_bytes("".join(p + "\n" for p in paths).encode("utf-8", "surrogateescape"))
        os.replace(temporary, index)
    except OSError:
        temporary.unlink(missing_ok=True)
