"""When a failed attempt is tried again (DESIGN.md item 6)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from . import _validate
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

    ``rng`` is where the jitter is drawn from: a :class:`random.Random` (seeded, for a
    reproducible schedule) or any object with a ``uniform(a, b)`` method like it.
    """

    max_retries: int = 3
    initial_delay: float = 1.0
    max_delay: float = 60.0
    exponential_base: float = 2.0
    jitter: bool = True
    retry_permanent: bool = False
    rng: random.Random = field(default_factory=random.Random, repr=False, compare=False)

    def __post_init__(self) -> None:
        error = InvalidConfigurationError
        _validate.integer(self.max_retries, "RetryPolicy.max_retries", error=error)
        _validate.number(self.initial_delay, "RetryPolicy.initial_delay", error=error, unit="seconds")
        _validate.number(self.max_delay, "RetryPolicy.max_delay", error=error, unit="seconds")
        _validate.number(self.exponential_base, "RetryPolicy.exponential_base", error=error, minimum=1)
        _validate.flag(self.jitter, "RetryPolicy.jitter", error=error)
        _validate.flag(self.retry_permanent, "RetryPolicy.retry_permanent", error=error)
        _validate.methods(self.rng, "RetryPolicy.rng", ("uniform",), error=error,
                          expected="a random.Random-like object with uniform(), e.g. random.Random(7)")

    def backoff(self, retry: int) -> float:
        """The delay ceiling before retry number ``retry`` (1-based), without jitter."""
        try:
            return min(self.max_delay, self.initial_delay * self.exponential_base ** (retry - 1))
        except OverflowError:  # e.g. 2.0 ** 1024: the ceiling has long been reached
            return self.max_delay

    def delay(self, retry: int) -> float:
        """The delay to wait before retry number ``retry`` (1-based)."""
        ceiling = self.backoff(retry)
        return self.rng.uniform(0.0, ceiling) if self.jitter else ceiling


NO_RETRY = RetryPolicy(max_retries=0, initial_delay=0.0, jitter=False)
