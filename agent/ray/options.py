"""Ray-only settings of one state: custom resources, placement, its runtime environment.

CPU, memory and GPUs come from the state's ``ResourceRequirements`` (our pool admits by
them, Ray places by them). Whatever only Ray knows about is declared on the state
function with :func:`ray_options`, and passed through to the state's Ray task::

    @ray_options(resources={"ssd": 1}, accelerator_type="A100")
    async def train(context): ...

Retries, timeouts and the number of CPUs/GPUs/memory are ours and cannot be set here.
Importing this module does not import Ray.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..errors import InvalidConfigurationError

F = TypeVar("F", bound=Callable[..., Any])

ATTRIBUTE = "__agent_ray_options__"

RESERVED = frozenset({"CPU", "GPU", "memory", "object_store_memory"})
"""Resource names that come from ``ResourceRequirements`` (or that Ray manages itself)."""


@dataclass(frozen=True)
class RayOptions:
    """What :func:`ray_options` recorded for one state function."""

    resources: Mapping[str, float] = field(default_factory=dict)
    accelerator_type: str | None = None
    runtime_env: Mapping[str, Any] | None = None
    scheduling_strategy: Any = None
    label_selector: Mapping[str, str] | None = None
    isolation: str | None = None
    """``"process"`` or ``"sandbox"``: run the state confined on its node (:mod:`agent.ray.confine`)."""

    def task_options(self) -> dict[str, Any]:
        """The keyword arguments of Ray's ``.options()`` these settings stand for."""
        out: dict[str, Any] = {}
        if self.resources:
            out["resources"] = dict(self.resources)
        if self.accelerator_type is not None:
            out["accelerator_type"] = self.accelerator_type
        if self.runtime_env is not None:
            out["runtime_env"] = dict(self.runtime_env)
        if self.scheduling_strategy is not None:
            out["scheduling_strategy"] = self.scheduling_strategy
        if self.label_selector is not None:
            out["label_selector"] = dict(self.label_selector)
        return out


def ray_options(
    *,
    resources: Mapping[str, float] | None = None,
    accelerator_type: str | None = None,
    runtime_env: Mapping[str, Any] | None = None,
    scheduling_strategy: Any = None,
    label_selector: Mapping[str, str] | None = None,
    isolation: str | None = None,
) -> Callable[[F], F]:
    """Declare Ray-only settings for a state that runs with ``isolation="ray"``.

    ``resources`` are Ray custom resources (``{"ssd": 1}``: the task goes to a node that
    has them, and holds them while it runs); ``accelerator_type``, ``runtime_env``,
    ``scheduling_strategy`` and ``label_selector`` are Ray's own task options. Our resource
    pool does not count custom resources: Ray does, and a task whose custom resource is
    busy waits in Ray's queue. ``isolation="process"`` (or ``"sandbox"``) runs the state,
    inside its Ray task, in a child confined by cgroups to its ``ResourceRequirements`` on
    the node (:mod:`agent.ray.confine`): Ray alone limits nothing. The function itself is
    returned unchanged, with the settings recorded on it.
    """
    custom: dict[str, float] = {}
    for name, amount in (resources or {}).items():
        if not isinstance(name, str) or not name:
            raise InvalidConfigurationError(f"ray_options: a resource name is a non-empty str, got {name!r}")
        if name in RESERVED:
            raise InvalidConfigurationError(
                f"ray_options: {name!r} comes from the state's ResourceRequirements (cpu_units, "
                "memory_mb, gpu_units): declare it there, so that our pool admits it too"
            )
        if (not isinstance(amount, (int, float)) or isinstance(amount, bool) or math.isnan(amount)
                or amount < 0 or math.isinf(amount)):
            raise InvalidConfigurationError(
                f"ray_options: resource {name!r} needs an amount >= 0, got {amount!r}"
            )
        custom[name] = float(amount)
    if accelerator_type is not None and not isinstance(accelerator_type, str):
        raise InvalidConfigurationError(f"ray_options: accelerator_type is a str, got {accelerator_type!r}")
    if runtime_env is not None and not isinstance(runtime_env, Mapping):
        raise InvalidConfigurationError(f"ray_options: runtime_env is a dict, got {type(runtime_env).__name__}")
    if label_selector is not None and not isinstance(label_selector, Mapping):
        raise InvalidConfigurationError(f"ray_options: label_selector is a dict, got {type(label_selector).__name__}")
    if isolation is not None and isolation not in ("process", "sandbox"):
        raise InvalidConfigurationError(
            f"ray_options: isolation inside a Ray task is 'process' or 'sandbox', got {isolation!r}"
        )
    options = RayOptions(custom, accelerator_type, runtime_env, scheduling_strategy, label_selector, isolation)

    def record(func: F) -> F:
        if not callable(func):
            raise InvalidConfigurationError(f"ray_options decorates a state function, got {func!r}")
        setattr(func, ATTRIBUTE, options)
        return func

    return record


def options_of(func: Callable[..., Any]) -> RayOptions | None:
    """The settings recorded on a state function, if any."""
    found = getattr(func, ATTRIBUTE, None)
    return found if isinstance(found, RayOptions) else None
