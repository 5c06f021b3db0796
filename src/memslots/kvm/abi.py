"""The thin KVM ABI layer: ioctl numbers, uapi structures and raw file-descriptor wrappers.

Everything here is named as in the kernel's ``include/uapi/linux/kvm.h`` and
``arch/x86/include/uapi/asm/kvm.h`` (x86-64). The ioctl numbers are computed with the
``_IO``/``_IOR``/``_IOW``/``_IOWR`` macros of ``include/uapi/asm-generic/ioctl.h`` from the
ctypes structures below, so a wrong structure size shows up as a wrong ioctl number (the
module asserts every size and number it can against the kernel headers' values).

Every ioctl goes through the C library's ``ioctl`` via ctypes with ``use_errno=True``: the
errno of a failed call is exactly the kernel's, and it is raised as
:class:`memslots.errors.MemslotError` (an :class:`OSError`) whose ``detail`` names the ioctl.
The GIL is released while the kernel runs the call, so a vCPU inside ``KVM_RUN`` does not
stop other Python threads.

Values that do not fit the uapi field they go into (a negative gpa, a slot over 32 bits)
raise :class:`ValueError` before any ioctl: the ABI cannot express them, so there is no
kernel answer to report.

Classes:

* :class:`KvmSystem`: an open ``/dev/kvm`` (API version, capabilities, ``create_vm``).
* :class:`VmFd`: a VM file descriptor with one method per VM ioctl.
* :func:`kvm_unavailable`: why ``/dev/kvm`` cannot be used here, as a
  :class:`memslots.errors.KvmUnavailable` (None when it can); :func:`kvm_available`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
from types import TracebackType
from typing import TYPE_CHECKING, Final, Protocol, Self

from memslots.constants import (
    KVM_DIRTY_GFN_F_DIRTY,
    KVM_DIRTY_GFN_F_MASK,
    KVM_DIRTY_GFN_F_RESET,
    KVM_DIRTY_LOG_PAGE_OFFSET,
)
from memslots.errors import KvmUnavailable, MemslotError
from memslots.guest_memfd import fd_identity

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = [
    "KVM_API_VERSION",
    "KVM_CAP_DIRTY_LOG_RING",
    "KVM_CAP_DIRTY_LOG_RING_ACQ_REL",
    "KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP",
    "KVM_CAP_GUEST_MEMFD",
    "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2",
    "KVM_CAP_MULTI_ADDRESS_SPACE",
    "KVM_CAP_NR_MEMSLOTS",
    "KVM_CAP_READONLY_MEM",
    "KVM_CAP_USER_MEMORY2",
    "KVM_CAP_VM_TYPES",
    "KVM_CAP_X86_SMM",
    "KVM_DEV_PATH",
    "KVM_DIRTY_GFN_F_DIRTY",
    "KVM_DIRTY_GFN_F_MASK",
    "KVM_DIRTY_GFN_F_RESET",
    "KVM_DIRTY_LOG_PAGE_OFFSET",
    "KVM_EXIT_DIRTY_RING_FULL",
    "KVM_EXIT_HLT",
    "KVM_EXIT_INTERNAL_ERROR",
    "KVM_EXIT_IO",
    "KVM_EXIT_MMIO",
    "KVM_EXIT_SHUTDOWN",
    "KvmSystem",
    "KvmSystemLike",
    "KvmUnavailable",
    "VmFd",
    "exit_reason_name",
    "kvm_available",
    "kvm_unavailable",
    "memory_region",
    "memory_region2",
]

# --------------------------------------------------------------------------------------
# ioctl number encoding (include/uapi/asm-generic/ioctl.h; x86 uses the generic layout)

_IOC_NRBITS: Final = 8
_IOC_TYPEBITS: Final = 8
_IOC_SIZEBITS: Final = 14
_IOC_NRSHIFT: Final = 0
_IOC_TYPESHIFT: Final = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT: Final = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT: Final = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE: Final = 0
_IOC_WRITE: Final = 1
_IOC_READ: Final = 2


def _IOC(direction: int, type_: int, nr: int, size: int) -> int:
    """The kernel's ``_IOC(dir, type, nr, size)``."""
    if not 0 <= size < (1 << _IOC_SIZEBITS):
        raise ValueError(f"ioctl argument size {size} does not fit {_IOC_SIZEBITS} bits")
    return (
        (direction << _IOC_DIRSHIFT)
        | (type_ << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def _IO(type_: int, nr: int) -> int:
    """``_IO(type, nr)``: an ioctl without a structure argument."""
    return _IOC(_IOC_NONE, type_, nr, 0)


def _IOR(type_: int, nr: int, ctype: type[ctypes._CData]) -> int:
    """``_IOR(type, nr, T)``: the kernel writes a ``T`` to user space."""
    return _IOC(_IOC_READ, type_, nr, ctypes.sizeof(ctype))


def _IOW(type_: int, nr: int, ctype: type[ctypes._CData]) -> int:
    """``_IOW(type, nr, T)``: the kernel reads a ``T`` from user space."""
    return _IOC(_IOC_WRITE, type_, nr, ctypes.sizeof(ctype))


def _IOWR(type_: int, nr: int, ctype: type[ctypes._CData]) -> int:
    """``_IOWR(type, nr, T)``: both directions."""
    return _IOC(_IOC_READ | _IOC_WRITE, type_, nr, ctypes.sizeof(ctype))


# --------------------------------------------------------------------------------------
# uapi structures


class kvm_userspace_memory_region(ctypes.Structure):
    """``struct kvm_userspace_memory_region`` (32 bytes), argument of
    ``KVM_SET_USER_MEMORY_REGION``."""

    _fields_ = (
        ("slot", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("guest_phys_addr", ctypes.c_uint64),
        ("memory_size", ctypes.c_uint64),
        ("userspace_addr", ctypes.c_uint64),
    )


class kvm_userspace_memory_region2(ctypes.Structure):
    """``struct kvm_userspace_memory_region2`` (160 bytes), argument of
    ``KVM_SET_USER_MEMORY_REGION2`` (Linux 6.8+). The pad fields are not validated by the
    kernel; they are always zero here."""

    _fields_ = (
        ("slot", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("guest_phys_addr", ctypes.c_uint64),
        ("memory_size", ctypes.c_uint64),
        ("userspace_addr", ctypes.c_uint64),
        ("guest_memfd_offset", ctypes.c_uint64),
        ("guest_memfd", ctypes.c_uint32),
        ("pad1", ctypes.c_uint32),
        ("pad2", ctypes.c_uint64 * 14),
    )


class kvm_dirty_log(ctypes.Structure):
    """``struct kvm_dirty_log`` (16 bytes): ``slot``, padding, and the user pointer the
    kernel copies the slot's bitmap to (``KVM_GET_DIRTY_LOG``)."""

    _fields_ = (
        ("slot", ctypes.c_uint32),
        ("padding1", ctypes.c_uint32),
        ("dirty_bitmap", ctypes.c_uint64),
    )


class kvm_clear_dirty_log(ctypes.Structure):
    """``struct kvm_clear_dirty_log`` (24 bytes), argument of ``KVM_CLEAR_DIRTY_LOG``."""

    _fields_ = (
        ("slot", ctypes.c_uint32),
        ("num_pages", ctypes.c_uint32),
        ("first_page", ctypes.c_uint64),
        ("dirty_bitmap", ctypes.c_uint64),
    )


class kvm_dirty_gfn(ctypes.Structure):
    """``struct kvm_dirty_gfn`` (16 bytes): one entry of a vCPU's dirty ring, which is an
    array of them mapped from the vCPU fd at page ``KVM_DIRTY_LOG_PAGE_OFFSET``. ``flags``
    is ``KVM_DIRTY_GFN_F_DIRTY`` (KVM published it), with ``KVM_DIRTY_GFN_F_RESET`` set by
    userspace once harvested; ``slot`` is ``as_id << 16 | id``; ``offset`` the page index
    inside the slot."""

    _fields_ = (
        ("flags", ctypes.c_uint32),
        ("slot", ctypes.c_uint32),
        ("offset", ctypes.c_uint64),
    )


class kvm_enable_cap(ctypes.Structure):
    """``struct kvm_enable_cap`` (104 bytes), argument of ``KVM_ENABLE_CAP``."""

    _fields_ = (
        ("cap", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("args", ctypes.c_uint64 * 4),
        ("pad", ctypes.c_uint8 * 64),
    )


#: the fields of ``kvm_regs``, in order
KVM_REGS_NAMES: Final = (
    "rax",
    "rbx",
    "rcx",
    "rdx",
    "rsi",
    "rdi",
    "rsp",
    "rbp",
    "r8",
    "r9",
    "r10",
    "r11",
    "r12",
    "r13",
    "r14",
    "r15",
    "rip",
    "rflags",
)


class kvm_create_guest_memfd(ctypes.Structure):
    """``struct kvm_create_guest_memfd`` (64 bytes), argument of ``KVM_CREATE_GUEST_MEMFD``
    (Linux 6.8+)."""

    _fields_ = (
        ("size", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("reserved", ctypes.c_uint64 * 6),
    )


class kvm_regs(ctypes.Structure):
    """``struct kvm_regs`` (x86, 144 bytes): the general-purpose registers, rip, rflags."""

    _fields_ = tuple((name, ctypes.c_uint64) for name in KVM_REGS_NAMES)


class kvm_segment(ctypes.Structure):
    """``struct kvm_segment`` (x86, 24 bytes): a segment register with its hidden part."""

    _fields_ = (
        ("base", ctypes.c_uint64),
        ("limit", ctypes.c_uint32),
        ("selector", ctypes.c_uint16),
        ("type", ctypes.c_uint8),
        ("present", ctypes.c_uint8),
        ("dpl", ctypes.c_uint8),
        ("db", ctypes.c_uint8),
        ("s", ctypes.c_uint8),
        ("l", ctypes.c_uint8),
        ("g", ctypes.c_uint8),
        ("avl", ctypes.c_uint8),
        ("unusable", ctypes.c_uint8),
        ("padding", ctypes.c_uint8),
    )


class kvm_dtable(ctypes.Structure):
    """``struct kvm_dtable`` (x86, 16 bytes): GDTR or IDTR."""

    _fields_ = (
        ("base", ctypes.c_uint64),
        ("limit", ctypes.c_uint16),
        ("padding", ctypes.c_uint16 * 3),
    )


#: ``KVM_NR_INTERRUPTS`` (x86)
KVM_NR_INTERRUPTS: Final = 256


class kvm_sregs(ctypes.Structure):
    """``struct kvm_sregs`` (x86, 312 bytes): segments, descriptor tables, control regs."""

    _fields_ = (
        ("cs", kvm_segment),
        ("ds", kvm_segment),
        ("es", kvm_segment),
        ("fs", kvm_segment),
        ("gs", kvm_segment),
        ("ss", kvm_segment),
        ("tr", kvm_segment),
        ("ldt", kvm_segment),
        ("gdt", kvm_dtable),
        ("idt", kvm_dtable),
        ("cr0", ctypes.c_uint64),
        ("cr2", ctypes.c_uint64),
        ("cr3", ctypes.c_uint64),
        ("cr4", ctypes.c_uint64),
        ("cr8", ctypes.c_uint64),
        ("efer", ctypes.c_uint64),
        ("apic_base", ctypes.c_uint64),
        ("interrupt_bitmap", ctypes.c_uint64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    )


class kvm_run_io(ctypes.Structure):
    """The ``io`` member of ``kvm_run``'s exit union (``KVM_EXIT_IO``). The data is in the
    ``kvm_run`` mapping at ``data_offset``: ``size * count`` bytes."""

    _fields_ = (
        ("direction", ctypes.c_uint8),
        ("size", ctypes.c_uint8),
        ("port", ctypes.c_uint16),
        ("count", ctypes.c_uint32),
        ("data_offset", ctypes.c_uint64),
    )


class kvm_run_mmio(ctypes.Structure):
    """The ``mmio`` member of ``kvm_run``'s exit union (``KVM_EXIT_MMIO``)."""

    _fields_ = (
        ("phys_addr", ctypes.c_uint64),
        ("data", ctypes.c_uint8 * 8),
        ("len", ctypes.c_uint32),
        ("is_write", ctypes.c_uint8),
    )


class kvm_run_internal(ctypes.Structure):
    """The ``internal`` member (``KVM_EXIT_INTERNAL_ERROR``)."""

    _fields_ = (
        ("suberror", ctypes.c_uint32),
        ("ndata", ctypes.c_uint32),
        ("data", ctypes.c_uint64 * 16),
    )


class kvm_run_fail_entry(ctypes.Structure):
    """The ``fail_entry`` member (``KVM_EXIT_FAIL_ENTRY``)."""

    _fields_ = (
        ("hardware_entry_failure_reason", ctypes.c_uint64),
        ("cpu", ctypes.c_uint32),
    )


class kvm_run_exit(ctypes.Union):
    """The 256-byte exit union of ``kvm_run`` (the members this project reads)."""

    _fields_ = (
        ("hardware_exit_reason", ctypes.c_uint64),
        ("fail_entry", kvm_run_fail_entry),
        ("io", kvm_run_io),
        ("mmio", kvm_run_mmio),
        ("internal", kvm_run_internal),
        ("padding", ctypes.c_char * 256),
    )


class kvm_run(ctypes.Structure):
    """The header of ``struct kvm_run`` (x86): the first 304 bytes of the mapping a vCPU
    fd offers (``KVM_GET_VCPU_MMAP_SIZE`` bytes in all). ``immediate_exit`` is called
    ``immediate_exit__unsafe`` in mainline; the offset and meaning are unchanged."""

    _anonymous_ = ("u",)
    _fields_ = (
        ("request_interrupt_window", ctypes.c_uint8),
        ("immediate_exit", ctypes.c_uint8),
        ("padding1", ctypes.c_uint8 * 6),
        ("exit_reason", ctypes.c_uint32),
        ("ready_for_interrupt_injection", ctypes.c_uint8),
        ("if_flag", ctypes.c_uint8),
        ("flags", ctypes.c_uint16),
        ("cr8", ctypes.c_uint64),
        ("apic_base", ctypes.c_uint64),
        ("u", kvm_run_exit),
        ("kvm_valid_regs", ctypes.c_uint64),
        ("kvm_dirty_regs", ctypes.c_uint64),
    )


# Sizes the kernel ABI fixes (checked with the uapi headers; a mismatch would give wrong
# ioctl numbers and corrupt memory).
assert ctypes.sizeof(kvm_userspace_memory_region) == 32
assert ctypes.sizeof(kvm_userspace_memory_region2) == 160
assert ctypes.sizeof(kvm_dirty_log) == 16
assert ctypes.sizeof(kvm_clear_dirty_log) == 24
assert ctypes.sizeof(kvm_enable_cap) == 104
assert ctypes.sizeof(kvm_dirty_gfn) == 16
assert ctypes.sizeof(kvm_create_guest_memfd) == 64
assert ctypes.sizeof(kvm_regs) == 144
assert ctypes.sizeof(kvm_segment) == 24
assert ctypes.sizeof(kvm_dtable) == 16
assert ctypes.sizeof(kvm_sregs) == 312
assert ctypes.sizeof(kvm_run_exit) == 256
assert kvm_run.u.offset == 32
assert kvm_run.kvm_valid_regs.offset == 288
assert kvm_run_io.data_offset.offset == 8
assert kvm_run_mmio.is_write.offset == 20

# --------------------------------------------------------------------------------------
# ioctl numbers

KVMIO: Final = 0xAE

# system ioctls (on the /dev/kvm fd)
KVM_GET_API_VERSION: Final = _IO(KVMIO, 0x00)
KVM_CREATE_VM: Final = _IO(KVMIO, 0x01)
KVM_CHECK_EXTENSION: Final = _IO(KVMIO, 0x03)  # also a VM ioctl
KVM_GET_VCPU_MMAP_SIZE: Final = _IO(KVMIO, 0x04)

# VM ioctls
KVM_CREATE_VCPU: Final = _IO(KVMIO, 0x41)
KVM_GET_DIRTY_LOG: Final = _IOW(KVMIO, 0x42, kvm_dirty_log)
KVM_SET_NR_MMU_PAGES: Final = _IO(KVMIO, 0x44)
KVM_GET_NR_MMU_PAGES: Final = _IO(KVMIO, 0x45)
KVM_SET_USER_MEMORY_REGION: Final = _IOW(KVMIO, 0x46, kvm_userspace_memory_region)
KVM_SET_TSS_ADDR: Final = _IO(KVMIO, 0x47)
KVM_SET_USER_MEMORY_REGION2: Final = _IOW(KVMIO, 0x49, kvm_userspace_memory_region2)
KVM_ENABLE_CAP: Final = _IOW(KVMIO, 0xA3, kvm_enable_cap)
KVM_CLEAR_DIRTY_LOG: Final = _IOWR(KVMIO, 0xC0, kvm_clear_dirty_log)
KVM_RESET_DIRTY_RINGS: Final = _IO(KVMIO, 0xC7)
KVM_CREATE_GUEST_MEMFD: Final = _IOWR(KVMIO, 0xD4, kvm_create_guest_memfd)

# vCPU ioctls
KVM_RUN: Final = _IO(KVMIO, 0x80)
KVM_GET_REGS: Final = _IOR(KVMIO, 0x81, kvm_regs)
KVM_SET_REGS: Final = _IOW(KVMIO, 0x82, kvm_regs)
KVM_GET_SREGS: Final = _IOR(KVMIO, 0x83, kvm_sregs)
KVM_SET_SREGS: Final = _IOW(KVMIO, 0x84, kvm_sregs)

# The values the Linux 6.1 uapi headers give (REGION2 from the 6.8+ header's definition).
assert KVM_SET_USER_MEMORY_REGION == 0x4020AE46
assert KVM_SET_USER_MEMORY_REGION2 == 0x40A0AE49
assert KVM_GET_DIRTY_LOG == 0x4010AE42
assert KVM_CLEAR_DIRTY_LOG == 0xC018AEC0
assert KVM_ENABLE_CAP == 0x4068AEA3
assert KVM_GET_REGS == 0x8090AE81
assert KVM_SET_SREGS == 0x4138AE84
assert KVM_CREATE_GUEST_MEMFD == 0xC040AED4
assert KVM_RESET_DIRTY_RINGS == 0xAEC7

#: the only KVM API version there has ever been (``KVM_GET_API_VERSION``)
KVM_API_VERSION: Final = 12

#: VM type of ``KVM_CREATE_VM``'s argument for an ordinary x86 VM
KVM_X86_DEFAULT_VM: Final = 0

# --------------------------------------------------------------------------------------
# capabilities (KVM_CHECK_EXTENSION / KVM_ENABLE_CAP). Checked against the uapi header:
# 10, 81, 117, 118, 168, 192 in Linux 6.1's; 231, 234, 235 in the 6.8+ header text.

KVM_CAP_USER_MEMORY: Final = 3
KVM_CAP_SET_TSS_ADDR: Final = 4
KVM_CAP_NR_VCPUS: Final = 9
KVM_CAP_NR_MEMSLOTS: Final = 10
KVM_CAP_MAX_VCPUS: Final = 66
KVM_CAP_READONLY_MEM: Final = 81
KVM_CAP_X86_SMM: Final = 117
KVM_CAP_MULTI_ADDRESS_SPACE: Final = 118
KVM_CAP_MAX_VCPU_ID: Final = 128
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: Final = 168
KVM_CAP_DIRTY_LOG_RING: Final = 192
KVM_CAP_DIRTY_LOG_RING_ACQ_REL: Final = 223
KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP: Final = 225
KVM_CAP_USER_MEMORY2: Final = 231
KVM_CAP_MEMORY_ATTRIBUTES: Final = 233
KVM_CAP_GUEST_MEMFD: Final = 234
KVM_CAP_VM_TYPES: Final = 235
KVM_CAP_GUEST_MEMFD_FLAGS: Final = 244

#: ``kvm_create_guest_memfd.flags`` (Linux 6.17+; ``KVM_CAP_GUEST_MEMFD_FLAGS`` lists them)
GUEST_MEMFD_FLAG_MMAP: Final = 1 << 0
GUEST_MEMFD_FLAG_INIT_SHARED: Final = 1 << 1

# --------------------------------------------------------------------------------------
# exit reasons (kvm_run.exit_reason)

KVM_EXIT_UNKNOWN: Final = 0
KVM_EXIT_EXCEPTION: Final = 1
KVM_EXIT_IO: Final = 2
KVM_EXIT_HYPERCALL: Final = 3
KVM_EXIT_DEBUG: Final = 4
KVM_EXIT_HLT: Final = 5
KVM_EXIT_MMIO: Final = 6
KVM_EXIT_IRQ_WINDOW_OPEN: Final = 7
KVM_EXIT_SHUTDOWN: Final = 8
KVM_EXIT_FAIL_ENTRY: Final = 9
KVM_EXIT_INTR: Final = 10
KVM_EXIT_SET_TPR: Final = 11
KVM_EXIT_TPR_ACCESS: Final = 12
KVM_EXIT_NMI: Final = 16
KVM_EXIT_INTERNAL_ERROR: Final = 17
KVM_EXIT_SYSTEM_EVENT: Final = 24
KVM_EXIT_X86_RDMSR: Final = 29
KVM_EXIT_X86_WRMSR: Final = 30
KVM_EXIT_DIRTY_RING_FULL: Final = 31
KVM_EXIT_X86_BUS_LOCK: Final = 33
KVM_EXIT_NOTIFY: Final = 37
KVM_EXIT_MEMORY_FAULT: Final = 39

#: ``kvm_run.io.direction``
KVM_EXIT_IO_IN: Final = 0
KVM_EXIT_IO_OUT: Final = 1

#: ``kvm_run.internal.suberror`` values
KVM_INTERNAL_ERROR_EMULATION: Final = 1
KVM_INTERNAL_ERROR_SIMUL_EX: Final = 2
KVM_INTERNAL_ERROR_DELIVERY_EV: Final = 3
KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON: Final = 4

_EXIT_NAMES: Final = {
    value: name[len("KVM_EXIT_") :]
    for name, value in globals().items()
    if name.startswith("KVM_EXIT_") and not name.startswith("KVM_EXIT_IO_")
}


def exit_reason_name(reason: int) -> str:
    """``exit_reason_name(5) == "HLT"``; unknown numbers give their decimal text. O(1)."""
    return _EXIT_NAMES.get(reason, str(reason))


# --------------------------------------------------------------------------------------
# the raw call

KVM_DEV_PATH: Final = "/dev/kvm"

_libc = ctypes.CDLL(None, use_errno=True)
_ioctl = _libc.ioctl
# ioctl(int fd, unsigned long request, ...): on x86-64 the third argument travels in a
# register whatever its C type, so one unsigned-long-sized parameter serves both the
# pointer and the plain-integer forms.
_ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong)
_ioctl.restype = ctypes.c_int

_mprotect = _libc.mprotect
_mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_mprotect.restype = ctypes.c_int

_PROT_NONE: Final = 0
_U16: Final = (1 << 16) - 1
_U32: Final = (1 << 32) - 1
_U64: Final = (1 << 64) - 1


def _ioctl_checked(fd: int, request: int, arg: int, name: str) -> int:
    """Issue one ioctl; return its non-negative result or raise ``MemslotError(errno)``."""
    ret: int = _ioctl(fd, request, arg)
    if ret < 0:
        raise MemslotError(ctypes.get_errno(), name)
    return ret


def _check_range(name: str, value: int, limit: int) -> None:
    if not 0 <= value <= limit:
        raise ValueError(f"{name}={value:#x} does not fit its uapi field (0..{limit:#x})")


def memory_region(
    slot: int, flags: int, guest_phys_addr: int, memory_size: int, userspace_addr: int
) -> kvm_userspace_memory_region:
    """The argument of ``KVM_SET_USER_MEMORY_REGION``; ``ValueError`` naming the field
    for a value that does not fit it. Whichever kernel gets it (this machine's, or one
    under QEMU: :mod:`memslots.tools.kernels.remote`)."""
    if not (
        0 <= slot <= _U32
        and 0 <= flags <= _U32
        and 0 <= guest_phys_addr <= _U64
        and 0 <= memory_size <= _U64
        and 0 <= userspace_addr <= _U64
    ):  # one expression: this is the hot path of replay and conformance runs
        _check_range("slot", slot, _U32)
        _check_range("flags", flags, _U32)
        _check_range("guest_phys_addr", guest_phys_addr, _U64)
        _check_range("memory_size", memory_size, _U64)
        _check_range("userspace_addr", userspace_addr, _U64)
    return kvm_userspace_memory_region(slot, flags, guest_phys_addr, memory_size, userspace_addr)


def memory_region2(
    slot: int,
    flags: int,
    guest_phys_addr: int,
    memory_size: int,
    userspace_addr: int,
    guest_memfd_offset: int = 0,
    guest_memfd: int = 0,
) -> kvm_userspace_memory_region2:
    """The argument of ``KVM_SET_USER_MEMORY_REGION2``, checked as
    :func:`memory_region` checks its fields."""
    _check_range("slot", slot, _U32)
    _check_range("flags", flags, _U32)
    _check_range("guest_phys_addr", guest_phys_addr, _U64)
    _check_range("memory_size", memory_size, _U64)
    _check_range("userspace_addr", userspace_addr, _U64)
    _check_range("guest_memfd_offset", guest_memfd_offset, _U64)
    _check_range("guest_memfd", guest_memfd, _U32)
    return kvm_userspace_memory_region2(
        slot, flags, guest_phys_addr, memory_size, userspace_addr, guest_memfd_offset,
        guest_memfd,
    )  # fmt: skip


class _GuardedBuffer:
    """A user buffer of ``size`` bytes that ends exactly at an inaccessible guard page.

    Handing its address to the kernel is safe whatever length the kernel decides to copy:
    anything past ``size`` bytes faults in ``copy_to_user``/``copy_from_user`` and the
    ioctl fails with EFAULT, as it would for a short user buffer in C, instead of
    corrupting the Python heap.
    """

    def __init__(self, size: int) -> None:
        page = mmap.PAGESIZE
        self.size = size
        usable = (size + page - 1) // page * page
        self._map = mmap.mmap(-1, usable + page)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
        if _mprotect(base + usable, page, _PROT_NONE) != 0:
            err = ctypes.get_errno()
            self._map.close()
            raise MemslotError(err, "mprotect of a guard page")
        self._offset = usable - size
        self.addr = base + self._offset

    def read(self) -> bytes:
        """The buffer's ``size`` bytes."""
        return self._map[self._offset : self._offset + self.size]

    def write(self, data: bytes) -> None:
        """Fill the buffer: ``data`` then zeros up to ``size`` bytes."""
        self._map[self._offset : self._offset + self.size] = data.ljust(self.size, b"\0")

    def close(self) -> None:
        """Unmap the buffer."""
        self._map.close()


# --------------------------------------------------------------------------------------
# file descriptor wrappers


class _Fd:
    """An owned file descriptor; closing it is idempotent. A context manager."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    @property
    def fd(self) -> int:
        """The raw descriptor number; ``ValueError`` once closed."""
        if self._fd < 0:
            raise ValueError(f"{type(self).__name__} is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run."""
        return self._fd < 0

    def close(self) -> None:
        """Close the descriptor (idempotent)."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # Last resort only; callers close explicitly or use ``with``. BufferError: a
        # subclass's mapping is still exported (a caller holds a view); the GC frees it.
        if getattr(self, "_fd", -1) >= 0:
            with contextlib.suppress(BufferError):
                self.close()


#: what to do when the device is missing or has no driver behind it
_NO_KVM_HINT: Final = (
    "load kvm_intel or kvm_amd, with virtualization on in the firmware; in a virtual"
    " machine, turn on nested virtualization"
)


def _open_device(path: str) -> int:
    """``open(path, O_RDWR | O_CLOEXEC)``: one place for tests to stand in for a device
    that refuses (they run as root, whom file permissions do not stop)."""
    return os.open(path, os.O_RDWR | os.O_CLOEXEC)


def _open_error(path: str, exc: OSError) -> KvmUnavailable:
    """The :class:`KvmUnavailable` for a failed open of the device."""
    err = exc.errno or 0
    if err in (errno.EACCES, errno.EPERM):
        reason = (
            "permission denied: add yourself to the kvm group (sudo usermod -aG kvm $USER,"
            " then log in again) or run as root"
        )
    elif err == errno.ENOENT:
        reason = f"no such device: KVM is not enabled on this machine ({_NO_KVM_HINT})"
    elif err in (errno.ENXIO, errno.ENODEV):
        reason = f"no KVM driver behind the device ({_NO_KVM_HINT})"
    else:
        reason = exc.strerror or str(exc)
    return KvmUnavailable(err, path, reason)


class KvmSystem(_Fd):
    """An open ``/dev/kvm``: the system ioctls.

    ``KvmSystem()`` opens the device and checks that it speaks KVM API version 12; it
    raises :class:`memslots.errors.KvmUnavailable` (an :class:`OSError`) naming the
    cause otherwise: permission denied, no such device, no driver behind it (KVM not
    loaded, nested virtualization off), not a KVM device, another API version. Use it as
    a context manager or call :meth:`close`.
    """

    def __init__(self, path: str = KVM_DEV_PATH) -> None:
        try:
            fd = _open_device(path)
        except OSError as exc:
            raise _open_error(path, exc) from None
        super().__init__(fd)
        try:
            version = self.api_version()
        except MemslotError as exc:
            self.close()
            err = exc.errno or 0
            raise KvmUnavailable(
                err, path, f"not a KVM device (KVM_GET_API_VERSION: {os.strerror(err)})"
            ) from None
        if version != KVM_API_VERSION:
            self.close()
            raise KvmUnavailable(
                0, path, f"KVM API version {version}, and memslots needs {KVM_API_VERSION}"
            )

    def api_version(self) -> int:
        """``KVM_GET_API_VERSION``: 12 on every kernel that has KVM. O(1)."""
        return _ioctl_checked(self.fd, KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION")

    def check_extension(self, cap: int) -> int:
        """``KVM_CHECK_EXTENSION`` on the system fd: 0 if ``cap`` is unsupported, else the
        capability's value (e.g. 32764 for ``KVM_CAP_NR_MEMSLOTS``). O(1)."""
        return _ioctl_checked(self.fd, KVM_CHECK_EXTENSION, cap, "KVM_CHECK_EXTENSION")

    def vcpu_mmap_size(self) -> int:
        """``KVM_GET_VCPU_MMAP_SIZE``: bytes to map from a vCPU fd (``kvm_run`` and the
        pages after it). O(1)."""
        return _ioctl_checked(self.fd, KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE")

    def create_vm(self, vm_type: int = KVM_X86_DEFAULT_VM) -> VmFd:
        """``KVM_CREATE_VM``: a new, empty VM. The :class:`VmFd` owns the new fd and does
        not need this object to stay open."""
        mmap_size = self.vcpu_mmap_size()
        fd = _ioctl_checked(self.fd, KVM_CREATE_VM, vm_type, "KVM_CREATE_VM")
        os.set_inheritable(fd, False)
        return VmFd(fd, vcpu_mmap_size=mmap_size)


class VmFd(_Fd):
    """A VM file descriptor: one method per VM ioctl, no state of its own.

    Every method raises :class:`~memslots.errors.MemslotError` with the kernel's errno when
    the ioctl fails and :class:`ValueError` for a value that does not fit its uapi field.
    Closing the fd destroys the VM once every vCPU fd and mapping is gone too. A context
    manager.
    """

    def __init__(self, fd: int, *, vcpu_mmap_size: int) -> None:
        super().__init__(fd)
        #: bytes to map from each vCPU fd (``KVM_GET_VCPU_MMAP_SIZE``)
        self.vcpu_mmap_size = vcpu_mmap_size
        self._tss_addr: int | None = None

    def check_extension(self, cap: int) -> int:
        """``KVM_CHECK_EXTENSION`` on the VM fd (answers for this VM, e.g.
        ``KVM_CAP_MULTI_ADDRESS_SPACE``). O(1)."""
        return _ioctl_checked(self.fd, KVM_CHECK_EXTENSION, cap, "KVM_CHECK_EXTENSION")

    def set_user_memory_region(
        self, slot: int, flags: int, guest_phys_addr: int, memory_size: int, userspace_addr: int
    ) -> None:
        """``KVM_SET_USER_MEMORY_REGION``: create, move, change flags of or (``memory_size``
        0) delete memslot ``slot`` (``as_id << 16 | id``). The kernel's cost is O(log n)
        in the number of slots plus a grace period."""
        region = memory_region(slot, flags, guest_phys_addr, memory_size, userspace_addr)
        _ioctl_checked(
            self.fd,
            KVM_SET_USER_MEMORY_REGION,
            ctypes.addressof(region),
            "KVM_SET_USER_MEMORY_REGION",
        )

    def set_user_memory_region2(
        self,
        slot: int,
        flags: int,
        guest_phys_addr: int,
        memory_size: int,
        userspace_addr: int,
        guest_memfd_offset: int = 0,
        guest_memfd: int = 0,
    ) -> None:
        """``KVM_SET_USER_MEMORY_REGION2``: as :meth:`set_user_memory_region`, plus the
        guest_memfd binding (used only with ``KVM_MEM_GUEST_MEMFD``). Linux 6.8+."""
        region = memory_region2(
            slot, flags, guest_phys_addr, memory_size, userspace_addr, guest_memfd_offset,
            guest_memfd,
        )  # fmt: skip
        _ioctl_checked(
            self.fd,
            KVM_SET_USER_MEMORY_REGION2,
            ctypes.addressof(region),
            "KVM_SET_USER_MEMORY_REGION2",
        )

    def get_dirty_log(self, slot: int, nbytes: int) -> bytes:
        """``KVM_GET_DIRTY_LOG``: the slot's dirty bitmap (little-endian u64 words, bit i
        for page i), ``nbytes`` long.

        The kernel writes ``ALIGN(npages, 64) / 8`` bytes; pass at least that. A shorter
        ``nbytes`` is safe (the buffer ends at a guard page) and fails with EFAULT, as a
        short buffer does in C; without manual protect the kernel has then already
        cleared the bits. Extra bytes come back zero. O(nbytes).
        """
        _check_range("slot", slot, _U32)
        if nbytes < 0:
            raise ValueError(f"nbytes={nbytes} is negative")
        buf = _GuardedBuffer(nbytes)
        try:
            log = kvm_dirty_log(slot, 0, buf.addr)
            _ioctl_checked(self.fd, KVM_GET_DIRTY_LOG, ctypes.addressof(log), "KVM_GET_DIRTY_LOG")
            return buf.read()
        finally:
            buf.close()

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int, bitmap: Buffer) -> None:
        """``KVM_CLEAR_DIRTY_LOG``: clear the dirty bits set in ``bitmap`` (any bytes-like
        object; bit i for page ``first_page + i``) among ``num_pages`` pages.

        The kernel reads ``ALIGN(num_pages, 64) / 8`` bytes of bitmap; a shorter
        ``bitmap`` is handed over as a short user buffer (EFAULT, like C). O(num_pages).
        """
        _check_range("slot", slot, _U32)
        _check_range("first_page", first_page, _U64)
        _check_range("num_pages", num_pages, _U32)
        need = (num_pages + 63) // 64 * 8
        data = memoryview(bitmap).cast("B")
        buf = _GuardedBuffer(min(need, len(data)))
        try:
            buf.write(data[: buf.size].tobytes())
            clear = kvm_clear_dirty_log(slot, num_pages, first_page, buf.addr)
            _ioctl_checked(
                self.fd, KVM_CLEAR_DIRTY_LOG, ctypes.addressof(clear), "KVM_CLEAR_DIRTY_LOG"
            )
        finally:
            buf.close()

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> int:
        """``KVM_ENABLE_CAP`` on the VM with up to four ``args``; returns the ioctl's
        result (0). E.g. ``enable_cap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 3)``."""
        if len(args) > 4:
            raise ValueError("kvm_enable_cap has four args")
        _check_range("cap", cap, _U32)
        _check_range("flags", flags, _U32)
        for value in args:
            _check_range("arg", value, _U64)
        request = kvm_enable_cap(cap, flags, (ctypes.c_uint64 * 4)(*args))
        return _ioctl_checked(self.fd, KVM_ENABLE_CAP, ctypes.addressof(request), "KVM_ENABLE_CAP")

    def reset_dirty_rings(self) -> int:
        """``KVM_RESET_DIRTY_RINGS``: reset the harvested entries of every vCPU's dirty
        ring; returns how many were reset (EINVAL without a ring). O(entries)."""
        return _ioctl_checked(self.fd, KVM_RESET_DIRTY_RINGS, 0, "KVM_RESET_DIRTY_RINGS")

    def set_tss_addr(self, addr: int) -> None:
        """``KVM_SET_TSS_ADDR``: where x86 puts the three pages of its real-mode TSS (an
        internal memslot on VMX); needed before running real-mode code. Use an address
        no slot covers, e.g. ``0xfffbd000``."""
        _check_range("addr", addr, _U64)
        _ioctl_checked(self.fd, KVM_SET_TSS_ADDR, addr, "KVM_SET_TSS_ADDR")
        self._tss_addr = addr

    @property
    def tss_addr(self) -> int | None:
        """The address last given to :meth:`set_tss_addr` successfully, or None."""
        return self._tss_addr

    def get_nr_mmu_pages(self) -> int:
        """``KVM_GET_NR_MMU_PAGES`` (x86): the shadow MMU's page limit, which follows
        ``nr_memslot_pages / 50`` (at least 64) unless set by hand. O(1). Mainline no longer
        has it: Linux 6.18 here answers ENOTTY."""
        return _ioctl_checked(self.fd, KVM_GET_NR_MMU_PAGES, 0, "KVM_GET_NR_MMU_PAGES")

    def create_guest_memfd(self, size: int, flags: int = 0) -> int:
        """``KVM_CREATE_GUEST_MEMFD``: a new guest_memfd of ``size`` bytes bound to this VM,
        for ``KVM_MEM_GUEST_MEMFD`` slots made with :meth:`set_user_memory_region2`.
        Returns the fd, owned by the caller (close it with ``os.close``)."""
        _check_range("size", size, _U64)
        _check_range("flags", flags, _U64)
        request = kvm_create_guest_memfd(size, flags)
        fd = _ioctl_checked(
            self.fd, KVM_CREATE_GUEST_MEMFD, ctypes.addressof(request), "KVM_CREATE_GUEST_MEMFD"
        )
        os.set_inheritable(fd, False)
        return fd

    def fd_identity(self, fd: int) -> tuple[int, int]:
        """``(st_dev, st_ino)`` of a descriptor (which file it is, whatever its number);
        :class:`~memslots.errors.MemslotError` EBADF when it is not open."""
        return fd_identity(fd)

    def close_fd(self, fd: int) -> None:
        """Close a descriptor this VM made (a guest_memfd, a vCPU fd): ``close(2)``. The
        same call on a kernel under QEMU closes it there."""
        os.close(fd)

    def create_vcpu(self, vcpu_id: int) -> int:
        """``KVM_CREATE_VCPU``: a new vCPU fd (owned by the caller; see
        :class:`memslots.kvm.vcpu.KvmVcpu` for a wrapper that owns it)."""
        _check_range("vcpu_id", vcpu_id, _U32)
        fd = _ioctl_checked(self.fd, KVM_CREATE_VCPU, vcpu_id, "KVM_CREATE_VCPU")
        os.set_inheritable(fd, False)
        return fd


class KvmSystemLike(Protocol):
    """A kernel's KVM as :class:`memslots.kvm.KvmVm` uses it: :class:`KvmSystem` (this
    machine's ``/dev/kvm``) or a kernel elsewhere (under QEMU) with the same calls."""

    def check_extension(self, cap: int) -> int: ...

    def create_vm(self, vm_type: int = KVM_X86_DEFAULT_VM) -> VmFd: ...

    def close(self) -> None: ...


def kvm_unavailable(path: str = KVM_DEV_PATH) -> KvmUnavailable | None:
    """Why ``path`` cannot be used as a KVM device here (the
    :class:`memslots.errors.KvmUnavailable` that :class:`KvmSystem` would raise), or None
    when it opens read-write and speaks API version 12. Never raises. O(1): one open and
    one ioctl.

    >>> print(kvm_unavailable("/nonexistent/kvm"))  # doctest: +ELLIPSIS
    /nonexistent/kvm: no such device: KVM is not enabled on this machine (load kvm_intel ...
    """
    try:
        with KvmSystem(path):
            return None
    except KvmUnavailable as exc:
        return exc
    except OSError as exc:  # a close that failed, say
        return KvmUnavailable(exc.errno or 0, path, exc.strerror or str(exc))


def kvm_available(path: str = KVM_DEV_PATH) -> bool:
    """True only if ``path`` opens read-write and answers ``KVM_GET_API_VERSION`` with 12
    (:func:`kvm_unavailable` is None). Never raises."""
    return kvm_unavailable(path) is None
