"""Pinning a child to the GPUs admission assigned it: CUDA's environment and the devices cgroup.

Admission (:mod:`agent.engine.admission`, over :mod:`agent.devices`) decides which GPUs
an attempt gets; the attempt carries their UUIDs and ``/dev/nvidia<N>`` minors in
``Attempt.assignment``. Here they become:

* ``CUDA_VISIBLE_DEVICES`` (the UUIDs) and ``CUDA_DEVICE_ORDER=PCI_BUS_ID``;
* on cgroup v1, a devices cgroup with a closed policy (like systemd's
  ``DevicePolicy=closed``): the usual pseudo-devices, the NVIDIA control nodes when
  the attempt has GPUs, and exactly the assigned ``/dev/nvidia<N>``; every other device
  node, other GPUs included, is denied with EPERM.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Sequence

from ..devices import (
    GPUAllocator, GPUDevice, GPUInventory, NvmlInventory, StaticInventory, assignment, machine_inventory,
)

__all__ = [
    "GPUAllocator", "GPUDevice", "GPUInventory", "NVIDIA_DEVICE_MAJOR", "NvmlInventory", "StaticInventory",
    "assignment", "device_minors", "device_rules", "machine_gpu_minors", "machine_inventory", "pinning_env",
]

NVIDIA_DEVICE_MAJOR = 195
"""Character-device major of ``/dev/nvidia<N>``, ``/dev/nvidiactl`` and ``/dev/nvidia-modeset``."""

# /dev/nvidiactl and /dev/nvidia-modeset share the major; only /dev/nvidia<N> are GPUs.
NVIDIA_CONTROL_MINORS = (254, 255)

BASE_DEVICES = (
    "c 1:3 rwm",  # /dev/null
    "c 1:5 rwm",  # /dev/zero
    "c 1:7 rwm",  # /dev/full
    "c 1:8 rwm",  # /dev/random
    "c 1:9 rwm",  # /dev/urandom
    "c 5:0 rwm",  # /dev/tty
    "c 5:2 rwm",  # /dev/ptmx
    "c 136:* rwm",  # /dev/pts/*
)
"""What every confined child may open (systemd's closed device policy, plus ptys)."""


def pinning_env(uuids: Sequence[str]) -> dict[str, str]:
    """Environment that makes CUDA see exactly these GPUs (none when empty), by UUID."""
    return {"CUDA_VISIBLE_DEVICES": ",".join(uuids), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


def device_minors(devices: Iterable[GPUDevice]) -> list[int]:
    """Minor numbers of ``/dev/nvidia<N>`` for ``devices``."""
    return sorted(d.minor_number for d in devices)


def _char_majors(names: Sequence[str]) -> list[int]:
    """Majors of the named character drivers in /proc/devices (e.g. nvidia-uvm)."""
    found = []
    try:
        with open("/proc/devices", encoding="ascii") as f:
            section = ""
            for line in f:
                if line.endswith(":\n"):
                    section = line
                    continue
                parts = line.split()
                if section.startswith("Character") and len(parts) == 2 and parts[1] in names:
                    found.append(int(parts[0]))
    except OSError:
        pass
    return found


def device_rules(minors: Iterable[int]) -> tuple[str, ...]:
    """The closed devices policy for a child given the GPUs with these minors."""
    minors = sorted(set(minors))
    if not minors:
        return BASE_DEVICES
    rules = list(BASE_DEVICES)
    rules += [f"c {NVIDIA_DEVICE_MAJOR}:{m} rwm" for m in NVIDIA_CONTROL_MINORS]
    rules += [f"c {major}:* rwm" for major in _char_majors(("nvidia-uvm", "nvidia-caps"))]
    rules += [f"c {NVIDIA_DEVICE_MAJOR}:{m} rwm" for m in minors]
    return tuple(rules)


def machine_gpu_minors() -> list[int]:
    """Minors of every GPU on the machine: ``/dev/nvidia<N>`` nodes and the inventory."""
    minors = set()
    for path in glob.glob("/dev/nvidia[0-9]*"):
        try:
            rdev = os.stat(path).st_rdev
        except OSError:
            continue
        if os.major(rdev) == NVIDIA_DEVICE_MAJOR and os.minor(rdev) not in NVIDIA_CONTROL_MINORS:
            minors.add(os.minor(rdev))
    minors.update(device_minors(machine_inventory().devices()))
    return sorted(minors)
