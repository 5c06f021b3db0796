"""memslots.tools.conform and ``memslots conform``: the operation format, delta debugging, and
random runs against the real kernel, including engines with a planted bug that the run
must find and shrink to a minimal reproducer.

The hypothesis strategies for operations live here and are shared with
``test_kvm_vm.py`` (strict-mode random sequences).
"""

from __future__ import annotations

import collections
import json
import random
import re
from errno import E2BIG, EEXIST, EINVAL, ENXIO
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import memslots.dirty_ring
from memslots.constants import U32_MAX, X86_TASK_SIZE_MAX
from memslots.errors import MemslotError
from memslots.kvm import KvmVm, kvm_available
from memslots.tools.cli import main
from memslots.tools.conform import (
    CLOSED_FD,
    GMEM_FD,
    GMEM_SIZE,
    MEM_HVA,
    MEM_SIZE,
    OTHER_FD,
    RING_OPS,
    ClearDirtyLog,
    CloseFd,
    CreateGuestMemfd,
    CreateVcpu,
    EnableDirtyRing,
    EnableManualDirtyLogProtect,
    Finding,
    GetDirtyLog,
    HarvestDirtyRing,
    MapMemory,
    Op,
    OpenDevNull,
    OpGenerator,
    ResetDirtyRings,
    Session,
    VcpuMarkPageDirty,
    VcpuWriteGuest,
    ddmin,
    is_compared,
    op_kind,
    op_to_json,
    read_ops,
    replay_ops,
    run_conform,
    signature,
    with_result,
)
from memslots.tools.traces import MemslotCall, read_jsonl
from memslots.validate import Change, Decision

PAGE = 4096
HVA = 0x7F0000000000

# ---------------------------------------------------------------------------------------
# strategies (also used by test_kvm_vm.py)

slot_numbers = st.sampled_from([0, 1, 2, 3, 0, 1, 32763, 32764, 0xFFFF, 1 << 16 | 1])
gpas = st.integers(0, 63).map(lambda p: p * PAGE) | st.sampled_from(
    [PAGE + 1, (1 << 52) - PAGE, 1 << 52, (1 << 64) - PAGE]
)
# never an accepted slot of 2^31-1 pages: the shadow MMU would allocate 16 GiB for it
sizes = st.sampled_from(
    [0, 0, PAGE, 2 * PAGE, 16 * PAGE, 64 * PAGE, 65 * PAGE, 128 * PAGE, PAGE + 512, 1 << 43]
)
hvas = st.sampled_from(
    [HVA, HVA, HVA + 64 * PAGE, 0, X86_TASK_SIZE_MAX - PAGE, X86_TASK_SIZE_MAX, HVA + 8,
     0xFFFF800000000000]
)  # fmt: skip
flag_values = st.sampled_from([0, 0, 1, 1, 2, 3, 4, 4, 5, 6, 8, 1 << 31])
gmem_fds = st.sampled_from([0, GMEM_FD, GMEM_FD, OTHER_FD, CLOSED_FD, 1 << 31])
gmem_offsets = st.sampled_from([0, 0, PAGE, 1, GMEM_SIZE - PAGE, GMEM_SIZE, 1 << 63])

memslot_calls = st.builds(
    MemslotCall,
    slot=slot_numbers,
    flags=flag_values,
    guest_phys_addr=gpas,
    memory_size=sizes,
    userspace_addr=hvas,
    guest_memfd_offset=gmem_offsets,
    guest_memfd=gmem_fds,
    v2=st.booleans(),
)
dirty_ops: st.SearchStrategy[Op] = st.one_of(
    st.builds(GetDirtyLog, slot=slot_numbers),
    st.builds(
        ClearDirtyLog,
        slot=slot_numbers,
        first_page=st.sampled_from([0, 0, 64, 1, 128]),
        num_pages=st.sampled_from([0, 1, 16, 64, 65, 128]),
        bitmap=st.sampled_from([b"", b"\xff" * 8, b"\xff" * 16, b"\x0f" * 16]),
    ),
    st.builds(EnableManualDirtyLogProtect, flags=st.sampled_from([0, 1, 2, 3, 3])),
)
fd_ops = st.sampled_from([CloseFd(GMEM_FD), CreateGuestMemfd(GMEM_FD, GMEM_SIZE)])
vcpu_ids = st.sampled_from([0, 0, 1, 2, 4095, 4096, 1 << 20])
ring_ops: st.SearchStrategy[Op] = st.one_of(
    st.builds(
        EnableDirtyRing,
        size=st.sampled_from([4096, 65536, 65536, 0, 12288, 2 << 20, 3 << 20, (1 << 32) + 4096]),
        acq_rel=st.booleans(),
    ),
    st.builds(CreateVcpu, id=vcpu_ids),
    st.just(ResetDirtyRings()),
    st.builds(HarvestDirtyRing, vcpu=vcpu_ids),
    st.builds(VcpuMarkPageDirty, vcpu=vcpu_ids, gfn=st.integers(0, 70)),
    st.builds(
        VcpuWriteGuest,
        vcpu=vcpu_ids,
        gpa=st.integers(0, 70 * PAGE),
        length=st.sampled_from([1, 8, PAGE, 3 * PAGE + 5]),
    ),
    st.just(MapMemory(MEM_HVA, 1 << 20)),
)
ops_strategy: st.SearchStrategy[Op] = st.one_of(
    memslot_calls, memslot_calls, dirty_ops, fd_ops, ring_ops
)
PRELUDE: list[Op] = [CreateGuestMemfd(GMEM_FD, GMEM_SIZE), OpenDevNull(OTHER_FD)]

# ---------------------------------------------------------------------------------------
# the format, no device needed


@settings(max_examples=200)
@given(ops_strategy, st.sampled_from([None, 0, 2, 9, 22]))
def test_ops_round_trip_through_json_lines(op: Op, result: int | None) -> None:
    if result is not None:
        op = with_result(op, result)
    line = op_to_json(op)
    assert "\n" not in line
    assert list(read_ops([line])) == [op]


def test_memslot_calls_are_written_in_the_trace_format() -> None:
    call = MemslotCall(1, 1, 0x10000, 0x2000, HVA, result=17)
    line = op_to_json(call)
    assert list(read_jsonl([line])) == [call]
    assert json.loads(line)["result"] == "EEXIST"
    other = json.loads(op_to_json(GetDirtyLog(3, result=2)))
    assert other == {"op": "get_dirty_log", "slot": 3, "result": "ENOENT"}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"op": "explode"}', "unknown op"),
        ('{"op": "get_dirty_log"}', "slot must be an integer"),
        ('{"op": "get_dirty_log", "slot": 1, "x": 2}', "unknown key 'x'"),
        ('{"op": "clear_dirty_log", "slot": 1, "first_page": 0, "num_pages": 1, "bitmap": 5}',
         "bitmap must be a hex string"),
        ('{"op": "enable_manual_dirty_log_protect", "flags": -1}', "flags must be"),
        ('{"slot": 1, "flags": 0}', "missing"),
        ('{"op": "enable_dirty_ring", "size": 4096, "acq_rel": 1}', "acq_rel must be true or"),
        ('{"op": "enable_dirty_ring", "size": 18446744073709551616}', "size must be an integer"),
        ('{"op": "create_vcpu", "id": 4294967296}', "id must be an integer"),
        ('{"op": "reset_dirty_rings", "count": 3}', "unknown key 'count'"),
        ('{"op": "vcpu_write_guest", "vcpu": 0, "gpa": 0}', "length must be an integer"),
        ('{"op": "map_memory", "hva": 4096, "size": 0}', "size must be positive"),
        ("[1, 2]", "expected a JSON object"),
        ("{bad json", "line"),
    ],
)  # fmt: skip
def test_bad_lines_name_their_line(line: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        list(read_ops(["# a comment", "", line], "repro.jsonl"))
    assert str(info.value).startswith("repro.jsonl:3: ")


def test_ring_ops_in_json_lines() -> None:
    ops: list[Op] = [
        EnableDirtyRing((1 << 32) + 4096, acq_rel=True, result=0),
        CreateVcpu(4096, result=EINVAL),
        ResetDirtyRings(result=EINVAL),
        HarvestDirtyRing(1),
        VcpuMarkPageDirty(0, 16),
        VcpuWriteGuest(0, 0x10000, 4096),
        MapMemory(MEM_HVA, MEM_SIZE),
    ]
    lines = [op_to_json(op) for op in ops]
    assert [json.loads(line) for line in lines] == [
        {"op": "enable_dirty_ring", "size": (1 << 32) + 4096, "acq_rel": True, "result": 0},
        {"op": "create_vcpu", "id": 4096, "result": "EINVAL"},
        {"op": "reset_dirty_rings", "result": "EINVAL"},
        {"op": "harvest_dirty_ring", "vcpu": 1},
        {"op": "vcpu_mark_page_dirty", "vcpu": 0, "gfn": 16},
        {"op": "vcpu_write_guest", "vcpu": 0, "gpa": 0x10000, "length": 4096},
        {"op": "map_memory", "hva": MEM_HVA, "size": MEM_SIZE},
    ]
    assert list(read_ops(lines)) == ops
    # acq_rel may be left out; the operations without a kernel answer keep none
    assert list(read_ops(['{"op": "enable_dirty_ring", "size": 4096}'])) == [EnableDirtyRing(4096)]
    assert with_result(HarvestDirtyRing(0), EINVAL) == HarvestDirtyRing(0)
    assert is_compared(EnableDirtyRing(4096)) and is_compared(CreateVcpu(0))
    assert is_compared(ResetDirtyRings()) and not is_compared(VcpuWriteGuest(0, 0, 1))
    assert all(isinstance(op, RING_OPS) for op in ops[:-1]) and not isinstance(ops[-1], RING_OPS)


def test_ddmin_finds_a_one_minimal_subsequence() -> None:
    calls: list[list[int]] = []

    def needs_3_and_17_in_order(xs: list[int]) -> bool:
        calls.append(xs)
        return 3 in xs and 17 in xs and xs.index(3) < xs.index(17)

    assert ddmin(list(range(100)), needs_3_and_17_in_order) == [3, 17]
    assert len(calls) < 200
    assert ddmin([5], lambda xs: True) == [5]
    # a test that holds for every subset collapses to a single item
    assert len(ddmin(list(range(10)), lambda xs: True)) == 1


def test_ddmin_respects_its_budget() -> None:
    tests = 0

    def count(xs: list[int]) -> bool:
        nonlocal tests
        tests += 1
        return len(xs) >= 50  # never shrinks below half: many failing tests

    ddmin(list(range(100)), count, budget=10)
    assert tests <= 12


# ---------------------------------------------------------------------------------------
# against the kernel


class Slot7Bug(KvmVm):
    """An engine that wrongly refuses every create, move or flag change of slot id 7."""

    def check_region(self, v2: bool, slot: int, flags: int, guest_phys_addr: int,
                     memory_size: int, *args: Any, **kwargs: Any) -> Decision:  # fmt: skip
        d = super().check_region(v2, slot, flags, guest_phys_addr, memory_size, *args, **kwargs)
        if d.id == 7 and d.change is not Change.DELETE:
            raise MemslotError(EINVAL, "planted bug")
        return d


class MoveDownBug(KvmVm):
    """An engine that wrongly refuses to move a slot to a lower gpa (needs a slot first)."""

    def check_region(self, *args: Any, **kwargs: Any) -> Decision:
        d = super().check_region(*args, **kwargs)
        if d.change is Change.MOVE and d.old is not None and d.base_gfn < d.old.base_gfn:
            raise MemslotError(EINVAL, "planted bug")
        return d


def _planted(findings: list[Finding]) -> list[Finding]:
    """The findings a planted bug causes (an engine answering EINVAL): a run may meet a
    real engine bug too, reported on its own."""
    return [f for f in findings if f.disagreement.engine == EINVAL]


@pytest.mark.kvm
def test_a_clean_run_agrees_on_every_call() -> None:
    progress: list[tuple[int, int]] = []
    report = run_conform(1500, 20261124, progress=lambda d, b: progress.append((d, b)))
    assert report.findings == [], [str(f.disagreement) for f in report.findings]
    assert report.agreement == 1.0 and report.agreed == report.calls
    assert report.operations == 1500 and progress[-1] == (1500, 0)
    assert 1400 < report.calls <= 1500  # the rest set up guest_memfds
    assert report.vms >= 3  # VMs are replaced as the run goes
    assert report.kernel_calls >= report.calls
    out = report.to_json()
    assert out["agreement"] == 1.0 and out["disagreements"] == []


@pytest.mark.kvm
def test_a_planted_bug_is_found_and_shrunk_to_one_call() -> None:
    report = run_conform(800, 7, vm_factory=Slot7Bug)
    assert report.disagreeing_calls > 0 and report.agreement < 1.0
    planted = _planted(report.findings)
    creates = [f for f in planted if f.sig[1:] == (0, EINVAL, "")]
    assert creates, [f.sig for f in report.findings]
    for f in planted:
        assert f.reproducer is not None and f.reproducible
        assert len(f.reproducer) <= 3 < len(f.ops)
        # the reproducer still disagrees on a fresh VM, and only on its last call
        done, found = replay_ops(f.reproducer, vm_factory=Slot7Bug)
        assert [i for i, _ in found] == [len(f.reproducer) - 1]
        assert done == f.reproducer  # the recorded results are the kernel's
        assert signature(f.reproducer[-1], found[0][1]) == f.sig
        last = f.reproducer[-1]
        assert isinstance(last, MemslotCall) and last.id == 7
        assert replay_ops(f.reproducer)[1] == []  # the real engine agrees
    assert any(len(f.reproducer or ()) == 1 for f in creates)


@pytest.mark.kvm
def test_a_state_dependent_bug_shrinks_to_its_two_calls() -> None:
    report = run_conform(1500, 11, vm_factory=MoveDownBug, max_reproducers=3)
    planted = _planted(report.findings)
    assert planted
    for f in planted:
        assert f.reproducer is not None
        create, move = f.reproducer  # exactly two operations
        assert isinstance(create, MemslotCall) and isinstance(move, MemslotCall)
        assert create.slot == move.slot and create.result == 0 and move.result == 0
        assert move.guest_phys_addr < create.guest_phys_addr


# ---------------------------------------------------------------------------------------
# the dirty ring against the kernel

RING_KINDS = {cls.name for cls in RING_OPS}


@pytest.mark.kvm
def test_runs_with_the_ring_agree_on_every_call() -> None:
    with_ring = 0
    for seed in (1, 2, 3):
        report = run_conform(5000, seed)
        assert report.findings == [], [str(f.disagreement) for f in report.findings]
        assert report.agreement == 1.0 and report.operations == 5000
        assert report.ring_vms >= 2 and report.ring_operations >= 150
        assert set(report.kinds) >= RING_KINDS
        assert report.ring_operations == sum(report.kinds[k] for k in RING_KINDS)
        ring = report.to_json()["ring"]
        assert ring["operations"] == report.ring_operations and ring["vms"] == report.ring_vms
        with_ring += report.dirty_log_with_ring
    # GET and CLEAR met the ring on (how often in one seed depends on the VMs it draws)
    assert with_ring >= 150


@pytest.mark.kvm
def test_the_ring_operations_get_every_kind_of_answer() -> None:
    """What the generator claims to cover, as the kernel answered it."""
    rng = random.Random(5)
    gen = OpGenerator(rng)
    answers: collections.Counter[tuple[str, int]] = collections.Counter()
    entries = 0
    for _ in range(32):
        with Session() as s:
            gen.use_limits(s.vm.limits)
            gen.untranslate = s.alias_hva
            for op in gen.prelude(ring=True):
                s.run(op)
            for _ in range(150):
                op = gen.next(s.vm.slots(), s.vcpu_ids(), s.vm.dirty_ring_size)
                on = bool(s.vm.dirty_ring_size)
                err = s.run(op)
                if isinstance(op, RING_OPS) or (on and isinstance(op, GetDirtyLog | ClearDirtyLog)):
                    answers[op_kind(op) + ("+ring" if on else ""), err] += 1
            assert s.vm.disagreements == []
            s.vm.check_invariants()
            entries += sum(v.dirty_ring.dirty_index for v in s.vcpus.values() if v.dirty_ring)
    for kind, err in [
        ("enable_dirty_ring", 0), ("enable_dirty_ring", EINVAL), ("enable_dirty_ring", E2BIG),
        ("enable_dirty_ring+ring", EINVAL), ("create_vcpu", 0), ("create_vcpu", EEXIST),
        ("create_vcpu", EINVAL), ("create_vcpu+ring", 0), ("reset_dirty_rings", EINVAL),
        ("reset_dirty_rings+ring", 0), ("get_dirty_log+ring", ENXIO),
        ("clear_dirty_log+ring", ENXIO), ("vcpu_write_guest+ring", 0),
        ("vcpu_mark_page_dirty+ring", 0), ("harvest_dirty_ring+ring", 0),
    ]:  # fmt: skip
        assert answers[kind, err], (kind, err, sorted(answers.items()))
    # GET and CLEAR with the ring on are ENXIO whatever their arguments
    assert {e for (k, e) in answers if k.endswith("_dirty_log+ring")} == {ENXIO}
    assert entries > 100  # host-side writes reached the engine's rings


def _enable_e2big_first(vm: Any, size: int, acq_rel: bool = False) -> None:
    """The ring's enable with the size checks in the wrong order: E2BIG before the power
    of two check (3 MiB would be E2BIG, not EINVAL)."""
    if 0 <= size <= (1 << 64) - 1 and size & U32_MAX > memslots.dirty_ring.KVM_DIRTY_RING_MAX_BYTES:
        raise MemslotError(E2BIG, "planted bug")
    _ENABLE(vm, size, acq_rel)


def _enable_ignoring_vcpus(vm: Any, size: int, acq_rel: bool = False) -> None:
    """The ring's enable without the created_vcpus check (state-dependent: a vCPU first)."""
    created, vm.created_vcpus = vm.created_vcpus, 0
    try:
        _ENABLE(vm, size, acq_rel)
    finally:
        vm.created_vcpus = created


_ENABLE = memslots.dirty_ring.enable_dirty_ring


@pytest.mark.kvm
def test_a_planted_bug_in_the_enable_order_is_found_and_shrunk(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(memslots.dirty_ring, "enable_dirty_ring", _enable_e2big_first)
    # which operations a seed draws depends on what the kernel offers (a kernel without
    # guest_memfd answers those calls differently, and the generator follows): the bug
    # must be found within a few seeds, not by one seed on one kernel
    for seed in range(1, 6):
        report = run_conform(5000, seed)
        sig = ("enable_dirty_ring", EINVAL, E2BIG, "")
        planted = [f for f in report.findings if f.sig == sig]
        if planted:
            break
    assert planted and report.agreement < 1.0, [f.sig for f in report.findings]
    [f] = planted
    assert f.reproducer is not None and len(f.ops) > 1
    [op] = f.reproducer  # one enable on a fresh VM is enough
    assert isinstance(op, EnableDirtyRing) and op.result == EINVAL
    size = op.size & U32_MAX
    assert size > 1 << 20 and size & (size - 1)  # too big *and* not a power of two
    done, found = replay_ops(f.reproducer)
    assert done == f.reproducer and [i for i, _ in found] == [0]
    monkeypatch.undo()  # the bug removed: the real engine agrees with the kernel
    assert replay_ops(f.reproducer)[1] == []


@pytest.mark.kvm
def test_a_planted_bug_in_the_vcpu_order_shrinks_to_its_two_calls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(memslots.dirty_ring, "enable_dirty_ring", _enable_ignoring_vcpus)
    report = run_conform(5000, 2, max_reproducers=2)
    planted = [f for f in report.findings if f.sig == ("enable_dirty_ring", EINVAL, 0, "")]
    assert planted, [f.sig for f in report.findings]
    for f in planted:
        assert f.reproducer is not None
        vcpu, enable = f.reproducer  # exactly two operations
        assert isinstance(vcpu, CreateVcpu) and vcpu.result == 0
        assert isinstance(enable, EnableDirtyRing) and enable.result == EINVAL
    monkeypatch.undo()
    assert all(replay_ops(f.reproducer or [])[1] == [] for f in planted)


# ---------------------------------------------------------------------------------------
# the command line


@pytest.mark.kvm
def test_cli_reports_agreement_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["conform", "--ops", "400", "--seed", "20261124", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["seed"] == 20261124 and out["operations"] == 400
    assert out["agreement"] == 1.0 and out["agreed"] == out["calls"] > 350
    assert out["disagreements"] == []


@pytest.mark.kvm
def test_cli_text_report(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["conform", "--ops", "300", "--seed", "20261124"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("memslots conform: 300 operations on ")
    assert re.search(r" on \d+ VMs?, seed 20261124 \(", lines[0])
    if lines[1].startswith("kernel: Linux "):  # the profile of the kernel it ran on
        del lines[1]
    assert lines[1].startswith("calls answered by kernel and engine: ")
    assert lines[2].startswith("agreement: ") and lines[2].endswith("(100.000%)")
    if lines[3].startswith("dirty-ring operations: "):  # when some VM had the ring's ops
        assert "create_vcpu " in lines[3] and "GET/CLEAR with the ring on: " in lines[3]
        del lines[3]
    assert lines[3:] == ["disagreements: none"]


@pytest.mark.kvm
def test_cli_exits_non_zero_with_reproducers_on_disagreement(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import memslots.tools.cli.conform as cli

    def buggy(*args: Any, **kwargs: Any) -> Any:
        return run_conform(*args, **{**kwargs, "vm_factory": Slot7Bug})

    monkeypatch.setattr(cli, "run_conform", buggy)
    assert main(["conform", "--ops", "500", "--seed", "1"]) == 1
    out = capsys.readouterr().out
    assert "kernel OK, engine EINVAL" in out
    # everything after the summary is JSON Lines with comments: a replayable file
    body = out.split("\n\n", 1)[1]
    ops = list(read_ops(body.splitlines()))
    assert ops and all(isinstance(op, MemslotCall | CreateGuestMemfd | OpenDevNull) for op in ops)
    repro = tmp_path / "repro.jsonl"
    repro.write_text(body)
    # the real engine agrees with the kernel on them
    assert main(["conform", "--replay", str(repro)]) == 0


@pytest.mark.kvm
def test_cli_replay_reports_each_disagreement(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    repro = tmp_path / "r.jsonl"
    lines = [op_to_json(op) for op in PRELUDE]
    lines.append(op_to_json(MemslotCall(0, 4, 0, PAGE, HVA, guest_memfd=GMEM_FD, v2=True)))
    lines.append(op_to_json(GetDirtyLog(0)))
    repro.write_text("# a reproducer\n" + "\n".join(lines) + "\n")
    assert main(["conform", "--replay", str(repro), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    # compared: the guest_memfd's creation, the REGION2 call and the GET
    assert out == {"operations": 4, "calls": 3, "disagreeing_calls": 0, "disagreements": []}


@pytest.mark.kvm
def test_cli_replays_ring_operations(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    ops: list[Op] = [
        *PRELUDE,
        MapMemory(MEM_HVA, 1 << 20),
        MemslotCall(1, 1, 0x10000, 16 * PAGE, HVA),
        EnableDirtyRing(3 << 20),  # EINVAL: not a power of two comes before too big
        EnableDirtyRing((1 << 32) + 4096, acq_rel=True),  # truncated to 4096
        EnableDirtyRing(65536),  # EINVAL: already on
        CreateVcpu(0),
        CreateVcpu(0),  # EEXIST
        CreateVcpu(1 << 20),  # EINVAL: past every kernel's KVM_MAX_VCPU_IDS
        VcpuWriteGuest(0, 0x10000 + 4000, 200),  # pages 0 and 1 of slot 1
        VcpuMarkPageDirty(0, 0x10 + 5),
        HarvestDirtyRing(0),
        ResetDirtyRings(),
        GetDirtyLog(1),
        ClearDirtyLog(1, 1, 64, b""),  # ENXIO before the misaligned first_page
        MemslotCall(1, 0, 0, 0, 0),
        ResetDirtyRings(),
    ]
    repro = tmp_path / "ring.jsonl"
    repro.write_text("\n".join(op_to_json(op) for op in ops) + "\n")
    assert main(["conform", "--replay", str(repro), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {"operations": 18, "calls": 13, "disagreeing_calls": 0, "disagreements": []}
    done, found = replay_ops(ops)
    assert found == []
    results = [getattr(op, "result", None) for op in done]
    assert results[4:10] == [EINVAL, 0, EINVAL, 0, EEXIST, EINVAL]
    assert results[13:17] == [0, ENXIO, ENXIO, 0]
    # the write and the mark went to the engine's ring of vCPU 0, never to the kernel's
    with Session() as s:
        for op in ops[:12]:
            s.run(op)
        vcpu = s.vcpus[0]
        assert vcpu.harvest_dirty_ring() == [(1, 0), (1, 1), (1, 5)]
        assert vcpu.kernel_ring is not None and vcpu.kernel_ring.pushes == 0
        assert s.vm.reset_dirty_rings() == 3 and s.vm.disagreements == []
        assert s.vm.read_guest(0x10000 + 4000, 200) == b"\xa5" * 200


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["conform", "--device", "/nonexistent/kvm"], "--device /nonexistent/kvm: no such file"),
        (["conform", "--replay", "/nonexistent/file"], "cannot read /nonexistent/file"),
    ],
)
def test_cli_errors_are_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    if "--replay" in argv and not kvm_available():
        pytest.skip("without KVM the device check fails first")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("memslots conform: error: ")
    assert message in err


def test_cli_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["conform", "--ops", "0"]) == 2  # argparse's exit is returned, not raised
    assert "argument --ops: 0: must be in 1..10000000" in capsys.readouterr().err
