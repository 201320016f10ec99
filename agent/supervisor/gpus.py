"""GPUs: what the machine has, who holds which, and how a child is pinned to its own.

The inventory comes from NVML (the ``nvidia-ml-py`` distribution, imported as
``pynvml``). Without a driver there are zero GPUs and the reason is kept, so a state
that asks for a GPU gets an error that says why and ``agent doctor`` can print it.

The allocator hands out whole GPUs for ``gpu_units >= 1`` and packs fractions
(``gpu_units < 1``) onto the GPU with the least remaining share that still fits, so
small requests share one GPU and leave whole ones free. It never over-commits a GPU.
"""

from __future__ import annotations

import functools
import math
import threading
from dataclasses import dataclass
from typing import Iterable, Protocol, Sequence, runtime_checkable

from ..errors import GPUUnavailableError, ResourceError, ResourceRequestError

# Character-device major number of /dev/nvidia<minor> (the devices cgroup denies
# ``c 195:*`` except the minors of the GPUs a child was given).
NVIDIA_DEVICE_MAJOR = 195

_EPS = 1e-9


@dataclass(frozen=True)
class GPUDevice:
    """One physical GPU as NVML reports it."""

    index: int
    uuid: str
    name: str
    memory_total_mb: int
    pci_bus_id: str
    minor_number: int


@runtime_checkable
class GPUInventory(Protocol):
    """Where the list of GPUs comes from (NVML on a real machine, a static list in tests)."""

    def devices(self) -> list[GPUDevice]: ...

    @property
    def unavailable_reason(self) -> str | None:
        """Why there are no GPUs (None when the inventory could be read)."""
        ...


class StaticInventory:
    """A fixed list of GPUs: for tests and for machines configured by hand."""

    def __init__(self, devices: Iterable[GPUDevice] = (), unavailable_reason: str | None = None) -> None:
        self._devices = list(devices)
        self._reason = unavailable_reason

    def devices(self) -> list[GPUDevice]:
        return list(self._devices)

    @property
    def unavailable_reason(self) -> str | None:
        return self._reason


def _text(value: str | bytes) -> str:
    # nvidia-ml-py returns str in recent versions and bytes in old ones.
    return value.decode() if isinstance(value, bytes) else value


class NvmlInventory:
    """GPUs read from NVML once, on first use.

    NVML is initialised only while reading and shut down again, so a process that
    forks afterwards (the zygote) holds no NVML state.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._devices: list[GPUDevice] | None = None
        self._reason: str | None = None

    def devices(self) -> list[GPUDevice]:
        with self._lock:
            if self._devices is None:
                self._devices, self._reason = self._read()
            return list(self._devices)

    @property
    def unavailable_reason(self) -> str | None:
        self.devices()
        return self._reason

    @staticmethod
    def _read() -> tuple[list[GPUDevice], str | None]:
        try:
            import pynvml
        except ImportError as exc:
            return [], f"the nvidia-ml-py package is not installed ({exc}): pip install nvidia-ml-py"
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError_LibraryNotFound:
            return [], (
                "NVML library not found (libnvidia-ml.so.1): no NVIDIA driver is installed on this machine"
            )
        except pynvml.NVMLError as exc:
            return [], f"NVML could not start: {exc} (is the NVIDIA kernel driver loaded?)"
        try:
            found = []
            for index in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                found.append(
                    GPUDevice(
                        index=index,
                        uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
                        name=_text(pynvml.nvmlDeviceGetName(handle)),
                        memory_total_mb=int(pynvml.nvmlDeviceGetMemoryInfo(handle).total // (1024 * 1024)),
                        pci_bus_id=_text(pynvml.nvmlDeviceGetPciInfo(handle).busId),
                        minor_number=int(pynvml.nvmlDeviceGetMinorNumber(handle)),
                    )
                )
        except pynvml.NVMLError as exc:
            return [], f"NVML failed while listing GPUs: {exc}"
        finally:
            pynvml.nvmlShutdown()
        return found, (None if found else "NVML found no GPUs")


@functools.cache
def default_inventory() -> GPUInventory:
    """This process's NVML inventory (read once: GPUs do not come and go under us)."""
    return NvmlInventory()


def pinning_env(devices: Sequence[GPUDevice]) -> dict[str, str]:
    """Environment that makes CUDA see exactly ``devices`` (none when empty), by UUID."""
    return {
        "CUDA_VISIBLE_DEVICES": ",".join(d.uuid for d in devices),
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
    }


def device_minors(devices: Sequence[GPUDevice]) -> list[int]:
    """Minor numbers of ``/dev/nvidia<N>`` for ``devices`` (to allow in a devices cgroup)."""
    return sorted(d.minor_number for d in devices)


def assignment(devices: Sequence[GPUDevice]) -> dict[str, list]:
    """``Attempt.assignment`` entries for ``devices``: UUIDs to pin CUDA, minors for the devices cgroup."""
    return {"gpus": [d.uuid for d in devices], "gpu_minors": device_minors(devices)}


@dataclass(frozen=True)
class GPUAllocatorStatistics:
    """A snapshot: the share of each GPU in use (by index) and how many owners hold GPUs."""

    total_gpus: int
    used_share: dict[int, float]
    holders: int


class GPUAllocator:
    """Assigns concrete GPUs to owners (state attempts); never over-commits one.

    ``allocate`` returns the assigned devices, or None when the request does not fit
    right now (the caller waits and tries again after a ``release``). A request that
    can never fit on this machine raises :class:`~agent.errors.GPUUnavailableError`.
    """

    def __init__(self, inventory: GPUInventory | None = None) -> None:
        self._inventory = inventory if inventory is not None else default_inventory()
        self._devices = self._inventory.devices()
        self._lock = threading.Lock()
        # owner -> [(gpu index, share)]; a whole GPU is a share of 1.0.
        self._held: dict[str, list[tuple[int, float]]] = {}

    @property
    def devices(self) -> list[GPUDevice]:
        return list(self._devices)

    def check(self, gpu_units: float) -> None:
        """Raise when ``gpu_units`` is malformed or can never fit on this machine."""
        if (
            isinstance(gpu_units, bool)
            or not isinstance(gpu_units, (int, float))
            or math.isnan(gpu_units)
            or gpu_units < 0
        ):
            raise ResourceRequestError(f"gpu_units must be a number >= 0, got {gpu_units!r}")
        if gpu_units > 1 and gpu_units != int(gpu_units):
            raise ResourceRequestError(
                f"gpu_units={gpu_units}: ask for whole GPUs (1, 2, ...) or a share of one (< 1)"
            )
        if gpu_units == 0:
            return
        count = len(self._devices)
        if count == 0:
            reason = self._inventory.unavailable_reason or "no GPUs were found"
            raise GPUUnavailableError(
                f"a state asks for gpu_units={gpu_units} but this machine has no GPUs ({reason}); "
                "remove gpu_units from its ResourceRequirements or run it on a machine with an NVIDIA driver"
            )
        if gpu_units > count:
            raise GPUUnavailableError(
                f"a state asks for gpu_units={gpu_units:g} but this machine has only {count} GPU(s); "
                f"ask for at most {count}"
            )

    def allocate(self, owner: str, gpu_units: float) -> list[GPUDevice] | None:
        """Assign GPUs to ``owner``: a list of devices, [] for no GPUs, None when full now."""
        self.check(gpu_units)
        if gpu_units == 0:
            return []
        with self._lock:
            if owner in self._held:
                raise ResourceError(f"{owner!r} already holds GPUs; release them before allocating again")
            used = self._used()
            if gpu_units >= 1:
                free = [d.index for d in self._devices if used[d.index] <= _EPS]
                if len(free) < int(gpu_units):
                    return None
                picks = [(i, 1.0) for i in free[: int(gpu_units)]]
            else:
                fits = [
                    (1.0 - used[d.index], d.index)
                    for d in self._devices
                    if 1.0 - used[d.index] >= gpu_units - _EPS
                ]
                if not fits:
                    return None
                _, best = min(fits)  # least remaining share that still fits, then lowest index
                picks = [(best, float(gpu_units))]
            self._held[owner] = picks
            return [self._devices_by_index[i] for i, _ in picks]

    def release(self, owner: str) -> None:
        """Give back what ``owner`` holds (nothing happens when it holds nothing)."""
        with self._lock:
            self._held.pop(owner, None)

    def assigned(self, owner: str) -> list[GPUDevice]:
        """The devices ``owner`` holds now ([] when none)."""
        with self._lock:
            return [self._devices_by_index[i] for i, _ in self._held.get(owner, [])]

    def statistics(self) -> GPUAllocatorStatistics:
        with self._lock:
            return GPUAllocatorStatistics(
                total_gpus=len(self._devices), used_share=self._used(), holders=len(self._held)
            )

    @functools.cached_property
    def _devices_by_index(self) -> dict[int, GPUDevice]:
        return {d.index: d for d in self._devices}

    def _used(self) -> dict[int, float]:
        # Recomputed from the holders (not kept as a running sum) so shares never drift.
        used = {d.index: 0.0 for d in self._devices}
        for picks in self._held.values():
            for index, share in picks:
                used[index] += share
        return used
