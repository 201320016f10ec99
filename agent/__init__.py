"""Async Python state-machine workflows with kernel-enforced per-state resource isolation.

The public names are loaded on first use (PEP 562): ``import agent`` and ``agent
--version`` stay fast, and a name's module (and asyncio with it) is imported only when
a program touches it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

_SOURCES: dict[str, str] = {
    **dict.fromkeys(("Agent",), "agent"),
    **dict.fromkeys(("AgentCheckpoint", "Checkpoint"), "checkpoint"),
    **dict.fromkeys(("Context", "TypedContextData"), "context"),
    **dict.fromkeys(("DependencyConfig", "DependencyLifecycle", "DependencyType"), "dependencies"),
    **dict.fromkeys((
        "AgentBusyError", "AgentError", "AttemptLogNotFoundError", "CgroupError", "CheckpointError",
        "ContextError", "ContextKeyError", "ContextTypeError", "CoordinationError",
        "CoordinationTimeoutError", "DeadlockError", "DependencyCycleError", "DependencyTimeoutError",
        "DuplicateStateError", "ExecutionError", "FailureReason", "GPUUnavailableError", "HumanInputError",
        "HumanInputTimeoutError", "IllegalTransitionError", "InvalidConfigurationError",
        "InvalidStateFunctionError", "InvalidTransitionError", "IsolationError",
        "IsolationUnavailableError", "MaxStepsExceededError", "MonitorConfigurationError", "MonitorError",
        "ProtocolError", "QuotaExceededError", "ResourceError", "ResourceRequestError", "RunTimeoutError",
        "StateFailedError", "StateTimeoutError", "UnencodableValueError", "UnknownNextStateError",
        "UnknownStateError", "ValueTooLargeError", "WorkflowDefinitionError"
    ), "errors"),
    **dict.fromkeys(("observing", "RunEvent"), "events"),
    **dict.fromkeys(("Isolation",), "executor"),
    **dict.fromkeys((
        "Priority", "ResourcePool", "ResourceRequirements", "ResourceType", "ResourceUsage"
    ), "resources"),
    **dict.fromkeys(("RetryPolicy",), "retry"),
    **dict.fromkeys(("StateMetadata", "StateResult"), "state"),
    **dict.fromkeys(("AgentStatus", "StateStatus"), "status"),
}

__all__ = [
    "__version__",
    "Agent",
    "AgentBusyError",
    "AgentCheckpoint",
    "AgentError",
    "AgentStatus",
    "AttemptLogNotFoundError",
    "CgroupError",
    "Checkpoint",
    "CheckpointError",
    "Context",
    "ContextError",
    "ContextKeyError",
    "ContextTypeError",
    "CoordinationError",
    "CoordinationTimeoutError",
    "DeadlockError",
    "DependencyConfig",
    "DependencyCycleError",
    "DependencyLifecycle",
    "DependencyTimeoutError",
    "DependencyType",
    "DuplicateStateError",
    "ExecutionError",
    "FailureReason",
    "GPUUnavailableError",
    "HumanInputError",
    "HumanInputTimeoutError",
    "IllegalTransitionError",
    "InvalidConfigurationError",
    "InvalidStateFunctionError",
    "InvalidTransitionError",
    "Isolation",
    "IsolationError",
    "IsolationUnavailableError",
    "MaxStepsExceededError",
    "MonitorConfigurationError",
    "MonitorError",
    "observing",
    "Priority",
    "ProtocolError",
    "QuotaExceededError",
    "ResourceError",
    "ResourcePool",
    "ResourceRequestError",
    "ResourceRequirements",
    "ResourceType",
    "ResourceUsage",
    "RetryPolicy",
    "RunEvent",
    "RunTimeoutError",
    "StateFailedError",
    "StateMetadata",
    "StateResult",
    "StateStatus",
    "StateTimeoutError",
    "TypedContextData",
    "UnencodableValueError",
    "UnknownNextStateError",
    "UnknownStateError",
    "ValueTooLargeError",
    "WorkflowDefinitionError",
]


def __getattr__(name: str) -> Any:
    module = _SOURCES.get(name)
    if module is None:
        raise AttributeError(f"module 'agent' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from .agent import Agent
    from .checkpoint import AgentCheckpoint, Checkpoint
    from .context import Context, TypedContextData
    from .dependencies import DependencyConfig, DependencyLifecycle, DependencyType
    from .errors import (
        AgentBusyError, AgentError, AttemptLogNotFoundError, CgroupError, CheckpointError, ContextError,
        ContextKeyError, ContextTypeError, CoordinationError, CoordinationTimeoutError, DeadlockError,
        DependencyCycleError, DependencyTimeoutError, DuplicateStateError, ExecutionError, FailureReason,
        GPUUnavailableError, HumanInputError, HumanInputTimeoutError, IllegalTransitionError,
        InvalidConfigurationError, InvalidStateFunctionError, InvalidTransitionError, IsolationError,
        IsolationUnavailableError, MaxStepsExceededError, MonitorConfigurationError, MonitorError,
        ProtocolError, QuotaExceededError, ResourceError, ResourceRequestError, RunTimeoutError,
        StateFailedError, StateTimeoutError, UnencodableValueError, UnknownNextStateError,
        UnknownStateError, ValueTooLargeError, WorkflowDefinitionError
    )
    from .events import RunEvent, observing
    from .executor import Isolation
    from .resources import Priority, ResourcePool, ResourceRequirements, ResourceType, ResourceUsage
    from .retry import RetryPolicy
    from .state import StateMetadata, StateResult
    from .status import AgentStatus, StateStatus
