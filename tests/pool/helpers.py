"""What the pool tests share: a request of given amounts, and a clock they move by hand."""

from __future__ import annotations

from agent.resources import Priority, ResourceRequirements


def req(cpu: float = 1.0, memory: float = 0.0, gpu: float = 0.0, priority: Priority = Priority.NORMAL,
        ) -> ResourceRequirements:
    """A request of these amounts, without IO or network weight."""
    return ResourceRequirements(
        cpu_units=cpu, memory_mb=memory, io_weight=0, network_weight=0, gpu_units=gpu, priority=priority
    )


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
