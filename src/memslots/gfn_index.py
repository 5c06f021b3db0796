"""The gfn-ordered index of a memslot set (the kernel's ``gfn_tree``).

Slots never overlap in gfn within one set, so an ordered map from ``base_gfn`` to slot
answers every gfn question: the slot holding a gfn is the one with the greatest
``base_gfn <= gfn``.

Representation: a two-level sorted list (the layout sortedcontainers uses): chunks of
``LOAD // 2`` to ``2 * LOAD`` keys (a lone chunk may hold fewer), each with a parallel list
of slots, plus ``_mins``, the first key of every chunk. An insert or removal is a search
and a ``list.insert``/``del`` on one small chunk; a chunk that grows to ``2 * LOAD`` splits
and one that shrinks below ``LOAD // 2`` merges with a neighbour, so there are at most
``2n / LOAD + 1`` chunks however the set was churned. Measured on this machine with 32764
slots (benchmarks/bench_engine.py): ``sortedcontainers.SortedList`` through its public
API (``bisect_right`` then ``__getitem__``) costs 1.5 us per predecessor lookup, 5.5x a
bare ``bisect``; this layout costs 1.2x. Lookups are the hot path of every guest access,
so the index is kept here, in 200 lines, instead of reaching into SortedList's privates.

Two builds, one search (:meth:`GfnIndex.find`, which ``MemslotSet.gfn_to_memslot`` calls
too). Interpreted, it is two C ``bisect`` calls. Compiled by mypyc, a ``bisect`` call would
box the gfn and go through the generic call protocol, so the search is a typed binary
search over ``_mins`` and then over the chunk's slots' ``base_gfn`` fields, which mypyc
turns into a native loop with no boxing (:data:`NATIVE` chooses). The searches of
insert, remove and range iteration are typed loops in the compiled build too
(:func:`_bisect_right`, :func:`_bisect_left`): measured with 32764 slots, a compiled MOVE
went from 7.8 to 6.0 us, a create or delete from 7.4 to 6.5 us.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterator
from types import FunctionType
from typing import Final

from memslots.errors import require
from memslots.slot import Memslot

#: chunks split when they reach 2 * LOAD keys and merge below LOAD // 2
LOAD: Final = 256


def _probe() -> None:
    """A plain function: compiled by mypyc it is no longer a Python function object."""


#: True when this module runs compiled by mypyc (see the module docstring)
NATIVE: Final = type(_probe) is not FunctionType


def _bisect_right(a: list[int], x: int) -> int:
    """``bisect.bisect_right(a, x)`` as a typed loop: what the compiled build calls
    instead of the C function (see the module docstring); the interpreted build calls
    ``bisect_right`` itself."""
    lo = 0
    hi = len(a)
    while lo < hi:
        mid = (lo + hi) >> 1
        if x < a[mid]:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _bisect_left(a: list[int], x: int) -> int:
    """``bisect.bisect_left(a, x)`` as a typed loop (see :func:`_bisect_right`)."""
    lo = 0
    hi = len(a)
    while lo < hi:
        mid = (lo + hi) >> 1
        if a[mid] < x:
            lo = mid + 1
        else:
            hi = mid
    return lo


class GfnIndex:
    """Ordered map ``base_gfn -> Memslot`` with predecessor lookups.

    Complexities (n slots, L = LOAD): ``find`` O(log n); ``insert``/``remove`` O(log n + L)
    with C-level list moves (plus O(n / L) pointer moves when a chunk splits or merges);
    ``replace`` O(log n); iteration O(1) per slot.
    """

    __slots__ = ("_keys", "_len", "_mins", "_vals")

    def __init__(self) -> None:
        self._mins: list[int] = []
        self._keys: list[list[int]] = []
        self._vals: list[list[Memslot]] = []
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def find(self, gfn: int) -> Memslot | None:
        """The slot containing ``gfn``, or None: ``search_memslots(..., approx=false)``.
        O(log n)."""
        if NATIVE:
            c = _bisect_right(self._mins, gfn)
            if c == 0:
                return None
            vals = self._vals[c - 1]
            lo = 1  # vals[0].base_gfn is the chunk's minimum, <= gfn
            hi = len(vals)
            while lo < hi:
                mid = (lo + hi) >> 1
                if gfn < vals[mid].base_gfn:
                    hi = mid
                else:
                    lo = mid + 1
            s = vals[lo - 1]
        else:
            c = bisect_right(self._mins, gfn) - 1
            if c < 0:
                return None
            s = self._vals[c][bisect_right(self._keys[c], gfn) - 1]
        if gfn < s.base_gfn + s.npages:
            return s
        return None

    def _locate(self, base_gfn: int) -> tuple[int, int]:
        """Chunk and position of ``base_gfn``; KeyError if absent."""
        mins = self._mins
        c = (_bisect_right(mins, base_gfn) if NATIVE else bisect_right(mins, base_gfn)) - 1
        if c >= 0:
            keys = self._keys[c]
            i = _bisect_left(keys, base_gfn) if NATIVE else bisect_left(keys, base_gfn)
            if i < len(keys) and keys[i] == base_gfn:
                return c, i
        raise KeyError(base_gfn)

    def get(self, base_gfn: int) -> Memslot | None:
        """The slot whose ``base_gfn`` is exactly ``base_gfn``."""
        try:
            c, i = self._locate(base_gfn)
        except KeyError:
            return None
        return self._vals[c][i]

    def insert(self, slot: Memslot) -> None:
        """Add ``slot`` keyed by its base_gfn. An equal key is a bug (the kernel BUG()s)."""
        key = slot.base_gfn
        mins = self._mins
        if not mins:
            mins.append(key)
            self._keys.append([key])
            self._vals.append([slot])
            self._len = 1
            return
        c = (_bisect_right(mins, key) if NATIVE else bisect_right(mins, key)) - 1
        if c < 0:
            c = 0
        keys = self._keys[c]
        i = _bisect_left(keys, key) if NATIVE else bisect_left(keys, key)
        if i < len(keys) and keys[i] == key:
            raise KeyError(f"duplicate base_gfn {key:#x} in gfn index")
        keys.insert(i, key)
        self._vals[c].insert(i, slot)
        if i == 0:
            mins[c] = key
        self._len += 1
        if len(keys) >= 2 * LOAD:
            self._split(c)

    def _split(self, c: int) -> None:
        keys, vals = self._keys[c], self._vals[c]
        half = len(keys) >> 1
        self._keys[c : c + 1] = [keys[:half], keys[half:]]
        self._vals[c : c + 1] = [vals[:half], vals[half:]]
        self._mins.insert(c + 1, keys[half])

    def _merge(self, c: int) -> None:
        """Chunk ``c`` has fewer than LOAD // 2 keys: join it to a neighbour (and split the
        result again if that made it too large)."""
        if c == 0:
            c = 1  # merge chunk 1 into chunk 0
        keys, vals = self._keys, self._vals
        keys[c - 1].extend(keys[c])
        vals[c - 1].extend(vals[c])
        del keys[c], vals[c], self._mins[c]
        if len(keys[c - 1]) >= 2 * LOAD:
            self._split(c - 1)

    def remove(self, slot: Memslot) -> None:
        """Remove the entry of ``slot`` (matched by base_gfn and identity)."""
        c, i = self._locate(slot.base_gfn)
        if self._vals[c][i] is not slot:
            raise KeyError(f"slot at {slot.base_gfn:#x} is not the indexed one")
        keys = self._keys[c]
        del keys[i]
        del self._vals[c][i]
        self._len -= 1
        if not keys:
            del self._keys[c], self._vals[c], self._mins[c]
            return
        if i == 0:
            self._mins[c] = keys[0]
        if len(keys) < LOAD // 2 and len(self._mins) > 1:
            self._merge(c)

    def replace(self, old: Memslot, new: Memslot) -> None:
        """Put ``new`` where ``old`` is (same base_gfn): the kernel's ``rb_replace_node``."""
        c, i = self._locate(old.base_gfn)
        if self._vals[c][i] is not old or new.base_gfn != old.base_gfn:
            raise KeyError("replace needs the indexed slot and an equal base_gfn")
        self._vals[c][i] = new

    def __iter__(self) -> Iterator[Memslot]:
        for vals in self._vals:
            yield from vals

    def iter_from(self, gfn: int) -> Iterator[Memslot]:
        """Slots in ascending base_gfn order, starting with the one containing ``gfn`` if
        any, else the first one above it (the kernel's gfn-range iterator start)."""
        return self.iter_range(gfn, -1)

    def iter_range(self, start: int, end: int) -> Iterator[Memslot]:
        """Slots intersecting the gfn range ``[start, end)`` in ascending base_gfn order
        (``end`` -1: no end), lazily: ``kvm_for_each_memslot_in_gfn_range``.
        O(log n + k)."""
        mins = self._mins
        if not mins:
            return
        c = (_bisect_right(mins, start) if NATIVE else bisect_right(mins, start)) - 1
        if c < 0:
            c, i = 0, 0
        else:
            keys = self._keys[c]
            i = (_bisect_right(keys, start) if NATIVE else bisect_right(keys, start)) - 1
            s = self._vals[c][i]
            if s.base_gfn + s.npages <= start:
                i += 1
        vals_all = self._vals
        while c < len(vals_all):
            vals = vals_all[c]
            while i < len(vals):
                s = vals[i]
                if 0 <= end <= s.base_gfn:
                    return
                yield s
                i += 1
            c += 1
            i = 0

    def first(self) -> Memslot | None:
        """The slot with the lowest base_gfn."""
        return self._vals[0][0] if self._vals else None

    def last(self) -> Memslot | None:
        """The slot with the highest base_gfn."""
        return self._vals[-1][-1] if self._vals else None

    def chunk_sizes(self) -> list[int]:
        """The number of keys in each chunk (for tests and statistics). O(n / L)."""
        return [len(k) for k in self._keys]

    def check(self) -> None:
        """Assert the internal structure is consistent (for tests)."""
        total = 0
        prev = -1
        require(
            len(self._mins) == len(self._keys) == len(self._vals),
            "len(self._mins) == len(self._keys) == len(self._vals)",
        )
        for m, keys, vals in zip(self._mins, self._keys, self._vals, strict=True):
            require(keys, "empty chunk")
            require(len(keys) < 2 * LOAD, "chunk too large (missed split)")
            require(len(self._keys) == 1 or len(keys) >= LOAD // 2, "chunk too small")
            require(len(keys) == len(vals), "chunk keys and slots differ in length")
            require(m == keys[0], "chunk minimum is stale")
            for k, v in zip(keys, vals, strict=True):
                require(k == v.base_gfn, "key does not match slot")
                require(k > prev, "keys not strictly ascending")
                prev = k
            total += len(keys)
        require(total == self._len, "length is off")
