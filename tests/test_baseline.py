"""The array baseline (memslots.baseline.ArrayVm): its array mechanics, and differential
tests against the tree engine: the same random sequence of requests, lookups, dirty-log
calls and injected faults applied to both gives the same results, slot tables,
generations and accounting after every step."""

from __future__ import annotations

import errno
import random
import threading
from collections.abc import Callable
from itertools import pairwise
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import AnyVm
from memslots import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, MemslotError, Vm
from memslots.baseline import ArrayMemslotSet, ArrayVm
from memslots.faults import POINTS
from memslots.slot import Memslot
from memslots.validate import Change

PAGE = 4096
HVA = 0x100000


def table(vm: AnyVm) -> list[tuple[int, int, int, int, int, int]]:
    return [s.as_tuple() for s in vm.slots()]


def outcome(fn: Callable[[], Any]) -> tuple[str, Any]:
    """("ok", value) or ("err", errno) of one call."""
    try:
        return ("ok", fn())
    except MemslotError as exc:
        return ("err", exc.errno)


# --------------------------------------------------------------------------------------
# The array itself
# --------------------------------------------------------------------------------------
def _slot(id: int, base: int, n: int = 1) -> Memslot:
    return Memslot(id, 0, base, n, 0, HVA + base * PAGE)


def _ids(s: ArrayMemslotSet) -> list[int]:
    return [x.id for x in s]


def test_update_memslots_keeps_the_array_sorted_and_indexed() -> None:
    s = ArrayMemslotSet(0, 0)
    # create in descending, ascending and middle positions (insert_back + move_forward)
    for id, base in [(0, 50), (1, 10), (2, 90), (3, 30), (4, 70)]:
        s._update_memslots(id, _slot(id, base))
        s.check_invariants()
    assert _ids(s) == [1, 3, 0, 4, 2]
    # move toward higher gfns (move_backward) and toward lower gfns (move_forward)
    s._update_memslots(1, _slot(1, 80))
    s.check_invariants()
    assert _ids(s) == [3, 0, 4, 1, 2]
    s._update_memslots(2, _slot(2, 0))
    s.check_invariants()
    assert _ids(s) == [2, 3, 0, 4, 1]
    # a move that keeps the position, then deletes at both ends and in the middle
    s._update_memslots(0, _slot(0, 51))
    assert _ids(s) == [2, 3, 0, 4, 1]
    for id in (2, 1, 0):
        s._update_memslots(id, None)
        s.check_invariants()
    assert _ids(s) == [3, 4]
    assert s.id_to_memslot(0) is None and s.id_to_memslot(4) is not None


def test_lookups_binary_search_behind_lru_slot() -> None:
    s = ArrayMemslotSet(0, 0)
    for id, base in [(0, 0), (1, 10), (2, 20)]:
        s._update_memslots(id, _slot(id, base, 5))
    assert s.gfn_to_memslot(22) is s.id_to_memslot(2)
    assert s.last_used_slot is s.id_to_memslot(2) and s.lru_slot == 2
    assert s.gfn_to_memslot(7) is None  # a hole: the cache is kept
    assert s.lru_slot == 2
    assert s.search(1) is s.id_to_memslot(0)
    assert s.lru_slot == 2  # search_memslots does not touch the cache
    assert s.gfn_to_memslot(25) is None and s.gfn_to_memslot(-1) is None
    # deleting past the cached index resets it to 0, as kvm_memslot_delete does
    s._update_memslots(2, None)
    assert s.lru_slot == 0
    assert [x.id for x in s.iter_gfn_range(4, 11)] == [0, 1]
    assert [x.id for x in s.iter_gfn_range(5, 10)] == []
    assert [x.id for x in s.iter_gfn_range(0, 0)] == []


def test_every_change_duplicates_the_array_and_frees_the_old_one() -> None:
    vm = ArrayVm(nr_address_spaces=1)
    for i in range(4):
        vm.set_user_memory_region(i, 0, i * PAGE, PAGE, HVA)
    before = vm.memslots(0)
    before_list = before._slots
    snapshot = list(before_list)
    vm.set_user_memory_region(1, KVM_MEM_LOG_DIRTY_PAGES, PAGE, PAGE, HVA)
    after = vm.memslots(0)
    assert after is not before
    assert after._slots is not before_list
    assert before_list == snapshot  # the published array was never written
    assert len(before) == 0  # the old array was freed
    # unchanged slots are the same objects, the changed one is new
    assert [a is b for a, b in zip(snapshot, after, strict=True)] == [True, False, True, True]
    vm.check_invariants()


@pytest.mark.parametrize("impl", [Vm, ArrayVm], ids=["tree", "array"])
@pytest.mark.parametrize("change", ["delete", "move"])
def test_invalid_copy_is_published_while_the_slot_goes(impl: type[AnyVm], change: str) -> None:
    vm = impl(nr_address_spaces=1)
    vm.set_user_memory_region(0, 0, 0, 4 * PAGE, HVA)
    vm.set_user_memory_region(1, 0, 16 * PAGE, 4 * PAGE, HVA)
    seen: list[tuple[bool, int, bool]] = []

    def cb(old: Memslot) -> None:
        s = vm.gfn_to_memslot(17)
        assert s is not None
        seen.append((s.invalid, s.base_gfn, vm.is_visible_gfn(17)))

    vm.register_invalidate_callback(cb)
    gen = vm.memslots(0).generation
    if change == "delete":
        vm.set_user_memory_region(1, 0, 0, 0, 0)
    else:
        vm.set_user_memory_region(1, 0, 32 * PAGE, 4 * PAGE, HVA)
    assert seen == [(True, 16, False)]
    assert vm.memslots(0).generation == gen + 2
    assert vm.callback_errors == []
    vm.check_invariants()


@pytest.mark.parametrize("point", ["dirty_bitmap", "arch_prepare"])
def test_failed_move_restores_the_slot_and_advances_the_generation(point: str) -> None:
    vm = ArrayVm(nr_address_spaces=1)
    vm.set_user_memory_region(0, 0, 0, 4 * PAGE, HVA)
    old = vm.id_to_memslot(0)
    vm.faults.inject(point)
    with pytest.raises(MemslotError) as ei:
        vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 8 * PAGE, 4 * PAGE, HVA)
    assert ei.value.errno == errno.ENOMEM
    assert vm.id_to_memslot(0) is old and not old.invalid  # type: ignore[union-attr]
    assert vm.memslots(0).generation == 1 + 2  # create: one swap; failed move: two
    vm.check_invariants()


def test_readers_never_see_a_torn_array() -> None:
    """A reader thread looking up gfns while the writer moves a slot back and forth only
    ever sees the slot (valid or INVALID) that holds the gfn, or nothing. Bounded: 200
    moves."""
    vm = ArrayVm(nr_address_spaces=1)
    for i in range(64):
        vm.set_user_memory_region(i, 0, i * 4 * PAGE, 4 * PAGE, HVA + i * 4 * PAGE)
    stop = threading.Event()
    errors: list[str] = []

    def reader() -> None:
        vcpu = vm.create_vcpu(0)
        while not stop.is_set():
            for gfn in (0, 17, 63 * 4, 63 * 4 + 3, 1000 * 4):
                s = vcpu.gfn_to_memslot(gfn)
                if s is not None and not s.base_gfn <= gfn < s.base_gfn + s.npages:
                    errors.append(f"gfn {gfn} -> {s}")
                if s is None and gfn < 63 * 4:
                    errors.append(f"gfn {gfn} lost")
            with vm.read_section():
                n = len(list(vm.memslots(0)))
                if n != 64:
                    errors.append(f"{n} slots")

    t = threading.Thread(target=reader)
    t.start()
    try:
        for _ in range(100):
            vm.set_user_memory_region(63, 0, 1000 * 4 * PAGE, 4 * PAGE, HVA + 63 * 4 * PAGE)
            vm.set_user_memory_region(63, 0, 63 * 4 * PAGE, 4 * PAGE, HVA + 63 * 4 * PAGE)
    finally:
        stop.set()
        t.join(30.0)
    assert not t.is_alive()
    assert errors == []
    vm.check_invariants()


# --------------------------------------------------------------------------------------
# Differential: engine vs array baseline
# --------------------------------------------------------------------------------------
IDS = st.one_of(st.integers(0, 6), st.sampled_from([32763, 32764]))
AS = st.sampled_from([0, 0, 0, 1, 2])
PAGES = st.integers(0, 48)
NPAGES = st.one_of(st.integers(0, 10), st.just(100))
FLAGS = st.sampled_from([0, 0, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, 3, 4, 1 << 31])
HVAS = st.integers(0, 6).map(lambda p: HVA + p * 4 * PAGE)

region = st.tuples(
    st.just("region"), st.booleans(), AS, IDS, FLAGS, PAGES, NPAGES, HVAS,
    st.one_of(st.none(), st.none(), st.sampled_from(POINTS)),
)  # fmt: skip
create = st.tuples(
    st.just("region"), st.just(False), st.sampled_from([0, 0, 1]), st.integers(0, 6),
    st.sampled_from([0, 1, 2, 3]), PAGES, st.integers(1, 10), HVAS, st.just(None),
)  # fmt: skip
# an existing slot (chosen by index at run time): move, delete, toggle flags or no-op
existing = st.tuples(
    st.just("existing"), st.integers(0, 20), st.sampled_from(["move", "delete", "flags", "same"]),
    PAGES, st.booleans(), st.one_of(st.none(), st.none(), st.sampled_from(POINTS)),
)  # fmt: skip
lookup = st.tuples(st.just("lookup"), st.integers(-1, 160), st.sampled_from([0, 1]))
ranges = st.tuples(st.just("ranges"), st.integers(0, 160), st.integers(0, 40), AS)
dirty = st.tuples(st.just("dirty"), st.integers(0, 160))
getlog = st.tuples(st.just("getlog"), AS, IDS)
clearlog = st.tuples(st.just("clearlog"), AS, IDS, st.sampled_from([0, 64]), st.integers(0, 70))
manual = st.tuples(st.just("manual"), st.sampled_from([0, 1, 3]))
OPS = st.lists(
    st.one_of(
        region,
        region,
        existing,
        existing,
        existing,
        lookup,
        ranges,
        dirty,
        getlog,
        clearlog,
        manual,
    ),
    max_size=60,
)


class _Pair:
    """The engine and the baseline side by side, each with a vCPU."""

    def __init__(self) -> None:
        self.vms: list[AnyVm] = [Vm(nr_address_spaces=2), ArrayVm(nr_address_spaces=2)]
        self.vcpus = [vm.create_vcpu(0) for vm in self.vms]
        self.callbacks: list[list[tuple[int, ...]]] = [[], []]
        for i, vm in enumerate(self.vms):
            vm.register_invalidate_callback(
                lambda s, i=i: self.callbacks[i].append(s.as_tuple())  # type: ignore[misc]
            )

    def both(self, fn: Callable[[AnyVm, int], Any]) -> Any:
        a, b = (outcome(lambda vm=vm, i=i: fn(vm, i)) for i, vm in enumerate(self.vms))  # type: ignore[misc]
        assert a == b
        return a

    def step(self, op: tuple[Any, ...]) -> None:
        kind = op[0]
        if kind == "region":
            _, v2, as_id, id, flags, page, npages, hva, fault = op
            slot = (as_id << 16) | id

            def call(vm: AnyVm, _i: int) -> None:
                if fault is not None:
                    vm.faults.inject(fault)
                try:
                    f = vm.set_user_memory_region2 if v2 else vm.set_user_memory_region
                    f(slot, flags, page * PAGE, npages * PAGE, hva)
                finally:
                    vm.faults.clear()

            self.both(call)
            assert self.vms[0].last_change == self.vms[1].last_change
        elif kind == "existing":
            _, k, what, page, log, fault = op
            slots = self.vms[0].slots()
            if not slots:
                return
            s = slots[k % len(slots)]
            base, flags = s.base_gfn, s.flags
            if what == "move":
                base = page
                flags = (flags & ~KVM_MEM_LOG_DIRTY_PAGES) | (KVM_MEM_LOG_DIRTY_PAGES * log)
            elif what == "flags":
                flags ^= KVM_MEM_LOG_DIRTY_PAGES
            size = 0 if what == "delete" else s.npages * PAGE
            self.step(
                ("region", False, s.as_id, s.id, flags, base, size // PAGE, s.userspace_addr, fault)
            )
        elif kind == "lookup":
            _, gfn, as_id = op
            for v in self.vcpus:
                v.as_id = as_id

            def look(vm: AnyVm, i: int) -> tuple[Any, ...]:
                s = vm.gfn_to_memslot(gfn)
                c = self.vcpus[i].gfn_to_memslot(gfn)
                return (
                    s and s.as_tuple(),
                    c and c.as_tuple(),
                    vm.gfn_to_hva(gfn),
                    vm.gfn_to_hva(gfn, write=False),
                    vm.is_visible_gfn(gfn),
                )

            self.both(look)
        elif kind == "ranges":
            _, start, length, as_id = op

            def walk(vm: AnyVm, _i: int) -> tuple[Any, ...]:
                with vm.read_section():
                    s = vm.memslots(min(as_id, 1))
                    g = [x.as_tuple() for x in s.iter_gfn_range(start, start + length)]
                    hs = HVA + start * PAGE
                    h = [x.as_tuple() for x in s.iter_hva_range(hs, hs + length * PAGE - 1)]
                    f, la = s.first(), s.last()
                    return (g, h, len(s), f and f.as_tuple(), la and la.as_tuple())

            self.both(walk)
        elif kind == "dirty":
            self.both(lambda vm, _i: vm.mark_page_dirty(op[1]))
        elif kind == "getlog":
            self.both(lambda vm, _i: vm.get_dirty_log((op[1] << 16) | op[2]))
        elif kind == "clearlog":
            _, as_id, id, first, num = op
            bitmap = b"\xa5" * 16
            self.both(lambda vm, _i: vm.clear_dirty_log((as_id << 16) | id, first, num, bitmap))
        elif kind == "manual":
            self.both(lambda vm, _i: vm.enable_manual_dirty_log_protect(op[1]))
        else:  # pragma: no cover
            raise AssertionError(kind)

    def check(self) -> None:
        e, a = self.vms
        assert table(e) == table(a)
        for as_id in range(2):
            assert e.memslots(as_id).generation == a.memslots(as_id).generation
        assert e.nr_memslot_pages == a.nr_memslot_pages
        assert e.nr_memslots_dirty_logging == a.nr_memslots_dirty_logging
        assert e.dirty_bitmap_bytes == a.dirty_bitmap_bytes
        assert e.faults.hits == a.faults.hits
        assert self.callbacks[0] == self.callbacks[1]
        for x, y in zip(e.slots(), a.slots(), strict=True):
            assert x.dirty_bitmap == y.dirty_bitmap
        e.check_invariants()
        a.check_invariants()


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(ops=OPS)
def test_random_sequences_give_identical_results(ops: list[tuple[Any, ...]]) -> None:
    pair = _Pair()
    for op in ops:
        pair.step(op)
        pair.check()


def dense_ops(rng: random.Random, n: int, ids: int) -> list[tuple[Any, ...]]:
    """``n`` operations in which most requests are valid or nearly so: creates, and moves,
    deletes, flag toggles and no-ops of existing slots (a fifth of them with a fault),
    mixed with arbitrary requests, lookups, range walks and dirty-log calls."""
    ops: list[tuple[Any, ...]] = []
    for _ in range(n):
        r = rng.random()
        id = rng.randrange(ids)
        fault = rng.choice(POINTS) if rng.random() < 0.2 else None
        if r < 0.25:
            hva = HVA + id * 8 * PAGE
            ops.append(("region", rng.random() < 0.3, rng.choice([0, 0, 1]), id,
                        rng.choice([0, 1, 2, 3]), rng.randrange(4 * ids), 1 + id % 5, hva,
                        None))  # fmt: skip
        elif r < 0.55:
            ops.append(("existing", rng.randrange(ids), rng.choice(["move", "delete", "flags",
                        "same"]), rng.randrange(4 * ids), rng.random() < 0.5, fault))  # fmt: skip
        elif r < 0.62:
            as_id, slot_id = rng.choice([0, 1, 2]), rng.choice([id, 32764])
            flags = rng.choice([0, 1, 2, 4, 1 << 31])
            npages, hva = rng.choice([0, 1, 3, 100]), HVA + rng.randrange(8) * PAGE
            v2 = rng.random() < 0.5
            ops.append(("region", v2, as_id, slot_id, flags, rng.randrange(4 * ids), npages, hva,
                        fault))  # fmt: skip
        elif r < 0.77:
            ops.append(("lookup", rng.randrange(-1, 4 * ids + 8), rng.choice([0, 1])))
        elif r < 0.87:
            ops.append(("ranges", rng.randrange(4 * ids), rng.randrange(40), rng.choice([0, 1])))
        elif r < 0.92:
            ops.append(("dirty", rng.randrange(4 * ids)))
        elif r < 0.95:
            ops.append(("getlog", rng.choice([0, 1]), id))
        elif r < 0.98:
            ops.append(("clearlog", rng.choice([0, 1]), id, rng.choice([0, 64]), rng.randrange(70)))
        else:
            ops.append(("manual", rng.choice([0, 1, 3])))
    return ops


@pytest.mark.parametrize("seed", range(8))
def test_dense_seeded_sequences_give_identical_results(seed: int) -> None:
    """400 dense operations per seed over 12 ids (frequent overlaps, moves, faults)."""
    pair = _Pair()
    changes: set[Any] = set()
    for op in dense_ops(random.Random(seed), 400, 12):
        pair.step(op)
        pair.check()
        changes.add(pair.vms[0].last_change)
    assert {Change.CREATE, Change.DELETE, Change.MOVE, Change.FLAGS_ONLY} <= changes


def test_a_long_sequence_with_many_slots() -> None:
    """1500 operations over 300 ids: both designs shift and copy real arrays."""
    pair = _Pair()
    for op in dense_ops(random.Random(6), 1500, 300):
        pair.step(op)
        pair.check()
    assert len(pair.vms[1].memslots(0)) > 50


# --------------------------------------------------------------------------------------
# memslots.tools.bench and `memslots bench` (smoke tests: tiny sizes, no timing assertions)
# --------------------------------------------------------------------------------------
def test_perf_layout_splits_the_test_memory_like_memslot_perf_test() -> None:
    from memslots.tools.bench import MEM_GPA, MEM_SIZE, perf_layout

    for n in (4, 509, 32764):
        layout = perf_layout(n)
        assert len(layout) == n
        assert layout[0][0] == MEM_GPA
        assert sum(size for _, size in layout) == MEM_SIZE
        for (g1, s1), (g2, _) in pairwise(layout):
            assert g1 + s1 == g2
        assert layout[-1][1] >= layout[0][1]  # the last slot takes the remainder


@pytest.mark.parametrize("impl", [Vm, ArrayVm], ids=["tree", "array"])
def test_invalidate_hva_range_matches_a_brute_force_walk(impl: type[AnyVm]) -> None:
    from memslots.tools.bench import invalidate_hva_range

    vm = impl(nr_address_spaces=2)
    rng = random.Random(1)
    for i in range(40):
        as_id = i % 2
        vm.set_user_memory_region(
            (as_id << 16) | i, 0, i * 16 * PAGE, rng.randrange(1, 12) * PAGE,
            HVA + rng.randrange(64) * PAGE,
        )  # fmt: skip
    for _ in range(200):
        start = HVA + rng.randrange(-8, 80) * PAGE + rng.choice([0, 100])
        end = start + rng.randrange(1, 20 * PAGE)
        expected = 0
        for s in vm.slots():
            lo, hi = s.userspace_addr, s.userspace_addr + s.npages * PAGE
            hs, he = max(start, lo), min(end, hi)
            if hs < he:
                expected += ((he + PAGE - 1 - lo) // PAGE) - ((hs - lo) // PAGE)
        assert invalidate_hva_range(vm, start, end) == expected


def _tiny_config(**kw: Any) -> Any:
    from memslots.tools.bench import BenchConfig

    values: dict[str, Any] = {
        "slots": 16, "counts": (4, 16, 64), "duration": 0.002, "repetitions": 1,
        "impls": ("tree", "array"), "cpu": None,
        "scenarios": ("setup", "move-active", "move-inactive", "unmap", "unmap-chunked", "sweep"),
    }  # fmt: skip
    values.update(kw)
    return BenchConfig(**values)


def test_bench_library_runs_every_cheap_scenario_and_the_sweep() -> None:
    from memslots.tools.bench import OPS, run

    r = run(_tiny_config())
    got = {(s.scenario, s.impl) for s in r.scenarios}
    for impl in ("tree", "array"):
        for s in ("setup", "move-active", "move-inactive", "unmap", "unmap-chunked"):
            assert (s, impl) in got
        for count in (4, 16, 64):
            for op in OPS:
                v = r.point(impl, count, op)
                assert v is not None and v > 0
    active = r.scenario("move-active", "tree")
    inactive = r.scenario("move-inactive", "array")
    assert active is not None and inactive is not None
    assert active.detail["lookups_without_slot"] > 0  # the moved half is away
    assert inactive.detail["lookups_without_slot"] == 0
    unmap = r.scenario("unmap", "array")
    assert unmap is not None and unmap.detail["pages_invalidated"] == unmap.detail["calls"]
    c = r.criteria
    assert c["largest_count"] == 64 and "array_vs_tree_at_top" in c
    assert "array_vs_tree_at_top_ok" not in c  # judged only at 32764 slots
    assert r.to_json()["sweep"]


def test_bench_config_rejects_bad_values() -> None:
    for kw in ({"counts": (16, 8)}, {"counts": (2,)}, {"slots": 40000}, {"duration": 0},
               {"impls": ("nope",)}, {"scenarios": ("nope",)}):  # fmt: skip
        with pytest.raises(ValueError):
            _tiny_config(**kw).validate()


def test_cli_bench_prints_tables_and_writes_json(
    tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from memslots.tools.cli import main

    out = tmp_path / "r.json"
    status = main(["bench", "--slots", "16", "--counts", "4,16", "--duration", "0.002",
                   "--repetitions", "1", "--impl", "tree,array", "--cpu", "none",
                   "--scenario", "setup,unmap-chunked,sweep", "--no-progress",
                   "--json", str(out)])  # fmt: skip
    text = capsys.readouterr().out
    assert status == 0
    assert "Per-operation cost" in text and "unmap-chunked" in text
    data = json.loads(out.read_text())
    assert {p["impl"] for p in data["sweep"]} == {"tree", "array"}
    assert main(["bench", "--counts", "16,8"]) == 2


@pytest.mark.kvm
def test_bench_kernel_columns() -> None:
    from memslots.tools.bench import run

    r = run(_tiny_config(impls=("tree", "kvm", "ioctl"), counts=(4, 16),
                         scenarios=("setup", "move-active", "sweep")))  # fmt: skip
    assert r.scenario("setup", "ioctl") is not None
    assert r.scenario("move-active", "kvm") is not None
    assert r.scenario("move-active", "ioctl") is None  # no lookups without the engine
    assert r.point("ioctl", 16, "move") is not None
    assert "tree_vs_ioctl_at_top" in r.criteria


@pytest.mark.parametrize("design", [Vm, ArrayVm])
def test_vcpu_creation_has_the_kernels_checks_in_both_designs(design: type[Vm | ArrayVm]) -> None:
    vm = design()
    vm.create_vcpu(0)
    for bad, err in ((0, errno.EEXIST), (4096, errno.EINVAL), (-1, errno.EINVAL)):
        with pytest.raises(MemslotError) as exc:
            vm.create_vcpu(bad)
        assert exc.value.errno == err
    assert vm.created_vcpus == 1  # failures are not counted
    for i in range(1, 1024):
        vm.create_vcpu(i)
    with pytest.raises(MemslotError) as exc:
        vm.create_vcpu(2000)  # a free id, but KVM_MAX_VCPUS are there
    assert exc.value.errno == errno.EINVAL
