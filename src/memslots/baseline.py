"""The array design that commit a54d806688fe replaced, written out on its own as a second
oracle: :class:`ArrayVm`.

Before Linux 5.17 a memslot set (``struct kvm_memslots``) was one array of slots sorted by
``base_gfn`` plus an ``id_to_index`` map, and ``kvm_set_memslot`` (v5.15,
``virt/kvm/kvm_main.c``) changed it like this:

1. ``kvm_dup_memslots``: allocate a new array and copy the *whole* active one into it
   (O(n) for every change, whatever the change);
2. DELETE/MOVE: flag the slot INVALID in the copy, install the copy
   (``install_new_memslots``: publish, ``synchronize_srcu``, settle the generation), flush
   the shadow MMU, then copy the now-active array again into the old one
   (``kvm_copy_memslots``) to work on;
3. ``kvm_arch_prepare_memory_region``; on failure a DELETE/MOVE installs the copy with
   the INVALID flag cleared again;
4. ``update_memslots``: insert, delete or move the slot by shifting its neighbours one
   position at a time and fixing their ``id_to_index`` entries (O(n));
5. install the copy, commit, free the old array.

Lookups: ``__gfn_to_memslot`` tries the set's ``lru_slot`` (an array index) and then
``search_memslots``, a binary search over the sorted array; hva-range walks
(``kvm_handle_hva_range``) looked at every slot.

Independence from the engine. :class:`ArrayVm` shares no update-protocol code with
:class:`memslots.vm.Vm`: it has its own sets, copies, INVALID install, swap
(``install_new_memslots`` with its own generation arithmetic), its own dirty-bitmap
prepare and commit, page accounting, interrupt handling, invalidation flush, vCPUs
(:class:`ArrayVcpu`) and ioctl entry points. What both designs share is only what is
not protocol: validation (:mod:`memslots.validate`), the data classes (``Memslot``,
``VmLimits``, ``Change``, ``Decision``), the dirty-log, guest-memory, grace-period,
fault-point and guest_memfd helpers, and :class:`memslots.vm_api.VmApi` (lookups on the
published sets and the forwarders to those helpers). So every ioctl-visible result, the
slot table and every generation agreeing with the engine (``tests/test_baseline.py``,
``tests/test_engine_model.py``) is a real differential test: a bug in either protocol
shows up as a difference.

Deliberate differences from v5.15, none visible through the API (they keep the results
the engine's, which follow mainline):

- The array is sorted by *ascending* ``base_gfn`` (the kernel sorted it descending so that
  the common case, memory at low gfns, sat at the end). Ascending order makes
  ``__iter__`` the API's order without a reversal; the shifting code is the kernel's
  mirrored (``_move_backward`` still moves toward the end of the array, which here means
  toward higher gfns).
- Python lists hold references, so "copy the array" copies pointers; slot objects are
  shared between arrays (they are never changed while published, as in the engine).
  The kernel copied ``sizeof(struct kvm_memory_slot)`` bytes per slot. A parallel list of
  ``base_gfn`` keys stands in for the keys stored inline in the kernel's array, so the
  binary search is one C-level ``bisect``.
- The dirty bitmap is allocated (and the ``dirty_bitmap`` fault point checked) after the
  INVALID copy is installed, as in 5.17+, not in ``__kvm_set_memory_region`` before
  ``kvm_set_memslot`` as in 5.15: that keeps the generation of a failed DELETE/MOVE
  identical to the engine's. The x86 max-gfn check of mainline's
  ``kvm_arch_prepare_memory_region`` and the page and dirty-logging counters of
  mainline's ``kvm_commit_memory_region`` are kept for the same reason.
- vCPUs cache their last slot tagged with the generation (5.17's per-vCPU
  ``last_used_slot``; 5.15 used the set-wide ``lru_slot`` for vCPUs too), so that both
  designs expose the same vCPU state. Unlike the engine's, an :class:`ArrayVcpu` takes
  the read section on cache hits too.
- The two sets of an address space are two :class:`ArrayMemslotSet` objects that take
  turns: the inactive one receives the duplicate, is published, and the one it replaced
  is freed (emptied). Outside an update the inactive set is empty.
- ``iter_gfn_range`` starts with a binary search. The 5.15 overlap check walked every slot
  (``kvm_for_each_memslot``), and so did a54d806688fe itself; that is a cost of the
  validation code, not of the array, so the numbers of this class are a lower bound for
  the old design's cost per change.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterator
from itertools import pairwise

from memslots.constants import (
    KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS,
    KVM_MEMSLOT_INVALID,
)
from memslots.dirty_log import alloc_dirty_bitmap
from memslots.errors import MemslotError, require
from memslots.lockdep import lockdep_assert_held
from memslots.slot import Memslot
from memslots.validate import (
    Change,
    Decision,
    LimitsSource,
    check_gmem_only,
    check_max_gfn,
    make_limits,
)
from memslots.vm_api import VmApi


class ArrayMemslotSet:
    """``struct kvm_memslots`` before 5.17: one array of slots sorted by ``base_gfn``, an
    id -> index map and an ``lru_slot`` index. Offers the read interface of
    :class:`~memslots.memslot_set.MemslotSet`.

    Read side (a published set is never changed except ``lru_slot``): ``gfn_to_memslot``
    O(1) on a cache hit, O(log n) else; ``search`` O(log n); ``id_to_memslot`` O(1);
    ``iter_gfn_range`` O(log n + k); ``iter_hva_range`` O(n + k log k) (a scan of every
    slot). Write side (private: only the update protocol, only on the unpublished set):
    ``_copy_from`` O(n), ``_update_memslots`` O(n) in the worst case (O(distance moved)).
    """

    __slots__ = ("_gfns", "_id_to_index", "_slots", "as_id", "generation", "lru_slot", "node_idx")

    def __init__(self, as_id: int, node_idx: int) -> None:
        self.as_id = as_id
        self.node_idx = node_idx
        self.generation = as_id
        #: ``slots->lru_slot``: index of the last slot found by gfn (may be stale: every
        #: use checks it against the array)
        self.lru_slot = 0
        self._slots: list[Memslot] = []
        #: ``base_gfn`` of ``_slots[i]`` at index i (the keys the binary search uses)
        self._gfns: list[int] = []
        self._id_to_index: dict[int, int] = {}

    # --- read side ------------------------------------------------------------------
    def __len__(self) -> int:
        """Number of slots (``used_slots``), O(1)."""
        return len(self._slots)

    def __iter__(self) -> Iterator[Memslot]:
        """Slots in ascending ``base_gfn`` order, O(1) per slot."""
        return iter(self._slots)

    def __bool__(self) -> bool:
        return bool(self._slots)

    @property
    def last_used_slot(self) -> Memslot | None:
        """The slot ``lru_slot`` points at (None for an empty set), O(1)."""
        i = self.lru_slot
        slots = self._slots
        return slots[i] if i < len(slots) else None

    def gfn_to_memslot(self, gfn: int) -> Memslot | None:
        """``__gfn_to_memslot``: the ``lru_slot`` entry if it holds ``gfn`` (O(1)), else
        a binary search (O(log n)) whose hit becomes the new ``lru_slot``."""
        slots = self._slots
        i = self.lru_slot
        if i < len(slots):
            s = slots[i]
            if s.base_gfn <= gfn < s.base_gfn + s.npages:
                return s
        i = bisect_right(self._gfns, gfn) - 1
        if i >= 0:
            s = slots[i]
            if gfn < s.base_gfn + s.npages:
                self.lru_slot = i
                return s
        return None

    def search(self, gfn: int) -> Memslot | None:
        """``search_memslots``: binary search without the cache, O(log n)."""
        i = bisect_right(self._gfns, gfn) - 1
        if i >= 0:
            s = self._slots[i]
            if gfn < s.base_gfn + s.npages:
                return s
        return None

    def id_to_memslot(self, id: int) -> Memslot | None:
        """``id_to_memslot``: through ``id_to_index``, O(1)."""
        i = self._id_to_index.get(id)
        return None if i is None else self._slots[i]

    def iter_gfn_range(self, start: int, end: int) -> Iterator[Memslot]:
        """Slots intersecting ``[start, end)`` in ascending base_gfn order: a binary search
        for the first candidate, then a walk along the array. O(log n + k), lazy."""
        if end <= start:
            return
        slots = self._slots
        i = bisect_right(self._gfns, start) - 1
        if i < 0:
            i = 0
        elif slots[i].base_gfn + slots[i].npages <= start:
            i += 1
        for j in range(i, len(slots)):
            s = slots[j]
            if s.base_gfn >= end:
                return
            yield s

    def iter_hva_range(self, start: int, last: int) -> Iterator[Memslot]:
        """Slots whose hva range intersects ``[start, last]`` (inclusive), ordered like the
        engine's (by userspace_addr, then id). The array has no hva order, so this looks
        at every slot, as ``kvm_handle_hva_range`` did before 5.17: O(n + k log k)."""
        if last < start:
            return iter(())
        hits = [
            s
            for s in self._slots
            if s.userspace_addr <= last
            and start <= s.userspace_addr + (s.npages << s.page_shift) - 1
        ]
        if len(hits) > 1:
            hits.sort(key=_hva_key)
        return iter(hits)

    def first(self) -> Memslot | None:
        """The slot with the lowest base_gfn, or None. O(1)."""
        return self._slots[0] if self._slots else None

    def last(self) -> Memslot | None:
        """The slot with the highest base_gfn, or None. O(1)."""
        return self._slots[-1] if self._slots else None

    def __repr__(self) -> str:
        return (
            f"ArrayMemslotSet(as_id={self.as_id}, node_idx={self.node_idx}, "
            f"generation={self.generation:#x}, slots={len(self)})"
        )

    # --- write side (the update protocol only; never on a published set) -------------
    def _copy_from(self, src: ArrayMemslotSet) -> None:
        """``kvm_dup_memslots`` / ``kvm_copy_memslots``: this set becomes a fresh copy of
        ``src``'s array, keys, id map and ``lru_slot``. O(n)."""
        self._slots = src._slots.copy()
        self._gfns = src._gfns.copy()
        self._id_to_index = src._id_to_index.copy()
        self.lru_slot = src.lru_slot

    def _free(self) -> None:
        """``kvfree``: drop the array (the set stays usable as an empty one). O(n)."""
        self._slots = []
        self._gfns = []
        self._id_to_index = {}
        self.lru_slot = 0

    def _set_slot(self, slot: Memslot) -> None:
        """Put ``slot`` at the index of the slot with the same id, which must have the
        same base_gfn (flagging a slot INVALID or clearing the flag again). O(1)."""
        i = self._id_to_index[slot.id]
        require(self._gfns[i] == slot.base_gfn, f"set_slot would move {slot}")
        self._slots[i] = slot

    def _update_memslots(self, id: int, new: Memslot | None) -> None:
        """``update_memslots``: make slot ``id`` be ``new`` (None deletes it), keeping the
        array sorted. O(n) worst case: every slot between the old and the new position
        moves one step and gets its ``id_to_index`` entry fixed."""
        if new is None:
            self._delete(id)
            return
        if id not in self._id_to_index:
            i = self._insert_back(new)
        else:
            i = self._move_backward(id, new.base_gfn)
        i = self._move_forward(i, new.base_gfn)
        self._slots[i] = new
        self._gfns[i] = new.base_gfn
        self._id_to_index[new.id] = i

    def _delete(self, id: int) -> None:
        """``kvm_memslot_delete``: close the gap by shifting the later slots forward."""
        i = self._id_to_index.pop(id)
        slots, index = self._slots, self._id_to_index
        del slots[i]
        del self._gfns[i]
        if self.lru_slot >= len(slots):
            self.lru_slot = 0
        for j in range(i, len(slots)):
            index[slots[j].id] = j

    def _insert_back(self, new: Memslot) -> int:
        """``kvm_memslot_insert_back``: one more entry at the end of the array (the
        kernel's duplicate was allocated one slot larger for a CREATE)."""
        self._slots.append(new)
        self._gfns.append(new.base_gfn)
        return len(self._slots) - 1

    def _move_backward(self, id: int, base_gfn: int) -> int:
        """``kvm_memslot_move_backward``: move entry ``id`` toward the end of the array
        while the next entry has a lower base_gfn than ``base_gfn``; every entry passed
        moves one step forward. Returns the entry's index."""
        slots, gfns, index = self._slots, self._gfns, self._id_to_index
        i = index[id]
        # The kernel compares one neighbour at a time; the sorted keys give the stopping
        # point directly, and the shift is one C-level move plus the index fixups.
        j = bisect_left(gfns, base_gfn, i + 1) - 1
        if j > i:
            s, g = slots[i], gfns[i]
            del slots[i]
            del gfns[i]
            slots.insert(j, s)
            gfns.insert(j, g)
            for k in range(i, j):
                index[slots[k].id] = k
        return j if j > i else i

    def _move_forward(self, i: int, base_gfn: int) -> int:
        """``kvm_memslot_move_forward``: move entry ``i`` toward the start of the array
        while the previous entry has a higher base_gfn; every entry passed moves one step
        back. Returns the entry's index."""
        slots, gfns, index = self._slots, self._gfns, self._id_to_index
        j = bisect_right(gfns, base_gfn, 0, i)
        if j < i:
            s, g = slots[i], gfns[i]
            del slots[i]
            del gfns[i]
            slots.insert(j, s)
            gfns.insert(j, g)
            for k in range(j + 1, i + 1):
                index[slots[k].id] = k
        return j

    def check_invariants(self) -> None:
        """Assert the array is sorted without gfn overlap, the keys and the id map agree
        with it and ``lru_slot`` is in range (for tests; O(n))."""
        slots = self._slots
        require(len(self._gfns) == len(slots) == len(self._id_to_index), "sizes differ")
        for i, s in enumerate(slots):
            require(self._gfns[i] == s.base_gfn, f"key of index {i} is stale")
            require(self._id_to_index.get(s.id) == i, f"id_to_index disagrees for slot {s.id}")
            require(s.as_id == self.as_id, "slot in the wrong address space")
            require(s.npages > 0, "slot with no pages")
        for a, b in pairwise(slots):
            require(a.base_gfn + a.npages <= b.base_gfn, f"gfn overlap or disorder: {a} / {b}")
        require(self.lru_slot == 0 or self.lru_slot < len(slots), "lru_slot out of range")


def _hva_key(s: Memslot) -> tuple[int, int]:
    return (s.userspace_addr, s.id)


class ArrayVcpu:
    """A vCPU of an :class:`ArrayVm`: ``kvm_vcpu_gfn_to_memslot`` with the vCPU's own
    cache of the last slot it found, tagged with the generation it was found under (the
    same attributes as :class:`memslots.vm.Vcpu`: ``as_id``, ``id``, ``last_used_slot``,
    ``last_used_slot_gen``, ``vm``). Every lookup takes a read section. O(1) on a cache
    hit, O(log n) else."""

    __slots__ = ("as_id", "id", "last_used_slot", "last_used_slot_gen", "vm")

    def __init__(self, vm: ArrayVm, id: int) -> None:
        self.vm = vm
        self.id = id
        self.as_id = 0
        self.last_used_slot: Memslot | None = None
        self.last_used_slot_gen = -1

    def gfn_to_memslot(self, gfn: int) -> Memslot | None:
        """The slot holding ``gfn`` in this vCPU's address space, or None."""
        srcu = self.vm.srcu
        token = srcu.read_lock()
        try:
            slots = self.vm._memslots[self.as_id]
            if slots.generation != self.last_used_slot_gen:  # another set: forget
                self.last_used_slot = None
                self.last_used_slot_gen = slots.generation
            cached = self.last_used_slot
            if cached is not None and cached.base_gfn <= gfn < cached.base_gfn + cached.npages:
                return cached
            found = slots.search(gfn)
            if found is not None:
                self.last_used_slot = found
            return found
        finally:
            srcu.read_unlock(token)

    def memslots(self) -> ArrayMemslotSet:
        """The active set of this vCPU's address space (hold a read section to use it)."""
        return self.vm._memslots[self.as_id]

    def __repr__(self) -> str:
        return f"ArrayVcpu(id={self.id}, as_id={self.as_id})"


class ArrayVm(VmApi[ArrayMemslotSet]):
    """The VM with the array-based memslots of Linux 5.16 and before, an implementation of
    its own (see the module docstring). Same constructor, API and results as
    :class:`memslots.vm.Vm`.

    Every change costs O(n): the whole array is duplicated (twice for DELETE and MOVE) and
    slots are shifted to keep it sorted. Lookups: O(1) on an ``lru_slot`` hit, O(log n)
    binary search otherwise; hva-range walks O(n).

    >>> vm = ArrayVm()
    >>> vm.set_user_memory_region(0, 0, 0x100000, 0x2000, 0x7F0000000000)
    >>> vm.set_user_memory_region(1, 0, 0x000000, 0x2000, 0x7F0000100000)
    >>> [s.id for s in vm.memslots(0)], vm.memslots(0).generation
    ([1, 0], 4)
    >>> vm.gfn_to_memslot(0x101).id
    0
    """

    def __init__(
        self,
        *,
        profile: LimitsSource | None = None,
        vm_type: int = 0,
        nr_address_spaces: int | None = None,
        max_user_slots: int | None = None,
        max_gfn: int | None = None,
        readonly_mem: bool | None = None,
        private_mem: bool | None = None,
        task_size_max: int | None = None,
    ) -> None:
        super().__init__(
            make_limits(
                profile,
                vm_type,
                nr_address_spaces,
                max_user_slots,
                max_gfn,
                readonly_mem,
                private_mem,
                task_size_max,
            )
        )
        nr_address_spaces = self.limits.nr_address_spaces
        #: ``kvm->__memslots``: the two arrays of each address space, taking turns
        self._sets = [
            (ArrayMemslotSet(a, 0), ArrayMemslotSet(a, 1)) for a in range(nr_address_spaces)
        ]
        self._memslots = [pair[0] for pair in self._sets]
        self._vcpus: dict[int, ArrayVcpu] = {}
        #: an interrupt that arrived during an update, raised once the update is done
        self._pending_interrupt: BaseException | None = None

    def _inactive_array(self, as_id: int) -> ArrayMemslotSet:
        """The array of ``as_id`` that is not published: the writer's to fill (empty
        outside an update). Only under ``slots_lock``."""
        if __debug__:
            lockdep_assert_held(self.slots_lock, "the inactive array")
        pair = self._sets[as_id]
        return pair[1] if self._memslots[as_id] is pair[0] else pair[0]

    # ==================================================================================
    # The ioctls: kvm_vm_ioctl_set_memory_region, then __kvm_set_memory_region (v5.15)
    # ==================================================================================
    def set_user_memory_region(
        self, slot: int, flags: int, guest_phys_addr: int, memory_size: int, userspace_addr: int
    ) -> None:
        """``KVM_SET_USER_MEMORY_REGION`` (see :meth:`memslots.vm.Vm.set_user_memory_region`;
        same results). O(n)."""
        with self.slots_lock:
            d = self.check_region(False, slot, flags, guest_phys_addr, memory_size, userspace_addr)
            self._apply(d)

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
        """``KVM_SET_USER_MEMORY_REGION2`` (see
        :meth:`memslots.vm.Vm.set_user_memory_region2`; same results). O(n)."""
        with self.slots_lock:
            d = self.check_region(
                True, slot, flags, guest_phys_addr, memory_size, userspace_addr,
                guest_memfd_offset, guest_memfd,
            )  # fmt: skip
            self._apply(d)

    def _apply(self, d: Decision) -> None:
        """Carry out a validated request (:meth:`check_region`; private, as
        ``Vm._apply``): the part of ``__kvm_set_memory_region`` after validation. Builds
        the new slot (binding its guest_memfd), runs ``kvm_set_memslot``, undoes the
        binding if it fails; an interrupt that arrived meanwhile is raised at the end.
        ``RuntimeError`` (and nothing changed) inside a read section of this VM."""
        with self.slots_lock:
            if d.change is Change.NONE:
                self.last_change = Change.NONE
                return
            self._check_not_in_read_section()  # install_new_memslots would wait forever
            new: Memslot | None = None
            if d.change is not Change.DELETE:
                self.faults.check("kzalloc_new")
                new = Memslot(
                    d.id, d.as_id, d.base_gfn, d.npages, d.flags, d.userspace_addr,
                    None, None, self.limits.page_shift,
                )  # fmt: skip
                if d.flags & KVM_MEM_GUEST_MEMFD:
                    self.guest_memfds.bind(
                        new, d.guest_memfd, d.guest_memfd_offset, self.limits.gmem_bound_errno
                    )
            try:
                self._set_memslot(d.as_id, d.id, d.old, new, d.change)
            except MemslotError:
                if new is not None:
                    self.guest_memfds.unbind(new)
                raise
            finally:
                pending, self._pending_interrupt = self._pending_interrupt, None
                if pending is not None:
                    raise pending
            self.last_change = d.change

    # ==================================================================================
    # The update protocol of v5.15: kvm_set_memslot with kvm_dup_memslots
    # ==================================================================================
    def _set_memslot(
        self, as_id: int, id: int, old: Memslot | None, new: Memslot | None, change: Change
    ) -> None:
        """``kvm_set_memslot`` (v5.15): duplicate, (invalidate,) prepare, update, install,
        commit. O(n) for every change."""
        if __debug__:
            lockdep_assert_held(self.slots_lock, "kvm_set_memslot")
        moving = change in (Change.DELETE, Change.MOVE)
        if moving:
            # kvm_dup_memslots' allocation, which must succeed before the INVALID step
            # (the engine's "kzalloc_invalid" point)
            self.faults.check("kzalloc_invalid")
        slots = self._dup_memslots(as_id)

        invalid: Memslot | None = None
        if moving:
            assert old is not None
            invalid = old.copy()
            invalid.flags |= KVM_MEMSLOT_INVALID  # in the fresh copy, not in `old`
            slots._set_slot(invalid)
            self._install_new_memslots(as_id)  # readers now find the INVALID copy
            self._arch_flush_shadow_memslot(old)
            old.arch = invalid.arch
            # The array that was active is free to reuse: a fresh copy of the installed
            # one (kvm_copy_memslots), to work on.
            slots = self._dup_memslots(as_id)

        try:
            self._prepare_memory_region(old, new, change)
        except MemslotError:
            if invalid is not None:
                assert old is not None
                slots._set_slot(old)  # slot->flags &= ~KVM_MEMSLOT_INVALID
                self._install_new_memslots(as_id)
            self._inactive_array(as_id)._free()  # kvfree(slots)
            raise

        slots._update_memslots(id, new)
        self._install_new_memslots(as_id)
        self._inactive_array(as_id)._free()  # kvfree(old memslots)
        self._commit_memory_region(old, new, change)

    def _dup_memslots(self, as_id: int) -> ArrayMemslotSet:
        """``kvm_dup_memslots`` / ``kvm_copy_memslots``: the unpublished array becomes a
        copy of the active one. O(n)."""
        slots = self._inactive_array(as_id)
        slots._copy_from(self._memslots[as_id])
        return slots

    def _install_new_memslots(self, as_id: int) -> None:
        """``install_new_memslots``: mark the new array's generation in flight, publish
        it, wait until no reader uses the old one, then give it the next generation of
        this address space (``old + nr_address_spaces``). The ``publish_observer``, if
        any, is told before the publish and after the generation is settled."""
        slots = self._inactive_array(as_id)
        gen = self._memslots[as_id].generation
        if __debug__:
            require(not gen & KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS, "install already in flight")
        observer = self.publish_observer
        if observer is not None:
            observer.publishing(as_id, slots)
        slots.generation = gen | KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS
        self._memslots[as_id] = slots  # rcu_assign_pointer
        try:
            self.srcu.synchronize()
        except BaseException as exc:  # never cut the grace period short: finish, then raise
            self._hold_interrupt(exc)
            self.srcu.synchronize()
        slots.generation = (gen & ~KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS) + self.nr_address_spaces
        if observer is not None:
            observer.published(as_id, slots)

    def _hold_interrupt(self, exc: BaseException) -> None:
        """Keep the first interrupt of an update for :meth:`_apply` to raise once the
        update is complete (a signal taken when the ioctl returns)."""
        if self._pending_interrupt is None:
            self._pending_interrupt = exc

    def _arch_flush_shadow_memslot(self, old: Memslot) -> None:
        """``kvm_arch_flush_shadow_memslot``: the fault point, then every invalidation
        callback; what they raise is recorded in ``callback_errors`` (an interrupt is
        also raised after the update) and the update goes on."""
        try:
            self.faults.check("invalidate_callback")
        except MemslotError as exc:
            self.callback_errors.append((old.slot, exc))
        for cb in list(self._invalidate_callbacks):
            try:
                cb(old)
            except BaseException as exc:
                self.callback_errors.append((old.slot, exc))
                if not isinstance(exc, Exception):
                    self._hold_interrupt(exc)

    def _prepare_memory_region(
        self, old: Memslot | None, new: Memslot | None, change: Change
    ) -> None:
        """The dirty bitmap (``__kvm_set_memory_region``: allocated when logging starts,
        kept when it stays on, dropped when it stops), then
        ``kvm_arch_prepare_memory_region``; on failure the bitmap allocated here is freed
        again (``out_bitmap``)."""
        if new is not None:
            if not new.flags & KVM_MEM_LOG_DIRTY_PAGES:
                new.dirty_bitmap = None
            elif old is not None and old.dirty_bitmap is not None:
                new.dirty_bitmap = old.dirty_bitmap
            else:
                self.faults.check("dirty_bitmap")
                new.dirty_bitmap = alloc_dirty_bitmap(new.npages, self.manual_dirty_log_protect)
                self.dirty_bitmap_bytes += len(new.dirty_bitmap)
        try:
            self._arch_prepare_memory_region(old, new, change)
        except MemslotError:
            if (
                new is not None
                and new.dirty_bitmap is not None
                and (old is None or old.dirty_bitmap is None)
            ):
                self.dirty_bitmap_bytes -= len(new.dirty_bitmap)
                new.dirty_bitmap = None
            raise

    def _arch_prepare_memory_region(
        self, old: Memslot | None, new: Memslot | None, change: Change
    ) -> None:
        """``kvm_arch_prepare_memory_region``: metadata for CREATE and MOVE (the highest
        gfn is checked, as mainline does), arch data carried over by FLAGS_ONLY."""
        if new is not None and change is not Change.FLAGS_ONLY:
            check_max_gfn(self.limits, new.base_gfn, new.npages)
            check_gmem_only(self.limits, new)
        self.faults.check("arch_prepare")
        if change is Change.FLAGS_ONLY:
            assert old is not None and new is not None
            new.arch = old.arch

    def _commit_memory_region(
        self, old: Memslot | None, new: Memslot | None, change: Change
    ) -> None:
        """``kvm_arch_commit_memory_region`` and the end of ``__kvm_set_memory_region``:
        page and dirty-logging counters, the guest_memfd binding of a deleted slot, and
        ``kvm_destroy_dirty_bitmap`` of a bitmap the new slot does not keep."""
        if new is not None and old is None:
            self.nr_memslot_pages += new.npages
        elif old is not None and new is None:
            self.nr_memslot_pages -= old.npages
        was = old is not None and bool(old.flags & KVM_MEM_LOG_DIRTY_PAGES)
        now = new is not None and bool(new.flags & KVM_MEM_LOG_DIRTY_PAGES)
        self.nr_memslots_dirty_logging += int(now) - int(was)
        if old is None:
            return
        if change is Change.DELETE:
            self.guest_memfds.unbind(old)
        if old.dirty_bitmap is not None and (new is None or new.dirty_bitmap is None):
            self.dirty_bitmap_bytes -= len(old.dirty_bitmap)
            old.dirty_bitmap = None

    # ==================================================================================
    # vCPUs and checks
    # ==================================================================================
    def create_vcpu(self, id: int) -> ArrayVcpu:
        """``KVM_CREATE_VCPU``: a vCPU with its own last-used-slot cache (address space 0
        to start with), with the kernel's checks (as :meth:`memslots.Vm.create_vcpu`:
        EINVAL for an id at or past 4096 or past 1024 vCPUs, EEXIST for an id in use)."""
        with self.slots_lock:
            self._check_new_vcpu(id, self._vcpus)
            vcpu = self._vcpus[id] = ArrayVcpu(self, id)
            self.created_vcpus += 1
            return vcpu

    def _check_address_space(self, as_id: int) -> None:
        """The array part of :meth:`check_invariants`: the active array is one of the
        two, sorted and indexed correctly, and the inactive one has been freed."""
        pair = self._sets[as_id]
        active = self._memslots[as_id]
        require(active is pair[0] or active is pair[1], "active set is not one of the two")
        require(not len(self._inactive_array(as_id)), "the old array was not freed")
        active.check_invariants()

    def __repr__(self) -> str:
        n = sum(len(s) for s in self._memslots)
        return f"ArrayVm(address_spaces={self.nr_address_spaces}, slots={n})"


__all__ = ["ArrayMemslotSet", "ArrayVcpu", "ArrayVm"]
