"""A memslot set (``struct kvm_memslots``): one index of the slots of an address space.

Each address space has two sets, active and inactive (see :mod:`memslots.vm`). Both index
the same :class:`~memslots.slot.Memslot` objects except while an update is in flight;
each has its own gfn-ordered index, hva interval tree, id map, generation and last-used
cache, like the kernel's per-set ``gfn_tree``, ``hva_tree``, ``id_hash`` and
``last_used_slot``.

Concurrency: a set that is published (the active one) is only ever *read*, apart from the
``last_used_slot`` cache, which readers update with a single reference store. Only the
writer changes a set, and only after a grace period has shown that no reader still uses it.
A caller that keeps a set across several calls must hold a read section
(``with vm.read_section(): s = vm.memslots(); ...``); see :mod:`memslots.sync`.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import pairwise

from mypy_extensions import mypyc_attr

from memslots.errors import require
from memslots.gfn_index import GfnIndex
from memslots.hva_tree import HvaTree
from memslots.slot import Memslot


@mypyc_attr(allow_interpreted_subclasses=True)
class MemslotSet:
    """The slots of one address space as seen by one of its two sets.

    Attributes: ``as_id``; ``node_idx`` (0 or 1, which of the two sets this is);
    ``generation`` (the kernel's generation number, see :mod:`memslots.vm`);
    ``last_used_slot`` (the set-wide cache of the last slot found by gfn, or None).

    Callers only read sets (``vm.memslots(as_id)``); the write side (``_replace``) is
    the update protocol's and has no public name.

    >>> from memslots import Vm
    >>> vm = Vm()
    >>> vm.set_user_memory_region(0, 0, 0x100000, 0x10000, 0x7F0000000000)
    >>> with vm.read_section():
    ...     s = vm.memslots(0)
    ...     a = s.id_to_memslot(0)
    ...     s.gfn_to_memslot(0x10F) is a, s.gfn_to_memslot(0x110), len(s)
    (True, None, 1)
    >>> with vm.read_section():
    ...     [x.id for x in vm.memslots(0).iter_hva_range(0x7F0000000000, 0x7F0000000FFF)]
    [0]
    """

    __slots__ = ("_gfn", "_hva", "_ids", "as_id", "generation", "last_used_slot", "node_idx")

    def __init__(self, as_id: int, node_idx: int) -> None:
        self.as_id = as_id
        self.node_idx = node_idx
        self.generation = as_id
        self.last_used_slot: Memslot | None = None
        self._gfn = GfnIndex()
        self._hva = HvaTree()
        self._ids: dict[int, Memslot] = {}

    # --- read side ------------------------------------------------------------------
    def __len__(self) -> int:
        """Number of slots in the set, O(1)."""
        return len(self._ids)

    def __iter__(self) -> Iterator[Memslot]:
        """Slots in ascending ``base_gfn`` order, O(1) per slot."""
        return iter(self._gfn)

    def __bool__(self) -> bool:
        return bool(self._ids)

    def gfn_to_memslot(self, gfn: int) -> Memslot | None:
        """The slot holding ``gfn`` or None (``____gfn_to_memslot(slots, gfn, false)``).

        Tries the set's ``last_used_slot`` first (O(1)), then searches the gfn index
        (O(log n)) and caches a hit. INVALID slots are returned like any other (the kernel
        does not check the flag here; gfn->hva does).
        """
        s = self.last_used_slot
        if s is not None and s.base_gfn <= gfn < s.base_gfn + s.npages:
            return s
        s = self._gfn.find(gfn)
        if s is not None:
            self.last_used_slot = s
        return s

    def search(self, gfn: int) -> Memslot | None:
        """The slot holding ``gfn`` without touching the cache (``search_memslots``),
        O(log n)."""
        return self._gfn.find(gfn)

    def id_to_memslot(self, id: int) -> Memslot | None:
        """The slot with this id (the low 16 bits of the ABI slot number), O(1)."""
        return self._ids.get(id)

    def iter_gfn_range(self, start: int, end: int) -> Iterator[Memslot]:
        """Slots intersecting the gfn range ``[start, end)``, ascending by base_gfn
        (``kvm_for_each_memslot_in_gfn_range``). O(log n + k), lazy."""
        if end <= start:
            return iter(())
        return self._gfn.iter_range(start, end)

    def iter_hva_range(self, start: int, last: int) -> Iterator[Memslot]:
        """Slots whose hva range intersects ``[start, last]``, both inclusive
        (``kvm_for_each_memslot_in_hva_range``), ascending by userspace_addr then id.
        O(log n + k log n), lazy. INVALID copies that are published are included, as in
        the kernel."""
        if last < start:
            return iter(())
        return self._hva.iter_range(start, last)

    def first(self) -> Memslot | None:
        """The slot with the lowest base_gfn, or None."""
        return self._gfn.first()

    def last(self) -> Memslot | None:
        """The slot with the highest base_gfn, or None."""
        return self._gfn.last()

    def __repr__(self) -> str:
        return (
            f"MemslotSet(as_id={self.as_id}, node_idx={self.node_idx}, "
            f"generation={self.generation:#x}, slots={len(self)})"
        )

    # --- write side (the update protocol only; never on a published set) -------------
    def _replace(self, old: Memslot | None, new: Memslot | None) -> None:
        """``kvm_replace_memslot`` on this set: put ``new`` where ``old`` was. Private:
        only :class:`memslots.vm.Vm`'s update protocol calls it, on the inactive set.

        ``old`` None adds ``new``; ``new`` None removes ``old``. A cached ``old`` becomes
        ``new`` in ``last_used_slot``. Equal base_gfn (or hva range) replaces the index
        entry in place. O(log n).
        """
        if old is None and new is None:
            raise ValueError("_replace needs a slot")
        if old is not None:
            del self._ids[old.id]
            if self.last_used_slot is old:
                self.last_used_slot = new
            if new is None:
                self._hva.remove(old)
                self._gfn.remove(old)
                return
        assert new is not None
        self._ids[new.id] = new
        if old is not None and self._hva.can_replace(old, new):
            self._hva.replace(old, new)
        else:
            if old is not None:
                self._hva.remove(old)
            self._hva.insert(new)
        if old is not None and old.base_gfn == new.base_gfn:
            self._gfn.replace(old, new)
        else:
            if old is not None:
                self._gfn.remove(old)
            self._gfn.insert(new)

    def check_invariants(self) -> None:
        """Assert the three indexes agree, no two slots overlap in gfn, the cache points
        into the set (for tests; O(n))."""
        self._gfn.check()
        self._hva.check()
        by_gfn = list(self._gfn)
        require(len(by_gfn) == len(self._ids) == len(self._hva), "index sizes differ")
        for s in by_gfn:
            require(self._ids.get(s.id) is s, f"id map disagrees for slot {s.id}")
            require(s.as_id == self.as_id, "slot in the wrong address space")
            require(s.npages > 0, "slot with no pages")
        for a, b in pairwise(by_gfn):
            require(a.base_gfn + a.npages <= b.base_gfn, f"gfn overlap: {a} and {b}")
        require({id(s) for s in self._hva} == {id(s) for s in by_gfn}, "hva tree disagrees")
        cached = self.last_used_slot  # one load: readers may fill the cache meanwhile
        if cached is not None:
            require(self._ids.get(cached.id) is cached, "last_used_slot is not in the set")
