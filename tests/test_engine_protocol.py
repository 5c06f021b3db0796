"""The update protocol: only the changed slot is copied, both sets converge, the INVALID
window, generations, failure injection with the kernel's rollback, and lookups."""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable

import pytest

from conftest import AnyVm
from memslots import (
    KVM_HVA_ERR_BAD,
    KVM_HVA_ERR_RO_BAD,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
    Change,
    Memslot,
    MemslotError,
    MemslotSet,
    Vm,
    kvm_is_error_hva,
)
from memslots.constants import KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS
from memslots.faults import POINTS
from memslots.view import SlotsView

MB = 1 << 20
HVA = 0x10000000
WAIT = 10.0  # seconds: bound on every wait and join


def _populate(vm: AnyVm, n: int = 10) -> None:
    for i in range(n):
        vm.set_user_memory_region(i, 0, i * 2 * MB, MB, HVA + i * MB)


def _snapshot(vm: AnyVm) -> dict[str, object]:
    return {
        "table": [s.as_tuple() for s in vm.slots()],
        "objects": [id(s) for s in vm.slots()],
        "gens": [vm.memslots(a).generation for a in range(vm.nr_address_spaces)],
        "pages": vm.nr_memslot_pages,
        "bitmaps": vm.dirty_bitmap_bytes,
    }


@pytest.mark.parametrize("change", ["move", "delete", "flags", "create"])
def test_only_the_changed_slot_is_copied(change: str) -> None:
    vm = Vm()
    _populate(vm)
    before = {s.id: s for s in vm.memslots(0)}
    if change == "move":
        vm.set_user_memory_region(3, 0, 40 * MB, MB, HVA + 3 * MB)
    elif change == "delete":
        vm.set_user_memory_region(3, 0, 0, 0, 0)
    elif change == "flags":
        vm.set_user_memory_region(3, KVM_MEM_LOG_DIRTY_PAGES, 6 * MB, MB, HVA + 3 * MB)
    else:
        vm.set_user_memory_region(10, 0, 40 * MB, MB, HVA)
    vm.check_invariants()  # both sets share every object again
    s0, s1 = vm._sets[0]
    for sid, slot in before.items():
        if sid == 3 and change != "create":
            continue
        assert s0.id_to_memslot(sid) is slot and s1.id_to_memslot(sid) is slot
    if change in ("move", "flags"):
        assert s0.id_to_memslot(3) is not before[3]
        assert s0.id_to_memslot(3) is s1.id_to_memslot(3)
    kinds = {"move": Change.MOVE, "delete": Change.DELETE, "flags": Change.FLAGS_ONLY}
    assert vm.last_change is kinds.get(change, Change.CREATE)


def test_generations_follow_the_kernel() -> None:
    vm = Vm()  # two address spaces: +2 per swap
    assert [vm.memslots(0).generation, vm.memslots(1).generation] == [0, 1]
    vm.set_user_memory_region(0, 0, 0, MB, HVA)  # CREATE: 1 swap
    assert vm.memslots(0).generation == 2
    vm.set_user_memory_region(0, 1, 0, MB, HVA)  # FLAGS_ONLY: 1 swap
    assert vm.memslots(0).generation == 4
    vm.set_user_memory_region(0, 1, 0, MB, HVA)  # no-op: none
    assert vm.memslots(0).generation == 4
    assert vm.last_change is Change.NONE
    vm.set_user_memory_region(0, 1, 4 * MB, MB, HVA)  # MOVE: 2 swaps
    assert vm.memslots(0).generation == 8
    vm.set_user_memory_region(0, 0, 0, 0, 0)  # DELETE: 2 swaps
    assert vm.memslots(0).generation == 12
    assert vm.memslots(1).generation == 1  # the other address space is untouched
    vm.set_user_memory_region((1 << 16) | 0, 0, 0, MB, HVA)
    assert vm.memslots(1).generation == 3


@pytest.mark.parametrize("change", ["delete", "move"])
def test_invalid_window(change: str) -> None:
    """Between swap #1 and swap #2 readers see the INVALID copy at the old gfns; the
    other set still holds the old slot; gfn->hva faults."""
    vm = Vm()
    vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, MB, HVA)
    old = vm.memslots(0).id_to_memslot(0)
    assert old is not None
    vcpu = vm.create_vcpu(0)
    assert vcpu.gfn_to_memslot(5) is old
    seen: list[tuple[Memslot | None, Memslot | None, int, int]] = []
    shared_bitmap: list[bool] = []

    def during(slot: Memslot) -> None:
        assert slot is old
        active = vm.memslots(0)
        inactive = vm._inactive_memslots(0)
        seen.append(
            (
                vm.gfn_to_memslot(5),
                inactive.id_to_memslot(0),
                vm.gfn_to_hva(5),
                active.generation,
            )
        )
        assert vcpu.gfn_to_memslot(5) is seen[-1][0]  # the vCPU cache was dropped
        found = seen[-1][0]
        shared_bitmap.append(found is not None and found.dirty_bitmap is slot.dirty_bitmap)

    vm.register_invalidate_callback(during)
    if change == "delete":
        vm.set_user_memory_region(0, 0, 0, 0, 0)
    else:
        vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 4 * MB, MB, HVA)
    (found, in_other, hva, gen) = seen[0]
    assert found is not None and found.invalid and found.base_gfn == 0
    assert shared_bitmap == [True]
    assert in_other is old
    assert hva == KVM_HVA_ERR_BAD
    assert gen == 4
    assert vm.memslots(0).generation == 6
    assert vm.callback_errors == []
    vm.check_invariants()
    if change == "move":
        assert vm.gfn_to_memslot(5) is None
        assert vcpu.gfn_to_memslot(1024 + 5) is vm.memslots(0).id_to_memslot(0)


def _expect_rollback(vm: AnyVm, before: dict[str, object], swaps: int, err: int) -> None:
    after = _snapshot(vm)
    assert after["table"] == before["table"]
    assert after["objects"] == before["objects"], "a failed update replaced a slot object"
    assert after["pages"] == before["pages"]
    assert after["bitmaps"] == before["bitmaps"], "dirty bitmap leaked"
    gens = before["gens"]
    assert isinstance(gens, list)
    assert after["gens"] == [gens[0] + swaps * vm.nr_address_spaces, *gens[1:]]
    vm.check_invariants()


# (point, request kind, errno raised, swaps that still happen)
FAULTS = [
    ("kzalloc_new", "create", errno.ENOMEM, 0),
    ("kzalloc_new", "move", errno.ENOMEM, 0),
    ("kzalloc_new", "flags", errno.ENOMEM, 0),
    ("kzalloc_invalid", "delete", errno.ENOMEM, 0),
    ("kzalloc_invalid", "move", errno.ENOMEM, 0),
    ("dirty_bitmap", "create", errno.ENOMEM, 0),
    ("dirty_bitmap", "flags", errno.ENOMEM, 0),
    ("dirty_bitmap", "move", errno.ENOMEM, 2),
    ("arch_prepare", "create", errno.ENOMEM, 0),
    ("arch_prepare", "flags", errno.EIO, 0),
    ("arch_prepare", "move", errno.ENOMEM, 2),
    ("arch_prepare", "delete", errno.EIO, 2),
]


@pytest.mark.parametrize(("point", "kind", "err", "swaps"), FAULTS)
def test_fault_injection_rolls_back(
    make_vm: Callable[..., AnyVm], point: str, kind: str, err: int, swaps: int
) -> None:
    vm = make_vm()
    _populate(vm, 5)
    vm.set_user_memory_region(9, KVM_MEM_LOG_DIRTY_PAGES, 100 * MB, MB, HVA)
    vm.mark_page_dirty((100 * MB >> 12) + 7)
    bitmap = vm.memslots(0).id_to_memslot(9)
    assert bitmap is not None and bitmap.dirty_bitmap is not None
    bits_before = bytes(bitmap.dirty_bitmap)
    vcpu = vm.create_vcpu(0)
    vcpu.gfn_to_memslot(1)
    before = _snapshot(vm)
    vm.faults.inject(point, err)
    req = {
        "create": (20, KVM_MEM_LOG_DIRTY_PAGES, 200 * MB, MB, HVA),
        "flags": (2, KVM_MEM_LOG_DIRTY_PAGES, 4 * MB, MB, HVA + 2 * MB),
        "move": (9, 0 if point != "dirty_bitmap" else KVM_MEM_LOG_DIRTY_PAGES, 300 * MB, MB, HVA),
        "delete": (9, 0, 0, 0, 0),
    }[kind]
    if point == "dirty_bitmap" and kind == "move":
        req = (2, KVM_MEM_LOG_DIRTY_PAGES, 300 * MB, MB, HVA + 2 * MB)  # move turning logging on
    with pytest.raises(MemslotError) as exc:
        vm.set_user_memory_region(*req)
    assert exc.value.errno == err
    assert vm.faults.hits[point] == 1
    _expect_rollback(vm, before, swaps, err)
    slot9 = vm.memslots(0).id_to_memslot(9)
    assert slot9 is not None and slot9.dirty_bitmap is not None
    assert bytes(slot9.dirty_bitmap) == bits_before, "pending dirty bits lost"
    assert vcpu.gfn_to_memslot(1) is vm.memslots(0).id_to_memslot(0)
    vm.set_user_memory_region(*req)  # the fault was one-shot: the same request now works
    vm.check_invariants()


def test_fault_points_are_all_covered() -> None:
    covered = {p for p, *_ in FAULTS} | {"invalidate_callback"}
    assert covered == set(POINTS)


def test_failing_invalidate_callback_does_not_break_the_update() -> None:
    vm = Vm()
    _populate(vm, 3)

    def boom(slot: Memslot) -> None:
        raise RuntimeError("shadow MMU exploded")

    vm.register_invalidate_callback(boom)
    vm.set_user_memory_region(1, 0, 0, 0, 0)
    assert vm.memslots(0).id_to_memslot(1) is None
    assert len(vm.callback_errors) == 1 and vm.callback_errors[0][0] == 1
    vm.faults.inject("invalidate_callback", errno.EIO)  # an extra, injected failure
    vm.set_user_memory_region(2, 0, 50 * MB, MB, HVA + 2 * MB)
    assert [(slot, type(e)) for slot, e in vm.callback_errors[1:]] == [
        (2, MemslotError),
        (2, RuntimeError),
    ]
    assert not vm.faults.armed("invalidate_callback")
    vm.callback_errors.clear()
    vm2 = Vm()  # the injected failure fires without any registered callback too
    _populate(vm2, 2)
    vm2.faults.inject("invalidate_callback")
    vm2.set_user_memory_region(1, 0, 0, 0, 0)
    assert len(vm2.callback_errors) == 1 and not vm2.faults.armed("invalidate_callback")
    vm.check_invariants()


def test_gfn_to_hva_semantics() -> None:
    vm = Vm()
    vm.set_user_memory_region(0, 0, 0, MB, HVA)
    vm.set_user_memory_region(1, KVM_MEM_READONLY, 2 * MB, MB, HVA + MB)
    assert vm.gfn_to_hva(3) == HVA + 3 * 4096
    assert vm.gfn_to_hva(512 + 1) == KVM_HVA_ERR_RO_BAD
    assert vm.gfn_to_hva(512 + 1, write=False) == HVA + MB + 4096
    assert vm.gfn_to_hva(300) == KVM_HVA_ERR_BAD
    assert kvm_is_error_hva(KVM_HVA_ERR_RO_BAD) and not kvm_is_error_hva(HVA)
    assert vm.is_visible_gfn(3) and not vm.is_visible_gfn(300)


def test_vcpu_cache_and_address_spaces() -> None:
    vm = Vm()
    vm.set_user_memory_region(0, 0, 0, MB, HVA)
    vm.set_user_memory_region((1 << 16) | 0, 0, 0, 2 * MB, HVA + MB)
    vcpu = vm.create_vcpu(0)
    s0 = vcpu.gfn_to_memslot(10)
    assert s0 is not None and s0.as_id == 0 and vcpu.last_used_slot is s0
    vcpu.as_id = 1  # SMM
    s1 = vcpu.gfn_to_memslot(10)
    assert s1 is not None and s1.as_id == 1 and s1.npages == 512
    assert vcpu.gfn_to_memslot(400) is s1
    vcpu.as_id = 0
    assert vcpu.gfn_to_memslot(400) is None
    gen = vcpu.last_used_slot_gen
    vm.set_user_memory_region(2, 0, 8 * MB, MB, HVA)
    assert vcpu.gfn_to_memslot(10) is s0
    assert vcpu.last_used_slot_gen != gen  # refilled under the new generation
    with pytest.raises(MemslotError):
        vm.create_vcpu(0)


def test_set_cache_follows_replacement() -> None:
    vm = Vm()
    vm.set_user_memory_region(0, 0, 0, MB, HVA)
    s = vm.gfn_to_memslot(1)
    assert vm.memslots(0).last_used_slot is s
    vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, MB, HVA)
    new = vm.memslots(0).id_to_memslot(0)
    assert new is not s
    for st in vm._sets[0]:
        assert st.last_used_slot in (None, new)
    vm.set_user_memory_region(0, 0, 0, 0, 0)
    for st in vm._sets[0]:
        assert st.last_used_slot is None
    vm.check_invariants()


def test_id_to_memslot_and_iteration_order() -> None:
    vm = Vm()
    vm.set_user_memory_region(5, 0, 8 * MB, MB, HVA)
    vm.set_user_memory_region(1, 0, 0, MB, HVA)
    vm.set_user_memory_region((1 << 16) | 1, 0, 4 * MB, MB, HVA)
    assert [s.id for s in vm.memslots(0)] == [1, 5]
    assert len(vm.memslots(0)) == 2
    m = vm.id_to_memslot((1 << 16) | 1)
    assert m is not None and m.as_id == 1 and m.slot == 0x10001
    assert vm.id_to_memslot(7) is None and vm.id_to_memslot(5 << 16) is None
    assert vm.nr_memslot_pages == 3 * 256
    with pytest.raises(MemslotError):
        vm.memslots(2)


class _Recorder:
    """A publish observer that records what it sees of every swap."""

    def __init__(self, vm: AnyVm) -> None:
        self.vm = vm
        self.events: list[tuple[str, int, tuple[tuple[int, int, bool], ...], bool]] = []

    def _record(self, what: str, as_id: int, slots: SlotsView) -> None:
        active = self.vm._memslots[as_id] is slots
        seen = tuple((s.id, s.base_gfn, s.invalid) for s in slots)
        self.events.append((what, as_id, seen, active))
        if what == "published":
            assert not slots.generation & KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS

    def publishing(self, as_id: int, slots: SlotsView) -> None:
        self._record("publishing", as_id, slots)

    def published(self, as_id: int, slots: SlotsView) -> None:
        self._record("published", as_id, slots)


def test_publish_observer_sees_every_swap_with_the_set_being_published(
    make_vm: Callable[..., AnyVm],
) -> None:
    vm = make_vm()
    rec = _Recorder(vm)
    vm.publish_observer = rec
    vm.set_user_memory_region(1 << 16 | 3, 0, 0, MB, HVA)  # CREATE in address space 1
    vm.set_user_memory_region(1 << 16 | 3, 0, 4 * MB, MB, HVA)  # MOVE: INVALID, then new
    vm.faults.inject("arch_prepare")
    with pytest.raises(MemslotError):  # a MOVE failing in prepare: INVALID in and out
        vm.set_user_memory_region(1 << 16 | 3, 0, 8 * MB, MB, HVA)
    vm.set_user_memory_region(1 << 16 | 3, 0, 0, 0, 0)  # DELETE: INVALID, then gone
    old, new = (3, 0, False), (3, 1024, False)
    bad_old, bad_new = (3, 0, True), (3, 1024, True)
    swaps = [((), (old,)), ((old,), (bad_old,)), ((bad_old,), (new,)),
             ((new,), (bad_new,)), ((bad_new,), (new,)),
             ((new,), (bad_new,)), ((bad_new,), ())]  # fmt: skip
    expected = []
    for _before, after in swaps:
        expected.append(("publishing", 1, after, False))  # not yet published
        expected.append(("published", 1, after, True))
    assert rec.events == expected
    assert vm.memslots(1).generation == 1 + 7 * 2


def test_published_set_is_the_active_one_and_complete() -> None:
    """The set handed to ``published`` is the one readers now use, with the new slot."""
    vm = Vm(nr_address_spaces=1)
    seen: list[MemslotSet] = []

    class Keep:
        def publishing(self, as_id: int, slots: MemslotSet) -> None:
            pass

        def published(self, as_id: int, slots: MemslotSet) -> None:
            seen.append(slots)

    vm.publish_observer = Keep()
    vm.set_user_memory_region(0, 0, 0, MB, HVA)
    assert seen == [vm.memslots(0)] and [s.id for s in seen[0]] == [0]
    vm.check_invariants()


def test_an_update_inside_a_read_section_is_refused_and_changes_nothing(
    make_vm: Callable[..., AnyVm],
) -> None:
    """The grace period of such an update would wait for its own caller; it used to
    publish the new set, then raise from the grace period, leaving the VM half-updated
    (every later update failed)."""
    vm = make_vm(nr_address_spaces=1)
    vm.set_user_memory_region(0, 0, 0, MB, HVA)
    before = _snapshot(vm)
    with vm.read_section():
        with pytest.raises(RuntimeError, match="inside a read section"):
            vm.set_user_memory_region(1, 0, 4 * MB, MB, HVA)
        with pytest.raises(RuntimeError):
            vm.set_user_memory_region(0, 0, 0, 0, 0)
        vm.set_user_memory_region(0, 0, 0, MB, HVA)  # no change: no grace period needed
    assert _snapshot(vm) == before
    vm.check_invariants()
    vm.set_user_memory_region(1, 0, 4 * MB, MB, HVA)
    assert [s.id for s in vm.slots()] == [0, 1]
    vm.check_invariants()


@pytest.mark.parametrize("change", ["delete", "move", "flags"])
def test_a_vcpu_cache_never_answers_with_a_slot_no_longer_published(
    make_vm: Callable[..., AnyVm], change: str
) -> None:
    """Deterministic: a vCPU caches slot S; an update replaces S and, while its grace
    period waits for a reader that holds the old set, the vCPU looks the gfn up again. It
    must answer with what is published now (the INVALID copy, or the new slot), never the
    cached S: the swap marks the published generation in flight, so no cache tag (a
    settled generation) matches it. After the update, the final state."""
    vm = make_vm(nr_address_spaces=1)
    vm.set_user_memory_region(0, 0, 0, MB, HVA)
    vcpu = vm.create_vcpu(0)
    cached = vcpu.gfn_to_memslot(5)
    assert cached is not None and vcpu.gfn_to_memslot(5) is cached  # a cache hit
    entered, release = threading.Event(), threading.Event()

    def hold_old_set() -> None:
        with vm.read_section():
            entered.set()
            release.wait(WAIT)

    request = {
        "delete": (0, 0, 0, 0, 0),
        "move": (0, 0, 8 * MB, MB, HVA),
        "flags": (0, KVM_MEM_LOG_DIRTY_PAGES, 0, MB, HVA),
    }[change]
    errors: list[BaseException] = []

    def update() -> None:
        try:
            vm.set_user_memory_region(*request)
        except BaseException as exc:  # reported below
            errors.append(exc)

    reader = threading.Thread(target=hold_old_set, daemon=True)
    reader.start()
    assert entered.wait(WAIT)
    writer = threading.Thread(target=update, daemon=True)
    writer.start()
    try:
        for _ in range(int(WAIT / 0.001)):  # until the first new set is published
            if vm.memslots(0).id_to_memslot(0) is not cached:
                break
            threading.Event().wait(0.001)
        published = vm.memslots(0)
        assert published.generation & KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS  # in its grace period
        now = published.id_to_memslot(0)
        assert now is not cached
        assert vcpu.gfn_to_memslot(5) is now  # not the cached, unpublished slot
        assert vcpu.last_used_slot_gen == published.generation
    finally:
        release.set()
        writer.join(WAIT)
        reader.join(WAIT)
    assert not writer.is_alive() and not reader.is_alive() and errors == []
    final = vm.id_to_memslot(0)
    assert vcpu.gfn_to_memslot(5) is (None if change in ("delete", "move") else final)
    if change == "move":
        assert vcpu.gfn_to_memslot(8 * MB // 4096 + 5) is final
    vm.check_invariants()
