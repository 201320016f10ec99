"""Metrics of agent runs: aggregation, the ``@agent_monitor`` decorator, real-time
subscribers, a Prometheus exporter and the ``agent top`` live view.

Everything here is fed by the engine's run events (:mod:`agent.events`); nothing is
collected, and nothing costs, while no monitor is attached.
"""

from .aggregation import MetricAggregation, Tally
from .catalogue import CATALOGUE, MetricSpec, MetricType
from .collector import LiveSnapshot, MetricsCollector, RunView, StateView
from .decorator import agent_monitor
from .process import ProcessSampler, ThisProcess
from .realtime import RealTimeMetrics

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


def __getattr__(name: str):  # prometheus_client is imported only when it is asked for
    if name in ("PrometheusExporter", "start_prometheus_exporter"):
        try:
            from . import prometheus
        except ImportError as exc:
            from ..errors import MonitorError

            raise MonitorError(
                f"the Prometheus exporter needs prometheus_client ({exc}): "
                "pip install 'agent-isolation[monitor]'"
            ) from exc
        return getattr(prometheus, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
