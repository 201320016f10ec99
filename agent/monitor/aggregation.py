"""Running statistics of one metric, in bounded memory.

``count``, ``sum``, ``min``, ``max``, ``avg`` and ``current`` (the last value added) are
exact. ``median``, ``p95`` and ``p99`` come from a uniform reservoir sample (Vitter's
algorithm R) of at most ``capacity`` values: exact while fewer values than that were
added, an unbiased estimate afterwards. Memory stays at ``capacity`` floats however
long a workflow runs. An empty aggregation reports 0.0 everywhere, so code that formats
the figures (``f"{m.avg:.2f}"``) works before the first value arrives.

A value once added is never changed or taken back: ``count`` only grows and ``sum`` moves
only by the values added, as a Prometheus summary's ``_count`` and ``_sum`` must (a drop
between two scrapes reads to ``rate()`` as a reset). Figures taken once per update window
follow the same rule: see :meth:`~agent.monitor.collector.MetricsCollector.sample`.

Values must be finite real numbers (ints, floats, numpy scalars; not bools): anything
else raises :class:`~agent.errors.MonitorError`, since one NaN would poison the average
and a string or a flag is a bug in the caller, not a measurement.
"""

from __future__ import annotations

import math
import numbers
import random

from .. import _validate
from ..errors import MonitorConfigurationError, MonitorError

STAT_NAMES = ("count", "sum", "min", "max", "avg", "median", "p95", "p99", "current")

DEFAULT_CAPACITY = 1024


def percentile(ordered: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of sorted values, linearly interpolated (numpy's default)."""
    if not ordered:
        return 0.0
    pos = (len(ordered) - 1) * q
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    frac = pos - low
    return ordered[low] + (ordered[high] - ordered[low]) * frac


def _number(value: object) -> float:
    """``value`` as a float, or MonitorError when it is not a finite real number (bools excluded)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise MonitorError(
            f"a metric value must be a finite real number (int or float), got {value!r} "
            f"of type {type(value).__name__}"
        )
    number = _validate.finite_float(value)  # 10**400, or a Fraction as large: inf, refused below
    if not math.isfinite(number):
        raise MonitorError(f"a metric value must be a finite real number, got {_validate.shown(value)}")
    return number


class MetricAggregation:
    """Count, sum, min, max, average, median and tail percentiles of added values."""

    __slots__ = ("count", "sum", "_min", "_max", "current", "_sample", "_sorted", "_capacity", "_rng")

    def __init__(self, capacity: int = DEFAULT_CAPACITY, seed: int = 0) -> None:
        _validate.integer(capacity, "MetricAggregation capacity", error=MonitorConfigurationError, minimum=1)
        self.count = 0
        self.sum = 0.0
        self._min = math.inf
        self._max = -math.inf
        self.current = 0.0
        self._sample: list[float] = []
        self._sorted: list[float] | None = None
        self._capacity = capacity
        self._rng = random.Random(seed)

    def add(self, value: float) -> int:
        """Record one value: a finite real number, else :class:`~agent.errors.MonitorError`.
        Returns where the sample keeps it (-1: not kept)."""
        if type(value) is not float or value - value != 0.0:  # NaN and infinities give NaN here
            value = _number(value)
        self.count += 1
        self.sum += value
        if value < self._min:
            self._min = value
        if value > self._max:
            self._max = value
        self.current = value
        sample = self._sample
        if len(sample) < self._capacity:
            sample.append(value)
            self._sorted = None
            return len(sample) - 1
        slot = int(self._rng.random() * self.count)
        if slot < self._capacity:
            sample[slot] = value
            self._sorted = None
            return slot
        return -1

    @property
    def min(self) -> float:
        return self._min if self.count else 0.0

    @property
    def max(self) -> float:
        return self._max if self.count else 0.0

    @property
    def avg(self) -> float:
        return self.sum / self.count if self.count else 0.0

    def quantile(self, q: float) -> float:
        """The ``q`` quantile (0..1) of the values seen (estimated past ``capacity``);
        a ``q`` outside 0..1 raises :class:`~agent.errors.MonitorError`."""
        if type(q) is not float or not 0.0 <= q <= 1.0:
            if isinstance(q, bool) or not isinstance(q, numbers.Real) or not 0 <= q <= 1:
                raise MonitorError(f"quantile(q) takes a number from 0 to 1 (0.5: the median), got "
                                   f"{_validate.shown(q)}")
            q = float(q)
        if self._sorted is None:
            self._sorted = sorted(self._sample)
        return percentile(self._sorted, q)

    @property
    def median(self) -> float:
        return self.quantile(0.5)

    @property
    def p95(self) -> float:
        return self.quantile(0.95)

    @property
    def p99(self) -> float:
        return self.quantile(0.99)

    def to_dict(self) -> dict[str, float]:
        """Every statistic by name (see ``STAT_NAMES``)."""
        return {
            "count": self.count,
            "sum": self.sum,
            "min": self.min,
            "max": self.max,
            "avg": self.avg,
            "median": self.median,
            "p95": self.p95,
            "p99": self.p99,
            "current": self.current,
        }

    def __repr__(self) -> str:
        return f"MetricAggregation(count={self.count}, avg={self.avg:g}, min={self.min:g}, max={self.max:g})"


class Tally:
    """A counter shaped like :class:`MetricAggregation` where every value added is 1.

    Occurrences (errors, retries, state starts) are counted this way: ``sum`` and
    ``count`` are the number of occurrences. It costs one integer increment.
    """

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0

    def add(self, value: float = 1.0) -> None:
        self.count += 1

    @property
    def sum(self) -> int:
        return self.count

    def to_dict(self) -> dict[str, float]:
        one = 1.0 if self.count else 0.0
        return {
            "count": self.count,
            "sum": self.count,
            "min": one,
            "max": one,
            "avg": one,
            "median": one,
            "p95": one,
            "p99": one,
            "current": one,
        }

    def __repr__(self) -> str:
        return f"Tally(count={self.count})"


class Ratio:
    """An exact aggregation of values that are 0 or 1 (failure rates, success rates).

    Two counters replace the reservoir, so percentiles are exact at any count.
    """

    __slots__ = ("count", "ones", "current")

    def __init__(self) -> None:
        self.count = 0
        self.ones = 0
        self.current = 0.0

    def add(self, value: float) -> None:
        self.count += 1
        if value:
            self.ones += 1
            self.current = 1.0
        else:
            self.current = 0.0

    @property
    def sum(self) -> float:
        return float(self.ones)

    @property
    def avg(self) -> float:
        return self.ones / self.count if self.count else 0.0

    def quantile(self, q: float) -> float:
        if not self.count:
            return 0.0
        zeros = self.count - self.ones
        pos = (self.count - 1) * q
        low = math.floor(pos)
        high = min(low + 1, self.count - 1)
        at_low = 0.0 if low < zeros else 1.0
        at_high = 0.0 if high < zeros else 1.0
        return at_low + (at_high - at_low) * (pos - low)

    def to_dict(self) -> dict[str, float]:
        zeros = self.count - self.ones
        return {
            "count": self.count,
            "sum": float(self.ones),
            "min": 0.0 if zeros else (1.0 if self.count else 0.0),
            "max": 1.0 if self.ones else 0.0,
            "avg": self.avg,
            "median": self.quantile(0.5),
            "p95": self.quantile(0.95),
            "p99": self.quantile(0.99),
            "current": self.current,
        }

    def __repr__(self) -> str:
        return f"Ratio(count={self.count}, avg={self.avg:g})"
