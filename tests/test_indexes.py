"""The gfn index and the hva interval tree against brute force, with enough slots to
split chunks and rotate the tree."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from memslots.gfn_index import LOAD, GfnIndex
from memslots.hva_tree import HvaTree
from memslots.memslot_set import MemslotSet
from memslots.slot import Memslot


def _slots(n: int, seed: int) -> list[Memslot]:
    rng = random.Random(seed)
    bases = rng.sample(range(0, 40 * n, 4), n)
    return [
        Memslot(i, 0, b, rng.randint(1, 3), 0, rng.randrange(0, 1 << 20) << 12)
        for i, b in enumerate(bases)
    ]


def test_gfn_index_many_slots_split_and_shrink() -> None:
    idx = GfnIndex()
    slots = _slots(5 * LOAD, 1)
    for s in slots:
        idx.insert(s)
    idx.check()
    assert len(idx._mins) > 2, "chunks should have split"
    rng = random.Random(2)
    for g in rng.sample(range(40 * len(slots)), 2000):
        want = [s for s in slots if s.base_gfn <= g < s.base_gfn + s.npages]
        assert idx.find(g) is (want[0] if want else None)
    rng.shuffle(slots)
    for s in slots[: len(slots) - 3]:
        idx.remove(s)
        assert idx.get(s.base_gfn) is None
    idx.check()
    assert len(idx) == 3
    assert [s.base_gfn for s in idx] == sorted(s.base_gfn for s in slots[-3:])


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(st.tuples(st.booleans(), st.integers(0, 300), st.integers(1, 4)), max_size=300),
    queries=st.lists(st.integers(0, 310), max_size=30),
)
def test_gfn_index_matches_brute_force(
    ops: list[tuple[bool, int, int]], queries: list[int]
) -> None:
    idx = GfnIndex()
    live: dict[int, Memslot] = {}
    for n, (add, base, npages) in enumerate(ops):
        if add:
            if any(b <= base < b + s.npages or base <= b < base + npages
                   for b, s in live.items()):  # fmt: skip
                continue
            s = Memslot(n, 0, base, npages, 0, 0)
            idx.insert(s)
            live[base] = s
        elif live:
            b = sorted(live)[base % len(live)]
            idx.remove(live.pop(b))
    idx.check()
    assert list(idx) == [live[b] for b in sorted(live)]
    for g in queries:
        want = [s for s in live.values() if s.base_gfn <= g < s.base_gfn + s.npages]
        assert idx.find(g) is (want[0] if want else None)
        after = [live[b] for b in sorted(live) if live[b].base_gfn + live[b].npages > g]
        assert list(idx.iter_from(g)) == after


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(st.tuples(st.booleans(), st.integers(0, 64), st.integers(1, 8)), max_size=200),
    queries=st.lists(st.tuples(st.integers(0, 80), st.integers(0, 20)), max_size=30),
)
def test_hva_tree_matches_brute_force(
    ops: list[tuple[bool, int, int]], queries: list[tuple[int, int]]
) -> None:
    tree = HvaTree()
    live: dict[int, Memslot] = {}
    next_id = 0
    for add, page, npages in ops:
        if add or not live:
            s = Memslot(next_id, 0, next_id * 16, npages, 0, page << 12)
            next_id += 1
            tree.insert(s)
            live[s.id] = s
        else:
            victim = sorted(live)[page % len(live)]
            tree.remove(live.pop(victim))
    tree.check()
    for start_page, span in queries:
        start = start_page << 12
        last = start + (span << 12) + 17
        want = sorted(
            (s for s in live.values() if s.userspace_addr <= last and s.hva_last >= start),
            key=lambda s: (s.userspace_addr, s.id),
        )
        assert list(tree.iter_range(start, last)) == want


def test_hva_tree_replace_is_in_place() -> None:
    tree = HvaTree()
    a = Memslot(1, 0, 0, 4, 0, 0x1000)
    tree.insert(a)
    b = a.copy()
    b.base_gfn = 100
    tree.replace(a, b)
    assert list(tree) == [b]
    tree.check()


def test_set_ranges_and_inclusive_hva_last() -> None:
    s = MemslotSet(0, 0)
    a = Memslot(0, 0, 0x10, 0x10, 0, 0x100000)
    b = Memslot(1, 0, 0x30, 0x10, 0, 0x100000)  # same hva as a
    c = Memslot(2, 0, 0x50, 1, 0, 0x200000)
    for x in (a, b, c):
        s._replace(None, x)
    s.check_invariants()
    assert list(s.iter_gfn_range(0, 0x10)) == []
    assert list(s.iter_gfn_range(0x1F, 0x31)) == [a, b]
    assert list(s.iter_gfn_range(0x20, 0x30)) == []  # hole between a and b
    assert list(s.iter_gfn_range(0x3F, 0x1000)) == [b, c]
    assert list(s.iter_hva_range(0x10FFFF, 0x10FFFF)) == [a, b]  # last byte of a and b
    assert list(s.iter_hva_range(0x110000, 0x1FFFFF)) == []
    assert list(s.iter_hva_range(0x1FFFFF, 0x200000)) == [c]  # inclusive last
    assert list(s.iter_hva_range(5, 4)) == []
    assert s.gfn_to_memslot(0x55) is None
    assert s.gfn_to_memslot(0x50) is c and s.last_used_slot is c
    assert s.gfn_to_memslot(0x1F) is a and s.last_used_slot is a


def test_gfn_index_merges_small_chunks_after_churn() -> None:
    """Removals merge chunks that fall below LOAD // 2, so the number of chunks stays
    O(n / LOAD) after any churn (without merging this leaves 32 chunks of 4 slots)."""
    idx = GfnIndex()
    slots = [Memslot(i, 0, 4 * i, 1, 0, 0) for i in range(16 * LOAD)]
    for s in slots:
        idx.insert(s)
    assert len(idx.chunk_sizes()) >= 16
    kept = slots[:: LOAD // 2]  # one slot in every 128 stays
    for s in slots:
        if s.id % (LOAD // 2):
            idx.remove(s)
    idx.check()  # every chunk holds LOAD // 2 keys or more, or is the only one
    assert sum(idx.chunk_sizes()) == len(kept) == 32
    assert len(idx.chunk_sizes()) <= 2 * len(kept) // LOAD + 1
    assert list(idx) == kept
    for s in kept:
        assert idx.find(s.base_gfn) is s
        assert idx.find(s.base_gfn + 1) is None
    for s in slots[: 4 * LOAD]:  # grow again: chunks split as before
        if s.id % (LOAD // 2):
            idx.insert(s)
    idx.check()
    assert [s.base_gfn for s in idx] == sorted(s.base_gfn for s in idx)


def test_lookups_stop_at_base_gfn_plus_npages() -> None:
    """``base_gfn + npages`` is outside the slot, on the search, the set-cache hit path
    and the vCPU cache (a hole follows ``a``; ``b`` starts right after ``c``)."""
    from memslots import Vm

    vm = Vm(nr_address_spaces=1)
    vm.set_user_memory_region(0, 0, 0x100 << 12, 0x10 << 12, 0x7F0000000000)  # a
    vm.set_user_memory_region(1, 0, 0x300 << 12, 0x10 << 12, 0x7F0000100000)  # b
    vm.set_user_memory_region(2, 0, 0x2F0 << 12, 0x10 << 12, 0x7F0000200000)  # c
    s = vm.memslots(0)
    vcpu = vm.create_vcpu(0)
    for lookup in (s.search, s.gfn_to_memslot, vm.gfn_to_memslot, vcpu.gfn_to_memslot):
        a = lookup(0x10F)  # the last page of a: fills the caches
        assert a is not None and a.id == 0
        assert lookup(0x110) is None  # one past the end: a miss, though a is cached
        assert lookup(0x100) is a
        c = lookup(0x2FF)
        assert c is not None and c.id == 2
        b = lookup(0x300)  # c's end is b's start
        assert b is not None and b.id == 1
        assert lookup(0x310) is None
        assert lookup(0xFF) is None


@given(
    st.lists(st.integers(0, 1 << 64), max_size=40).map(sorted),
    st.integers(-1, (1 << 64) + 1),
)
def test_gfn_index_typed_bisects_are_bisect(keys: list[int], x: int) -> None:
    """The typed loops the compiled build searches with give ``bisect``'s answers,
    duplicates and both ends included."""
    import bisect

    from memslots import gfn_index

    keys = keys + keys[: len(keys) // 3]
    keys.sort()
    for probe in (x, *keys[:3], *(k + 1 for k in keys[-2:])):
        assert gfn_index._bisect_right(keys, probe) == bisect.bisect_right(keys, probe)
        assert gfn_index._bisect_left(keys, probe) == bisect.bisect_left(keys, probe)
