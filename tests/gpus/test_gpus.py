"""GPU inventory, allocation and pinning."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import GPUUnavailableError, ResourceError, ResourceRequestError
from agent.devices import (
    GPUAllocator,
    GPUDevice,
    GPUInventory,
    NvmlInventory,
    StaticInventory,
    assignment,
    machine_inventory,
)
from agent.supervisor.gpus import device_minors, pinning_env


def make_gpus(n: int) -> list[GPUDevice]:
    return [
        GPUDevice(
            index=i,
            uuid=f"GPU-0000000{i}-aaaa-bbbb-cccc-dddddddddddd",
            name="Test GPU",
            memory_total_mb=81920,
            pci_bus_id=f"00000000:0{i}:00.0",
            minor_number=i,
        )
        for i in range(n)
    ]


def allocator(n: int) -> GPUAllocator:
    return GPUAllocator(StaticInventory(make_gpus(n)))


class TestInventory:
    """Inventories list devices and say why there are none."""

    def test_static_inventory_is_an_inventory(self) -> None:
        inv = StaticInventory(make_gpus(2))
        assert isinstance(inv, GPUInventory)
        assert [d.index for d in inv.devices()] == [0, 1]
        assert inv.unavailable_reason is None

    def test_nvml_without_a_driver_has_zero_gpus_and_a_reason(self) -> None:
        inv = NvmlInventory()
        if inv.devices():
            pytest.skip("this machine has an NVIDIA driver")
        assert "NVML library not found" in (inv.unavailable_reason or "")

    def test_machine_inventory_is_shared_per_process(self) -> None:
        assert machine_inventory() is machine_inventory()

    def test_machine_gpus_in_the_resource_pool_come_from_the_inventory(self) -> None:
        from agent.resources import ResourcePool, ResourceType

        assert ResourcePool().totals[ResourceType.GPU] == float(len(machine_inventory().devices()))


class TestWholeGPUs:
    """gpu_units >= 1 takes whole, otherwise unused GPUs."""

    def test_whole_gpus_are_distinct_and_exclusive(self) -> None:
        alloc = allocator(4)
        a = alloc.allocate("a", 2)
        b = alloc.allocate("b", 2)
        assert a is not None and b is not None
        assert {d.index for d in a}.isdisjoint({d.index for d in b})
        assert alloc.allocate("c", 1) is None

    def test_a_whole_gpu_is_not_given_when_a_fraction_uses_it(self) -> None:
        alloc = allocator(1)
        assert alloc.allocate("frac", 0.25) is not None
        assert alloc.allocate("whole", 1) is None
        alloc.release("frac")
        assert [d.index for d in alloc.allocate("whole", 1) or []] == [0]

    def test_release_makes_room_again(self) -> None:
        alloc = allocator(1)
        assert alloc.allocate("a", 1) is not None
        assert alloc.allocate("b", 1) is None
        alloc.release("a")
        assert alloc.assigned("a") == []
        assert alloc.allocate("b", 1) is not None

    def test_zero_units_need_no_gpu(self) -> None:
        assert allocator(0).allocate("cpu-only", 0) == []

    def test_an_owner_cannot_allocate_twice(self) -> None:
        alloc = allocator(2)
        alloc.allocate("a", 1)
        with pytest.raises(ResourceError, match="already holds"):
            alloc.allocate("a", 1)


class TestFractionalGPUs:
    """Fractions pack onto the fullest GPU that still has room."""

    def test_fractions_pack_together(self) -> None:
        alloc = allocator(2)
        placed = [alloc.allocate(f"s{i}", 0.25) for i in range(4)]
        assert {d.index for p in placed for d in p or []} == {0}
        # the second GPU stayed whole
        assert [d.index for d in alloc.allocate("whole", 1) or []] == [1]

    def test_best_fit_prefers_the_least_remaining_share(self) -> None:
        alloc = allocator(3)
        alloc.allocate("big", 0.7)  # GPU 0: 0.3 left
        alloc.allocate("mid", 0.5)  # 0.5 does not fit on GPU 0 -> GPU 1: 0.5 left
        got = alloc.allocate("small", 0.3)
        assert [d.index for d in got or []] == [0]  # 0.3 left on GPU 0 beats 0.5 on GPU 1
        assert alloc.used_share() == pytest.approx({0: 1.0, 1: 0.5, 2: 0.0})

    def test_fractions_never_overcommit(self) -> None:
        alloc = allocator(1)
        assert alloc.allocate("a", 0.6) is not None
        assert alloc.allocate("b", 0.5) is None
        assert alloc.allocate("c", 0.4) is not None
        assert alloc.allocate("d", 0.01) is None


class TestImpossibleRequests:
    """Requests that can never fit raise a typed error that says what to do."""

    def test_any_gpu_request_without_gpus_raises_with_the_reason(self) -> None:
        alloc = GPUAllocator(StaticInventory([], unavailable_reason="NVML library not found"))
        with pytest.raises(GPUUnavailableError, match="no GPUs.*NVML library not found"):
            alloc.allocate("a", 0.5)

    def test_more_gpus_than_exist_raises(self) -> None:
        with pytest.raises(GPUUnavailableError, match="only 2 GPU"):
            allocator(2).allocate("a", 3)

    @pytest.mark.parametrize("units", [-1, 1.5, float("nan"), True, "1", 1e-10])
    def test_malformed_units_raise(self, units: object) -> None:
        with pytest.raises(ResourceRequestError):
            allocator(2).allocate("a", units)  # type: ignore[arg-type]

    def test_a_tiny_share_is_refused_rather_than_read_as_a_free_gpu(self) -> None:
        with pytest.raises(ResourceRequestError, match="a share of a GPU is at least 0.01"):
            allocator(2).allocate("tiny", 1e-10)
        alloc = allocator(2)
        alloc.allocate("small", 0.01)
        assert [d.index for d in alloc.allocate("whole", 2) or []] == []  # GPU 0 is in use: not both free


class TestPinning:
    """A child sees exactly its GPUs, by UUID, in PCI order."""

    def test_pinning_env_lists_uuids(self) -> None:
        gpus = make_gpus(3)
        env = pinning_env([gpus[2].uuid, gpus[0].uuid])
        assert env == {
            "CUDA_VISIBLE_DEVICES": f"{gpus[2].uuid},{gpus[0].uuid}",
            "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        }

    def test_no_gpus_means_cuda_sees_none(self) -> None:
        assert pinning_env([])["CUDA_VISIBLE_DEVICES"] == ""

    def test_assignment_for_an_attempt(self) -> None:
        gpus = make_gpus(3)
        assert assignment([gpus[2]]) == {"gpus": [gpus[2].uuid], "gpu_minors": [2]}
        assert assignment([]) == {"gpus": [], "gpu_minors": []}

    def test_device_minors_for_the_devices_cgroup(self) -> None:
        gpus = make_gpus(4)
        assert device_minors([gpus[3], gpus[1]]) == [1, 3]


_requests = st.lists(
    st.tuples(
        st.booleans(),
        st.integers(min_value=0, max_value=7),
        st.sampled_from([0.1, 0.125, 0.25, 0.3, 1 / 3, 0.5, 0.75, 0.9, 1, 2, 3]),
    ),
    max_size=60,
)


class TestAllocatorProperties:
    """Random allocate/release sequences never exceed any GPU's capacity."""

    @settings(max_examples=200, deadline=None)
    @given(_requests)
    def test_never_over_committed(self, ops: list[tuple[bool, int, float]]) -> None:
        alloc = allocator(3)
        held: dict[str, tuple[float, list[GPUDevice]]] = {}
        for is_release, who, units in ops:
            owner = f"o{who}"
            if is_release:
                alloc.release(owner)
                held.pop(owner, None)
                continue
            if owner in held:
                continue
            got = alloc.allocate(owner, units)
            if got is None:
                continue
            held[owner] = (units, got)
            assert len(got) == (int(units) if units >= 1 else 1)
            assert len({d.index for d in got}) == len(got)
            load = {i: 0.0 for i in range(3)}
            for u, devs in held.values():
                for d in devs:
                    load[d.index] += min(u, 1.0)
            assert all(v <= 1.0 + 1e-9 for v in load.values())
            # a whole GPU is never shared
            for u, devs in held.values():
                if u >= 1:
                    for d in devs:
                        assert load[d.index] == 1.0


@pytest.mark.gpu
class TestRealNvml:
    """On a machine with an NVIDIA driver, NVML lists real GPUs."""

    def test_nvml_lists_devices(self) -> None:
        inv = NvmlInventory()
        devices = inv.devices()
        if not devices:
            pytest.skip(f"no NVIDIA GPU here: {inv.unavailable_reason}")
        for d in devices:
            assert d.uuid.startswith(("GPU-", "MIG-"))
            assert d.memory_total_mb > 0
            assert d.minor_number >= 0
        alloc = GPUAllocator(inv)
        got = alloc.allocate("one", 1)
        assert got is not None and pinning_env([got[0].uuid])["CUDA_VISIBLE_DEVICES"] == got[0].uuid


def test_a_pool_made_without_gpus_says_so_on_a_machine_with_them() -> None:
    from agent import ResourcePool, ResourceRequirements

    pool = ResourcePool(total_gpu=0, gpu_inventory=StaticInventory(make_gpus(2)))
    with pytest.raises(GPUUnavailableError, match="this pool was made with total_gpu=0 \\(this machine has 2\\)"):
        pool.check_request(ResourceRequirements(gpu_units=1), "train")
