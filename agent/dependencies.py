"""How one state depends on another (DESIGN.md item 5)."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import _validate
from .errors import InvalidConfigurationError


class DependencyType(str, enum.Enum):
    """When a dependency counts as met.

    REQUIRED: the dependency completed (if it fails for good, the dependent is BLOCKED).
    OPTIONAL: waits only while the dependency is scheduled or running.
    PARALLEL: the dependency has started (the dependent runs alongside it).
    SEQUENTIAL: the dependency finished, successfully or not.
    """

    REQUIRED = "required"
    OPTIONAL = "optional"
    PARALLEL = "parallel"
    SEQUENTIAL = "sequential"


class DependencyLifecycle(str, enum.Enum):
    """How long a met dependency stays met.

    ONCE: for the rest of the run; the dependent is triggered once.
    ALWAYS: each run of the dependent consumes it; a new completion triggers it again.
    SESSION: completions in earlier runs of the same Agent object count too.
    TEMPORARY: met for ``expiry`` seconds after the dependency completed.
    PERIODIC: like ALWAYS, but the dependent runs no more often than every ``interval`` s.
    """

    ONCE = "once"
    ALWAYS = "always"
    SESSION = "session"
    TEMPORARY = "temporary"
    PERIODIC = "periodic"


@dataclass
class DependencyConfig:
    """A dependency with a lifecycle, an optional condition and a wait timeout."""

    type: DependencyType = DependencyType.REQUIRED
    lifecycle: DependencyLifecycle = DependencyLifecycle.ONCE
    condition: Callable[[Any], bool] | None = None
    expiry: float | None = None
    interval: float | None = None
    timeout: float | None = None

    def __post_init__(self) -> None:
        error = InvalidConfigurationError
        self.type = _validate.member(DependencyType, self.type, "DependencyConfig.type", error=error)
        self.lifecycle = _validate.member(
            DependencyLifecycle, self.lifecycle, "DependencyConfig.lifecycle", error=error,
        )
        for name in ("expiry", "interval", "timeout"):
            _validate.number(getattr(self, name), f"DependencyConfig.{name}", error=error, none=True,
                             unit="seconds")
        if self.lifecycle is DependencyLifecycle.TEMPORARY and self.expiry is None:
            raise InvalidConfigurationError("a TEMPORARY dependency needs expiry= (seconds it stays met)")
        if self.lifecycle is DependencyLifecycle.PERIODIC and not self.interval:
            raise InvalidConfigurationError(
                "a PERIODIC dependency needs interval= (seconds > 0 between re-runs); without one, "
                "use DependencyLifecycle.ALWAYS")
        if self.condition is not None:
            if not callable(self.condition):
                raise InvalidConfigurationError(
                    "DependencyConfig.condition must be callable: condition(agent) -> bool")
            # The scheduler calls it, with the agent, each time it looks.
            _validate.one_argument(
                self.condition, "DependencyConfig.condition", error=InvalidConfigurationError,
                takes="the agent: condition(agent) -> bool",
                not_async="the scheduler looks at a condition without waiting; make it a plain def reading the "
                          "agent (its context, its states' status), and have a state do what must be awaited")

    @classmethod
    def of(cls, value: "DependencyConfig | DependencyType | str") -> "DependencyConfig":
        if isinstance(value, DependencyConfig):
            return value
        try:
            return cls(type=DependencyType(value))
        except ValueError:
            raise InvalidConfigurationError(
                f"a dependency is a DependencyType or a DependencyConfig, got {value!r}"
            ) from None
