"""The memslot: one guest-physical range backed by one host-virtual range.

A :class:`Memslot` is shared by both memslot sets of its address space. Its fields never
change while it is published (the kernel's rule too): an update replaces the whole object
with a copy, so a reader holding a slot always sees a consistent one.
"""

from __future__ import annotations

from typing import Any

from memslots.constants import (
    KVM_HVA_ERR_BAD,
    KVM_HVA_ERR_RO_BAD,
    KVM_MEM_READONLY,
    KVM_MEMSLOT_INVALID,
    PAGE_SHIFT,
)


class Memslot:
    """``struct kvm_memory_slot``: ``id``, ``as_id``, ``base_gfn``, ``npages``, ``flags``,
    ``userspace_addr``, the dirty bitmap (``None`` unless dirty logging is on) and, for a
    guest_memfd slot, its binding ``gmem``.

    ``dirty_bitmap`` is a :class:`bytearray` of ``ALIGN(npages, 64) / 8`` bytes whose bit
    ``i`` (little-endian bit order, the kernel's ``set_bit_le``) is ``gfn = base_gfn + i``;
    it is shared by a slot and its copies while logging stays on, and every change to it
    holds :data:`memslots.dirty_log.bitmap_lock`.
    ``arch`` is an opaque per-architecture value, carried over on FLAGS_ONLY changes like
    the kernel's ``slot->arch``. ``page_shift`` is the kernel's page size (12: 4 KiB, the
    default; 14 and 16 on arm64 kernels with 16 and 64 KiB pages): a gfn is ``gpa >>
    page_shift`` and every byte value below (gpa, size, hvas) follows it.

    >>> from memslots import KVM_MEM_READONLY
    >>> s = Memslot(1, 0, 0x100, 16, KVM_MEM_READONLY, 0x7F0000000000)
    >>> s.slot, hex(s.guest_phys_addr), s.memory_size, s.readonly, s.invalid
    (1, '0x100000', 65536, True, False)
    >>> c = s.copy()
    >>> c is s, c.same_fields(s), c.as_tuple()
    (False, True, (0, 1, 256, 16, 2, 139637976727552))
    >>> Memslot(2, 1, 0, 1, 0, 0).slot   # the ABI number: as_id << 16 | id
    65538
    >>> hex(Memslot(3, 0, 0x100, 16, 0, 0, page_shift=14).guest_phys_addr)   # 16 KiB pages
    '0x400000'
    """

    __slots__ = (
        "arch",
        "as_id",
        "base_gfn",
        "dirty_bitmap",
        "flags",
        "gmem",
        "id",
        "npages",
        "page_shift",
        "userspace_addr",
    )

    def __init__(
        self,
        id: int,
        as_id: int,
        base_gfn: int,
        npages: int,
        flags: int,
        userspace_addr: int,
        dirty_bitmap: bytearray | None = None,
        arch: Any = None,
        page_shift: int = PAGE_SHIFT,
    ) -> None:
        self.id = id
        self.as_id = as_id
        self.base_gfn = base_gfn
        self.npages = npages
        self.flags = flags
        self.userspace_addr = userspace_addr
        self.dirty_bitmap = dirty_bitmap
        self.arch = arch
        #: log2 of the kernel's page size: 12, 14 or 16
        self.page_shift = page_shift
        #: ``(GuestMemfdFile, offset)`` for a KVM_MEM_GUEST_MEMFD slot, else None
        self.gmem: Any = None

    # --- derived values -------------------------------------------------------------
    @property
    def slot(self) -> int:
        """The ABI slot number ``as_id << 16 | id``."""
        return (self.as_id << 16) | self.id

    @property
    def invalid(self) -> bool:
        """True for the temporary INVALID copy published while the slot is deleted/moved."""
        return bool(self.flags & KVM_MEMSLOT_INVALID)

    @property
    def readonly(self) -> bool:
        """True when the guest may not write the slot (``KVM_MEM_READONLY``)."""
        return bool(self.flags & KVM_MEM_READONLY)

    @property
    def guest_phys_addr(self) -> int:
        """The first guest physical address of the slot."""
        return self.base_gfn << self.page_shift

    @property
    def memory_size(self) -> int:
        """The size of the slot in bytes."""
        return self.npages << self.page_shift

    @property
    def hva_last(self) -> int:
        """The last host virtual address of the slot (inclusive, as the kernel's
        ``hva_node.last``)."""
        return self.userspace_addr + (self.npages << self.page_shift) - 1

    def copy(self) -> Memslot:
        """``kvm_copy_memslot``: a new object with the same fields (bitmap shared)."""
        c = Memslot(
            self.id,
            self.as_id,
            self.base_gfn,
            self.npages,
            self.flags,
            self.userspace_addr,
            self.dirty_bitmap,
            self.arch,
            self.page_shift,
        )
        c.gmem = self.gmem
        return c

    def same_fields(self, other: Memslot) -> bool:
        """True when both slots describe the same mapping (id, as_id, gfns, flags, hva)."""
        return (
            self.id == other.id
            and self.as_id == other.as_id
            and self.base_gfn == other.base_gfn
            and self.npages == other.npages
            and self.flags == other.flags
            and self.userspace_addr == other.userspace_addr
        )

    def as_tuple(self) -> tuple[int, int, int, int, int, int]:
        """``(as_id, id, base_gfn, npages, flags, userspace_addr)``, handy for comparisons."""
        return (self.as_id, self.id, self.base_gfn, self.npages, self.flags, self.userspace_addr)

    def __repr__(self) -> str:
        extra = " INVALID" if self.invalid else ""
        return (
            f"Memslot(as_id={self.as_id}, id={self.id}, base_gfn={self.base_gfn:#x}, "
            f"npages={self.npages:#x}, flags={self.flags & 0xFFFF:#x}{extra}, "
            f"userspace_addr={self.userspace_addr:#x})"
        )


def kvm_is_error_hva(hva: int) -> bool:
    """True for the error values gfn->hva returns (``KVM_HVA_ERR_BAD`` and ``..._RO_BAD``)."""
    return hva >= KVM_HVA_ERR_BAD


def gfn_to_hva_memslot_prot(slot: Memslot | None, gfn: int, write: bool) -> int:
    """``__gfn_to_hva_many`` (``virt/kvm/kvm_main.c``): the hva of ``gfn`` in ``slot``,
    or an error hva.

    ``KVM_HVA_ERR_BAD`` for no slot, an INVALID slot or a gfn outside the slot;
    ``KVM_HVA_ERR_RO_BAD`` when ``write`` and the slot is read-only. O(1).

    >>> s = Memslot(0, 0, 0x100, 16, 0, 0x7F0000000000)
    >>> hex(gfn_to_hva_memslot_prot(s, 0x101, True))
    '0x7f0000001000'
    >>> kvm_is_error_hva(gfn_to_hva_memslot_prot(s, 0x110, True))   # one past the end
    True
    """
    if slot is None or slot.flags & KVM_MEMSLOT_INVALID:
        return KVM_HVA_ERR_BAD
    if not slot.base_gfn <= gfn < slot.base_gfn + slot.npages:
        return KVM_HVA_ERR_BAD
    if write and slot.flags & KVM_MEM_READONLY:
        return KVM_HVA_ERR_RO_BAD
    return slot.userspace_addr + ((gfn - slot.base_gfn) << slot.page_shift)
