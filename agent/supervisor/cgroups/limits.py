"""What the kernel is asked to enforce for one attempt, independent of the cgroup version.

:func:`limits_for` maps a :class:`~agent.resources.ResourceRequirements` to
:class:`CgroupLimits`; each backend turns those into its own files (``cpu.max`` or
``cpu.cfs_quota_us``, ``memory.max`` or ``memory.limit_in_bytes``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from ...errors import ResourceRequestError

if TYPE_CHECKING:
    from ...resources import ResourceRequirements

# CFS period used for every quota: 100 ms, the kernel default.
CPU_PERIOD_US = 100_000
# The kernel refuses quotas below 1 ms, and above about 203 days (2**44 - 1 us): more
# cores than any box has, so a larger request gets that quota, no limit in effect.
CPU_MIN_QUOTA_US = 1_000
CPU_MAX_QUOTA_US = (1 << 44) - 1
# The most memory a limit can say (the kernel's "max", page aligned): a larger request
# gets it, where the kernel would cut the number to 64 bits and keep what is left.
MEMORY_MAX_BYTES = (1 << 63) - 4096
# Processes (and threads) an attempt may have when it does not say.
DEFAULT_PIDS_MAX = 4096
# What a sandboxed state (untrusted code) gets for each limit it does not declare:
# processes, CPUs and memory (which also holds its private /tmp).
SANDBOX_PIDS_MAX = 128
SANDBOX_CPU_UNITS = 1.0
SANDBOX_MEMORY_MB = 512
# io_weight 1.0 (the default) is the kernel's default weight 100.
IO_WEIGHT_SCALE = 100
IO_WEIGHT_MIN, IO_WEIGHT_MAX = 1, 1000


@dataclass(frozen=True)
class IoThrottle:
    """Byte and operation rate limits on one block device (``major:minor`` of a whole disk)."""

    major: int
    minor: int
    read_bps: int | None = None
    write_bps: int | None = None
    read_iops: int | None = None
    write_iops: int | None = None

    @property
    def device(self) -> str:
        return f"{self.major}:{self.minor}"


@dataclass(frozen=True)
class CgroupLimits:
    """Kernel limits for one cgroup; ``None`` means unlimited / not set."""

    cpu_quota_us: int | None = None
    cpu_period_us: int = CPU_PERIOD_US
    memory_bytes: int | None = None
    io_weight: int | None = None
    io_throttles: tuple[IoThrottle, ...] = ()
    pids_max: int | None = DEFAULT_PIDS_MAX
    # devices cgroup (v1): None leaves devices alone; a tuple is a closed policy that
    # allows only these entries (``"c 195:0 rwm"``, devices.allow syntax).
    allow_devices: tuple[str, ...] | None = None
    # The disks that io_weight applies to (``major:minor``).
    io_weight_devices: tuple[tuple[int, int], ...] = field(default=())

    @property
    def cpu_units(self) -> float | None:
        return None if self.cpu_quota_us is None else self.cpu_quota_us / self.cpu_period_us

    @property
    def memory_mib(self) -> float | None:
        return None if self.memory_bytes is None else self.memory_bytes / (1024 * 1024)


def limits_for(
    requirements: "ResourceRequirements | None",
    *,
    io_devices: tuple[tuple[int, int], ...] = (),
    sandbox: bool = False,
    allow_devices: tuple[str, ...] | None = None,
) -> CgroupLimits:
    """The kernel limits that enforce ``requirements`` (only the types it accounts for).

    ``io_devices`` are the whole disks the byte/iops throttles and the IO weight apply
    to. A ``None`` requirement still gets the default pids limit; a sandboxed state also
    gets the sandbox's CPU, memory and pids limits for each it does not declare.
    """
    limits = _limits_for(requirements, io_devices, allow_devices, SANDBOX_PIDS_MAX if sandbox else DEFAULT_PIDS_MAX)
    if sandbox:
        limits = replace(
            limits,
            cpu_quota_us=(
                limits.cpu_quota_us if limits.cpu_quota_us is not None else round(SANDBOX_CPU_UNITS * CPU_PERIOD_US)
            ),
            memory_bytes=limits.memory_bytes if limits.memory_bytes is not None else SANDBOX_MEMORY_MB * 1024 * 1024,
        )
    return limits


def _limits_for(
    requirements: "ResourceRequirements | None",
    io_devices: tuple[tuple[int, int], ...],
    allow_devices: tuple[str, ...] | None,
    pids_default: int,
) -> CgroupLimits:
    from ...resources import MIN_MEMORY_MB, ResourceType

    if requirements is None:
        return CgroupLimits(pids_max=pids_default, allow_devices=allow_devices)
    types = requirements.resource_types
    quota = None
    if ResourceType.CPU in types and requirements.cpu_units > 0:
        quota = min(CPU_MAX_QUOTA_US, max(CPU_MIN_QUOTA_US, round(requirements.cpu_units * CPU_PERIOD_US)))
    memory = None
    if ResourceType.MEMORY in types and requirements.memory_mb > 0:
        memory = min(MEMORY_MAX_BYTES, int(requirements.memory_mb * 1024 * 1024))
        if requirements.memory_mb < MIN_MEMORY_MB:  # refused at add_state already, for a state of this level
            raise ResourceRequestError(
                f"memory_mb={requirements.memory_mb:g} is below {MIN_MEMORY_MB} MiB, too small for any process: "
                "ask for more, or leave MEMORY out of resource_types"
            )
    weight = None
    if ResourceType.IO in types and requirements.io_weight > 0:
        scaled = round(requirements.io_weight * IO_WEIGHT_SCALE)
        if scaled != IO_WEIGHT_SCALE:
            weight = min(IO_WEIGHT_MAX, max(IO_WEIGHT_MIN, scaled))
    rates = (
        requirements.io_read_bps,
        requirements.io_write_bps,
        requirements.io_read_iops,
        requirements.io_write_iops,
    )
    throttles: tuple[IoThrottle, ...] = ()
    if any(rate is not None for rate in rates):
        throttles = tuple(IoThrottle(major, minor, *rates) for major, minor in io_devices)
    pids = requirements.pids_max if requirements.pids_max is not None else pids_default
    return CgroupLimits(
        cpu_quota_us=quota,
        memory_bytes=memory,
        io_weight=weight,
        io_throttles=throttles,
        pids_max=pids,
        allow_devices=allow_devices,
        io_weight_devices=io_devices if weight is not None else (),
    )
