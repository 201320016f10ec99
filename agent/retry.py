"""When a failed attempt is tried again (DESIGN.md item 6)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from .errors import InvalidConfigurationError


@dataclass
class RetryPolicy:
    """Retries after the first attempt, with exponential backoff and optional full jitter.

    ``max_retries`` counts retries, so 0 means one attempt. The delay before retry
    ``n`` (1-based) is ``min(max_delay, initial_delay * exponential_base ** (n - 1))``;
    with ``jitter`` it is drawn uniformly from ``[0, that]`` ("full jitter").

    A permanent failure (:attr:`~agent.errors.FailureReason.permanent`: a kernel limit,
    a bound, a protocol violation, a cgroup escape, a value the model cannot carry) would
    fail the same way again, so it is not retried unless ``retry_permanent`` is True.
    """

    max_retries: int = 3
    initial_delay: float = 1.0
    max_delay: float = 60.0
    exponential_base: float = 2.0
    jitter: bool = True
    retry_permanent: bool = False
    rng: random.Random = field(default_factory=random.Random, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.max_retries, int) or isinstance(self.max_retries, bool) or self.max_retries < 0:
            raise InvalidConfigurationError(f"max_retries must be an int >= 0, got {self.max_retries!r}")
        for name in ("initial_delay", "max_delay"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0:
                raise InvalidConfigurationError(f"RetryPolicy.{name} must be >= 0 seconds, got {value!r}")
        if not isinstance(self.exponential_base, (int, float)) or self.exponential_base < 1:
            raise InvalidConfigurationError(
                f"RetryPolicy.exponential_base must be >= 1, got {self.exponential_base!r}"
            )
        if not isinstance(self.retry_permanent, bool):
            raise InvalidConfigurationError(
                f"RetryPolicy.retry_permanent must be True or False, got {self.retry_permanent!r}"
            )

    def backoff(self, retry: int) -> float:
        """The delay ceiling before retry number ``retry`` (1-based), without jitter."""
        return min(self.max_delay, self.initial_delay * self.exponential_base ** (retry - 1))

    def delay(self, retry: int) -> float:
        """The delay to wait before retry number ``retry`` (1-based)."""
        ceiling = self.backoff(retry)
        return self.rng.uniform(0.0, ceiling) if self.jitter else ceiling


NO_RETRY = RetryPolicy(max_retries=0, initial_delay=0.0, jitter=False)
