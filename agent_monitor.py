"""``from agent_monitor import agent_monitor, MetricType, ...`` as the documentation writes it.

The implementation lives in :mod:`agent.monitor`; this module only re-exports its public names.
"""

from agent.monitor import *  # noqa: F403 - the re-export is the point
from agent.monitor import __all__ as __all__


def __getattr__(name: str):  # the exporter needs the optional prometheus_client: resolved on use
    import agent.monitor

    return getattr(agent.monitor, name)
