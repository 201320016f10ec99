"""Which block devices an attempt's IO lands on, for the byte/iops throttles and weights.

IO throttles are set per whole disk (the kernel refuses partitions). The disk is the
one holding the given paths (the working directory, the root); when none of them is on
a block device (tmpfs, overlay, a guest's 9p root) every physical disk is used instead.
"""

from __future__ import annotations

import os
import stat

_SYS_DEV_BLOCK = "/sys/dev/block"


def whole_disk(major: int, minor: int) -> tuple[int, int] | None:
    """The disk holding block device ``major:minor`` (itself, or a partition's parent)."""
    node = f"{_SYS_DEV_BLOCK}/{major}:{minor}"
    if not os.path.exists(node):
        return None
    if os.path.exists(f"{node}/partition"):
        node = os.path.realpath(f"{node}/..")
    try:
        with open(f"{node}/dev") as f:
            text = f.read().strip()
    except OSError:
        return None
    maj, _, mino = text.partition(":")
    return int(maj), int(mino)


def physical_disks() -> list[tuple[int, int]]:
    """Every disk backed by a device (no loop, ram, zram, device-mapper stacking)."""
    disks = []
    try:
        names = sorted(os.listdir("/sys/block"))
    except OSError:
        return []
    for name in names:
        if name.startswith(("loop", "ram", "zram", "dm-", "md", "nbd")):
            continue
        if not os.path.exists(f"/sys/block/{name}/device"):
            continue
        try:
            with open(f"/sys/block/{name}/dev") as f:
                maj, _, mino = f.read().strip().partition(":")
            disks.append((int(maj), int(mino)))
        except OSError:
            continue
    return disks


def disks_for(paths: list[str]) -> tuple[tuple[int, int], ...]:
    """Whole disks holding ``paths`` (or that are ``paths``, for device nodes).

    Every physical disk when none of the paths is on a block device.
    """
    found: list[tuple[int, int]] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            continue
        dev = st.st_rdev if stat.S_ISBLK(st.st_mode) else st.st_dev
        disk = whole_disk(os.major(dev), os.minor(dev))
        if disk is not None and disk not in found:
            found.append(disk)
    if not found:
        found = physical_disks()
    return tuple(found)


def scheduler(major: int, minor: int) -> str | None:
    """The active IO scheduler of a disk (``mq-deadline``, ``bfq``, ``none``), or None."""
    try:
        with open(f"{_SYS_DEV_BLOCK}/{major}:{minor}/queue/scheduler") as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if start >= 0 and end > start else text.strip() or None
