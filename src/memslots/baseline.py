"""The array design that commit a54d806688fe replaced, kept for comparison and as a
second oracle: :class:`ArrayVm`.

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

What is the same as the engine (:class:`memslots.vm.Vm`), by construction: validation
and classification (``Vm.check_region``, shared code in :mod:`memslots.validate`),
``kvm_prepare_memory_region`` and ``kvm_commit_memory_region`` (dirty bitmaps, page
accounting, fault points), the invalidation callbacks, dirty logging, guest memory and
vCPUs, and the generation arithmetic (``Vm._swap_active_memslots``; the number of swaps
per request did not change with the commit). So every ioctl-visible result, the slot
table and every generation agree with the engine; only the data structure and its costs
differ.

Deliberate differences from v5.15, none visible through the API:

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
- ``kvm_prepare_memory_region`` (dirty bitmap allocation) runs after the INVALID copy is
  installed, as in 5.17+, not before ``kvm_set_memslot`` as in 5.15: that keeps the
  generation of a failed DELETE/MOVE identical to the engine's.
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
from typing import Any, cast

from memslots.constants import (
    KVM_MEMSLOT_INVALID,
    PAGE_SHIFT,
)
from memslots.errors import MemslotError, require
from memslots.memslot_set import MemslotSet
from memslots.slot import Memslot
from memslots.validate import Change
from memslots.vm import Vm


class ArrayMemslotSet(MemslotSet):
    """``struct kvm_memslots`` before 5.17: one array of slots sorted by ``base_gfn``, an
    id -> index map and an ``lru_slot`` index. Offers the read interface of
    :class:`~memslots.memslot_set.MemslotSet`.

    Read side (a published set is never changed except ``lru_slot``): ``gfn_to_memslot``
    O(1) on a cache hit, O(log n) else; ``search`` O(log n); ``id_to_memslot`` O(1);
    ``iter_gfn_range`` O(log n + k); ``iter_hva_range`` O(n + k log k) (a scan of every
    slot). Write side (only on the unpublished set): ``copy_from`` O(n),
    ``update_memslots`` O(n) in the worst case (O(distance moved)).
    """

    # a MemslotSet only so that the compiled engine's Vm, whose protocol code ArrayVm
    # reuses, accepts it (as_id, node_idx and generation are MemslotSet's fields)
    __slots__ = ("_gfns", "_id_to_index", "_slots", "lru_slot")

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
    def last_used_slot(self) -> Memslot | None:  # type: ignore[override]
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
            if s.userspace_addr <= last and start <= s.userspace_addr + (s.npages << PAGE_SHIFT) - 1
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
    def copy_from(self, src: ArrayMemslotSet) -> None:
        """``kvm_dup_memslots`` / ``kvm_copy_memslots``: this set becomes a fresh copy of
        ``src``'s array, keys, id map and ``lru_slot``. O(n)."""
        self._slots = src._slots.copy()
        self._gfns = src._gfns.copy()
        self._id_to_index = src._id_to_index.copy()
        self.lru_slot = src.lru_slot

    def free(self) -> None:
        """``kvfree``: drop the array (the set stays usable as an empty one). O(n)."""
        self._slots = []
        self._gfns = []
        self._id_to_index = {}
        self.lru_slot = 0

    def set_slot(self, slot: Memslot) -> None:
        """Put ``slot`` at the index of the slot with the same id, which must have the
        same base_gfn (flagging a slot INVALID or clearing the flag again). O(1)."""
        i = self._id_to_index[slot.id]
        assert self._gfns[i] == slot.base_gfn
        self._slots[i] = slot

    def update_memslots(self, id: int, new: Memslot | None) -> None:
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


class ArrayVm(Vm):
    """The VM with the array-based memslots of Linux 5.16 and before (see the module
    docstring). Same constructor, API and results as :class:`memslots.vm.Vm`.

    Every change costs O(n): the whole array is duplicated (twice for DELETE and MOVE) and
    slots are shifted to keep it sorted. Lookups: O(1) on an ``lru_slot`` hit, O(log n)
    binary search otherwise; hva-range walks O(n).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # Vm builds tree sets; swap in array sets (see the report of issue 6 for the hook
        # that would make this a class attribute of Vm).
        sets = [
            (ArrayMemslotSet(a, 0), ArrayMemslotSet(a, 1)) for a in range(self.nr_address_spaces)
        ]
        self._sets = cast("list[tuple[MemslotSet, MemslotSet]]", sets)
        self._memslots = [pair[0] for pair in self._sets]

    def _array(self, as_id: int) -> ArrayMemslotSet:
        return cast(ArrayMemslotSet, self._memslots[as_id])

    def _inactive_array(self, as_id: int) -> ArrayMemslotSet:
        return cast(ArrayMemslotSet, self._inactive_memslots(as_id))

    # ==================================================================================
    # The update protocol of v5.15: kvm_set_memslot with kvm_dup_memslots
    # ==================================================================================
    def _set_memslot(self, old: Memslot | None, new: Memslot | None, change: Change) -> None:
        """``kvm_set_memslot`` (v5.15): duplicate, (invalidate,) prepare, update, install.
        O(n) for every change."""
        s = old if old is not None else new
        assert s is not None
        as_id = s.as_id
        if change in (Change.DELETE, Change.MOVE):
            # The array that will carry the INVALID copy must exist first (the engine's
            # "kzalloc_invalid" point; here it is the kvm_dup_memslots allocation).
            self.faults.check("kzalloc_invalid")
        slots = self._dup_memslots(as_id)

        invalid: Memslot | None = None
        if change in (Change.DELETE, Change.MOVE):
            assert old is not None
            invalid = old.copy()
            invalid.flags |= KVM_MEMSLOT_INVALID
            slots.set_slot(invalid)
            # Swap #1: readers find the INVALID copy. The old array is not freed: it is
            # re-used for a fresh copy of the installed one (kvm_copy_memslots).
            self._install_new_memslots(as_id)
            self._arch_flush_shadow_memslot(old)
            old.arch = invalid.arch
            slots = self._dup_memslots(as_id)

        try:
            self._prepare_memory_region(old, new, change)
        except MemslotError:
            if invalid is not None:
                assert old is not None
                slots.set_slot(old)  # slot->flags &= ~KVM_MEMSLOT_INVALID
                self._install_new_memslots(as_id)
                self._inactive_array(as_id).free()
            else:
                slots.free()
            raise

        slots.update_memslots(s.id, new)
        self._install_new_memslots(as_id)
        self._inactive_array(as_id).free()
        self._commit_memory_region(old, new, change)

    def _dup_memslots(self, as_id: int) -> ArrayMemslotSet:
        """``kvm_dup_memslots``: the inactive set becomes a copy of the active one. O(n)."""
        slots = self._inactive_array(as_id)
        slots.copy_from(self._array(as_id))
        return slots

    def _install_new_memslots(self, as_id: int) -> None:
        """``install_new_memslots``: publish the inactive set, wait for readers of the old
        one, settle the generation (the same arithmetic as the engine's swap)."""
        self._swap_active_memslots(as_id)

    # ==================================================================================
    # Checks
    # ==================================================================================
    def _check_address_space(self, as_id: int) -> None:
        """The array part of :meth:`check_invariants`: the active array is sorted and
        indexed correctly and the inactive one has been freed (the accounting checks are
        the engine's)."""
        pair = self._sets[as_id]
        active = self._array(as_id)
        require(id(active) in (id(pair[0]), id(pair[1])), "active set is not one of two")
        require(not len(self._inactive_array(as_id)), "the old array was not freed")
        active.check_invariants()

    def __repr__(self) -> str:
        n = sum(len(s) for s in self._memslots)
        return f"ArrayVm(address_spaces={self.nr_address_spaces}, slots={n})"


__all__ = ["ArrayMemslotSet", "ArrayVm"]
