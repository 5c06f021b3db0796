"""The engine with the kernel's page size taken from ``VmLimits.page_shift``: 4 KiB, and the
16 and 64 KiB of arm64 kernels built with ``CONFIG_ARM64_16K_PAGES`` or
``CONFIG_ARM64_64K_PAGES``. Alignment (``kvm_set_memory_region``), page counts and
``KVM_MEM_MAX_NR_PAGES``, gfn -> hva, guest memory across page boundaries, dirty bitmaps,
the dirty ring's minimum size, guest_memfd sizes and offsets, free-space search, and the
probe that measures a kernel in its own pages. (The state-machine tests at these page
sizes are in tests/test_engine_model.py.)"""

from __future__ import annotations

import dataclasses
import errno
import os
from typing import Any

import pytest

from memslots import KVM_MEM_GUEST_MEMFD, KVM_MEM_LOG_DIRTY_PAGES, MemslotError, Vm
from memslots.baseline import ArrayVm
from memslots.constants import KVM_MEM_MAX_NR_PAGES, X86_MAX_GFN
from memslots.kvm import abi
from memslots.profiles import KernelProfile
from memslots.validate import VmLimits

SHIFTS = [12, 14, 16]
HVA = 0x7F0000000000
MB = 1 << 20


def _limits(shift: int, **kw: Any) -> VmLimits:
    return VmLimits(2, 32764, X86_MAX_GFN, page_shift=shift, private_mem=True, **kw)


def _errno(call: Any, *args: Any) -> int:
    try:
        call(*args)
    except MemslotError as exc:
        return exc.errno or 0
    return 0


@pytest.fixture(params=[Vm, ArrayVm], ids=["tree", "array"])
def impl(request: pytest.FixtureRequest) -> Any:
    return request.param


@pytest.mark.parametrize("shift", SHIFTS)
def test_alignment_is_the_kernels_page(impl: Any, shift: int) -> None:
    page = 1 << shift
    vm = impl(profile=_limits(shift))
    set_ = vm.set_user_memory_region
    for bad in range(12, shift):  # aligned for smaller pages only: EINVAL here
        small = 1 << bad
        assert _errno(set_, 0, 0, MB, page + small, HVA) == errno.EINVAL
        assert _errno(set_, 0, 0, MB + small, page, HVA) == errno.EINVAL
        assert _errno(set_, 0, 0, MB, page, HVA + small) == errno.EINVAL
    assert vm.slots() == []
    set_(0, 0, 16 * page, 3 * page, HVA)
    (s,) = vm.slots()
    assert (s.base_gfn, s.npages, s.page_shift) == (16, 3, shift)
    assert (s.guest_phys_addr, s.memory_size) == (16 * page, 3 * page)
    assert s.hva_last == HVA + 3 * page - 1
    assert vm.gfn_to_hva(17) == HVA + page
    assert vm.gfn_to_memslot(19) is None
    # a move keeps the page size; the overlap check counts in pages
    set_(0, 0, 32 * page, 3 * page, HVA)
    assert vm.slots()[0].page_shift == shift
    assert _errno(set_, 1, 0, 34 * page, page, HVA) == errno.EEXIST
    set_(1, 0, 35 * page, page, HVA)
    assert vm.nr_memslot_pages == 4
    vm.check_invariants()


@pytest.mark.parametrize("shift", SHIFTS)
def test_max_nr_pages_counts_pages_of_the_kernel(shift: int) -> None:
    vm = Vm(profile=_limits(shift))
    most = KVM_MEM_MAX_NR_PAGES << shift
    assert _errno(vm.set_user_memory_region, 0, 0, 0, most + (1 << shift), 0) == errno.EINVAL
    vm.set_user_memory_region(0, 0, 0, most, 0)
    assert vm.slots()[0].npages == KVM_MEM_MAX_NR_PAGES


def test_limits_take_page_shifts_of_kvm_kernels_only() -> None:
    for shift in SHIFTS:
        assert VmLimits(1, 1, (1 << (64 - shift)) - 1, page_shift=shift).page_shift == shift
    for shift in (0, 13, 15, 21):
        with pytest.raises(ValueError, match="page_shift"):
            VmLimits(1, 1, 0, page_shift=shift)
    with pytest.raises(ValueError, match="max_gfn"):
        VmLimits(1, 1, 1 << 48, page_shift=16)


@pytest.mark.parametrize("shift", SHIFTS)
def test_guest_memory_walks_pages_of_the_kernel(shift: int) -> None:
    page = 1 << shift
    with Vm(profile=_limits(shift)) as vm:
        mem = vm.host_memory(4 * page)  # the host's pages: align inside it
        hva = (mem.addr + page - 1) & ~(page - 1)
        if hva + 3 * page > mem.addr + mem.size:
            mem = vm.host_memory(5 * page)
            hva = (mem.addr + page - 1) & ~(page - 1)
        gpa = 0x100 * page
        vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, gpa, 3 * page, hva)
        data = bytes(range(10))
        vm.write_guest(gpa + page - 3, data)  # pages 0 and 1 of the slot
        assert vm.read_guest(gpa + page - 3, 10) == data
        assert mem.read(hva - mem.addr + page - 3, 10) == data
        bitmap = vm.get_dirty_log(0)
        assert len(bitmap) == 8 and bitmap[0] == 0b011
        vm.write_guest(gpa + 3 * page - 1, b"x")  # the last byte: page 2
        assert vm.get_dirty_log(0)[0] == 0b100
        with pytest.raises(MemslotError) as info:
            vm.read_guest(gpa + 3 * page - 1, 2)  # one byte past the slot
        assert info.value.errno == errno.EFAULT


@pytest.mark.parametrize("shift", SHIFTS)
def test_dirty_bitmap_has_a_bit_per_page(shift: int) -> None:
    page = 1 << shift
    vm = Vm(profile=_limits(shift))
    vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, 70 * page, HVA)
    vm.mark_page_dirty(69)
    bitmap = vm.get_dirty_log(0)
    assert len(bitmap) == 16 and bitmap[8] == 1 << 5


@pytest.mark.parametrize("shift", SHIFTS)
def test_dirty_ring_minimum_is_one_page(shift: int) -> None:
    page = 1 << shift
    for size in (4096, 8192, page // 2):
        if size < page:
            assert _errno(Vm(profile=_limits(shift)).enable_dirty_ring, size) == errno.EINVAL
    vm = Vm(profile=_limits(shift))
    vm.enable_dirty_ring(page)
    assert vm.dirty_ring_size == page


@pytest.mark.parametrize("shift", SHIFTS)
def test_guest_memfd_sizes_and_offsets_in_pages_of_the_kernel(impl: Any, shift: int) -> None:
    page = 1 << shift
    with impl(profile=_limits(shift)) as vm:
        if shift > 12:
            assert _errno(vm.create_guest_memfd, 4096) == errno.EINVAL
            assert _errno(vm.create_guest_memfd, page + 4096) == errno.EINVAL
        fd = vm.create_guest_memfd(4 * page)
        try:
            set2 = vm.set_user_memory_region2
            gm = KVM_MEM_GUEST_MEMFD
            if shift > 12:
                assert _errno(set2, 0, gm, 0, page, HVA, 4096, fd) == errno.EINVAL
            assert _errno(set2, 0, gm, 0, 2 * page, HVA, 3 * page, fd) == errno.EINVAL  # past
            set2(0, gm, 0, 2 * page, HVA, 2 * page, fd)
            assert _errno(set2, 1, gm, 4 * page, page, HVA, 3 * page, fd) == errno.EINVAL
            set2(1, gm, 4 * page, 2 * page, HVA, 0, fd)
            assert vm.guest_memfds.bound_pages() == 4
            vm.check_invariants()
        finally:
            os.close(fd)


@pytest.mark.parametrize("shift", SHIFTS)
def test_find_free_gpa_in_pages_of_the_kernel(shift: int) -> None:
    page = 1 << shift
    vm = Vm(profile=_limits(shift))
    vm.set_user_memory_region(0, 0, 0, 3 * page, HVA)
    assert vm.find_free_gpa(page) == 3 * page
    assert vm.find_free_gpa(page, align=4 * page) == 4 * page
    if shift > 12:
        with pytest.raises(ValueError, match="multiple"):
            vm.find_free_gpa(4096)
        with pytest.raises(ValueError, match="power of two"):
            vm.find_free_gpa(page, align=4096)


class _EngineKernel:
    """A kernel for the probe made of the engine: what ``KvmSystem`` offers it."""

    def __init__(self, limits: VmLimits) -> None:
        self.limits = limits

    def check_extension(self, cap: int) -> int:
        return {abi.KVM_CAP_NR_MEMSLOTS: self.limits.max_user_slots}.get(cap, 0)

    def create_vm(self, vm_type: int = 0) -> Any:
        return _EngineProbeVm(profile=self.limits)


class _EngineProbeVm(Vm):
    def check_extension(self, cap: int) -> int:
        return self.limits.nr_address_spaces if cap == abi.KVM_CAP_MULTI_ADDRESS_SPACE else 0

    def close_fd(self, fd: int) -> None:
        os.close(fd)


@pytest.mark.parametrize("shift", SHIFTS)
def test_probe_measures_in_the_kernels_pages(shift: int) -> None:
    page = 1 << shift
    limits = dataclasses.replace(
        _limits(shift), max_gfn=(1 << (40 - shift)) - 1, task_size_max=(1 << 47) - page
    )
    p = KernelProfile.probe(_EngineKernel(limits), release="6.12", page_size=page)
    assert p.page_shift == shift
    assert p.max_gfn == limits.max_gfn
    assert p.task_size_max == limits.task_size_max
    assert p.vm_limits().page_shift == shift
    with pytest.raises(ValueError, match="page size"):
        KernelProfile.probe(_EngineKernel(limits), page_size=8192)


@pytest.mark.parametrize("series", ["6.12", "7.2"])
def test_named_16k_profiles(series: str) -> None:
    p = KernelProfile.named(f"{series}/arm64-16k")
    four = KernelProfile.named(f"{series}/arm64")
    assert (p.key, p.page_shift, p.arch) == (f"{series}/arm64-16k", 14, "arm64")
    # the same kernel in 16 KiB pages: the 40-bit IPA of VM type 0 is 2^26 gfns
    assert four.differences(p) == [
        f"max_gfn: {(1 << 28) - 1} -> {(1 << 26) - 1}",
        "page_shift: 12 -> 14",
    ]
    assert p.summary().endswith("16 KiB pages") and "KiB pages" not in four.summary()
    vm = Vm(profile=p)
    assert _errno(vm.set_user_memory_region, 0, 0, 0, 4096, HVA) == errno.EINVAL
    vm.set_user_memory_region(0, 0, (1 << 40) - (1 << 14), 1 << 14, HVA)  # the last gfn
    assert vm.slots()[0].base_gfn == p.max_gfn
    assert KernelProfile.from_dict(p.to_dict()) == p
