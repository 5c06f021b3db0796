"""The dirty ring (KVM_CAP_DIRTY_LOG_RING / _ACQ_REL): every row of the kernel's enable
rules and of the differential checklist, on the engine and on a strict KvmVm against the
real kernel (every errno, reset count and soft-full exit compared; guest pushes checked for
plausibility), the vCPU mmap rules on the kernel alone, real guests writing pages and
filling the ring, and model-based sequences of slot changes, pushes, harvests and resets
against a plain model.

On the engine a "guest write" is ``vcpu.write_guest`` (which pushes as KVM's emulator does,
``PushMode.EVERY_WRITE``); on KvmVm it is the stride-writer guest program running on the
vCPU, whose writes the kernel pushes."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memslots import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, HostMemory, Vm
from memslots.dirty_ring import (
    KVM_DIRTY_RING_MAX_BYTES,
    DirtyRing,
    PushMode,
    enable_dirty_ring_with_bitmap,
    reset_batches,
)
from memslots.vm import Vcpu
from test_dirty_log import _run_live_migration, errno_of

EINVAL, E2BIG, ENXIO, EFAULT, EEXIST = (
    errno.EINVAL,
    errno.E2BIG,
    errno.ENXIO,
    errno.EFAULT,
    errno.EEXIST,
)
LOG = KVM_MEM_LOG_DIRTY_PAGES
PAGE = 4096
MB = 1 << 20
RING = 65536  # the checklist's "ring": 4096 entries
CODE_GPA = 0x1000
DATA_GPA = 0x10000
CAP_RING, CAP_ACQ_REL, CAP_WITH_BITMAP = 192, 223, 225


# ======================================================================================
# A VM under test: the engine or a strict KvmVm, with guest memory and guest writes
# ======================================================================================
class Rig:
    """A VM (``kind`` "engine" or "kvm"), the stride-writer program in slot 0 (gpa 0,
    64 KiB, not logging) once :meth:`code` ran, and guest writes that push (engine:
    ``vcpu.write_guest``; kvm: the guest program)."""

    def __init__(self, kind: str) -> None:
        self.kvm = kind == "kvm"
        self._mems: list[HostMemory] = []
        if self.kvm:
            from memslots.kvm import KvmVm

            self.vm: Vm = KvmVm()
        else:
            self.vm = Vm()
        self.exits: list[Any] = []

    def memory(self, size: int) -> HostMemory:
        if self.kvm:
            return self.vm.host_memory(size)
        mem = HostMemory(size)
        self._mems.append(mem)
        return mem

    def slot(self, slot: int, flags: int, gpa: int, npages: int) -> HostMemory:
        mem = self.memory(npages * PAGE)
        self.vm.set_user_memory_region(slot, flags, gpa, npages * PAGE, mem.addr)
        return mem

    def code(self) -> None:
        from memslots.kvm.guests import STRIDE_WRITER

        mem = self.slot(0, 0, 0, 16)
        mem.write(CODE_GPA, STRIDE_WRITER)

    def ring(self, vcpu: Vcpu) -> DirtyRing:
        """The ring userspace sees: the kernel's on KvmVm, the vCPU's on the engine."""
        kernel = getattr(vcpu, "kernel_ring", None)
        ring = kernel.ring if kernel is not None else vcpu.dirty_ring
        assert ring is not None
        return ring

    def write(self, vcpu: Vcpu, gpas: list[int], **run: Any) -> Any:
        """The guest writes a word at each gpa, in order."""
        if not self.kvm:
            for gpa in gpas:
                vcpu.write_guest(gpa, b"\x5a\xa5")
            return None
        result = None
        i = 0
        while i < len(gpas):
            j = i + 1
            stride = gpas[j] - gpas[i] if j < len(gpas) else PAGE
            while j < len(gpas) and gpas[j] - gpas[j - 1] == stride:
                j += 1
            result = self.guest(vcpu, gpas[i], j - i, stride, **run)
            i = j
        return result

    def guest(
        self,
        vcpu: Vcpu,
        first: int,
        count: int,
        stride: int = PAGE,
        *,
        exit_each_write: bool = False,
        report: bool = True,
        **run: Any,
    ) -> Any:
        """Run the stride writer once (kvm only); returns the RunResult."""
        from memslots.kvm.guests import stride_writer_args

        a = stride_writer_args(
            first, count, stride=stride, exit_each_write=exit_each_write, report=report
        )
        vcpu.setup_real_mode(  # type: ignore[attr-defined]
            CODE_GPA + a.entry_offset,
            regs=a.regs,
            segments=a.segments,
            big_real_mode=a.big_real_mode,
        )
        return self.resume(vcpu, **run)

    def resume(self, vcpu: Vcpu, **run: Any) -> Any:
        run.setdefault("timeout", 20)
        run.setdefault("on_io", lambda io: None)
        result = vcpu.run_until_hlt(on_mmio=self.exits.append, **run)  # type: ignore[attr-defined]
        return result

    def close(self) -> None:
        if self.kvm:
            assert self.vm.disagreements == []  # type: ignore[attr-defined]
            self.vm.close()
        for m in self._mems:
            m.close()


@pytest.fixture(params=["engine", pytest.param("kvm", marks=pytest.mark.kvm)])
def rig(request: pytest.FixtureRequest) -> Iterator[Rig]:
    r = Rig(request.param)
    yield r
    r.close()


def ring_rig(rig: Rig, size: int = RING, *, data_pages: int = 224, flags: int = LOG) -> Vcpu:
    """The checklist's set-up: ring on, code slot, data slot 1 at gpa 0x10000, vCPU 0."""
    rig.vm.enable_dirty_ring(size)
    rig.code()
    rig.slot(1, flags, DATA_GPA, data_pages)
    return rig.vm.create_vcpu(0)


def pages(first: int, *offsets: int, base: int = DATA_GPA) -> list[int]:
    return [base + (first + o) * PAGE for o in offsets]


# ======================================================================================
# Enabling: every row of the kernel's rules, in its order
# ======================================================================================
SIZES = [
    (0, EINVAL),
    (16, EINVAL),
    (1024, EINVAL),
    (2048, EINVAL),
    (4095, EINVAL),
    (4097, EINVAL),
    (12288, EINVAL),
    (65537, EINVAL),
    (MB + 4096, EINVAL),
    (3 * MB, EINVAL),  # not a power of two *and* too big: the power-of-two check is first
    (4096, 0),
    (8192, 0),
    (65536, 0),
    (MB, 0),
    (2 * MB, E2BIG),
    (1 << 31, E2BIG),
    ((1 << 32) + 4096, 0),  # args[0] is truncated to u32
    ((1 << 63) + 65536, 0),
    (1 << 32, EINVAL),  # truncates to 0
]


@pytest.mark.parametrize("acq_rel", [False, True])
@pytest.mark.parametrize(("size", "expected"), SIZES)
def test_enable_sizes(rig: Rig, size: int, expected: int, acq_rel: bool) -> None:
    assert errno_of(lambda: rig.vm.enable_dirty_ring(size, acq_rel)) == expected
    assert rig.vm.dirty_ring_size == (0 if expected else size & 0xFFFFFFFF)


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        ([(65536, False), (65536, False)], [0, EINVAL]),  # once only
        ([(4096, False), (8192, False)], [0, EINVAL]),  # smaller then larger
        ([(65536, False), (2 * MB, False)], [0, E2BIG]),  # the size check comes first
        ([(65536, False), (12288, False)], [0, EINVAL]),
        ([(65536, False), (0, False)], [0, EINVAL]),
        ([(65536, False), (65536, True)], [0, EINVAL]),  # the caps share the size
        ([(65536, True), (65536, False)], [0, EINVAL]),
        ([(12288, False), (65536, False)], [EINVAL, 0]),  # a failure leaves no state
    ],
)
def test_enable_twice(rig: Rig, steps: list[tuple[int, bool]], expected: list[int]) -> None:
    got = [errno_of(lambda s=s, a=a: rig.vm.enable_dirty_ring(s, a)) for s, a in steps]  # type: ignore[misc]
    assert got == expected
    first_ok = next(s for (s, _), e in zip(steps, expected, strict=True) if e == 0)
    assert rig.vm.dirty_ring_size == first_ok


@pytest.mark.parametrize(("size", "expected"), [(65536, EINVAL), (2 * MB, E2BIG), (12288, EINVAL)])
def test_enable_after_a_vcpu(rig: Rig, size: int, expected: int) -> None:
    rig.vm.create_vcpu(0)
    assert errno_of(lambda: rig.vm.enable_dirty_ring(size)) == expected
    assert rig.vm.created_vcpus == 1


def test_created_vcpus_never_drops(rig: Rig) -> None:
    vcpu = rig.vm.create_vcpu(0)
    if rig.kvm:
        vcpu.close()  # type: ignore[attr-defined]
    assert errno_of(lambda: rig.vm.enable_dirty_ring(65536)) == EINVAL
    assert rig.vm.dirty_ring_size == 0


def test_a_failed_vcpu_creation_is_not_counted(rig: Rig) -> None:
    assert errno_of(lambda: rig.vm.create_vcpu(1 << 20)) == EINVAL  # the id check is first
    assert errno_of(lambda: rig.vm.create_vcpu(4096)) == EINVAL
    assert rig.vm.created_vcpus == 0
    rig.vm.enable_dirty_ring(65536)
    rig.vm.create_vcpu(4095)
    assert errno_of(lambda: rig.vm.create_vcpu(4095)) == EEXIST
    assert rig.vm.created_vcpus == 1


def test_enable_with_a_logging_slot_and_then_four_1mib_rings(rig: Rig) -> None:
    rig.slot(1, LOG, DATA_GPA, 16)
    rig.vm.enable_dirty_ring(MB)
    vcpus = [rig.vm.create_vcpu(i) for i in range(4)]
    for v in vcpus:
        ring = rig.ring(v)
        assert ring.size == 65536 and ring.soft_limit == 65536 - 64
        assert ring.entry(0) == (0, 0, 0) and ring.entry(65535) == (0, 0, 0)  # zeroed
    rig.vm.check_invariants()


def test_with_bitmap_is_refused_before_and_after_a_ring(rig: Rig) -> None:
    def with_bitmap(arg: int) -> None:
        if rig.kvm:
            rig.vm.fd.enable_cap(CAP_WITH_BITMAP, arg)  # type: ignore[attr-defined]
        else:
            enable_dirty_ring_with_bitmap(rig.vm)

    assert errno_of(lambda: with_bitmap(0)) == EINVAL
    rig.vm.enable_dirty_ring(65536)
    assert errno_of(lambda: with_bitmap(1)) == EINVAL
    assert errno_of(lambda: with_bitmap(65536)) == EINVAL


@pytest.mark.kvm
def test_kernel_capabilities_and_ignored_fields() -> None:
    """CHECK_EXTENSION answers the engine's maximum on the system and VM fds, before and
    after enabling; cap->flags and args[1..3] are never looked at."""
    from memslots.kvm.abi import KvmSystem

    with KvmSystem() as kvm:
        assert kvm.check_extension(CAP_RING) == KVM_DIRTY_RING_MAX_BYTES
        assert kvm.check_extension(CAP_ACQ_REL) == KVM_DIRTY_RING_MAX_BYTES
        assert kvm.check_extension(CAP_WITH_BITMAP) == 0
        for kw in ({"flags": 1}, {"flags": 0xFFFFFFFF}, {}):
            with kvm.create_vm() as vm:
                args = (65536, 7, 8, 9) if not kw else (65536,)
                assert vm.enable_cap(CAP_RING, *args, **kw) == 0
                for cap in (CAP_RING, CAP_ACQ_REL):
                    assert vm.check_extension(cap) == KVM_DIRTY_RING_MAX_BYTES
                assert vm.check_extension(CAP_WITH_BITMAP) == 0


# ======================================================================================
# Reset without a ring, GET/CLEAR refusal, bitmaps
# ======================================================================================
def test_reset_errnos(rig: Rig) -> None:
    assert errno_of(rig.vm.reset_dirty_rings) == EINVAL
    rig.vm.create_vcpu(0)
    assert errno_of(rig.vm.reset_dirty_rings) == EINVAL  # with a vCPU, still no ring


def test_reset_with_a_ring_and_no_vcpu_or_nothing_harvested(rig: Rig) -> None:
    rig.vm.enable_dirty_ring(65536)
    assert rig.vm.reset_dirty_rings() == 0
    rig.vm.create_vcpu(0)
    assert rig.vm.reset_dirty_rings() == 0


GET_CLEAR_CASES = [
    ("logging slot", 1, 0),
    ("plain slot", 2, 0),
    ("missing slot", 3, 0),
    ("id 32764", 32764, 0),
    ("as_id 1", 1 << 16 | 1, 0),
    ("first_page 1", 1, 1),
]


@pytest.mark.parametrize("manual", [0, 1, 3])
@pytest.mark.parametrize(("what", "slot", "first_page"), GET_CLEAR_CASES)
def test_get_and_clear_are_enxio_before_any_other_check(
    rig: Rig, what: str, slot: int, first_page: int, manual: int
) -> None:
    rig.slot(4, LOG, 0x800000, 64)  # logging before the ring: it keeps a bitmap
    rig.vm.enable_dirty_ring(RING)
    if manual:
        rig.vm.enable_manual_dirty_log_protect(manual)
    rig.slot(1, LOG, DATA_GPA, 64)
    rig.slot(2, 0, DATA_GPA + 64 * PAGE, 64)
    assert errno_of(lambda: rig.vm.get_dirty_log(slot)) == ENXIO
    assert errno_of(lambda: rig.vm.get_dirty_log(4)) == ENXIO
    assert errno_of(lambda: rig.vm.clear_dirty_log(slot, first_page, 64, bytes(8))) == ENXIO
    assert errno_of(lambda: rig.vm.clear_dirty_log(4, 0, 64, bytes(8))) == ENXIO


def test_the_same_calls_without_a_ring(rig: Rig) -> None:
    rig.slot(1, LOG, DATA_GPA, 64)
    rig.slot(2, 0, DATA_GPA + 64 * PAGE, 64)
    got = [errno_of(lambda s=s: rig.vm.get_dirty_log(s)) for s in (1, 2, 3)]  # type: ignore[misc]
    assert got == [0, errno.ENOENT, errno.ENOENT]
    assert errno_of(lambda: rig.vm.get_dirty_log(32764)) == EINVAL
    assert errno_of(lambda: rig.vm.clear_dirty_log(1, 1, 64, bytes(8))) == EINVAL


def test_bitmaps_with_the_ring(rig: Rig) -> None:
    """No bitmap for LOG slots created after the ring; one created before keeps its own
    until logging goes off (MOVE keeps it), and is not re-allocated when it comes back."""
    vm = rig.vm
    before = rig.slot(1, LOG, DATA_GPA, 1 << 10)
    vm.enable_dirty_ring(RING)
    rig.slot(2, LOG, DATA_GPA + (1 << 22), 1 << 10)
    rig.slot(3, 0, DATA_GPA + (2 << 22), 16)

    def bitmap(slot: int) -> bool:
        s = vm.id_to_memslot(slot)
        assert s is not None
        return s.dirty_bitmap is not None

    assert (bitmap(1), bitmap(2), bitmap(3)) == (True, False, False)
    s3 = vm.id_to_memslot(3)
    assert s3 is not None
    vm.set_user_memory_region(3, LOG, DATA_GPA + (2 << 22), 16 * PAGE, s3.userspace_addr)
    assert not bitmap(3)
    vm.set_user_memory_region(1, LOG, DATA_GPA + (3 << 22), 1 << 22, before.addr)  # MOVE
    assert bitmap(1)
    vm.set_user_memory_region(1, 0, DATA_GPA + (3 << 22), 1 << 22, before.addr)
    vm.set_user_memory_region(1, LOG, DATA_GPA + (3 << 22), 1 << 22, before.addr)
    assert not bitmap(1)
    assert vm.dirty_bitmap_bytes == 0
    vm.check_invariants()


def test_writes_without_a_vcpu_are_not_recorded_in_any_ring() -> None:
    """vm.write_guest (no running vCPU) pushes nothing; with the ring on it still sets
    the bit of a slot that kept its bitmap from before the ring (mark_page_dirty_in_slot
    falls back to the bitmap), which nobody can read (GET is ENXIO)."""
    vm = Vm()
    with HostMemory(32 * PAGE) as a, HostMemory(32 * PAGE) as b:
        vm.set_user_memory_region(1, LOG, 0, 32 * PAGE, a.addr)
        vm.enable_dirty_ring(RING)
        vm.set_user_memory_region(2, LOG, 32 * PAGE, 32 * PAGE, b.addr)
        vcpu = vm.create_vcpu(0)
        vm.write_guest(3 * PAGE, b"x")
        vm.write_guest(35 * PAGE, b"x")
        vm.mark_page_dirty(4)
        assert vcpu.harvest_dirty_ring() == []
        bm = vm.id_to_memslot(1).dirty_bitmap  # type: ignore[union-attr]
        assert bm is not None and bm[0] == 0b11000
        vcpu.write_guest(3 * PAGE, b"x")
        vcpu.mark_page_dirty(36)
        assert vcpu.harvest_dirty_ring() == [(1, 3), (2, 4)]  # the vCPU's writes: ring only
        assert bm[0] == 0b11000


# ======================================================================================
# Push, harvest, reset
# ======================================================================================
def test_guest_pages_are_pushed_in_write_order_then_reset(rig: Rig) -> None:
    vcpu = ring_rig(rig)
    ring = rig.ring(vcpu)
    order = [9, 8, 7, 6, 5, 0, 3, 6, 9, 2]  # descending, stride 3, then one more
    rig.write(vcpu, pages(0, *order))
    entries = [ring.entry(i) for i in range(11)]
    assert entries[:10] == [(1, 1, o) for o in order]
    assert entries[10] == (0, 0, 0)
    assert vcpu.harvest_dirty_ring() == [(1, o) for o in order]
    assert [ring.entry(i).flags for i in range(10)] == [3] * 10
    assert vcpu.harvest_dirty_ring() == []
    assert rig.vm.reset_dirty_rings() == 10
    assert [ring.entry(i) for i in range(10)] == [(0, 1, o) for o in order]  # fields stay
    assert rig.vm.reset_dirty_rings() == 0
    # the next push goes to free-running index 10, not back to 0
    rig.write(vcpu, pages(0, 4))
    assert ring.entry(10) == (1, 1, 4) and ring.entry(0).flags == 0
    assert vcpu.harvest_dirty_ring() == [(1, 4)]


def test_a_word_at_the_end_of_a_page_and_the_same_page_again(rig: Rig) -> None:
    vcpu = ring_rig(rig)
    rig.write(vcpu, [DATA_GPA + 2 * PAGE + 0xFFE])
    rig.write(vcpu, pages(0, 5, 5, 5))
    rig.write(vcpu, pages(0, 0, 1, 0))
    assert vcpu.harvest_dirty_ring() == [(1, 2), (1, 5), (1, 5), (1, 5), (1, 0), (1, 1), (1, 0)]
    rig.write(vcpu, pages(0, 0))  # harvested, not reset, written again: a new entry
    assert vcpu.harvest_dirty_ring() == [(1, 0)]
    assert rig.vm.reset_dirty_rings() == 8


def test_guest_writes_across_slots_and_a_high_slot_id(rig: Rig) -> None:
    vm = rig.vm
    vm.enable_dirty_ring(RING)
    rig.code()
    rig.slot(1, LOG, DATA_GPA, 8)
    rig.slot(32000, LOG, DATA_GPA + 8 * PAGE, 8)
    rig.slot(3, 0, DATA_GPA + 16 * PAGE, 8)  # not logging
    vcpu = vm.create_vcpu(0)
    rig.write(vcpu, pages(0, *range(5, 20)))  # slot 1 pages 5-7, 32000 0-7, slot 3 0-3
    expected = [(1, o) for o in (5, 6, 7)] + [(32000, o) for o in range(8)]
    assert vcpu.harvest_dirty_ring() == expected
    assert vm.reset_dirty_rings() == len(expected)
    assert vcpu.harvest_dirty_ring() == [] and vm.reset_dirty_rings() == 0


def test_reset_stops_at_the_first_entry_not_harvested(rig: Rig) -> None:
    vcpu = ring_rig(rig)
    ring = rig.ring(vcpu)
    rig.write(vcpu, pages(0, 0, 1, 2, 3, 4))
    for i in (0, 1):
        ring.write_entry(i, flags=3)
    assert rig.vm.reset_dirty_rings() == 2
    ring.write_entry(3, flags=3)  # entry 3 marked, entry 2 not
    assert rig.vm.reset_dirty_rings() == 0
    assert (ring.entry(2).flags, ring.entry(3).flags) == (1, 3)
    ring.write_entry(2, flags=3)
    assert rig.vm.reset_dirty_rings() == 2
    ring.fetch_index = 4
    assert vcpu.harvest_dirty_ring() == [(1, 4)]
    assert rig.vm.reset_dirty_rings() == 1


@pytest.mark.parametrize(
    ("flags", "counted"), [(2, 1), (1, 0), (0xFFFFFFFE, 1), (0x80000003, 1), (0xFFFFFFFD, 0)]
)
def test_reset_trusts_the_reset_flag_alone(rig: Rig, flags: int, counted: int) -> None:
    vcpu = ring_rig(rig)
    ring = rig.ring(vcpu)
    rig.write(vcpu, pages(0, 0))
    ring.write_entry(0, flags=flags)
    assert rig.vm.reset_dirty_rings() == counted
    assert ring.entry(0).flags == (0 if counted else flags)


def test_nonsense_in_harvested_entries_is_counted_and_ignored(rig: Rig) -> None:
    vcpu = ring_rig(rig)
    ring = rig.ring(vcpu)
    rig.write(vcpu, pages(0, *range(6)))
    assert len(vcpu.harvest_dirty_ring()) == 6
    nonsense = [(999, 0), (40000, 0), (1 << 16 | 1, 0), (1, 1 << 40), (1, 224),
                (0xFFFFFFFF, (1 << 64) - 1)]  # fmt: skip
    for i, (slot, offset) in enumerate(nonsense):
        ring.write_entry(i, slot=slot, offset=offset)
    assert rig.vm.reset_dirty_rings() == 6
    rig.write(vcpu, pages(0, 7, 8))  # the vCPU keeps working
    assert vcpu.harvest_dirty_ring() == [(1, 7), (1, 8)]
    assert rig.vm.reset_dirty_rings() == 2


def test_userspace_resetting_an_unpublished_entry_is_counted(rig: Rig) -> None:
    """A userspace bug the kernel trusts: RESET on an entry never published is counted
    and ``reset_index`` passes ``dirty_index`` (the vCPU is not run afterwards)."""
    vcpu = ring_rig(rig)
    rig.ring(vcpu).write_entry(0, flags=2)
    assert rig.vm.reset_dirty_rings() == 1


def test_each_vcpu_ring_holds_its_own_writes_and_reset_sums_them(rig: Rig) -> None:
    vcpu0 = ring_rig(rig)
    vcpu1 = rig.vm.create_vcpu(1)
    rig.write(vcpu0, pages(0, 0, 1, 2))
    rig.write(vcpu1, pages(0, 10, 11))
    assert vcpu1.harvest_dirty_ring() == [(1, 10), (1, 11)]
    assert rig.vm.reset_dirty_rings() == 2
    assert vcpu0.harvest_dirty_ring() == [(1, 0), (1, 1), (1, 2)]
    assert rig.vm.reset_dirty_rings() == 3
    rig.write(vcpu0, pages(0, 3, 4, 5))
    rig.write(vcpu1, pages(0, 12, 13))
    vcpu0.harvest_dirty_ring()
    vcpu1.harvest_dirty_ring()
    assert rig.vm.reset_dirty_rings() == 5


def test_indexes_wrap_modulo_the_ring_size(rig: Rig) -> None:
    vcpu = ring_rig(rig, 4096, data_pages=256 - 16)
    ring = rig.ring(vcpu)
    rig.write(vcpu, pages(0, *range(150)))
    assert len(vcpu.harvest_dirty_ring()) == 150
    assert rig.vm.reset_dirty_rings() == 150
    rig.write(vcpu, pages(0, *range(140)))  # free-running 150..289: wraps at 256
    assert ring.entry(256) == (1, 1, 106)
    assert ring.entry(0) == (1, 1, 106)
    got = vcpu.harvest_dirty_ring()
    assert got == [(1, o) for o in range(140)]
    assert rig.vm.reset_dirty_rings() == 140


# ======================================================================================
# Soft full, the exit, and going on
# ======================================================================================
def test_soft_limit_is_size_minus_64() -> None:
    for nbytes, soft in ((4096, 192), (8192, 448), (MB, 65472)):
        assert DirtyRing(nbytes).soft_limit == soft


def test_engine_soft_full_request() -> None:
    """The push that reaches the soft limit raises the request; vcpu_enter_guest then
    exits for as long as the ring stays soft-full, and drops the request once not."""
    vm = Vm()
    with HostMemory(224 * PAGE) as mem:
        vm.set_user_memory_region(1, LOG, 0, 224 * PAGE, mem.addr)
        vm.enable_dirty_ring(4096)
        vcpu = vm.create_vcpu(0)
        ring = vcpu.dirty_ring
        assert ring is not None
        for p in range(191):
            vcpu.mark_page_dirty(p)
        assert not ring.soft_full_request and not ring.check_request()
        vcpu.mark_page_dirty(191)
        assert ring.soft_full_request and ring.check_request() and ring.check_request()
        for i in range(10):  # userspace harvests 10 entries
            ring.write_entry(i, flags=3)
        ring.fetch_index = 10
        assert ring.check_request()  # harvested but not reset: still full
        assert vm.reset_dirty_rings() == 10
        assert not ring.check_request() and not ring.soft_full_request  # dropped
        for p in range(10):
            vcpu.mark_page_dirty(p)
        assert ring.check_request()
        vcpu.harvest_dirty_ring()
        assert vm.reset_dirty_rings() == 192 and not ring.check_request()


def test_engine_hard_full_overwrites_the_oldest_entry() -> None:
    ring = DirtyRing(4096)
    for p in range(257):
        ring.push(1, p)
    assert ring.overwrites == 1 and ring.used == 257
    assert ring.entry(0) == (1, 1, 256)


@pytest.mark.kvm
def test_kvm_full_exit_at_exactly_the_soft_limit_and_going_on() -> None:
    """A guest that exits to userspace after every write: KVM_EXIT_DIRTY_RING_FULL with
    exactly 192 entries (4 KiB ring); re-running without a reset, or with marks but no
    reset, or with a reset that leaves it soft-full, exits at once without progress;
    resetting 10 lets exactly 10 more through; resetting the rest lets it finish, every
    page exactly once."""
    from memslots.kvm.vcpu import DirtyRingFull

    r = Rig("kvm")
    try:
        vcpu = ring_rig(r, 4096)
        ring = r.ring(vcpu)
        with pytest.raises(DirtyRingFull) as info:
            r.guest(vcpu, DATA_GPA, 224, exit_each_write=True)
        assert info.value.exit is not None and info.value.exit.reason == 31
        assert ring.used == 192 and ring.count_published(0, 256) == 192
        rip = vcpu.kvm.get_regs().rip  # type: ignore[attr-defined]
        for _ in range(2):
            with pytest.raises(DirtyRingFull):
                r.resume(vcpu)
            assert vcpu.kvm.get_regs().rip == rip  # type: ignore[attr-defined]
        for i in range(192):  # marked, not reset: still full
            ring.write_entry(i, flags=3)
        with pytest.raises(DirtyRingFull):
            r.resume(vcpu)
        for i in range(10, 192):  # userspace had harvested only the first 10
            ring.write_entry(i, flags=1)
        ring.fetch_index = 10
        assert r.vm.reset_dirty_rings() == 10
        with pytest.raises(DirtyRingFull):
            r.resume(vcpu)
        assert ring.count_published(10, 256) == 192  # exactly 10 more
        seen = [o for _, o in vcpu.harvest_dirty_ring()]
        assert seen == list(range(10, 202))
        assert r.vm.reset_dirty_rings() == 192
        result = r.resume(vcpu)
        assert result.halted
        rest = [o for _, o in vcpu.harvest_dirty_ring()]
        assert list(range(10)) + seen + rest == list(range(224))
        assert r.vm.reset_dirty_rings() == 22
    finally:
        r.close()


@pytest.mark.kvm
def test_kvm_full_exit_without_per_write_exits_and_the_callback() -> None:
    """Without exits to userspace the request is only looked at between emulation
    batches: the exit comes with at least 192 entries (205 here, 1024 instructions of
    5 per write); a callback that harvests and resets lets the guest finish."""
    r = Rig("kvm")
    try:
        vcpu = ring_rig(r, 4096)
        calls: list[int] = []

        def full(ex: Any) -> None:
            got = vcpu.harvest_dirty_ring()
            calls.append(len(got))
            assert r.vm.reset_dirty_rings() == len(got)

        result = r.guest(vcpu, DATA_GPA, 224, on_dirty_ring_full=full)
        assert result.halted and result.dirty_ring_full_exits == 1
        assert 192 <= calls[0] <= 256
        assert calls[0] + len(vcpu.harvest_dirty_ring()) == 224
    finally:
        r.close()


@pytest.mark.kvm
def test_kvm_a_reset_that_leaves_the_ring_soft_full() -> None:
    """At the full exit (205 entries when the emulation batch ran whole; a host interrupt
    may end a batch early, so at least 192), resetting all but 192 leaves the ring
    soft-full: the next run exits at once with no new entry; resetting the rest lets the
    guest resume where it stopped and write the remaining pages, each offset exactly once
    in all."""
    from memslots.kvm.vcpu import DirtyRingFull

    r = Rig("kvm")
    try:
        vcpu = ring_rig(r, 4096)
        ring = r.ring(vcpu)
        with pytest.raises(DirtyRingFull):
            r.guest(vcpu, DATA_GPA, 224)
        n = ring.used
        assert 192 <= n <= 256
        k = n - 192
        for i in range(k):
            ring.write_entry(i, flags=3)
        ring.fetch_index = k
        assert r.vm.reset_dirty_rings() == k
        with pytest.raises(DirtyRingFull):
            r.resume(vcpu)
        assert ring.used == 192 and ring.count_published(k, 256) == 192
        rest = vcpu.harvest_dirty_ring()
        assert r.vm.reset_dirty_rings() == 192
        assert r.resume(vcpu).halted
        offsets = [o for _, o in rest + vcpu.harvest_dirty_ring()]
        assert list(range(k)) + offsets == list(range(224))
    finally:
        r.close()


#: tries of the one-batch tests: a host interrupt can end an emulation batch early
_BATCH_TRIES = 10


@pytest.mark.kvm
def test_kvm_halt_before_the_full_exit() -> None:
    """The guest writes one page 200 times and halts within one emulation batch: HLT
    comes first with 200 entries; the next KVM_RUN gives KVM_EXIT_DIRTY_RING_FULL without
    running. With the final report (an OUT) the same happens after the OUT: the request
    raised in the batch is looked at only when KVM enters the guest again. (A host
    interrupt can end a batch early and let the request in first: up to ten tries.)"""
    from memslots.kvm.vcpu import DirtyRingFull

    for _ in range(_BATCH_TRIES):
        r = Rig("kvm")
        try:
            vcpu = ring_rig(r, 4096)
            try:
                r.guest(vcpu, DATA_GPA, 200, stride=0, report=False)
            except DirtyRingFull:
                continue  # the batch ended early
            ring = r.ring(vcpu)
            assert ring.count_published(0, 256) == 200
            rip = vcpu.kvm.get_regs().rip  # type: ignore[attr-defined]
            ex = vcpu.run()  # type: ignore[attr-defined]
            assert ex.reason == 31 and vcpu.kvm.get_regs().rip == rip  # type: ignore[attr-defined]
            assert vcpu.harvest_dirty_ring() == [(1, 0)] * 200
            assert r.vm.reset_dirty_rings() == 200
            reports: list[int] = []
            with pytest.raises(DirtyRingFull) as info:
                r.guest(
                    vcpu,
                    DATA_GPA,
                    200,
                    stride=0,
                    on_io=lambda io, got=reports: got.append(io.value),
                )
            if reports != [200]:
                continue  # the batch ended early
            assert info.value.exit is not None
            assert info.value.exit.rip == CODE_GPA + 0x1D  # at the HLT, not executed
            vcpu.harvest_dirty_ring()
            assert r.vm.reset_dirty_rings() == 200
            assert r.resume(vcpu).halted
            return
        finally:
            r.close()
    # Every try had its batch ended early by a host interrupt: a loaded machine, not a
    # wrong answer (each try checks everything it gets to). Not a pass either.
    pytest.skip(f"{_BATCH_TRIES} runs of 200 writes never fitted one emulation batch (busy host)")


def test_acq_rel_behaves_the_same(rig: Rig) -> None:
    rig.vm.enable_dirty_ring(4096, acq_rel=True)
    rig.code()
    rig.slot(1, LOG, DATA_GPA, 16)
    vcpu = rig.vm.create_vcpu(0)
    assert rig.ring(vcpu).soft_limit == 192
    rig.write(vcpu, pages(0, 3, 1))
    assert vcpu.harvest_dirty_ring() == [(1, 3), (1, 1)]
    assert rig.vm.reset_dirty_rings() == 2


# ======================================================================================
# Memslot changes with entries pending
# ======================================================================================
def test_delete_move_and_shrink_with_entries_pending(rig: Rig) -> None:
    vm = rig.vm
    vcpu = ring_rig(rig, data_pages=16)
    hva = vm.id_to_memslot(1).userspace_addr  # type: ignore[union-attr]
    rig.write(vcpu, pages(0, 1, 2))
    vm.set_user_memory_region(1, LOG, 0x80000, 16 * PAGE, hva)  # MOVE
    rig.write(vcpu, pages(0, 1, 2, base=0x80000))
    assert vcpu.harvest_dirty_ring() == [(1, 1), (1, 2), (1, 1), (1, 2)]  # same id, offsets
    assert vm.reset_dirty_rings() == 4
    rig.write(vcpu, pages(0, 10, 11, 12, 13, base=0x80000))
    vm.set_user_memory_region(1, 0, 0, 0, 0)  # DELETE: entries untouched
    assert vcpu.harvest_dirty_ring() == [(1, o) for o in (10, 11, 12, 13)]
    assert vm.reset_dirty_rings() == 4
    vm.set_user_memory_region(1, LOG, 0x80000, 16 * PAGE, hva)
    rig.write(vcpu, pages(0, 12, 13, base=0x80000))
    vm.set_user_memory_region(1, 0, 0, 0, 0)
    vm.set_user_memory_region(1, LOG, 0x80000, 4 * PAGE, hva)  # recreated smaller
    vcpu.harvest_dirty_ring()
    assert vm.reset_dirty_rings() == 2  # offsets past npages: counted, ignored


def test_logging_off_keeps_entries_and_stops_pushes(rig: Rig) -> None:
    vm = rig.vm
    vcpu = ring_rig(rig, data_pages=32)
    hva = vm.id_to_memslot(1).userspace_addr  # type: ignore[union-attr]
    rig.write(vcpu, pages(0, 0, 1, 2))
    vm.set_user_memory_region(1, 0, DATA_GPA, 32 * PAGE, hva)
    rig.write(vcpu, pages(0, 10, 11))
    vm.set_user_memory_region(1, LOG, DATA_GPA, 32 * PAGE, hva)
    rig.write(vcpu, pages(0, 20, 21))
    assert vcpu.harvest_dirty_ring() == [(1, o) for o in (0, 1, 2, 20, 21)]
    assert vm.reset_dirty_rings() == 5


def test_read_only_and_missing_slots_push_nothing(rig: Rig) -> None:
    vm = rig.vm
    vm.enable_dirty_ring(RING)
    rig.code()
    rig.slot(1, LOG | KVM_MEM_READONLY, DATA_GPA, 8)
    rig.slot(2, KVM_MEM_READONLY, DATA_GPA + 8 * PAGE, 8)
    vcpu = vm.create_vcpu(0)
    targets = [DATA_GPA + PAGE, DATA_GPA + 9 * PAGE, 0x200000]  # RO+LOG, RO, no slot
    if rig.kvm:
        rig.write(vcpu, targets)
        assert [m.phys_addr for m in rig.exits] == targets and all(m.is_write for m in rig.exits)
    else:
        assert [errno_of(lambda g=g: vcpu.write_guest(g, b"xy")) for g in targets] == [EFAULT] * 3  # type: ignore[misc]
    assert vm.read_guest(DATA_GPA + PAGE, 2) == bytes(2)
    assert vcpu.harvest_dirty_ring() == []
    if not rig.kvm:  # kvm_vcpu_mark_page_dirty does not look at READONLY
        vcpu.mark_page_dirty(DATA_GPA // PAGE + 1)
        assert vcpu.harvest_dirty_ring() == [(1, 1)]


# ======================================================================================
# Host-side writes on KvmVm, and the oracle itself
# ======================================================================================
@pytest.mark.kvm
def test_kvm_host_writes_through_a_vcpu_follow_the_guest_entries() -> None:
    r = Rig("kvm")
    try:
        vcpu = ring_rig(r)
        r.write(vcpu, pages(0, 4, 5))
        vcpu.write_guest(DATA_GPA + 7 * PAGE, b"host")  # the kernel never sees this one
        vcpu.mark_page_dirty(DATA_GPA // PAGE + 9)
        assert r.ring(vcpu).count_published(0, 100) == 2
        assert vcpu.harvest_dirty_ring() == [(1, 4), (1, 5), (1, 7), (1, 9)]
        assert r.vm.reset_dirty_rings() == 4
    finally:
        r.close()


@pytest.mark.kvm
def test_kvm_oracle_catches_an_engine_that_mispredicts() -> None:
    from memslots.kvm import ConformanceError

    r = Rig("kvm")
    try:
        vcpu = ring_rig(r)
        r.write(vcpu, pages(0, 1, 2, 3))
        vcpu.harvest_dirty_ring()
        kernel = vcpu.kernel_ring  # type: ignore[attr-defined]
        kernel.ring.reset_index = 1  # the engine's model now lags by one entry
        with pytest.raises(ConformanceError, match="engine predicted 2"):
            r.vm.reset_dirty_rings()
        r.vm.disagreements.clear()  # type: ignore[attr-defined]
    finally:
        r.close()


@pytest.mark.kvm
def test_kvm_oracle_catches_an_implausible_push() -> None:
    """A push naming a slot that does not log (planted in the mapped ring as if the
    kernel had written it) is a disagreement."""
    from memslots.kvm import ConformanceError

    r = Rig("kvm")
    try:
        vcpu = ring_rig(r)
        ring = r.ring(vcpu)
        ring.write_entry(0, slot=0, offset=3, flags=1)  # slot 0 does not log
        with pytest.raises(ConformanceError, match="no logging slot"):
            vcpu.harvest_dirty_ring()
        r.vm.disagreements.clear()  # type: ignore[attr-defined]
    finally:
        r.close()


# ======================================================================================
# The vCPU mmap rules (the kernel alone)
# ======================================================================================
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long)  # fmt: skip
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
MAP_FAILED = ctypes.c_void_p(-1).value
R, W, X = mmap.PROT_READ, mmap.PROT_WRITE, mmap.PROT_EXEC
SHARED, PRIVATE = mmap.MAP_SHARED, mmap.MAP_PRIVATE


def _map(fd: int, pages_: int, prot: int, flags: int, pgoff: int) -> tuple[int, int]:
    """(address or 0, errno) of a raw mmap of the vCPU fd."""
    addr = _libc.mmap(None, pages_ * PAGE, prot, flags, fd, pgoff * PAGE)
    if addr == MAP_FAILED:
        return 0, ctypes.get_errno()
    return addr, 0


@pytest.fixture
def ring_vcpu_fd() -> Iterator[int]:
    """A raw vCPU fd of a VM with a 64 KiB ring (pages 64..79 of the fd)."""
    from memslots.kvm.abi import KvmSystem

    with KvmSystem() as kvm, kvm.create_vm() as vm:
        vm.enable_cap(CAP_RING, 65536)
        fd = vm.create_vcpu(0)
        try:
            yield fd
        finally:
            os.close(fd)


@pytest.mark.kvm
@pytest.mark.parametrize(
    ("pages_", "prot", "flags", "pgoff", "expected"),
    [
        (16, R | W, SHARED, 64, 0),
        (16, R, SHARED, 64, 0),
        (16, R | W, PRIVATE, 64, EINVAL),
        (16, R, PRIVATE, 64, EINVAL),
        (16, R | X, SHARED, 64, errno.EPERM),  # the noexec check, before KVM's own
        (32, R, SHARED, 64, 0),  # twice the ring: only touching the rest fails
        (1, R, PRIVATE, 80, 0),
        (1, R, SHARED, 63, 0),
        (2, R, PRIVATE, 63, EINVAL),  # the last page is a ring page
        (2, R, SHARED, 63, 0),
        (80, R, SHARED, 0, 0),
        (80, R, PRIVATE, 0, EINVAL),
        (18, R, PRIVATE, 63, 0),  # only the first and last pages are checked
    ],
)
def test_kvm_ring_mmap_rules(
    ring_vcpu_fd: int, pages_: int, prot: int, flags: int, pgoff: int, expected: int
) -> None:
    addr, err = _map(ring_vcpu_fd, pages_, prot, flags, pgoff)
    assert err == expected
    if addr:
        _libc.munmap(addr, pages_ * PAGE)


@pytest.mark.kvm
def test_kvm_ring_mmap_protections_and_sharing(ring_vcpu_fd: int) -> None:
    a, _ = _map(ring_vcpu_fd, 16, R, SHARED, 64)
    b, _ = _map(ring_vcpu_fd, 16, R | W, SHARED, 64)
    assert a and b
    try:
        assert ctypes.string_at(a + 15 * PAGE, 16) == bytes(16)  # zeroed, readable
        assert _libc.mprotect(a, 16 * PAGE, R | W) == 0
        ctypes.memmove(b + 16, b"\x02\x00\x00\x00", 4)  # flags of entry 1, via b
        assert ctypes.string_at(a + 16, 4) == b"\x02\x00\x00\x00"  # the same page
        assert _libc.mprotect(b, 16 * PAGE, R | W | X) != 0
        assert ctypes.get_errno() == errno.EACCES
    finally:
        _libc.munmap(a, 16 * PAGE)
        _libc.munmap(b, 16 * PAGE)


@pytest.mark.kvm
def test_kvm_vm_fd_does_not_map() -> None:
    from memslots.kvm.abi import KvmSystem

    with KvmSystem() as kvm, kvm.create_vm() as vm:
        vm.enable_cap(CAP_RING, 65536)
        assert _map(vm.fd, 1, R, SHARED, 64) == (0, errno.ENODEV)


_TOUCH = """
import ctypes, mmap, os, sys
from memslots.kvm.abi import KvmSystem
ring, pages, pgoff, touch = (int(x) for x in sys.argv[1:])
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long)
kvm = KvmSystem()
vm = kvm.create_vm()
if ring:
    vm.enable_cap(192, 65536)
fd = vm.create_vcpu(0)
addr = libc.mmap(None, pages * 4096, mmap.PROT_READ, mmap.MAP_SHARED, fd, pgoff * 4096)
assert addr != ctypes.c_void_p(-1).value
ctypes.string_at(addr + touch * 4096, 8)
print("touched")
"""


@pytest.mark.kvm
@pytest.mark.parametrize(
    ("ring", "pages_", "pgoff", "touch", "sigbus"),
    [
        (1, 32, 64, 15, False),  # the ring's last page
        (1, 32, 64, 16, True),  # past the ring
        (1, 1, 80, 0, True),
        (1, 1, 63, 0, True),
        (1, 2, 63, 1, False),  # page 1 is ring page 0
        (1, 80, 0, 0, False),  # kvm_run
        (1, 80, 0, 3, True),
        (1, 80, 0, 64, False),
        (0, 1, 64, 0, True),  # no ring
    ],
)
def test_kvm_ring_touches(ring: int, pages_: int, pgoff: int, touch: int, sigbus: bool) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(_TOUCH),
            str(ring),
            str(pages_),
            str(pgoff),
            str(touch),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if sigbus:
        assert proc.returncode == -signal.SIGBUS, proc.stderr
    else:
        assert proc.returncode == 0 and "touched" in proc.stdout, proc.stderr


# ======================================================================================
# FIRST_WRITE (hardware-MMU KVM) on the engine
# ======================================================================================
@pytest.fixture
def mmu_vm() -> Iterator[tuple[Vm, Vcpu, HostMemory]]:
    vm = Vm()
    vm.dirty_rings.push_mode = PushMode.FIRST_WRITE
    with HostMemory(128 * PAGE) as mem:
        vm.enable_dirty_ring(RING)
        vm.set_user_memory_region(1, LOG, 0, 128 * PAGE, mem.addr)
        yield vm, vm.create_vcpu(0), mem


def test_first_write_pushes_once_per_page_until_reset(
    mmu_vm: tuple[Vm, Vcpu, HostMemory],
) -> None:
    vm, vcpu, _ = mmu_vm
    for _ in range(3):
        vcpu.write_guest(5 * PAGE, b"x")
    vcpu.write_guest(6 * PAGE - 1, b"xy")  # pages 5 and 6
    other = vm.create_vcpu(1)
    other.write_guest(5 * PAGE, b"x")  # write protection is per VM, not per vCPU
    assert vcpu.harvest_dirty_ring() == [(1, 5), (1, 6)]
    assert other.harvest_dirty_ring() == []
    vcpu.write_guest(5 * PAGE, b"x")
    assert vcpu.harvest_dirty_ring() == []  # harvested but not reset: still writable
    assert vm.reset_dirty_rings() == 2
    vcpu.write_guest(5 * PAGE, b"x")
    assert vcpu.harvest_dirty_ring() == [(1, 5)]


def test_first_write_slot_changes_rearm_every_page(mmu_vm: tuple[Vm, Vcpu, HostMemory]) -> None:
    vm, vcpu, mem = mmu_vm
    vcpu.mark_page_dirty(3)
    vm.set_user_memory_region(1, LOG, 0x100000, 128 * PAGE, mem.addr)  # MOVE
    vcpu.mark_page_dirty(0x100 + 3)
    vm.set_user_memory_region(1, 0, 0x100000, 128 * PAGE, mem.addr)
    vm.set_user_memory_region(1, LOG, 0x100000, 128 * PAGE, mem.addr)  # logging again
    vcpu.mark_page_dirty(0x100 + 3)
    assert vcpu.harvest_dirty_ring() == [(1, 3)] * 3


def test_first_write_a_bad_entry_in_a_group_leaves_its_pages_writable(
    mmu_vm: tuple[Vm, Vcpu, HostMemory],
) -> None:
    """kvm_dirty_ring_reset groups entries of one slot within 64 pages; one entry past the
    slot's end (left from a bigger slot of that id) makes the whole group be skipped, so
    its good pages are not re-armed, while a separate group is."""
    vm, vcpu, mem = mmu_vm
    vcpu.mark_page_dirty(70)
    vm.set_user_memory_region(1, 0, 0, 0, 0)
    vm.set_user_memory_region(1, LOG, 0, 64 * PAGE, mem.addr)  # 64 pages now
    vcpu.mark_page_dirty(10)
    vcpu.mark_page_dirty(11)
    vcpu.mark_page_dirty(63)
    assert list(reset_batches([(1, 70), (1, 10), (1, 11), (1, 63)])) == [
        (1, 10, 1 | 2 | 1 << 60 | 1 << 53)
    ]
    vcpu.harvest_dirty_ring()
    assert vm.reset_dirty_rings() == 4  # the count is unaffected
    for p in (10, 11, 63):
        vcpu.mark_page_dirty(p)
    assert vcpu.harvest_dirty_ring() == []  # none re-armed
    # without the stale entry the same pages are re-armed
    vm.set_user_memory_region(1, 0, 0, 0, 0)
    vm.set_user_memory_region(1, LOG, 0, 64 * PAGE, mem.addr)
    for p in (10, 11, 63):
        vcpu.mark_page_dirty(p)
    vcpu.harvest_dirty_ring()
    assert vm.reset_dirty_rings() == 3
    for p in (10, 11, 63):
        vcpu.mark_page_dirty(p)
    assert vcpu.harvest_dirty_ring() == [(1, 10), (1, 11), (1, 63)]


@pytest.mark.parametrize(
    ("entries", "batches"),
    [
        ([], []),
        ([(1, 5)], [(1, 5, 1)]),
        ([(1, 5), (1, 68), (1, 69)], [(1, 5, 1 | 1 << 63), (1, 69, 1)]),  # 63 joins, 64 not
        ([(1, 5), (1, 67)], [(1, 5, 1 | 1 << 62)]),
        ([(1, 70), (1, 7)], [(1, 7, 1 | 1 << 63)]),  # backwards, the top bit still fits
        ([(1, 70), (1, 6)], [(1, 70, 1), (1, 6, 1)]),  # backwards too far
        ([(1, 3), (2, 3), (1, 3)], [(1, 3, 1), (2, 3, 1), (1, 3, 1)]),
        ([(1, 9), (1, 9), (1, 8)], [(1, 8, 0b11)]),
        ([(1, (1 << 64) - 1), (1, 0)], [(1, (1 << 64) - 1, 0b11)]),  # u64: 0 follows 2^64-1
    ],
)
def test_reset_batches(entries: list[tuple[int, int]], batches: list[tuple[int, int, int]]) -> None:
    assert list(reset_batches(entries)) == batches


# ======================================================================================
# Model-based: slot changes, pushes, harvests, resets and entries, against a plain model
# ======================================================================================
NSLOTS, WINDOW = 3, 16  # slot i lives in gfns [16 i, 16 i + 16): slots never overlap
SOFT = 256 - 64

slot_op = st.tuples(
    st.just("slot"),
    st.integers(0, NSLOTS - 1),
    st.integers(0, 8),  # base inside the window
    st.sampled_from([0, 4, 8]),  # npages (0 deletes)
    st.booleans(),  # logging
)
# a write's gfn: slot window * WINDOW + 0..11, so most land in a slot (base 0-8, 4 or 8 pages)
gfns = st.builds(lambda w, k: w * WINDOW + k, st.integers(0, NSLOTS - 1), st.integers(0, 11))
write_op = st.tuples(st.just("write"), st.integers(0, 1), gfns, st.booleans(), st.just(False))
burst_op = st.tuples(st.just("burst"), st.integers(0, 1), gfns, st.just(True), st.just(False))
other_op = st.tuples(st.sampled_from(["harvest", "enter"]), st.integers(0, 1), st.just(0),
                     st.just(False), st.just(False))  # fmt: skip
reset_op = st.tuples(st.sampled_from(["reset", "cycle"]), st.just(0), st.just(0), st.just(False),
                    st.just(False))  # fmt: skip
ops = st.lists(
    st.one_of(slot_op, write_op, write_op, write_op, burst_op, other_op, reset_op, reset_op),
    max_size=80,
)
BURST = 40


class Model:
    """The dirty ring as a plain list per vCPU, written from the documentation."""

    def __init__(self, first_write: bool) -> None:
        self.first_write = first_write
        self.slots: dict[int, tuple[int, int, bool]] = {}  # id -> base gfn, npages, log
        self.writable: dict[int, set[int]] = {}  # FIRST_WRITE: pushed, not re-armed
        self.rings: list[list[list[Any]]] = [[], []]  # [slot, offset, harvested]
        self.request = [False, False]

    def set_slot(self, id: int, base: int, npages: int, log: bool) -> None:
        if npages:
            self.slots[id] = (base, npages, log)
        else:
            self.slots.pop(id, None)
        self.writable.pop(id, None)  # any change of the slot re-arms all of it

    def write(self, v: int, gfn: int) -> bool:
        """False for a hole."""
        for id, (base, npages, log) in self.slots.items():
            if base <= gfn < base + npages:
                if log and not (self.first_write and gfn - base in self.writable.get(id, ())):
                    self.writable.setdefault(id, set()).add(gfn - base)
                    self.rings[v].append([id, gfn - base, False])
                    if len(self.rings[v]) >= SOFT:
                        self.request[v] = True
                return True
        return False

    def harvest(self, v: int) -> list[tuple[int, int]]:
        out = [(e[0], e[1]) for e in self.rings[v] if not e[2]]
        for e in self.rings[v]:
            e[2] = True
        return out

    def enter(self, v: int) -> bool:
        if self.request[v]:
            self.request[v] = False
            if len(self.rings[v]) >= SOFT:
                self.request[v] = True
                return True
        return False

    def reset(self) -> int:
        total = 0
        for ring in self.rings:
            done = []
            while ring and ring[0][2]:
                done.append(ring.pop(0))
            total += len(done)
            # groups: same slot, every offset within 64 of every other
            groups: list[list[list[Any]]] = []
            for e in done:
                g = groups[-1] if groups else None
                if (
                    g
                    and g[0][0] == e[0]
                    and max(x[1] for x in [*g, e]) - min(x[1] for x in [*g, e]) < 64
                ):
                    g.append(e)
                else:
                    groups.append([e])
            for g in groups:
                id = g[0][0]
                if id in self.slots and max(x[1] for x in g) < self.slots[id][1]:
                    self.writable.get(id, set()).difference_update(x[1] for x in g)
        return total


@pytest.mark.parametrize("mode", [PushMode.EVERY_WRITE, PushMode.FIRST_WRITE])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops)
def test_model_based(mode: PushMode, ops: list[tuple[str, int, int, Any, int]]) -> None:
    vm = Vm()
    vm.dirty_rings.push_mode = mode
    model = Model(mode is PushMode.FIRST_WRITE)
    mems = [HostMemory(WINDOW * PAGE) for _ in range(NSLOTS)]
    try:
        vm.enable_dirty_ring(4096)
        vcpus = [vm.create_vcpu(0), vm.create_vcpu(1)]
        for id in range(NSLOTS):  # every slot logs to start with
            vm.set_user_memory_region(id, LOG, id * WINDOW * PAGE, 8 * PAGE, mems[id].addr)
            model.set_slot(id, id * WINDOW, 8, True)
        for name, a, b, c, d in ops:
            if name == "slot":
                id, off, npages, log = a, b, min(c, WINDOW - b), d
                base, flags, cur = id * WINDOW + off, LOG if d else 0, vm.id_to_memslot(id)
                if cur is None and not npages:
                    continue
                if cur is not None and npages and npages != cur.npages:
                    vm.set_user_memory_region(id, 0, 0, 0, 0)  # a size change is a new slot
                    model.set_slot(id, 0, 0, False)
                    cur = None
                changed = cur is None or (cur.base_gfn, bool(cur.flags & LOG)) != (base, log)
                vm.set_user_memory_region(id, flags, base * PAGE, npages * PAGE, mems[id].addr)
                if changed or not npages:  # CREATE, DELETE, MOVE, FLAGS_ONLY; not NONE
                    model.set_slot(id, base, npages, bool(log))
            elif name in ("write", "burst"):
                v, gfn, by_mark = vcpus[a], b, c
                for _ in range(BURST if name == "burst" else 1):
                    if len(model.rings[a]) >= 256:
                        break  # the model has no overwrites
                    hole = not model.write(a, gfn)
                    if by_mark:
                        v.mark_page_dirty(gfn)
                    else:
                        e = errno_of(lambda v=v, gfn=gfn: v.write_guest(gfn * PAGE + 7, b"z"))  # type: ignore[misc]
                        assert e == (EFAULT if hole else 0)
            elif name == "harvest":
                assert vcpus[a].harvest_dirty_ring() == model.harvest(a)
            elif name == "cycle":  # what a VMM does each round
                for i, v in enumerate(vcpus):
                    assert v.harvest_dirty_ring() == model.harvest(i)
                assert vm.reset_dirty_rings() == model.reset()
            elif name == "enter":
                ring = vcpus[a].dirty_ring
                assert ring is not None
                assert ring.check_request() == model.enter(a)
            else:
                assert vm.reset_dirty_rings() == model.reset()
        for i, v in enumerate(vcpus):
            ring = v.dirty_ring
            assert ring is not None and ring.used == len(model.rings[i])
        vm.check_invariants()
    finally:
        for m in mems:
            m.close()


# ======================================================================================
# examples/live_migration.py --dirty-ring converges and verifies
# ======================================================================================
def test_live_migration_with_the_ring_on_the_engine(capsys: pytest.CaptureFixture[str]) -> None:
    out = _run_live_migration(["--engine", "--dirty-ring", "--ring-bytes", "4096"], capsys)
    assert "dirty tracking: the dirty ring (4 KiB per vCPU)" in out
    assert "destination equals source byte for byte: OK" in out
    assert "dirty-ring-full exits" in out


@pytest.mark.kvm
def test_live_migration_with_the_ring_on_kvm(capsys: pytest.CaptureFixture[str]) -> None:
    out = _run_live_migration(
        ["--dirty-ring", "--ring-bytes", "4096", "--bandwidth", "4", "--max-rounds", "10"], capsys
    )
    assert "real code on a vCPU" in out and "the dirty ring" in out
    assert "destination equals source byte for byte: OK" in out
    assert "kernel/engine disagreements: 0" in out


# ======================================================================================
# The harvest benchmark runs and checks what it harvests (no timing is asserted)
# ======================================================================================
def test_bench_dirty_on_the_engine() -> None:
    from memslots.tools.bench_dirty import SCENARIOS, run

    result = run(1, kernel=False)
    assert list(result.scenarios) == [sc.name for sc in SCENARIOS]
    for sc in SCENARIOS:
        r = result.scenarios[sc.name]
        assert r["dirty_pages"] == len(sc.dirty()) and r["engine_ring_s"] > 0
        assert "kernel_ring_s" not in r
    assert [r["dirty_pages"] for r in result.scenarios.values()] == [10486, 3200]


@pytest.mark.kvm
def test_memslots_bench_dirty_cli(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from memslots.tools.cli import main

    out = tmp_path / "dirty.json"
    assert main(["bench", "--dirty", "--repetitions", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Dirty-page harvest" in text and "kernel" in text
    data = json.loads(out.read_text())
    assert all("kernel_bitmap_s" in r for r in data["scenarios"].values())


def test_the_docs_example_runs_and_prints_what_it_says() -> None:
    import contextlib
    import io
    import re
    from pathlib import Path

    doc = Path(__file__).resolve().parent.parent / "docs" / "dirty-ring.md"
    block = re.findall(r"```python\n(.*?)```", doc.read_text(), re.S)[0]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block, str(doc), "exec"), {})
    assert out.getvalue().splitlines() == ["[(1, 5), (1, 7)]", "2"]


@pytest.mark.kvm
def test_kvm_close_unmaps_the_rings_and_releases_every_fd() -> None:
    from memslots.kvm import KvmVm
    from memslots.kvm.vm import open_fd_count

    def vcpu_maps() -> int:
        with open("/proc/self/maps") as f:
            return f.read().count("kvm-vcpu")

    fds, maps = open_fd_count(), vcpu_maps()
    vm = KvmVm()
    vm.enable_dirty_ring(RING)
    vcpus = [vm.create_vcpu(i) for i in range(2)]
    assert vcpu_maps() == maps + 4  # kvm_run and the ring of each vCPU
    assert all(v.harvest_dirty_ring() == [] for v in vcpus)
    vm.close()
    assert open_fd_count() == fds and vcpu_maps() == maps
    assert errno_of(vcpus[0].harvest_dirty_ring) == errno.EBADF
    assert errno_of(vm.reset_dirty_rings) == errno.EBADF


# --------------------------------------------------------------------------------------
# KvmVm's ring oracle and a reset made by another thread while the vCPU runs
# --------------------------------------------------------------------------------------
def _oracle_with_a_soft_full_ring() -> tuple[Any, Any, list[str], mmap.mmap]:
    """A KernelRing over an anonymous mapping the test pushes into as the kernel would,
    made soft-full (64 of 128 entries) and harvested, with the vCPU inside a KVM_RUN
    that the oracle predicted must exit KVM_EXIT_DIRTY_RING_FULL."""
    from memslots.kvm.abi import KVM_EXIT_DIRTY_RING_FULL
    from memslots.kvm.ring import KernelRing
    from memslots.kvm.vcpu import VcpuExit

    nbytes = 128 * 16
    mapping = mmap.mmap(-1, nbytes)
    reports: list[str] = []
    oracle = KernelRing(mapping, nbytes, lambda: {1: 1000}, lambda call, d: reports.append(d))
    kernel = DirtyRing(nbytes, mapping)  # the kernel's side, on the same memory
    oracle.before_run()
    for offset in range(64):  # the guest's writes fill the ring to its soft limit
        kernel.push(1, offset)
    oracle.after_run(VcpuExit(KVM_EXIT_DIRTY_RING_FULL))
    assert reports == [] and oracle.pushes == 64
    oracle.before_run()  # the request is pending and nothing was reset
    assert oracle._predict_full and oracle.running
    assert len(oracle.harvest()) == 64
    return oracle, kernel, reports, mapping


def test_ring_oracle_a_reset_during_the_run_may_let_the_guest_run() -> None:
    """Another thread's KVM_RESET_DIRTY_RINGS while the vCPU is in KVM_RUN: the kernel
    may have checked the soft-full request after the reset freed the ring, and then runs
    the guest. A run that ends in HLT is no disagreement then, and is one without it."""
    from memslots.kvm.abi import KVM_EXIT_DIRTY_RING_FULL, KVM_EXIT_HLT
    from memslots.kvm.vcpu import VcpuExit

    oracle, kernel, reports, mapping = _oracle_with_a_soft_full_ring()
    runs = oracle.runs
    count = oracle.predict_reset()  # the reset begins while the vCPU runs
    assert count == 64
    assert kernel.reset() == 64  # the kernel frees the ring ...
    oracle.after_run(VcpuExit(KVM_EXIT_HLT))  # ... checks the request after it: runs
    oracle.apply_reset(count, runs)
    assert reports == []
    assert oracle._resets_in_flight == 0
    # a FULL exit with neither a soft-full ring at the start nor a push stays wrong
    oracle.before_run()
    assert not oracle._predict_full
    assert oracle.predict_reset() == 0  # nothing to reset: no reset in flight
    oracle.after_run(VcpuExit(KVM_EXIT_DIRTY_RING_FULL))
    assert len(reports) == 1 and "no request pending" in reports[0]
    oracle.release()
    kernel.release()
    mapping.close()


def test_ring_oracle_without_a_reset_the_soft_full_exit_is_required() -> None:
    from memslots.kvm.abi import KVM_EXIT_HLT
    from memslots.kvm.vcpu import VcpuExit

    oracle, kernel, reports, mapping = _oracle_with_a_soft_full_ring()
    oracle.after_run(VcpuExit(KVM_EXIT_HLT))
    assert len(reports) == 1 and "expected KVM_EXIT_DIRTY_RING_FULL" in reports[0]
    oracle.release()
    kernel.release()
    mapping.close()


def test_ring_oracle_a_failed_reset_is_no_longer_in_flight() -> None:
    """A reset that failed freed nothing: the runs after it are checked in full again."""
    from memslots.kvm.abi import KVM_EXIT_HLT
    from memslots.kvm.vcpu import VcpuExit

    oracle, kernel, reports, mapping = _oracle_with_a_soft_full_ring()
    oracle.after_run(VcpuExit(KVM_EXIT_HLT))  # wrong, as above
    count = oracle.predict_reset()  # begun between runs ...
    oracle.end_reset(count)  # ... and failed
    oracle.before_run()
    assert oracle._predict_full and not oracle._reset_overlap
    oracle.after_run(VcpuExit(KVM_EXIT_HLT))
    assert len(reports) == 2
    oracle.release()
    kernel.release()
    mapping.close()
