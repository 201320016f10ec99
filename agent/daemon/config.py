"""agentd's configuration: ``/etc/agent/agentd.toml``, with defaults that work without it.

```toml
admin_group = "agent-admin"   # its members see and steer every job (root always does)
client_group = "agent"        # who may connect (the socket is 0660 root:agent); default: everyone
max_running_jobs = 64         # job runners at once, box-wide
job_pids_max = 16384          # pids.max of each job's cgroup

[pool]                        # what the box offers (default: this machine's CPUs, memory, GPUs)
cpu = 64
memory_mb = 512000
preemption = true             # higher-priority states may evict lower ones of any job

[users.default]               # every user without a section of their own
priority_ceiling = "high"     # the highest priority their jobs may ask for
default_priority = "normal"   # a job's priority when submit gives none
max_running_jobs = 16         # their jobs running at once
cpu = 16                      # quota: what all their running states hold at once (unset: none)
memory_mb = 65536
gpu = 2

[users.alice]                 # a user by login name: overrides the defaults field by field
priority_ceiling = "critical"
```

Root's jobs have no quota and a ``critical`` ceiling unless ``[users.root]`` says
otherwise. A quota is also the kernel ceiling of each of that user's job cgroups
(memory and CPU), so a job cannot exceed it even outside admission.
"""

from __future__ import annotations

import grp
import os
import pwd
import tomllib
from dataclasses import dataclass, field, replace
from typing import Any

from .._types import Priority
from ..errors import DaemonConfigError

DEFAULT_CONFIG = "/etc/agent/agentd.toml"

_TOP = {"admin_group", "client_group", "max_running_jobs", "job_pids_max", "pool", "users"}
_POOL = {"cpu", "memory_mb", "preemption"}
_USER = {"priority_ceiling", "default_priority", "max_running_jobs", "cpu", "memory_mb", "gpu"}
QUOTA_KEYS = ("cpu", "memory_mb", "gpu")


@dataclass(frozen=True)
class UserPolicy:
    """What one user may do: priorities, concurrent jobs, and the quota of their states."""

    priority_ceiling: Priority = Priority.HIGH
    default_priority: Priority = Priority.NORMAL
    max_running_jobs: int | None = 16
    quota: dict[str, float] = field(default_factory=dict)  # cpu / memory_mb / gpu -> cap


ROOT_POLICY = UserPolicy(priority_ceiling=Priority.CRITICAL, max_running_jobs=None)


@dataclass(frozen=True)
class DaemonConfig:
    """Everything agentd reads from its file (see the module docstring)."""

    admin_group: str | None = None
    client_group: str | None = None
    max_running_jobs: int = 64
    job_pids_max: int = 16384
    pool_cpu: float | None = None
    pool_memory_mb: float | None = None
    preemption: bool = True
    default_policy: UserPolicy = UserPolicy()
    users: dict[str, UserPolicy] = field(default_factory=dict)
    path: str | None = None

    def policy_for(self, uid: int) -> UserPolicy:
        """The policy of ``uid``: its own section, else the defaults (root: no quota, critical)."""
        name = user_name(uid)
        if name in self.users:
            return self.users[name]
        return ROOT_POLICY if uid == 0 else self.default_policy

    def is_admin(self, uid: int, gid: int) -> bool:
        """Root, or a member of ``admin_group``: sees and steers every job."""
        if uid == 0:
            return True
        if not self.admin_group:
            return False
        try:
            group = grp.getgrnam(self.admin_group)
        except KeyError:
            return False
        return group.gr_gid in user_groups(uid, gid)


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def user_groups(uid: int, gid: int) -> list[int]:
    """``uid``'s supplementary groups (as login would set them), its primary group included."""
    try:
        return os.getgrouplist(pwd.getpwuid(uid).pw_name, gid)
    except KeyError:
        return [gid]


def load_config(path: str | None = None) -> DaemonConfig:
    """Read ``path`` (default ``/etc/agent/agentd.toml``; a missing default file means defaults)."""
    explicit = path is not None
    path = path or DEFAULT_CONFIG
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        if explicit:
            raise DaemonConfigError(f"config file {path} does not exist: create it or drop --config") from None
        return DaemonConfig()
    except tomllib.TOMLDecodeError as exc:
        raise DaemonConfigError(f"{path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise DaemonConfigError(f"cannot read {path}: {exc.strerror}") from None
    return parse_config(data, path)


def parse_config(data: dict[str, Any], where: str = "config") -> DaemonConfig:
    _known(data, _TOP, where)
    pool = data.get("pool", {})
    _known(pool, _POOL, f"{where} [pool]")
    users = data.get("users", {})
    if not isinstance(users, dict):
        raise DaemonConfigError(f"{where}: [users] must be a table of [users.NAME] sections")
    default = _policy(users.get("default", {}), UserPolicy(), f"{where} [users.default]")
    policies = {
        name: _policy(section, ROOT_POLICY if name == "root" else default, f"{where} [users.{name}]")
        for name, section in users.items() if name != "default"
    }
    for key in ("admin_group", "client_group"):
        value = data.get(key)
        if value is not None:
            if not isinstance(value, str) or not value:
                raise DaemonConfigError(f"{where}: {key} must be a group name")
            try:
                grp.getgrnam(value)
            except KeyError:
                raise DaemonConfigError(f"{where}: {key} = {value!r} is not a group on this machine: "
                                        "create it (groupadd) or fix the name") from None
    return DaemonConfig(
        admin_group=data.get("admin_group"),
        client_group=data.get("client_group"),
        max_running_jobs=_count(data.get("max_running_jobs", 64), f"{where}: max_running_jobs"),
        job_pids_max=_count(data.get("job_pids_max", 16384), f"{where}: job_pids_max"),
        pool_cpu=_amount(pool.get("cpu"), f"{where} [pool] cpu"),
        pool_memory_mb=_amount(pool.get("memory_mb"), f"{where} [pool] memory_mb"),
        preemption=_flag(pool.get("preemption", True), f"{where} [pool] preemption"),
        default_policy=default,
        users=policies,
        path=where,
    )


def _policy(section: Any, base: UserPolicy, where: str) -> UserPolicy:
    if not isinstance(section, dict):
        raise DaemonConfigError(f"{where} must be a table")
    _known(section, _USER, where)
    policy = base
    if "priority_ceiling" in section:
        policy = replace(policy, priority_ceiling=parse_priority(section["priority_ceiling"], where))
    if "default_priority" in section:
        policy = replace(policy, default_priority=parse_priority(section["default_priority"], where))
    if "max_running_jobs" in section:
        policy = replace(policy, max_running_jobs=_count(section["max_running_jobs"], f"{where} max_running_jobs"))
    quota = dict(policy.quota)
    for key in QUOTA_KEYS:
        if key in section:
            quota[key] = _amount(section[key], f"{where} {key}")  # type: ignore[assignment]
    policy = replace(policy, quota=quota)
    if policy.default_priority > policy.priority_ceiling:
        raise DaemonConfigError(
            f"{where}: default_priority {policy.default_priority.name.lower()} is above priority_ceiling "
            f"{policy.priority_ceiling.name.lower()}: lower it or raise the ceiling"
        )
    return policy


def parse_priority(value: Any, where: str = "priority") -> Priority:
    """``"low"`` / ``"normal"`` / ``"high"`` / ``"critical"`` (or 0-3) as a Priority."""
    if isinstance(value, Priority):
        return value
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 3:
        return Priority(value)
    if isinstance(value, str):
        try:
            return Priority[value.upper()]
        except KeyError:
            pass
        if value.isdigit() and 0 <= int(value) <= 3:
            return Priority(int(value))
    names = ", ".join(p.name.lower() for p in Priority)
    raise DaemonConfigError(f"{where}: unknown priority {value!r}: use one of {names}")


def _known(section: Any, allowed: set[str], where: str) -> None:
    if not isinstance(section, dict):
        raise DaemonConfigError(f"{where} must be a table")
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise DaemonConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(allowed))}")


def _count(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise DaemonConfigError(f"{where} must be an int >= 1, got {value!r}")
    return value


def _amount(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
        raise DaemonConfigError(f"{where} must be a number >= 0, got {value!r}")
    return float(value)


def _flag(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise DaemonConfigError(f"{where} must be true or false, got {value!r}")
    return value
