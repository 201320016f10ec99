"""On a machine with an NVIDIA driver: the NVML inventory, and a state that sees exactly its GPU.

Skipped where NVML finds no GPU. Run there as ``pytest tests/gpu -q`` (root, for the
devices cgroup). What each test proves:

* the inventory comes from NVML (real UUIDs, minors, memory);
* an isolated state granted one GPU sees exactly that UUID, from CUDA's variables, from
  ``nvidia-smi -L`` and from the CUDA driver itself (``cuDeviceGetCount`` through
  ``libcuda``), and on cgroup v1 cannot open another GPU's ``/dev/nvidia<N>``;
* a state granted no GPU sees none.
"""

from __future__ import annotations

import os
import shutil

import pytest

from agent import Agent, ResourcePool, ResourceRequirements
from agent.devices import NvmlInventory

pytestmark = pytest.mark.gpu

_INVENTORY = NvmlInventory()
_DEVICES = _INVENTORY.devices()
if not _DEVICES:
    pytest.skip(f"no NVIDIA GPU here: {_INVENTORY.unavailable_reason}", allow_module_level=True)


def gpu(units: float) -> ResourceRequirements:
    return ResourceRequirements(cpu_units=1, memory_mb=2048, io_weight=0, network_weight=0, gpu_units=units)


async def look_at_gpus(context):
    """Everything this process can tell about the GPUs it may use."""
    import ctypes
    import errno
    import glob
    import os
    import subprocess

    seen = {"visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "order": os.environ.get("CUDA_DEVICE_ORDER")}
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60)
        seen["smi"] = listing.stdout
    except FileNotFoundError:
        seen["smi"] = None
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
        count = ctypes.c_int(-1)
        seen["cu_init"] = cuda.cuInit(0)
        seen["cu_count_rc"] = cuda.cuDeviceGetCount(ctypes.byref(count))
        seen["cu_count"] = count.value
    except OSError as exc:
        seen["cu_init"] = f"no libcuda: {exc}"
    opened = {}
    for path in sorted(glob.glob("/dev/nvidia[0-9]*")):
        try:
            fd = os.open(path, os.O_RDWR)
            os.close(fd)
            opened[path] = 0
        except OSError as exc:
            opened[path] = exc.errno
    seen["opened"] = opened
    seen["eperm"] = errno.EPERM
    context.set_state(f"seen_{context.state_name}", seen)


class TestInventory:
    """NVML lists the real GPUs."""

    def test_devices_look_real(self) -> None:
        for d in _DEVICES:
            assert d.uuid.startswith(("GPU-", "MIG-"))
            assert d.memory_total_mb > 0 and d.minor_number >= 0
        assert ResourcePool().totals  # the default pool counts them


class TestPinnedState:
    """An isolated state sees exactly the GPU it was granted, and nothing else."""

    async def test_one_gpu(self) -> None:
        agent = Agent("real_gpu", isolation="process", resource_pool=ResourcePool(total_memory=8192))
        agent.add_state("one", look_at_gpus, resources=gpu(1))
        ctx = await agent.run(timeout=300)
        seen = ctx.get_state("seen_one")
        uuids = {d.uuid for d in _DEVICES}
        assert seen["visible"] in uuids and seen["order"] == "PCI_BUS_ID"
        if seen["smi"] is not None:
            assert seen["visible"] in seen["smi"]
            others = uuids - {seen["visible"]}
            assert not any(u in seen["smi"] for u in others)
        if isinstance(seen["cu_init"], int) and seen["cu_init"] == 0:
            assert seen["cu_count_rc"] == 0 and seen["cu_count"] == 1
        mine = next(d for d in _DEVICES if d.uuid == seen["visible"])
        if os.path.isdir("/sys/fs/cgroup/devices"):
            for path, err in seen["opened"].items():
                if path == f"/dev/nvidia{mine.minor_number}":
                    assert err != seen["eperm"]
                else:
                    assert err == seen["eperm"], f"{path} should be denied"

    async def test_no_gpu(self) -> None:
        agent = Agent("no_gpu", isolation="process", resource_pool=ResourcePool(total_memory=8192))
        agent.add_state("none", look_at_gpus, resources=gpu(0))
        ctx = await agent.run(timeout=300)
        seen = ctx.get_state("seen_none")
        assert seen["visible"] == ""
        if isinstance(seen["cu_init"], int) and seen["cu_init"] == 0:
            assert seen["cu_count"] == 0
        if os.path.isdir("/sys/fs/cgroup/devices"):
            assert all(err == seen["eperm"] for err in seen["opened"].values())

    @pytest.mark.skipif(shutil.which("nvidia-smi") is None, reason="nvidia-smi is not installed")
    def test_nvidia_smi_on_the_host_lists_them(self) -> None:
        import subprocess

        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=True).stdout
        assert all(d.uuid in out for d in _DEVICES)
