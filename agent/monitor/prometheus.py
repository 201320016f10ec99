"""Prometheus exposition of the metrics, served over HTTP from a thread.

Each figure of the metrics dict becomes one family: occurrences (``errors.count``,
``state.started`` ...) are counters (``agent_errors_count_total``); measured values are
summaries with 0.5 / 0.95 / 0.99 quantiles, ``_sum`` and ``_count``
(``agent_timing_total_execution_milliseconds``). Live gauges say what runs now. The
exporter uses its own registry, never prometheus_client's global one, and reads the
collector under its lock, so scrapes are safe while runs go on.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from ..errors import MonitorConfigurationError
from .catalogue import MetricType, parse_metric_types
from .collector import MetricsCollector, spec_of
from .realtime import RealTimeMetrics

_UNIT_SUFFIX = {
    "ms": "milliseconds",
    "percent": "percent",
    "mib": "mebibytes",
    "seconds": "seconds",
    "per_second": "per_second",
    "ratio": "ratio",
    "cores": "cores",
    "gpus": "gpus",
    "states": "states",
    "runs": "runs",
    "count": "",
}


_UNIT_ABBREVIATION = {"mib": "_mb", "ms": "_ms"}
"""A unit a metric's own name may end with, abbreviated: the suffix replaces it
(``process_memory_mb`` is ``..._process_memory_mebibytes``, not ``..._mb_mebibytes``)."""


_NAMESPACE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def family_name(namespace: str, category: str, name: str) -> str:
    """The Prometheus name of ``metrics[category][name]``."""
    spec = spec_of(category, name)
    base = f"{namespace}_{category}_{name}".lower()
    suffix = "" if spec.tally else _UNIT_SUFFIX.get(spec.unit, "")
    if not suffix or base.endswith(suffix):
        return base
    abbreviation = _UNIT_ABBREVIATION.get(spec.unit)
    if abbreviation is not None and base.endswith(abbreviation):
        base = base[: -len(abbreviation)]
    return f"{base}_{suffix}"


class MetricsExporter(Collector):
    """A prometheus_client collector over a :class:`MetricsCollector`."""

    def __init__(
        self,
        source: MetricsCollector | RealTimeMetrics,
        metrics: MetricType = MetricType.ALL,
        namespace: str = "agent",
    ) -> None:
        self._source = source.collector if isinstance(source, RealTimeMetrics) else source
        if not isinstance(self._source, MetricsCollector):
            raise MonitorConfigurationError(
                f"export a MetricsCollector or a RealTimeMetrics, got {source!r}"
            )
        self._types = parse_metric_types(metrics)
        if not isinstance(namespace, str) or not _NAMESPACE.fullmatch(namespace) or namespace.startswith("__"):
            raise MonitorConfigurationError(
                f"namespace must be a Prometheus name prefix (letters, digits and _, not starting with a digit "
                f"or __), got {namespace!r}"
            )
        self._ns = namespace

    def collect(self) -> Iterator[Metric]:
        ns = self._ns
        data = self._source.metrics(self._types)
        for category, figures in data.items():
            for name, stats in figures.items():
                spec = spec_of(category, name)
                fname = family_name(ns, category, name)
                if spec.tally:
                    yield CounterMetricFamily(fname, spec.help, value=stats["count"])
                    continue
                family = Metric(fname, f"{spec.help} ({spec.unit})", "summary")
                for q, key in (("0.5", "median"), ("0.95", "p95"), ("0.99", "p99")):
                    family.add_sample(fname, {"quantile": q}, stats[key])
                family.add_sample(fname + "_sum", {}, stats["sum"])
                family.add_sample(fname + "_count", {}, stats["count"])
                yield family
        live = self._source.live()
        runs = GaugeMetricFamily(f"{ns}_runs_active", "runs in progress", labels=["agent"])
        states = GaugeMetricFamily(f"{ns}_states_running", "state attempts running now", labels=["agent"])
        per_agent: dict[str, list[int]] = {}
        for run in live.active:
            counts = per_agent.setdefault(run.agent_name, [0, 0])
            counts[0] += 1
            counts[1] += len(run.running)
        for agent_name, (n_runs, n_states) in sorted(per_agent.items()):
            runs.add_metric([agent_name], n_runs)
            states.add_metric([agent_name], n_states)
        yield runs
        yield states


class PrometheusExporter:
    """An HTTP endpoint serving the metrics in the Prometheus text format."""

    def __init__(self, server: Any, thread: threading.Thread, registry: CollectorRegistry) -> None:
        self.server = server
        self.registry = registry
        self._thread = thread

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    @property
    def address(self) -> str:
        return str(self.server.server_address[0])

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving, close the socket and join the server's threads (its requests' too)."""
        self.server.shutdown()
        self.server.server_close()
        self._thread.join()

    def __enter__(self) -> "PrometheusExporter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_prometheus_exporter(
    source: MetricsCollector | RealTimeMetrics,
    port: int = 0,
    addr: str = "127.0.0.1",
    metrics: MetricType = MetricType.ALL,
    namespace: str = "agent",
) -> PrometheusExporter:
    """Serve ``source``'s metrics on ``http://addr:port/metrics`` (port 0 picks a free one)."""
    from prometheus_client import start_http_server

    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise MonitorConfigurationError(f"port must be an int in 0..65535, got {port!r}")
    if not isinstance(addr, str) or not addr:
        raise MonitorConfigurationError(f"addr must be a host name or address (a str), got {addr!r}")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MetricsExporter(source, metrics, namespace))
    server, thread = start_http_server(port, addr=addr, registry=registry)
    # Its request threads are daemons it never joins: one could outlive close(), still
    # answering. Joined instead (each scrape is short), nothing of it is left after close().
    server.daemon_threads = False
    return PrometheusExporter(server, thread, registry)
