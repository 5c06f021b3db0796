"""``memslots check``: failed calls explained, every rule on a small trace that triggers it
and on a near miss that must not, the real traces of tests/data/traces and the embedded
one, live recordings (the C clients, QEMU booting SeaBIOS), the command line."""

from __future__ import annotations

import dataclasses
import errno
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from memslots.constants import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY
from memslots.tools.check import CHECKS, CheckReport, check_trace
from memslots.tools.cli import main
from memslots.tools.replay import replay_trace
from memslots.tools.traces import (
    CreateVcpu,
    CreateVm,
    EnableCap,
    GetDirtyLog,
    Madvise,
    MemslotCall,
    Munmap,
    Record,
    ReleaseVm,
    ResetDirtyRings,
    Trace,
    embedded_trace_path,
    load_trace,
)

HVA = 0x7F00_0000_0000
MB = 1 << 20
LOG = KVM_MEM_LOG_DIRTY_PAGES
TRACES = Path(__file__).parent / "data" / "traces"
CLIENTS = Path(__file__).parent / "clients"
MEMSLOTS = [
    sys.executable,
    "-c",
    "import sys; from memslots.tools.cli import main; sys.exit(main())",
]


def trace(*records: Record, v2: bool = True, limits: dict[str, Any] | None = None) -> Trace:
    """A trace of ``records`` numbered from line 2 (line 1 is the header); version 2 (it
    carries vCPU, dirty-log and hva records) unless ``v2`` is false."""
    numbered = [dataclasses.replace(r, line=i + 2, source="t") for i, r in enumerate(records)]
    header: dict[str, Any] | None = None
    if v2:
        header = {"format": "memslots-trace", "version": 2, "recorder": {"name": "test"}}
        if limits is not None:
            header["host"] = {"limits": limits}
    return Trace(list(numbered), "t", "jsonl", header)


def call(slot: int, gpa: int, size: int, hva: int, flags: int = 0, result: int = 0) -> MemslotCall:
    return MemslotCall(slot, flags, gpa, size, hva, result)


def delete(slot: int, result: int = 0) -> MemslotCall:
    return MemslotCall(slot, 0, 0, 0, 0, result)


VM = CreateVm(0, 3, 0)
VCPU = CreateVcpu(0, 7, 0)


def rule(report: CheckReport, name: str) -> list[Any]:
    return [f for f in report.findings if f.rule == name]


# --------------------------------------------------------------------------- explanations


def test_a_conflict_names_the_slot_in_the_way_and_the_record_that_created_it() -> None:
    filler = [call(i, (1 << 30) + i * MB, MB, HVA + (64 + i) * MB) for i in range(39)]
    t = trace(
        *filler,  # lines 2-40
        call(7 + 32, 0xFE000000, 16 * MB, HVA),  # line 41: slot 39, in the way
        call(40, 0xFEBF0000, 0x1000, HVA + 32 * MB, result=errno.EEXIST),  # line 42
        v2=False,
    )
    report = check_trace(t)
    [(_, failure)] = report.failures()
    assert failure.line == 42
    why = failure.explanation
    assert why is not None
    assert why.text == (
        "EEXIST: gpa 0xfebf0000-0xfebf0fff overlaps slot 39, gpa 0xfe000000-0xfeffffff,"
        " created at line 41"
    )
    assert (why.check, why.slot, why.record) == ("overlap", 39, 41)
    assert why.function == "virt/kvm/kvm_main.c: kvm_check_memslot_overlap"
    doc = report.to_json()
    [entry] = doc["failures"]
    assert entry["records"] == [42] and entry["errno"] == "EEXIST"
    assert {"check", "function", "text", "slot", "record"} <= set(entry["explanation"])
    assert entry["explanation"]["record"] == 41


def test_a_moved_slot_in_the_way_names_its_move() -> None:
    t = trace(
        call(1, 0, MB, HVA),
        call(1, 4 * MB, MB, HVA),  # line 3: moved
        call(2, 4 * MB, MB, HVA + MB, result=errno.EEXIST),
        v2=False,
    )
    [(_, failure)] = check_trace(t).failures()
    assert failure.explanation is not None
    assert failure.explanation.text.endswith("moved there at line 3")


def test_failures_outside_memslot_calls_are_explained_too() -> None:
    t = trace(
        VM,
        call(0, 0, MB, HVA),
        VCPU,
        CreateVcpu(0, None, errno.EEXIST),  # the same id again
        GetDirtyLog(0, None, errno.ENOENT),  # slot 0 does not log
        ResetDirtyRings(None, errno.EINVAL),  # no ring
        EnableCap(192, 0, (4096, 0, 0, 0), errno.EINVAL),  # ring after a vCPU
        delete(5, result=errno.EINVAL),
    )
    report = check_trace(t)
    checks = [e.explanation.check for _, e in report.failures() if e.explanation]
    expected = ["vcpu-exists", "log-not-logging", "ring-off", "ring-after-vcpu"]
    assert checks == [*expected, "delete-missing"]
    for _, e in report.failures():
        assert e.explanation is not None and e.explanation.function.startswith("virt/kvm/")
        assert e.explanation.check in CHECKS


def test_a_failure_the_engine_does_not_reproduce_is_said_so_and_changes_nothing() -> None:
    t = trace(
        call(0, 0, MB, HVA, result=errno.ENOMEM),  # the kernel ran out of memory
        call(0, 2 * MB, MB, HVA + MB),  # so this is a create, not a move
        v2=False,
    )
    report = check_trace(t)
    [(_, failure)] = report.failures()
    assert failure.explanation is not None and failure.explanation.check == "unexplained"
    assert "the engine accepts this call" in failure.explanation.text
    assert report.vms[0].events[1].change == "create"


# --------------------------------------------------------------------------- unmapped-under-slot


def test_unmapped_under_slot_is_one_finding_per_call_listing_every_slot() -> None:
    t = trace(
        VM,
        call(0, 0, MB, HVA),
        call(1, MB, MB, HVA + MB),
        call(2, 8 * MB, MB, HVA + 8 * MB),
        VCPU,
        Munmap(HVA + MB // 2, MB, 0, vm=None),  # half of slot 0, half of slot 1
        call(3, 16 * MB, MB, HVA + 16 * MB),  # the VM goes on
    )
    [f] = rule(check_trace(t), "unmapped-under-slot")
    assert (f.severity, f.records, f.slots) == ("error", [7], [0, 1])
    assert "gfns 0x80-0xff" in f.message and "gfns 0x100-0x17f" in f.message


def test_unmapped_under_slot_near_misses() -> None:
    base: list[Record] = [VM, call(0, 0, MB, HVA), VCPU]
    # memory beside the slot: nothing
    assert not rule(
        check_trace(trace(*base, Munmap(HVA + MB, MB, 0, vm=None))), "unmapped-under-slot"
    )
    # a failed munmap took nothing
    failed = Munmap(HVA, MB, errno.EINVAL, vm=None)
    assert not rule(check_trace(trace(*base, failed)), "unmapped-under-slot")
    # no vCPU, a VM torn down, a balloon's madvise: info only
    no_vcpu = trace(VM, call(0, 0, MB, HVA), Munmap(HVA, MB, 0, vm=None), call(1, MB, MB, HVA + MB))
    teardown = trace(*base, Munmap(HVA, MB, 0, vm=None), ReleaseVm(vm=0))
    balloon = trace(*base, Madvise(HVA, 4096, 4, 0, vm=None), call(1, MB, MB, HVA + MB))
    for t in (no_vcpu, teardown, balloon):
        [f] = rule(check_trace(t), "unmapped-under-slot")
        assert f.severity == "info", f.message


# --------------------------------------------------------------------------- remap-window


def test_remap_window_a_split_while_vcpus_run() -> None:
    t = trace(
        VM,
        VCPU,
        call(0, 0, 4 * MB, HVA),
        delete(0),  # line 5
        call(0, 0, MB, HVA),  # line 6: the first part back
        call(1, MB, 3 * MB, HVA + MB, flags=KVM_MEM_READONLY),  # line 7
        call(2, 64 * MB, MB, HVA + 64 * MB),  # an unrelated slot ends the update
    )
    [f] = rule(check_trace(t), "remap-window")
    assert (f.severity, f.records, f.slots) == ("warning", [5, 6, 7], [0, 1])
    assert "had no memslot until the next call, line 6" in f.message


def test_remap_window_near_misses() -> None:
    # no vCPU yet: nothing can fault
    assert not rule(
        check_trace(trace(VM, call(0, 0, 4 * MB, HVA), delete(0), call(0, 0, MB, HVA))),
        "remap-window",
    )
    # a move is atomic; a delete whose range is not filled again is a removal
    for t in (
        trace(VM, VCPU, call(0, 0, MB, HVA), call(0, 8 * MB, MB, HVA)),
        trace(VM, VCPU, call(0, 0, MB, HVA), delete(0), call(1, 8 * MB, MB, HVA)),
    ):
        assert not rule(check_trace(t), "remap-window")
    # the same slot switched off and on (a BAR's decode): info
    toggle = trace(VM, VCPU, call(0, 0, MB, HVA), delete(0), call(0, 0, MB, HVA))
    [f] = rule(check_trace(toggle), "remap-window")
    assert f.severity == "info" and "unchanged" in f.message


def test_the_embedded_seabios_trace_shows_its_pam_remaps() -> None:
    report = check_trace(load_trace(embedded_trace_path(), source="seabios.log"))
    windows = [f for f in rule(report, "remap-window") if f.severity == "warning"]
    # the PAM registers split RAM at line 3-7 and shadow the BIOS from line 8 on
    assert len(windows) == 12
    assert windows[0].records == [3, 4, 5, 6, 7]
    runs = {r.rule.id: r for r in report.rules}
    assert (
        runs["remap-window"].note is not None
        and "vCPUs taken to exist" in runs["remap-window"].note
    )
    assert not runs["unmapped-under-slot"].ran and not runs["dirty-log-lost"].ran
    assert "QEMU log does not carry" in str(runs["dirty-log-lost"].why)


# --------------------------------------------------------------------------- dirty-log-lost


def test_dirty_log_lost_a_logging_slot_deleted_unharvested() -> None:
    t = trace(
        VM, VCPU, call(0, 0, MB, HVA, flags=LOG), GetDirtyLog(1, None, errno.ENOENT), delete(0)
    )
    [f] = rule(check_trace(t), "dirty-log-lost")
    assert (f.severity, f.records, f.slots) == ("warning", [4, 6], [0])
    # logging switched off, and a move, lose them too
    off = trace(VM, VCPU, call(0, 0, MB, HVA, flags=LOG), call(0, 0, MB, HVA))
    move = trace(VM, VCPU, call(0, 0, MB, HVA, flags=LOG), call(0, 4 * MB, MB, HVA, flags=LOG))
    assert [f.rule for f in check_trace(off).findings] == ["dirty-log-lost"]
    assert [f.rule for f in check_trace(move).findings] == ["dirty-log-lost"]


def test_dirty_log_lost_near_misses() -> None:
    harvested = trace(VM, VCPU, call(0, 0, MB, HVA, flags=LOG), GetDirtyLog(0, None, 0), delete(0))
    ring = trace(
        VM,
        EnableCap(192, 0, (65536, 0, 0, 0), 0),
        VCPU,
        call(0, 0, MB, HVA, flags=LOG),
        ResetDirtyRings(0, 0),
        delete(0),
    )
    never_logged = trace(VM, VCPU, call(0, 0, MB, HVA), delete(0))
    for t in (harvested, ring, never_logged):
        assert not rule(check_trace(t), "dirty-log-lost")
    # before any vCPU: info
    [f] = rule(check_trace(trace(VM, call(0, 0, MB, HVA, flags=LOG), delete(0))), "dirty-log-lost")
    assert f.severity == "info"


# --------------------------------------------------------------------------- ignored-error


def test_ignored_error_a_delete_of_a_slot_whose_create_failed() -> None:
    t = trace(
        call(0, 0, 2 * MB, HVA),
        call(1, MB, MB, HVA + 4 * MB, result=errno.EEXIST),  # line 3: overlaps slot 0
        delete(1, result=errno.EINVAL),  # line 4: the VMM believed slot 1 existed
        v2=False,
    )
    [f] = rule(check_trace(t), "ignored-error")
    assert (f.severity, f.records, f.slots) == ("error", [3, 4], [1])


def test_ignored_error_near_miss_a_retry_that_worked() -> None:
    t = trace(
        call(0, 0, 2 * MB, HVA),
        call(1, MB, MB, HVA + 4 * MB, result=errno.EEXIST),
        call(1, 8 * MB, MB, HVA + 4 * MB),  # tried elsewhere: fine
        delete(1),
        delete(1, result=errno.EINVAL),  # a double delete is a failure, not a follow-up
        v2=False,
    )
    assert not rule(check_trace(t), "ignored-error")


# --------------------------------------------------------------------------- budget and ids


def test_slot_budget_against_vhost_and_the_kernel() -> None:
    many = trace(*(call(i, i * MB, MB, HVA + i * MB) for i in range(70)), v2=False)
    [f] = rule(check_trace(many), "slot-budget")
    assert f.severity == "warning" and "vhost's 64" in f.message and "509" not in f.message
    assert not rule(
        check_trace(trace(*(call(i, i * MB, MB, HVA + i * MB) for i in range(8)))), "slot-budget"
    )
    # at the kernel's limit (a profile with 10 slots): an error, the refused create explained
    limits = {"nr_address_spaces": 2, "max_user_slots": 10, "max_gfn": (1 << 40) - 1}
    fill = [call(i, i * MB, MB, HVA + i * MB) for i in range(10)]
    full = trace(*fill, call(10, 10 * MB, MB, HVA, result=errno.EINVAL), limits=limits)
    report = check_trace(full)
    [f] = rule(report, "slot-budget")
    assert f.severity == "error" and f.records == [11, 12]
    [(_, failure)] = report.failures()
    assert failure.explanation is not None and failure.explanation.check == "slot-id"


def test_slot_id_growth() -> None:
    cycles: list[Record] = []
    for i in range(20):  # one slot live at a time, a new id every time
        cycles += [call(i, 0, MB, HVA), delete(i)]
    [f] = rule(check_trace(trace(*cycles, v2=False)), "slot-id-growth")
    assert f.severity == "warning" and f.slots == [19] and "reached 19" in f.message
    reused: list[Record] = []
    for _ in range(20):
        reused += [call(0, 0, MB, HVA), delete(0)]
    assert not rule(check_trace(trace(*reused, v2=False)), "slot-id-growth")


# --------------------------------------------------------------------------- hva-alias


def test_hva_alias() -> None:
    shadow = trace(
        call(0, 0xFFFC0000, 256 * 1024, HVA, flags=KVM_MEM_READONLY),
        call(1, 0xE0000, 128 * 1024, HVA + 128 * 1024, flags=KVM_MEM_READONLY),
        v2=False,
    )
    [f] = rule(check_trace(shadow), "hva-alias")
    assert (f.severity, f.slots) == ("info", [0, 1]) and "32 pages" in f.message
    # one logs dirty pages, the other is writable and does not: writes escape the log
    escape = trace(call(0, 0, MB, HVA, flags=LOG), call(1, 8 * MB, MB, HVA), v2=False)
    [f] = rule(check_trace(escape), "hva-alias")
    assert f.severity == "warning"


def test_hva_alias_near_misses() -> None:
    apart = trace(call(0, 0, MB, HVA), call(1, 8 * MB, MB, HVA + MB), v2=False)
    smm = trace(call(0, 0, MB, HVA), call(1 << 16 | 0, 0, MB, HVA), v2=False)  # as 1 aliases as 0
    for t in (apart, smm):
        assert not rule(check_trace(t), "hva-alias")


# --------------------------------------------------------------------------- real traces

#: what check finds on each real trace (docs/check.md explains every one)
REAL = {
    "seabios.log": {"remap-window": (12, 0), "hva-alias": (0, 2), "slot-budget": (0, 1)},
    "migrate-dirty-log.log": {"remap-window": (12, 0), "hva-alias": (0, 2), "slot-budget": (0, 1)},
    "pci-churn.log": {"remap-window": (12, 54), "hva-alias": (0, 4), "slot-budget": (0, 1)},
    "pci-churn.strace.log": {
        "remap-window": (12, 54),
        "hva-alias": (0, 4),
        "slot-budget": (0, 1),
    },
}


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_traces(name: str) -> None:
    report = check_trace(load_trace(TRACES / name))
    found: dict[str, tuple[int, int]] = {}
    for f in report.findings:
        warn, info = found.get(f.rule, (0, 0))
        found[f.rule] = (warn + (f.severity == "warning"), info + (f.severity == "info"))
    assert found == REAL[name]
    assert not report.failures() and not report.notes


# --------------------------------------------------------------------------- command line


def test_cli_exit_status_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    seabios = str(embedded_trace_path())
    assert main(["check", seabios]) == 1  # remap windows are warnings
    out = capsys.readouterr().out
    assert "remap-window" in out and "12 findings at or above warning (exit status 1)" in out
    assert main(["check", seabios, "--fail-on", "error"]) == 0
    capsys.readouterr()
    assert main(["check", seabios, "--json", "--profile", "6.1"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert {"failures", "findings", "rules", "summary"} <= set(doc)
    assert doc["limits"] == {**doc["limits"], "source": "option", "profile": "6.1"}
    for f in doc["findings"]:
        assert set(f) == {"rule", "severity", "vm", "records", "slots", "message"}
    assert doc["summary"]["status"] == 1
    assert main(["check", seabios, "--profile", "9.9"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no kernel profile '9.9': known are" in err
    bad = tmp_path / "bad.log"
    bad.write_text("kvm_set_user_memory Slot#0 flags=zz\n")
    assert main(["check", str(bad)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert main(["check", str(tmp_path / "missing")]) == 2


def test_replay_json_and_text_carry_the_explanation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "t.log"
    path.write_text(
        "kvm_set_user_memory Slot#0 flags=0x0 gpa=0x0 size=0x200000 ua=0x7f0000000000 ret=0\n"
        "kvm_set_user_memory Slot#1 flags=0x0 gpa=0x100000 size=0x1000 ua=0x7f0000400000"
        " ret=-17\n"
    )
    assert main(["replay", str(path), "--no-kvm", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    row = doc["records"][1]
    assert row["explanation"]["check"] == "overlap" and row["explanation"]["record"] == 1
    assert "explanation" not in doc["records"][0]
    assert main(["replay", str(path), "--no-kvm"]) == 0
    out = capsys.readouterr().out
    assert "Failed calls explained (1 call):" in out
    assert "line 2: EEXIST: gpa 0x100000-0x100fff overlaps slot 0, gpa 0x0-0x1fffff, created" in out
    report = replay_trace(load_trace(path), kernel=False)
    why = report.vms[0].explanation(1)
    assert why is not None and why.function.endswith("kvm_check_memslot_overlap")


# --------------------------------------------------------------------------- live recordings


def _build(source: Path, out: Path, static: bool = False) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    cmd = ["gcc", "-O1", "-pthread", "-o", str(out), str(source)]
    if static:
        cmd.insert(1, "-static")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if done.returncode:
        pytest.skip(f"gcc cannot build {source.name} here: {done.stderr.strip()[:200]}")
    return out


def _record(out: Path, *command: str) -> Trace:
    done = subprocess.run(
        [*MEMSLOTS, "record", "-q", "-o", str(out), "--", *command],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.exists(), done.stderr
    return load_trace(out)


@pytest.mark.kvm
def test_the_static_client_recorded_every_failure_explained(tmp_path: Path) -> None:
    client = _build(CLIENTS / "memslot_client.c", tmp_path / "client", static=True)
    t = _record(tmp_path / "client.jsonl", str(client))
    report = check_trace(t)
    failed = [r for r in t.records if r.result]
    assert len(report.failures()) == len(failed) >= 3
    for _, e in report.failures():
        assert e.explanation is not None and e.explanation.check in CHECKS, e.explanation
    # its munmap under slot 1 of VM 1 comes right before the VM is closed: info
    [f] = rule(report, "unmapped-under-slot")
    assert (f.vm, f.slots, f.severity) == (1, [1], "info")
    assert report.status() == 0


@pytest.mark.kvm
def test_every_slot_then_munmap_like_set_memory_region_test(tmp_path: Path) -> None:
    client = _build(CLIENTS / "max_slots_client.c", tmp_path / "max_slots")
    t = _record(tmp_path / "max.jsonl", str(client))
    report = check_trace(t)
    limit = report.vms[0].limits.max_user_slots
    [f] = rule(report, "unmapped-under-slot")  # one finding for the one munmap
    assert len(f.slots) == limit and f.severity == "info"  # the VM has no vCPU
    [budget] = rule(report, "slot-budget")
    assert budget.severity == "error"
    [(_, failure)] = report.failures()
    assert failure.explanation is not None and failure.explanation.check == "slot-id"


@pytest.mark.kvm
def test_qemu_booting_seabios_recorded_live_shows_remap_windows(tmp_path: Path) -> None:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    vm = [qemu, "-accel", "kvm", "-m", "128", "-display", "none", "-nodefaults"]
    t = _record(tmp_path / "qemu.jsonl", "timeout", "3", *vm, "-serial", "none", "-no-reboot")
    report = check_trace(t)
    runs = {r.rule.id: r for r in report.rules}
    assert all(r.ran for r in runs.values())  # a recording carries every kind of record
    assert runs["remap-window"].note is None  # vCPUs are recorded, not assumed
    windows = [f for f in rule(report, "remap-window") if f.severity == "warning"]
    assert len(windows) >= 4  # the PAM remaps while SeaBIOS shadows itself
    assert windows[0].records[0] > next(r.line for r in t.records if isinstance(r, CreateVcpu))
    assert not report.failures()


def test_every_kind_of_record_failing_is_explained() -> None:
    from test_traces_v2 import every_kind

    report = check_trace(trace(*every_kind()))
    failed = [r for r in every_kind() if r.result]
    assert len(report.failures()) == len(failed) == 3
    checks = [e.explanation.check for _, e in report.failures() if e.explanation is not None]
    assert checks == ["ring-after-vcpu", "ring-off", "unexplained"]  # KVM_CREATE_VM: EMFILE
    assert report.to_json()["failures"][-1]["vm"] is None
