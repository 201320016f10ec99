"""Async Python state-machine workflows with kernel-enforced per-state resource isolation.

The public names are loaded lazily (PEP 562): ``import agent`` costs almost nothing,
and a name's module is imported the first time the name is used.
"""

from __future__ import annotations

from ._version import __version__

TYPE_CHECKING = False  # typing's own, without importing typing (half of agentctl's start)
if TYPE_CHECKING:
    from typing import Any

_LAZY: dict[str, str] = {
    "Priority": "_types",
    "ResourceType": "_types",
    "Agent": "agent",
    "AgentCheckpoint": "checkpoint",
    "Checkpoint": "checkpoint",
    "Context": "context",
    "TypedContextData": "context",
    "DependencyConfig": "dependencies",
    "DependencyLifecycle": "dependencies",
    "DependencyType": "dependencies",
    "AgentBusyError": "errors",
    "EventLoopRunningError": "errors",
    "AgentError": "errors",
    "AttemptLogNotFoundError": "errors",
    "BoundExceededError": "errors",
    "CgroupError": "errors",
    "CheckpointError": "errors",
    "ContextBudgetError": "errors",
    "ContextError": "errors",
    "ContextKeyError": "errors",
    "ContextScopeError": "errors",
    "ContextTypeError": "errors",
    "CoordinationError": "errors",
    "CoordinationTimeoutError": "errors",
    "DeadlockError": "errors",
    "DependencyCycleError": "errors",
    "DependencyTimeoutError": "errors",
    "DuplicateStateError": "errors",
    "ExecutionError": "errors",
    "FailureReason": "errors",
    "GPUUnavailableError": "errors",
    "HumanInputError": "errors",
    "HumanInputTimeoutError": "errors",
    "IllegalTransitionError": "errors",
    "InvalidConfigurationError": "errors",
    "InvalidStateFunctionError": "errors",
    "InvalidTransitionError": "errors",
    "IsolationError": "errors",
    "IsolationUnavailableError": "errors",
    "MaxStepsExceededError": "errors",
    "MonitorConfigurationError": "errors",
    "MonitorError": "errors",
    "ProtocolError": "errors",
    "QuotaExceededError": "errors",
    "ResourceError": "errors",
    "ResourceRequestError": "errors",
    "RunTimeoutError": "errors",
    "StateFailedError": "errors",
    "StateTimeoutError": "errors",
    "UnencodableValueError": "errors",
    "UnknownNextStateError": "errors",
    "UnknownStateError": "errors",
    "UnsendableStateError": "errors",
    "ValueTooLargeError": "errors",
    "WorkflowDefinitionError": "errors",
    "observing": "events",
    "RunEvent": "events",
    "Isolation": "executor",
    "ResourcePool": "resources",
    "ResourceRequirements": "resources",
    "ResourceUsage": "resources",
    "RetryPolicy": "retry",
    "StateMetadata": "state",
    "StateResult": "state",
    "AgentStatus": "status",
    "StateStatus": "status",
}

__all__ = [
    "__version__",
    "Agent",
    "AgentBusyError",
    "AgentCheckpoint",
    "AgentError",
    "AgentStatus",
    "AttemptLogNotFoundError",
    "BoundExceededError",
    "CgroupError",
    "Checkpoint",
    "CheckpointError",
    "Context",
    "ContextBudgetError",
    "ContextError",
    "ContextKeyError",
    "ContextScopeError",
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
    "EventLoopRunningError",
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
    "UnsendableStateError",
    "ValueTooLargeError",
    "WorkflowDefinitionError",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'agent' has no attribute {name!r}")
    # __import__, not importlib.import_module: importing importlib (and warnings with it)
    # was a sixth of `import agent`, which agentctl pays on every command.
    value = getattr(__import__(f"{__name__}.{module}", fromlist=[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
    from ._types import (
        Priority,
        ResourceType,
    )
    from .agent import (
        Agent,
    )
    from .checkpoint import (
        AgentCheckpoint,
        Checkpoint,
    )
    from .context import (
        Context,
        TypedContextData,
    )
    from .dependencies import (
        DependencyConfig,
        DependencyLifecycle,
        DependencyType,
    )
    from .errors import (
        AgentBusyError,
        AgentError,
        AttemptLogNotFoundError,
        CgroupError,
        CheckpointError,
        ContextError,
        ContextKeyError,
        ContextScopeError,
        ContextTypeError,
        CoordinationError,
        CoordinationTimeoutError,
        DeadlockError,
        DependencyCycleError,
        DependencyTimeoutError,
        DuplicateStateError,
        EventLoopRunningError,
        ExecutionError,
        FailureReason,
        GPUUnavailableError,
        HumanInputError,
        HumanInputTimeoutError,
        IllegalTransitionError,
        InvalidConfigurationError,
        InvalidStateFunctionError,
        InvalidTransitionError,
        IsolationError,
        IsolationUnavailableError,
        MaxStepsExceededError,
        MonitorConfigurationError,
        MonitorError,
        ProtocolError,
        QuotaExceededError,
        ResourceError,
        ResourceRequestError,
        RunTimeoutError,
        StateFailedError,
        StateTimeoutError,
        UnencodableValueError,
        UnknownNextStateError,
        UnknownStateError,
        UnsendableStateError,
        ValueTooLargeError,
        WorkflowDefinitionError,
    )
    from .events import (
        observing,
        RunEvent,
    )
    from .executor import (
        Isolation,
    )
    from .resources import (
        ResourcePool,
        ResourceRequirements,
        ResourceUsage,
    )
    from .retry import (
        RetryPolicy,
    )
    from .state import (
        StateMetadata,
        StateResult,
    )
    from .status import (
        AgentStatus,
        StateStatus,
    )
