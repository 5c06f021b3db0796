"""The tools' text reads the same everywhere: one size formatter, one plural helper (no
``1 VMs``, no ``slot(s)``), no stray punctuation, no trailing spaces, no colours rich
guesses, and the memory map's strip colours a record by what the primary model did."""

from __future__ import annotations

import ast
import errno
import json
import re
from pathlib import Path

import pytest

import memslots.tools
from memslots.tools.cli import console, main
from memslots.tools.cli.conform import _print_report
from memslots.tools.conform import ConformReport
from memslots.tools.mapview import build, render_html
from memslots.tools.mapview.model import Column
from memslots.tools.replay import ImplName, replay_trace
from memslots.tools.text import plural, size_text
from memslots.tools.traces import load_trace

TOOLS = Path(memslots.tools.__file__).parent
#: the modules whose text this class covers: the command line (but bench and stress),
#: the replay report, the recorder, the trace readers and the memory map
TEXT_MODULES = sorted(
    p
    for pattern in ("cli/__init__.py", "cli/replay.py", "cli/record.py", "cli/conform.py",
                    "cli/demo.py", "replay/*.py", "record/*.py", "mapview/*.py", "traces.py")
    for p in TOOLS.glob(pattern)
)  # fmt: skip

HEADER = (
    '{"format": "memslots-trace", "version": 2, "host": {"limits": {"nr_address_spaces": 1,'
    ' "max_user_slots": 32764, "max_gfn": 1099511627775, "readonly_mem": true,'
    ' "private_mem": true, "task_size_max": 140737488351232}}}'
)
#: one VM with one slot whose memory is then half unmapped, and a VM that does nothing
ONE_SLOT = "\n".join([
    HEADER,
    '{"kind": "create_vm", "vm": 0, "pid": 7, "type": 0, "result": 0}',
    '{"kind": "set_user_memory_region", "vm": 0, "pid": 7, "slot": 0, "flags": 0,'
    ' "guest_phys_addr": 0, "memory_size": 2097152, "userspace_addr": 1073741824,'
    ' "result": 0}',
    '{"kind": "create_vm", "vm": 1, "pid": 7, "type": 0, "result": 0}',
    '{"kind": "munmap", "pid": 7, "addr": 1074790400, "length": 1048576, "result": 0}',
]) + "\n"  # fmt: skip


def test_one_size_formatter_and_one_plural() -> None:
    assert size_text(640 << 10) == "640 KiB" and size_text(16 << 20) == "16 MiB"
    assert plural(1, "VM") == "1 VM" and plural(2, "VM") == "2 VMs"
    for path in TEXT_MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            where = f"{path.name}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert not re.search(r"[a-z]\(s\)(:| [^{])", node.value), where  # line(s):
            if isinstance(node, ast.IfExp):  # {'s' if n > 1 else ''}
                ends = {getattr(node.body, "value", None), getattr(node.orelse, "value", None)}
                assert "s" not in ends, where
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.FloorDiv):
                assert getattr(node.right, "value", None) != 1024, where  # n // 1024 KiB
    defined = {
        f"{p.name}:{node.name}"
        for p in TEXT_MODULES
        for node in ast.walk(ast.parse(p.read_text()))
        if isinstance(node, ast.FunctionDef)
        and re.fullmatch(r"_size|_?plural|size_text", node.name)
    }  # fmt: skip
    assert not defined, f"own size or plural formatters: {defined}"


def test_demo_and_replay_write_sizes_alike(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo"]) == 0
    demo = capsys.readouterr().out
    assert "640 KiB" in demo and "16 MiB" in demo and "1 MiB" in demo
    assert "16384 KiB" not in demo and "1024 KiB" not in demo
    assert main(["replay", "--no-kvm"]) == 0
    replay = capsys.readouterr().out
    assert "511 MiB" in replay
    for out in (demo, replay):
        trailing = [line for line in out.splitlines() if line != line.rstrip()]
        assert not trailing, trailing[:3]


def test_demo_titles_are_lines_of_their_own(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert re.search(
        r"^create slot 3 overlapping slot 2 \(rejected\) -> EEXIST: .*; generation 12\n[┏+]",
        out,
        re.M,
    ), out


def test_the_console_guesses_no_colours() -> None:
    assert console().highlighter is not None
    con = console()
    with con.capture() as cap:
        con.print("/dev/kvm (s) 0x1000 [1, 2]")
    assert cap.get() == "/dev/kvm (s) 0x1000 [1, 2]\n"
    assert con._highlight is False  # rich's switch for its automatic highlighter


def test_conform_says_1_vm() -> None:
    r = ConformReport(seed=1, operations=1, calls=1, kernel_calls=1, vms=1)
    out = _capture(lambda: _print_report(r))
    assert out.startswith("memslots conform: 1 operation on 1 VM, seed 1")
    assert "(1 ioctl)" in out


def _capture(fn: object) -> str:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        fn()  # type: ignore[operator]
    return buf.getvalue()


def test_replay_and_the_page_count_in_the_singular(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = tmp_path / "one.jsonl"
    trace.write_text(ONE_SLOT)
    assert main(["replay", "--no-kvm", str(trace)]) == 0
    out = capsys.readouterr().out
    assert "Replaying " in out and ": 1 memslot call in 2 VMs, jsonl v2 format" in out
    assert "Agreement: 1/1 record compared (100.0%)" in out
    assert "VM 1, process 7: no memslot calls\n\nTotal" in out  # one line, no tables
    assert out.count("Calls by kind") == 1
    assert "Hazards (1 range unmapped" in out
    page = _page(trace)
    assert "(1 slot)" in page and "1 hazard." in page and "1 memslot call in 2 VMs" in page
    assert "No records: nothing to draw." in page
    assert ". ." not in page and "(1 slots)" not in page and "1 hazards" not in page
    assert page.count('<svg class="map"') == 1  # no empty panel for VM 1


def _page(trace: Path, *impls: ImplName) -> str:
    report = replay_trace(load_trace(str(trace)), impls=impls or ("engine", "array"), kernel=False)
    out = trace.with_suffix(".html")
    with out.open("w") as fp:
        render_html(build(report), fp)
    return out.read_text()


def test_the_page_says_nothing_to_compare_without_a_stray_dot(tmp_path: Path) -> None:
    trace = tmp_path / "vcpu.jsonl"
    trace.write_text(
        HEADER + '\n{"kind": "create_vm", "vm": 0, "pid": 7, "type": 0, "result": 0}\n'
        '{"kind": "create_vcpu", "vm": 0, "pid": 7, "id": 0}\n'
    )
    page = _page(trace, "engine")  # one result, none recorded: nothing to compare
    assert "Agreement: nothing to compare." in page and ". ." not in page


def test_the_strip_shows_what_the_primary_model_did() -> None:
    def column(results: dict[str, int | None]) -> Column:
        return Column(0, "t:1", "create_guest_memfd", "create_guest_memfd", 0, results, False)

    assert column({"engine": 0, "kernel": errno.ENOTTY}).strip == "other"
    assert column({"engine": errno.EINVAL, "kernel": 0}).strip == "failed"
    array = Column(0, "t:1", "x", "create_guest_memfd", 0, {"engine": errno.EINVAL,
                   "array": 0}, False, primary="array")  # fmt: skip
    assert array.strip == "other"


def test_json_calls_is_a_number_and_the_rows_are_records(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = tmp_path / "one.jsonl"
    trace.write_text(ONE_SLOT)
    assert main(["replay", "--no-kvm", "--json", str(trace)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["version"] == 3
    assert [(v["vm"], v["calls"], v["disagreements"]) for v in doc["vms"]] == [
        (0, 1, []), (1, 0, [])
    ]  # fmt: skip
    assert all(isinstance(v["records"], list) for v in doc["vms"])
    assert main(["replay", "--no-kvm", "--json"]) == 0
    one = json.loads(capsys.readouterr().out)
    assert one["calls"] == 37 and len(one["records"]) == 37 and one["vms"][0]["calls"] == 37
