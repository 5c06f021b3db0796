"""The conformance generator draws in the kernel's page size (``VmLimits.page_shift``):
gpas, sizes, hvas, guest_memfd offsets and sizes and ring sizes are aligned to it, and
misaligned on purpose, also by multiples of 4 KiB (aligned for a 4 KiB kernel only).
The operations are applied to the engine alone, with the same limits, so the slots they
build up are real ones."""

from __future__ import annotations

import collections
import contextlib
import random

import pytest

from memslots import KVM_MEM_GUEST_MEMFD, MemslotError, Vm
from memslots.tools.conform.generator import OpGenerator
from memslots.tools.conform.ops import CreateGuestMemfd, EnableDirtyRing, VcpuWriteGuest
from memslots.tools.traces import MemslotCall
from memslots.validate import VmLimits


def _limits(shift: int) -> VmLimits:
    # arm64-like: one address space, 32767 slots, a 40-bit IPA, 52-bit user addresses
    return VmLimits(1, 32767, (1 << (40 - shift)) - 1, task_size_max=1 << 52, page_shift=shift)


def _draw(shift: int, n: int = 4000) -> tuple[list[object], Vm]:
    """``n`` operations from one generator, memslot calls applied to an engine VM."""
    limits = _limits(shift)
    gen = OpGenerator(random.Random(shift), limits=limits)
    vm = Vm(profile=limits)
    ops: list[object] = list(gen.prelude(ring=True))
    for _ in range(n):
        op = gen.next(vm.slots(), [0], 0)
        ops.append(op)
        if isinstance(op, MemslotCall) and not op.flags & KVM_MEM_GUEST_MEMFD:
            with contextlib.suppress(MemslotError):
                vm.set_user_memory_region(
                    op.slot, op.flags & 3, op.guest_phys_addr, op.memory_size,
                    op.userspace_addr,
                )  # fmt: skip
    return ops, vm


@pytest.mark.parametrize("shift", [14, 16])
def test_generated_values_are_in_the_kernels_pages(shift: int) -> None:
    page = 1 << shift
    ops, vm = _draw(shift)
    calls = [op for op in ops if isinstance(op, MemslotCall)]
    # the slots the calls built are made of the kernel's pages
    assert len(vm.slots()) >= 5
    assert all(s.page_shift == shift for s in vm.slots())
    # most calls are aligned; some are misaligned by a multiple of 4 KiB, some by less
    fields = ("guest_phys_addr", "memory_size", "userspace_addr")
    aligned = sum(all(getattr(c, f) % page == 0 for f in fields) for c in calls)
    assert aligned > 0.7 * len(calls)
    for f in fields:
        values = [getattr(c, f) for c in calls]
        assert any(v % page and v % 4096 == 0 for v in values), f
        assert any(v % 4096 for v in values), f
    # guest_memfd offsets of guest_memfd calls: in pages, and now and then 4 KiB off
    offsets = [c.guest_memfd_offset for c in calls if c.flags & KVM_MEM_GUEST_MEMFD]
    assert sum(o % page == 0 for o in offsets) > 0.7 * len(offsets)
    assert any(o % page and o % 4096 == 0 for o in offsets)
    # ring sizes and guest_memfd sizes: one page, and sizes aligned for 4 KiB pages only
    rings = collections.Counter(op.size for op in ops if isinstance(op, EnableDirtyRing))
    assert rings[page] and rings[page // 2] and rings[4096]
    # a vCPU write starts in a page of the kernel and spans up to 64 of them
    writes = [op for op in ops if isinstance(op, VcpuWriteGuest)]
    assert writes and max(op.length for op in writes) > 4 * page
    gen = OpGenerator(random.Random(1), limits=_limits(shift))
    created = [gen._op_gmem_flags([], []) for _ in range(600)]
    sizes = collections.Counter(op.size for op in created if isinstance(op, CreateGuestMemfd))
    assert sizes[page] and sizes[page + 1] and sizes[page + 4096] and sizes[4096]


def test_the_largest_slots_stay_small_with_large_pages() -> None:
    """Slots are drawn in pages: the largest are capped at 16 MiB whatever the page size,
    and generated hvas stay within the first GiB of the mapped area."""
    for shift in (12, 14, 16):
        ops, _ = _draw(shift, 2000)
        calls = [op for op in ops if isinstance(op, MemslotCall) and op.memory_size < 1 << 30]
        assert max(c.memory_size for c in calls) <= (16 << 20) + (7 << shift)
