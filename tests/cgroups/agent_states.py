"""State functions for the Agent-level limit tests.

Kept apart from the test module so a child that imports them by reference loads
nothing but this file.
"""

from __future__ import annotations

import asyncio
import os

MiB = 1024 * 1024


async def hog(context):
    block = b"\x01" * (200 * MiB)
    context.set_state("allocated", len(block))
    return None


async def modest(context):
    block = b"\x01" * (16 * MiB)
    context.set_state("allocated", len(block))
    return None


async def bomb(context):
    children = []
    hold_r, _hold_w = os.pipe()  # nobody writes: every bomb process blocks until killed
    try:
        while True:
            pid = os.fork()
            if pid == 0:
                os.read(hold_r, 1)
                os._exit(0)
            children.append(pid)
    finally:
        context.set_state("forked", len(children))


async def stubborn_bomb(context):
    hold_r, _hold_w = os.pipe()
    while True:  # a refused fork is ignored: it never fails by itself
        try:
            if os.fork() == 0:
                os.read(hold_r, 1)
                os._exit(0)
        except OSError:
            await asyncio.sleep(0.001)


async def nothing(context):
    return None
