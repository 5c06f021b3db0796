"""guest_memfd slots (KVM_MEM_GUEST_MEMFD through set_user_memory_region2): binding rules
as Linux 6.18 answers them, in the engine and, where /dev/kvm allows it, in the kernel."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator

import pytest

from conftest import AnyVm
from memslots import KVM_MEM_GUEST_MEMFD, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, Vm
from memslots.errors import MemslotError

MB = 1 << 20
PAGE = 4096
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


def test_bind_ranges_at_the_end_of_the_file(vm: AnyVm) -> None:
    """``kvm_gmem_bind``: ``offset + size > i_size`` is EINVAL, so a range may end exactly
    at the file's end but not one page past it."""
    fd = vm.create_guest_memfd(4 * MB)
    try:
        r2 = vm.set_user_memory_region2
        assert _errno(lambda: r2(1, G, 8 * MB, MB, HVA, 3 * MB + PAGE, fd)) == errno.EINVAL
        assert _errno(lambda: r2(1, G, 8 * MB, PAGE, HVA, 4 * MB, fd)) == errno.EINVAL
        assert _errno(lambda: r2(1, G, 8 * MB, 2 * PAGE, HVA, 4 * MB - PAGE, fd)) == 22
        r2(1, G, 8 * MB, PAGE, HVA, 4 * MB - PAGE, fd)  # the last page alone
        r2(0, G, 0, MB, HVA, 3 * MB - PAGE, fd)  # ends where slot 1's page begins
        assert _errno(lambda: r2(2, G, 16 * MB, MB, HVA, 3 * MB, fd)) == errno.EINVAL
        vm.set_user_memory_region(1, 0, 0, 0, 0)
        r2(2, G, 16 * MB, PAGE, HVA, 4 * MB - PAGE, fd)  # the page is free again
        assert [(s.id, s.npages) for s in vm.slots()] == [(0, 256), (2, 1)]
        vm.check_invariants()
    finally:
        os.close(fd)


def test_two_bindings_that_share_exactly_one_page(vm: AnyVm) -> None:
    """Bindings of one file may touch but not share a page (EINVAL), whichever side the
    shared page is on; other files and released ranges do not count."""
    fd = vm.create_guest_memfd(4 * MB)
    other = vm.create_guest_memfd(4 * MB)
    try:
        r2 = vm.set_user_memory_region2
        r2(0, G, 0, MB, HVA, MB, fd)  # file pages [256, 512)
        # one page in common: slot 0's first page, then its last page
        assert _errno(lambda: r2(1, G, 4 * MB, MB + PAGE, HVA, 0, fd)) == errno.EINVAL
        assert _errno(lambda: r2(1, G, 4 * MB, MB, HVA, 2 * MB - PAGE, fd)) == errno.EINVAL
        assert _errno(lambda: r2(1, G, 4 * MB, PAGE, HVA, MB, fd)) == errno.EINVAL
        assert _errno(lambda: r2(1, G, 4 * MB, PAGE, HVA, 2 * MB - PAGE, fd)) == errno.EINVAL
        r2(1, G, 4 * MB, MB, HVA, 0, fd)  # [0, 256): touches slot 0 from below
        r2(2, G, 8 * MB, MB, HVA, 2 * MB, fd)  # [512, 768): touches it from above
        r2(3, G, 12 * MB, MB, HVA, MB, other)  # the same pages of another file
        vm.set_user_memory_region(0, 0, 0, 0, 0)  # releases [256, 512)
        assert _errno(lambda: r2(4, G, 16 * MB, MB + PAGE, HVA, MB - PAGE, fd)) == 22
        r2(4, G, 16 * MB, MB, HVA, MB, fd)
        assert [s.id for s in vm.slots()] == [1, 2, 3, 4]
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
