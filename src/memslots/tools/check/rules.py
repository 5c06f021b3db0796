"""The rules of ``memslots check``: one function per rule, each reading one VM's
:class:`~memslots.tools.check.history.VmHistory` and returning its :class:`Finding` list.

What each rule detects, why it matters and how a VMM avoids it is in docs/check.md.
:data:`RULES` lists them with what a trace must carry for them to run: a rule that needs
records the trace's format does not hold (QEMU logs and strace output have no vCPU,
dirty-log or ``munmap`` records) does not run on it, and the report says so.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Final, Literal

from memslots.constants import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, PAGE_SHIFT
from memslots.tools.check.history import Event, SlotView, VmHistory
from memslots.tools.traces import (
    EnableCap,
    GetDirtyLog,
    Madvise,
    MemslotCall,
    Mremap,
    Munmap,
    ReleaseVm,
    ResetDirtyRings,
)

__all__ = [
    "RULES",
    "SEVERITIES",
    "VHOST_LIMIT",
    "VHOST_USER_LIMITS",
    "Finding",
    "Rule",
    "RuleContext",
    "severity_rank",
]

Severity = Literal["info", "warning", "error"]
#: the severities, lowest first
SEVERITIES: Final[tuple[Severity, ...]] = ("info", "warning", "error")
#: vhost's default ``max_mem_regions`` (drivers/vhost/vhost.c)
VHOST_LIMIT: Final = 64
#: memory-region limits of common vhost-user backends: 8 (the protocol's table without
#: ``VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS``), 32 and 509 (libvhost-user's
#: ``VHOST_USER_MAX_RAM_SLOTS``, older and current)
VHOST_USER_LIMITS: Final = (8, 32, 509)
#: slot ids used before :func:`slot_id_growth` looks at them
_GROWTH_MIN_IDS: Final = 16
#: slots listed in one finding's message before "... and N more"
_LIST: Final = 6
#: hva-alias findings per VM before the rest are summed up in one
_MAX_ALIAS_FINDINGS: Final = 64


def severity_rank(severity: str) -> int:
    """0 for ``info``, 1 ``warning``, 2 ``error``. ValueError for anything else."""
    return SEVERITIES.index(severity)


@dataclasses.dataclass(slots=True)
class Finding:
    """One problem: ``rule`` (its id), ``severity``, the ``vm``, the ``records`` (trace
    lines) and ``slots`` (ABI slot numbers, ``as_id << 16 | id``: the id in address
    space 0) it concerns, and a ``message`` in words."""

    rule: str
    severity: Severity
    vm: int
    records: list[int]
    slots: list[int]
    message: str

    def to_json(self) -> dict[str, Any]:
        """``{"rule", "severity", "vm", "records", "slots", "message"}``."""
        return {
            "rule": self.rule,
            "severity": self.severity,
            "vm": self.vm,
            "records": self.records,
            "slots": self.slots,
            "message": self.message,
        }


@dataclasses.dataclass(frozen=True, slots=True)
class RuleContext:
    """What the trace carries: vCPU creation (``vcpus``), dirty-log and dirty-ring calls
    (``dirty``), ``munmap``/``mremap``/``madvise`` (``hva``). Without vCPU records the
    VM is taken to have vCPUs throughout (a VMM's guest runs)."""

    vcpus: bool
    dirty: bool
    hva: bool


@dataclasses.dataclass(frozen=True, slots=True)
class Rule:
    """A rule: ``id``, what it ``detects`` (one line), what it ``needs`` (``"calls"``,
    ``"hva"``, ``"dirty"``) and its function."""

    id: str
    detects: str
    needs: str
    run: Callable[[VmHistory, RuleContext], list[Finding]]


def _abi(s: SlotView) -> int:
    return s.as_id << 16 | s.id


def _has_vcpus(ev: Event, ctx: RuleContext) -> bool:
    return ev.vcpus > 0 or not ctx.vcpus


def _gfns(first: int, end: int) -> str:
    return f"gfns {first:#x}-{end - 1:#x}"


def _slot_name(s: SlotView) -> str:
    return f"slot {s.id}" + (f" (as {s.as_id})" if s.as_id else "")


def _at_lines(lines: list[int]) -> str:
    """``line 7`` or ``lines 7, 9``."""
    return f"line{'s' if len(lines) > 1 else ''} {_lines(lines)}"


def _lines(lines: list[int]) -> str:
    if len(lines) <= 4:
        return ", ".join(map(str, lines))
    return f"{lines[0]}, {lines[1]}, ..., {lines[-1]} ({len(lines)} records)"


# --------------------------------------------------------------------------- unmapped


def unmapped_under_slot(h: VmHistory, ctx: RuleContext) -> list[Finding]:
    """One finding per ``munmap``/``mremap``/``madvise`` that took host memory from live
    slots, listing every slot and gfn range hit. ``error`` for munmap and mremap while
    the VM has vCPUs and goes on; ``info`` for madvise (discarding pages is what a
    balloon does: the guest then reads zeros), for a VM without vCPUs, and for one that
    does nothing more before it is released (a VMM tearing down)."""
    out: list[Finding] = []
    events = h.events
    # index of the first event after each one that is not an hva change: is the VM
    # released (or the trace over) before it does anything else?
    quiet_after = [False] * (len(events) + 1)
    quiet_after[len(events)] = True
    for i in range(len(events) - 1, -1, -1):
        rec = events[i].record
        if isinstance(rec, ReleaseVm):
            quiet_after[i] = True
        elif isinstance(rec, Munmap | Mremap | Madvise):
            quiet_after[i] = quiet_after[i + 1]
        else:
            quiet_after[i] = False
    for i, ev in enumerate(events):
        if not ev.hits:
            continue
        rec = ev.record
        assert isinstance(rec, Munmap | Mremap | Madvise)
        why = ""
        severity: Severity = "error"
        if isinstance(rec, Madvise):
            severity, why = "info", "discarded pages read as zeros (a balloon does this on purpose)"
        elif not _has_vcpus(ev, ctx):
            severity, why = "info", "the VM has no vCPU yet"
        elif quiet_after[i + 1]:
            severity, why = "info", "the VM does nothing more before it is released"
        start, end = rec.removed()[0][0], rec.removed()[-1][1]
        hits = ev.hits
        parts = [f"{_slot_name(x.slot)} {_gfns(x.gfn_start, x.gfn_end)}" for x in hits[:_LIST]]
        if len(hits) > _LIST:
            parts.append(f"... and {len(hits) - _LIST} more slots")
        total = sum(x.gfn_end - x.gfn_start for x in hits)
        message = (
            f"{rec.kind} of hva [{start:#x}, {end:#x}) took the memory of"
            f" {len(hits)} live slot{'s' if len(hits) != 1 else ''} ({total} pages) from"
            f" under the guest: {'; '.join(parts)}"
        )
        if len(hits) > _LIST:
            low = min(x.gfn_start for x in hits)
            high = max(x.gfn_end for x in hits)
            message += f" (all within {_gfns(low, high)})"
        if why:
            message += f" ({why})"
        out.append(
            Finding(
                "unmapped-under-slot",
                severity,
                h.vm,
                [ev.line],
                sorted({_abi(x.slot) for x in hits}),
                message,
            )
        )
    return out


# --------------------------------------------------------------------------- remap window


@dataclasses.dataclass
class _Hole:
    """A gpa range a delete left empty, and the calls that filled it again."""

    event: Event
    slot: SlotView
    ranges: list[tuple[int, int]]
    index: int
    refills: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # line, slot
    first_refill_index: int = 0
    #: every refill so far is the deleted slot again, unchanged
    same: bool = True


def _subtract(ranges: list[tuple[int, int]], lo: int, hi: int) -> list[tuple[int, int]]:
    out = []
    for a, b in ranges:
        if b <= lo or hi <= a:
            out.append((a, b))
            continue
        if a < lo:
            out.append((a, lo))
        if hi < b:
            out.append((hi, b))
    return out


def remap_window(h: VmHistory, ctx: RuleContext) -> list[Finding]:
    """A gpa range deleted and then created again, in whole or in part, while the VM has
    vCPUs: in between a vCPU that touches it finds no memory there (an MMIO exit for a
    load or store, an emulation failure for an instruction fetch). One finding per
    delete: a ``warning`` when the range came back in another layout (split, merged,
    another slot: memory the guest still sees went missing, as in a PAM remap), ``info``
    when the same slot came back unchanged (a device's decode switched off and on, which
    the guest itself asked for). A hole left open stops waiting for its refill at the
    next create or move that fills no hole (the VMM's update is over)."""
    out: list[Finding] = []
    holes: list[_Hole] = []
    calls_seen = 0

    def finish(hole: _Hole) -> None:
        if not hole.refills:
            return
        first_line = hole.refills[0][0]
        between = hole.first_refill_index - hole.index - 1
        refill_slots = sorted({s for _, s in hole.refills})
        left = sum(b - a for a, b in hole.ranges)
        same = hole.same and len(hole.refills) == 1
        gap = (
            "the next call"
            if between == 0
            else f"{between} memslot call{'s' if between != 1 else ''} later"
        )
        refill_lines = [line for line, _ in hole.refills]
        message = (
            f"gpa {hole.slot.gpa_text()} ({_slot_name(hole.slot)}, deleted at line"
            f" {hole.event.line}) had no memslot until {gap}, line {first_line}"
        )
        if same:
            message += (
                ", which created the same slot again unchanged: the range was switched off"
                " and on (a device's decode, a VGA mode), which the guest asks for; if the"
                " VMM did both in one update, a vCPU could fault in between"
            )
        else:
            message += (
                f"; re-created by slot{'s' if len(refill_slots) > 1 else ''}"
                f" {', '.join(str(s & 0xFFFF) for s in refill_slots)} at"
                f" {_at_lines(refill_lines)}: memory"
                " the guest still sees was missing in between, and a vCPU touching it then"
                " exits to the VMM or faults"
            )
        if left:
            message += f"; {left} of its {hole.slot.npages} pages did not come back"
        lines = sorted({hole.event.line, *refill_lines})
        out.append(
            Finding(
                "remap-window",
                "info" if same else "warning",
                h.vm,
                lines,
                sorted({_abi(hole.slot), *refill_slots}),
                message,
            )
        )

    for ev in h.events:
        if not isinstance(ev.record, MemslotCall) or not ev.change:
            continue
        calls_seen += 1
        if ev.change == "delete" and ev.before is not None:
            if _has_vcpus(ev, ctx):
                s = ev.before
                holes.append(_Hole(ev, s, [(s.base_gfn, s.gfn_end)], calls_seen))
            continue
        if ev.change not in ("create", "move") or ev.after is None:
            continue
        new = ev.after
        lo, hi = new.base_gfn, new.gfn_end
        filled = False
        for hole in holes:
            if hole.slot.as_id != new.as_id:
                continue
            if any(a < hi and lo < b for a, b in hole.ranges):
                filled = True
                if not hole.refills:
                    hole.first_refill_index = calls_seen
                hole.refills.append((ev.line, _abi(new)))
                hole.same = hole.same and dataclasses.replace(new, id=hole.slot.id) == hole.slot
                hole.ranges = _subtract(hole.ranges, lo, hi)
        # a hole stays open while the VMM's update goes on filling holes; the first
        # create or move that fills none ends the update
        for hole in holes:
            if not filled or not hole.ranges:
                finish(hole)
        holes = [hole for hole in holes if filled and hole.ranges]
    for hole in holes:
        finish(hole)
    out.sort(key=lambda f: f.records[0])
    return out


# --------------------------------------------------------------------------- dirty log


def dirty_log_lost(h: VmHistory, ctx: RuleContext) -> list[Finding]:
    """A slot with dirty logging deleted, moved or its logging switched off with no
    ``KVM_GET_DIRTY_LOG`` of it, nor ``KVM_RESET_DIRTY_RINGS`` (the ring's harvest),
    since its logging began: the pages the guest wrote since are lost to the VMM (the
    bitmap is freed; a move keeps it but its bits then name other gfns; the ring's
    entries of a deleted slot are dropped). ``warning`` while the VM has vCPUs, ``info``
    before (no guest can have written)."""
    out: list[Finding] = []
    logging: dict[int, tuple[int, bool]] = {}  # slot -> (line logging began, harvested)
    for ev in h.events:
        rec = ev.record
        if isinstance(rec, GetDirtyLog):
            if ev.result == 0 and rec.slot in logging:
                logging[rec.slot] = (logging[rec.slot][0], True)
            continue
        if isinstance(rec, ResetDirtyRings):
            if ev.result == 0:
                logging = {k: (v[0], True) for k, v in logging.items()}
            continue
        if not isinstance(rec, MemslotCall) or not ev.change:
            continue
        before, after = ev.before, ev.after
        was = before is not None and bool(before.flags & KVM_MEM_LOG_DIRTY_PAGES)
        now = after is not None and bool(after.flags & KVM_MEM_LOG_DIRTY_PAGES)
        ended = was and (ev.change in ("delete", "move") or not now)
        if ended and before is not None:
            began, harvested = logging.pop(rec.slot, (0, True))
            if not harvested:
                what = {"delete": "deleted", "move": "moved"}.get(ev.change, "stopped logging")
                vcpus = _has_vcpus(ev, ctx)
                message = (
                    f"{_slot_name(before)} (gpa {before.gpa_text()}) logged dirty pages from"
                    f" line {began} and was {what} at line {ev.line} with no"
                    " KVM_GET_DIRTY_LOG of it nor dirty-ring harvest in between: the pages"
                    " the guest wrote meanwhile are lost to the VMM"
                )
                if not vcpus:
                    message += " (no vCPU yet: nothing can have been written)"
                out.append(
                    Finding(
                        "dirty-log-lost",
                        "warning" if vcpus else "info",
                        h.vm,
                        [began, ev.line] if began else [ev.line],
                        [rec.slot],
                        message,
                    )
                )
        if now and (not was or ev.change == "move"):
            logging[rec.slot] = (ev.line, False)
    return out


# --------------------------------------------------------------------------- ignored error

#: checks that fail a call because a slot is missing or does not log
_MISSING: Final = frozenset({"delete-missing", "log-missing", "log-not-logging"})


def ignored_error(h: VmHistory, ctx: RuleContext) -> list[Finding]:
    """A call that only makes sense if an earlier failed call had succeeded: a delete,
    ``KVM_GET_DIRTY_LOG`` or ``KVM_CLEAR_DIRTY_LOG`` of a slot whose create (or flags
    change to dirty logging) failed, ``KVM_RESET_DIRTY_RINGS`` after enabling the ring
    failed. The VMM did not check the error and its idea of the memory map is wrong.
    Always an ``error``."""
    out: list[Finding] = []
    wanted: dict[object, Event] = {}
    for ev in h.events:
        rec = ev.record
        key: object | None = None
        if isinstance(rec, MemslotCall | GetDirtyLog) or hasattr(rec, "first_page"):
            key = getattr(rec, "slot", None)
        elif isinstance(rec, EnableCap | ResetDirtyRings):
            key = "ring"
        if not ev.failed:
            if isinstance(rec, MemslotCall) and key in wanted and rec.memory_size:
                del wanted[key]  # tried again, and it worked
            continue
        check = ev.explanation.check if ev.explanation is not None else ""
        earlier = wanted.get(key) if key is not None else None
        if earlier is not None and (check in _MISSING or check == "ring-off"):
            out.append(
                Finding(
                    "ignored-error",
                    "error",
                    h.vm,
                    [earlier.line, ev.line],
                    [key] if isinstance(key, int) else [],
                    f"line {ev.line} ({rec.kind}) fails because line {earlier.line}"
                    f" ({earlier.record.kind}) failed"
                    f" ({earlier.explanation.text if earlier.explanation else '?'}): the VMM"
                    " went on as if it had succeeded",
                )
            )
            continue
        if (isinstance(rec, MemslotCall) and rec.memory_size) or (
            isinstance(rec, EnableCap) and check.startswith("ring")
        ):
            wanted[key] = ev
    return out


# --------------------------------------------------------------------------- budget


def slot_budget(h: VmHistory, ctx: RuleContext) -> list[Finding]:
    """The most slots live at once in address space 0 against the kernel's limit (the
    profile's ``max_user_slots``), vhost's 64 and vhost-user backends' 8, 32 and 509:
    a VM past a backend's limit cannot use that backend (vhost counts the VMM's memory
    regions, roughly its RAM slots). ``error`` at the kernel's limit (or when a create
    failed on it), ``warning`` past 64 or 509, ``info`` past 8 or 32."""
    limit = h.limits.max_user_slots
    peak, line = h.peak.get(0, (0, 0))
    failed = [
        e.line for e in h.events if e.explanation is not None and e.explanation.check == "slot-id"
    ]
    above = [n for n in (*VHOST_USER_LIMITS[:2], VHOST_LIMIT, VHOST_USER_LIMITS[2]) if peak > n]
    if not above and not failed and peak < limit:
        return []
    severity: Severity = "info"
    if peak > VHOST_LIMIT:
        severity = "warning"
    if peak >= limit or failed:
        severity = "error"
    names = {8: "vhost-user's 8", 32: "vhost-user's 32", 64: "vhost's 64", 509: "vhost-user's 509"}
    message = (
        f"at most {peak} slots were live at once in address space 0 (first at line {line});"
        f" the kernel allows {limit}"
    )
    if above:
        message += f"; above {', '.join(names[n] for n in above)}: a vhost backend with"
        message += " that limit refuses this VM's memory map"
    if failed:
        message += f"; creates failed for lack of slot ids at {_at_lines(failed)}"
    others = {a: p for a, (p, _) in h.peak.items() if a}
    if others:
        message += "; other address spaces: " + ", ".join(
            f"as {a}: {p}" for a, p in sorted(others.items())
        )
    return [Finding("slot-budget", severity, h.vm, sorted({line, *failed}), [], message)]


def slot_id_growth(h: VmHistory, ctx: RuleContext) -> list[Finding]:
    """Slot ids that keep growing while few slots are live: the VMM takes a new id for
    every slot instead of reusing freed ones, so it runs out of ids (the kernel's
    ``max_user_slots``) long before it runs out of slots. Reported when the ids used
    reach at least 16 and more than twice the most slots live at once; ``warning``,
    ``error`` once a create failed on the limit."""
    out: list[Finding] = []
    limit = h.limits.max_user_slots
    for as_id in sorted({e.after.as_id for e in h.events if e.after is not None} | {0}):
        top = -1
        growth: list[int] = []
        for e in h.events:
            made = e.after if e.change == "create" else None
            if made is not None and made.as_id == as_id and made.id > top:
                top = made.id
                growth.append(e.line)
        peak = h.peak.get(as_id, (0, 0))[0]
        used = top + 1
        if used < _GROWTH_MIN_IDS or used <= 2 * peak:
            continue
        failed = [
            e.line
            for e in h.events
            if e.explanation is not None
            and e.explanation.check == "slot-id"
            and isinstance(e.record, MemslotCall)
            and e.record.as_id == as_id
        ]
        message = (
            f"slot ids of address space {as_id} reached {top} while at most {peak} slots were"
            f" live at once: freed ids are not reused, so the VM runs out of its {limit} ids"
            " long before it runs out of slots"
        )
        if failed:
            message += f"; it did at {_at_lines(failed)}"
        out.append(
            Finding(
                "slot-id-growth",
                "error" if failed else "warning",
                h.vm,
                sorted({*growth[-3:], *failed}),
                [as_id << 16 | top],
                message,
            )
        )
    return out


def hva_alias(h: VmHistory, ctx: RuleContext) -> list[Finding]:
    """Two live slots of one address space mapping the same host memory: the guest sees
    the same page at two gpas. Often meant (a ROM shadowed at two addresses, VGA's
    legacy window over its BAR), so ``info``; a ``warning`` when one of the two logs
    dirty pages and the other, writable, does not: writes through it escape the dirty
    log and a migration misses them. One finding per pair of slots."""
    found: dict[tuple[int, ...], Finding] = {}
    more: list[Finding] = []  # pairs past _MAX_ALIAS_FINDINGS, summed up at the end
    for ev in h.events:
        if not ev.aliases or ev.after is None:
            continue
        a = ev.after
        for b in ev.aliases:
            key = tuple(sorted(((a.as_id, a.id, a.base_gfn), (b.as_id, b.id, b.base_gfn))))
            key_flat = tuple(x for pair in key for x in pair)
            logs = [bool(s.flags & KVM_MEM_LOG_DIRTY_PAGES) for s in (a, b)]
            unlogged_writable = any(
                not s.flags & (KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY) for s in (a, b)
            )
            warn = logs[0] != logs[1] and unlogged_writable
            lo = max(a.hva, b.hva)
            hi = min(a.hva_end, b.hva_end)
            existing = found.get(key_flat)
            if existing is not None:
                if ev.line not in existing.records:
                    existing.records.append(ev.line)
                if warn and existing.severity == "info":
                    existing.severity = "warning"
                continue
            message = (
                f"{_slot_name(a)} (gpa {a.gpa_text()}) and {_slot_name(b)} (gpa"
                f" {b.gpa_text()}) map the same host memory, hva [{lo:#x}, {hi:#x}):"
                f" {(hi - lo) >> PAGE_SHIFT} pages seen at two gpas"
            )
            if warn:
                message += (
                    "; only one of them logs dirty pages, so writes through the other"
                    " escape the dirty log"
                )
            finding = Finding(
                "hva-alias",
                "warning" if warn else "info",
                h.vm,
                [ev.line],
                sorted({_abi(a), _abi(b)}),
                message,
            )
            if len(found) < _MAX_ALIAS_FINDINGS:
                found[key_flat] = finding
            else:
                more.append(finding)
    out = list(found.values())
    if more:
        worst: Severity = "warning" if any(f.severity == "warning" for f in more) else "info"
        out.append(
            Finding(
                "hva-alias",
                worst,
                h.vm,
                sorted({line for f in more for line in f.records})[:_MAX_ALIAS_FINDINGS],
                sorted({s for f in more for s in f.slots}),
                f"... and {len(more)} more pairs of slots mapping the same host memory",
            )
        )
    return out


#: every rule, in report order
RULES: Final[tuple[Rule, ...]] = (
    Rule(
        "unmapped-under-slot",
        "munmap, mremap or madvise of host memory under live slots",
        "hva",
        unmapped_under_slot,
    ),
    Rule(
        "remap-window",
        "a gpa range deleted then created again while vCPUs may run",
        "calls",
        remap_window,
    ),
    Rule(
        "dirty-log-lost",
        "a logging slot deleted, moved or unlogged before its dirty pages were harvested",
        "dirty",
        dirty_log_lost,
    ),
    Rule(
        "ignored-error",
        "a call that only makes sense if an earlier failed call had succeeded",
        "calls",
        ignored_error,
    ),
    Rule(
        "slot-budget",
        "the most live slots against the kernel's, vhost's and vhost-user's limits",
        "calls",
        slot_budget,
    ),
    Rule(
        "slot-id-growth",
        "slot ids that keep growing while few slots are live",
        "calls",
        slot_id_growth,
    ),
    Rule("hva-alias", "two live slots mapping the same host memory", "calls", hva_alias),
)
