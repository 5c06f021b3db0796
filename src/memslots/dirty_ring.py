"""The dirty ring: ``KVM_CAP_DIRTY_LOG_RING`` and ``KVM_CAP_DIRTY_LOG_RING_ACQ_REL``.

Since Linux 5.11 a VMM may track dirty pages with one ring per vCPU instead of one bitmap
per slot (``virt/kvm/dirty_ring.c``). A ring is an array of ``struct kvm_dirty_gfn``
(16 bytes: ``u32 flags``, ``u32 slot``, ``u64 offset``) that KVM fills and userspace
empties; harvesting costs what was dirtied, not what exists.

The ABI, as this module models it (the kernel functions are named in each docstring):

- **Enabling** (:func:`enable_dirty_ring`, ``kvm_vm_ioctl_enable_dirty_log_ring``): the
  size is in bytes per vCPU, truncated to u32 first; then, in this order, EINVAL for 0 or
  a size that is not a power of two, EINVAL below ``max(PAGE_SIZE, 64 entries * 16)``
  (the kernel's page size, ``VmLimits.page_shift``: 4, 16 or 64 KiB), E2BIG above 65536
  entries (1 MiB), EINVAL when a ring is already on (either capability: they share
  ``kvm->dirty_ring_size``), EINVAL once any vCPU was ever created (``kvm->created_vcpus``
  never drops, not even when a vCPU fd is closed). A failed call
  changes nothing. ACQ_REL differs only in its name: x86 is TSO, and the kernel side is the
  same code for both. ``KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP`` is not available on x86
  (:func:`enable_dirty_ring_with_bitmap` is always EINVAL).
- **State** (:class:`DirtyRing`, ``struct kvm_dirty_ring``): free-running u32 indexes
  ``dirty_index`` (next push) and ``reset_index`` (next entry to reset); entry ``i`` lives
  at ``i & (size - 1)``; ``used = dirty_index - reset_index``; ``soft_limit = size - 64``
  (the 64 reserved entries; x86 adds its PML buffer, 512, only with Intel PML, which
  this model, like an AMD or PVM host, does not have).
- **Push** (:meth:`DirtyRing.push`, ``kvm_dirty_ring_push`` from
  ``mark_page_dirty_in_slot``): a write by a vCPU to a slot with ``KVM_MEM_LOG_DIRTY_PAGES``
  writes ``(as_id << 16 | id, gfn - base_gfn)`` at ``dirty_index``, then flags = DIRTY.
  No dedup, no check that the slot still exists later; past the hard limit the oldest
  un-reset entry is overwritten (the kernel only WARNs; counted in
  :attr:`DirtyRing.overwrites`). The push that makes ``used >= soft_limit`` raises the
  soft-full request, which :meth:`DirtyRing.check_request` answers as ``vcpu_enter_guest``
  does: ``KVM_EXIT_DIRTY_RING_FULL`` while the ring is still soft-full, else the request
  is dropped. A write with no vCPU (``vm.write_guest``) is never pushed: with the ring on
  it reaches a dirty bitmap only if the slot still has one from before the ring.
- **Harvest** (:meth:`DirtyRing.harvest`, the userspace side of api.rst): from the VMM's
  own fetch index, every entry in state DIRTY (``flags & 3 == 1``) is read and marked
  RESET, in ring order, stopping at the first that is not.
- **Reset** (:func:`reset_dirty_rings`, ``kvm_vm_ioctl_reset_dirty_pages`` and
  ``kvm_dirty_ring_reset``): EINVAL without a ring; else every vCPU's ring, in creation
  order, from ``reset_index`` while ``flags & RESET``: flags = 0, counted. The walk stops at
  the first entry not marked (marks after it wait). Entries are then grouped as the kernel
  does (same slot, within 64 pages of each other) and each group is validated and re-armed
  (``kvm_reset_dirty_gfn``): an address space or id out of range, a slot that no longer
  exists, or a group reaching past the slot's ``npages`` is skipped silently. Validation
  never changes the count. Entries are never touched by memslot changes: after DELETE
  they are counted and skipped; after MOVE they name the same slot and slot-relative pages.
- **Memslots** (in :mod:`memslots.vm`): with a ring on, ``KVM_GET_DIRTY_LOG`` and
  ``KVM_CLEAR_DIRTY_LOG`` fail with ENXIO before any other check
  (``!kvm_use_dirty_bitmap()``), and a slot that turns logging on gets no bitmap; a slot
  that logged before the ring keeps its bitmap until logging goes off.

**Push modes** (:class:`PushMode`, ``vm.dirty_rings.push_mode``). When a guest write pushes
depends on how KVM sees it:

- :attr:`PushMode.EVERY_WRITE` (the default): every write pushes an entry. This is what a
  guest running in KVM's instruction emulator does (every emulated store goes through
  ``kvm_vcpu_write_guest``), which is how real-mode guests run on the machine this
  project is checked on, and what ``kvm_vcpu_write_guest`` itself always does.
- :attr:`PushMode.FIRST_WRITE`: hardware-MMU KVM. A logged page is write-protected; the
  first write faults, pushes and makes the page writable, so later writes push nothing
  until a reset re-arms (write-protects) it again. Re-arming happens only for the groups
  the reset validates (so one bad entry within 64 pages of good ones leaves the good ones
  writable, as in the kernel); a slot created, moved or given logging starts armed.

**Concurrency.** A ring has one producer (its vCPU's thread) and one consumer (the thread
that harvests), like the kernel's: a push writes the slot and offset before the flags, a
harvest reads the flags before the slot and offset and writes RESET after both, and every
store is a single store of the interpreter, so under the GIL each side sees the other's
stores in program order. :func:`reset_dirty_rings` holds ``vm.slots_lock``, as the kernel
holds ``slots_lock``; it touches only entries marked RESET and ``reset_index``, never what
a concurrent push touches. Not modelled: the ioctl stopping early on a pending signal
(it still returns the count so far), and ``KVM_DIRTY_LOG_INITIALLY_SET`` leaving pages
writable in :attr:`PushMode.FIRST_WRITE` (do not combine it with the ring).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Iterator
from errno import E2BIG, EINVAL
from typing import TYPE_CHECKING, Final, NamedTuple, Protocol

from memslots import dirty_log as _dirty_log
from memslots.constants import (
    KVM_DIRTY_GFN_F_DIRTY,
    KVM_DIRTY_GFN_F_MASK,
    KVM_DIRTY_GFN_F_RESET,
    KVM_DIRTY_GFN_SIZE,
    KVM_DIRTY_RING_MAX_ENTRIES,
    KVM_DIRTY_RING_RSVD_ENTRIES,
    KVM_MEM_LOG_DIRTY_PAGES,
    U32_MAX,
    U64_MAX,
)
from memslots.errors import MemslotError, Refusal, require
from memslots.slot import Memslot
from memslots.view import VmView

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = [
    "KVM_DIRTY_RING_MAX_BYTES",
    "DirtyGfn",
    "DirtyRing",
    "DirtyRings",
    "PushMode",
    "RingVmView",
    "enable_dirty_ring",
    "enable_dirty_ring_with_bitmap",
    "kvm_use_dirty_bitmap",
    "reset_batches",
    "reset_dirty_rings",
    "validate_reset_batch",
]

#: the largest ring in bytes: what ``KVM_CHECK_EXTENSION`` answers for both capabilities
KVM_DIRTY_RING_MAX_BYTES: Final = KVM_DIRTY_RING_MAX_ENTRIES * KVM_DIRTY_GFN_SIZE

_ENTRY: Final = KVM_DIRTY_GFN_SIZE
#: flags byte -> 1 if the entry is published and not harvested (state 01), else 0
_IS_DIRTY: Final = bytes(int(b & KVM_DIRTY_GFN_F_MASK == KVM_DIRTY_GFN_F_DIRTY) for b in range(256))
#: flags byte -> 1 if userspace marked the entry harvested (RESET set), else 0
_IS_HARVESTED: Final = bytes(int(bool(b & KVM_DIRTY_GFN_F_RESET)) for b in range(256))
#: flags byte -> 1 if KVM published the entry (DIRTY set, harvested or not), else 0
_IS_PUBLISHED: Final = bytes(int(bool(b & KVM_DIRTY_GFN_F_DIRTY)) for b in range(256))
#: flags byte -> the same byte with RESET set
_OR_RESET: Final = bytes(b | KVM_DIRTY_GFN_F_RESET for b in range(256))
_FIRST_CHUNK: Final = 64
_BITS_PER_LONG: Final = 64
_S64_SIGN: Final = 1 << 63


class PushMode(enum.Enum):
    """When a vCPU's write to a logged page pushes an entry (see the module docstring)."""

    #: every write pushes (KVM's instruction emulator, ``kvm_vcpu_write_guest``)
    EVERY_WRITE = "every-write"
    #: the first write since the page was (re-)armed pushes (hardware MMU, write-protect)
    FIRST_WRITE = "first-write"


class DirtyGfn(NamedTuple):
    """One ``struct kvm_dirty_gfn`` as userspace reads it."""

    flags: int
    slot: int
    offset: int


class DirtyRing:
    """One vCPU's ring: ``struct kvm_dirty_ring`` plus the VMM's fetch index.

    ``DirtyRing(nbytes)`` makes a zeroed ring of ``nbytes // 16`` entries (a power of two)
    in a :class:`bytearray` laid out exactly as the kernel's; ``DirtyRing(nbytes, buffer)``
    works on an existing buffer instead, such as a ring ``mmap``-ed from a vCPU fd, whose
    kernel side then runs in the kernel (only :meth:`harvest`, :meth:`entry`,
    :meth:`write_entry` and the counting helpers make sense on it).

    Kernel side: :attr:`dirty_index`, :attr:`reset_index` (free-running u32),
    :attr:`soft_limit`, :attr:`soft_full_request`, :meth:`push`, :meth:`check_request`,
    :meth:`reset`. Userspace side: :attr:`fetch_index`, :meth:`harvest`. Every operation
    is O(entries it touches).
    """

    __slots__ = (
        "_b",
        "_u32",
        "_u64",
        "dirty_index",
        "fetch_index",
        "nbytes",
        "overwrites",
        "reset_index",
        "size",
        "soft_full_request",
        "soft_limit",
    )

    def __init__(
        self,
        nbytes: int,
        buffer: Buffer | None = None,
        *,
        rsvd_entries: int = KVM_DIRTY_RING_RSVD_ENTRIES,
    ) -> None:
        size = nbytes // _ENTRY
        if size <= 0 or size & (size - 1) or nbytes % _ENTRY:
            raise ValueError(f"a ring of {nbytes} bytes is not a power-of-two number of entries")
        view = memoryview(bytearray(nbytes) if buffer is None else buffer).cast("B")
        if len(view) < nbytes or view.readonly:
            raise ValueError(f"the ring needs {nbytes} writable bytes, the buffer has {len(view)}")
        view = view[:nbytes]
        self._b = view
        self._u32 = view.cast("I")
        self._u64 = view.cast("Q")
        #: bytes of the ring (``kvm->dirty_ring_size``)
        self.nbytes = nbytes
        #: entries in the ring
        self.size = size
        #: ``used`` at which a push raises the soft-full request
        self.soft_limit = size - rsvd_entries
        #: free-running u32: the next push goes to entry ``dirty_index & (size - 1)``
        self.dirty_index = 0
        #: free-running u32: the next entry the kernel resets
        self.reset_index = 0
        #: ``KVM_REQ_DIRTY_RING_SOFT_FULL`` is pending
        self.soft_full_request = False
        #: userspace's free-running index: the next entry to harvest
        self.fetch_index = 0
        #: pushes made while the ring was full (each overwrote an un-reset entry)
        self.overwrites = 0

    # -- indexes --------------------------------------------------------------------
    @property
    def used(self) -> int:
        """``kvm_dirty_ring_used``: ``dirty_index - reset_index`` (u32). O(1)."""
        return (self.dirty_index - self.reset_index) & U32_MAX

    @property
    def soft_full(self) -> bool:
        """``kvm_dirty_ring_soft_full``: ``used >= soft_limit``. O(1)."""
        return self.used >= self.soft_limit

    @property
    def full(self) -> bool:
        """``kvm_dirty_ring_full``: ``used >= size`` (the next push overwrites). O(1)."""
        return self.used >= self.size

    # -- the userspace view ---------------------------------------------------------
    def entry(self, index: int) -> DirtyGfn:
        """The entry at free-running ``index`` (taken modulo the size). O(1)."""
        i = index & (self.size - 1)
        return DirtyGfn(self._u32[4 * i], self._u32[4 * i + 1], self._u64[2 * i + 1])

    def write_entry(
        self,
        index: int,
        *,
        flags: int | None = None,
        slot: int | None = None,
        offset: int | None = None,
    ) -> None:
        """Write fields of the entry at ``index`` as userspace may (any value that fits
        the field): tests use it to mark entries out of order or to corrupt them. O(1)."""
        i = index & (self.size - 1)
        if slot is not None:
            self._u32[4 * i + 1] = slot
        if offset is not None:
            self._u64[2 * i + 1] = offset
        if flags is not None:
            self._u32[4 * i] = flags

    def entries(self) -> list[DirtyGfn]:
        """Every entry in array order (a snapshot, for tests and debugging). O(size)."""
        return [self.entry(i) for i in range(self.size)]

    def _run(self, start: int, table: bytes) -> tuple[int, bytes]:
        """From entry ``start`` (array index) towards the array's end: how many entries in
        a row have ``table[flags & 0xff] == 1``, and their flags' low bytes. Reads a
        growing window, so the cost follows the run, not the ring. Only the low byte of
        ``flags`` is read: every bit the protocol defines lives there."""
        b = self._b
        limit = self.size - start
        n = min(_FIRST_CHUNK, limit)
        got = 0
        lows: list[bytes] = []
        while True:
            lo = (start + got) * _ENTRY
            window = b[lo : lo + n * _ENTRY : _ENTRY].tobytes()
            k = window.translate(table).find(b"\0")
            if k >= 0:
                lows.append(window[:k])
                return got + k, b"".join(lows)
            lows.append(window)
            got += n
            if got >= limit:
                return got, b"".join(lows)
            n = min(n * 2, limit - got)

    def _fields(self, start: int, end: int) -> Iterator[tuple[int, int]]:
        """``(slot, offset)`` of array entries ``start .. end - 1``, read in bulk."""
        slots = self._u32[4 * start + 1 : 4 * end : 4].tolist()
        offsets = self._u64[2 * start + 1 : 2 * end : 2].tolist()
        return zip(slots, offsets, strict=True)

    def harvest(self) -> list[tuple[int, int]]:
        """Userspace harvest (api.rst, "dirty ring"): ``(slot, offset)`` of every entry from
        :attr:`fetch_index` in state DIRTY, in ring order, each then marked RESET; stops at
        the first entry that is not DIRTY. O(entries harvested).

        The acquire/release discipline of ``KVM_CAP_DIRTY_LOG_RING_ACQ_REL``, batched: the
        flags of a run are read first (acquire), then its slots and offsets, then RESET is
        stored into each flags (release), so no entry's fields are read before its flags
        and no RESET is stored before that entry's fields were read. On x86 (TSO) program
        order is enough: loads are not reordered with older loads, and stores are not
        reordered with older loads; each step here is a separate memory access of the
        interpreter, which no compiler reorders across. A weakly ordered host (arm64,
        POWER) needs a real load-acquire of the flags (or a read barrier after them) and
        a store-release (or a full barrier before the RESET stores); Python offers
        neither, so there the flags must go through a tiny compiled helper
        (``__atomic_load_n``/``__atomic_store_n`` with acquire/release).
        """
        out: list[tuple[int, int]] = []
        size = self.size
        f = self.fetch_index
        b = self._b
        while True:
            start = f & (size - 1)
            k, lows = self._run(start, _IS_DIRTY)
            if not k:
                break
            end = start + k
            out.extend(self._fields(start, end))
            b[start * _ENTRY : end * _ENTRY : _ENTRY] = lows.translate(_OR_RESET)
            f = (f + k) & U32_MAX
            if end < size:
                break
        self.fetch_index = f
        return out

    def _count(self, since: int, limit: int, table: bytes) -> int:
        """How many entries in a row from free-running ``since`` pass ``table``, at most
        ``limit``, wrapping around the array. O(count)."""
        total, i = 0, since
        while total < limit:
            start = i & (self.size - 1)
            k, _ = self._run(start, table)
            total += k
            i += k
            if start + k < self.size:
                break
        return min(total, limit)

    def count_harvested(self) -> int:
        """What :meth:`reset` would count now, changing nothing: the entries from
        :attr:`reset_index` on that have RESET set, up to the first that has not. O(count)."""
        return self._count(self.reset_index, self.size, _IS_HARVESTED)

    def count_published(self, since: int, limit: int) -> int:
        """How many entries from free-running ``since`` on have DIRTY set (published by
        KVM, harvested or not), at most ``limit``. O(count)."""
        return self._count(since, limit, _IS_PUBLISHED)

    # -- the kernel side ------------------------------------------------------------
    def push(self, slot: int, offset: int) -> None:
        """``kvm_dirty_ring_push``: publish ``(slot, offset)`` at :attr:`dirty_index`
        (fields first, then flags = DIRTY), advance it, and raise the soft-full request
        once ``used >= soft_limit``. A full ring is overwritten (counted in
        :attr:`overwrites`), as the kernel does after its WARN. O(1)."""
        if self.used >= self.size:
            self.overwrites += 1
        i = self.dirty_index & (self.size - 1)
        self._u32[4 * i + 1] = slot
        self._u64[2 * i + 1] = offset
        self._u32[4 * i] = KVM_DIRTY_GFN_F_DIRTY
        self.dirty_index = (self.dirty_index + 1) & U32_MAX
        if self.used >= self.soft_limit:
            self.soft_full_request = True

    def check_request(self) -> bool:
        """``kvm_dirty_ring_check_request``, what ``vcpu_enter_guest`` does before entering
        the guest: True (``KVM_EXIT_DIRTY_RING_FULL``, and the request stays pending) if
        the soft-full request is pending and the ring is still soft-full; otherwise the
        request is dropped and the guest may run. O(1)."""
        if not self.soft_full_request:
            return False
        self.soft_full_request = False
        if self.soft_full:
            self.soft_full_request = True
            return True
        return False

    def reset(self, reset_gfn: Callable[[int, int, int], None] | None = None) -> int:
        """``kvm_dirty_ring_reset``: from :attr:`reset_index`, while the entry has RESET
        set, clear its flags (0) and count it; stop at the first that has not. Then hand
        each group of reset entries to ``reset_gfn(slot, offset, mask)`` (see
        :func:`reset_batches`; None skips grouping, which only matters for re-arming).
        Returns the count. O(count)."""
        size = self.size
        count = 0
        gathered: list[tuple[int, int]] = []
        u32 = self._u32
        while count < size:
            start = self.reset_index & (size - 1)
            k, _ = self._run(start, _IS_HARVESTED)
            if not k:
                break
            end = start + k
            if reset_gfn is not None:
                gathered.extend(self._fields(start, end))
            u32[4 * start : 4 * end : 4] = memoryview(bytes(4 * k)).cast("I")
            self.reset_index = (self.reset_index + k) & U32_MAX
            count += k
            if end < size:
                break
        if reset_gfn is not None:
            for batch in reset_batches(gathered):
                reset_gfn(*batch)
        return count

    def release(self) -> None:
        """Release the views of the buffer (so an ``mmap`` under it can be closed); the
        ring is unusable afterwards."""
        for v in (self._u64, self._u32, self._b):
            v.release()

    def __repr__(self) -> str:
        return (
            f"DirtyRing(size={self.size}, dirty_index={self.dirty_index}, "
            f"reset_index={self.reset_index}, fetch_index={self.fetch_index})"
        )


def reset_batches(entries: Iterable[tuple[int, int]]) -> Iterator[tuple[int, int, int]]:
    """The groups ``kvm_dirty_ring_reset`` hands to ``kvm_reset_dirty_gfn``, in order:
    ``(slot, offset, mask)`` with bit ``i`` of the 64-bit ``mask`` standing for page
    ``offset + i``. An entry joins the current group when it names the same slot and its
    offset fits the group's 64-page window, forwards (``0 <= delta < 64``) or backwards
    (the window's base moves down if no bit falls off the top); otherwise the group is
    done and the entry starts the next. Offsets are u64 and subtract as s64. O(entries)."""
    cur_slot = cur_offset = mask = 0
    for slot, offset in entries:
        if mask:
            if slot == cur_slot:
                delta = (offset - cur_offset) & U64_MAX
                if delta & _S64_SIGN:
                    delta -= 1 << 64
                if 0 <= delta < _BITS_PER_LONG:
                    mask |= 1 << delta
                    continue
                if -_BITS_PER_LONG < delta < 0 and ((mask << -delta) & U64_MAX) >> -delta == mask:
                    cur_offset = offset
                    mask = ((mask << -delta) & U64_MAX) | 1
                    continue
            yield cur_slot, cur_offset, mask
        cur_slot, cur_offset, mask = slot, offset, 1
    if mask:
        yield cur_slot, cur_offset, mask


def validate_reset_batch(vm: VmView, slot: int, offset: int, mask: int) -> Memslot | None:
    """``kvm_reset_dirty_gfn``'s checks: the memslot a group re-arms, or None when the
    kernel skips it silently (address space or id out of range, no such slot, or
    ``offset + fls(mask)`` (u64) at or past ``npages``). Caller holds ``vm.slots_lock``.
    O(1)."""
    as_id, id = slot >> 16, slot & 0xFFFF
    if as_id >= vm.nr_address_spaces or id >= vm.limits.max_user_slots:
        return None
    memslot = vm.memslots(as_id).id_to_memslot(id)
    if memslot is None or (offset + mask.bit_length() - 1) & U64_MAX >= memslot.npages:
        return None
    return memslot


class DirtyRings:
    """A VM's dirty-ring state shared by its vCPUs' rings (``vm.dirty_rings``): the size
    (``kvm->dirty_ring_size``), which capability enabled it, the :class:`PushMode` and,
    in :attr:`PushMode.FIRST_WRITE`, which pages a push made writable."""

    __slots__ = ("_writable", "acq_rel", "push_mode", "size")

    def __init__(self, push_mode: PushMode = PushMode.EVERY_WRITE) -> None:
        #: bytes per vCPU ring; 0 while the ring is off
        self.size = 0
        #: whether ``KVM_CAP_DIRTY_LOG_RING_ACQ_REL`` enabled it
        self.acq_rel = False
        #: when a vCPU's write pushes; may be changed at any time
        self.push_mode = push_mode
        #: FIRST_WRITE: slot number -> (the slot object, pages pushed and not re-armed)
        self._writable: dict[int, tuple[Memslot, set[int]]] = {}

    def new_ring(self) -> DirtyRing | None:
        """The ring a vCPU created now gets (``kvm_dirty_ring_alloc``): None while off."""
        return DirtyRing(self.size) if self.size else None

    def first_write(self, slot: Memslot, offset: int) -> bool:
        """Whether a vCPU's write to page ``offset`` of ``slot`` pushes in the current mode:
        always in EVERY_WRITE; in FIRST_WRITE only if the page is armed (it is then
        writable until re-armed). A slot object that is not the one recorded for its
        number (created, moved or re-logged since) starts armed. O(1)."""
        if self.push_mode is PushMode.EVERY_WRITE:
            return True
        state = self._writable.get(slot.slot)
        if state is None or state[0] is not slot:
            state = (slot, set())
            self._writable[slot.slot] = state
        pages = state[1]
        if offset in pages:
            return False
        pages.add(offset)
        return True

    def rearm(self, slot: Memslot, offset: int, mask: int) -> None:
        """``kvm_arch_mmu_enable_log_dirty_pt_masked``: write-protect pages ``offset + i``
        (u64) for each bit ``i`` of ``mask``, so that their next write pushes again."""
        state = self._writable.get(slot.slot)
        if state is None or state[0] is not slot:
            return
        pages = state[1]
        while mask:
            low = mask & -mask
            pages.discard((offset + low.bit_length() - 1) & U64_MAX)
            mask ^= low

    def is_writable(self, slot: Memslot, offset: int) -> bool:
        """FIRST_WRITE: whether page ``offset`` of ``slot`` was pushed and not re-armed."""
        state = self._writable.get(slot.slot)
        return state is not None and state[0] is slot and offset in state[1]

    def __repr__(self) -> str:
        return f"DirtyRings(size={self.size}, acq_rel={self.acq_rel}, mode={self.push_mode.value})"


class RingVmView(VmView, Protocol):
    """What the dirty ring needs of a VM: :class:`memslots.view.VmView` and these."""

    dirty_rings: DirtyRings
    #: ``kvm->created_vcpus``: vCPUs ever created
    created_vcpus: int


# ======================================================================================
# The VM ioctls
# ======================================================================================
def kvm_use_dirty_bitmap(vm: RingVmView) -> bool:
    """``kvm_use_dirty_bitmap``: dirty bitmaps are in use unless a ring is on (x86 has no
    ``KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP``). O(1)."""
    return not vm.dirty_rings.size


def enable_dirty_ring(vm: RingVmView, size: int, acq_rel: bool = False) -> None:
    """``KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING[_ACQ_REL], size)``, the checks of
    ``kvm_vm_ioctl_enable_dirty_log_ring`` in the kernel's order (module docstring).
    ``size`` is ``args[0]``, a u64 (EINVAL outside it), truncated to u32. Holds
    ``vm.slots_lock``, which also serialises vCPU creation. O(1)."""
    limits = vm.limits
    # kvm_vm_ioctl_enable_cap_generic: a capability the kernel does not offer is EINVAL
    # whatever the size (no ring before 5.11, no ACQ_REL before 6.1; arm64 offers only
    # ACQ_REL, its plain KVM_CAP_DIRTY_LOG_RING answering 0)
    if not (limits.dirty_ring_acq_rel if acq_rel else limits.dirty_ring_max):
        cap = "KVM_CAP_DIRTY_LOG_RING" + ("_ACQ_REL" if acq_rel else "")
        raise MemslotError(
            EINVAL,
            f"{cap} is not offered by this kernel",
            Refusal("ring-cap", "virt/kvm/kvm_main.c: kvm_vm_ioctl_enable_cap_generic"),
        )
    if not 0 <= size <= U64_MAX:
        raise MemslotError(
            EINVAL,
            f"ring size {size:#x} does not fit u64",
            Refusal("ring-size", "virt/kvm/kvm_main.c: kvm_vm_ioctl_enable_dirty_log_ring"),
        )
    size &= U32_MAX
    rsvd = KVM_DIRTY_RING_RSVD_ENTRIES
    if not size or size & (size - 1):
        raise MemslotError(
            EINVAL,
            f"ring size {size:#x} is not a power of two",
            Refusal("ring-size", "virt/kvm/kvm_main.c: kvm_vm_ioctl_enable_dirty_log_ring"),
        )
    # the kernel's PAGE_SIZE: 16 or 64 KiB on such arm64 kernels
    if size < rsvd * KVM_DIRTY_GFN_SIZE or size < 1 << limits.page_shift:
        raise MemslotError(
            EINVAL,
            f"ring size {size:#x} is below the minimum",
            Refusal("ring-size", "virt/kvm/kvm_main.c: kvm_vm_ioctl_enable_dirty_log_ring"),
        )
    if size > KVM_DIRTY_RING_MAX_BYTES:
        raise MemslotError(
            E2BIG,
            f"ring size {size:#x} is over {KVM_DIRTY_RING_MAX_BYTES:#x}",
            Refusal("ring-size", "virt/kvm/kvm_main.c: kvm_vm_ioctl_enable_dirty_log_ring"),
        )
    rings = vm.dirty_rings
    if rings.size:
        raise MemslotError(
            EINVAL,
            "the dirty ring is already enabled",
            Refusal("ring-enabled", "virt/kvm/kvm_main.c: kvm_vm_ioctl_enable_dirty_log_ring"),
        )
    with vm.slots_lock:
        if vm.created_vcpus:
            raise MemslotError(
                EINVAL,
                "a vCPU was created before the dirty ring",
                Refusal(
                    "ring-after-vcpu", "virt/kvm/kvm_main.c: kvm_vm_ioctl_enable_dirty_log_ring"
                ),
            )
        rings.size = size
        rings.acq_rel = acq_rel


def enable_dirty_ring_with_bitmap(vm: RingVmView) -> None:
    """``KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP)``: EINVAL where the kernel does
    not offer it (x86, before or after a ring, whatever the argument: the kernel is built
    without it)."""
    if not vm.limits.dirty_ring_with_bitmap:
        raise MemslotError(
            EINVAL, "KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP is not offered by this kernel"
        )
    raise MemslotError(EINVAL, "KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP is not modelled by the engine")


def reset_dirty_rings(vm: RingVmView, rings: Iterable[DirtyRing | None]) -> int:
    """``KVM_RESET_DIRTY_RINGS``: EINVAL without a ring; else reset every ring of
    ``rings`` (the vCPUs in creation order) under ``slots_lock`` and return the number of
    entries reset. In FIRST_WRITE mode each validated group is re-armed.
    O(entries reset)."""
    if not vm.limits.reset_dirty_rings:  # kvm_vm_ioctl: no such ioctl before 5.11
        raise MemslotError(
            vm.limits.unknown_ioctl_errno,
            "KVM_RESET_DIRTY_RINGS does not exist in this kernel",
            Refusal("no-ioctl", "virt/kvm/kvm_main.c: kvm_vm_ioctl"),
        )
    state = vm.dirty_rings
    if not state.size:
        raise MemslotError(
            EINVAL,
            "the VM has no dirty ring",
            Refusal("ring-off", "virt/kvm/kvm_main.c: kvm_vm_ioctl_reset_dirty_pages"),
        )
    with vm.slots_lock:
        reset_gfn = None
        if state.push_mode is PushMode.FIRST_WRITE:

            def reset_gfn(slot: int, offset: int, mask: int) -> None:
                memslot = validate_reset_batch(vm, slot, offset, mask)
                if memslot is not None:
                    state.rearm(memslot, offset, mask)

        total = 0
        for ring in rings:
            if ring is not None:
                total += ring.reset(reset_gfn)
        return total


# ======================================================================================
# Pushes from a vCPU
# ======================================================================================
def mark_page_dirty_in_slot(
    rings: DirtyRings, ring: DirtyRing | None, slot: Memslot | None, gfn: int
) -> None:
    """``mark_page_dirty_in_slot`` with a running vCPU whose ring is ``ring``: nothing
    unless ``slot`` logs; then a push into the ring when the VM has one (subject to the
    push mode), else the slot's dirty bitmap. O(1)."""
    if slot is None or not slot.flags & KVM_MEM_LOG_DIRTY_PAGES:
        return
    if ring is None:
        _dirty_log.mark_page_dirty_in_slot(slot, gfn)
        return
    offset = gfn - slot.base_gfn
    if rings.first_write(slot, offset):
        ring.push(slot.slot, offset)


def mark_pages_dirty_in_slot(
    rings: DirtyRings, ring: DirtyRing | None, slot: Memslot, gfn: int, count: int
) -> None:
    """:func:`mark_page_dirty_in_slot` for ``count`` pages from ``gfn`` (one vCPU write
    that covers them), in page order; pages outside the slot are ignored.
    O(count) with a ring, O(1 + count / 8) with a bitmap."""
    if ring is None:
        _dirty_log.mark_pages_dirty_in_slot(slot, gfn, count)
        return
    if not slot.flags & KVM_MEM_LOG_DIRTY_PAGES:
        return
    start = max(gfn - slot.base_gfn, 0)
    end = min(gfn - slot.base_gfn + count, slot.npages)
    number = slot.slot
    for offset in range(start, end):
        if rings.first_write(slot, offset):
            ring.push(number, offset)


def check_invariants(vm: RingVmView, rings: Iterable[DirtyRing | None]) -> None:
    """Every vCPU has a ring of the VM's size exactly when a ring is on; indexes fit u32
    and a ring is never used past its size unless it was overwritten (raises
    :class:`memslots.errors.InvariantError`). O(vCPUs)."""
    size = vm.dirty_rings.size
    for ring in rings:
        if not size:
            require(ring is None, "a vCPU has a dirty ring although the VM has none")
            continue
        require(ring is not None, "a vCPU of a VM with a dirty ring has no ring")
        assert ring is not None
        require(ring.nbytes == size, "a vCPU's ring is not the VM's ring size")
        require(0 <= ring.dirty_index <= U32_MAX and 0 <= ring.reset_index <= U32_MAX,
                "ring indexes outside u32")  # fmt: skip
        require(ring.overwrites or ring.used <= ring.size, "ring used past its size")
