"""The timeline of a replayed trace: what both renderers draw.

:func:`build` turns a :class:`~memslots.tools.replay.TraceReport` into a :class:`MapView`:
one :class:`Panel` per VM and address space, each with

- the VM's records as columns (:class:`Column`: index, ``FILE:LINE``, what the record
  asked, what the primary model did with it, the results);
- the slots as :class:`Bar` s over the columns they lived (from the record that made them
  to the one that deleted, moved or re-flagged them), taken from the primary model's
  :meth:`~memslots.tools.replay.ReplayReport.slot_changes`: nothing is replayed again;
- the failed memslot calls (:class:`Failure`, with the range they asked for) and the
  hazards (:class:`HazardMark`: hvas taken away under a live slot);
- a :class:`GpaAxis`: the guest-physical address space cut at every slot boundary, each
  used piece given a height that grows with the log of its size (so a 4 KiB slot stays
  visible beside a 4 GiB one) and each gap between used pieces squeezed into a thin band
  labelled with its size;
- the final memory map.

The geometry is in abstract units (pixels of the HTML page); the PNG renderer uses the
same units. Cost: O(records + changes log changes) per VM.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Final

from memslots.constants import (
    KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
    PAGE_SIZE,
)
from memslots.errors import errno_name
from memslots.tools.replay import (
    Hazard,
    MapEntry,
    ReplayReport,
    TraceReport,
    describe_record,
    flag_names,
)
from memslots.tools.text import size_text
from memslots.tools.traces import MemslotCall

__all__ = [
    "CALL_KINDS",
    "SLOT_STYLES",
    "Band",
    "Bar",
    "Column",
    "Failure",
    "GpaAxis",
    "HazardMark",
    "MapView",
    "Panel",
    "SlotStyle",
    "build",
    "gpa_text",
    "record_ticks",
    "size_text",
    "slot_style",
]


# =========================================================================== styles


@dataclasses.dataclass(frozen=True, slots=True)
class SlotStyle:
    """How a slot of some flags is drawn: a ``key`` (CSS class), a ``label`` for the
    legend and a ``colour`` (``#rrggbb``)."""

    key: str
    label: str
    colour: str


#: slot styles by what the flags make of the memory, in legend order
SLOT_STYLES: Final = (
    SlotStyle("ram", "RAM", "#4c78a8"),
    SlotStyle("ro", "read-only (ROM)", "#a680c4"),
    SlotStyle("log", "dirty logging", "#f28e2b"),
    SlotStyle("logro", "dirty logging, read-only", "#e0c030"),
    SlotStyle("gmem", "guest_memfd", "#59a14f"),
    SlotStyle("other", "other flags", "#9c9c9c"),
)
_STYLE: Final = {s.key: s for s in SLOT_STYLES}

#: colours of the call strip, by what the primary model did with the record
CALL_KINDS: Final = {
    "create": "#3b8f3b",
    "delete": "#555555",
    "move": "#17a2b8",
    "flags": "#f28e2b",
    "no-op": "#d0d0d0",
    "failed": "#e15759",
    "other": "#b0c4de",
}

#: colour of the INVALID window, the failed calls, the hazards, the disagreements
INVALID_COLOUR: Final = "#222222"
FAILED_COLOUR: Final = "#e15759"
HAZARD_COLOUR: Final = "#d62728"
DISAGREE_COLOUR: Final = "#d000d0"


def slot_style(flags: int) -> SlotStyle:
    """The style of a slot with ``flags``: guest_memfd first, then dirty logging and
    read-only, RAM for none. O(1).

    >>> slot_style(KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY).label
    'dirty logging, read-only'
    """
    known = KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY | KVM_MEM_GUEST_MEMFD
    if flags & ~known:
        return _STYLE["other"]
    if flags & KVM_MEM_GUEST_MEMFD:
        return _STYLE["gmem"]
    log, ro = flags & KVM_MEM_LOG_DIRTY_PAGES, flags & KVM_MEM_READONLY
    if log and ro:
        return _STYLE["logro"]
    if log:
        return _STYLE["log"]
    return _STYLE["ro"] if ro else _STYLE["ram"]


def record_ticks(records: int, width: float) -> list[int]:
    """The record indexes to label on an axis ``width`` pixels wide: every 1, 2 or 5 times
    a power of ten, about one per 60 pixels. O(ticks).

    >>> record_ticks(37, 900)
    [0, 5, 10, 15, 20, 25, 30, 35]
    """
    target = max(2, int(width // 60))
    raw = max(1.0, records / target)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    return list(range(0, records, int(step)))


def gpa_text(gpa: int) -> str:
    """``0xfebe0000``: a guest physical address in hex. O(1)."""
    return f"{gpa:#x}"


# =========================================================================== the pieces


@dataclasses.dataclass(frozen=True, slots=True)
class Column:
    """One replayed record of a VM: ``index`` among the VM's records, where it was read,
    what it asked (``what``), what the primary model did (``kind``: a memslot change kind,
    ``failed``, or the record's own kind), the recorded result and each implementation's
    (errnos, 0 for success, None when unknown), whether they all agree, and its timestamp
    (``time_ns``, 0 when the trace has none; records of several threads may come a little
    out of time order)."""

    index: int
    where: str
    what: str
    kind: str
    recorded: int | None
    results: dict[str, int | None]
    agree: bool
    time_ns: int = 0
    slot: int | None = None
    #: why the record failed (:mod:`memslots.tools.check.explain`), or ""
    why: str = ""
    #: the implementation whose answer the strip shows
    primary: str = "engine"

    @property
    def strip(self) -> str:
        """The key of :data:`CALL_KINDS` the call strip shows for this record: what the
        primary model did with it (a refusal by another implementation is a
        disagreement, marked apart)."""
        if self.kind in CALL_KINDS:
            return self.kind
        if self.results.get(self.primary):
            return "failed"
        return "other"

    def result_text(self) -> str:
        """``"recorded OK, engine OK, array OK"``: every known result by name."""
        parts = [f"recorded {'?' if self.recorded is None else errno_name(self.recorded)}"]
        parts += [
            f"{name} {'n/a' if err is None else errno_name(err)}"
            for name, err in self.results.items()
        ]
        text = ", ".join(parts)
        return f"{text}; why: {self.why}" if self.why else text


@dataclasses.dataclass(frozen=True, slots=True)
class Bar:
    """A slot over the records it lived: made by record ``start`` (``made_by``: create,
    move or flags; the slot is in the map from that record on) and ended by record
    ``end`` (``ended_by``: delete, move or flags; None when it is in the final map, then
    ``end`` is the number of records). A slot a delete or a move ended was INVALID while
    that record ran."""

    entry: MapEntry
    start: int
    end: int
    made_by: str
    ended_by: str | None

    @property
    def invalid_window(self) -> bool:
        """Whether the record that ended the slot made it INVALID first (a delete or a
        move: ``kvm_invalidate_memslot``)."""
        return self.ended_by in ("delete", "move")

    @property
    def gpa_end(self) -> int:
        """One past the slot's last guest physical address."""
        return self.entry.gpa_start + self.entry.size

    @property
    def style(self) -> SlotStyle:
        """How the slot is drawn."""
        return slot_style(self.entry.flags)

    def label(self, room: float) -> str:
        """What fits on the bar in ``room`` pixels: ``"3: 16 MiB"``, or the slot id."""
        long = f"{self.entry.id}: {size_text(self.entry.size)}"
        return long if room >= 7 * len(long) + 6 else str(self.entry.id)

    def describe(self) -> str:
        """``slot 3 (as 0): 0xfd000000-0xfdffffff, 16 MiB, LOG_DIRTY, hva 0x7f...``."""
        e = self.entry
        flags = "|".join(flag_names(e.flags)) or "no flags"
        return (
            f"slot {e.id} (as {e.as_id}): {gpa_text(e.gpa_start)}-{gpa_text(e.gpa_end)},"
            f" {size_text(e.size)}, {flags}, hva {e.userspace_addr:#x}"
        )


@dataclasses.dataclass(frozen=True, slots=True)
class Failure:
    """A memslot call the primary model refused: record ``index`` asked for
    ``[gpa_start, gpa_start + size)`` (size 0: a delete) and got ``errno``."""

    index: int
    slot: int
    gpa_start: int
    size: int
    errno: int


@dataclasses.dataclass(frozen=True, slots=True)
class HazardMark:
    """A hazard (:class:`~memslots.tools.replay.Hazard`) on the timeline: before record
    ``index``, a ``call`` took away the hvas behind ``[gpa_start, gpa_end)`` of slot
    ``slot_id`` while it was live."""

    index: int
    slot_id: int
    gpa_start: int
    gpa_end: int
    call: str
    where: str
    text: str


@dataclasses.dataclass(frozen=True, slots=True)
class Band:
    """A piece of the gpa axis: ``[start, end)`` drawn from ``y`` down ``height`` units;
    ``used`` when some slot (or failed call, or hazard) covers it, else a gap."""

    start: int
    end: int
    y: float
    height: float
    used: bool

    @property
    def size(self) -> int:
        """Bytes of guest physical address space."""
        return self.end - self.start


#: height of a 4 KiB piece, and what each doubling of its size adds
_MIN_HEIGHT: Final = 10.0
_PER_DOUBLING: Final = 5.0
#: height of a gap band
_GAP_HEIGHT: Final = 15.0
#: tallest axis before every piece is scaled down (each keeps at least _FLOOR while
#: there are few enough pieces for that to fit)
_MAX_AXIS: Final = 1500.0
_FLOOR: Final = 1.5


class GpaAxis:
    """The compressed, broken gpa axis of a panel: the address space cut at every
    boundary of ``ranges`` (``[start, end)`` pairs), used pieces sized by the log of
    their size, gaps squeezed to a fixed band. Addresses grow downwards. O(k log k) for
    k ranges; :meth:`y` is O(log k).

    >>> axis = GpaAxis([(0, 0x1000), (4 << 30, 8 << 30)])  # 4 KiB, a gap, 4 GiB
    >>> [(hex(b.start), b.used, b.height) for b in axis.bands]
    [('0x0', True, 10.0), ('0x1000', False, 15.0), ('0x100000000', True, 110.0)]
    """

    def __init__(self, ranges: Iterable[tuple[int, int]]) -> None:
        spans = [(a, b) for a, b in ranges if b > a]
        points = sorted({p for span in spans for p in span})
        cover = [0] * len(points)
        index = {p: i for i, p in enumerate(points)}
        for a, b in spans:
            cover[index[a]] += 1
            cover[index[b]] -= 1
        pieces: list[tuple[int, int, bool]] = []
        if points and points[0] > 0:
            pieces.append((0, points[0], False))
        depth = 0
        for i in range(len(points) - 1):
            depth += cover[i]
            used = depth > 0
            a, b = points[i], points[i + 1]
            if pieces and not used and not pieces[-1][2] and pieces[-1][1] == a:
                pieces[-1] = (pieces[-1][0], b, False)  # one gap band, however many pieces
            else:
                pieces.append((a, b, used))
        heights = [
            _MIN_HEIGHT + _PER_DOUBLING * max(0.0, math.log2((b - a) / PAGE_SIZE))
            if used
            else _GAP_HEIGHT
            for a, b, used in pieces
        ]
        total = sum(heights)
        if total > _MAX_AXIS:
            scale = _MAX_AXIS / total
            floor = min(_FLOOR, _MAX_AXIS / (2 * len(heights)))  # never past 1.5 x the cap
            heights = [max(floor, h * scale) for h in heights]
        self.bands: list[Band] = []
        y = 0.0
        for (a, b, used), h in zip(pieces, heights, strict=True):
            self.bands.append(Band(a, b, y, h, used))
            y += h
        #: the height of the whole axis
        self.height: float = y
        self._starts = [band.start for band in self.bands]

    def y(self, gpa: int) -> float:
        """Where ``gpa`` is drawn: linear inside its band; clamped to the axis."""
        if not self.bands:
            return 0.0
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i < 0:
            return 0.0
        band = self.bands[i]
        if gpa >= band.end:
            return band.y + band.height
        return band.y + band.height * (gpa - band.start) / band.size

    def span(self, start: int, end: int) -> tuple[float, float]:
        """``(top, height)`` of ``[start, end)``."""
        top = self.y(start)
        return top, self.y(end) - top

    def labels(self, min_gap: float = 10.0) -> list[tuple[float, int]]:
        """``(y, gpa)`` of the band boundaries worth labelling: every boundary at least
        ``min_gap`` below the previous label, the top of the axis and every edge of a gap
        (which replaces a label too close to it)."""
        marks: list[tuple[float, int, bool]] = []
        previous_used: bool | None = None
        for band in self.bands:
            edge = previous_used is None or previous_used != band.used  # the top, or a gap
            marks.append((band.y, band.start, edge))
            previous_used = band.used
        if self.bands:
            marks.append((self.height, self.bands[-1].end, False))
        out: list[tuple[float, int, bool]] = []
        for y, gpa, edge in marks:
            if out and y - out[-1][0] < min_gap:
                if not edge or out[-1][2]:
                    continue
                out.pop()
            out.append((y, gpa, edge))
        return [(y, gpa) for y, gpa, _ in out]


# =========================================================================== panels


@dataclasses.dataclass
class Panel:
    """One VM's address space over its records: the bars, failures and hazards in it,
    the axis, and the final map (None when the primary model did not finish)."""

    vm: int
    as_id: int
    columns: list[Column]
    bars: list[Bar]
    failures: list[Failure]
    hazards: list[HazardMark]
    axis: GpaAxis
    final_map: list[MapEntry] | None

    @property
    def key(self) -> str:
        """``"vm0-as0"``: a name for the panel, unique in its view."""
        return f"vm{self.vm}-as{self.as_id}"

    def strip_runs(self) -> list[tuple[int, int, str, bool]]:
        """``(first, end, kind, agree)``: the records as runs of one strip kind
        (:data:`CALL_KINDS`) whose results all agree or all disagree, ``end`` exclusive.
        O(records)."""
        runs: list[tuple[int, int, str, bool]] = []
        for c in self.columns:
            if runs and runs[-1][1] == c.index and runs[-1][2:] == (c.strip, c.agree):
                runs[-1] = (runs[-1][0], c.index + 1, c.strip, c.agree)
            else:
                runs.append((c.index, c.index + 1, c.strip, c.agree))
        return runs


@dataclasses.dataclass
class VmSummary:
    """What the page says of a VM above its panels."""

    vm: int
    pid: int
    attached: bool
    records: int
    calls: int
    primary: str
    ran: list[str]
    agreeing: int
    compared: int
    kinds: dict[str, int]
    notes: list[str]
    has_time: bool


@dataclasses.dataclass
class MapView:
    """Everything the renderers draw: where the trace came from, one summary per VM and
    one :class:`Panel` per VM and address space (creation order, then address space)."""

    source: str
    fmt: str | None
    version: int | None
    embedded: bool
    vms: list[VmSummary]
    panels: list[Panel]
    hazards: int

    def panels_of(self, vm: int) -> list[Panel]:
        """The panels of VM ``vm``."""
        return [p for p in self.panels if p.vm == vm]


def _columns(report: ReplayReport) -> list[Column]:
    out = []
    for o in report.outcomes():
        rec = o.call
        what = describe_record(rec)
        if rec.result is not None:
            what = what.rpartition(" -> ")[0] or what
        out.append(
            Column(
                o.index,
                rec.where,
                what,
                o.kind,
                rec.result,
                dict(o.results),
                o.agree,
                rec.time_ns,
                rec.slot if isinstance(rec, MemslotCall) else None,
                why.line() if (why := report.explanation(o.index)) is not None else "",
                primary=report.primary,
            )
        )
    return out


def _bars(report: ReplayReport, end: int) -> list[Bar]:
    """Each slot's lifetimes from the primary model's changes, in order of their start."""
    live: dict[tuple[int, int], tuple[MapEntry, int, str]] = {}
    bars: list[Bar] = []
    for ch in report.slot_changes():
        if ch.old is not None:
            key = (ch.old.as_id, ch.old.id)
            started = live.pop(key, None)
            if started is not None:
                bars.append(Bar(started[0], started[1], ch.index, started[2], ch.change))
        if ch.new is not None:
            live[(ch.new.as_id, ch.new.id)] = (ch.new, ch.index, ch.change)
    bars += [Bar(entry, start, end, made, None) for entry, start, made in live.values()]
    bars.sort(key=lambda b: (b.start, b.entry.as_id, b.entry.id))
    return bars


def _failures(report: ReplayReport) -> list[Failure]:
    out = []
    for o in report.outcomes():
        rec = o.call
        err = o.results.get(report.primary)
        if o.kind == "failed" and isinstance(rec, MemslotCall) and err:
            out.append(Failure(o.index, rec.slot, rec.guest_phys_addr, rec.memory_size, err))
    return out


def _hazard_mark(h: Hazard) -> HazardMark:
    return HazardMark(
        h.index,
        h.id,
        h.gfn_start * PAGE_SIZE,
        h.gfn_end * PAGE_SIZE,
        h.call.kind,
        h.call.where,
        h.describe(),
    )


def _panels(report: ReplayReport, hazards: Sequence[Hazard]) -> list[Panel]:
    columns = _columns(report)
    primary = report.runs[report.primary]
    end = len(primary.results)
    bars = _bars(report, end)
    failures = _failures(report)
    marks = [(h.as_id, _hazard_mark(h)) for h in hazards if h.vm == report.vm]
    final = report.memory_map() if primary.ran else None
    nr_as = report.limits.nr_address_spaces
    spaces = {b.entry.as_id for b in bars}
    spaces |= {f.slot >> 16 for f in failures if f.slot >> 16 < nr_as}
    spaces |= {a for a, entries in (final or {}).items() if entries}
    panels = []
    for as_id in sorted(spaces) or [0]:
        mine = [b for b in bars if b.entry.as_id == as_id]
        fails = [f for f in failures if f.slot >> 16 == as_id]
        hz = [m for a, m in marks if a == as_id]
        ranges = [(b.entry.gpa_start, b.gpa_end) for b in mine]
        ranges += [(f.gpa_start, f.gpa_start + f.size) for f in fails]
        ranges += [(m.gpa_start, m.gpa_end) for m in hz]
        panels.append(
            Panel(
                report.vm,
                as_id,
                columns,
                mine,
                fails,
                hz,
                GpaAxis(ranges),
                None if final is None else final.get(as_id, []),
            )
        )
    return panels


def _summary(report: ReplayReport, columns: Sequence[Column]) -> VmSummary:
    agreeing, compared = report.agreement()
    notes = list(report.notes)
    primary = report.runs[report.primary]
    if not primary.ran:
        notes.insert(
            0, f"the {report.primary} did not finish ({primary.note}): the map stops there"
        )
    times = [c.time_ns for c in columns]
    return VmSummary(
        vm=report.vm,
        pid=report.pid,
        attached=report.attached,
        records=len(report.records),
        calls=len(report.calls),
        primary=report.primary,
        ran=report.ran,
        agreeing=agreeing,
        compared=compared,
        kinds={k: v for k, v in report.kinds().items() if v},
        notes=notes,
        has_time=bool(times) and all(times) and max(times) > times[0],
    )


def build(report: TraceReport | ReplayReport) -> MapView:
    """The timeline of a replay: one panel per VM and address space that had a slot or
    a failed call (address space 0 for a VM that had neither; none for a VM without
    records). O(records) per VM plus
    O(k log k) for an axis of k ranges."""
    if isinstance(report, ReplayReport):
        report = TraceReport([report], [], report.source, report.embedded, report.fmt)
    panels: list[Panel] = []
    vms = []
    for vm in report.vms:
        mine = _panels(vm, report.hazards)
        if vm.records:  # a VM without records gets no panel: there is nothing to draw
            panels += mine
        vms.append(_summary(vm, mine[0].columns))
    return MapView(
        report.source,
        report.fmt,
        report.version,
        report.embedded,
        vms,
        panels,
        len(report.hazards),
    )
