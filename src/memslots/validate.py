"""Validation and classification of ``KVM_SET_USER_MEMORY_REGION(2)`` requests.

This is the kernel's ``kvm_vm_ioctl`` / ``kvm_vm_ioctl_set_memory_region`` /
``kvm_set_memory_region`` up to the call of ``kvm_set_memslot``, check by check in the
kernel's order (mainline ``virt/kvm/kvm_main.c``). Every check that fails raises
:class:`~memslots.errors.MemslotError` with the kernel's errno and changes nothing.

It is shared by every implementation (the tree engine :class:`memslots.vm.Vm`, the array
baseline and the ``/dev/kvm`` mirror), which only provide the active set's
``id_to_memslot`` and ``iter_gfn_range`` through the :class:`ActiveSlots` protocol.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from errno import EEXIST, EINVAL, EIO, ENOTTY
from typing import Final, Protocol

from memslots.constants import (
    KVM_ADDRESS_SPACE_NUM_X86,
    KVM_DIRTY_GFN_SIZE,
    KVM_DIRTY_LOG_MANUAL_CAPS_X86,
    KVM_DIRTY_RING_MAX_ENTRIES,
    KVM_MAX_VCPU_IDS_X86,
    KVM_MAX_VCPUS_X86,
    KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_MAX_NR_PAGES,
    KVM_MEM_READONLY,
    KVM_MEM_SLOTS_NUM,
    KVM_SET_USER_MEMORY_REGION_V1_FLAGS,
    KVM_USER_MEM_SLOTS_X86,
    PAGE_SHIFT,
    PAGE_SHIFTS,
    PAGE_SIZE,
    U64_MAX,
    X86_MAX_GFN,
)
from memslots.errors import MemslotError, Refusal
from memslots.slot import Memslot


class Change(enum.Enum):
    """``enum kvm_mr_change`` plus NONE for an accepted request that changes nothing."""

    CREATE = "create"
    DELETE = "delete"
    MOVE = "move"
    FLAGS_ONLY = "flags"
    NONE = "no-op"


@dataclass(frozen=True, slots=True)
class VmLimits:
    """Everything one VM's answers depend on: what the kernel under it offers and where it
    draws its lines. The engine's default is x86-64 mainline with every feature on;
    :class:`memslots.profiles.KernelProfile` gives the values of a real kernel
    (``profile.vm_limits()``), measured or probed.

    Memslots (``virt/kvm/kvm_main.c: kvm_set_memory_region`` and the arch hooks):
    ``nr_address_spaces`` (``kvm_arch_nr_memslot_as_ids``: 2 on x86 with SMM, 1 without),
    ``max_user_slots`` (``KVM_CAP_NR_MEMSLOTS``: 32764 on x86 since 5.11, 509 before,
    32767 on arm64), ``max_gfn`` (the highest gfn a slot may cover: x86
    ``kvm_mmu_max_gfn()``, arm64 the VM's IPA size), ``task_size_max`` (end of the user
    address range that ``access_ok`` accepts: 2^47 - 4 KiB with 4-level paging, 2^56 -
    4 KiB with 5-level), ``readonly_mem`` (``KVM_MEM_READONLY``), ``private_mem``
    (``KVM_MEM_GUEST_MEMFD`` slots are valid on this VM), ``user_memory2`` (the
    ``KVM_SET_USER_MEMORY_REGION2`` ioctl exists: 6.8+), ``page_shift`` (log2 of the
    kernel's page size: 12 for 4 KiB, 14 and 16 for arm64 kernels built with 16 and
    64 KiB pages; gfns, slot sizes, every alignment check, guest_memfd sizes and offsets
    and the dirty ring's minimum size follow it, while ``KVM_MEM_MAX_NR_PAGES`` stays
    2^31 - 1 pages).

    guest_memfd (``virt/kvm/guest_memfd.c``): ``guest_memfd`` (the
    ``KVM_CREATE_GUEST_MEMFD`` ioctl exists: 6.8+ with ``CONFIG_KVM_GUEST_MEMFD``, or its
    older name ``CONFIG_KVM_PRIVATE_MEM``), ``guest_memfd_flags`` (the creation flags
    ``kvm_gmem_create`` accepts), ``gmem_bound_errno`` (what ``kvm_gmem_bind`` answers for
    a range already bound to another slot: EINVAL, EEXIST on 7.x).

    vCPUs (``kvm_vm_ioctl_create_vcpu``): ``max_vcpu_ids`` (``KVM_CAP_MAX_VCPU_ID``: ids
    must be below it), ``max_vcpus`` (``KVM_CAP_MAX_VCPUS``: vCPUs ever created).

    Dirty logging: ``manual_dirty_log_caps`` (``KVM_DIRTY_LOG_MANUAL_CAPS``, the valid
    ``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`` bits), ``dirty_ring_max`` (the largest ring in
    bytes, ``KVM_CAP_DIRTY_LOG_RING``; 0: no plain ring, its ``KVM_ENABLE_CAP`` is EINVAL),
    ``dirty_ring_acq_rel`` (``KVM_CAP_DIRTY_LOG_RING_ACQ_REL`` is offered: x86 6.1+, and
    the only ring arm64 has),
    ``dirty_ring_with_bitmap`` (``KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP``, arm64 6.3+),
    ``reset_dirty_rings`` (the ``KVM_RESET_DIRTY_RINGS`` ioctl exists: 5.11+).

    Where architectures differ: ``arch`` (``"x86_64"``, ``"arm64"``),
    ``unknown_ioctl_errno`` (what ``kvm_arch_vm_ioctl`` answers to an ioctl the kernel
    does not have: ENOTTY on x86, EINVAL on arm64), ``max_gfn_errno`` (what
    ``kvm_arch_prepare_memory_region`` answers for a slot past the highest gfn: EINVAL on
    x86, EFAULT on arm64, where the limit is the VM's IPA size), ``gmem_needs_mmap``
    (arm64 7.x: a guest_memfd slot's file must have been made mmap-able,
    ``GUEST_MEMFD_FLAG_MMAP``, else EINVAL).
    """

    nr_address_spaces: int
    max_user_slots: int
    max_gfn: int
    readonly_mem: bool = True
    private_mem: bool = False
    task_size_max: int = (1 << 47) - PAGE_SIZE
    user_memory2: bool = True
    page_shift: int = PAGE_SHIFT
    guest_memfd: bool = True
    guest_memfd_flags: int = 0
    gmem_bound_errno: int = EINVAL
    max_vcpu_ids: int = KVM_MAX_VCPU_IDS_X86
    max_vcpus: int = KVM_MAX_VCPUS_X86
    manual_dirty_log_caps: int = KVM_DIRTY_LOG_MANUAL_CAPS_X86
    dirty_ring_max: int = KVM_DIRTY_RING_MAX_ENTRIES * KVM_DIRTY_GFN_SIZE
    dirty_ring_acq_rel: bool = True
    dirty_ring_with_bitmap: bool = False
    reset_dirty_rings: bool = True
    arch: str = "x86_64"
    unknown_ioctl_errno: int = ENOTTY
    max_gfn_errno: int = EINVAL
    gmem_needs_mmap: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.nr_address_spaces <= 0xFFFF:
            raise ValueError("nr_address_spaces must be in 1..65535")
        if not 1 <= self.max_user_slots <= KVM_MEM_SLOTS_NUM:
            raise ValueError(f"max_user_slots must be in 1..{KVM_MEM_SLOTS_NUM}")
        if self.page_shift not in PAGE_SHIFTS:
            raise ValueError(
                f"page_shift {self.page_shift}: the kernel's pages are 4, 16 or 64 KiB"
                " (page_shift 12, 14 or 16)"
            )
        if not 0 <= self.max_gfn < 1 << (64 - self.page_shift):
            raise ValueError(f"max_gfn must be a gfn (0 .. 2^{64 - self.page_shift}-1)")
        if not 0 < self.task_size_max < 1 << 64:
            raise ValueError("task_size_max must be in 1 .. 2^64-1")
        if not 1 <= self.max_vcpu_ids <= 1 << 32 or not 1 <= self.max_vcpus <= 1 << 32:
            raise ValueError("max_vcpu_ids and max_vcpus must be in 1 .. 2^32")
        if self.dirty_ring_max < 0 or self.dirty_ring_max & (self.dirty_ring_max - 1):
            raise ValueError("dirty_ring_max must be 0 or a power of two")

    def vm_limits(self, vm_type: int = 0) -> VmLimits:
        """These limits (a :class:`LimitsSource` of one VM: ``Vm(profile=limits)``)."""
        return self


#: where each architecture checks the highest gfn of a new slot
_ARCH_PREPARE: Final = {
    "x86_64": "arch/x86/kvm/x86.c: kvm_arch_prepare_memory_region",
    "arm64": "arch/arm64/kvm/mmu.c: kvm_arch_prepare_memory_region",
}


def check_max_gfn(limits: VmLimits, base_gfn: int, npages: int) -> None:
    """``kvm_arch_prepare_memory_region``'s limit for a CREATE or MOVE: the slot may not
    go past ``limits.max_gfn`` (x86: ``kvm_mmu_max_gfn()``, EINVAL, 5.18+; arm64: the
    VM's IPA size, EFAULT). O(1)."""
    last_gfn = base_gfn + npages - 1
    if last_gfn > limits.max_gfn:
        _refuse(
            limits.max_gfn_errno, "max-gfn", _ARCH_PREPARE.get(limits.arch, limits.arch),
            f"gfn {last_gfn:#x} is beyond the VM's highest gfn {limits.max_gfn:#x}",
        )  # fmt: skip


#: ``GUEST_MEMFD_FLAG_MMAP``: a guest_memfd that userspace may mmap (gmem-only slots)
GUEST_MEMFD_FLAG_MMAP: Final = 1 << 0


def check_gmem_only(limits: VmLimits, new: Memslot) -> None:
    """arm64's ``kvm_arch_prepare_memory_region`` (7.x): a guest_memfd slot must be
    gmem-only, its file made with ``GUEST_MEMFD_FLAG_MMAP`` (arm64 has no VM type with
    private-only memory): EINVAL otherwise. Nothing where ``limits.gmem_needs_mmap`` is
    off. O(1)."""
    if limits.gmem_needs_mmap and new.gmem is not None:
        gmem_file, _ = new.gmem
        if not gmem_file.flags & GUEST_MEMFD_FLAG_MMAP:
            _refuse(
                EINVAL, "gmem-not-mmap", _ARCH_PREPARE.get(limits.arch, limits.arch),
                "a guest_memfd slot on this kernel needs a guest_memfd made with"
                " GUEST_MEMFD_FLAG_MMAP",
                new,
            )  # fmt: skip


class LimitsSource(Protocol):
    """Where a VM's limits come from: a kernel profile
    (:class:`memslots.profiles.KernelProfile`) or anything else with this method."""

    def vm_limits(self, vm_type: int = 0) -> VmLimits:
        """The limits of a VM of ``vm_type`` (``KVM_CREATE_VM``'s argument)."""
        ...


def make_limits(
    profile: LimitsSource | None,
    vm_type: int,
    nr_address_spaces: int | None,
    max_user_slots: int | None,
    max_gfn: int | None,
    readonly_mem: bool | None,
    private_mem: bool | None,
    task_size_max: int | None,
) -> VmLimits:
    """The limits of a VM made with ``profile`` (x86-64 mainline defaults without one),
    each keyword that is not None overriding the profile's value."""
    base = (
        profile.vm_limits(vm_type)
        if profile is not None
        else VmLimits(KVM_ADDRESS_SPACE_NUM_X86, KVM_USER_MEM_SLOTS_X86, X86_MAX_GFN)
    )
    return dataclasses.replace(
        base,
        nr_address_spaces=base.nr_address_spaces
        if nr_address_spaces is None
        else nr_address_spaces,
        max_user_slots=base.max_user_slots if max_user_slots is None else max_user_slots,
        max_gfn=base.max_gfn if max_gfn is None else max_gfn,
        readonly_mem=base.readonly_mem if readonly_mem is None else readonly_mem,
        private_mem=base.private_mem if private_mem is None else private_mem,
        task_size_max=base.task_size_max if task_size_max is None else task_size_max,
    )


class ActiveSlots(Protocol):
    """What validation needs from an implementation's active set of one address space."""

    def id_to_memslot(self, id: int) -> Memslot | None: ...

    def iter_gfn_range(self, start: int, end: int) -> Iterable[Memslot]: ...


class Decision:
    """A validated request: what ``kvm_set_memslot`` is asked to do. Read-only by
    convention (a plain class rather than a frozen dataclass: creating one is on the path
    of every memslot call, and a frozen dataclass costs ten ``object.__setattr__`` calls)."""

    __slots__ = (
        "as_id",
        "base_gfn",
        "change",
        "flags",
        "guest_memfd",
        "guest_memfd_offset",
        "id",
        "npages",
        "old",
        "userspace_addr",
    )

    def __init__(
        self,
        change: Change,
        as_id: int,
        id: int,
        old: Memslot | None,
        base_gfn: int,
        npages: int,
        flags: int,
        userspace_addr: int,
        guest_memfd_offset: int = 0,
        guest_memfd: int = 0,
    ) -> None:
        self.change = change
        self.as_id = as_id
        self.id = id
        self.old = old
        self.base_gfn = base_gfn
        self.npages = npages
        self.flags = flags
        self.userspace_addr = userspace_addr
        self.guest_memfd_offset = guest_memfd_offset
        self.guest_memfd = guest_memfd

    def __repr__(self) -> str:
        return (
            f"Decision({self.change.name}, as_id={self.as_id}, id={self.id}, "
            f"base_gfn={self.base_gfn:#x}, npages={self.npages:#x}, flags={self.flags:#x}, "
            f"userspace_addr={self.userspace_addr:#x})"
        )


#: the kernel functions that make the checks (``file: function``), for :class:`Refusal`
KVM_VM_IOCTL: Final = "virt/kvm/kvm_main.c: kvm_vm_ioctl"
KVM_VM_IOCTL_SET_MEMORY_REGION: Final = "virt/kvm/kvm_main.c: kvm_vm_ioctl_set_memory_region"
KVM_SET_MEMORY_REGION: Final = "virt/kvm/kvm_main.c: kvm_set_memory_region"
CHECK_MEMORY_REGION_FLAGS: Final = "virt/kvm/kvm_main.c: check_memory_region_flags"
KVM_CHECK_MEMSLOT_OVERLAP: Final = "virt/kvm/kvm_main.c: kvm_check_memslot_overlap"
UAPI_STRUCT: Final = "include/uapi/linux/kvm.h: struct kvm_userspace_memory_region2"


def _refuse(err: int, check: str, function: str, detail: str, slot: Memslot | None = None) -> None:
    raise MemslotError(err, detail, Refusal(check, function, slot))


def check_abi_fields(
    slot: int,
    flags: int,
    guest_phys_addr: int,
    memory_size: int,
    userspace_addr: int,
    guest_memfd_offset: int = 0,
    guest_memfd: int = 0,
) -> None:
    """The values must be ints that fit the ioctl structure (u32 slot and flags, u64
    addresses).

    Not a kernel check (C cannot pass anything else): a value of another type is
    :class:`TypeError` naming the parameter, one that does not fit is EINVAL here, before
    anything else, in every implementation alike.
    """
    try:
        _check_abi_values(
            slot, flags, guest_phys_addr, memory_size, userspace_addr, guest_memfd_offset,
            guest_memfd,
        )  # fmt: skip
    except TypeError:
        for name, v in (
            ("slot", slot),
            ("flags", flags),
            ("guest_phys_addr", guest_phys_addr),
            ("memory_size", memory_size),
            ("userspace_addr", userspace_addr),
            ("guest_memfd_offset", guest_memfd_offset),
            ("guest_memfd", guest_memfd),
        ):
            if not isinstance(v, int) or isinstance(v, bool):
                raise TypeError(f"{name} must be an int, got {type(v).__name__}") from None
        raise


def _check_abi_values(
    slot: int,
    flags: int,
    guest_phys_addr: int,
    memory_size: int,
    userspace_addr: int,
    guest_memfd_offset: int,
    guest_memfd: int,
) -> None:
    # shifts rather than comparisons with U32_MAX/U64_MAX: compiled, those constants are
    # big integers and every comparison with them a generic call
    if slot < 0 or slot >> 32:
        _refuse(EINVAL, "abi-field", UAPI_STRUCT, f"slot {slot} does not fit u32")
    if flags < 0 or flags >> 32:
        _refuse(EINVAL, "abi-field", UAPI_STRUCT, f"flags {flags} do not fit u32")
    if guest_memfd < 0 or guest_memfd >> 32:
        _refuse(EINVAL, "abi-field", UAPI_STRUCT, f"guest_memfd {guest_memfd} does not fit u32")
    if (
        guest_phys_addr < 0
        or guest_phys_addr >> 64
        or memory_size < 0
        or memory_size >> 64
        or userspace_addr < 0
        or userspace_addr >> 64
        or guest_memfd_offset < 0
        or guest_memfd_offset >> 64
    ):
        for name, v in (
            ("guest_phys_addr", guest_phys_addr),
            ("memory_size", memory_size),
            ("userspace_addr", userspace_addr),
            ("guest_memfd_offset", guest_memfd_offset),
        ):
            if not 0 <= v <= U64_MAX:
                _refuse(EINVAL, "abi-field", UAPI_STRUCT, f"{name} {v} does not fit u64")


def check_memory_region_flags(limits: VmLimits, flags: int) -> None:
    """``check_memory_region_flags`` (mainline): EINVAL for flags this VM cannot take."""
    valid = KVM_MEM_LOG_DIRTY_PAGES
    if limits.private_mem:
        valid |= KVM_MEM_GUEST_MEMFD
    if flags & KVM_MEM_GUEST_MEMFD:
        valid &= ~KVM_MEM_LOG_DIRTY_PAGES
    if limits.readonly_mem and not flags & KVM_MEM_GUEST_MEMFD:
        valid |= KVM_MEM_READONLY
    if flags & ~valid:
        _refuse(
            EINVAL, "flags", CHECK_MEMORY_REGION_FLAGS,
            f"flags {flags:#x} not supported (this VM takes {valid:#x})",
        )  # fmt: skip


def check_set_user_memory_region(
    limits: VmLimits,
    active: Sequence[ActiveSlots],
    nr_memslot_pages: int,
    *,
    v2: bool,
    slot: int,
    flags: int,
    guest_phys_addr: int,
    memory_size: int,
    userspace_addr: int,
    guest_memfd_offset: int = 0,
    guest_memfd: int = 0,
) -> Decision:
    """Validate and classify one request; raise :class:`MemslotError` (with its
    :class:`Refusal`) on the first failing check, in the kernel's order. ``active[as_id]``
    is the active set of each address space."""
    # kvm_vm_ioctl: KVM_SET_USER_MEMORY_REGION2 is an unknown ioctl before 6.8
    if v2 and not limits.user_memory2:
        _refuse(
            limits.unknown_ioctl_errno, "no-ioctl", KVM_VM_IOCTL,
            "KVM_SET_USER_MEMORY_REGION2 does not exist before Linux 6.8",
        )  # fmt: skip
    check_abi_fields(
        slot, flags, guest_phys_addr, memory_size, userspace_addr, guest_memfd_offset, guest_memfd
    )
    # kvm_vm_ioctl: the v1 ioctl takes only LOG_DIRTY and READONLY
    if not v2 and flags & ~KVM_SET_USER_MEMORY_REGION_V1_FLAGS:
        _refuse(
            EINVAL, "v1-flags", KVM_VM_IOCTL,
            f"flags {flags:#x} not accepted by KVM_SET_USER_MEMORY_REGION (only 0x3)",
        )  # fmt: skip
    # kvm_vm_ioctl_set_memory_region
    if (slot & 0xFFFF) >= limits.max_user_slots:
        _refuse(
            EINVAL, "slot-id", KVM_VM_IOCTL_SET_MEMORY_REGION,
            f"slot id {slot & 0xFFFF} is not below the {limits.max_user_slots} user slots",
        )  # fmt: skip
    # kvm_set_memory_region (under slots_lock)
    check_memory_region_flags(limits, flags)
    as_id = slot >> 16
    id = slot & 0xFFFF
    fn = KVM_SET_MEMORY_REGION
    shift = limits.page_shift
    mask = (1 << shift) - 1
    if memory_size & mask:
        _refuse(EINVAL, "size-unaligned", fn, f"memory_size {memory_size:#x} is not page aligned")
    if guest_phys_addr & mask:
        _refuse(
            EINVAL, "gpa-unaligned", fn, f"guest_phys_addr {guest_phys_addr:#x} is not page aligned"
        )
    if userspace_addr & mask:
        _refuse(
            EINVAL, "hva-unaligned", fn, f"userspace_addr {userspace_addr:#x} is not page aligned"
        )
    if userspace_addr + memory_size > limits.task_size_max:
        _refuse(
            EINVAL, "hva-range", fn,
            f"hva range {userspace_addr:#x}+{memory_size:#x} ends past the user address space "
            f"({limits.task_size_max:#x}, access_ok)",
        )  # fmt: skip
    if flags & KVM_MEM_GUEST_MEMFD and (
        guest_memfd_offset & mask or (guest_memfd_offset + memory_size) >> 64
    ):
        _refuse(
            EINVAL, "gmem-offset", fn,
            f"guest_memfd_offset {guest_memfd_offset:#x} is not page aligned or wraps",
        )  # fmt: skip
    if as_id >= limits.nr_address_spaces or id >= KVM_MEM_SLOTS_NUM:
        _refuse(
            EINVAL, "as-id", fn,
            f"address space {as_id} does not exist (the VM has {limits.nr_address_spaces})",
        )  # fmt: skip
    if (guest_phys_addr + memory_size) >> 64:
        _refuse(EINVAL, "gpa-wraps", fn, "guest physical range wraps past 2^64")
    if id < limits.max_user_slots and (memory_size >> shift) > KVM_MEM_MAX_NR_PAGES:
        _refuse(
            EINVAL, "npages", fn,
            f"{memory_size >> shift} pages: more than KVM_MEM_MAX_NR_PAGES (2^31-1)",
        )  # fmt: skip

    slots = active[as_id]
    old = slots.id_to_memslot(id)
    if not memory_size:
        if old is None:
            _refuse(EINVAL, "delete-missing", fn, f"delete of slot {slot:#x}, which does not exist")
        assert old is not None
        if nr_memslot_pages < old.npages:  # WARN_ON_ONCE in the kernel; cannot happen
            _refuse(EIO, "accounting", fn, "page accounting underflow")
        return Decision(
            Change.DELETE, as_id, id, old, old.base_gfn, old.npages, old.flags,
            old.userspace_addr,
        )  # fmt: skip

    base_gfn = guest_phys_addr >> shift
    npages = memory_size >> shift
    if old is None:
        change = Change.CREATE
        if (nr_memslot_pages + npages) >> 64:
            _refuse(EINVAL, "nr-pages-overflow", fn, "total page count overflows")
    else:
        if (flags | old.flags) & KVM_MEM_GUEST_MEMFD:
            # "Private memslots are immutable, they can only be deleted." The kernel tests
            # the requested flags here; a request without the flag against a guest_memfd
            # slot is refused too (measured on Linux 6.18), with no state change.
            _refuse(
                EINVAL, "gmem-immutable", fn,
                f"slot {id} is a guest_memfd slot: it can only be deleted", old,
            )  # fmt: skip
        if (
            userspace_addr != old.userspace_addr
            or npages != old.npages
            or (flags ^ old.flags) & KVM_MEM_READONLY
        ):
            what = [
                name
                for name, differs in (
                    ("userspace_addr", userspace_addr != old.userspace_addr),
                    ("memory_size", npages != old.npages),
                    ("READONLY", (flags ^ old.flags) & KVM_MEM_READONLY),
                )
                if differs
            ]
            _refuse(
                EINVAL, "modify-changed", fn,
                f"slot {id} exists: only its gpa and LOG_DIRTY may change, not "
                + " or ".join(what),
                old,
            )  # fmt: skip
        if base_gfn != old.base_gfn:
            change = Change.MOVE
        elif flags != old.flags:
            change = Change.FLAGS_ONLY
        else:
            change = Change.NONE
    if change in (Change.CREATE, Change.MOVE):
        for s in slots.iter_gfn_range(base_gfn, base_gfn + npages):
            if s.id != id:
                _refuse(
                    EEXIST, "overlap", KVM_CHECK_MEMSLOT_OVERLAP,
                    f"gpa {guest_phys_addr:#x}-{guest_phys_addr + memory_size - 1:#x} overlaps "
                    f"slot {s.id}, gpa {s.base_gfn << shift:#x}-"
                    f"{((s.base_gfn + s.npages) << shift) - 1:#x}",
                    s,
                )  # fmt: skip
    return Decision(
        change, as_id, id, old, base_gfn, npages, flags, userspace_addr,
        guest_memfd_offset, guest_memfd,
    )  # fmt: skip
