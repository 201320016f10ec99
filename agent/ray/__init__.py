"""More than one machine: states that run as Ray tasks (``isolation="ray"``).

``Agent(name, isolation="ray")`` (or ``add_state(..., isolation="ray")``) runs each
attempt of a state as one Ray task on the cluster this process is connected to; see
:mod:`agent.ray.executor` for what maps to what, :mod:`agent.ray.cluster` for how the
cluster is found. This package's names do not import Ray until they are used:

* :func:`ray_options` declares Ray-only settings of a state (custom resources, placement);
* :func:`cluster_pool` makes a :class:`~agent.ResourcePool` the size of the cluster, so
  that our admission decides what runs when across the cluster, not this machine.
"""

from __future__ import annotations

from typing import Any

from .options import RayOptions, ray_options


def cluster_pool(**settings: Any) -> Any:
    """A :class:`~agent.ResourcePool` holding the CPUs, memory and GPUs of the cluster's alive nodes.

    Connects to the cluster first (see :mod:`agent.ray.cluster`). GPUs are counted, not
    assigned as devices here: Ray assigns them on the node that runs the state.
    ``settings`` go to ``ResourcePool`` (``enable_preemption=True``, ...). The pool is a
    snapshot: make a new one when the cluster grows.
    """
    from ..devices import StaticInventory
    from ..resources import ResourcePool
    from .cluster import connect
    from .executor import get_executor

    connect()
    totals = get_executor().capacity.totals()
    pool = ResourcePool(
        total_cpu=totals.get("CPU", 0.0),
        total_memory=totals.get("memory", 0.0) / (1024 * 1024),
        total_gpu=totals.get("GPU", 0.0),
        gpu_inventory=StaticInventory((), "the GPUs are on the Ray cluster's nodes"),
        **settings,
    )
    pool._no_gpus = ("no alive node of the Ray cluster has one: drop gpu_units, or add a node with GPUs "
                     "to the cluster and make a new cluster_pool()")
    return pool


__all__ = ["RayOptions", "cluster_pool", "ray_options"]
