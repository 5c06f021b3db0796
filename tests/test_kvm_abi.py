"""The raw /dev/kvm layer (memslots.kvm.abi, memslots.kvm.vcpu) and the shipped guests.

Structure sizes and ioctl numbers are checked everywhere; everything else runs against the
real kernel and is skipped cleanly where /dev/kvm is unusable.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import needs_feature
from memslots.constants import KVM_MEM_GUEST_MEMFD, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY
from memslots.errors import MemslotError
from memslots.kvm import abi, guests
from memslots.kvm.abi import KvmSystem, VmFd, kvm_available
from memslots.kvm.vcpu import GuestTimeout, IoExit, KvmVcpu, MmioExit, UnexpectedExit

KVM_OK = kvm_available()
needs_kvm = pytest.mark.skipif(
    not KVM_OK, reason="needs a usable /dev/kvm (opens read-write, KVM API version 12)"
)

PAGE = 4096
CODE_GPA = 0x1000  # programs live in slot 0, which covers gpa 0..64 KiB


def addr_of(m: mmap.mmap) -> int:
    """Host virtual address of an anonymous mapping."""
    return ctypes.addressof(ctypes.c_char.from_buffer(m))


def errno_of(call: Callable[[], object]) -> str:
    """'OK' or the errno name a call fails with."""
    try:
        call()
    except MemslotError as exc:
        assert exc.errno is not None
        return errno.errorcode[exc.errno]
    return "OK"


# ---------------------------------------------------------------------------------------
# layout, no device needed


@pytest.mark.parametrize(
    ("struct", "size"),
    [
        (abi.kvm_userspace_memory_region, 32),
        (abi.kvm_userspace_memory_region2, 160),
        (abi.kvm_dirty_log, 16),
        (abi.kvm_clear_dirty_log, 24),
        (abi.kvm_enable_cap, 104),
        (abi.kvm_regs, 144),
        (abi.kvm_segment, 24),
        (abi.kvm_dtable, 16),
        (abi.kvm_sregs, 312),
        (abi.kvm_run_exit, 256),
        (abi.kvm_run, 304),
    ],
)
def test_struct_sizes(struct: type[ctypes.Structure], size: int) -> None:
    assert ctypes.sizeof(struct) == size


def test_struct_offsets_match_uapi() -> None:
    # offsets printed by a C program against <linux/kvm.h>
    assert abi.kvm_run.exit_reason.offset == 8
    assert abi.kvm_run.immediate_exit.offset == 1
    assert abi.kvm_run.cr8.offset == 16
    assert abi.kvm_run.u.offset == 32
    assert abi.kvm_sregs.gdt.offset == 192
    assert abi.kvm_sregs.cr0.offset == 224
    assert abi.kvm_sregs.interrupt_bitmap.offset == 280
    assert abi.kvm_userspace_memory_region2.guest_memfd.offset == 40


def test_ioctl_numbers_match_uapi() -> None:
    # values of the C macros from the Linux uapi headers (REGION2: 6.8+)
    assert abi.KVM_GET_API_VERSION == 0xAE00
    assert abi.KVM_CREATE_VM == 0xAE01
    assert abi.KVM_CHECK_EXTENSION == 0xAE03
    assert abi.KVM_GET_VCPU_MMAP_SIZE == 0xAE04
    assert abi.KVM_CREATE_VCPU == 0xAE41
    assert abi.KVM_GET_DIRTY_LOG == 0x4010AE42
    assert abi.KVM_SET_USER_MEMORY_REGION == 0x4020AE46
    assert abi.KVM_SET_TSS_ADDR == 0xAE47
    assert abi.KVM_SET_USER_MEMORY_REGION2 == 0x40A0AE49
    assert abi.KVM_ENABLE_CAP == 0x4068AEA3
    assert abi.KVM_CLEAR_DIRTY_LOG == 0xC018AEC0
    assert abi.KVM_RUN == 0xAE80
    assert (abi.KVM_GET_REGS, abi.KVM_SET_REGS) == (0x8090AE81, 0x4090AE82)
    assert (abi.KVM_GET_SREGS, abi.KVM_SET_SREGS) == (0x8138AE83, 0x4138AE84)
    assert abi.KVM_GET_NR_MMU_PAGES == 0xAE45


def test_capability_and_exit_numbers() -> None:
    assert abi.KVM_CAP_NR_MEMSLOTS == 10
    assert abi.KVM_CAP_READONLY_MEM == 81
    assert abi.KVM_CAP_MULTI_ADDRESS_SPACE == 118
    assert abi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 == 168
    assert abi.KVM_CAP_DIRTY_LOG_RING == 192
    assert abi.KVM_CAP_USER_MEMORY2 == 231
    assert abi.KVM_CAP_GUEST_MEMFD == 234
    assert abi.KVM_CAP_VM_TYPES == 235
    assert (abi.KVM_EXIT_IO, abi.KVM_EXIT_HLT, abi.KVM_EXIT_MMIO) == (2, 5, 6)
    assert (abi.KVM_EXIT_SHUTDOWN, abi.KVM_EXIT_INTERNAL_ERROR) == (8, 17)
    assert abi.exit_reason_name(5) == "HLT"
    assert abi.exit_reason_name(9999) == "9999"


def test_kvm_available_is_false_for_a_missing_device(tmp_path: Path) -> None:
    assert kvm_available(str(tmp_path / "no-such-kvm")) is False


def test_guest_args_reject_what_real_mode_cannot_reach() -> None:
    with pytest.raises(ValueError):
        guests.pattern_writer_args(0x1001, 1)
    with pytest.raises(ValueError):
        guests.pattern_writer_args(0xFF000, 2)  # second page would be at 1 MiB
    with pytest.raises(ValueError):
        guests.spin_reader_args(1 << 32)
    args = guests.spin_reader_args(0xC0000123)
    assert args.segments == {"ds": 0xC0000000} and args.regs == {"rsi": 0x123}


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("pattern", guests.PATTERN_WRITER),
        ("spin_read", guests.SPIN_READER),
        ("stride", guests.STRIDE_WRITER),
    ],
)
def test_guest_bytes_match_their_source(tmp_path: Path, name: str, code: bytes) -> None:
    if shutil.which("as") is None or shutil.which("objcopy") is None:
        pytest.skip("GNU as and objcopy are not installed; the committed bytes are used as is")
    source = Path(guests.__file__).with_name(f"{name}.S")
    obj, binary = tmp_path / f"{name}.o", tmp_path / f"{name}.bin"
    subprocess.run(["as", "-o", str(obj), str(source)], check=True)
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(obj), str(binary)], check=True)
    assert binary.read_bytes() == code


# ---------------------------------------------------------------------------------------
# the real device


@pytest.fixture
def system() -> Iterator[KvmSystem]:
    with KvmSystem() as k:
        yield k


@pytest.fixture
def vm(system: KvmSystem) -> Iterator[VmFd]:
    with system.create_vm() as v:
        yield v


@pytest.fixture
def code_mem() -> Iterator[mmap.mmap]:
    """64 KiB of anonymous memory for slot 0 (gpa 0), with both guests loaded."""
    m = mmap.mmap(-1, 0x10000)
    m[CODE_GPA : CODE_GPA + len(guests.PATTERN_WRITER)] = guests.PATTERN_WRITER
    m[2 * CODE_GPA : 2 * CODE_GPA + len(guests.SPIN_READER)] = guests.SPIN_READER
    yield m
    m.close()


PATTERN_ENTRY = CODE_GPA
SPIN_ENTRY = 2 * CODE_GPA


@pytest.mark.kvm
@needs_kvm
def test_capabilities_say_what_the_kernel_does(system: KvmSystem, vm: VmFd) -> None:
    """Whatever this kernel offers, each capability agrees with what its ioctls do (the
    probe of memslots.profiles relies on it): slot ids, address spaces, REGION2,
    guest_memfd, the dirty ring."""
    assert system.api_version() == abi.KVM_API_VERSION
    assert system.vcpu_mmap_size() >= ctypes.sizeof(abi.kvm_run)
    hva = 0x7F0000000000
    nr_slots = system.check_extension(abi.KVM_CAP_NR_MEMSLOTS)
    assert nr_slots > 0
    assert errno_of(lambda: vm.set_user_memory_region(nr_slots - 1, 0, 0, PAGE, hva)) == "OK"
    assert errno_of(lambda: vm.set_user_memory_region(nr_slots, 0, PAGE, PAGE, hva)) == "EINVAL"
    nr_as = max(1, vm.check_extension(abi.KVM_CAP_MULTI_ADDRESS_SPACE))
    top = (nr_as - 1) << 16
    assert errno_of(lambda: vm.set_user_memory_region(top | 1, 0, 4 * PAGE, PAGE, hva)) == "OK"
    assert errno_of(lambda: vm.set_user_memory_region(nr_as << 16, 0, 0, PAGE, hva)) == "EINVAL"
    region2 = system.check_extension(abi.KVM_CAP_USER_MEMORY2)
    expect2 = "OK" if region2 else "ENOTTY"
    assert errno_of(lambda: vm.set_user_memory_region2(2, 0, 2 * PAGE, PAGE, hva)) == expect2
    gmem = vm.check_extension(abi.KVM_CAP_GUEST_MEMFD)
    fds: list[int] = []
    assert errno_of(lambda: fds.append(vm.create_guest_memfd(PAGE))) == ("OK" if gmem else "ENOTTY")
    for fd in fds:
        os.close(fd)
    ring = system.check_extension(abi.KVM_CAP_DIRTY_LOG_RING)
    assert errno_of(lambda: vm.enable_cap(abi.KVM_CAP_DIRTY_LOG_RING, 1 << 16)) == (
        "OK" if ring >= 1 << 16 else "EINVAL"
    )


@pytest.mark.kvm
@needs_kvm
def test_errno_table_spot_checks(vm: VmFd) -> None:
    hva = 0x7F0000000000  # unmapped but legal: the kernel does not check the mapping
    set1 = vm.set_user_memory_region
    assert errno_of(lambda: set1(0, 0, 0x100000, 0x10000, hva)) == "OK"
    cases: list[tuple[str, Callable[[], object], str]] = [
        ("unaligned gpa", lambda: set1(1, 0, 0x200001, PAGE, hva), "EINVAL"),
        ("unaligned size", lambda: set1(1, 0, 0x200000, PAGE + 1, hva), "EINVAL"),
        ("unaligned hva", lambda: set1(1, 0, 0x200000, PAGE, hva + 1), "EINVAL"),
        ("unknown flag", lambda: set1(1, 1 << 3, 0x200000, PAGE, hva), "EINVAL"),
        (
            "GUEST_MEMFD through v1",
            lambda: set1(1, KVM_MEM_GUEST_MEMFD, 0x200000, PAGE, hva),
            "EINVAL",
        ),
        ("slot 32764", lambda: set1(32764, 0, 0x200000, PAGE, hva), "EINVAL"),
        ("slot 0xffff", lambda: set1(0xFFFF, 0, 0x200000, PAGE, hva), "EINVAL"),
        ("as_id 1", lambda: set1(1 << 16 | 1, 0, 0x200000, PAGE, hva), "EINVAL"),
        ("exact overlap", lambda: set1(1, 0, 0x100000, 0x10000, hva), "EEXIST"),
        ("overlap last page", lambda: set1(1, 0, 0x10F000, 2 * PAGE, hva), "EEXIST"),
        ("overlap containing", lambda: set1(1, 0, 0xF0000, 0x30000, hva), "EEXIST"),
        ("delete a missing slot", lambda: set1(2, 0, 0, 0, 0), "EINVAL"),
        ("change hva", lambda: set1(0, 0, 0x100000, 0x10000, hva + PAGE), "EINVAL"),
        ("change size", lambda: set1(0, 0, 0x100000, 2 * 0x10000, hva), "EINVAL"),
        ("toggle READONLY", lambda: set1(0, KVM_MEM_READONLY, 0x100000, 0x10000, hva), "EINVAL"),
        ("hva at the last user page", lambda: set1(3, 0, 0x400000, PAGE, 0x7FFFFFFFF000), "EINVAL"),
        ("kernel-half hva", lambda: set1(3, 0, 0x400000, PAGE, 0xFFFF800000000000), "EINVAL"),
        ("gpa wraps", lambda: set1(3, 0, (1 << 64) - PAGE, 2 * PAGE, hva), "EINVAL"),
        ("adjacent", lambda: set1(1, 0, 0x110000, PAGE, hva), "OK"),
        ("no-op re-set", lambda: set1(0, 0, 0x100000, 0x10000, hva), "OK"),
        ("flags only", lambda: set1(0, KVM_MEM_LOG_DIRTY_PAGES, 0x100000, 0x10000, hva), "OK"),
        ("move overlapping another slot", lambda: set1(0, 1, 0x101000, 0x10000, hva), "EEXIST"),
        ("delete with other gpa", lambda: set1(1, 0, 0x999000, 0, hva), "OK"),
        ("move overlapping itself", lambda: set1(0, 1, 0x104000, 0x10000, hva), "OK"),
    ]
    got = [(name, errno_of(call)) for name, call, _ in cases]
    assert got == [(name, want) for name, _, want in cases]


@pytest.mark.kvm
@needs_kvm
def test_region2_and_dirty_log_errors(vm: VmFd) -> None:
    hva = 0x7F0000000000
    set2 = vm.set_user_memory_region2
    assert errno_of(lambda: set2(0, KVM_MEM_READONLY, 0, 16 * PAGE, hva)) == "OK"
    assert errno_of(lambda: set2(1, 1 << 3, 0x100000, PAGE, hva)) == "EINVAL"
    assert errno_of(lambda: set2(1, KVM_MEM_GUEST_MEMFD | 1, 0x100000, PAGE, hva)) == "EINVAL"
    # slot without logging, missing slot: ENOENT; unaligned first_page before the lookup
    assert errno_of(lambda: vm.get_dirty_log(0, 8)) == "ENOENT"
    assert errno_of(lambda: vm.get_dirty_log(5, 8)) == "ENOENT"
    assert errno_of(lambda: vm.get_dirty_log(32764, 8)) == "EINVAL"
    assert errno_of(lambda: vm.clear_dirty_log(5, 1, 64, bytes(8))) == "EINVAL"
    assert errno_of(lambda: vm.clear_dirty_log(5, 0, 64, bytes(8))) == "ENOENT"
    # manual protect: 2 alone is rejected, 3 accepted
    cap = abi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2
    assert errno_of(lambda: vm.enable_cap(cap, 2)) == "EINVAL"
    assert errno_of(lambda: vm.enable_cap(cap, 3)) == "OK"


@pytest.mark.kvm
@needs_kvm
@needs_feature("guest_memfd", "private_mem")
def test_guest_memfd_slots_on_a_default_vm(vm: VmFd) -> None:
    # Measured on Linux 6.18: GUEST_MEMFD passes the flags check on KVM_X86_DEFAULT_VM,
    # and a gmem slot cannot be modified at all, only deleted (with or without the flag).
    hva, gpa, size = 0x7F0000000000, 1 << 32, 0x10000
    set2 = vm.set_user_memory_region2
    gmem = vm.create_guest_memfd(1 << 20)
    try:
        assert errno_of(lambda: set2(1, KVM_MEM_GUEST_MEMFD, gpa, size, hva, 1, gmem)) == "EINVAL"
        assert errno_of(lambda: set2(1, KVM_MEM_GUEST_MEMFD, gpa, size, hva, 1 << 20, gmem)) == (
            "EINVAL"  # range past the end of the file
        )
        assert errno_of(lambda: set2(1, KVM_MEM_GUEST_MEMFD, gpa, size, hva, 0, 0xFFFF)) == "EBADF"
        assert errno_of(lambda: set2(1, KVM_MEM_GUEST_MEMFD, gpa, size, hva, 0, gmem)) == "OK"
        # the same file range again: already bound
        assert errno_of(lambda: set2(2, KVM_MEM_GUEST_MEMFD, 2 * gpa, size, hva, 0, gmem)) == (
            "EINVAL"
        )
        assert errno_of(lambda: set2(1, KVM_MEM_GUEST_MEMFD, gpa, size, hva, 0, gmem)) == "EINVAL"
        assert errno_of(lambda: set2(1, 0, gpa, size, hva, 0, gmem)) == "EINVAL"
        assert errno_of(lambda: vm.set_user_memory_region(1, 0, gpa, size, hva)) == "EINVAL"
        assert errno_of(lambda: vm.set_user_memory_region(1, 0, gpa, 0, hva)) == "OK"
    finally:
        os.close(gmem)


@pytest.mark.kvm
@needs_kvm
def test_short_user_buffers_give_efault_not_corruption(vm: VmFd) -> None:
    vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, 256 * PAGE, 0x7F0000000000)
    assert vm.get_dirty_log(0, 32) == bytes(32)  # 256 pages: 32 bytes
    assert vm.get_dirty_log(0, 40) == bytes(40)  # extra bytes come back zero
    assert errno_of(lambda: vm.get_dirty_log(0, 8)) == "EFAULT"
    assert errno_of(lambda: vm.get_dirty_log(0, 0)) == "EFAULT"
    assert errno_of(lambda: vm.clear_dirty_log(0, 0, 256, b"\xff" * 32)) == "OK"
    assert errno_of(lambda: vm.clear_dirty_log(0, 0, 256, b"\xff" * 8)) == "EFAULT"


@pytest.mark.kvm
@needs_kvm
def test_values_that_do_not_fit_the_abi_raise_valueerror(vm: VmFd) -> None:
    with pytest.raises(ValueError):
        vm.set_user_memory_region(-1, 0, 0, PAGE, 0)
    with pytest.raises(ValueError):
        vm.set_user_memory_region(1 << 32, 0, 0, PAGE, 0)
    with pytest.raises(ValueError):
        vm.set_user_memory_region2(0, 0, 1 << 64, PAGE, 0)
    with pytest.raises(ValueError):
        vm.enable_cap(abi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 1, 2, 3, 4, 5)


@pytest.mark.kvm
@needs_kvm
def test_errors_carry_the_ioctl_name(vm: VmFd) -> None:
    with pytest.raises(MemslotError) as info:
        vm.set_user_memory_region(0, 0, 1, PAGE, 0)
    assert info.value.errno == errno.EINVAL
    assert info.value.detail == "KVM_SET_USER_MEMORY_REGION"
    assert isinstance(info.value, OSError)


@pytest.mark.kvm
@needs_kvm
def test_pattern_writer_crosses_slots_and_dirties_exactly_its_pages(
    vm: VmFd, code_mem: mmap.mmap
) -> None:
    vm.set_user_memory_region(0, 0, 0, len(code_mem), addr_of(code_mem))
    # four 16-page slots at 64 KiB .. 320 KiB, logging dirty pages
    data = [mmap.mmap(-1, 16 * PAGE) for _ in range(4)]
    for i, m in enumerate(data):
        vm.set_user_memory_region(
            1 + i, KVM_MEM_LOG_DIRTY_PAGES, (1 + i) * 0x10000, len(m), addr_of(m)
        )
    first_page, pages = 0x1A000, 40  # slot 1 page 10 .. slot 3 page 17 -> 3 slots
    args = guests.pattern_writer_args(first_page, pages, first_word=0xBEE0, offset=0x10)
    reports: list[tuple[int, bool, int]] = []

    def on_io(io: IoExit) -> None:
        reports.append((io.port, io.is_out, io.value))

    with KvmVcpu(vm) as vcpu:
        vcpu.setup_real_mode(PATTERN_ENTRY, regs=args.regs, segments=args.segments)
        result = vcpu.run_until_hlt(on_io=on_io, timeout=10)
    assert result.halted and result.exits == 2
    assert reports == [(guests.PATTERN_DONE_PORT, True, pages)]
    # nothing else was touched
    expected = [bytearray(16 * PAGE) for _ in data]
    for k in range(pages):
        slot, off = divmod(first_page + k * PAGE + 0x10 - 0x10000, 0x10000)
        expected[slot][off : off + 2] = guests.pattern_word(0xBEE0, k).to_bytes(2, "little")
    assert [m[:] for m in data] == [bytes(e) for e in expected]
    # dirty logs: exactly the written pages, per slot; GET clears
    for i in range(4):
        bitmap = int.from_bytes(vm.get_dirty_log(1 + i, 8), "little")
        base = (1 + i) * 0x10000
        want = sum(
            1 << ((first_page + k * PAGE - base) // PAGE)
            for k in range(pages)
            if base <= first_page + k * PAGE < base + 0x10000
        )
        assert bitmap == want, f"slot {1 + i}"
        assert vm.get_dirty_log(1 + i, 8) == bytes(8)
    for m in data:
        m.close()


@pytest.mark.kvm
@needs_kvm
@pytest.mark.parametrize("gpa", [0x20100, 0xC0000FFC])
def test_spin_reader_reports_what_the_host_put_in_memory(
    vm: VmFd, code_mem: mmap.mmap, gpa: int
) -> None:
    vm.set_user_memory_region(0, 0, 0, len(code_mem), addr_of(code_mem))
    data = mmap.mmap(-1, 0x10000)
    slot_gpa = gpa & ~0xFFFF
    vm.set_user_memory_region(1, 0, slot_gpa, len(data), addr_of(data))
    off = gpa - slot_gpa
    values = [0x11111111, 0x22222222, 0xDEADBEEF, 0]
    seen: list[int] = []

    def on_io(io: IoExit) -> int | None:
        if io.port == guests.SPIN_VALUE_PORT:
            assert io.is_out and io.size == 4
            seen.append(io.value)
            return None
        assert io.port == guests.SPIN_CONTROL_PORT and not io.is_out and io.size == 1
        # the host changes the value after each report, then stops
        if len(seen) <= len(values):
            data[off : off + 4] = values[len(seen) - 1].to_bytes(4, "little")
            return 0
        return 1

    data[off : off + 4] = (0x0BADF00D).to_bytes(4, "little")
    args = guests.spin_reader_args(gpa)
    with KvmVcpu(vm) as vcpu:
        vcpu.setup_real_mode(SPIN_ENTRY, regs=args.regs, segments=args.segments)
        result = vcpu.run_until_hlt(on_io=on_io, timeout=10)
    assert result.halted and result.mmio_exits == 0
    assert seen == [0x0BADF00D, *values]
    data.close()


@pytest.mark.kvm
@needs_kvm
def test_spin_reader_without_a_slot_sees_the_mmio_answer(vm: VmFd, code_mem: mmap.mmap) -> None:
    vm.set_user_memory_region(0, 0, 0, len(code_mem), addr_of(code_mem))
    mmio: list[MmioExit] = []
    seen: list[int] = []

    def on_io(io: IoExit) -> int | None:
        if io.port == guests.SPIN_VALUE_PORT:
            seen.append(io.value)
            return None
        return int(len(seen) >= 3)

    def on_mmio(exit: MmioExit) -> int:
        mmio.append(exit)
        return 0xBEEF

    args = guests.spin_reader_args(0xC0000000)
    with KvmVcpu(vm) as vcpu:
        vcpu.setup_real_mode(SPIN_ENTRY, regs=args.regs, segments=args.segments)
        result = vcpu.run_until_hlt(on_io=on_io, on_mmio=on_mmio, timeout=10)
    assert result.halted
    assert seen == [0xBEEF] * 3
    assert mmio == [MmioExit(0xC0000000, bytes(4), 4, False)] * 3


@pytest.mark.kvm
@needs_kvm
def test_write_to_a_readonly_slot_exits_as_mmio(vm: VmFd, code_mem: mmap.mmap) -> None:
    vm.set_user_memory_region(0, 0, 0, len(code_mem), addr_of(code_mem))
    ro = mmap.mmap(-1, 2 * PAGE)
    vm.set_user_memory_region(1, KVM_MEM_READONLY, 0x30000, len(ro), addr_of(ro))
    args = guests.pattern_writer_args(0x30000, 2, first_word=0x5A5A)
    writes: list[MmioExit] = []
    with KvmVcpu(vm) as vcpu:
        vcpu.setup_real_mode(PATTERN_ENTRY, regs=args.regs, segments=args.segments)
        result = vcpu.run_until_hlt(on_io=lambda io: None, on_mmio=writes.append, timeout=10)
    assert result.halted
    assert writes == [
        MmioExit(0x30000, (0x5A5A).to_bytes(2, "little"), 2, True),
        MmioExit(0x31000, (0x5A5B).to_bytes(2, "little"), 2, True),
    ]
    assert ro[:] == bytes(2 * PAGE)
    ro.close()


@pytest.mark.kvm
@needs_kvm
def test_unhandled_and_fatal_exits_raise(vm: VmFd, code_mem: mmap.mmap) -> None:
    vm.set_user_memory_region(0, 0, 0, len(code_mem), addr_of(code_mem))
    args = guests.pattern_writer_args(0x20000, 1)
    with KvmVcpu(vm) as vcpu:
        vcpu.setup_real_mode(PATTERN_ENTRY, regs=args.regs, segments=args.segments)
        with pytest.raises(UnexpectedExit, match="MMIO exit without on_mmio"):
            vcpu.run_until_hlt(timeout=10)
        # no memory at all under the code: the emulator cannot fetch
        vm.set_user_memory_region(0, 0, 0, 0, 0)
        vcpu.setup_real_mode(PATTERN_ENTRY)
        with pytest.raises(UnexpectedExit) as info:
            vcpu.run_until_hlt(on_io=lambda io: None, on_mmio=lambda m: None, timeout=10)
        assert info.value.exit is not None
        assert info.value.exit.reason in (abi.KVM_EXIT_INTERNAL_ERROR, abi.KVM_EXIT_SHUTDOWN)


@pytest.mark.kvm
@needs_kvm
def test_timeout_and_kick_stop_a_guest_that_never_exits(vm: VmFd) -> None:
    mem = mmap.mmap(-1, 0x10000)
    mem[CODE_GPA : CODE_GPA + 2] = b"\xeb\xfe"  # jmp $
    vm.set_user_memory_region(0, 0, 0, len(mem), addr_of(mem))
    with KvmVcpu(vm) as vcpu:
        vcpu.setup_real_mode(CODE_GPA)
        with pytest.raises(GuestTimeout) as info:
            vcpu.run_until_hlt(timeout=0.1)
        # the timer's kick interrupted KVM_RUN (no exit of the guest's own ended the run)
        assert info.value.exit is not None
        assert info.value.exit.reason == abi.KVM_EXIT_INTR
        kicker = threading.Timer(0.05, vcpu.kick)
        kicker.start()
        result = vcpu.run_until_hlt(timeout=10)
        kicker.join(10)
        assert not kicker.is_alive()
        assert not result.halted and result.exit.reason == abi.KVM_EXIT_INTR
        # the vCPU is still usable afterwards
        assert vcpu.get_regs().rip == CODE_GPA
    mem.close()


@pytest.mark.kvm
@needs_kvm
def test_vcpu_close_releases_fd_and_mapping(vm: VmFd, code_mem: mmap.mmap) -> None:
    vcpu = KvmVcpu(vm, 3)
    vcpu.close()
    vcpu.close()
    assert vcpu.closed
    with pytest.raises(ValueError):
        vcpu.run()
    with pytest.raises(ValueError):
        _ = vcpu.fd
    # the id is taken by the closed vCPU for the VM's lifetime, as in C
    with pytest.raises(MemslotError) as info:
        KvmVcpu(vm, 3)
    assert info.value.errno == errno.EEXIST
