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

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from errno import EEXIST, EINVAL, EIO
from typing import Protocol

from memslots.constants import (
    KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_MAX_NR_PAGES,
    KVM_MEM_READONLY,
    KVM_MEM_SLOTS_NUM,
    KVM_SET_USER_MEMORY_REGION_V1_FLAGS,
    PAGE_SHIFT,
    PAGE_SIZE,
    U64_MAX,
)
from memslots.errors import MemslotError
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
    """What the VM (and the kernel under it) accepts.

    ``nr_address_spaces``: 2 on x86 with SMM, 1 on this machine's kernel;
    ``max_user_slots``: ``KVM_CAP_NR_MEMSLOTS`` (x86: 32764);
    ``max_gfn``: the highest gfn a slot may cover (x86 ``kvm_mmu_max_gfn()``);
    ``readonly_mem``: ``KVM_MEM_READONLY`` is supported;
    ``private_mem``: ``KVM_MEM_GUEST_MEMFD`` slots are allowed (private-memory VM types;
    Linux 6.18 allows guest_memfd on the default x86 VM too);
    ``task_size_max``: end of the user address range (``access_ok``).
    """

    nr_address_spaces: int
    max_user_slots: int
    max_gfn: int
    readonly_mem: bool = True
    private_mem: bool = False
    task_size_max: int = (1 << 47) - PAGE_SIZE

    def __post_init__(self) -> None:
        if not 1 <= self.nr_address_spaces <= 0xFFFF:
            raise ValueError("nr_address_spaces must be in 1..65535")
        if not 1 <= self.max_user_slots <= KVM_MEM_SLOTS_NUM:
            raise ValueError(f"max_user_slots must be in 1..{KVM_MEM_SLOTS_NUM}")
        if not 0 <= self.max_gfn < 1 << (64 - PAGE_SHIFT):
            raise ValueError("max_gfn must be a gfn (0 .. 2^52-1)")


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


def check_abi_fields(
    slot: int,
    flags: int,
    guest_phys_addr: int,
    memory_size: int,
    userspace_addr: int,
    guest_memfd_offset: int = 0,
    guest_memfd: int = 0,
) -> None:
    """The values must fit the ioctl structure (u32 slot and flags, u64 addresses).

    Not a kernel check (C cannot pass anything else): a value that does not fit is
    EINVAL here, before anything else, in every implementation alike.
    """
    # shifts rather than comparisons with U32_MAX/U64_MAX: compiled, those constants are
    # big integers and every comparison with them a generic call
    if slot < 0 or slot >> 32:
        raise MemslotError(EINVAL, f"slot {slot} does not fit u32")
    if flags < 0 or flags >> 32:
        raise MemslotError(EINVAL, f"flags {flags} do not fit u32")
    if guest_memfd < 0 or guest_memfd >> 32:
        raise MemslotError(EINVAL, f"guest_memfd {guest_memfd} does not fit u32")
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
                raise MemslotError(EINVAL, f"{name} {v} does not fit u64")


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
        raise MemslotError(EINVAL, f"flags {flags:#x} not supported")


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
    """Validate and classify one request; raise :class:`MemslotError` on the first failing
    check (kernel order). ``active[as_id]`` is the active set of each address space."""
    check_abi_fields(
        slot, flags, guest_phys_addr, memory_size, userspace_addr, guest_memfd_offset, guest_memfd
    )
    # kvm_vm_ioctl: the v1 ioctl takes only LOG_DIRTY and READONLY
    if not v2 and flags & ~KVM_SET_USER_MEMORY_REGION_V1_FLAGS:
        raise MemslotError(EINVAL, f"flags {flags:#x} not accepted by the v1 ioctl")
    # kvm_vm_ioctl_set_memory_region
    if (slot & 0xFFFF) >= limits.max_user_slots:
        raise MemslotError(EINVAL, f"slot id {slot & 0xFFFF} >= {limits.max_user_slots}")
    # kvm_set_memory_region (under slots_lock)
    check_memory_region_flags(limits, flags)
    as_id = slot >> 16
    id = slot & 0xFFFF
    if memory_size & (PAGE_SIZE - 1):
        raise MemslotError(EINVAL, "memory_size is not page aligned")
    if guest_phys_addr & (PAGE_SIZE - 1):
        raise MemslotError(EINVAL, "guest_phys_addr is not page aligned")
    if userspace_addr & (PAGE_SIZE - 1):
        raise MemslotError(EINVAL, "userspace_addr is not page aligned")
    if userspace_addr + memory_size > limits.task_size_max:
        raise MemslotError(EINVAL, "userspace range is not in the user address space")
    if flags & KVM_MEM_GUEST_MEMFD and (
        guest_memfd_offset & (PAGE_SIZE - 1) or (guest_memfd_offset + memory_size) >> 64
    ):
        raise MemslotError(EINVAL, "bad guest_memfd_offset")
    if as_id >= limits.nr_address_spaces or id >= KVM_MEM_SLOTS_NUM:
        raise MemslotError(EINVAL, f"address space {as_id} does not exist")
    if (guest_phys_addr + memory_size) >> 64:
        raise MemslotError(EINVAL, "guest physical range wraps")
    if id < limits.max_user_slots and (memory_size >> PAGE_SHIFT) > KVM_MEM_MAX_NR_PAGES:
        raise MemslotError(EINVAL, "more than KVM_MEM_MAX_NR_PAGES pages")

    slots = active[as_id]
    old = slots.id_to_memslot(id)
    if not memory_size:
        if old is None:
            raise MemslotError(EINVAL, f"delete of missing slot {slot:#x}")
        if nr_memslot_pages < old.npages:  # WARN_ON_ONCE in the kernel; cannot happen
            raise MemslotError(EIO, "page accounting underflow")
        return Decision(
            Change.DELETE, as_id, id, old, old.base_gfn, old.npages, old.flags,
            old.userspace_addr,
        )  # fmt: skip

    base_gfn = guest_phys_addr >> PAGE_SHIFT
    npages = memory_size >> PAGE_SHIFT
    if old is None:
        change = Change.CREATE
        if (nr_memslot_pages + npages) >> 64:
            raise MemslotError(EINVAL, "total page count overflows")
    else:
        if (flags | old.flags) & KVM_MEM_GUEST_MEMFD:
            # "Private memslots are immutable, they can only be deleted." The kernel tests
            # the requested flags here; a request without the flag against a guest_memfd
            # slot is refused too (measured on Linux 6.18), with no state change.
            raise MemslotError(EINVAL, "guest_memfd memslots can only be deleted")
        if (
            userspace_addr != old.userspace_addr
            or npages != old.npages
            or (flags ^ old.flags) & KVM_MEM_READONLY
        ):
            raise MemslotError(EINVAL, "hva, size or READONLY of an existing slot changed")
        if base_gfn != old.base_gfn:
            change = Change.MOVE
        elif flags != old.flags:
            change = Change.FLAGS_ONLY
        else:
            change = Change.NONE
    if change in (Change.CREATE, Change.MOVE):
        for s in slots.iter_gfn_range(base_gfn, base_gfn + npages):
            if s.id != id:
                raise MemslotError(EEXIST, f"gfn range overlaps slot {s.id}")
    return Decision(
        change, as_id, id, old, base_gfn, npages, flags, userspace_addr,
        guest_memfd_offset, guest_memfd,
    )  # fmt: skip
