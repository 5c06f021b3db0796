"""guest_memfd bindings (``KVM_MEM_GUEST_MEMFD`` slots, Linux 6.8+).

A slot created with ``KVM_MEM_GUEST_MEMFD`` through ``KVM_SET_USER_MEMORY_REGION2`` is
bound to a range of a guest_memfd file (``kvm_gmem_bind``). This module keeps, per VM, the
guest_memfd files the VM created and which page ranges of each are bound to which slot,
so the engine answers bind requests as the kernel does:

- EBADF: ``guest_memfd`` is not an open file descriptor;
- EINVAL: the file is not a guest_memfd of this VM, the offset is not page aligned, the
  range runs past the end of the file, or part of it is already bound to another slot.

Files are identified by ``(st_dev, st_ino)``, not by fd number, so a closed-and-reused fd
number is not mistaken for the file it used to name. A binding lasts until its slot is
deleted. (In the kernel, closing the guest_memfd also ends its bindings; no memslot call
can tell the difference, since the slot stays deletable either way.)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from errno import EBADF, EINVAL

from memslots.constants import PAGE_SHIFT
from memslots.errors import MemslotError, Refusal
from memslots.slot import Memslot


@dataclass
class GuestMemfdFile:
    """One guest_memfd: its size and the page ranges bound to slots (by ABI slot number)."""

    size: int
    flags: int = 0
    bindings: dict[int, tuple[int, int]] = field(default_factory=dict)


def fd_identity(fd: int) -> tuple[int, int]:
    """``(st_dev, st_ino)`` of an open descriptor of this process; EBADF otherwise."""
    try:
        st = os.fstat(fd)
    except (OSError, OverflowError) as exc:  # fget(fd) of a closed or huge fd: EBADF
        raise MemslotError(
            EBADF,
            f"guest_memfd {fd} is not open",
            Refusal("gmem-fd", "virt/kvm/guest_memfd.c: kvm_gmem_bind"),
        ) from exc
    return st.st_dev, st.st_ino


def check_create(size: int, flags: int, valid_flags: int, page_shift: int = PAGE_SHIFT) -> None:
    """``kvm_gmem_create``'s checks: EINVAL for flags outside ``valid_flags``, then for a
    size that is zero or not aligned to the kernel's page size (``1 << page_shift``)."""
    if flags & ~valid_flags:
        raise MemslotError(
            EINVAL,
            f"guest_memfd flags {flags:#x} not supported",
            Refusal("gmem-create-flags", "virt/kvm/guest_memfd.c: kvm_gmem_create"),
        )
    if size <= 0 or size & ((1 << page_shift) - 1):
        raise MemslotError(
            EINVAL,
            "guest_memfd size must be a non-zero page multiple",
            Refusal("gmem-create-size", "virt/kvm/guest_memfd.c: kvm_gmem_create"),
        )


class GuestMemfdTable:
    """The guest_memfd files of one VM and their bindings. Bind and unbind are O(b) in
    the number of bindings of the file (a VMM binds a handful per file)."""

    def __init__(self, identity: Callable[[int], tuple[int, int]] = fd_identity) -> None:
        self._files: dict[tuple[int, int], GuestMemfdFile] = {}
        #: what names a file behind a descriptor (EBADF for one that is not open): this
        #: process's ``fstat`` by default; a kernel elsewhere (under QEMU) gives its own
        self._identity = identity

    def register(self, fd: int, size: int, flags: int = 0) -> None:
        """Record ``fd`` (already created, by the kernel or by :meth:`create`) as a
        guest_memfd of ``size`` bytes of this VM."""
        self._files[self._identity(fd)] = GuestMemfdFile(size, flags)

    def create(
        self, size: int, flags: int = 0, valid_flags: int = 0, page_shift: int = PAGE_SHIFT
    ) -> int:
        """``KVM_CREATE_GUEST_MEMFD`` for the engine alone: :func:`check_create`, then a
        memfd of ``size`` bytes stands in for the guest_memfd. The caller owns the
        returned fd."""
        check_create(size, flags, valid_flags, page_shift)
        fd = os.memfd_create("memslots-guest-memfd", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        self.register(fd, size, flags)
        return fd

    def check_bind(
        self,
        fd: int,
        offset: int,
        npages: int,
        bound_errno: int = EINVAL,
        page_shift: int = PAGE_SHIFT,
    ) -> GuestMemfdFile:
        """Raise what ``kvm_gmem_bind`` would for binding ``npages`` pages of ``1 <<
        page_shift`` bytes at ``offset``; ``bound_errno`` is its answer for a range already
        bound (EINVAL; EEXIST on 7.x, ``VmLimits.gmem_bound_errno``)."""
        f = self._files.get(self._identity(fd))
        if f is None:
            raise MemslotError(
                EINVAL,
                f"fd {fd} is not a guest_memfd of this VM",
                Refusal("gmem-file", "virt/kvm/guest_memfd.c: kvm_gmem_bind"),
            )
        if offset & ((1 << page_shift) - 1) or offset + (npages << page_shift) > f.size:
            raise MemslotError(
                EINVAL,
                "guest_memfd range outside the file",
                Refusal("gmem-range", "virt/kvm/guest_memfd.c: kvm_gmem_bind"),
            )
        start = offset >> page_shift
        end = start + npages
        for s, e in f.bindings.values():
            if s < end and start < e:
                raise MemslotError(
                    bound_errno,
                    "guest_memfd range already bound",
                    Refusal("gmem-bound", "virt/kvm/guest_memfd.c: kvm_gmem_bind"),
                )
        return f

    def bind(self, slot: Memslot, fd: int, offset: int, bound_errno: int = EINVAL) -> None:
        """Bind ``slot`` to ``[offset, offset + size)`` of ``fd``; records it in
        ``slot.gmem``."""
        f = self.check_bind(fd, offset, slot.npages, bound_errno, slot.page_shift)
        start = offset >> slot.page_shift
        f.bindings[slot.slot] = (start, start + slot.npages)
        slot.gmem = (f, offset)

    @staticmethod
    def unbind(slot: Memslot) -> None:
        """Release the binding of ``slot`` (``kvm_gmem_unbind``), if any."""
        if slot.gmem is not None:
            f, _ = slot.gmem
            f.bindings.pop(slot.slot, None)
            slot.gmem = None

    def bound_pages(self) -> int:
        """Pages bound over all files (for invariant checks)."""
        return sum(e - s for f in self._files.values() for s, e in f.bindings.values())
