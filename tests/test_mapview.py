"""The memory map over a trace (``memslots replay --html/--png``): the timeline model, the
page (valid, self-contained, escaped, naming every final slot, drawn by a real browser)
and the image."""

from __future__ import annotations

import errno
import html.parser
import io
import json
import os
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

import memslots.tools.cli.replay as cli_replay
import memslots.tools.replay.run as run_mod
from memslots import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, Vm
from memslots.baseline import ArrayVm
from memslots.tools.cli import main
from memslots.tools.mapview import MapView, build, render_html, render_png
from memslots.tools.mapview.model import GpaAxis, slot_style
from memslots.tools.replay import ImplName, MapEntry, TraceReport, replay, replay_trace
from memslots.tools.traces import (
    CreateGuestMemfd,
    CreateVm,
    Madvise,
    MemslotCall,
    Munmap,
    Record,
    TraceWriter,
    embedded_trace_path,
    header_json,
    load_trace,
    write_jsonl,
)
from memslots.validate import VmLimits

TRACES = Path(__file__).parent / "data" / "traces"
TRACE_FILES = sorted(p.name for p in TRACES.glob("*.log"))
HVA = 0x7F00_0000_0000
KB, MB, GB = 1 << 10, 1 << 20, 1 << 30


def replayed(path: Path | str) -> TraceReport:
    return replay_trace(load_trace(path), kernel=False)


def call(
    slot: int, flags: int, gpa: int, size: int, hva: int, result: int | None = 0
) -> MemslotCall:
    return MemslotCall(slot, flags, gpa, size, hva, result, line=1, source="t")


def v2_trace(tmp_path: Path, name: str = "v2.jsonl") -> Path:
    """Two VMs recorded by ``memslots record``: guest_memfd, a failed call, a move, flags,
    hazards (madvise and munmap under live slots), timestamps."""
    t = iter(range(1_000_000_000, 2_000_000_000, 1_000_000))
    records: list[Record] = [
        CreateVm(0, 4, 0, vm=0, time_ns=next(t), pid=10),
        CreateGuestMemfd(2 * MB, 0, 5, 0, vm=0, time_ns=next(t), pid=10),
        MemslotCall(0, 0, 0, 512 * MB, HVA, 0, vm=0, time_ns=next(t), pid=10),
        MemslotCall(1, 4, 4 * GB, 2 * MB, HVA + GB, 0, 0, 5, True, vm=0, time_ns=next(t), pid=10),
        MemslotCall(3, 0, 0x1000, 4 * KB, HVA, errno.EEXIST, vm=0, time_ns=next(t), pid=10),
        MemslotCall(4, 1, 0xFD000000, 16 * MB, HVA + 800 * MB, 0, vm=0, time_ns=next(t), pid=10),
        MemslotCall(4, 1, 0xE0000000, 16 * MB, HVA + 800 * MB, 0, vm=0, time_ns=next(t), pid=10),
        MemslotCall(0, 1, 0, 512 * MB, HVA, 0, vm=0, time_ns=next(t), pid=10),
        Madvise(HVA + 4 * MB, 2 * MB, 4, 0, vm=None, time_ns=next(t), pid=10),
        CreateVm(0, 7, 0, vm=1, time_ns=next(t), pid=10),
        MemslotCall(0x10000, 0, 0, 64 * MB, HVA + 900 * MB, 0, vm=1, time_ns=next(t), pid=10),
        Munmap(HVA + 900 * MB, 4 * KB, 0, vm=None, time_ns=next(t), pid=10),
        MemslotCall(0, 0, 0, 0, HVA, 0, vm=0, time_ns=next(t), pid=10),
    ]  # fmt: skip
    limits = {
        "nr_address_spaces": 2, "max_user_slots": 32764, "max_gfn": (1 << 40) - 1,
        "readonly_mem": True, "private_mem": True, "task_size_max": (1 << 47) - 4096,
    }  # fmt: skip
    path = tmp_path / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    writer = TraceWriter(fd, header_json({"name": "test"}, {"kernel": "x", "limits": limits}))
    for rec in records:
        writer.write(rec)
    writer.end(0, "exited")
    os.close(fd)
    return path


def order(e: MapEntry) -> tuple[int, int]:
    return e.as_id, e.id


def page(view: MapView) -> str:
    out = io.StringIO()
    render_html(view, out)
    return out.getvalue()


# =========================================================================== the model


@pytest.mark.parametrize("name", TRACE_FILES)
def test_slot_changes_rebuild_the_final_map(name: str) -> None:
    """The replay's per-call changes, applied in order, give the final map: the timeline
    shows what the primary model did, nothing else."""
    [vm] = replayed(TRACES / name).vms
    live: dict[tuple[int, int], MapEntry] = {}
    for ch in vm.slot_changes():
        assert vm.runs["engine"].kinds is not None
        assert vm.runs["engine"].kinds[ch.index] == ch.change
        if ch.old is not None:
            assert live.pop((ch.old.as_id, ch.old.id)) == ch.old
        else:
            assert ch.change == "create"
        if ch.new is not None:
            live[(ch.new.as_id, ch.new.id)] = ch.new
        else:
            assert ch.change == "delete"
    final = sorted((e for entries in vm.memory_map().values() for e in entries), key=order)
    assert sorted(live.values(), key=order) == final
    changing = [k for k in vm.kinds() if k in ("create", "delete", "move", "flags")]
    assert len(vm.slot_changes()) == sum(vm.kinds()[k] for k in changing)


def test_seabios_timeline() -> None:
    view = build(replay_trace(load_trace(embedded_trace_path()), kernel=False))
    [panel] = view.panels
    assert (panel.vm, panel.as_id, len(panel.columns)) == (0, 0, 37)
    assert len(panel.bars) == 23  # one per create
    ended = [b for b in panel.bars if b.ended_by is not None]
    assert len(ended) == 14 and all(b.ended_by == "delete" and b.invalid_window for b in ended)
    alive = sorted((b.entry for b in panel.bars if b.ended_by is None), key=order)
    assert alive == sorted(panel.final_map or [], key=order)
    assert all(b.end == 37 for b in panel.bars if b.ended_by is None)
    rom = next(b for b in panel.bars if b.entry.gpa_start == 0xFFFC0000)
    assert (rom.start, rom.made_by, rom.style.key) == (1, "create", "ro")
    first = panel.bars[0]  # all 512 MiB at gpa 0, deleted by record 2 (the PAM split)
    assert (first.entry.size, first.start, first.end) == (512 * MB, 0, 2)
    # the 44 KiB slot and the 511 MiB one are both drawn, the larger taller
    small = next(b for b in panel.bars if b.entry.size == 44 * KB)
    large = next(b for b in panel.bars if b.entry.size == 511 * MB)
    assert panel.axis.span(small.entry.gpa_start, small.gpa_end)[1] >= 5
    assert (
        panel.axis.span(small.entry.gpa_start, small.gpa_end)[1]
        < (panel.axis.span(large.entry.gpa_start, large.gpa_end)[1])
    )
    gaps = [b for b in panel.axis.bands if not b.used]
    assert (gaps[0].start, gaps[0].end) == (0x20000000, 0xFD000000)
    assert not view.vms[0].has_time and view.vms[0].agreeing == 37


def test_axis_keeps_4k_beside_4g_and_squeezes_gaps() -> None:
    axis = GpaAxis([(0, 4 * KB), (4 * GB, 8 * GB), (1 << 40, (1 << 40) + 2 * MB)])
    used = [b for b in axis.bands if b.used]
    gaps = [b for b in axis.bands if not b.used]
    assert [b.size for b in used] == [4 * KB, 4 * GB, 2 * MB]
    assert 8 <= used[0].height < used[2].height < used[1].height <= 150
    assert len(gaps) == 2 and len({g.height for g in gaps}) == 1  # however large the gap
    assert axis.y(0) == 0 and axis.y(4 * KB) == used[0].height
    assert axis.y(6 * GB) == pytest.approx(used[1].y + used[1].height / 2)
    assert [y for y, _ in axis.labels()] == sorted(y for y, _ in axis.labels())
    assert {gpa for _, gpa in axis.labels()} >= {0, 4 * KB, 4 * GB, 8 * GB, 1 << 40}
    leading = GpaAxis([(4 * GB, 5 * GB)])
    assert (leading.bands[0].start, leading.bands[0].used) == (0, False)
    assert GpaAxis([]).bands == [] and GpaAxis([]).y(5) == 0


def test_axis_of_many_pieces_stays_bounded() -> None:
    axis = GpaAxis((i * 2 * MB, (i + 1) * 2 * MB) for i in range(20000))
    assert len(axis.bands) == 20000
    assert axis.height <= 1.5 * 1500
    assert all(b.height > 0 for b in axis.bands)


def test_flags_move_failure_and_address_spaces() -> None:
    calls = [
        call(0, 0, 0, 16 * MB, HVA),
        call(0, KVM_MEM_LOG_DIRTY_PAGES, 0, 16 * MB, HVA),  # flags
        call(0, KVM_MEM_LOG_DIRTY_PAGES, 32 * MB, 16 * MB, HVA),  # move
        call(1, 0, 40 * MB, 4 * KB, HVA + GB, errno.EEXIST),  # overlaps the moved slot
        call(0x10001, KVM_MEM_READONLY, 0xFFFC0000, 256 * KB, HVA + 2 * GB),
        call(0, 0, 0, 0, 0),  # delete
    ]
    view = build(replay(calls, kernel=False))
    assert [(p.vm, p.as_id) for p in view.panels] == [(0, 0), (0, 1)]
    as0, as1 = view.panels
    assert [(b.start, b.end, b.made_by, b.ended_by, b.invalid_window) for b in as0.bars] == [
        (0, 1, "create", "flags", False),
        (1, 2, "flags", "move", True),
        (2, 5, "move", "delete", True),
    ]
    assert [b.style.key for b in as0.bars] == ["ram", "log", "log"]
    [fail] = as0.failures
    assert (fail.index, fail.gpa_start, fail.size, fail.errno) == (3, 40 * MB, 4 * KB, 17)
    assert as0.columns[3].strip == "failed" and as0.columns[3].agree
    assert as0.final_map == [] and as1.final_map is not None and len(as1.final_map) == 1
    [rom] = as1.bars
    assert (rom.entry.id, rom.style.key, rom.ended_by) == (1, "ro", None)
    # the failed call's range is on the axis, inside the moved slot's
    assert any(b.start == 40 * MB and b.end == 40 * MB + 4 * KB for b in as0.axis.bands)


def test_v2_trace_vms_hazards_and_time(tmp_path: Path) -> None:
    report = replayed(v2_trace(tmp_path))
    view = build(report)
    assert [(p.vm, p.as_id) for p in view.panels] == [(0, 0), (1, 1)]
    vm0, vm1 = view.panels
    assert [(h.index, h.slot_id, h.call) for h in vm0.hazards] == [(7, 0, "madvise")]
    assert (vm0.hazards[0].gpa_start, vm0.hazards[0].gpa_end) == (4 * MB, 6 * MB)
    assert [(h.index, h.call) for h in vm1.hazards] == [(1, "munmap")]
    assert {b.style.key for b in vm0.bars} >= {"gmem", "log", "ram"}
    assert [b.entry.id for b in vm0.bars if b.ended_by == "move"] == [4]
    assert view.hazards == 2
    assert [vm.has_time for vm in view.vms] == [True, False]  # VM 1 has one record
    assert [c.kind for c in vm0.columns][:3] == ["create_guest_memfd", "create", "create"]


def test_a_primary_that_crashed_draws_what_it_did(monkeypatch: pytest.MonkeyPatch) -> None:
    class Broken(Vm):
        def set_user_memory_region(self, *args: int) -> None:
            if args[0] == 2:
                raise RuntimeError("boom")
            super().set_user_memory_region(*args)

    real = run_mod._make_model

    def make(name: ImplName, limits: VmLimits) -> Vm | ArrayVm:
        return Broken(profile=limits) if name == "engine" else real(name, limits)

    monkeypatch.setattr(run_mod, "_make_model", make)
    calls = [call(0, 0, 0, MB, HVA), call(1, 0, MB, MB, HVA + MB), call(2, 0, 2 * MB, MB, HVA)]
    view = build(replay(calls, kernel=False))
    [panel] = view.panels
    assert panel.final_map is None
    assert [(b.entry.id, b.start, b.end) for b in panel.bars] == [(0, 0, 2), (1, 1, 2)]
    assert "did not finish" in view.vms[0].notes[0] and "boom" in view.vms[0].notes[0]
    c = check_page(page(view))
    assert "Final map: unknown (the replay did not finish)." in "".join(c.text)


def test_slot_style() -> None:
    assert slot_style(0).key == "ram"
    assert slot_style(KVM_MEM_READONLY).key == "ro"
    assert slot_style(KVM_MEM_LOG_DIRTY_PAGES).key == "log"
    assert slot_style(KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY).key == "logro"
    assert slot_style(4).key == "gmem"
    assert slot_style(0x100).key == "other"


# =========================================================================== the page


VOID = {"meta", "input", "br", "hr", "img", "link"}


class Checker(html.parser.HTMLParser):
    """Collects the structure of a page and fails on tags closed out of order."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.doctype = ""
        self.scripts: list[str] = []
        self.rows: list[list[str]] = []
        self._cell: list[str] | None = None
        self._script: list[str] | None = None
        self.text: list[str] = []

    def handle_decl(self, decl: str) -> None:
        self.doctype = decl

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag == "tr":
            self.rows.append([])
        if tag == "td":
            self._cell = []
        if tag == "script":
            self._script = []
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))  # <rect/>: opened and closed

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
            return
        self.stack.pop()
        if tag == "td" and self._cell is not None:
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None
        if tag == "script" and self._script is not None:
            self.scripts.append("".join(self._script))
            self._script = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        if self._script is not None:
            self._script.append(data)
        self.text.append(data)


def check_page(text: str) -> Checker:
    """Parse ``text``; assert it is well formed and refers to nothing outside itself."""
    c = Checker()
    c.feed(text)
    c.close()
    assert c.doctype.lower() == "doctype html"
    assert not c.errors, c.errors[:5]
    assert not c.stack, c.stack
    names = [t for t, _ in c.tags]
    assert names[:3] == ["html", "head", "meta"] and names.count("body") == 1
    assert "title" in names and "svg" in names
    for tag, attrs in c.tags:
        assert tag not in ("link", "img", "iframe", "object", "embed", "base"), tag
        for key in ("src", "href", "xlink:href", "srcset", "action", "data-src"):
            assert key not in attrs, (tag, key, attrs.get(key))
        style = attrs.get("style") or ""
        fill = attrs.get("fill") or ""
        for value in (style, fill):
            assert "url(" not in value or value.startswith("url(#"), value
    lowered = text.lower()
    assert "@import" not in lowered and "@font-face" not in lowered
    assert "http://" not in lowered and "https://" not in lowered and "//cdn" not in lowered
    return c


def final_rows(c: Checker) -> set[tuple[str, str]]:
    return {(r[0], r[1]) for r in c.rows if len(r) == 5}


def expected_rows(report: TraceReport) -> set[tuple[str, str]]:
    return {
        (str(e.id), f"{e.gpa_start:#x}-{e.gpa_end:#x}")
        for vm in report.vms
        for entries in vm.memory_map().values()
        for e in entries
    }


def test_page_of_the_embedded_trace() -> None:
    trace = load_trace(embedded_trace_path(), source="seabios.log")
    report = replay_trace(trace, kernel=False, embedded=True)
    text = page(build(report))
    c = check_page(text)
    rows = final_rows(c)
    assert rows == expected_rows(report) and len(rows) == 9
    assert ("1", "0xfffc0000-0xffffffff") in rows
    svgs = [a for t, a in c.tags if t == "svg" and a.get("class") == "map"]
    assert len(svgs) == 1
    bars = [a for t, a in c.tags if t == "rect" and (a.get("class") or "").startswith("bar ")]
    assert len(bars) == 23 and {a["data-slot"] for a in bars} >= {"0", "1", "2", "3", "8"}
    invalid = [a for t, a in c.tags if t == "rect" and a.get("class") == "invalid"]
    assert len(invalid) == 14
    [data, script] = c.scripts
    doc = json.loads(data)
    assert len(doc["vms"]["0"]["calls"]) == 37 and len(doc["panels"][0]["bars"]) == 23
    assert doc["vms"]["0"]["calls"][1]["w"] == "seabios.log:2"
    assert "addEventListener" in script
    assert "Guest-physical memory map of seabios.log" in "".join(c.text)


@pytest.mark.parametrize("name", TRACE_FILES)
def test_page_of_every_shared_trace(name: str) -> None:
    report = replayed(TRACES / name)
    c = check_page(page(build(report)))
    assert final_rows(c) == expected_rows(report)


def test_page_of_v1_v2_and_multi_vm_traces(tmp_path: Path) -> None:
    v1 = tmp_path / "v1.jsonl"
    with v1.open("w") as fp:
        write_jsonl(load_trace(TRACES / "seabios.log").calls, fp)
    strace = tmp_path / "two.strace"
    strace.write_text(
        "ioctl(3, KVM_CREATE_VM, 0) = 4\n"
        "ioctl(4, KVM_SET_USER_MEMORY_REGION, {slot=0, flags=0, guest_phys_addr=0,"
        " memory_size=1048576, userspace_addr=0x7f0000000000}) = 0\n"
        "ioctl(3, KVM_CREATE_VM, 0) = 5\n"
        "ioctl(5, KVM_SET_USER_MEMORY_REGION, {slot=0, flags=0, guest_phys_addr=0,"
        " memory_size=1048576, userspace_addr=0x7f0000100000}) = 0\n"
    )
    for path, panels, timed in ((v1, 1, False), (v2_trace(tmp_path), 2, True), (strace, 2, False)):
        report = replayed(path)
        text = page(build(report))
        c = check_page(text)
        assert final_rows(c) == expected_rows(report), path
        assert sum(1 for t, a in c.tags if t == "svg" and a.get("class") == "map") == panels
        assert ('value="time"' in text) == timed  # only v2 traces have timestamps


def test_trace_text_is_escaped(tmp_path: Path) -> None:
    hostile = '<script>alert("x")<\\script> & <b>'
    path = v2_trace(tmp_path, f"{hostile}.jsonl")
    report = replayed(path)
    text = page(build(report))
    c = check_page(text)
    assert hostile not in text  # never raw, in text or attributes
    assert [t for t, _ in c.tags].count("script") == 2
    assert hostile in "".join(c.text)  # but shown as it is
    doc = json.loads(c.scripts[0])
    assert doc["vms"]["0"]["calls"][0]["w"].startswith(str(path))


# =========================================================================== the CLI


def test_cli_writes_the_page(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "map.html"
    assert main(["replay", "--no-kvm", "--html", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "Agreement: 37/37 records compared (100.0%)" in stdout
    assert f"Wrote the memory map over the trace to {out}" in stdout
    c = check_page(out.read_text())
    assert len(final_rows(c)) == 9
    assert main(["replay", "--no-kvm", "--json", "--html", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["calls"]  # stdout stays one JSON document


def test_cli_unwritable_page_is_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(["replay", "--no-kvm", "--html", str(tmp_path / "no" / "such" / "x.html")])
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("memslots replay: error: --html ") and err.count("\n") == 1


def test_cli_png_without_matplotlib_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setattr(cli_replay, "matplotlib_available", lambda: False)
    status = main(["replay", "--no-kvm", "--png", str(tmp_path / "x.png")])
    out, err = capsys.readouterr()
    assert status == 2 and out == ""
    assert err == "memslots replay: error: --png needs matplotlib: pip install 'memslots[plot]'\n"
    assert not (tmp_path / "x.png").exists()


# =========================================================================== the image


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_png_of_the_churn_trace(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "churn.png"
    render_png(build(replayed(TRACES / "pci-churn.log")), str(out))
    width, height = png_size(out)
    assert width == 1400 and 500 < height < 2000
    assert 20_000 < out.stat().st_size < 400_000
    image = pytest.importorskip("PIL.Image").open(out).convert("RGB")  # comes with matplotlib
    colours = {rgb for _, rgb in image.getcolors(1 << 20)}
    assert len(colours) > 20  # bars of several kinds, hatching, text
    for rgb in ((0x4C, 0x78, 0xA8), (0xA6, 0x80, 0xC4), (0xF2, 0x8E, 0x2B)):
        assert rgb in colours  # RAM, ROM, the dirty-logged VGA BAR and aliases


def test_cli_png_and_unwritable_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "seabios.png"
    assert main(["replay", "--no-kvm", "--png", str(out)]) == 0
    assert f"Wrote the picture of the memory map to {out}" in capsys.readouterr().out
    assert png_size(out)[0] == 1400
    status = main(["replay", "--no-kvm", "--png", str(tmp_path / "no" / "x.png")])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("memslots replay: error: --png ")


# =========================================================================== the browser


def distinct_colours(path: Path, limit: int = 10_000) -> set[bytes]:
    """The distinct RGB colours of an 8-bit RGB or RGBA PNG (pure Python: no image
    library is a test dependency)."""
    data = path.read_bytes()
    pos, idat, width, height, channels = 8, b"", 0, 0, 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and colour in (2, 6), (depth, colour)
            channels = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = width * channels
    previous = bytearray(stride)
    seen: set[bytes] = set()
    for y in range(height):
        start = y * (stride + 1)
        filt, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        if filt == 1:
            for i in range(channels, stride):
                line[i] = (line[i] + line[i - channels]) & 0xFF
        elif filt == 2:
            line = bytearray((a + b) & 0xFF for a, b in zip(line, previous, strict=True))
        elif filt == 3:
            for i in range(stride):
                left = line[i - channels] if i >= channels else 0
                line[i] = (line[i] + ((left + previous[i]) >> 1)) & 0xFF
        elif filt == 4:
            for i in range(stride):
                a = line[i - channels] if i >= channels else 0
                b, c = previous[i], previous[i - channels] if i >= channels else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else b if pb <= pc else c
                line[i] = (line[i] + pred) & 0xFF
        if y % 4 == 0 and len(seen) < limit:
            seen.update(bytes(line[i : i + 3]) for i in range(0, stride, channels * 2))
        previous = line
    return seen


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no chromium here (Debian: apt-get install chromium)")


def run_chromium(tmp_path: Path, page_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    profile = tmp_path / "profile"
    profile.mkdir(exist_ok=True)
    return subprocess.run(
        [
            chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", f"--user-data-dir={profile}", "--hide-scrollbars", *args,
            page_path.as_uri(),
        ],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_browser_draws_the_page(tmp_path: Path) -> None:
    chromium()
    report = replayed(TRACES / "pci-churn.log")
    path = tmp_path / "churn.html"
    path.write_text(page(build(report)))
    shot = tmp_path / "shot.png"
    done = run_chromium(tmp_path, path, f"--screenshot={shot}", "--window-size=1000,700")
    assert shot.exists(), done.stderr[-2000:]
    assert png_size(shot) == (1000, 700)
    colours = distinct_colours(shot)
    assert len(colours) > 30  # text, bars, hatching, strip: not a blank page

    def near(rgb: tuple[int, int, int]) -> bool:
        return any(all(abs(c[i] - rgb[i]) <= 6 for i in range(3)) for c in colours)

    assert near((0x4C, 0x78, 0xA8))  # RAM bars
    assert near((0xA6, 0x80, 0xC4))  # the read-only BIOS and option ROMs
    assert near((0x3B, 0x8F, 0x3B))  # creates in the record strip


def test_browser_runs_the_script_hover_and_time(tmp_path: Path) -> None:
    """The script runs through, hovering a bar shows its slot and record, and the time
    axis moves the bars (a driver appended to the page does what a user would)."""
    chromium()
    text = page(build(replayed(v2_trace(tmp_path))))
    driver = """<script>
    window.addEventListener("load", function () {
      var radio = document.querySelector('.xmode input[value="time"][data-vm="0"]');
      var bar = document.querySelector('#vm0-as0 rect.bar[data-slot="4"]');
      var before = bar.getAttribute("x");
      radio.checked = true; radio.dispatchEvent(new Event("change"));
      var r = bar.getBoundingClientRect();
      bar.dispatchEvent(new MouseEvent("mousemove", {bubbles: true,
        clientX: r.left + r.width / 2, clientY: r.top + r.height / 2}));
      var out = document.createElement("pre"); out.id = "result";
      out.textContent = JSON.stringify({tip: document.getElementById("tip").textContent,
        hidden: document.getElementById("tip").hidden, before: before,
        after: bar.getAttribute("x"), ready: document.documentElement.dataset.mapview});
      document.body.appendChild(out);
    });
    </script></body>"""
    path = tmp_path / "driven.html"
    path.write_text(text.replace("</body>", driver))
    done = run_chromium(tmp_path, path, "--dump-dom", "--window-size=1400,1000")
    start = done.stdout.find('<pre id="result">')
    assert start >= 0, done.stderr[-2000:]
    found = json.loads(
        html.unescape(
            done.stdout[start + len('<pre id="result">') : done.stdout.find("</pre>", start)]
        )
    )
    assert found["ready"] == "ready" and not found["hidden"]
    assert "slot 4 (as 0): 0xfd000000-0xfdffffff, 16 MiB, LOG_DIRTY" in found["tip"]
    assert "record " in found["tip"] and "v2.jsonl:" in found["tip"]
    assert found["before"] != found["after"]  # drawn against time now
