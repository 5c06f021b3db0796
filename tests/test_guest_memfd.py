"""guest_memfd slots (KVM_MEM_GUEST_MEMFD through set_user_memory_region2): binding rules
as Linux 6.18 answers them, in the engine and, where /dev/kvm allows it, in the kernel."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator

import pytest

from memslots import KVM_MEM_GUEST_MEMFD, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, Vm
from memslots.errors import MemslotError

MB = 1 << 20
G = KVM_MEM_GUEST_MEMFD
HVA = 0x10000000


def _engine() -> Vm:
    return Vm(nr_address_spaces=1, private_mem=True)


def _kvm() -> Vm:
    from memslots.kvm import KvmVm

    vm = KvmVm()
    if not vm.limits.private_mem:
        vm.close()
        pytest.skip("this kernel has no guest_memfd for default VMs")
    return vm


@pytest.fixture(params=[pytest.param(_engine, id="engine"),
                        pytest.param(_kvm, id="kvm", marks=pytest.mark.kvm)])  # fmt: skip
def vm(request: pytest.FixtureRequest) -> Iterator[Vm]:
    make: Callable[[], Vm] = request.param
    v = make()
    yield v
    close = getattr(v, "close", None)
    if close is not None:
        close()


def _errno(fn: Callable[[], None]) -> int:
    try:
        fn()
    except MemslotError as exc:
        return exc.errno or 0
    return 0


def test_bind_rules(vm: Vm) -> None:
    fd = vm.create_guest_memfd(4 * MB)
    other = os.memfd_create("not-gmem")
    closed = os.memfd_create("closed")
    os.close(closed)
    try:
        r2 = vm.set_user_memory_region2
        assert _errno(lambda: r2(0, G, 0, MB, HVA, 4096 + 1, fd)) == errno.EINVAL  # unaligned
        assert _errno(lambda: r2(0, G, 0, MB, HVA, 4 * MB, fd)) == errno.EINVAL  # past end
        assert _errno(lambda: r2(0, G, 0, MB, HVA, 0, other)) == errno.EINVAL  # not gmem
        assert _errno(lambda: r2(0, G, 0, MB, HVA, 0, closed)) == errno.EBADF
        assert _errno(lambda: r2(0, G | KVM_MEM_LOG_DIRTY_PAGES, 0, MB, HVA, 0, fd)) == 22
        assert _errno(lambda: r2(0, G | KVM_MEM_READONLY, 0, MB, HVA, 0, fd)) == 22
        assert _errno(lambda: vm.set_user_memory_region(0, G, 0, MB, HVA)) == 22  # v1
        r2(0, G, 0, MB, HVA, 0, fd)
        assert _errno(lambda: r2(1, G, 2 * MB, MB, HVA, MB - 4096, fd)) == 22  # bound range
        r2(1, G, 2 * MB, MB, HVA, MB, fd)
        # guest_memfd slots can only be deleted
        assert _errno(lambda: r2(0, G, 0, MB, HVA, 0, fd)) == errno.EINVAL
        assert _errno(lambda: vm.set_user_memory_region(0, 0, 0, MB, HVA)) == errno.EINVAL
        assert _errno(lambda: vm.set_user_memory_region(0, 1, 0, MB, HVA)) == errno.EINVAL
        assert _errno(lambda: vm.set_user_memory_region(0, 0, 8 * MB, MB, HVA)) == 22
        vm.set_user_memory_region(0, 0, 0, 0, 0)  # delete releases the binding
        r2(2, G, 4 * MB, MB, HVA, 0, fd)
        vm.check_invariants()
    finally:
        os.close(fd)
        os.close(other)


def test_failed_update_releases_the_binding() -> None:
    vm = _engine()
    fd = vm.create_guest_memfd(MB)
    try:
        vm.faults.inject("arch_prepare")
        with pytest.raises(MemslotError):
            vm.set_user_memory_region2(0, G, 0, MB, HVA, 0, fd)
        vm.check_invariants()
        vm.set_user_memory_region2(0, G, 0, MB, HVA, 0, fd)  # the range is free again
        vm.check_invariants()
    finally:
        os.close(fd)


def test_default_engine_refuses_guest_memfd() -> None:
    vm = Vm()
    with pytest.raises(MemslotError) as exc:
        vm.set_user_memory_region2(0, G, 0, MB, HVA, 0, 0)
    assert exc.value.errno == errno.EINVAL
