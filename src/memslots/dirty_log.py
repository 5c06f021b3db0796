"""Dirty logging: per-slot bitmaps, KVM_GET_DIRTY_LOG, KVM_CLEAR_DIRTY_LOG,
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 (reference section 5).

A slot's bitmap is a :class:`bytearray` of ``ALIGN(npages, 64) / 8`` bytes in the kernel's
layout: bit ``i`` (little-endian bit order, so plain bit ``i`` of the array of little-endian
u64 words) is ``gfn = base_gfn + i``. The kernel allocates twice that (the second half is
scratch space for GET and CLEAR); this implementation needs no scratch space.
"""

from __future__ import annotations

from errno import EINVAL, ENOENT
from typing import TYPE_CHECKING

from memslots.constants import (
    KVM_DIRTY_LOG_INITIALLY_SET,
    KVM_DIRTY_LOG_MANUAL_CAPS_X86,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
    KVM_MEM_LOG_DIRTY_PAGES,
)
from memslots.errors import MemslotError
from memslots.slot import Memslot

if TYPE_CHECKING:
    from memslots.vm import Vm


def dirty_bitmap_bytes(npages: int) -> int:
    """``kvm_dirty_bitmap_bytes``: ``ALIGN(npages, 64) / 8``."""
    return ((npages + 63) // 64) * 8


def alloc_dirty_bitmap(npages: int, manual_dirty_log_protect: int) -> bytearray:
    """``kvm_alloc_dirty_bitmap``: zeroed, or with bits ``[0, npages)`` set when
    ``KVM_DIRTY_LOG_INITIALLY_SET`` is on. O(npages / 8)."""
    n = dirty_bitmap_bytes(npages)
    if not manual_dirty_log_protect & KVM_DIRTY_LOG_INITIALLY_SET:
        return bytearray(n)
    bm = bytearray(b"\xff" * (npages // 8))
    if npages % 8:
        bm.append((1 << (npages % 8)) - 1)
    bm.extend(bytes(n - len(bm)))
    return bm


def enable_manual_dirty_log_protect(vm: Vm, flags: int) -> None:
    """``KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, flags)``: EINVAL for bits
    other than ENABLE and INITIALLY_SET, and for INITIALLY_SET without ENABLE."""
    allowed = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
    if flags & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE:
        allowed = KVM_DIRTY_LOG_MANUAL_CAPS_X86
    if flags < 0 or flags & ~allowed:
        raise MemslotError(EINVAL, f"manual dirty log protect flags {flags:#x}")
    with vm.slots_lock:
        vm.manual_dirty_log_protect = flags


def _logged_slot(vm: Vm, slot: int) -> Memslot:
    as_id, id = slot >> 16, slot & 0xFFFF
    if not 0 <= slot <= 0xFFFFFFFF or as_id >= vm.nr_address_spaces:
        raise MemslotError(EINVAL, f"slot {slot:#x}")
    if id >= vm.limits.max_user_slots:
        raise MemslotError(EINVAL, f"slot id {id}")
    s = vm._memslots[as_id].id_to_memslot(id)
    if s is None or s.dirty_bitmap is None:
        raise MemslotError(ENOENT, f"slot {slot:#x} has no dirty log")
    return s


def get_dirty_log(vm: Vm, slot: int) -> bytes:
    """``KVM_GET_DIRTY_LOG`` (see :meth:`memslots.vm.Vm.get_dirty_log`). O(npages / 8)."""
    with vm.slots_lock:
        s = _logged_slot(vm, slot)
        bm = s.dirty_bitmap
        assert bm is not None
        out = bytes(bm)
        if not vm.manual_dirty_log_protect:
            bm[:] = bytes(len(bm))
        return out


def _check_slot_range(vm: Vm, slot: int) -> None:
    as_id, id = slot >> 16, slot & 0xFFFF
    if not 0 <= slot <= 0xFFFFFFFF or as_id >= vm.nr_address_spaces:
        raise MemslotError(EINVAL, f"slot {slot:#x}")
    if id >= vm.limits.max_user_slots:
        raise MemslotError(EINVAL, f"slot id {id}")


def clear_dirty_log(vm: Vm, slot: int, first_page: int, num_pages: int, bitmap: bytes) -> None:
    """``KVM_CLEAR_DIRTY_LOG`` (see :meth:`memslots.vm.Vm.clear_dirty_log`)."""
    with vm.slots_lock:
        _check_slot_range(vm, slot)
        if first_page < 0 or first_page & 63:
            raise MemslotError(EINVAL, "first_page is not a multiple of 64")
        s = _logged_slot(vm, slot)
        n = s.npages
        if num_pages < 0 or first_page > n or num_pages > n - first_page:
            raise MemslotError(EINVAL, "range outside the slot")
        if num_pages < n - first_page and num_pages & 63:
            raise MemslotError(EINVAL, "num_pages is not a multiple of 64")
        nbytes = ((num_pages + 63) // 64) * 8
        if len(bitmap) < nbytes:
            raise MemslotError(14, "bitmap shorter than num_pages")  # EFAULT
        bm = s.dirty_bitmap
        assert bm is not None
        start = first_page // 8
        end = min(start + nbytes, len(bm))
        if end <= start:
            return
        old = int.from_bytes(bm[start:end], "little")
        mask = int.from_bytes(bitmap[: end - start], "little")
        bm[start:end] = (old & ~mask).to_bytes(end - start, "little")


def mark_page_dirty_in_slot(slot: Memslot | None, gfn: int) -> None:
    """``mark_page_dirty_in_slot``: set the bit of ``gfn`` if ``slot`` logs."""
    if slot is None or not slot.flags & KVM_MEM_LOG_DIRTY_PAGES:
        return
    bm = slot.dirty_bitmap
    if bm is None:
        return
    rel = gfn - slot.base_gfn
    if 0 <= rel < slot.npages:
        bm[rel >> 3] |= 1 << (rel & 7)


def mark_page_dirty(vm: Vm, gfn: int) -> None:
    """``mark_page_dirty(kvm, gfn)``: address space 0."""
    with vm.read_section():
        mark_page_dirty_in_slot(vm._memslots[0].gfn_to_memslot(gfn), gfn)
