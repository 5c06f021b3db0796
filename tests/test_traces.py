"""Trace readers, the JSON Lines writer and the Recorder (memslots.tools.traces)."""

from __future__ import annotations

import errno
import io
import pickle
from collections.abc import Iterable
from pathlib import Path

import pytest

from memslots.constants import KVM_MEM_GUEST_MEMFD, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY
from memslots.errors import MemslotError
from memslots.tools.traces import (
    MemslotCall,
    Record,
    Recorder,
    TraceFormatError,
    call_to_json,
    detect_format,
    embedded_trace_path,
    parse_trace,
    read_embedded_trace,
    read_jsonl,
    read_qemu_log,
    read_strace,
    read_trace,
    write_jsonl,
)

TRACES = Path(__file__).parent / "data" / "traces"

#: the number of calls in each shared trace, as traces/README.md documents
DOCUMENTED = {
    "seabios.log": 37,
    "pci-churn.log": 169,
    "pci-churn.strace.log": 169,
    "migrate-dirty-log.log": 69,
}

QEMU_LINE = (
    "kvm_set_user_memory Slot#1 flags=0x2 gpa=0xfffc0000 size=0x40000 ua=0x7fc3de600000 ret=0"
)
STRACE_LINE = (
    "9000  13:49:47.553088 ioctl(10, KVM_SET_USER_MEMORY_REGION, {slot=1, "
    "flags=KVM_MEM_READONLY, guest_phys_addr=0xfffc0000, memory_size=262144, "
    "userspace_addr=0x7fc3de600000}) = 0 <0.006541>"
)
JSON_LINE = (
    '{"slot": 1, "flags": 2, "guest_phys_addr": 4294705152, "memory_size": 262144, '
    '"userspace_addr": 140479226183680, "result": 0}'
)
EXPECTED = MemslotCall(1, KVM_MEM_READONLY, 0xFFFC0000, 0x40000, 0x7FC3DE600000, result=0)


def memslot_calls(records: Iterable[Record]) -> list[MemslotCall]:
    """The records, each checked to be a memslot call."""
    out = []
    for r in records:
        assert isinstance(r, MemslotCall), r
        out.append(r)
    return out


# --------------------------------------------------------------------------- shared traces


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_shared_trace_has_documented_count(name: str) -> None:
    calls = read_trace(TRACES / name)
    assert len(calls) == DOCUMENTED[name]
    # the README says every call returned 0
    assert all(call.result == 0 for call in calls)
    assert [call.line for call in calls] == list(range(1, len(calls) + 1))
    assert all(call.source == str(TRACES / name) for call in calls)


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("seabios.log", "qemu"),
        ("pci-churn.log", "qemu"),
        ("pci-churn.strace.log", "strace"),
        ("migrate-dirty-log.log", "qemu"),
    ],
)
def test_detect_format_of_shared_traces(name: str, fmt: str) -> None:
    assert detect_format(TRACES / name) == fmt
    assert detect_format(str(TRACES / name)) == fmt


def test_qemu_and_strace_forms_of_pci_churn_agree() -> None:
    qemu = read_trace(TRACES / "pci-churn.log")
    strace = read_trace(TRACES / "pci-churn.strace.log")
    assert qemu == strace
    # equality ignores only where the call was read from
    assert [c.line for c in qemu] == [c.line for c in strace]


def test_migrate_trace_flags() -> None:
    calls = read_trace(TRACES / "migrate-dirty-log.log")
    both = KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY
    # dirty logging is turned on for the read-only BIOS slot too
    assert [c.line for c in calls if c.flags == both] == [45, 61]
    assert {c.as_id for c in calls} == {0}


def test_embedded_trace_is_the_seabios_trace() -> None:
    path = embedded_trace_path()
    assert path.name == "seabios.log"
    assert path.read_text() == (TRACES / "seabios.log").read_text()
    calls = read_embedded_trace()
    assert calls == read_trace(TRACES / "seabios.log")
    assert calls[0].source == "seabios.log"


# --------------------------------------------------------------------------- QEMU


def test_qemu_line_forms() -> None:
    lines = [
        "",
        "kvm_vm_ioctl type 0xc008ae67, arg 0x7ffd5b0f2a20",
        QEMU_LINE,
        "12345@1700000000.123456:" + QEMU_LINE,
        "   qemu-system-x86-1234 [001] 99.5: print: " + QEMU_LINE + "\r\n",
        # QEMU 8: address space and id apart
        "kvm_set_user_memory AddrSpace#1 Slot#3 flags=0x1 gpa=0x0 size=0x1000 ua=0x1000 ret=-17",
        # QEMU 9: guest_memfd fields
        "kvm_set_user_memory AddrSpace#0 Slot#2 flags=0x4 gpa=0x0 size=0x1000 ua=0x1000"
        " guest_memfd=12 guest_memfd_offset=0x2000 ret=0",
        "kvm_set_user_memory AddrSpace#0 Slot#2 flags=0x0 gpa=0x0 size=0x1000 ua=0x1000"
        " guest_memfd=-1 guest_memfd_offset=0x0 ret=0",
        "kvm_set_user_memory_region: some other message",
    ]
    calls = list(read_qemu_log(lines, "q.log"))
    assert calls[:3] == [EXPECTED] * 3
    assert [c.line for c in calls] == [3, 4, 5, 6, 7, 8]
    assert calls[3] == MemslotCall(1 << 16 | 3, KVM_MEM_LOG_DIRTY_PAGES, 0, 0x1000, 0x1000, 17)
    assert (calls[3].as_id, calls[3].id) == (1, 3)
    assert calls[3].result == errno.EEXIST
    assert calls[4] == MemslotCall(
        2, KVM_MEM_GUEST_MEMFD, 0, 0x1000, 0x1000, 0, guest_memfd_offset=0x2000,
        guest_memfd=12, v2=True,
    )  # fmt: skip
    assert calls[5] == MemslotCall(2, 0, 0, 0x1000, 0x1000, 0)


def test_qemu_negative_ret_is_errno() -> None:
    line = QEMU_LINE.replace("ret=0", "ret=-22")
    (call,) = read_qemu_log([line])
    assert call.result == errno.EINVAL


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("kvm_set_user_memory Slot#1 flags=0x2 gpa=0xfffc0000 ret=0", "does not read"),
        (QEMU_LINE.replace("size=0x40000", "size=0xzz"), "not a number"),
        (QEMU_LINE.replace("ua=0x7fc3de600000", "ua=0x1" + "0" * 16), "out of range (u64)"),
        (QEMU_LINE.replace("Slot#1", "Slot#4294967296"), "out of range (u32)"),
        (QEMU_LINE.replace("flags=0x2", "flags=2"), "not 0x-hex"),
        (QEMU_LINE.replace("ret=0", "ret=5"), "neither 0 nor a negative errno"),
        ("kvm_set_user_memory", "does not read"),
    ],
)
def test_qemu_malformed_line(bad: str, message: str) -> None:
    lines = [QEMU_LINE, "other_event x=1", bad, QEMU_LINE]
    with pytest.raises(TraceFormatError) as info:
        list(read_qemu_log(lines, "boot.log"))
    err = info.value
    assert (err.source, err.line) == ("boot.log", 3)
    assert message in err.message
    text = str(err)
    assert text.startswith("boot.log:3: ")
    assert "\n" not in text
    assert isinstance(err, ValueError)


def test_qemu_skip_bad() -> None:
    lines = [QEMU_LINE, "kvm_set_user_memory Slot#x", QEMU_LINE]
    errors: list[TraceFormatError] = []
    calls = list(read_qemu_log(lines, "q", skip_bad=True, errors=errors))
    assert [c.line for c in calls] == [1, 3]
    assert [(e.source, e.line) for e in errors] == [("q", 2)]
    # errors is optional
    assert len(list(read_qemu_log(lines, skip_bad=True))) == 2


# --------------------------------------------------------------------------- strace


def test_strace_line_forms() -> None:
    body = (
        "{slot=1, flags=KVM_MEM_READONLY, guest_phys_addr=0xfffc0000, memory_size=262144,"
        " userspace_addr=0x7fc3de600000}"
    )
    lines = [
        "strace: Process 9002 attached",
        STRACE_LINE,
        f"ioctl(10, KVM_SET_USER_MEMORY_REGION, {body}) = 0",
        f"[pid  9002] 13:49:47.553088 ioctl(10<anon_inode:kvm-vm>, KVM_SET_USER_MEMORY_REGION,"
        f" {body}) = 0 <0.000010>",
        "9002  1700000000.553088 ioctl(10, 0x4020ae46 /* KVM_SET_USER_MEMORY_REGION */,"
        " {slot=1, flags=0x2 /* KVM_MEM_READONLY */, guest_phys_addr=0xfffc0000,"
        " memory_size=262144, userspace_addr=0x7fc3de600000}) = 0 <0.000010>",
        "9002  13:49:47.553088 ioctl(13, KVM_RUN, 0) = 0 <0.000010>",
        '9002  13:49:47.553088 write(1, "ioctl(", 6) = 6',
        "--- SIGUSR1 {si_signo=SIGUSR1, si_code=SI_TKILL, si_pid=9000, si_uid=0} ---",
        "+++ exited with 0 +++",
    ]
    calls = list(read_strace(lines, "s.log"))
    assert calls == [EXPECTED] * 4
    assert [c.line for c in calls] == [2, 3, 4, 5]


def test_strace_flags_and_errors() -> None:
    lines = [
        "ioctl(10, KVM_SET_USER_MEMORY_REGION, {slot=65537, "
        "flags=KVM_MEM_LOG_DIRTY_PAGES|KVM_MEM_READONLY, guest_phys_addr=0, memory_size=4096,"
        " userspace_addr=0x1000}) = -1 EEXIST (File exists) <0.000005>",
        "ioctl(10, KVM_SET_USER_MEMORY_REGION, {slot=2, flags=KVM_MEM_READONLY|0x8,"
        " guest_phys_addr=0, memory_size=4096, userspace_addr=0x1000}) = -1 EINVAL"
        " (Invalid argument)",
        "ioctl(10, KVM_SET_USER_MEMORY_REGION, {slot=2, flags=0x4 /* KVM_MEM_??? */,"
        " guest_phys_addr=0, memory_size=4096, userspace_addr=0x1000}) = -1 EINVAL"
        " (Invalid argument)",
    ]
    first, second, third = memslot_calls(read_strace(lines))
    assert first.flags == KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY
    assert (first.as_id, first.id, first.result) == (1, 1, errno.EEXIST)
    assert second.flags == KVM_MEM_READONLY | 8
    assert second.result == third.result == errno.EINVAL
    assert third.flags == KVM_MEM_GUEST_MEMFD


def test_strace_unfinished_and_resumed() -> None:
    start = STRACE_LINE.replace("[pid ", "").split(") = ")[0]
    lines = [
        start.replace("9000 ", "9002 ") + " <unfinished ...>",
        "9001  13:49:47.553100 ioctl(11, KVM_RUN <unfinished ...>",
        STRACE_LINE.replace("slot=1,", "slot=5,"),
        "9001  13:49:47.553200 <... ioctl resumed>, 0) = 0 <0.0001>",
        "9002  13:49:47.553300 <... ioctl resumed>) = -1 EEXIST (File exists) <0.0003>",
        start.replace("9000 ", "9003 ") + " <unfinished ...>",
        "9003  13:49:47.553300 +++ killed by SIGKILL +++",
    ]
    calls = memslot_calls(read_strace(lines, "s"))
    # yielded as they return; each keeps the line where it started
    assert [(c.slot, c.line, c.result) for c in calls] == [
        (5, 3, 0),
        (1, 1, errno.EEXIST),
        (1, 6, None),
    ]


def test_strace_region2() -> None:
    line = (
        "ioctl(10, KVM_SET_USER_MEMORY_REGION2, {slot=3, flags=KVM_MEM_GUEST_MEMFD,"
        " guest_phys_addr=0x100000, memory_size=4096, userspace_addr=0x1000,"
        " guest_memfd_offset=0x2000, guest_memfd=7, pad1=0, pad2=[0, 0, 0]}) = 0"
    )
    (call,) = read_strace([line])
    assert call == MemslotCall(
        3, KVM_MEM_GUEST_MEMFD, 0x100000, 4096, 0x1000, 0, guest_memfd_offset=0x2000,
        guest_memfd=7, v2=True,
    )  # fmt: skip
    undecoded = "ioctl(10, KVM_SET_USER_MEMORY_REGION2, 0x7ffd5b0f2a20) = 0"
    with pytest.raises(TraceFormatError, match=r"^<strace>:1: .*not decoded by strace"):
        list(read_strace([undecoded]))


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (STRACE_LINE.replace("flags=KVM_MEM_READONLY", "flags=KVM_MEM_BOGUS"), "unknown flag"),
        (STRACE_LINE.replace("memory_size=262144, ", ""), "lacks memory_size"),
        (STRACE_LINE.replace("slot=1", "slot=-1"), "out of range (u32)"),
        (STRACE_LINE.replace("memory_size=262144", "memory_size=" + str(1 << 64)), "u64"),
        (STRACE_LINE.replace(") = 0 <", ") = 7 <"), "neither 0 nor -1"),
        (STRACE_LINE.replace(") = 0 <", ") = -1 EBOGUS (Bogus) <"), "unknown errno name"),
        (STRACE_LINE.replace(") = 0 <", ") = banana <"), "cannot read the return value"),
        (
            STRACE_LINE.split(", {")[0] + ", 0x7ffd5b0f2a20) = -1 EFAULT (Bad address)",
            "not decoded",
        ),
    ],
)
def test_strace_malformed_line(bad: str, message: str) -> None:
    lines = [STRACE_LINE, "9000  13:49:47.553088 close(3) = 0", bad]
    with pytest.raises(TraceFormatError) as info:
        list(read_strace(lines, "run.strace"))
    assert (info.value.source, info.value.line) == ("run.strace", 3)
    assert message in info.value.message
    assert str(info.value).startswith("run.strace:3: ")


def test_strace_skip_bad() -> None:
    bad = STRACE_LINE.replace("slot=1", "slot=x")
    errors: list[TraceFormatError] = []
    calls = list(read_strace([bad, STRACE_LINE, bad], skip_bad=True, errors=errors))
    assert [c.line for c in calls] == [2]
    assert [e.line for e in errors] == [1, 3]


# --------------------------------------------------------------------------- JSON Lines


def test_jsonl_forms() -> None:
    lines = [
        "# recorded by hand",
        "",
        JSON_LINE,
        '{"slot": 1, "flags": 2, "guest_phys_addr": "0xfffc0000", "memory_size": 262144,'
        ' "userspace_addr": "0x7fc3de600000", "result": "OK"}',
        '{"slot": 1, "flags": 2, "guest_phys_addr": 0, "memory_size": 0, "userspace_addr": 0,'
        ' "result": "EEXIST"}',
        '{"slot": 1, "flags": 2, "guest_phys_addr": 0, "memory_size": 0, "userspace_addr": 0,'
        ' "result": 22}',
        '{"slot": 1, "flags": 2, "guest_phys_addr": 0, "memory_size": 0, "userspace_addr": 0}',
        '{"slot": 1, "flags": 4, "guest_phys_addr": 0, "memory_size": 0, "userspace_addr": 0,'
        ' "guest_memfd_offset": 4096, "guest_memfd": 9, "v2": true, "result": null}',
    ]
    calls = memslot_calls(read_jsonl(lines, "t.jsonl"))
    assert calls[:2] == [EXPECTED, EXPECTED]
    assert [c.result for c in calls] == [0, 0, errno.EEXIST, errno.EINVAL, None, None]
    assert calls[5].v2 and calls[5].guest_memfd == 9 and calls[5].guest_memfd_offset == 4096
    assert [c.line for c in calls] == [3, 4, 5, 6, 7, 8]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ('{"slot": 1, "flags": 2', "bad JSON"),
        ("[1, 2, 3]", "expected a JSON object"),
        (JSON_LINE.replace('"memory_size": 262144, ', ""), "missing memory_size"),
        (JSON_LINE.replace('"slot": 1', '"slot": -1'), "out of range (u32)"),
        (JSON_LINE.replace('"slot": 1', '"slot": 4294967296'), "out of range (u32)"),
        (JSON_LINE.replace("262144", str(1 << 64)), "out of range (u64)"),
        (JSON_LINE.replace('"slot": 1', '"slot": 1.5'), "must be an integer"),
        (JSON_LINE.replace('"slot": 1', '"slot": true'), "must be an integer"),
        (JSON_LINE.replace('"flags": 2', '"flag": 2'), "unknown key 'flag'"),
        (JSON_LINE.replace('"result": 0', '"result": -22'), "result must be"),
        (JSON_LINE.replace('"result": 0', '"result": "EBOGUS"'), "unknown errno name"),
        (JSON_LINE.replace('"result": 0', '"result": 0, "v2": 1'), "v2 must be true or false"),
        (JSON_LINE.replace('"result": 0', '"result": 0, "slot": 2'), "given twice"),
    ],
)
def test_jsonl_malformed_line(bad: str, message: str) -> None:
    lines = ["# header", JSON_LINE, bad, JSON_LINE]
    with pytest.raises(TraceFormatError) as info:
        list(read_jsonl(lines, "rec.jsonl"))
    assert (info.value.source, info.value.line) == ("rec.jsonl", 3)
    assert message in info.value.message
    assert str(info.value).startswith("rec.jsonl:3: ")
    assert "\n" not in str(info.value)


def test_jsonl_skip_bad() -> None:
    errors: list[TraceFormatError] = []
    calls = list(read_jsonl(["{", JSON_LINE, "nope"], skip_bad=True, errors=errors))
    assert calls == [EXPECTED]
    assert [e.line for e in errors] == [1, 3]


def test_jsonl_round_trip_of_every_shared_trace(tmp_path: Path) -> None:
    for name in DOCUMENTED:
        calls = read_trace(TRACES / name)
        out = tmp_path / (name + ".jsonl")
        with out.open("w") as fp:
            assert write_jsonl(calls, fp, header=f"from {name}\nsecond line") == len(calls)
        assert out.read_text().startswith(f"# from {name}\n# second line\n{{")
        assert detect_format(out) == "jsonl"
        assert read_trace(out) == calls


def test_jsonl_round_trip_of_odd_calls() -> None:
    calls = [
        MemslotCall(0, 0, 0, 0, 0),
        MemslotCall(1 << 16 | 0x7FFF, 0xFFFFFFFF, (1 << 64) - 1, (1 << 64) - 1, 0, errno.EEXIST),
        MemslotCall(3, KVM_MEM_GUEST_MEMFD, 0, 4096, 0, 0, guest_memfd_offset=1, v2=True),
        MemslotCall(3, 0, 0, 4096, 0, 600),  # an errno with no name
        MemslotCall(3, 0, 0, 4096, 0, 0, guest_memfd=5),
    ]
    fp = io.StringIO()
    write_jsonl(calls, fp)
    assert list(read_jsonl(fp.getvalue().splitlines())) == calls
    assert '"result": "EEXIST"' in call_to_json(calls[1])
    assert '"result": 600' in call_to_json(calls[3])
    assert "result" not in call_to_json(calls[0])


# --------------------------------------------------------------------------- detection


def test_detect_format_from_lines() -> None:
    assert detect_format(["", "# c", JSON_LINE]) == "jsonl"
    assert detect_format(["kvm_vm_ioctl x", QEMU_LINE]) == "qemu"
    assert detect_format(["strace: Process 1 attached", STRACE_LINE]) == "strace"
    assert detect_format([]) == "jsonl"  # empty: an empty JSON Lines trace
    with pytest.raises(TraceFormatError, match=r"^x\.txt: not a memslot trace"):
        detect_format(["hello", "world"], "x.txt")


def test_read_trace_reports_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.log"
    path.write_text(QEMU_LINE + "\n" + QEMU_LINE.replace("ret=0", "ret=zero") + "\n")
    with pytest.raises(TraceFormatError) as info:
        read_trace(path)
    assert str(info.value).startswith(f"{path}:2: ")
    errors: list[TraceFormatError] = []
    assert read_trace(path, skip_bad=True, errors=errors) == [EXPECTED]
    assert len(errors) == 1
    # an explicit format wins over detection
    assert read_trace(path, fmt="jsonl", skip_bad=True) == []
    bom = tmp_path / "bom.jsonl"
    bom.write_text("\ufeff" + JSON_LINE + "\n", encoding="utf-8")
    assert read_trace(bom) == [EXPECTED]
    unknown = tmp_path / "notes.txt"
    unknown.write_text("nothing to see\n")
    with pytest.raises(TraceFormatError, match="not a memslot trace"):
        read_trace(unknown)


def test_parse_trace_and_error_pickles() -> None:
    assert parse_trace(iter([QEMU_LINE]), "x") == [EXPECTED]
    err = TraceFormatError("f", 4, "bad")
    again = pickle.loads(pickle.dumps(err))
    assert (again.source, again.line, again.message, str(again)) == ("f", 4, "bad", "f:4: bad")


# --------------------------------------------------------------------------- Recorder


class FakeVm:
    """A minimal memslot target: refuses to re-create slot 7."""

    def __init__(self) -> None:
        self.made: list[tuple[int, ...]] = []
        self.entered = False

    def set_user_memory_region(
        self, slot: int, flags: int, guest_phys_addr: int, memory_size: int, userspace_addr: int
    ) -> None:
        if slot == 7 and any(args[0] == 7 for args in self.made):
            raise MemslotError(errno.EEXIST, "slot 7 exists")
        self.made.append((slot, flags, guest_phys_addr, memory_size, userspace_addr))

    def set_user_memory_region2(
        self,
        slot: int,
        flags: int,
        guest_phys_addr: int,
        memory_size: int,
        userspace_addr: int,
        guest_memfd_offset: int = 0,
        guest_memfd: int = 0,
    ) -> None:
        if guest_memfd == 99:
            raise TypeError("not an OSError: not recorded")
        self.made.append((slot, flags, guest_phys_addr, memory_size, userspace_addr, guest_memfd))

    def nr_slots(self) -> int:
        return len(self.made)

    def __enter__(self) -> FakeVm:
        self.entered = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.entered = False


def test_recorder_records_results_and_forwards() -> None:
    vm = FakeVm()
    rec = Recorder(vm, source="session")
    rec.set_user_memory_region(7, 0, 0x1000, 0x2000, 0x7F0000000000)
    with pytest.raises(MemslotError) as info:
        rec.set_user_memory_region(7, 0, 0x8000, 0x1000, 0x7F0000100000)
    assert info.value.errno == errno.EEXIST
    rec.set_user_memory_region2(8, 0, 0x10000, 0x1000, 0x7F0000200000, guest_memfd_offset=0)
    with pytest.raises(TypeError):
        rec.set_user_memory_region2(9, 0, 0, 0x1000, 0, guest_memfd=99)
    # other attributes are the target's
    assert rec.nr_slots() == 2
    assert rec.target is vm
    with pytest.raises(AttributeError):
        _ = rec.no_such_attribute

    calls = rec.calls
    assert calls == [
        MemslotCall(7, 0, 0x1000, 0x2000, 0x7F0000000000, result=0),
        MemslotCall(7, 0, 0x8000, 0x1000, 0x7F0000100000, result=errno.EEXIST),
        MemslotCall(8, 0, 0x10000, 0x1000, 0x7F0000200000, result=0, v2=True),
    ]
    assert [(c.line, c.source) for c in calls] == [(n, "session") for n in (1, 2, 3)]

    fp = io.StringIO()
    assert rec.dump(fp) == 3
    assert '"result": "EEXIST"' in fp.getvalue().splitlines()[1]
    assert list(read_jsonl(fp.getvalue().splitlines())) == calls


def test_recorded_calls_replay_to_the_same_results(tmp_path: Path) -> None:
    rec = Recorder(FakeVm())
    for call in read_trace(TRACES / "seabios.log")[:5]:
        call.apply(rec)
    with pytest.raises(MemslotError):
        rec.set_user_memory_region(7, 0, 0, 0x1000, 0)
        rec.set_user_memory_region(7, 0, 0, 0x1000, 0)
    path = tmp_path / "rec.jsonl"
    rec.dump(path, header="FakeVm")
    replayed = Recorder(FakeVm())
    for call in read_trace(path):
        try:
            call.apply(replayed)
        except MemslotError as exc:
            assert exc.errno == call.result
    assert replayed.calls == rec.calls
    assert rec.calls[-1].describe().endswith("-> EEXIST")


def test_recorder_as_context_manager() -> None:
    vm = FakeVm()
    with Recorder(vm) as rec:
        assert vm.entered
        rec.set_user_memory_region(0, 0, 0, 0x1000, 0x1000)
    assert not vm.entered
    assert len(rec.calls) == 1
    rec.clear()
    assert rec.calls == []
