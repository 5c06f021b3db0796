"""Replay of memslot traces (memslots.tools.replay): engine, array and /dev/kvm against the
recorded results, classification, errors, disagreements, hva relocation, JSON."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import json
from pathlib import Path

import pytest

import memslots.kvm.abi as abi
import memslots.tools.replay as replay_mod
import memslots.tools.replay.run as run_mod
from conftest import refuse
from memslots import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, PAGE_SIZE, Vm
from memslots.baseline import ArrayVm
from memslots.constants import X86_TASK_SIZE_MAX
from memslots.tools.replay import (
    KINDS,
    HvaRelocation,
    MapEntry,
    flag_names,
    replay,
)
from memslots.tools.traces import MemslotCall, Recorder, read_jsonl, read_trace, write_jsonl
from memslots.validate import VmLimits

TRACES = Path(__file__).parent / "data" / "traces"
TRACE_FILES = sorted(p.name for p in TRACES.glob("*.log"))

#: what the engine does with each shared trace (QEMU never moves a slot in place)
EXPECTED_KINDS = {
    "seabios.log": {"create": 23, "delete": 14},
    "pci-churn.log": {"create": 89, "delete": 80},
    "pci-churn.strace.log": {"create": 89, "delete": 80},
    "migrate-dirty-log.log": {"create": 23, "delete": 14, "flags": 32},
}

HVA = 0x7F00_0000_0000
MB = 1 << 20
GB = 1 << 30


def call(
    slot: int, flags: int, gpa: int, size: int, hva: int, result: int | None = 0, line: int = 0
) -> MemslotCall:
    return MemslotCall(slot, flags, gpa, size, hva, result=result, line=line, source="t")


def kinds_of(report: replay_mod.ReplayReport) -> dict[str, int]:
    return {k: v for k, v in report.kinds().items() if v}


# --------------------------------------------------------------------------- shared traces


@pytest.mark.parametrize("name", TRACE_FILES)
def test_shared_trace_replays_with_full_agreement_on_the_models(name: str) -> None:
    calls = read_trace(TRACES / name)
    report = replay(calls, kernel=False)
    assert report.runs["engine"].status == "ok"
    assert report.runs["kernel"].status == "off"
    assert report.disagreements() == []
    assert report.map_disagreements() == []
    assert report.ok
    for a, b, compared, agree in report.agreement_pairs():
        assert compared == agree == len(calls), (a, b)
    assert kinds_of(report) == EXPECTED_KINDS[name]
    assert report.errors() == {}
    assert report.runs["array"].status == "ok"
    assert report.runs["array"].memory_map == report.runs["engine"].memory_map


@pytest.mark.kvm
@pytest.mark.parametrize("name", TRACE_FILES)
def test_shared_trace_replays_with_full_agreement_on_dev_kvm(name: str) -> None:
    calls = read_trace(TRACES / name)
    report = replay(calls, kernel=True)
    assert report.runs["kernel"].status == "ok", report.runs["kernel"].note
    assert report.limits_source == "kernel"
    assert report.disagreements() == []
    assert report.map_disagreements() == []
    pairs = {(a, b): (c, g) for a, b, c, g in report.agreement_pairs()}
    assert pairs[("kernel", "recorded")] == (len(calls), len(calls))
    assert pairs[("engine", "kernel")] == (len(calls), len(calls))
    # the kernel saw relocated hvas; its map, translated back, is the trace's
    assert report.runs["kernel"].memory_map == report.runs["engine"].memory_map
    assert report.relocation
    assert report.ok


def test_qemu_and_strace_forms_of_one_trace_give_the_same_report() -> None:
    a = replay(read_trace(TRACES / "pci-churn.log"), kernel=False)
    b = replay(read_trace(TRACES / "pci-churn.strace.log"), kernel=False)
    assert a.kinds() == b.kinds()
    assert a.memory_map() == b.memory_map()
    assert [o.results for o in a.outcomes()] == [o.results for o in b.outcomes()]


def test_final_map_of_the_seabios_trace() -> None:
    report = replay(read_trace(TRACES / "seabios.log"), kernel=False)
    as0 = report.memory_map()[0]
    assert [e.id for e in as0] == [0, 2, 4, 5, 6, 7, 8, 3, 1]  # gfn order
    ram = as0[0]
    assert (ram.gpa_start, ram.size, ram.flags) == (0, 640 * 1024, 0)
    bios = as0[-1]
    assert (bios.gpa_start, bios.gpa_end, bios.flags) == (0xFFFC0000, 0xFFFFFFFF, KVM_MEM_READONLY)
    assert bios.userspace_addr == 0x7FC3DE600000  # the trace's hva, not a relocated one
    vga = next(e for e in as0 if e.id == 3)
    assert vga.flags == KVM_MEM_LOG_DIRTY_PAGES
    assert report.memory_map()[1] == []  # x86 defaults: an (empty) SMM address space


# --------------------------------------------------------------------------- classification


def churn() -> list[MemslotCall]:
    """Every kind once, each with the result the kernel gives."""
    return [
        call(0, 0, 0, 2 * MB, HVA, line=1),  # create
        call(1, 0, 4 * MB, MB, HVA + 8 * MB, line=2),  # create
        call(1, 0, 8 * MB, MB, HVA + 8 * MB, line=3),  # move
        call(1, KVM_MEM_LOG_DIRTY_PAGES, 8 * MB, MB, HVA + 8 * MB, line=4),  # flags
        call(1, KVM_MEM_LOG_DIRTY_PAGES, 8 * MB, MB, HVA + 8 * MB, line=5),  # no-op
        call(2, 0, MB, MB, HVA, result=errno.EEXIST, line=6),  # overlaps slot 0
        call(1, 0, 8 * MB, MB, HVA, result=errno.EINVAL, line=7),  # hva changed
        call(3, 0, 0, 0, 0, result=errno.EINVAL, line=8),  # delete of a missing slot
        call(0, 0, 0, 0, HVA, line=9),  # delete
    ]


def test_every_kind_is_classified() -> None:
    report = replay(churn(), kernel=False)
    assert [o.kind for o in report.outcomes()] == [
        "create", "create", "move", "flags", "no-op", "failed", "failed", "failed", "delete",
    ]  # fmt: skip
    assert report.kinds() == {
        "create": 2, "delete": 1, "move": 1, "flags": 1, "no-op": 1, "failed": 3,
    }  # fmt: skip
    assert list(report.kinds()) == list(KINDS)
    assert report.disagreements() == []
    errors = report.errors()
    assert list(errors) == [errno.EEXIST, errno.EINVAL]
    assert errors[errno.EEXIST]["recorded"] == errors[errno.EEXIST]["engine"] == 1
    assert errors[errno.EINVAL]["recorded"] == errors[errno.EINVAL]["engine"] == 2
    [slot1] = report.memory_map()[0]
    assert (slot1.id, slot1.gpa_start, slot1.flags) == (1, 8 * MB, KVM_MEM_LOG_DIRTY_PAGES)


def test_a_wrong_recorded_result_is_a_disagreement_with_its_trace_line() -> None:
    calls = churn()
    calls[5] = dataclasses.replace(calls[5], result=0)  # the record claims the overlap worked
    calls[0] = dataclasses.replace(calls[0], result=None)  # unknown: not compared
    report = replay(calls, kernel=False)
    [d] = report.disagreements()
    assert d.index == 5
    assert d.call.where == "t:6"
    assert d.results["recorded"] == 0
    assert d.results["engine"] == errno.EEXIST
    assert not report.ok
    pairs = {(a, b): (c, g) for a, b, c, g in report.agreement_pairs()}
    assert pairs[("engine", "recorded")] == (len(calls) - 1, len(calls) - 2)
    doc = report.to_json()
    assert doc["agreement"]["agreeing"] == len(calls) - 1
    assert doc["disagreements"][0]["where"] == "t:6"


def test_primary_array_reports_the_arrays_kinds_and_map() -> None:
    report = replay(churn(), impls=("array",), kernel=False)
    assert report.primary == "array"
    assert report.runs["engine"].status == "off"
    assert report.kinds()["move"] == 1
    assert report.memory_map()[0][0].id == 1


# --------------------------------------------------------------------------- availability


def test_a_crashing_implementation_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    class Broken(Vm):
        def set_user_memory_region(self, *args: int) -> None:
            if args[0] == 1:
                raise RuntimeError("boom")
            super().set_user_memory_region(*args)

    real = run_mod._make_model

    def make(name: replay_mod.ImplName, limits: VmLimits) -> Vm | ArrayVm:
        return Broken(profile=limits) if name == "array" else real(name, limits)

    monkeypatch.setattr(run_mod, "_make_model", make)
    report = replay(churn(), kernel=False)
    run = report.runs["array"]
    assert run.status == "crashed"
    assert run.note == "crashed at t:2: RuntimeError: boom"
    assert run.results == [0]
    assert report.ran == ["engine"]
    assert not report.ok


def test_kernel_auto_without_dev_kvm_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(abi, "_open_device", refuse(errno.ENOENT))
    report = replay(churn())
    assert report.runs["kernel"].status == "unavailable"
    assert str(report.runs["kernel"].note).startswith("/dev/kvm: no such device: KVM is not")
    assert report.limits_source == "defaults"
    assert report.relocation is None
    assert report.ok


def test_replay_needs_a_model() -> None:
    with pytest.raises(ValueError, match="at least one"):
        replay(churn(), impls=(), kernel=False)


# --------------------------------------------------------------------------- JSON and record


def test_json_document_has_the_documented_keys() -> None:
    report = replay(churn(), kernel=False, source="t", fmt="jsonl")
    doc = json.loads(json.dumps(report.to_json()))
    assert set(doc) == {
        "version", "vm", "pid", "vm_type", "attached", "trace", "primary", "implementations",
        "limits", "hva_relocation", "kinds", "errors", "agreement", "disagreements",
        "map_disagreements", "memory_map", "timings", "notes", "calls", "records",
    }  # fmt: skip
    assert doc["trace"] == {
        "source": "t", "embedded": False, "format": "jsonl", "calls": 9, "records": 9,
        "skipped": [],
    }  # fmt: skip
    assert set(doc["implementations"]) == {"engine", "array", "kernel"}
    assert doc["implementations"]["kernel"]["status"] == "off"
    assert doc["errors"]["EEXIST"] == {"errno": errno.EEXIST, "recorded": 1, **{
        n: 1 for n in report.ran
    }}  # fmt: skip
    assert doc["agreement"]["rate"] == 1.0
    assert doc["memory_map"]["0"][0] == {
        "slot": 1, "as_id": 0, "id": 1, "gpa_start": 8 * MB, "gpa_end": 9 * MB - 1,
        "size": MB, "flags": 1, "flag_names": ["LOG_DIRTY"], "hva": HVA + 8 * MB,
    }  # fmt: skip
    assert set(doc["timings"]) == set(report.ran)
    engine = doc["timings"]["engine"]
    assert engine["calls"] == 9
    assert set(engine["by_kind"]) == {"create", "move", "flags", "no-op", "failed", "delete"}
    assert doc["calls"] == 9  # the number; the rows are "records", as in vms[i]
    assert doc["records"][2]["kind"] == "move"
    assert doc["records"][5]["results"]["engine"] == errno.EEXIST


def test_recorded_calls_replay_to_the_same_report() -> None:
    original = replay(read_trace(TRACES / "migrate-dirty-log.log"), kernel=False)
    buf = io.StringIO()
    write_jsonl(original.recorded_calls(), buf, header="test")
    again = replay(list(read_jsonl(buf.getvalue().splitlines())), kernel=False)
    assert again.kinds() == original.kinds()
    assert again.errors() == original.errors()
    assert again.memory_map() == original.memory_map()
    assert again.disagreements() == []


def test_recorder_then_replay_gives_the_same_report() -> None:
    calls = churn()
    rec = Recorder(Vm(), source="rec")
    for c in calls:
        with contextlib.suppress(OSError):
            c.apply(rec)
    direct = replay(calls, kernel=False)
    recorded = replay(rec.calls, kernel=False)
    assert recorded.kinds() == direct.kinds()
    assert recorded.errors() == direct.errors()
    assert recorded.memory_map() == direct.memory_map()
    assert recorded.ok


# --------------------------------------------------------------------------- hva relocation


class FakeMapping:
    """An allocator for HvaRelocation that maps nothing: addresses from a counter."""

    next_addr = 0x1000_0000

    def __init__(self, size: int) -> None:
        self.addr = FakeMapping.next_addr
        FakeMapping.next_addr += size + 16 * PAGE_SIZE
        self.size = size
        self.closed = False

    def close(self) -> None:
        self.closed = True


def relocation(calls: list[MemslotCall]) -> HvaRelocation:
    return HvaRelocation(calls, allocate=FakeMapping)


def test_relocation_merges_overlapping_and_adjacent_ranges_only() -> None:
    calls = [
        call(0, 0, 0, 4 * PAGE_SIZE, HVA),
        call(1, 0, 0, 4 * PAGE_SIZE, HVA + 2 * PAGE_SIZE),  # overlaps slot 0
        call(2, 0, 0, PAGE_SIZE, HVA + 6 * PAGE_SIZE),  # adjacent to slot 1's end
        call(3, 0, 0, PAGE_SIZE, HVA + 100 * PAGE_SIZE),  # apart
        call(4, 0, 0, 0, HVA + 500 * PAGE_SIZE),  # a delete: no range
    ]
    with relocation(calls) as r:
        assert [(c.start - HVA, c.end - HVA) for c in r.clusters] == [
            (0, 7 * PAGE_SIZE),
            (100 * PAGE_SIZE, 101 * PAGE_SIZE),
        ]
        assert r.total_bytes == 8 * PAGE_SIZE
        moved = [r.translate_call(c) for c in calls]
    first, second = r.clusters
    # offsets and overlaps inside a cluster are kept
    assert moved[1].userspace_addr - moved[0].userspace_addr == 2 * PAGE_SIZE
    assert moved[2].userspace_addr - moved[0].userspace_addr == 6 * PAGE_SIZE
    assert moved[0].userspace_addr == first.addr
    assert moved[3].userspace_addr == second.addr
    assert moved[4] == calls[4]  # outside every cluster: untouched
    assert r.untranslate(moved[1].userspace_addr) == calls[1].userspace_addr


def test_relocation_keeps_page_offsets_and_rejected_ranges() -> None:
    unaligned = call(0, 0, 0, 2 * PAGE_SIZE, HVA + 0x123)
    too_high = call(1, 0, 0, 2 * PAGE_SIZE, X86_TASK_SIZE_MAX - PAGE_SIZE)
    delete_inside = call(0, 0, 0, 0, HVA + 0x10)
    with relocation([unaligned, too_high, delete_inside]) as r:
        [cluster] = r.clusters
        assert (cluster.start, cluster.end) == (HVA, HVA + 3 * PAGE_SIZE)
        assert r.translate_call(unaligned).userspace_addr == cluster.addr + 0x123
        assert r.translate_call(too_high) == too_high  # the kernel rejects it either way
        assert r.translate_call(delete_inside).userspace_addr == cluster.addr + 0x10


def test_relocation_closes_what_it_mapped() -> None:
    made: list[FakeMapping] = []

    def allocate(size: int) -> FakeMapping:
        made.append(FakeMapping(size))
        return made[-1]

    r = HvaRelocation(
        [call(0, 0, 0, PAGE_SIZE, HVA), call(1, 0, 0, PAGE_SIZE, HVA + GB)], allocate=allocate
    )
    assert len(made) == 2
    r.close()
    r.close()
    assert all(m.closed for m in made)


def test_relocation_unmaps_on_a_failed_allocation() -> None:
    made: list[FakeMapping] = []

    def allocate(size: int) -> FakeMapping:
        if made:
            raise OSError(errno.ENOMEM, "no room")
        made.append(FakeMapping(size))
        return made[-1]

    with pytest.raises(OSError):
        HvaRelocation(
            [call(0, 0, 0, PAGE_SIZE, HVA), call(1, 0, 0, PAGE_SIZE, HVA + GB)], allocate=allocate
        )
    assert made[0].closed


def test_relocation_onto_host_memory_by_default() -> None:
    with HvaRelocation([call(0, 0, 0, 1 << 30, HVA)]) as r:  # 1 GiB, nothing committed
        [cluster] = r.clusters
        assert cluster.addr % PAGE_SIZE == 0
        assert cluster.size == 1 << 30
        assert r.translate(HVA + 5) == cluster.addr + 5


@pytest.mark.kvm
def test_kernel_sees_overlaps_and_hva_checks_as_in_the_trace() -> None:
    """Slots sharing hvas, a flags change that must name the same hva, an unaligned
    delete hva and a range above the user address space: the relocated kernel answers
    as the engine does with the trace's own hvas."""
    calls = [
        call(0, 0, 0, 4 * PAGE_SIZE, HVA, line=1),
        call(1, 0, MB, 4 * PAGE_SIZE, HVA + 2 * PAGE_SIZE, line=2),  # hvas overlap slot 0
        call(1, KVM_MEM_LOG_DIRTY_PAGES, MB, 4 * PAGE_SIZE, HVA + 2 * PAGE_SIZE, line=3),
        call(1, 0, MB, 4 * PAGE_SIZE, HVA + 3 * PAGE_SIZE, result=errno.EINVAL, line=4),
        call(1, 0, 2 * MB, 4 * PAGE_SIZE, HVA + 2 * PAGE_SIZE, line=5),  # move
        call(0, 0, 0, 0, HVA + 0x10, result=errno.EINVAL, line=6),  # unaligned delete hva
        call(2, 0, 4 * MB, 2 * PAGE_SIZE, X86_TASK_SIZE_MAX - PAGE_SIZE, errno.EINVAL, 7),
        call(3, 0, 8 * MB, 2 * PAGE_SIZE, HVA + 0x800, result=errno.EINVAL, line=8),
        call(0, 0, 0, 0, HVA, line=9),
    ]
    report = replay(calls, kernel=True)
    assert report.runs["kernel"].status == "ok"
    assert report.disagreements() == []
    assert report.map_disagreements() == []
    assert [o.kind for o in report.outcomes()][:5] == [
        "create",
        "create",
        "flags",
        "failed",
        "move",
    ]


# --------------------------------------------------------------------------- small helpers


def test_flag_names_and_map_entry() -> None:
    assert flag_names(0) == []
    assert flag_names(KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY) == ["LOG_DIRTY", "READONLY"]
    assert flag_names(1 << 9) == ["0x200"]
    e = MapEntry(1, 5, 0x100, 16, 0, HVA)
    assert (e.slot, e.gpa_start, e.gpa_end, e.size) == (0x10005, 0x100000, 0x10FFFF, 0x10000)


def test_progress_is_reported_per_implementation() -> None:
    seen: list[tuple[str, int, int]] = []
    calls = [call(i, 0, i * MB, PAGE_SIZE, HVA) for i in range(replay_mod.PROGRESS_EVERY + 3)]
    replay(calls, impls=("engine",), kernel=False, progress=lambda *a: seen.append(a))
    n = len(calls)
    assert seen == [("engine", 0, n), ("engine", replay_mod.PROGRESS_EVERY, n), ("engine", n, n)]


def test_replayed_bitmaps_are_compared_page_by_page() -> None:
    from memslots.dirty_log import pages_to_bitmap

    compare = run_mod._compare_bitmap
    bits = bytes(pages_to_bitmap([1, 2, 9, 70], 128))
    recorded = ((1, 2), (9, 1), (70, 1))
    assert compare(recorded, bits, exact=True) == ""
    assert compare(None, bits, exact=True) == ""  # the trace does not say
    more = (*recorded, (100, 3))  # a guest dirtied pages no replay can know
    assert compare(more, bits, exact=False) == ""
    assert compare(more, bits, exact=True) == (
        "dirty pages: recorded [1, 2, 9, 70, 100, 101, ...], replayed [1, 2, 9, 70]"
        " (no vCPU yet: they must be equal)"
    )
    assert compare(((1, 2),), bits, exact=False) == (
        "dirty pages replayed but not recorded: [9, 70]"
    )


def test_memory_map_and_hazards_in_the_kernels_pages() -> None:
    """With 16 KiB pages a slot's gpas, size and the gfns an unmap hits are counted in
    16 KiB pages."""
    from memslots.tools.replay.report import Hazard, MapEntry
    from memslots.tools.traces import Munmap

    vm = Vm(profile=VmLimits(1, 32767, (1 << 26) - 1, page_shift=14))
    vm.set_user_memory_region(0, 0, 0x40000, 0x10000, 0x7F0000000000)
    e = MapEntry.of(vm.slots()[0])
    assert (e.gpa_start, e.gpa_end, e.size) == (0x40000, 0x4FFFF, 0x10000)
    s = vm.slots()[0]
    h = Hazard(
        vm=0, slot=0, as_id=0, id=0, base_gfn=s.base_gfn, npages=s.npages, flags=0,
        userspace_addr=s.userspace_addr, start=0x7F0000005000, end=0x7F0000009000,
        call=Munmap(0x7F0000005000, 0x4000), page_shift=14,
    )  # fmt: skip
    assert (h.gfn_start, h.gfn_end) == (0x11, 0x13)  # pages 1 and 2 of the slot
    assert h.to_json()["slot_size"] == 0x10000
