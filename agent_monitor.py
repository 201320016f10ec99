"""``from agent_monitor import agent_monitor, MetricType, ...`` as the documentation writes it.

The implementation lives in :mod:`agent.monitor`; this module only re-exports it.
"""

from agent.monitor import (
    CATALOGUE,
    LiveSnapshot,
    MetricAggregation,
    MetricSpec,
    MetricsCollector,
    MetricType,
    ProcessSampler,
    ThisProcess,
    RealTimeMetrics,
    RunView,
    StateView,
    Tally,
    agent_monitor,
)

__all__ = [
    "agent_monitor",
    "CATALOGUE",
    "LiveSnapshot",
    "MetricAggregation",
    "MetricsCollector",
    "MetricSpec",
    "MetricType",
    "ProcessSampler",
    "RealTimeMetrics",
    "RunView",
    "StateView",
    "Tally",
    "ThisProcess",
]


def __getattr__(name: str):
    if name in ("PrometheusExporter", "start_prometheus_exporter"):
        import agent.monitor

        return getattr(agent.monitor, name)  # not in __all__: it needs the optional prometheus_client
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
