"""The peers and workers ``memslots bench`` measures beside the engine
(:mod:`memslots.tools.bench_peers`): each maps the four memslot operations onto its own
calls correctly, and the workers answer what the sweep asks (no timing assertions)."""

from __future__ import annotations

import ctypes
import importlib.util
import mmap
from typing import Any

import pytest

import memslots
from memslots.constants import KVM_MEM_LOG_DIRTY_PAGES
from memslots.tools.bench import OPS, BenchConfig, run
from memslots.tools.bench_peers import EngineWorker, UnicornTarget, VmMemoryModel

PAGE = 4096
HVA = 0x7F00_0000_0000


def test_vm_memory_model_keeps_a_sorted_checked_vector() -> None:
    m = VmMemoryModel()
    m.set_user_memory_region(0, 0, 0x10000, 4 * PAGE, HVA)
    m.set_user_memory_region(1, 0, 0x0, 2 * PAGE, HVA + 0x100000)
    m.set_user_memory_region(2, 0, 0x20000, PAGE, HVA + 0x200000)
    assert [r[0] for r in m.regions] == [0x0, 0x10000, 0x20000]
    assert m.find_region(0x10000 + 4 * PAGE - 1) == (0x10000, 0x10000 + 4 * PAGE - 1, HVA)
    assert m.find_region(0x10000 + 4 * PAGE) is None  # one past the end
    assert m.find_region(0x10000 - 1) is None
    before = list(m.regions)
    with pytest.raises(ValueError, match="MemoryRegionOverlap"):
        m.insert_region(0x10000 + 3 * PAGE, 2 * PAGE, HVA)  # shares the last page of 0
    assert m.regions == before  # the failed insert left the vector as it was
    # a move is a removal and an insertion; so is a flags change (regions are immutable)
    m.set_user_memory_region(0, 0, 0x40000, 4 * PAGE, HVA)
    assert [r[0] for r in m.regions] == [0x0, 0x20000, 0x40000]
    m.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0x40000, 4 * PAGE, HVA)
    assert [r[0] for r in m.regions] == [0x0, 0x20000, 0x40000]
    m.set_user_memory_region(1, 0, 0x0, 0, 0)  # delete
    assert [r[0] for r in m.regions] == [0x20000, 0x40000]
    with pytest.raises(ValueError, match="NoMemoryRegion"):
        m.remove_region(0x0, 2 * PAGE)


def test_vm_memory_model_preload_is_the_same_as_inserting() -> None:
    regions = [(0x100000 + i * 4 * PAGE, 4 * PAGE, HVA + i * 4 * PAGE) for i in range(50)]
    a, b = VmMemoryModel(), VmMemoryModel()
    a.preload(regions)
    for i, (gpa, size, hva) in enumerate(regions):
        b.set_user_memory_region(i, 0, gpa, size, hva)
    assert a.regions == b.regions
    a.set_user_memory_region(7, 0, 0, 0, 0)
    b.set_user_memory_region(7, 0, 0, 0, 0)
    assert a.regions == b.regions and len(a.regions) == 49


@pytest.mark.parametrize(("impl", "pure"), [("tree", False), ("tree", True), ("array", False),
                                           ("vmmemory", False)])  # fmt: skip
def test_engine_worker_grows_and_times_the_four_operations(impl: str, pure: bool) -> None:
    w = EngineWorker(impl, pure=pure)
    try:
        w.grow(8, HVA, 4 * PAGE)
        w.grow(32, HVA, 4 * PAGE)
        ops = w.time_ops(32, HVA, 4 * PAGE, 0.002)
    finally:
        w.close()
    assert [op for op, _, _ in ops] == list(OPS)
    assert all(us > 0 and n > 0 for _, us, n in ops)


def test_engine_worker_reports_an_error_of_the_worker() -> None:
    w = EngineWorker("tree")
    try:
        with pytest.raises(RuntimeError, match="unknown command"):
            w._call({"cmd": "nope"})
        w.grow(4, HVA, 4 * PAGE)  # still serving
    finally:
        w.close()


def test_sweep_measures_the_workers_beside_the_tree() -> None:
    cfg = BenchConfig(slots=16, counts=(4, 16), duration=0.002, repetitions=1,
                      impls=("tree", "pure", "array", "vmmemory"), cpu=None,
                      scenarios=("sweep",))  # fmt: skip
    r = run(cfg)
    # a pure install is its own pure build: the "pure" column is skipped with a note
    impls = (
        ("tree", "pure", "array", "vmmemory")
        if memslots.COMPILED
        else ("tree", "array", "vmmemory")
    )
    if not memslots.COMPILED:
        assert any(n.startswith("pure: skipped") for n in r.notes)
    for impl in impls:
        for op in OPS:
            v = r.point(impl, 16, op)
            assert v is not None and v > 0, (impl, op)
    assert r.criteria["vmmemory_vs_tree"]["count"] == 16


@pytest.mark.skipif(importlib.util.find_spec("unicorn") is None, reason="unicorn not installed")
def test_unicorn_target_maps_protects_and_unmaps() -> None:
    buf = mmap.mmap(-1, 16 * PAGE)
    hva = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    t = UnicornTarget()
    uc: Any = t._uc
    try:
        t.set_user_memory_region(0, 0, 0x10000, 4 * PAGE, hva)
        t.set_user_memory_region(1, 0, 0x20000, 4 * PAGE, hva + 4 * PAGE)
        assert sorted(uc.mem_regions()) == [(0x10000, 0x13FFF, 7), (0x20000, 0x23FFF, 7)]
        t.set_user_memory_region(1, KVM_MEM_LOG_DIRTY_PAGES, 0x20000, 4 * PAGE, hva + 4 * PAGE)
        assert sorted(uc.mem_regions())[1] == (0x20000, 0x23FFF, 5)  # write-protected
        t.set_user_memory_region(0, 0, 0x40000, 4 * PAGE, hva)  # move
        assert sorted(r[0] for r in uc.mem_regions()) == [0x20000, 0x40000]
        uc.mem_write(0x40000, b"mapped")  # through the host memory given
        assert buf[:6] == b"mapped"
        t.set_user_memory_region(1, 0, 0x20000, 0, 0)  # delete
        assert [r[0] for r in uc.mem_regions()] == [0x40000]
    finally:
        t.close()
        del uc
        buf.close()
