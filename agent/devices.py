"""GPUs as admission sees them: the machine's inventory, and who holds which device.

The inventory comes from ``AGENT_GPUS`` when it is set (a JSON list, or the path of a
JSON file holding one, of ``{"index", "uuid", "name", "memory_mb", "minor"}`` objects:
for machines configured by hand and for tests on machines without GPUs), else from
NVML (the ``nvidia-ml-py`` distribution, imported as ``pynvml``). Without a driver
there are zero GPUs and the reason is kept, so a state that asks for a GPU gets an
error that says why and ``agent doctor`` can print it.

The allocator hands out whole GPUs for ``gpu_units >= 1`` and packs fractions
(``gpu_units < 1``) onto the GPU with the least remaining share that still fits, so
small requests share one GPU and leave whole ones free. It never over-commits a GPU.
Pinning a child to its devices (environment, devices cgroup) is the supervisor's job
(:mod:`agent.supervisor.gpus`); this module only decides which devices.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from . import _env
from .errors import GPUUnavailableError, InvalidConfigurationError, ResourceError, ResourceRequestError

GPUS_ENV = "AGENT_GPUS"

_EPS = 1e-9


@dataclass(frozen=True)
class GPUDevice:
    """One physical GPU."""

    index: int
    uuid: str
    name: str
    memory_total_mb: int
    pci_bus_id: str = ""
    minor_number: int = 0


@runtime_checkable
class GPUInventory(Protocol):
    """Where the list of GPUs comes from (NVML, ``AGENT_GPUS``, or a static list in tests)."""

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
        return self._reason if not self._devices else None


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
            return [], "NVML library not found (libnvidia-ml.so.1): no NVIDIA driver is installed on this machine"
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


def parse_gpus(text: str) -> list[GPUDevice]:
    """Devices from ``AGENT_GPUS``: JSON text, or the path of a JSON file; raises on anything else."""
    source = GPUS_ENV
    stripped = text.strip()
    if not stripped.startswith("["):
        try:
            with open(stripped, encoding="utf-8") as f:
                stripped = f.read()
        except OSError as exc:
            raise InvalidConfigurationError(
                f"{GPUS_ENV}={text!r} is neither a JSON list nor a readable file ({exc.strerror}): "
                'set it to e.g. [{"index": 0, "uuid": "GPU-...", "name": "A100", "memory_mb": 81920, "minor": 0}]'
            ) from None
        source = f"{GPUS_ENV} file {text.strip()!r}"
    try:
        items = json.loads(stripped)
    except ValueError as exc:
        raise InvalidConfigurationError(f"{source} is not valid JSON: {exc}") from None
    if not isinstance(items, list):
        raise InvalidConfigurationError(f"{source} must hold a JSON list of GPU objects, got {type(items).__name__}")
    devices = []
    for i, item in enumerate(items):
        devices.append(_device(item, f"{source}[{i}]"))
    for key in ("index", "uuid", "minor_number"):
        values = [getattr(d, key) for d in devices]
        if len(set(values)) != len(values):
            raise InvalidConfigurationError(f"{source}: two GPUs share the same {key.split('_')[0]}")
    return devices


def _device(item: Any, where: str) -> GPUDevice:
    if not isinstance(item, dict):
        raise InvalidConfigurationError(f"{where} must be an object, got {type(item).__name__}")
    missing = [k for k in ("index", "uuid") if k not in item]
    if missing:
        raise InvalidConfigurationError(f"{where} lacks {', '.join(missing)}: each GPU needs at least index and uuid")
    index: int = item["index"]
    minor: int = item.get("minor", index)
    memory: int = item.get("memory_mb", 0)
    for key, value in (("index", index), ("minor", minor), ("memory_mb", memory)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise InvalidConfigurationError(f"{where}.{key} must be an int >= 0, got {value!r}")
    if not isinstance(item["uuid"], str) or not item["uuid"]:
        raise InvalidConfigurationError(f"{where}.uuid must be a non-empty str, got {item['uuid']!r}")
    return GPUDevice(
        index=index,
        uuid=item["uuid"],
        name=str(item.get("name", "GPU")),
        memory_total_mb=memory,
        pci_bus_id=str(item.get("pci_bus_id", "")),
        minor_number=minor,
    )


_nvml: NvmlInventory | None = None
_env_inventories: dict[str, StaticInventory] = {}
_inventory_lock = threading.Lock()


def machine_inventory() -> GPUInventory:
    """This machine's GPUs: ``AGENT_GPUS`` when set, else NVML (each read once per process)."""
    global _nvml
    text = _env.get(GPUS_ENV)
    with _inventory_lock:  # read once, also when several threads ask first at once
        if text:
            inventory = _env_inventories.get(text)
            if inventory is None:
                inventory = _env_inventories[text] = StaticInventory(
                    parse_gpus(text), unavailable_reason=f"{GPUS_ENV} lists no GPUs"
                )
            return inventory
        if _nvml is None:
            _nvml = NvmlInventory()
        return _nvml


MIN_GPU_SHARE = 0.01
"""The smallest share of a GPU a state may ask for (a smaller one would read as none in use)."""


def check_gpu_units(gpu_units: float) -> None:
    """Raise when ``gpu_units`` is malformed (not a share of one GPU nor a whole count)."""
    if isinstance(gpu_units, bool) or not isinstance(gpu_units, (int, float)) or math.isnan(gpu_units) or gpu_units < 0:
        raise ResourceRequestError(f"gpu_units must be a number >= 0, got {gpu_units!r}")
    if gpu_units > 1 and gpu_units != int(gpu_units):
        raise ResourceRequestError(f"gpu_units={gpu_units}: ask for whole GPUs (1, 2, ...) or a share of one (< 1)")
    if 0 < gpu_units < MIN_GPU_SHARE:
        raise ResourceRequestError(
            f"gpu_units={gpu_units:g}: a share of a GPU is at least {MIN_GPU_SHARE:g}; ask for 0 (no GPU) or more")


class GPUAllocator:
    """Assigns concrete GPUs to owners (state attempts); never over-commits one.

    ``allocate`` returns the assigned devices, or None when the request does not fit
    right now. A request that can never fit on these devices raises
    :class:`~agent.errors.GPUUnavailableError`. Not thread-safe: admission runs on
    one event loop.
    """

    def __init__(self, inventory: GPUInventory | None = None, devices: Iterable[GPUDevice] | None = None) -> None:
        self._inventory = inventory if inventory is not None else machine_inventory()
        self._devices = list(devices) if devices is not None else self._inventory.devices()
        self._by_index = {d.index: d for d in self._devices}
        self._used = {d.index: 0.0 for d in self._devices}
        # owner -> [(gpu index, share)]; a whole GPU is a share of 1.0.
        self._held: dict[str, list[tuple[int, float]]] = {}

    @property
    def devices(self) -> list[GPUDevice]:
        return list(self._devices)

    @property
    def unavailable_reason(self) -> str | None:
        return None if self._devices else (self._inventory.unavailable_reason or "no GPUs were found")

    def check(self, gpu_units: float) -> None:
        """Raise when ``gpu_units`` is malformed or can never fit on these devices."""
        check_gpu_units(gpu_units)
        if gpu_units == 0:
            return
        count = len(self._devices)
        if count == 0:
            raise GPUUnavailableError(
                f"a state asks for gpu_units={gpu_units:g} but this machine has no GPUs ({self.unavailable_reason}); "
                "remove gpu_units from its ResourceRequirements or run it on a machine with an NVIDIA driver"
            )
        if gpu_units > count:
            raise GPUUnavailableError(
                f"a state asks for gpu_units={gpu_units:g} but this machine has only {count} GPU(s); "
                f"ask for at most {count}"
            )

    def _pick(self, gpu_units: float, used: dict[int, float] | None = None) -> list[tuple[int, float]] | None:
        used = self._used if used is None else used
        if gpu_units >= 1:
            free = [d.index for d in self._devices if used[d.index] <= _EPS]
            if len(free) < int(gpu_units):
                return None
            return [(i, 1.0) for i in free[: int(gpu_units)]]
        best: tuple[float, int] | None = None
        for d in self._devices:
            room = 1.0 - used[d.index]
            if room >= gpu_units - _EPS and (best is None or room < best[0]):
                best = (room, d.index)  # least remaining share that still fits, then lowest index
        return None if best is None else [(best[1], float(gpu_units))]

    def fits(self, gpu_units: float) -> bool:
        """Whether ``allocate(owner, gpu_units)`` would succeed now."""
        return gpu_units <= 0 or self._pick(gpu_units) is not None

    def fits_without(self, gpu_units: float, owners: Iterable[str]) -> bool:
        """Whether ``allocate(..., gpu_units)`` would succeed once ``owners`` gave back theirs
        (which GPUs they free matters: a whole GPU needs one nobody else uses)."""
        used = dict(self._used)
        for owner in owners:
            for index, share in self._held.get(owner, ()):
                left = used[index] - share
                used[index] = left if left > _EPS else 0.0
        return gpu_units <= 0 or self._pick(gpu_units, used) is not None

    def allocate(self, owner: str, gpu_units: float) -> list[GPUDevice] | None:
        """Assign GPUs to ``owner``: a list of devices, [] for no GPUs, None when full now."""
        self.check(gpu_units)
        if gpu_units == 0:
            return []
        if owner in self._held:
            raise ResourceError(f"{owner!r} already holds GPUs; release them before allocating again")
        picks = self._pick(gpu_units)
        if picks is None:
            return None
        for index, share in picks:
            self._used[index] += share
        self._held[owner] = picks
        return [self._by_index[i] for i, _ in picks]

    def release(self, owner: str) -> None:
        """Give back what ``owner`` holds (nothing happens when it holds nothing)."""
        picks = self._held.pop(owner, None)
        if picks:
            for index, share in picks:
                left = self._used[index] - share
                self._used[index] = left if left > _EPS else 0.0

    def assigned(self, owner: str) -> list[GPUDevice]:
        """The devices ``owner`` holds now ([] when none)."""
        return [self._by_index[i] for i, _ in self._held.get(owner, [])]

    def used_share(self) -> dict[int, float]:
        """The share of each GPU in use, by index."""
        return dict(self._used)

    @property
    def holders(self) -> int:
        return len(self._held)


def assignment(devices: Iterable[GPUDevice]) -> dict[str, list[Any]]:
    """``Attempt.assignment`` entries for ``devices``: UUIDs to pin CUDA, minors for the devices cgroup."""
    devices = list(devices)
    return {"gpus": [d.uuid for d in devices], "gpu_minors": sorted(d.minor_number for d in devices)}
