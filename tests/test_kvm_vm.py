"""KvmVm on the real kernel, in strict mode (every call answered by the kernel and the
engine, any difference raising ConformanceError):

- every errno rule of test_engine_errno.py, asserted against the kernel;
- random operation sequences (hypothesis);
- close() releases every fd and mapping, and deletes the slots over memory it unmaps;
- dirty logs: guest writes (pattern writer), host writes (mark_page_dirty, write_guest),
  and the exact kernel-vs-engine bitmap comparison while no vCPU exists;
- guest_memfd slots (modelled by the engine from KVM_CAP_GUEST_MEMFD);
- the oracle itself: planted engine bugs are caught.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import host_profile, needs_feature
from memslots import KVM_MEM_GUEST_MEMFD, KVM_MEM_LOG_DIRTY_PAGES, MemslotError
from memslots.dirty_log import dirty_pages, pages_to_bitmap
from memslots.kvm import ConformanceError, KvmVcpuHandle, KvmVm, probe_max_gfn
from memslots.kvm.abi import (
    KVM_CAP_MULTI_ADDRESS_SPACE,
    KVM_CAP_NR_MEMSLOTS,
    KvmSystem,
    VmFd,
)
from memslots.kvm.guests import PATTERN_DONE_PORT, PATTERN_WRITER, pattern_word, pattern_writer_args
from memslots.kvm.vcpu import IoExit
from memslots.kvm.vm import ENGINE_RAISED, open_fd_count
from memslots.profiles import KernelProfile
from memslots.tools.conform import Op, Session
from memslots.validate import Decision
from test_engine_errno import CASES, SETUP
from test_kvm_conform import PRELUDE, ops_strategy

pytestmark = pytest.mark.kvm

PAGE = 4096
MB = 1 << 20
HVA = 0x7F0000000000
EINVAL, EEXIST, EBADF, ENOENT = errno.EINVAL, errno.EEXIST, errno.EBADF, errno.ENOENT

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def vm() -> Iterator[KvmVm]:
    with KvmVm() as v:
        yield v


def table(vm: KvmVm) -> list[tuple[int, ...]]:
    return [s.as_tuple() for s in vm.slots()]


# ---------------------------------------------------------------------------------------
# every errno rule of the engine's tests, against the kernel


def test_the_engine_is_configured_from_this_kernel(vm: KvmVm) -> None:
    with KvmSystem() as kvm:
        assert vm.nr_address_spaces == max(1, vm.fd.check_extension(KVM_CAP_MULTI_ADDRESS_SPACE))
        assert vm.limits.max_user_slots == kvm.check_extension(KVM_CAP_NR_MEMSLOTS)
    # every limit is the probed profile's (guest_memfd slots on the default VM are tried,
    # not read from KVM_CAP_GUEST_MEMFD, which some kernels set without allowing them)
    assert vm.limits == KernelProfile.probe().vm_limits()
    assert vm.limits.max_gfn == probe_max_gfn()
    # the probed limit is exact: a one-page slot at it is accepted, one past it is not
    top = vm.limits.max_gfn << 12
    vm.set_user_memory_region(0, 0, top, PAGE, HVA)
    with pytest.raises(MemslotError) as info:
        vm.set_user_memory_region(1, 0, top + PAGE, PAGE, HVA)
    assert info.value.errno == EINVAL
    with pytest.raises(MemslotError):  # a MOVE is checked too (and rolled back)
        vm.set_user_memory_region(0, 0, top + PAGE, PAGE, HVA)
    assert vm.disagreements == []


def _kernel_expectation(req: tuple[int, int, int, int, int], expected: int) -> int:
    """The engine's tests assume x86's two address spaces; where this kernel has one (no
    SMM), a request for address space 1 is EINVAL."""
    as_id = req[0] >> 16
    return EINVAL if as_id >= host_profile().nr_address_spaces else expected


# "2^31-1 pages (max_gfn permitting)" is left out on purpose: the kernel accepts it, and
# the shadow MMU would then allocate 16 GiB of rmap for the slot.
KERNEL_CASES = [c for c in CASES if c[0] != "2^31-1 pages (max_gfn permitting)"]
assert len(KERNEL_CASES) == len(CASES) - 1


@pytest.mark.parametrize(
    ("name", "req", "v2", "expected"), KERNEL_CASES, ids=[c[0] for c in KERNEL_CASES]
)
def test_errno_rules_agree_with_the_kernel(
    vm: KvmVm, name: str, req: tuple[int, int, int, int, int], v2: bool, expected: int
) -> None:
    for s in SETUP:
        vm.set_user_memory_region(*s)
    before = table(vm)
    gen = vm.memslots(0).generation
    want = _kernel_expectation(req, expected)
    call = vm.set_user_memory_region2 if v2 else vm.set_user_memory_region
    if want:
        with pytest.raises(MemslotError) as exc:  # strict: a different engine answer raises
            call(*req)  # ConformanceError, which is not a MemslotError
        assert exc.value.errno == want, exc.value
        assert table(vm) == before
        assert vm.memslots(0).generation == gen
    else:
        call(*req)
    assert vm.disagreements == []
    vm.check_invariants()


# ---------------------------------------------------------------------------------------
# random sequences in strict mode


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(st.lists(ops_strategy, max_size=30))
def test_random_sequences_agree_in_strict_mode(ops: list[Op]) -> None:
    with Session(strict=True) as s:
        for op in [*PRELUDE, *ops]:
            s.run(op)  # ConformanceError on the first disagreement
        assert s.vm.disagreements == []
        s.vm.check_invariants()


# ---------------------------------------------------------------------------------------
# lifetime


def _maps() -> str:
    return Path("/proc/self/maps").read_text()


def test_close_releases_every_fd_and_mapping() -> None:
    fds_before = open_fd_count()
    vcpu_maps_before = _maps().count("kvm-vcpu")
    vm = KvmVm()
    mem = vm.host_memory(16 * PAGE)
    other = vm.host_memory(PAGE)
    vm.set_user_memory_region(0, 0, 0, mem.size, mem.addr)
    vm.create_vcpu(0)
    vm.create_vcpu(1)
    # /dev/kvm, the VM, two vCPUs and their kvm_run mappings (Python's mmap dups the fd)
    assert open_fd_count() == fds_before + 6
    maps = _maps()
    assert f"{mem.addr:x}-" in maps and f"{other.addr:x}-" in maps
    assert maps.count("kvm-vcpu") == vcpu_maps_before + 2  # the kvm_run mappings
    vm.close()
    assert open_fd_count() == fds_before
    maps = _maps()
    assert f"{mem.addr:x}-" not in maps and f"{other.addr:x}-" not in maps
    assert maps.count("kvm-vcpu") == vcpu_maps_before
    assert mem.closed and other.closed and vm.closed
    vm.close()  # idempotent
    with pytest.raises(MemslotError) as info:
        vm.set_user_memory_region(1, 0, 0, PAGE, HVA)
    assert info.value.errno == EBADF


def test_close_deletes_the_slots_over_its_own_memory_first() -> None:
    # A second reference keeps the VM alive after close(): the slot over memory close()
    # unmaps must be gone from the kernel, the slot over foreign memory is left to die
    # with the VM.
    vm = KvmVm()
    mem = vm.host_memory(4 * PAGE)
    vm.set_user_memory_region(0, 0, 0, mem.size, mem.addr)
    vm.set_user_memory_region(1, 0, MB, PAGE, HVA)
    with VmFd(os.dup(vm.fd.fd), vcpu_mmap_size=0) as alive:
        vm.close()
        with pytest.raises(MemslotError) as info:
            alive.set_user_memory_region(0, 0, 0, 0, 0)
        assert info.value.errno == EINVAL  # already deleted
        alive.set_user_memory_region(1, 0, 0, 0, 0)  # still there: this delete works


def test_a_vm_with_a_closed_slot_memory_is_context_managed() -> None:
    with KvmVm() as vm:
        mem = vm.host_memory(PAGE)
        vm.set_user_memory_region(0, 0, 0, PAGE, mem.addr)
        assert repr(vm).startswith("KvmVm(fd=")
    assert vm.closed and mem.closed and repr(vm).startswith("KvmVm(closed")


# ---------------------------------------------------------------------------------------
# dirty logs


CODE = 0x1000


def _guest_vm(vm: KvmVm, data_slots: int = 3) -> None:
    """Slot 0: 64 KiB of code at gpa 0 (the pattern writer at 0x1000); slots 1..n: 16
    pages each from gpa 64 KiB, logging, over one mapping."""
    code = vm.host_memory(0x10000)
    vm.set_user_memory_region(0, 0, 0, code.size, code.addr)
    vm.write_guest(CODE, PATTERN_WRITER)
    data = vm.host_memory(data_slots * 0x10000)
    for i in range(data_slots):
        vm.set_user_memory_region(
            1 + i, KVM_MEM_LOG_DIRTY_PAGES, (1 + i) * 0x10000, 0x10000, data.addr + i * 0x10000
        )


def _run_pattern(vcpu: KvmVcpuHandle, first_gpa: int, pages: int, word: int) -> None:
    reports: list[int] = []

    def on_io(io: IoExit) -> None:
        assert io.port == PATTERN_DONE_PORT
        reports.append(io.value)

    args = pattern_writer_args(first_gpa, pages, first_word=word, offset=0x20)
    vcpu.setup_real_mode(CODE, regs=args.regs, segments=args.segments)
    result = vcpu.run_until_hlt(on_io=on_io, timeout=10)
    assert result.halted and reports == [pages]


def _log_pages(vm: KvmVm, slot: int) -> list[int]:
    return dirty_pages(vm.get_dirty_log(slot))


def test_guest_writes_and_host_writes_merge_in_the_dirty_log(vm: KvmVm) -> None:
    _guest_vm(vm)
    vcpu = vm.create_vcpu(0)
    first, pages = 0x1A000, 24  # slot 1 page 10 .. slot 3 page 1: three slots
    _run_pattern(vcpu, first, pages, 0xC0DE)
    for k in range(pages):  # the guest's writes, read back through the engine
        assert vm.read_guest(first + k * PAGE + 0x20, 2) == pattern_word(0xC0DE, k).to_bytes(
            2, "little"
        )
    assert _log_pages(vm, 1) == list(range(10, 16))
    assert _log_pages(vm, 2) == list(range(0, 16))
    assert _log_pages(vm, 3) == [0, 1]
    assert [_log_pages(vm, s) for s in (1, 2, 3)] == [[], [], []]  # GET cleared both sides
    # host writes: marked in the engine, merged with the guest's
    vm.mark_page_dirty(0x10000 // PAGE + 3)
    vm.write_guest(0x30000 + 5 * PAGE, b"host")
    _run_pattern(vcpu, 0x10000, 2, 0x1111)  # pages 0, 1 of slot 1
    assert _log_pages(vm, 1) == [0, 1, 3]
    assert _log_pages(vm, 3) == [5]
    assert vm.kernel_dirty_log(1) == bytes(8)  # the kernel's half was cleared by GET too
    assert vm.disagreements == []


def test_dirty_bits_survive_a_move_and_die_with_logging(vm: KvmVm) -> None:
    _guest_vm(vm, data_slots=1)
    vcpu = vm.create_vcpu(0)
    _run_pattern(vcpu, 0x10000 + 4 * PAGE, 3, 0x2222)
    vm.mark_page_dirty(0x10000 // PAGE + 9)
    s = vm.id_to_memslot(1)
    assert s is not None
    vm.set_user_memory_region(1, KVM_MEM_LOG_DIRTY_PAGES, 0x80000, 0x10000, s.userspace_addr)
    assert _log_pages(vm, 1) == [4, 5, 6, 9]  # kernel's and engine's bits moved along
    _run_pattern(vcpu, 0x80000, 1, 0x3333)
    vm.mark_page_dirty(0x80000 // PAGE + 2)
    vm.set_user_memory_region(1, 0, 0x80000, 0x10000, s.userspace_addr)  # logging off
    with pytest.raises(MemslotError) as info:
        vm.get_dirty_log(1)
    assert info.value.errno == ENOENT
    vm.set_user_memory_region(1, KVM_MEM_LOG_DIRTY_PAGES, 0x80000, 0x10000, s.userspace_addr)
    assert _log_pages(vm, 1) == []  # pending bits were dropped on both sides
    assert vm.disagreements == []


def test_bitmaps_are_compared_exactly_without_a_vcpu(vm: KvmVm) -> None:
    vm.enable_manual_dirty_log_protect(3)  # ENABLE | INITIALLY_SET
    vm.set_user_memory_region(1, KVM_MEM_LOG_DIRTY_PAGES, 0, 100 * PAGE, HVA)
    assert _log_pages(vm, 1) == list(range(100))  # compared with the kernel's: equal
    vm.clear_dirty_log(1, 0, 64, pages_to_bitmap(range(0, 64, 2), 64))
    vm.clear_dirty_log(1, 64, 36, pages_to_bitmap([0, 35], 36))
    want = [p for p in range(100) if (p < 64 and p % 2) or 64 < p < 99]
    assert _log_pages(vm, 1) == want
    vm.set_user_memory_region(1, KVM_MEM_LOG_DIRTY_PAGES, 64 * PAGE, 100 * PAGE, HVA)  # MOVE
    assert _log_pages(vm, 1) == want
    vm.enable_manual_dirty_log_protect(0)
    assert _log_pages(vm, 1) == want  # GET without manual protect clears...
    assert _log_pages(vm, 1) == []  # ...on both sides
    assert vm.disagreements == []
    # an engine whose bitmap is wrong is caught, whichever side has the extra page
    vm.enable_manual_dirty_log_protect(1)
    slot = vm.id_to_memslot(1)
    assert slot is not None and slot.dirty_bitmap is not None
    slot.dirty_bitmap[1] |= 0x80  # page 15
    with pytest.raises(ConformanceError, match=r"dirty pages: kernel \[\], engine \[15\]"):
        vm.get_dirty_log(1)


def test_host_dirtied_pages_relax_the_comparison_to_a_subset(vm: KvmVm) -> None:
    vm.enable_manual_dirty_log_protect(3)
    vm.set_user_memory_region(1, KVM_MEM_LOG_DIRTY_PAGES, 0, 64 * PAGE, HVA)
    vm.clear_dirty_log(1, 0, 64, b"\xff" * 8)
    vm.mark_page_dirty(7)  # the engine knows a page the kernel does not: fine
    assert _log_pages(vm, 1) == [7]
    vm.set_user_memory_region(2, KVM_MEM_LOG_DIRTY_PAGES, MB, 64 * PAGE, HVA)
    slot = vm.id_to_memslot(2)
    assert slot is not None and slot.dirty_bitmap is not None
    slot.dirty_bitmap[0] &= 0xFE  # but a kernel page the engine lost is a disagreement
    with pytest.raises(ConformanceError) as info:
        vm.get_dirty_log(2)
    assert info.value.kernel == 0 == info.value.engine
    assert "kernel [0, 1, 2, 3, 4, 5, 6, 7, ... +56], engine [1, 2," in info.value.detail


# ---------------------------------------------------------------------------------------
# guest_memfd (KVM_CAP_GUEST_MEMFD: the engine models binds and their errors)


def _errno(call: Any) -> int:
    try:
        call()
    except MemslotError as exc:
        return exc.errno or 0
    return 0


def test_guest_memfd_slots_agree_with_the_kernel(vm: KvmVm) -> None:
    if not vm.limits.private_mem:
        pytest.skip("this kernel does not take KVM_MEM_GUEST_MEMFD on a default VM")
    set2 = vm.set_user_memory_region2
    gmem = vm.create_guest_memfd(MB)
    devnull = os.open(os.devnull, os.O_RDONLY)
    other_vm = KvmVm()
    foreign = other_vm.create_guest_memfd(MB)
    closed = os.dup(devnull)
    os.close(closed)
    G = KVM_MEM_GUEST_MEMFD
    try:
        size = 16 * PAGE
        cases = [
            ("bad offset", lambda: set2(1, G, 0, size, HVA, 1, gmem), EINVAL),
            ("range past the file", lambda: set2(1, G, 0, size, HVA, MB - PAGE, gmem), EINVAL),
            ("offset 2^63", lambda: set2(1, G, 0, size, HVA, 1 << 63, gmem), EINVAL),
            ("not a guest_memfd", lambda: set2(1, G, 0, size, HVA, 0, devnull), EINVAL),
            ("the VM fd", lambda: set2(1, G, 0, size, HVA, 0, vm.fd.fd), EINVAL),
            ("another VM's", lambda: set2(1, G, 0, size, HVA, 0, foreign), EINVAL),
            ("closed fd", lambda: set2(1, G, 0, size, HVA, 0, closed), EBADF),
            ("with LOG_DIRTY", lambda: set2(1, G | 1, 0, size, HVA, 0, gmem), EINVAL),
            ("with READONLY", lambda: set2(1, G | 2, 0, size, HVA, 0, gmem), EINVAL),
            ("through v1", lambda: vm.set_user_memory_region(1, G, 0, size, HVA), EINVAL),
            ("bind", lambda: set2(1, G, 0, size, HVA, 0, gmem), 0),
            ("range already bound", lambda: set2(2, G, MB, size, HVA, 8 * PAGE, gmem), EINVAL),
            ("next range", lambda: set2(2, G, MB, size, HVA, size, gmem), 0),
            ("overlap first (EEXIST)", lambda: set2(3, G, 0, size, HVA, 0, closed), EEXIST),
            ("no-op re-set", lambda: set2(1, G, 0, size, HVA, 0, gmem), EINVAL),
            ("flags 0", lambda: set2(1, 0, 0, size, HVA, 0, gmem), EINVAL),
            ("move", lambda: vm.set_user_memory_region(1, 0, 2 * MB, size, HVA), EINVAL),
            ("move onto slot 2", lambda: vm.set_user_memory_region(1, 0, MB, size, HVA), EINVAL),
            ("logging on", lambda: vm.set_user_memory_region(1, 1, 0, size, HVA), EINVAL),
            ("flag on a plain slot", lambda: set2(9, 0, 4 * MB, size, HVA), 0),
            ("...then GUEST_MEMFD", lambda: set2(9, G, 4 * MB, size, HVA, 0, gmem), EINVAL),
            ("delete", lambda: vm.set_user_memory_region(1, 0, 0, 0, 0), 0),
            ("range free again", lambda: set2(3, G, 2 * MB, size, HVA, 0, gmem), 0),
            ("max gfn unbinds", lambda: set2(4, G, 1 << 52, size, HVA, 2 * size, gmem), EINVAL),
            ("range still free", lambda: set2(4, G, 3 * MB, size, HVA, 2 * size, gmem), 0),
            ("delete through v2", lambda: set2(4, G, 0, 0, 0), 0),
        ]
        got = [(name, _errno(call)) for name, call, _ in cases]
        assert got == [(name, want) for name, _, want in cases]
        assert vm.disagreements == []
        vm.check_invariants()
        # a closed guest_memfd leaves its slots behind, deletable
        os.close(gmem)
        gmem = -1
        vm.set_user_memory_region(2, 0, 0, 0, 0)
        assert vm.disagreements == []
    finally:
        for fd in (gmem, devnull, foreign):
            if fd >= 0:
                os.close(fd)
        other_vm.close()


@needs_feature("private_mem")
@pytest.mark.parametrize("fd", [1 << 31, (1 << 32) - 1])
def test_guest_memfd_numbers_past_int_max_are_ebadf(vm: KvmVm, fd: int) -> None:
    # found by `memslots conform`: the engine's os.fstat raised OverflowError here
    with pytest.raises(MemslotError) as info:
        vm.set_user_memory_region2(1, KVM_MEM_GUEST_MEMFD, 0, PAGE, HVA, 0, fd)
    assert info.value.errno == EBADF
    assert vm.disagreements == []


# ---------------------------------------------------------------------------------------
# the oracle


class SlotSevenIsInvalid(KvmVm):
    def check_region(self, *args: Any, **kwargs: Any) -> Decision:
        d = super().check_region(*args, **kwargs)
        if d.id == 7:
            raise MemslotError(EINVAL, "planted")
        return d


class EngineCrashes(KvmVm):
    def check_region(self, *args: Any, **kwargs: Any) -> Decision:
        raise ZeroDivisionError("planted")


def test_a_disagreement_raises_in_strict_mode_and_is_recorded_otherwise() -> None:
    with SlotSevenIsInvalid() as vm:
        with pytest.raises(ConformanceError) as info:
            vm.set_user_memory_region(7, 0, 0, PAGE, HVA)
        err = info.value
        assert (err.kernel, err.engine) == (0, EINVAL)
        assert err.call == (
            "set_user_memory_region(slot=0x7, flags=0x0, gpa=0x0, size=0x1000, hva=0x7f0000000000)"
        )
        assert str(err) == f"{err.call}: kernel OK, engine EINVAL"
        assert isinstance(err, AssertionError)
    with SlotSevenIsInvalid(strict=False) as vm:
        vm.set_user_memory_region(7, 0, 0, PAGE, HVA)  # the kernel's answer wins
        assert [str(d) for d in vm.disagreements] == [str(err)]
        assert vm.id_to_memslot(7) is None  # and the engine's state now differs
        # agreeing calls are not recorded
        with pytest.raises(MemslotError):
            vm.set_user_memory_region(8, 0, 1, PAGE, HVA)
        assert len(vm.disagreements) == 1


def test_an_engine_that_raises_is_a_disagreement() -> None:
    with EngineCrashes() as vm:
        with pytest.raises(ConformanceError) as info:
            vm.set_user_memory_region(0, 0, 0, PAGE, HVA)
        assert info.value.engine == ENGINE_RAISED
        assert isinstance(info.value.__cause__, ZeroDivisionError)
        assert str(info.value).endswith("kernel OK, engine raised ZeroDivisionError: planted")
    with EngineCrashes(strict=False) as vm:
        with pytest.raises(MemslotError):
            vm.set_user_memory_region(0, 0, 1, PAGE, HVA)  # the kernel's EINVAL
        assert [(d.kernel, d.engine) for d in vm.disagreements] == [(EINVAL, ENGINE_RAISED)]


# ---------------------------------------------------------------------------------------
# the README example


def test_the_pattern_guest_example_runs() -> None:
    example = ROOT / "examples" / "pattern_guest.py"
    code = example.read_text()
    body = code.split('"""', 2)[2]  # after the docstring
    user_lines = [ln for ln in body.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert len(user_lines) < 20, user_lines
    out = subprocess.run(
        [sys.executable, str(example)], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert "guest wrote 24 pages" in out
    assert "slot 1: pages [12, 13, 14, 15] dirty" in out
    assert "slot 3: pages [0, 1, 2, 3] dirty" in out
    assert "verified" in out


def test_an_update_inside_a_read_section_reaches_neither_kernel_nor_engine(vm: KvmVm) -> None:
    mem = vm.host_memory(0x10000)
    vm.set_user_memory_region(0, 0, 0, mem.size, mem.addr)
    calls = vm.kernel_calls
    with vm.read_section(), pytest.raises(RuntimeError, match="inside a read section"):
        vm.set_user_memory_region(1, 0, 0x100000, mem.size, mem.addr)
    assert vm.kernel_calls == calls and vm.id_to_memslot(1) is None
    with pytest.raises(MemslotError) as info:  # the kernel has no slot 1 either
        vm.set_user_memory_region(1, 0, 0, 0, 0)
    assert info.value.errno == EINVAL and vm.disagreements == []
    vm.check_invariants()
