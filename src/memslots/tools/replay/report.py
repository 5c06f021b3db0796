"""What a replay found: per VM (:class:`ReplayReport`) and for the whole trace
(:class:`TraceReport`), with the JSON document ``memslots replay --json`` prints (its keys
are listed in :mod:`memslots.tools.replay`)."""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any, Final, Literal

from memslots.constants import (
    KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
    PAGE_SHIFT,
)
from memslots.errors import errno_name
from memslots.slot import Memslot
from memslots.tools.check.explain import Explanation, unexplained
from memslots.tools.text import plural
from memslots.tools.traces import (
    ClearDirtyLog,
    CreateGuestMemfd,
    CreateVcpu,
    EnableCap,
    GetDirtyLog,
    HvaChange,
    MemslotCall,
    Record,
    ResetDirtyRings,
    TraceFormatError,
)
from memslots.validate import VmLimits

__all__ = [
    "IMPLS",
    "JSON_VERSION",
    "KINDS",
    "CallOutcome",
    "Disagreement",
    "Hazard",
    "ImplName",
    "ImplRun",
    "MapEntry",
    "ReplayReport",
    "SlotChange",
    "TraceReport",
    "agreement_percent",
    "describe_record",
    "flag_names",
    "memory_map",
]

ImplName = Literal["engine", "array", "kernel"]
#: the implementations a replay runs, in report order
IMPLS: Final[tuple[ImplName, ...]] = ("engine", "array", "kernel")
#: kinds of memslot calls, in report order (``failed``: the primary implementation
#: returned an error); other records are of their own kind (``get_dirty_log``...)
KINDS: Final = ("create", "delete", "move", "flags", "no-op", "failed")
#: report version in the JSON document
JSON_VERSION: Final = 3


def flag_names(flags: int) -> list[str]:
    """Symbolic names of memslot ``flags``: ``["LOG_DIRTY", "READONLY"]``; unknown bits as
    one hex entry; ``[]`` for 0. O(1)."""
    names = []
    if flags & KVM_MEM_LOG_DIRTY_PAGES:
        names.append("LOG_DIRTY")
    if flags & KVM_MEM_READONLY:
        names.append("READONLY")
    if flags & KVM_MEM_GUEST_MEMFD:
        names.append("GUEST_MEMFD")
    rest = flags & ~(KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY | KVM_MEM_GUEST_MEMFD)
    if rest:
        names.append(f"{rest:#x}")
    return names


def describe_record(record: Record) -> str:
    """One human-readable line for any record (see ``MemslotCall.describe``). O(1)."""
    if isinstance(record, MemslotCall):
        return record.describe()
    if isinstance(record, CreateGuestMemfd):
        text = f"create_guest_memfd size={record.size:#x} flags={record.flags:#x}"
    elif isinstance(record, CreateVcpu):
        text = f"create_vcpu id={record.vcpu_id}"
    elif isinstance(record, EnableCap):
        text = f"enable_cap cap={record.cap} args={list(record.args)}"
    elif isinstance(record, GetDirtyLog):
        text = f"get_dirty_log slot={record.slot}"
    elif isinstance(record, ClearDirtyLog):
        text = (
            f"clear_dirty_log slot={record.slot} first_page={record.first_page}"
            f" num_pages={record.num_pages}"
        )
    elif isinstance(record, ResetDirtyRings):
        text = "reset_dirty_rings"
    else:
        text = record.kind
    if record.result is not None:
        text += f" -> {errno_name(record.result)}"
    return text


def agreement_percent(agreeing: int, total: int) -> str:
    """``"99.9%"``: rounded down, so anything short of all never shows as 100%; ``"-"``
    for nothing compared. O(1)."""
    if not total:
        return "-"
    return f"{math.floor(1000 * agreeing / total) / 10:.1f}%"


@dataclasses.dataclass(frozen=True, slots=True)
class MapEntry:
    """One slot of a final memory map (hva as in the trace); ``page_shift`` is the
    kernel's page size (12: 4 KiB)."""

    as_id: int
    id: int
    base_gfn: int
    npages: int
    flags: int
    userspace_addr: int
    page_shift: int = PAGE_SHIFT

    @classmethod
    def of(cls, s: Memslot) -> MapEntry:
        """The entry of a :class:`~memslots.slot.Memslot`. O(1)."""
        return cls(
            s.as_id, s.id, s.base_gfn, s.npages, s.flags & 0xFFFF, s.userspace_addr,
            s.page_shift,
        )  # fmt: skip

    @property
    def slot(self) -> int:
        """ABI slot number ``as_id << 16 | id``."""
        return self.as_id << 16 | self.id

    @property
    def gpa_start(self) -> int:
        """First guest physical address."""
        return self.base_gfn << self.page_shift

    @property
    def size(self) -> int:
        """Bytes."""
        return self.npages << self.page_shift

    @property
    def gpa_end(self) -> int:
        """Last guest physical address (inclusive)."""
        return self.gpa_start + self.size - 1

    def to_json(self) -> dict[str, Any]:
        """The JSON object of the entry (see :mod:`memslots.tools.replay`)."""
        return {
            "slot": self.slot,
            "as_id": self.as_id,
            "id": self.id,
            "gpa_start": self.gpa_start,
            "gpa_end": self.gpa_end,
            "size": self.size,
            "flags": self.flags,
            "flag_names": flag_names(self.flags),
            "hva": self.userspace_addr,
        }


def memory_map(
    slots: Callable[[int], Iterable[Memslot]],
    nr_address_spaces: int,
    untranslate: Callable[[int], int] | None = None,
) -> dict[int, list[MapEntry]]:
    """Address space -> its slots (``slots(as_id)``) as :class:`MapEntry`, hvas mapped back
    with ``untranslate`` when given. O(slots)."""
    out: dict[int, list[MapEntry]] = {}
    for a in range(nr_address_spaces):
        entries = [MapEntry.of(s) for s in slots(a)]
        if untranslate is not None:
            entries = [
                dataclasses.replace(e, userspace_addr=untranslate(e.userspace_addr))
                for e in entries
            ]
        out[a] = entries
    return out


@dataclasses.dataclass(slots=True)
class SlotChange:
    """What one memslot call did to the map of a model: record ``index`` (among the VM's
    replayed records) made a ``change`` (``"create"``, ``"delete"``, ``"move"`` or
    ``"flags"``) of the slot that was ``old`` (None for a create) and is now ``new``
    (None for a delete). Calls that failed or changed nothing have none. For a delete or
    a move, ``old`` was INVALID while the call ran (``kvm_invalidate_memslot``). Read-only
    by convention (not frozen: one is made for every change of a replay, and a frozen
    dataclass costs several times as much to make)."""

    index: int
    change: str
    old: MapEntry | None
    new: MapEntry | None


Status = Literal["ok", "unavailable", "crashed", "off"]


@dataclasses.dataclass
class ImplRun:
    """What one implementation did with one VM's records.

    ``results[i]`` is record i's errno (0 for success; None where the implementation does
    not model the call) and ``times_ns[i]`` its duration; ``kinds[i]`` what it did with
    a memslot call when it can tell (the models). ``details[i]``, when present, says how
    a successful call's answer differed (a dirty bitmap). ``memory_map`` maps each address
    space to its final slots (trace hvas); ``changes`` lists every change the primary model
    made to them, in order (:class:`SlotChange`; empty for the others). ``status`` is ``"ok"``,
    ``"unavailable"`` (not present), ``"crashed"`` (raised something other than a memslot
    error; ``note`` says what and where; results cover the records before) or ``"off"``.
    """

    name: ImplName
    status: Status
    description: str = ""
    note: str | None = None
    results: list[int | None] = dataclasses.field(default_factory=list)
    times_ns: list[int] = dataclasses.field(default_factory=list)
    kinds: list[str] | None = None
    memory_map: dict[int, list[MapEntry]] | None = None
    details: dict[int, str] = dataclasses.field(default_factory=dict)
    changes: list[SlotChange] = dataclasses.field(default_factory=list)
    #: why each record it refused failed (the primary model's; docs/check.md)
    explanations: dict[int, Explanation] = dataclasses.field(default_factory=dict)

    @property
    def ran(self) -> bool:
        """Whether it replayed every record."""
        return self.status == "ok"


@dataclasses.dataclass(frozen=True, slots=True)
class Disagreement:
    """A record whose known results are not all equal (or whose answer differed):
    ``results`` maps ``"recorded"`` and each implementation that ran to its errno (0 for
    success, None where unknown or not modelled); ``detail`` says what else differed."""

    index: int
    call: Record
    results: dict[str, int | None]
    detail: str = ""
    vm: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class CallOutcome:
    """One record with its kind (primary implementation), recorded result and results,
    times and answer differences on each implementation that ran."""

    index: int
    call: Record
    kind: str
    results: dict[str, int | None]
    times_ns: dict[str, int]
    details: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def agree(self) -> bool:
        """All known results (recorded included) are equal and no answer differed."""
        values = {v for v in self.results.values() if v is not None}
        if self.call.result is not None:
            values.add(self.call.result)
        return len(values) <= 1 and not self.details

    @property
    def compared(self) -> bool:
        """Whether at least two results were known to compare (or an answer differed)."""
        known = sum(v is not None for v in self.results.values())
        known += self.call.result is not None
        return known >= 2 or bool(self.details)


@dataclasses.dataclass(frozen=True, slots=True)
class Hazard:
    """An hva range unmapped or discarded (``call``: a munmap, mremap or madvise) while
    slot ``slot`` of VM ``vm`` still mapped part of it: the guest would then see other
    memory or zeros there, the case the kernel's MMU notifier handles
    (``kvm_mmu_notifier_invalidate_range_start`` finds the slots with
    ``kvm_for_each_memslot_in_hva_range``). ``start``/``end`` is the part of the slot's
    hva range that was hit; ``gfn_start``/``gfn_end`` the guest frames behind it
    (``end`` exclusive). ``index`` is how many of the VM's records were replayed before
    the call: its place among them (the hva calls themselves are not replayed)."""

    vm: int
    slot: int
    as_id: int
    id: int
    base_gfn: int
    npages: int
    flags: int
    userspace_addr: int
    start: int
    end: int
    call: HvaChange
    index: int = 0
    #: the kernel's page size (12: 4 KiB)
    page_shift: int = PAGE_SHIFT

    @property
    def gfn_start(self) -> int:
        """First gfn whose memory was hit."""
        return self.base_gfn + ((self.start - self.userspace_addr) >> self.page_shift)

    @property
    def gfn_end(self) -> int:
        """One past the last gfn whose memory was hit."""
        last = self.end - self.userspace_addr + (1 << self.page_shift) - 1
        return self.base_gfn + (last >> self.page_shift)

    def describe(self) -> str:
        """One line: the call, the slot and what of it was hit."""
        return (
            f"{self.call.kind} at {self.call.where} took [{self.start:#x}, {self.end:#x})"
            f" from VM {self.vm} slot {self.id} (as {self.as_id}): gfns"
            f" {self.gfn_start:#x}-{self.gfn_end - 1:#x} of the slot's"
            f" {self.base_gfn:#x}-{self.base_gfn + self.npages - 1:#x}"
        )

    def to_json(self) -> dict[str, Any]:
        """The JSON object of the hazard."""
        return {
            "vm": self.vm,
            "call": self.call.kind,
            "where": self.call.where,
            "line": self.call.line,
            "tid": self.call.tid,
            "start": self.start,
            "end": self.end,
            "slot": self.slot,
            "as_id": self.as_id,
            "id": self.id,
            "flags": self.flags,
            "slot_gfn_start": self.base_gfn,
            "slot_gfn_end": self.base_gfn + self.npages,
            "gfn_start": self.gfn_start,
            "gfn_end": self.gfn_end,
            "slot_hva": self.userspace_addr,
            "slot_size": self.npages << self.page_shift,
        }


# =========================================================================== one VM


@dataclasses.dataclass
class ReplayReport:
    """The outcome of replaying one VM (:func:`memslots.tools.replay.replay`).

    ``records`` are the VM's replayed records in trace order (memslot calls and the other
    VM calls; ``calls`` is the memslot calls alone); ``runs`` holds one :class:`ImplRun`
    per implementation (``engine``, ``array``, ``kernel``, in that order); ``primary``
    names the one whose kinds and memory map are reported. ``notes`` say what the replay
    could not predict. Summaries are computed on demand, each O(n) in the records."""

    calls_and_records: list[Record]
    runs: dict[str, ImplRun]
    primary: ImplName
    limits: VmLimits
    limits_source: str
    relocation: tuple[Any, ...] | None = None
    source: str = ""
    embedded: bool = False
    fmt: str | None = None
    skipped: list[TraceFormatError] = dataclasses.field(default_factory=list)
    vm: int = 0
    pid: int = 0
    vm_type: int | None = None
    attached: bool = False
    notes: list[str] = dataclasses.field(default_factory=list)
    _outcomes: tuple[tuple[int, ...], list[CallOutcome]] | None = dataclasses.field(
        default=None, repr=False, compare=False
    )

    # ------------------------------------------------------------------ per record
    @property
    def records(self) -> list[Record]:
        """Every replayed record of this VM, in order."""
        return self.calls_and_records

    @property
    def calls(self) -> list[MemslotCall]:
        """The memslot calls of this VM, in order."""
        return [r for r in self.calls_and_records if isinstance(r, MemslotCall)]

    @property
    def ran(self) -> list[str]:
        """Names of the implementations that replayed every record, in report order."""
        return [name for name, run in self.runs.items() if run.ran]

    def outcomes(self) -> list[CallOutcome]:
        """Every record with its kind, results and times. O(n) the first time, then
        cached (a report does not change once made)."""
        cached = self._outcomes
        if cached is not None and cached[0] == self._state():
            return cached[1]
        out = self._compute_outcomes()
        self._outcomes = (self._state(), out)
        return out

    def _state(self) -> tuple[int, ...]:
        """What the outcomes depend on, cheaply: records and results per implementation."""
        return (
            len(self.calls_and_records),
            *(id(r.results) for r in self.runs.values()),
            *(len(r.results) for r in self.runs.values()),
        )

    def _compute_outcomes(self) -> list[CallOutcome]:
        names = self.ran
        kinds = self.runs[self.primary].kinds if self.runs[self.primary].ran else None
        out = []
        for i, rec in enumerate(self.calls_and_records):
            details = {n: self.runs[n].details[i] for n in names if i in self.runs[n].details}
            out.append(
                CallOutcome(
                    i,
                    rec,
                    kinds[i] if kinds is not None else "unknown",
                    {n: self.runs[n].results[i] for n in names},
                    {n: self.runs[n].times_ns[i] for n in names},
                    details,
                )
            )
        return out

    def kinds(self) -> dict[str, int]:
        """Records by kind (every kind of :data:`KINDS`, zeros included, then the other
        kinds present). O(n)."""
        counts = Counter(o.kind for o in self.outcomes())
        result = {k: counts.get(k, 0) for k in KINDS}
        for k, v in counts.items():
            if k not in result:
                result[k] = v
        return result

    def errors(self) -> dict[int, dict[str, int]]:
        """For each errno any column saw: how many records got it, per column
        (``recorded`` and every implementation that ran), ascending errno. O(n)."""
        columns = ["recorded", *self.ran]
        table: dict[int, dict[str, int]] = {}
        for o in self.outcomes():
            values: list[tuple[str, int | None]] = [("recorded", o.call.result)]
            values += list(o.results.items())
            for col, err in values:
                if err:
                    row = table.setdefault(err, dict.fromkeys(columns, 0))
                    row[col] += 1
        return dict(sorted(table.items()))

    def disagreements(self) -> list[Disagreement]:
        """Records whose known results differ (recorded vs implementations, or between
        implementations) or whose answers differed, in trace order. O(n)."""
        out = []
        for o in self.outcomes():
            if not o.agree:
                results: dict[str, int | None] = {"recorded": o.call.result}
                results.update(o.results)
                detail = "; ".join(f"{n}: {d}" for n, d in o.details.items())
                out.append(Disagreement(o.index, o.call, results, detail, self.vm))
        return out

    def agreement(self) -> tuple[int, int]:
        """``(agreeing, compared)``: records with at least two known results (or an
        answer that differed), and how many of them agree. O(n)."""
        compared = agreeing = 0
        for o in self.outcomes():
            if o.compared:
                compared += 1
                agreeing += o.agree
        return agreeing, compared

    def agreement_pairs(self) -> list[tuple[str, str, int, int]]:
        """``(a, b, compared, agree)`` for each implementation against the recorded results
        and each model against the kernel. O(n)."""
        names = self.ran
        pairs = [(n, "recorded") for n in names]
        if "kernel" in names:
            pairs += [(n, "kernel") for n in names if n != "kernel"]
        elif len(names) > 1:
            pairs.append((names[1], names[0]))
        out = []
        for a, b in pairs:
            compared = agree = 0
            for i, rec in enumerate(self.calls_and_records):
                x = self.runs[a].results[i]
                y = rec.result if b == "recorded" else self.runs[b].results[i]
                if x is None or y is None:
                    continue
                compared += 1
                agree += x == y and i not in self.runs[a].details
            out.append((a, b, compared, agree))
        return out

    def map_disagreements(self) -> list[tuple[str, str]]:
        """``(impl, detail)`` for each implementation whose final memory map differs from
        the primary's. O(n)."""
        base = self.runs[self.primary].memory_map
        out: list[tuple[str, str]] = []
        if base is None:
            return out
        for name, run in self.runs.items():
            if name == self.primary or not run.ran or run.memory_map is None:
                continue
            for a in sorted(set(base) | set(run.memory_map)):
                mine, theirs = base.get(a, []), run.memory_map.get(a, [])
                if mine != theirs:
                    only_p = [e for e in mine if e not in theirs]
                    only_o = [e for e in theirs if e not in mine]
                    out.append(
                        (
                            name,
                            f"address space {a}: {plural(len(only_p), 'slot')} only in"
                            f" {self.primary} (ids {[e.id for e in only_p]}),"
                            f" {len(only_o)} only in {name}"
                            f" (ids {[e.id for e in only_o]})",
                        )
                    )
        return out

    def explanation(self, index: int) -> Explanation | None:
        """Why record ``index`` failed, when it did (recorded or on the primary model):
        the kernel check and function (:mod:`memslots.tools.check.explain`). O(1)."""
        found = self.runs[self.primary].explanations.get(index)
        if found is None and index < len(self.calls_and_records):
            recorded = self.calls_and_records[index].result
            if recorded:
                results = self.runs[self.primary].results
                found = unexplained(recorded, results[index] if index < len(results) else None)
        return found

    def memory_map(self) -> dict[int, list[MapEntry]]:
        """The primary implementation's final memory map: address space -> slots in gfn
        order, hvas as in the trace (empty when it did not finish). O(slots)."""
        return self.runs[self.primary].memory_map or {}

    def slot_changes(self) -> list[SlotChange]:
        """Every change the primary implementation made to the slots, in record order (up
        to where it stopped, if it crashed): what a picture of the map over the trace is
        drawn from. O(1)."""
        return self.runs[self.primary].changes

    def timings(self) -> dict[str, dict[str, Any]]:
        """For each implementation that ran: records, total, mean and median ns per
        record, and the mean per kind (records it does not model are left out).
        O(n log n)."""
        kinds = [o.kind for o in self.outcomes()]
        out: dict[str, dict[str, Any]] = {}
        for name in self.ran:
            run = self.runs[name]
            times = [t for t, r in zip(run.times_ns, run.results, strict=True) if r is not None]
            by_kind: dict[str, list[int]] = {}
            for k, t, r in zip(kinds, run.times_ns, run.results, strict=True):
                if r is not None:
                    by_kind.setdefault(k, []).append(t)
            out[name] = {
                "calls": len(times),
                "total_ns": sum(times),
                "mean_ns": statistics.fmean(times) if times else 0.0,
                "median_ns": float(statistics.median(times)) if times else 0.0,
                "by_kind": {
                    k: {"calls": len(v), "mean_ns": statistics.fmean(v)}
                    for k in [*KINDS, *sorted(set(by_kind) - set(KINDS))]
                    if (v := by_kind.get(k))
                },
            }
        return out

    @property
    def ok(self) -> bool:
        """No disagreement (per record or in the final maps) and no implementation
        crashed."""
        return (
            not self.disagreements()
            and not self.map_disagreements()
            and all(r.status != "crashed" for r in self.runs.values())
            and self.runs[self.primary].ran
        )

    # ------------------------------------------------------------------ JSON
    def _record_row(self, o: CallOutcome) -> dict[str, Any]:
        rec = o.call
        row: dict[str, Any] = {
            "index": o.index,
            "where": rec.where,
            "line": rec.line,
            "record": rec.kind,
        }
        if isinstance(rec, MemslotCall):
            row.update(
                slot=rec.slot,
                flags=rec.flags,
                guest_phys_addr=rec.guest_phys_addr,
                memory_size=rec.memory_size,
                userspace_addr=rec.userspace_addr,
                v2=rec.v2,
            )
        else:
            row["call"] = describe_record(rec)
        row.update(
            kind=o.kind,
            recorded=rec.result,
            results=o.results,
            time_ns=o.times_ns,
            agree=o.agree,
        )
        if o.details:
            row["details"] = o.details
        explanation = self.explanation(o.index)
        if explanation is not None:
            row["explanation"] = explanation.to_json()
        return row

    def disagreements_json(self) -> list[dict[str, Any]]:
        """The ``disagreements`` list of the JSON document."""
        return [
            {
                "vm": d.vm,
                "index": d.index,
                "where": d.call.where,
                "line": d.call.line,
                "record": d.call.kind,
                "call": describe_record(d.call),
                "results": d.results,
                "detail": d.detail,
            }
            for d in self.disagreements()
        ]

    def to_json(self) -> dict[str, Any]:
        """The JSON document of one VM (see :mod:`memslots.tools.replay`). O(n)."""
        outcomes = self.outcomes()
        agreeing, compared = self.agreement()
        calls = self.calls
        return {
            "version": JSON_VERSION,
            "vm": self.vm,
            "pid": self.pid,
            "vm_type": self.vm_type,
            "attached": self.attached,
            "trace": {
                "source": self.source,
                "embedded": self.embedded,
                "format": self.fmt,
                "calls": len(calls),
                "records": len(self.calls_and_records),
                "skipped": [
                    {"source": e.source, "line": e.line, "message": e.message} for e in self.skipped
                ],
            },
            "primary": self.primary,
            "implementations": {
                name: {"status": r.status, "description": r.description, "note": r.note}
                for name, r in self.runs.items()
            },
            "limits": {**dataclasses.asdict(self.limits), "source": self.limits_source},
            "hva_relocation": None
            if self.relocation is None
            else {
                "total_bytes": sum(c.size for c in self.relocation),
                "clusters": [
                    {"start": c.start, "end": c.end, "addr": c.addr, "delta": c.delta}
                    for c in self.relocation
                ],
            },
            "kinds": self.kinds(),
            "errors": {
                errno_name(err): {"errno": err, **row} for err, row in self.errors().items()
            },
            "agreement": {
                "calls": compared,
                "agreeing": agreeing,
                "rate": agreeing / compared if compared else None,
                "pairs": [
                    {"a": a, "b": b, "compared": c, "agree": g}
                    for a, b, c, g in self.agreement_pairs()
                ],
            },
            "disagreements": self.disagreements_json(),
            "map_disagreements": [
                {"impl": name, "detail": detail} for name, detail in self.map_disagreements()
            ],
            "memory_map": {
                str(a): [e.to_json() for e in entries] for a, entries in self.memory_map().items()
            },
            "timings": self.timings(),
            "notes": list(self.notes),
            "calls": len(calls),
            "records": [self._record_row(o) for o in outcomes],
        }

    def recorded_calls(self) -> list[MemslotCall]:
        """The memslot calls with the primary implementation's results as their recorded
        result (what ``--record`` writes). O(n)."""
        results = self.runs[self.primary].results
        out = []
        for i, rec in enumerate(self.calls_and_records):
            if isinstance(rec, MemslotCall):
                got = results[i] if i < len(results) else None
                out.append(rec if got is None else dataclasses.replace(rec, result=got))
        return out


# =========================================================================== the trace


@dataclasses.dataclass
class TraceReport:
    """The outcome of :func:`memslots.tools.replay.replay_trace`: one
    :class:`ReplayReport` per VM (``vms``, creation order) and the ``hazards`` found."""

    vms: list[ReplayReport]
    hazards: list[Hazard]
    source: str = ""
    embedded: bool = False
    fmt: str | None = None
    version: int | None = None
    skipped: list[TraceFormatError] = dataclasses.field(default_factory=list)
    header: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        """Every VM agrees (hazards are findings about the program, not disagreements)."""
        return all(vm.ok for vm in self.vms)

    @property
    def calls(self) -> int:
        """Memslot calls replayed, over every VM."""
        return sum(len(vm.calls) for vm in self.vms)

    def agreement(self) -> tuple[int, int]:
        """``(agreeing, compared)`` over every VM."""
        pairs = [vm.agreement() for vm in self.vms]
        return sum(a for a, _ in pairs), sum(c for _, c in pairs)

    def kinds(self) -> dict[str, int]:
        """Records by kind over every VM."""
        total: Counter[str] = Counter()
        for vm in self.vms:
            total.update(vm.kinds())
        result = {k: total.get(k, 0) for k in KINDS}
        result.update({k: v for k, v in total.items() if k not in result})
        return result

    def to_json(self) -> dict[str, Any]:
        """The document ``memslots replay --json`` prints (see :mod:`memslots.tools.replay`).
        For a one-VM trace it is that VM's document plus ``vms`` and ``hazards``. O(n):
        each VM's document is made once (the entry of ``vms`` shares its parts)."""
        docs = [vm.to_json() for vm in self.vms]
        vm_docs = [dict(doc) for doc in docs]
        trace_info: dict[str, Any] = {
            "source": self.source,
            "embedded": self.embedded,
            "format": self.fmt,
            "trace_version": self.version,
            "vms": len(self.vms),
            "calls": self.calls,
            "records": sum(len(vm.records) for vm in self.vms),
            "skipped": [
                {"source": e.source, "line": e.line, "message": e.message} for e in self.skipped
            ],
        }
        out: dict[str, Any]
        if len(self.vms) == 1:
            out = docs[0]
            out["trace"] = {
                **out["trace"],
                **{k: v for k, v in trace_info.items() if k not in ("calls", "records")},
            }
        else:
            agreeing, compared = self.agreement()
            out = {
                "version": JSON_VERSION,
                "trace": trace_info,
                "agreement": {
                    "calls": compared,
                    "agreeing": agreeing,
                    "rate": agreeing / compared if compared else None,
                },
                "kinds": self.kinds(),
                "disagreements": [d for doc in docs for d in doc["disagreements"]],
            }
        out["vms"] = vm_docs
        out["hazards"] = [h.to_json() for h in self.hazards]
        return out
