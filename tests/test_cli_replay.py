"""``memslots replay``: output, JSON, malformed input, --skip-bad, stdin, --record."""

from __future__ import annotations

import errno
import io
import json
import re
from pathlib import Path

import pytest

import memslots.kvm.abi as abi
from conftest import EACCES_REASON, host_profile, refuse
from memslots import Vm
from memslots.tools.cli import main
from memslots.tools.traces import Recorder, read_embedded_trace

TRACES = Path(__file__).parent / "data" / "traces"
TRACE_FILES = sorted(p.name for p in TRACES.glob("*.log"))

GOOD = "kvm_set_user_memory Slot#0 flags=0x0 gpa=0x0 size=0x1000 ua=0x7f0000000000 ret=0\n"
BAD = "kvm_set_user_memory Slot#1 flags=zz gpa=0x0 size=0x1000 ua=0x7f0000000000 ret=0\n"
OVERLAP = "kvm_set_user_memory Slot#1 flags=0x0 gpa=0x0 size=0x1000 ua=0x7f0000001000 ret=-17\n"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(["replay", *argv])
    out, err = capsys.readouterr()
    return status, out, err


def section(out: str, title: str) -> str:
    """The lines from ``title`` up to the next line that starts a section."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    end = start + 1
    while end < len(lines) and (not lines[end][:1].isalpha() or lines[end].startswith(title)):
        end += 1
    return "\n".join(lines[start:end])


# --------------------------------------------------------------------------- the default


def test_no_argument_replays_the_embedded_trace(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, "--no-kvm")
    assert status == 0, err
    assert err == ""
    assert "Replaying seabios.log: 37 memslot calls, qemu format" in out
    assert "no TRACE given: the embedded trace" in out
    assert "Agreement: 37/37 records compared (100.0%)" in out
    assert "vs recorded: engine 37/37" in out
    kinds = section(out, "Calls by kind")
    assert re.search(r"│ create │\s+23 │", kinds)
    assert re.search(r"│ delete │\s+14 │", kinds)
    assert re.search(r"│ failed │\s+0 │", kinds)
    assert "Errors by errno: none" in out
    assert "Disagreements: none" in out
    amap = section(out, "Final memory map, address space 0")
    assert re.search(
        r"│\s+1 │ 0xfffc0000-0xffffffff │ 256 KiB │ READONLY\s+│ 0x7fc3de600000 │", amap
    )
    assert re.search(r"│\s+3 │ 0xfd000000-0xfdffffff │\s+16 MiB │ LOG_DIRTY\s+│", amap)
    assert "Final memory map, address space 1 (engine, hvas as in the trace): no slots" in out
    timings = section(out, "Timings")
    assert re.search(r"│ engine │\s+37 │", timings)
    assert "kernel" not in timings
    assert "hvas relocated" not in out


@pytest.mark.kvm
def test_no_argument_replays_on_dev_kvm_too(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys)
    assert status == 0, err
    assert re.search(r"^  kernel\s+/dev/kvm", out, re.M)
    nr_as = host_profile().nr_address_spaces  # this kernel's, whatever it is
    assert f"limits  of the kernel replayed on (probed): {nr_as} address space" in out
    assert "hvas relocated for /dev/kvm" in out
    assert "6 hva clusters" in out
    assert "0x7fc3b7e00000-0x7fc3d7dfffff │ 512 MiB" in out
    assert "vs recorded: engine 37/37, array 37/37, kernel 37/37" in out or (
        "vs recorded: engine 37/37, kernel 37/37" in out
    )
    assert "vs kernel: engine 37/37" in out
    assert re.search(r"│ kernel │\s+37 │", section(out, "Timings"))
    # the models have as many address spaces as this kernel
    assert ("address space 1" in out) == (nr_as > 1)


@pytest.mark.parametrize("name", TRACE_FILES)
def test_every_shared_trace_replays_in_agreement(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = run(capsys, str(TRACES / name), "--no-kvm")
    assert status == 0, err
    assert re.search(r"Agreement: (\d+)/\1 records compared \(100\.0%\)", out)


@pytest.mark.kvm
@pytest.mark.parametrize("name", TRACE_FILES)
def test_every_shared_trace_replays_in_agreement_on_dev_kvm(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = run(capsys, str(TRACES / name), "--kvm", "--json")
    assert status == 0, err
    doc = json.loads(out)
    assert doc["implementations"]["kernel"]["status"] == "ok"
    assert doc["agreement"]["rate"] == 1.0
    assert all(
        p["agree"] == p["compared"] == doc["trace"]["calls"] for p in doc["agreement"]["pairs"]
    )
    assert doc["disagreements"] == [] and doc["map_disagreements"] == []


# --------------------------------------------------------------------------- JSON and options


def test_json_is_one_document(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, str(TRACES / "migrate-dirty-log.log"), "--no-kvm", "--json")
    assert status == 0
    doc = json.loads(out)
    assert doc["trace"]["source"].endswith("migrate-dirty-log.log")
    assert doc["trace"]["format"] == "qemu"
    assert doc["kinds"] == {
        "create": 23, "delete": 14, "move": 0, "flags": 32, "no-op": 0, "failed": 0,
    }  # fmt: skip
    assert doc["agreement"]["rate"] == 1.0
    assert doc["implementations"]["kernel"]["status"] == "off"
    assert len(doc["records"]) == 69 and doc["calls"] == 69
    assert doc["records"][0]["where"].endswith("migrate-dirty-log.log:1")


def test_impl_engine_only(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "--no-kvm", "--impl", "engine")
    assert status == 0
    assert re.search(r"^  array\s+off$", out, re.M)
    assert "array µs" not in out


def test_impl_array_is_the_primary(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "--no-kvm", "--impl", "array")
    assert status == 0
    assert "Calls by kind (array)" in out
    assert "Final memory map, address space 0 (array, hvas as in the trace)" in out


def test_kvm_required_but_missing(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(abi, "_open_device", refuse(errno.EACCES))
    status, out, err = run(capsys, "--kvm")
    assert status == 2
    assert out == ""
    assert err == f"memslots replay: error: /dev/kvm: {EACCES_REASON}\n"


def test_calls_lists_every_call(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "--no-kvm", "--calls")
    assert status == 0
    calls = section(out, "Calls (µs")
    assert len(re.findall(r"^\s+\d+\s+(create|delete)\s", calls, re.M)) == 37


def test_stdin(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(GOOD + OVERLAP))
    status, out, _ = run(capsys, "-", "--no-kvm")
    assert status == 0
    assert "Replaying <stdin>: 2 memslot calls, qemu format" in out
    errors = section(out, "Errors by errno")
    assert re.search(r"│\s+17 │ EEXIST │\s+1 │\s+1 │", errors)


def test_disagreement_shows_the_trace_line_and_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = tmp_path / "wrong.log"
    trace.write_text(GOOD + OVERLAP.replace("ret=-17", "ret=0"))
    status, out, _ = run(capsys, str(trace), "--no-kvm")
    assert status == 1
    assert "Agreement: 1/2 records compared (50.0%)" in out
    table = section(out, f"Disagreements (1 call; line of {trace})")
    assert re.search(r"│\s+2 │\s+1 │ -\s+│ 0x0 │ 4 KiB │ 0x7f0000001000 │ OK\s+│ EEXIST │", table)


# --------------------------------------------------------------------------- malformed input


def test_malformed_line_is_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = tmp_path / "bad.log"
    trace.write_text(GOOD + BAD + OVERLAP)
    status, out, err = run(capsys, str(trace), "--no-kvm")
    assert status == 2
    assert out == ""
    assert err == (
        f"memslots replay: error: {trace}:2: flags=zz is not 0x-hex (--skip-bad skips such lines)\n"
    )
    assert "Traceback" not in err


def test_malformed_json_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "bad.jsonl"
    trace.write_text('{"slot": 0, "flags": 0, "guest_phys_addr": 0, "memory_size": 4096}\n')
    status, _, err = run(capsys, str(trace), "--no-kvm")
    assert status == 2
    assert err.splitlines() == [
        f"memslots replay: error: {trace}:1: missing userspace_addr (--skip-bad skips such lines)"
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["/nonexistent/trace.log"], "/nonexistent/trace.log: No such file or directory"),
        (["--format", "strace"], "seabios.log: no memslot calls found (strace format)"),
    ],
)
def test_unusable_input_is_one_line_error(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = run(capsys, *argv, "--no-kvm")
    assert status == 2
    assert out == ""
    assert err == f"memslots replay: error: {message}\n"


def test_not_a_trace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "notes.txt"
    trace.write_text("hello\nworld\n")
    status, _, err = run(capsys, str(trace), "--no-kvm")
    assert status == 2
    assert err.startswith(f"memslots replay: error: {trace}: not a memslot trace")
    assert len(err.splitlines()) == 1


def test_skip_bad_goes_on_and_lists_skipped_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = tmp_path / "bad.log"
    trace.write_text(GOOD + BAD + OVERLAP)
    status, out, err = run(capsys, str(trace), "--no-kvm", "--skip-bad")
    assert status == 0, err
    assert "Replaying" in out and "2 memslot calls" in out
    assert "Skipped 1 malformed line:" in out
    assert f"{trace}:2: flags=zz is not 0x-hex" in out
    status, out, _ = run(capsys, str(trace), "--no-kvm", "--skip-bad", "--json")
    doc = json.loads(out)
    assert doc["trace"]["skipped"] == [
        {"source": str(trace), "line": 2, "message": "flags=zz is not 0x-hex"}
    ]


# --------------------------------------------------------------------------- record, replay


STABLE = ("Calls by kind", "Errors by errno", "Disagreements", "Final memory map")


def stable_sections(out: str) -> list[str]:
    """The tables that do not depend on timing or on the trace's name (for the kinds
    table: its kind and calls columns)."""
    kinds = re.findall(r"^│ (\S+)\s+│\s+(\d+) │", section(out, "Calls by kind"), re.M)
    assert len(kinds) == 6
    return [repr(kinds), *(section(out, t) for t in STABLE[1:])]


def test_record_then_replay_gives_the_same_tables(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recorded = tmp_path / "rec.jsonl"
    status, first, _ = run(capsys, "--no-kvm", "--record", str(recorded))
    assert status == 0
    assert f"Recorded 37 calls with the engine's results to {recorded}" in first
    status, second, _ = run(capsys, str(recorded), "--no-kvm")
    assert status == 0
    assert "Replaying" in second and "37 memslot calls, jsonl format" in second
    assert stable_sections(second) == stable_sections(first)


def test_recorder_output_replays_to_the_same_tables(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rec = Recorder(Vm())
    for c in read_embedded_trace():
        c.apply(rec)
    path = tmp_path / "recorder.jsonl"
    assert rec.dump(path) == 37
    _, direct, _ = run(capsys, "--no-kvm")
    status, replayed, _ = run(capsys, str(path), "--no-kvm")
    assert status == 0
    assert stable_sections(replayed) == stable_sections(direct)


def test_record_to_an_unwritable_place(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run(capsys, "--no-kvm", "--record", str(tmp_path / "no" / "such" / "dir"))
    assert status == 2
    assert err.startswith("memslots replay: error: --record ")
    assert len(err.splitlines()) == 1
