"""The random operations of a conformance run (:class:`OpGenerator`)."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence
from typing import ClassVar, Final, TypeVar

from memslots.constants import (
    KVM_DIRTY_LOG_INITIALLY_SET,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
    KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_MAX_NR_PAGES,
    KVM_MEM_READONLY,
    PAGE_SHIFT,
    PAGE_SIZE,
    U32_MAX,
    U64_MAX,
    X86_MAX_GFN,
)
from memslots.dirty_log import dirty_bitmap_bytes
from memslots.profiles import KernelProfile
from memslots.slot import Memslot
from memslots.tools.conform.ops import (
    CLOSED_FD,
    GMEM_FD,
    GMEM_FLAGS_FD,
    GMEM_SIZE,
    MEM_HVA,
    MEM_SIZE,
    OTHER_FD,
    ClearDirtyLog,
    CloseFd,
    CreateGuestMemfd,
    CreateVcpu,
    EnableDirtyRing,
    EnableManualDirtyLogProtect,
    GetDirtyLog,
    HarvestDirtyRing,
    MapMemory,
    Op,
    OpenDevNull,
    ResetDirtyRings,
    VcpuMarkPageDirty,
    VcpuWriteGuest,
)
from memslots.tools.traces import MemslotCall
from memslots.validate import VmLimits

__all__ = ["OpGenerator"]

T = TypeVar("T")

#: generated hvas: unmapped, legal user addresses (the kernel does not check the mapping);
#: a VM with a ring maps host memory there (:class:`MapMemory`)
_HVA_BASE: Final = MEM_HVA

#: ``KVM_ENABLE_CAP`` sizes of the dirty ring and their weights: valid ones (4 KiB to
#: 1 MiB, and u64 values that truncate to one), then every kind of refusal (0, below the
#: minimum, not a power of two, over 1 MiB (E2BIG), both at once, a u64 that truncates to 0)
_RING_SIZES: Final = (
    (4096, 10), (8192, 5), (65536, 12), (1 << 20, 2), ((1 << 32) + 4096, 3),
    ((1 << 63) + 65536, 2),
    (0, 3), (16, 1), (2048, 3), (4095, 1), (4097, 2), (12288, 3), (65537, 1),
    ((1 << 20) + 4096, 2), (2 << 20, 4), (3 << 20, 3), (1 << 31, 2), (1 << 32, 3), (U64_MAX, 1),
)  # fmt: skip
#: vCPU ids every kernel refuses (the limit, ``KVM_MAX_VCPU_IDS``, is at most 2^16 on x86)
_BAD_VCPU_IDS: Final = (1 << 20, U32_MAX)
#: hvas where some kernel draws its user-address line (4-level paging: 2^47; 5-level:
#: 2^56), tried on every kernel whatever its own line
_PAGING_LINES: Final = (1 << 47, 1 << 56)
#: how a VM with ring operations orders them: the ring before any vCPU (the usual VMM
#: order), vCPUs first (so the ring is refused), or anything goes
_RING_PLANS: Final = (("ring_first", 55), ("vcpu_first", 20), ("any", 25))


def _weighted(rng: random.Random, table: Sequence[tuple[T, float]]) -> T:
    return rng.choices([v for v, _ in table], [w for _, w in table])[0]


class OpGenerator:
    """Random operations for a conformance run, drawn with ``rng`` (a
    :class:`random.Random`: a seed gives the same run again).

    :meth:`prelude` gives the operations a fresh VM starts with (a guest_memfd and a file
    that is not one); :meth:`next` draws one operation from the VM's current slot table
    (the engine's, which agrees with the kernel while no disagreement has occurred).

    A VM started with ``prelude(ring=True)`` also gets the dirty ring's operations
    (:attr:`RING_KINDS`): ring enables with valid and invalid sizes, plain and ACQ_REL,
    again once on; vCPU creation with new, duplicate and out-of-range ids; resets;
    harvests; and host-side writes and marks through a vCPU (onto host memory mapped
    behind the generated hvas). Each such VM follows a plan drawn at its start: the ring
    before any vCPU (mostly), vCPUs first (the ring is then refused), or any order. Memslot
    and dirty-log operations go on between them as in every VM, so GET and CLEAR meet the
    ring on, and slots are created, moved and deleted under entries.
    Slot ids come mostly from ``0 .. ids-1`` and gpas from the first ``gpa_pages`` pages,
    so creates and moves collide often. Sizes stay small (a few pages to a few thousand):
    the kernel allocates per-page metadata for every accepted slot, and an accepted slot
    of 2^31-1 pages would cost 16 GiB. O(slots) per operation.
    """

    KINDS: ClassVar[tuple[tuple[str, float], ...]] = (
        ("create", 16),
        ("delete", 7),
        ("move", 9),
        ("flags", 7),
        ("noop", 3),
        ("modify_bad", 4),
        ("invalid", 14),
        ("gmem", 6),
        ("gmem_cycle", 0.3),
        ("gmem_flags", 1.5),
        ("get", 12),
        ("clear", 12),
        ("manual", 3),
    )
    #: what a VM with ring operations adds to :attr:`KINDS` (the weights of ``ring_enable``
    #: and ``vcpu`` follow the VM's plan; the per-vCPU kinds need a vCPU)
    RING_KINDS: ClassVar[tuple[tuple[str, float], ...]] = (
        ("ring_enable", 5),
        ("vcpu", 5),
        ("reset", 5),
        ("harvest", 4),
        ("vcpu_mark", 7),
        ("vcpu_write", 5),
    )
    #: at most this many vCPUs per VM (further creates are duplicates or bad ids)
    MAX_VCPUS: ClassVar[int] = 6

    def __init__(
        self,
        rng: random.Random,
        *,
        max_gfn: int | None = None,
        max_user_slots: int | None = None,
        limits: VmLimits | None = None,
        ids: int = 24,
        gpa_pages: int = 2048,
    ) -> None:
        self.rng = rng
        self.use_limits(limits or VmLimits(2, 32764, X86_MAX_GFN))
        if max_gfn is not None:
            self.max_gfn = max_gfn
        if max_user_slots is not None:
            self.max_user_slots = max_user_slots
        self.ids = ids
        self.gpa_pages = gpa_pages
        self._gmem_open = True
        self._gmem_flags_open = False
        #: the hva a generated call must name for a slot's ``userspace_addr`` (the run
        #: sets it to undo the session's :class:`MapMemory` aliasing)
        self.untranslate: Callable[[int], int] = _same
        self._ring = False
        self._plan = "any"
        self._enables = 0

    def use_limits(self, limits: VmLimits) -> None:
        """Draw for a VM with ``limits`` (the kernel's, as probed): slot ids up to its slot
        count, both address spaces where it has two, vCPU ids up to its limit and past
        it, hvas up to its user-address line and past it, its guest_memfd flags, and
        gpas, sizes, hvas, guest_memfd offsets and sizes and ring sizes in its page size
        (``limits.page_shift``; misaligned ones on purpose, also by multiples of 4 KiB
        where the page is larger)."""
        self.limits = limits
        self.max_gfn = limits.max_gfn
        self.max_user_slots = limits.max_user_slots
        self.task_size_max = limits.task_size_max
        #: the kernel's page: log2, bytes, mask
        self.shift = limits.page_shift
        self.page = 1 << self.shift
        self.page_mask = self.page - 1

    def vm_type(self, profile: KernelProfile | None) -> int:
        """The type of the next VM (0 while the kernel is not known yet): on arm64 mostly
        the default, else IPA sizes from 32 to 44 bits and sizes out of range (below 32,
        past the kernel's limit, bits outside the size); on x86 now and then a type the
        kernel may not offer.

        IPA sizes above 44 bits are left out of the VMs made: tearing down a VM with a
        48-bit IPA takes about 1 s under QEMU's emulation and with a 52-bit one 12 s to
        minutes (the stage-2 page tables are walked over the whole range), and nothing a
        memslot call answers depends on them beyond the highest gfn, which 32-44 bits
        exercise already. The limit itself is still probed: limit + 1 is refused."""
        rng = self.rng
        if profile is None or rng.random() < 0.6:
            return 0
        if profile.arch == "arm64":
            limit = profile.ipa_limit or 40
            return rng.choice((32, 33, 36, 40, 42, 44, 44, 31, 16, limit + 1, 0x100 | 40))
        return 0 if rng.random() < 0.8 else rng.choice((1, 2, 3, 4, 0x80))

    # -- building blocks -------------------------------------------------------------
    def prelude(self, ring: bool = False) -> list[Op]:
        """What every VM of the run starts with; with ``ring``, the VM gets the dirty
        ring's operations too, and host memory behind the generated hvas."""
        self._gmem_open = True
        self._gmem_flags_open = False
        self._ring = ring
        self._enables = 0
        ops: list[Op] = [CreateGuestMemfd(GMEM_FD, GMEM_SIZE), OpenDevNull(OTHER_FD)]
        if ring:
            self._plan = _weighted(self.rng, _RING_PLANS)
            ops.append(MapMemory(MEM_HVA, MEM_SIZE))
        return ops

    def _ua(self, s: Memslot) -> int:
        return self.untranslate(s.userspace_addr)

    def _id(self) -> int:
        """A slot number: mostly a small id; some in the last address space (x86's SMM
        one where the VM has two)."""
        r = self.rng.random()
        as_bits = 0
        if self.limits.nr_address_spaces > 1 and self.rng.random() < 0.1:
            as_bits = (self.limits.nr_address_spaces - 1) << 16
        if r < 0.02:
            return as_bits | (self.max_user_slots - 1)
        return as_bits | self.rng.randrange(self.ids)

    def _pages(self) -> int:
        """A slot's size in pages: up to 4096 pages of 4 KiB; with larger pages the
        largest sizes scale down, and none passes 16 MiB (what the ring's host memory
        leaves behind its hvas)."""
        rng = self.rng
        scale = self.shift - PAGE_SHIFT
        n = _weighted(
            rng,
            (
                (rng.randint(1, 8), 50),
                (rng.randint(9, 64), 25),
                (rng.choice((64, 128, 192, 256)), 8),
                (rng.randint(65, 512), 15),
                (rng.randint(513, 4096) >> scale, 2),
            ),
        )
        return min(n, (1 << 24) >> self.shift)

    def _gpa(self) -> int:
        return self.rng.randrange(self.gpa_pages) << self.shift

    def _misalign(self) -> int:
        """A non-zero offset below the page size: any, or (larger pages) a multiple of
        4 KiB, aligned for a 4 KiB kernel but not for this one."""
        rng = self.rng
        if self.page > PAGE_SIZE and rng.random() < 0.5:
            return rng.randrange(1, self.page >> PAGE_SHIFT) << PAGE_SHIFT
        return rng.randint(1, self.page_mask)

    def _hva(self, npages: int) -> int:
        rng = self.rng
        r = rng.random()
        if r < 0.03:
            return 0
        if r < 0.05:
            return self.task_size_max - (npages << self.shift)  # ends exactly at the limit
        if r < 0.07:  # around where another paging mode draws the line
            line = rng.choice(_PAGING_LINES)
            return line - (npages << self.shift) - rng.choice((0, self.page, -self.page))
        # within the first GiB of the mapped area, whatever the page size
        return _HVA_BASE + (rng.randrange(1 << (30 - self.shift)) << self.shift)

    def _random_flags(self) -> int:
        return self.rng.choice((0, 0, 1, 1, 2, 3))

    def _call(
        self,
        slot: int,
        flags: int,
        gpa: int,
        size: int,
        hva: int,
        *,
        v2: bool | None = None,
        offset: int | None = None,
        fd: int | None = None,
    ) -> MemslotCall:
        rng = self.rng
        if v2 is None:
            v2 = rng.random() < 0.2
        if not v2:
            return MemslotCall(slot, flags, gpa, size, hva)
        if offset is None:  # ignored by the kernel without KVM_MEM_GUEST_MEMFD
            offset = rng.choice((0, 0, 1, rng.randrange(1 << 40)))
        if fd is None:
            fd = rng.choice((0, 0, GMEM_FD, OTHER_FD, CLOSED_FD))
        return MemslotCall(
            slot, flags, gpa, size, hva, guest_memfd_offset=offset, guest_memfd=fd, v2=True
        )

    def _size(self, s: Memslot) -> int:
        return s.npages << self.shift

    # -- the operation kinds ---------------------------------------------------------
    def next(self, slots: Sequence[Memslot], vcpus: Sequence[int] = (), ring_size: int = 0) -> Op:
        """One random operation, given the VM's current slots, the ids of its vCPUs and
        its ring size (0: off)."""
        rng = self.rng
        if self._ring:
            kind = _weighted(rng, self.KINDS + self._ring_weights(vcpus, ring_size))
            if kind in _RING_METHODS:
                return _RING_METHODS[kind](self, slots, vcpus)
        else:
            kind = _weighted(rng, self.KINDS)
        plain = [s for s in slots if not s.flags & KVM_MEM_GUEST_MEMFD]
        if kind in ("delete", "move", "flags", "noop", "modify_bad") and not plain:
            kind = "create"
        method: Callable[[Sequence[Memslot], Sequence[Memslot]], Op] = getattr(self, f"_op_{kind}")
        return method(slots, plain)

    def _op_create(self, slots: Sequence[Memslot], plain: Sequence[Memslot]) -> Op:
        used = {s.id for s in slots}
        free = [i for i in range(self.ids) if i not in used]
        rng = self.rng
        id_ = rng.choice(free) if free and rng.random() < 0.85 else self._id()
        return self._new_call(id_, self._pages())

    def _new_call(self, id_: int, npages: int) -> MemslotCall:
        return self._call(
            id_, self._random_flags(), self._gpa(), npages << self.shift, self._hva(npages)
        )

    def _op_delete(self, slots: Sequence[Memslot], plain: Sequence[Memslot]) -> Op:
        rng = self.rng
        s = rng.choice(slots)
        # only memory_size 0 and the id matter; the rest must merely be legal
        return self._call(s.slot, self._random_flags(), self._gpa(), 0, self._hva(1))

    def _op_move(self, slots: Sequence[Memslot], plain: Sequence[Memslot]) -> Op:
        rng = self.rng
        s = rng.choice(plain)
        flags = s.flags ^ (KVM_MEM_LOG_DIRTY_PAGES if rng.random() < 0.3 else 0)
        gpa = self._gpa()
        if rng.random() < 0.3:  # a small step: overlaps its own old range
            step = rng.randint(-4, 4) << self.shift
            gpa = max(0, (s.base_gfn << self.shift) + step)
        return self._call(s.slot, flags, gpa, self._size(s), self._ua(s))

    def _op_flags(self, slots: Sequence[Memslot], plain: Sequence[Memslot]) -> Op:
        s = self.rng.choice(plain)
        return self._call(
            s.slot, s.flags ^ KVM_MEM_LOG_DIRTY_PAGES, s.base_gfn << self.shift, self._size(s),
            self._ua(s),
        )  # fmt: skip

    def _op_noop(self, slots: Sequence[Memslot], plain: Sequence[Memslot]) -> Op:
        s = self.rng.choice(plain)
        return self._call(s.slot, s.flags, s.base_gfn << self.shift, self._size(s), self._ua(s))

    def _op_modify_bad(self, slots: Sequence[Memslot], plain: Sequence[Memslot]) -> Op:
        rng = self.rng
        s = rng.choice(plain)
        gpa = s.base_gfn << self.shift if rng.random() < 0.5 else self._gpa()
        size, hva, flags = self._size(s), self._ua(s), s.flags
        what = rng.choice(("hva", "size", "readonly", "hva+size"))
        if "hva" in what:
            hva = self._hva(s.npages)
        if "size" in what:
            size = (s.npages + rng.choice((-1, 1, 7))) << self.shift
            size = size or self.page * 2
        if what == "readonly":
            flags ^= KVM_MEM_READONLY
        return self._call(s.slot, flags, gpa, size, hva)

    def _op_invalid(self, slots: Sequence[Memslot], plain: Sequence[Memslot]) -> Op:
        """A request (a create, a modify of an existing slot or a delete) with one or
        two validation rules broken."""
        rng = self.rng
        r = rng.random()
        if plain and r < 0.3:
            s = rng.choice(plain)
            call = self._call(s.slot, s.flags, self._gpa(), self._size(s), self._ua(s))
        elif slots and r < 0.45:
            s = rng.choice(slots)
            call = self._call(s.slot, self._random_flags(), self._gpa(), 0, self._hva(1))
        elif r < 0.6:  # a guest_memfd create: its own checks interleave with the others
            call = self._gmem_create(slots)
        else:
            call = self._new_call(self._id(), self._pages())
        for _ in range(1 if rng.random() < 0.75 else 2):
            call = self._break(call, slots)
        return call

    def _break(self, c: MemslotCall, slots: Sequence[Memslot]) -> MemslotCall:
        rng = self.rng
        rule = rng.choice(
            (
                "gpa", "size", "hva", "flag", "gmem_v1", "id", "as_id", "hva_end", "hva_last",
                "hva_kernel", "hva_noncanonical", "wrap", "max_pages", "max_gfn",
                "delete_missing",
            )
        )  # fmt: skip
        replace = dataclasses.replace
        shift = self.shift
        npages = max(c.memory_size >> shift, 1)
        if rule == "gpa":
            return replace(c, guest_phys_addr=c.guest_phys_addr | self._misalign())
        if rule == "size":
            return replace(c, memory_size=c.memory_size + self._misalign())
        if rule == "hva":
            bad = rng.choice((1, 8, 2048))
            if self.page > PAGE_SIZE and rng.random() < 0.5:
                bad = self._misalign()
            return replace(c, userspace_addr=c.userspace_addr | bad)
        if rule == "flag":
            return replace(c, flags=c.flags | (1 << rng.randint(3, 31)))
        if rule == "gmem_v1":
            return replace(c, flags=c.flags | KVM_MEM_GUEST_MEMFD, v2=False)
        if rule == "id":
            bad = rng.choice(
                (self.max_user_slots, 32766, 32767, 0xFFFF, rng.randint(32764, 0xFFFF))
            )
            return replace(c, slot=(c.slot & ~0xFFFF) | bad)
        if rule == "as_id":
            return replace(c, slot=(rng.choice((1, 2, 0xFFFF)) << 16) | (c.slot & 0xFFFF))
        if rule == "hva_end":  # the range runs past the user address limit
            return replace(
                c,
                userspace_addr=self.task_size_max - (rng.randint(0, npages - 1) << shift),
                memory_size=npages << shift,
            )
        if rule == "hva_last":
            return replace(c, userspace_addr=self.task_size_max)
        if rule == "hva_kernel":
            return replace(c, userspace_addr=rng.choice((0xFFFF800000000000, 0xFFFFFFFFFFFFF000)))
        if rule == "hva_noncanonical":
            return replace(c, userspace_addr=rng.choice((1 << 47, 1 << 56, 1 << 57, 1 << 62)))
        if rule == "wrap":
            back = rng.randint(0, npages - 1) << shift
            return replace(
                c, guest_phys_addr=(1 << 64) - self.page - back, memory_size=npages << shift
            )
        if rule == "max_pages":
            return replace(c, memory_size=(KVM_MEM_MAX_NR_PAGES + rng.randint(1, 1 << 20)) << shift)
        if rule == "max_gfn":  # ends 1 .. 2^20 pages past the highest gfn
            last = self.max_gfn + rng.choice((1, 2, rng.randint(1, 1 << 20)))
            first = max(last - npages + 1, 0)
            return replace(
                c, guest_phys_addr=first << shift, memory_size=(last - first + 1) << shift
            )
        # delete of a slot that does not exist
        used = {s.id for s in slots}
        missing = [i for i in range(self.ids) if i not in used] or [self.ids]
        return replace(c, slot=(c.slot & ~0xFFFF) | rng.choice(missing), memory_size=0)

    def _op_gmem(self, slots: Sequence[Memslot], plain: Sequence[Memslot]) -> Op:
        rng = self.rng
        bound = [s for s in slots if s.flags & KVM_MEM_GUEST_MEMFD]
        r = rng.random()
        if bound and r < 0.2:  # guest_memfd slots can only be deleted
            s = rng.choice(bound)
            flags = rng.choice(
                (KVM_MEM_GUEST_MEMFD, 0, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_GUEST_MEMFD | 1)
            )
            gpa = s.base_gfn << self.shift if rng.random() < 0.5 else self._gpa()
            return self._call(s.slot, flags, gpa, self._size(s), self._ua(s), v2=True)
        if bound and r < 0.35:  # deletes: the offset is checked when the flag is given
            s = rng.choice(bound)
            flags = rng.choice((0, KVM_MEM_GUEST_MEMFD))
            offsets: tuple[int, ...] = (0, 0, 0, 1, PAGE_SIZE, 1 << 63, U64_MAX & ~self.page_mask)
            if self.page > PAGE_SIZE:
                offsets += (self.page,)
            offset = rng.choice(offsets)
            return self._call(s.slot, flags, 0, 0, 0, v2=rng.random() < 0.7, offset=offset, fd=0)
        if plain and r < 0.42:  # the flag on a slot that has no binding
            s = rng.choice(plain)
            return self._call(
                s.slot, KVM_MEM_GUEST_MEMFD, s.base_gfn << self.shift, self._size(s),
                self._ua(s), v2=True, offset=0, fd=GMEM_FD,
            )  # fmt: skip
        return self._gmem_create(slots)

    def _gmem_create(self, slots: Sequence[Memslot]) -> MemslotCall:
        rng = self.rng
        used = {s.id for s in slots}
        free = [i for i in range(self.ids) if i not in used] or [self._id()]
        npages = rng.randint(1, 16)
        offset = _weighted(
            rng,
            (
                (rng.randrange(GMEM_SIZE >> self.shift) << self.shift, 80),
                (self._misalign(), 5),
                (GMEM_SIZE, 4),
                (1 << 63, 3),
                (U64_MAX & ~self.page_mask, 3),
            ),
        )
        fd = _weighted(rng, ((GMEM_FD, 80), (OTHER_FD, 7), (CLOSED_FD, 7), (0, 3), (1 << 31, 1)))
        flags = _weighted(
            rng,
            (
                (KVM_MEM_GUEST_MEMFD, 90),
                (KVM_MEM_GUEST_MEMFD | KVM_MEM_LOG_DIRTY_PAGES, 5),
                (KVM_MEM_GUEST_MEMFD | KVM_MEM_READONLY, 5),
            ),
        )
        return self._call(
            rng.choice(free), flags, self._gpa(), npages << self.shift, self._hva(npages),
            v2=True, offset=offset, fd=fd,
        )  # fmt: skip

    def _op_gmem_cycle(self, slots: Sequence[Memslot], plain: Sequence[Memslot]) -> Op:
        self._gmem_open = not self._gmem_open
        return CreateGuestMemfd(GMEM_FD, GMEM_SIZE) if self._gmem_open else CloseFd(GMEM_FD)

    def _op_gmem_flags(self, slots: Sequence[Memslot], plain: Sequence[Memslot]) -> Op:
        """``KVM_CREATE_GUEST_MEMFD`` with creation flags: each flag this kernel offers,
        bits it does not, with good and bad sizes (the flags are checked first), then the
        file closed again."""
        rng = self.rng
        self._gmem_flags_open = not self._gmem_flags_open
        if not self._gmem_flags_open:
            return CloseFd(GMEM_FLAGS_FD)
        valid = self.limits.guest_memfd_flags
        bits = [1 << b for b in range(64) if valid >> b & 1]
        flags = _weighted(
            rng,
            (
                (rng.choice(bits) if bits else 0, 40),
                (valid, 15),
                (1 << rng.randrange(64), 25),
                (valid | 1 << rng.randrange(8), 10),
                (0, 10),
            ),
        )
        sizes: tuple[tuple[int, float], ...] = (
            (GMEM_SIZE, 80), (0, 7), (self.page + 1, 7), (self.page, 6),
        )  # fmt: skip
        if self.page > PAGE_SIZE:  # aligned for a 4 KiB kernel only
            sizes += ((self.page + PAGE_SIZE, 3), (PAGE_SIZE, 3))
        size = _weighted(rng, sizes)
        return CreateGuestMemfd(GMEM_FLAGS_FD, size, flags)

    def _dirty_slot(self, slots: Sequence[Memslot]) -> tuple[int, Memslot | None]:
        rng = self.rng
        logging = [s for s in slots if s.flags & KVM_MEM_LOG_DIRTY_PAGES]
        r = rng.random()
        if logging and r < 0.7:
            s = rng.choice(logging)
            return s.slot, s
        if slots and r < 0.8:
            s = rng.choice(slots)
            return s.slot, s
        if r < 0.9:
            used = {s.id for s in slots}
            return next(i for i in range(self.ids + 1) if i not in used), None
        bad = rng.choice((self.max_user_slots, 32766, 0xFFFF, 1 << 16, (1 << 16) | 1, U32_MAX))
        return bad, None

    def _op_get(self, slots: Sequence[Memslot], plain: Sequence[Memslot]) -> Op:
        return GetDirtyLog(self._dirty_slot(slots)[0])

    def _op_clear(self, slots: Sequence[Memslot], plain: Sequence[Memslot]) -> Op:
        rng = self.rng
        slot, s = self._dirty_slot(slots)
        n = s.npages if s is not None else rng.choice((64, 100))
        first = _weighted(
            rng,
            (
                (rng.randrange(0, n + 1, 64) if n >= 64 else 0, 65),
                (n, 5),
                (rng.randrange(0, n + 1, 64) | rng.randint(1, 63), 10),
                (((n + 63) // 64 + 1) * 64, 8),
                (1 << 63, 2),
                (0, 10),
            ),
        )
        rest = max(n - first, 0)
        num = _weighted(
            rng,
            (
                (rest, 30),
                (rest // 64 * 64, 20),
                (rng.randrange(0, rest + 1, 64) if rest >= 64 else 0, 10),
                (0, 8),
                (rng.randint(0, rest) if rest else 1, 15),
                (rest + rng.randint(1, 64), 10),
                (U32_MAX, 2),
            ),
        )
        nbytes = dirty_bitmap_bytes(num) if num <= 1 << 16 else 0
        bitmap = _weighted(
            rng,
            (
                (rng.randbytes(nbytes), 70),
                (b"\xff" * nbytes, 15),
                (rng.randbytes(max(nbytes - 8, 0)), 10),
                (b"", 5),
            ),
        )
        return ClearDirtyLog(slot, first, num, bitmap)

    def _op_manual(self, slots: Sequence[Memslot], plain: Sequence[Memslot]) -> Op:
        enable, init = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_DIRTY_LOG_INITIALLY_SET
        flags = _weighted(
            self.rng,
            ((enable | init, 35), (enable, 25), (0, 25), (init, 5), (4, 4), (5, 3), (1 << 63, 3)),
        )
        return EnableManualDirtyLogProtect(flags)

    # -- the dirty ring ----------------------------------------------------------------
    def _ring_weights(self, vcpus: Sequence[int], ring_size: int) -> tuple[tuple[str, float], ...]:
        """:attr:`RING_KINDS` weighted for the VM's plan and state."""
        out: list[tuple[str, float]] = []
        for kind, weight in self.RING_KINDS:
            if kind == "ring_enable":
                if ring_size:
                    weight /= 4  # once on: a second enable, refused
                elif self._plan == "vcpu_first" and not vcpus:
                    weight = 0
                else:
                    weight *= 2
            elif kind == "vcpu":
                if self._plan == "ring_first" and not ring_size and self._enables < 3:
                    weight = 0
            elif kind in ("harvest", "vcpu_mark", "vcpu_write") and not vcpus:
                weight = 0
            out.append((kind, weight))
        return tuple(out)

    def _op_ring_enable(self, slots: Sequence[Memslot], vcpus: Sequence[int]) -> Op:
        self._enables += 1
        rng = self.rng
        sizes: tuple[tuple[int, float], ...] = _RING_SIZES
        if self.page > PAGE_SIZE:  # around this kernel's minimum, one page
            page = self.page
            sizes += ((page, 10), (page * 2, 5), (page // 2, 5), (page + PAGE_SIZE, 2))
        return EnableDirtyRing(_weighted(rng, sizes), rng.random() < 0.35)

    def _op_vcpu(self, slots: Sequence[Memslot], vcpus: Sequence[int]) -> Op:
        rng = self.rng
        r = rng.random()
        if r < 0.7 and len(vcpus) < self.MAX_VCPUS:
            free = [i for i in range(8) if i not in vcpus]
            if rng.random() < 0.9 and free:
                return CreateVcpu(rng.choice(free))
            top = self.limits.max_vcpu_ids
            return CreateVcpu(rng.choice((top - 1, rng.randrange(8, max(top, 9)))))
        if r < 0.85 and vcpus:
            return CreateVcpu(rng.choice(vcpus))  # EEXIST
        # past this kernel's limit, and where other kernels draw it (1023, 4096, 16384)
        top = self.limits.max_vcpu_ids
        return CreateVcpu(rng.choice((top, top + 1, 1023, 4096, 16384, *_BAD_VCPU_IDS)))

    def _op_reset(self, slots: Sequence[Memslot], vcpus: Sequence[int]) -> Op:
        return ResetDirtyRings()

    def _op_harvest(self, slots: Sequence[Memslot], vcpus: Sequence[int]) -> Op:
        return HarvestDirtyRing(self.rng.choice(vcpus))

    def _ring_gfn(self, slots: Sequence[Memslot]) -> int:
        """A gfn to write: mostly in a logging slot, sometimes in any slot or a hole."""
        rng = self.rng
        logging = [s for s in slots if s.flags & KVM_MEM_LOG_DIRTY_PAGES]
        r = rng.random()
        if logging and r < 0.7:
            s = rng.choice(logging)
        elif slots and r < 0.85:
            s = rng.choice(slots)
        else:
            return rng.randrange(self.gpa_pages)
        return s.base_gfn + rng.randrange(s.npages)

    def _op_vcpu_mark(self, slots: Sequence[Memslot], vcpus: Sequence[int]) -> Op:
        return VcpuMarkPageDirty(self.rng.choice(vcpus), self._ring_gfn(slots))

    def _op_vcpu_write(self, slots: Sequence[Memslot], vcpus: Sequence[int]) -> Op:
        rng = self.rng
        page = self.page
        gpa = self._ring_gfn(slots) << self.shift
        if rng.random() < 0.5:
            gpa += rng.randrange(page)
        length = _weighted(
            rng,
            (
                (rng.randint(1, 16), 30),
                (page, 20),
                (rng.randint(1, 3 * page), 15),
                (rng.randint(2, 64) * page, 15),
            ),
        )
        return VcpuWriteGuest(rng.choice(vcpus), gpa, length)


def _same(hva: int) -> int:
    return hva


_RING_METHODS: Final[dict[str, Callable[[OpGenerator, Sequence[Memslot], Sequence[int]], Op]]] = {
    kind: getattr(OpGenerator, f"_op_{kind}") for kind, _ in OpGenerator.RING_KINDS
}
