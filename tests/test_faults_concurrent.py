"""Fault injection at every step of the update protocol while reader threads run.

After each injected failure the VM must be as the kernel's ``kvm_set_memslot`` leaves it:
the same slot objects in both sets, the generation advanced by ``2 * nr_address_spaces``
for a DELETE/MOVE that failed in prepare and unchanged otherwise, page and dirty-bitmap
accounting unchanged (no leaked bitmap), pending dirty bits kept; the request succeeds
when retried. Readers check every answer against the history of published states the
whole time (memslots.tools.stress) and must see nothing wrong.
"""

from __future__ import annotations

import errno
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from memslots import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, Memslot, MemslotError
from memslots.faults import POINTS
from memslots.tools.stress import (
    HistoryVm,
    Reader,
    check_invariants,
    fault_reached,
    generation_delta,
)
from memslots.validate import Change

HVA = 0x7F00_0000_0000
P = 0x1000  # page size
NR = 2  # address spaces of the default (x86) VM
DIRTY_GFN = 0x103  # a page of slot 1, marked dirty before every case


@dataclass
class Busy:
    """A VM with slots, reader threads checking it, and a recording callback."""

    vm: HistoryVm
    readers: list[Reader]
    invalidated: list[tuple[Memslot, Memslot | None]]

    def lookups(self) -> int:
        return sum(r.stats.lookups for r in self.readers)


@pytest.fixture
def busy() -> Iterator[Busy]:
    vm = HistoryVm()
    vm.set_user_memory_region(0, 0, 0x000 * P, 16 * P, HVA)
    vm.set_user_memory_region(1, KVM_MEM_LOG_DIRTY_PAGES, 0x100 * P, 16 * P, HVA + 0x100000)
    vm.set_user_memory_region(2, KVM_MEM_READONLY, 0x200 * P, 16 * P, HVA + 0x200000)
    vm.set_user_memory_region(1 << 16, 0, 0, 16 * P, HVA)
    invalidated: list[tuple[Memslot, Memslot | None]] = []

    def record(old: Memslot) -> None:  # what readers see while the slot is invalidated
        invalidated.append((old, vm.memslots(old.as_id).id_to_memslot(old.id)))

    vm.register_invalidate_callback(record)
    readers = [Reader(vm, i, seed=100 + i) for i in range(2)]
    stop = threading.Event()
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    threads = [threading.Thread(target=r.run, args=(stop,), daemon=True) for r in readers]
    for t in threads:
        t.start()
    try:
        yield Busy(vm, readers, invalidated)
    finally:
        stop.set()
        for t in threads:
            t.join(10.0)
        sys.setswitchinterval(old_interval)
    assert not any(t.is_alive() for t in threads)
    messages = [m for r in readers for m in r.stats.messages]
    assert sum(r.stats.violations + r.stats.lost for r in readers) == 0, messages
    assert sum(r.stats.lookups for r in readers) > 0


#: name -> (slot, flags, gfn, npages, hva, change); the targets are the fixture's slots
OPS: dict[str, tuple[int, int, int, int, int, Change]] = {
    "create": (5, 0, 0x300, 16, HVA + 0x300000, Change.CREATE),
    "create-logging": (5, KVM_MEM_LOG_DIRTY_PAGES, 0x300, 16, HVA + 0x300000, Change.CREATE),
    "delete": (0, 0, 0x000, 0, HVA, Change.DELETE),
    "delete-logging": (1, KVM_MEM_LOG_DIRTY_PAGES, 0x100, 0, HVA + 0x100000, Change.DELETE),
    "delete-as1": (1 << 16, 0, 0x000, 0, HVA, Change.DELETE),
    "move": (0, 0, 0x400, 16, HVA, Change.MOVE),
    "move-logging": (1, KVM_MEM_LOG_DIRTY_PAGES, 0x400, 16, HVA + 0x100000, Change.MOVE),
    "move-enable-logging": (0, KVM_MEM_LOG_DIRTY_PAGES, 0x400, 16, HVA, Change.MOVE),
    "flags-enable-logging": (0, KVM_MEM_LOG_DIRTY_PAGES, 0x000, 16, HVA, Change.FLAGS_ONLY),
    "flags-disable-logging": (1, 0, 0x100, 16, HVA + 0x100000, Change.FLAGS_ONLY),
}
#: the modelled old slot of each op's target (for fault_reached)
OLD = {
    0: (0x000, 16, 0, HVA),
    1: (0x100, 16, KVM_MEM_LOG_DIRTY_PAGES, HVA + 0x100000),
    1 << 16: (0x000, 16, 0, HVA),
}


def run_op(vm: HistoryVm, name: str) -> None:
    slot, flags, gfn, npages, hva, _ = OPS[name]
    vm.set_user_memory_region(slot, flags, gfn * P, npages * P, hva)


def fault_errnos(point: str) -> list[int]:
    return [errno.EIO, errno.EINVAL, errno.ENOMEM] if point == "arch_prepare" else [errno.ENOMEM]


CASES = [
    pytest.param(point, name, err, id=f"{point}-{name}-{errno.errorcode[err]}")
    for point in POINTS
    for name, (slot, flags, _g, _n, _h, change) in OPS.items()
    if fault_reached(point, change, flags, OLD.get(slot))
    for err in fault_errnos(point)
]


def test_every_point_has_cases() -> None:
    assert {c.values[0] for c in CASES} == set(POINTS)


def state(vm: HistoryVm) -> tuple[list[tuple[Memslot, ...]], list[int], int, int]:
    with vm.read_section():
        sets = [tuple(vm.memslots(a)) for a in range(NR)]
        gens = [vm.memslots(a).generation for a in range(NR)]
    return sets, gens, vm.nr_memslot_pages, vm.dirty_bitmap_bytes


def assert_consistent(vm: HistoryVm) -> None:
    problems = check_invariants(vm)
    assert problems == []


@pytest.mark.parametrize("point, name, err", CASES)
def test_fault_leaves_state_as_the_kernel_does(busy: Busy, point: str, name: str, err: int) -> None:
    vm = busy.vm
    slot, _flags, _gfn, _npages, _hva, change = OPS[name]
    vm.mark_page_dirty(DIRTY_GFN)
    sets, gens, pages, bitmap_bytes = state(vm)
    n_errors = len(vm.callback_errors)
    lookups = busy.lookups()
    vm.faults.inject(point, err)

    if point == "invalidate_callback":
        # a flush cannot fail: the update completes, the error is recorded
        run_op(vm, name)
        assert vm.last_change is change
        assert len(vm.callback_errors) == n_errors + 1
        failed_slot, exc = vm.callback_errors[-1]
        assert failed_slot == slot and isinstance(exc, MemslotError) and exc.errno == err
        assert vm.memslots(slot >> 16).generation == gens[slot >> 16] + 2 * NR
    else:
        with pytest.raises(MemslotError) as info:
            run_op(vm, name)
        assert info.value.errno == err
        after_sets, after_gens, after_pages, after_bitmap = state(vm)
        for a in range(NR):  # the very same slot objects, in both address spaces
            assert len(after_sets[a]) == len(sets[a])
            assert all(x is y for x, y in zip(after_sets[a], sets[a], strict=True))
        in_prepare = point in ("dirty_bitmap", "arch_prepare")
        delta = generation_delta(change, in_prepare, NR) if in_prepare else 0
        assert after_gens == [g + (delta if a == slot >> 16 else 0) for a, g in enumerate(gens)]
        assert (after_pages, after_bitmap) == (pages, bitmap_bytes)  # nothing leaked
        assert len(vm.callback_errors) == n_errors
        # pending dirty bits survive the failure
        log = vm.get_dirty_log(1)
        assert log[0] >> (DIRTY_GFN - 0x100) & 1
    assert vm.faults.hits[point] == 1 and not vm.faults.armed(point)
    assert_consistent(vm)
    # the same request then succeeds
    if point != "invalidate_callback":
        run_op(vm, name)
        assert vm.last_change is change
        assert_consistent(vm)
    # the readers ran meanwhile (bounded wait for a few more lookups)
    for _ in range(2000):
        if busy.lookups() > lookups:
            break
        threading.Event().wait(0.001)
    assert busy.lookups() > lookups


@pytest.mark.parametrize("name", ["delete", "move", "delete-as1"])
def test_readers_see_the_invalid_copy_while_callbacks_run(busy: Busy, name: str) -> None:
    vm = busy.vm
    slot = OPS[name][0]
    old = vm.id_to_memslot(slot)
    assert old is not None
    run_op(vm, name)
    assert len(busy.invalidated) == 1
    flushed, seen = busy.invalidated[0]
    assert flushed is old  # callbacks get the old slot ...
    assert seen is not None and seen.invalid and seen.same_fields(_invalid_of(old))  # ...
    # ... while lookups find its INVALID copy


def _invalid_of(s: Memslot) -> Memslot:
    c = s.copy()
    c.flags |= 1 << 16
    return c


@pytest.mark.parametrize("name", ["delete", "move"])
def test_a_raising_callback_is_recorded_and_the_update_completes(busy: Busy, name: str) -> None:
    vm = busy.vm
    calls: list[Memslot] = []

    def broken(old: Memslot) -> None:
        raise RuntimeError("shadow MMU is broken")

    vm.register_invalidate_callback(broken)
    vm.register_invalidate_callback(calls.append)  # later callbacks still run
    gen = vm.memslots(0).generation
    old = vm.id_to_memslot(0)
    run_op(vm, name)
    assert vm.last_change is OPS[name][5]
    assert [type(e) for _, e in vm.callback_errors] == [RuntimeError]
    assert vm.callback_errors[0][0] == 0
    assert calls == [old]
    assert vm.memslots(0).generation == gen + 2 * NR
    if name == "delete":
        assert vm.id_to_memslot(0) is None
    else:
        moved = vm.id_to_memslot(0)
        assert moved is not None and moved.base_gfn == 0x400
    assert_consistent(vm)


def test_skip_and_times(busy: Busy) -> None:
    vm = busy.vm
    vm.faults.inject("arch_prepare", errno.EIO, skip=1, times=2)
    run_op(vm, "create")  # skipped
    gen = vm.memslots(0).generation
    for _ in range(2):
        with pytest.raises(MemslotError) as info:
            vm.set_user_memory_region(5, 0, 0, 0, HVA + 0x300000)
        assert info.value.errno == errno.EIO
    assert vm.memslots(0).generation == gen + 2 * (2 * NR)  # two failed DELETEs
    vm.set_user_memory_region(5, 0, 0, 0, HVA + 0x300000)  # disarmed now
    assert vm.id_to_memslot(5) is None
    assert vm.faults.hits["arch_prepare"] == 2
    assert_consistent(vm)


def test_vcpu_cache_after_a_failed_delete(busy: Busy) -> None:
    vm = busy.vm
    vcpu = vm.create_vcpu(99)
    old = vcpu.gfn_to_memslot(3)
    assert old is not None and vcpu.last_used_slot is old
    gen = vm.memslots(0).generation
    vm.faults.inject("arch_prepare", errno.EINVAL)
    with pytest.raises(MemslotError):
        run_op(vm, "delete")
    assert vm.memslots(0).generation == gen + 2 * NR
    assert vcpu.gfn_to_memslot(3) is old  # the restored slot is the same object
    assert vcpu.last_used_slot_gen == gen + 2 * NR  # refilled under the new generation


def test_armed_faults_do_not_fire_on_a_no_op(busy: Busy) -> None:
    vm = busy.vm
    gen = vm.memslots(0).generation
    for point in POINTS:
        vm.faults.inject(point)
    vm.set_user_memory_region(0, 0, 0, 16 * P, HVA)  # the same again: no-op
    assert vm.last_change is Change.NONE
    assert vm.memslots(0).generation == gen
    assert all(vm.faults.armed(p) for p in POINTS)
    vm.faults.clear()


def test_interrupt_in_a_callback_leaves_a_consistent_vm() -> None:
    vm = HistoryVm()
    vm.set_user_memory_region(0, 0, 0, 16 * P, HVA)
    armed = [True]

    def cb(old: Memslot) -> None:
        if armed[0]:
            raise KeyboardInterrupt

    vm.register_invalidate_callback(cb)
    with pytest.raises(KeyboardInterrupt):  # reported, after the update completed
        vm.set_user_memory_region(0, 0, 0, 0, HVA)
    armed[0] = False
    assert_consistent(vm)
    assert vm.id_to_memslot(0) is None  # the DELETE completed
