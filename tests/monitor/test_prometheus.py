from __future__ import annotations

import threading
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent import events as ev
from agent.errors import MonitorConfigurationError
from agent.monitor import MetricType, start_prometheus_exporter
from agent.monitor.prometheus import family_name

from .conftest import Feed


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


class TestPrometheusExporter:
    """Scraping over loopback returns the collector's figures; close leaves nothing behind."""

    def test_scrape(self, feed: Feed, collector, clock):
        feed.emit(ev.RUN_STARTED)
        feed.state("extract", 0.2)
        feed.failure("load", 0.1, attempt=1, final=False)
        feed.emit(ev.STATE_RETRYING, "load", attempt=1, data={"delay": 0.1})
        feed.emit(ev.STATE_STARTED, "load", attempt=2)
        threads_before = set(threading.enumerate())
        with start_prometheus_exporter(collector) as exporter:
            assert exporter.port > 0 and exporter.address == "127.0.0.1"
            samples = scrape(exporter.url)
        assert samples[("agent_errors_count_total", ())] == 1
        assert samples[("agent_retries_count_total", ())] == 1
        assert samples[("agent_timing_total_execution_milliseconds_count", ())] == 1
        assert samples[("agent_timing_total_execution_milliseconds", (("quantile", "0.95"),))] == pytest.approx(200.0)
        assert samples[("agent_runs_active", (("agent", "wf"),))] == 1
        assert samples[("agent_states_running", (("agent", "wf"),))] == 1
        assert ("agent_throughput_states_per_second_count", ()) in samples
        # closed: the port refuses, the server thread is gone
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(exporter.url, timeout=5)
        assert set(threading.enumerate()) <= threads_before

    def test_cumulative_samples_never_go_down(self, feed: Feed, collector, clock):
        # A drop of a summary's _sum or _count between scrapes reads to rate() as a reset.
        feed.emit(ev.RUN_STARTED)
        for name in "abcd":
            feed.state(name, 0.5)
        assert collector.sample()  # 2 states per second
        with start_prometheus_exporter(collector) as exporter:
            before = scrape(exporter.url)
            clock.advance(0.01)  # a last window of 10 ms where nothing completes
            feed.emit(ev.RUN_FINISHED, status="completed")
            assert collector.sample(final=True)
            after = scrape(exporter.url)
        cumulative = [key for key in before if key[0].endswith(("_sum", "_count", "_total"))]
        assert ("agent_throughput_states_per_second_sum", ()) in cumulative
        assert [(key, before[key], after[key]) for key in cumulative if after[key] < before[key]] == []

    def test_selected_types_and_namespace(self, collector):
        with start_prometheus_exporter(collector, metrics=MetricType.ERRORS, namespace="wf") as exporter:
            names = {name for name, _ in scrape(exporter.url)}
        assert "wf_errors_count_total" in names
        assert not any(name.startswith("wf_timing") for name in names)

    def test_names(self):
        assert family_name("agent", "resources", "used_CPU") == "agent_resources_used_cpu_percent"
        assert family_name("agent", "throughput", "states_per_second") == "agent_throughput_states_per_second"
        assert family_name("agent", "errors", "count") == "agent_errors_count"
        # A unit the metric's name already abbreviates is said once, in full.
        assert family_name("agent", "resources", "process_memory_mb") == "agent_resources_process_memory_mebibytes"
        assert family_name("agent", "timing", "total_execution") == "agent_timing_total_execution_milliseconds"

    @pytest.mark.parametrize("kwargs", [{"port": 70000}, {"port": True}, {"addr": 5}, {"addr": ""}])
    def test_bad_port_or_address(self, collector, kwargs):
        with pytest.raises(MonitorConfigurationError, match="port|addr"):
            start_prometheus_exporter(collector, **kwargs)

    @pytest.mark.parametrize("namespace", ["bad-ns", 5, "", "__reserved", "9lives"])
    def test_bad_namespace(self, collector, namespace):
        with pytest.raises(MonitorConfigurationError, match="namespace"):
            start_prometheus_exporter(collector, namespace=namespace)

    def test_bad_source(self):
        with pytest.raises(MonitorConfigurationError, match="MetricsCollector"):
            start_prometheus_exporter(object())
