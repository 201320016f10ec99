from __future__ import annotations

import math
import statistics
from collections import defaultdict
from decimal import Decimal
from fractions import Fraction

import pytest

from agent.errors import MonitorError
from agent.monitor import MetricAggregation, Tally
from agent.monitor.aggregation import STAT_NAMES, percentile


class TestMetricAggregation:
    """Running statistics are exact below capacity and bounded above it."""

    def test_empty_reports_zero_everywhere(self):
        agg = MetricAggregation()
        assert agg.to_dict() == {name: 0.0 for name in STAT_NAMES}
        assert f"{agg.avg:.2f}" == "0.00"

    def test_exact_statistics(self):
        agg = MetricAggregation()
        values = [5.0, 1.0, 3.0, 2.0, 4.0, 100.0]
        for v in values:
            agg.add(v)
        assert agg.count == 6
        assert agg.sum == sum(values)
        assert agg.min == 1.0 and agg.max == 100.0
        assert agg.avg == pytest.approx(sum(values) / 6)
        assert agg.median == statistics.median(values)
        assert agg.current == 100.0
        assert agg.p95 == pytest.approx(percentile(sorted(values), 0.95))
        assert agg.p99 <= agg.max and agg.p99 > agg.p95

    def test_percentiles_match_linear_interpolation(self):
        agg = MetricAggregation()
        for v in range(1, 101):
            agg.add(v)
        assert agg.median == pytest.approx(50.5)
        assert agg.p95 == pytest.approx(95.05)
        assert agg.p99 == pytest.approx(99.01)

    def test_memory_is_bounded_and_estimate_is_sane(self):
        agg = MetricAggregation(capacity=256)
        for v in range(100_000):
            agg.add(v)
        assert len(agg._sample) == 256
        assert agg.count == 100_000 and agg.max == 99_999 and agg.min == 0
        # a uniform sample of 0..99999: the median lands near the middle
        assert 30_000 < agg.median < 70_000
        assert agg.p99 > agg.median

    def test_usable_in_defaultdict_as_the_spec_does(self):
        metrics = defaultdict(MetricAggregation)
        metrics["throughput_states_per_second"].add(10)
        metrics["throughput_states_per_second"].add(30)
        assert metrics["throughput_states_per_second"].avg == 20
        assert metrics["resources_used_CPU"].avg == 0.0

    def test_rejects_zero_capacity(self):
        with pytest.raises(ValueError, match="capacity"):
            MetricAggregation(capacity=0)


class TestValues:
    """Only finite real numbers are values: anything else raises MonitorError, and changes nothing."""

    @pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, "5", True, False, None, Decimal("1.5"), [1.0],
                                     10**400, -10**400, Fraction(10**400)])
    def test_rejected(self, bad):
        agg = MetricAggregation()
        agg.add(1.0)
        agg.add(3.0)
        with pytest.raises(MonitorError, match="finite real number"):
            agg.add(bad)
        assert agg.count == 2 and agg.sum == 4.0 and agg.avg == 2.0
        assert agg.min == 1.0 and agg.max == 3.0 and agg.current == 3.0 and agg.median == 2.0

    @pytest.mark.parametrize("good", [2, 2.0, Fraction(4, 2), -0.0])
    def test_real_numbers_are_taken_as_floats(self, good):
        agg = MetricAggregation()
        agg.add(good)
        assert agg.count == 1 and agg.sum == float(good) and isinstance(agg.current, float)


class TestQuantile:
    """``quantile(q)`` takes q from 0 to 1: a q past it was read as an index (-1: the
    median of 1, 2, 3, a wrong answer) or raised an IndexError from inside."""

    @pytest.mark.parametrize("q,expected", [(0, 1.0), (0.25, 1.5), (1, 3.0), (Fraction(1, 2), 2.0)])
    def test_in_range(self, q, expected):
        agg = MetricAggregation()
        for value in (1, 2, 3):
            agg.add(value)
        assert agg.quantile(q) == expected

    @pytest.mark.parametrize("q", [-1, -0.01, 1.5, 2.5, 10**400, math.nan, math.inf, "0.5", None, True])
    def test_out_of_range_or_not_a_number(self, q):
        agg = MetricAggregation()
        for value in (1, 2, 3):
            agg.add(value)
        with pytest.raises(MonitorError, match="quantile\\(q\\) takes a number from 0 to 1"):
            agg.quantile(q)


class TestTally:
    """A tally counts occurrences and reads like an aggregation of ones."""

    def test_counts(self):
        tally = Tally()
        assert tally.to_dict()["sum"] == 0.0
        for _ in range(3):
            tally.add()
        stats = tally.to_dict()
        assert stats["count"] == 3 and stats["sum"] == 3.0 and stats["avg"] == 1.0
        assert set(stats) == set(STAT_NAMES)


class TestRatio:
    """A 0/1 aggregation is exact and matches MetricAggregation on the same values."""

    @pytest.mark.parametrize("values", [[], [1], [0], [0, 1, 1, 0, 1], [1] * 19 + [0], [0] * 97 + [1] * 3])
    def test_matches_general_aggregation(self, values):
        from agent.monitor.aggregation import Ratio

        ratio, general = Ratio(), MetricAggregation()
        for v in values:
            ratio.add(v)
            general.add(v)
        expected = general.to_dict()
        got = ratio.to_dict()
        assert set(got) == set(expected)
        for key in expected:
            assert got[key] == pytest.approx(expected[key]), key
