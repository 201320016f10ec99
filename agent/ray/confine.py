"""Kernel limits inside a Ray task: the state runs in a confined child on the node.

Ray's ``num_cpus`` and ``memory`` are bookkeeping for placement: nothing stops a task from
using every core and all the memory of its node. A state declared with
``ray_options(isolation="process")`` (or ``"sandbox"``) is therefore run, inside its Ray
task, by this package's own process executor on that node: a child forked from a zygote
the Ray worker keeps, in a cgroup of its own with the state's ``ResourceRequirements`` as
limits (CPU quota, memory without swap, pids, IO), exactly as ``isolation="process"``
does on one box. Its context writes and human-input requests pass through the Ray task
to the driver as usual; a limit kill comes back as the same ``limit`` failure.

It needs what ``agent doctor`` reports on the node: the package installed there, and
cgroups the Ray worker may write (root, or a delegated cgroup v2 subtree); the sandbox
also needs root and its uid range. Where the node has no cgroups, the supervisor falls
back to rlimits and a watchdog, and says so. GPUs Ray assigned to the task are pinned
by UUID when the node's NVML inventory knows them.
"""

from __future__ import annotations

import os
from typing import Any

from ..context import Context
from ..executor import Attempt, Isolation

async def run_confined(func: Any, context: Context, run: Any, isolation: str, resources: Any) -> tuple[Any, dict]:
    """Run the state in a confined child of this node's supervisor; its result and measured usage.

    Raises :class:`~agent.executor.AttemptFailed` as the process executor does (a limit
    kill, a crash, the state's exception). The child's output is copied to this task's.
    """
    from ..errors import AttemptLogNotFoundError
    from ..supervisor import get_executor, read_attempt_log
    from ..supervisor.output import set_writer

    set_writer(None)  # the child's output is copied below, once: not echoed as well
    level = Isolation.parse(isolation)
    attempt = Attempt(
        run_id=run.run_id, agent_name=run.agent_name, state_name=run.state_name, func=func,
        number=run.attempt, context=context, resources=resources, isolation=level,
        assignment=gpu_assignment(),
    )
    try:
        outcome = await get_executor(level).run_attempt(attempt)
    finally:
        try:
            text = read_attempt_log(run.run_id, run.state_name, run.attempt)
        except AttemptLogNotFoundError:
            text = ""
        if text:
            os.write(1, text.encode("utf-8", "replace"))
    return outcome.result, outcome.usage


def gpu_assignment() -> dict[str, list[Any]]:
    """The GPUs Ray assigned to this task, as the supervisor's assignment (those NVML knows)."""
    import ray

    ids = [str(i) for i in ray.get_gpu_ids()]
    if not ids:
        return {}
    from ..devices import machine_inventory

    by_index = {str(d.index): d for d in machine_inventory().devices()}
    devices = [by_index[i] for i in ids if i in by_index]
    return {"gpus": [d.uuid for d in devices], "gpu_minors": [d.minor_number for d in devices]}
