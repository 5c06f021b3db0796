"""A trace replayed on the engine, one VM after the other, as the facts the rules read.

:func:`histories` runs every record of each VM of a :class:`~memslots.tools.traces.Trace`
on a fresh :class:`memslots.Vm` with the limits of the kernel it was recorded on (or of a
named profile), and keeps for each record a :class:`Event`: what it did to the slots
(the slot before and after it), the vCPUs the VM had, the slots an ``munmap``,
``mremap`` or ``madvise`` hit, and for a failed call its :class:`Explanation`.

The engine follows the kernel: a call the trace records as failed changes nothing even
when the engine would accept it (the change is undone), so every later record sees the
kernel's state. A call the kernel accepted but the engine refuses cannot be followed; it
is noted in the ``notes`` of its :class:`VmHistory`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
from collections.abc import Callable, Iterator
from errno import EINVAL
from typing import Final

from memslots.constants import PAGE_SHIFT
from memslots.dirty_log import pages_to_bitmap
from memslots.errors import errno_name
from memslots.slot import Memslot
from memslots.tools.check.explain import Explanation, Placements, explain, unexplained
from memslots.tools.traces import (
    ClearDirtyLog,
    CreateGuestMemfd,
    CreateVcpu,
    CreateVm,
    EnableCap,
    GetDirtyLog,
    HvaChange,
    Madvise,
    MemslotCall,
    Mremap,
    Munmap,
    Record,
    ReleaseVm,
    ResetDirtyRings,
    Trace,
)
from memslots.validate import VmLimits
from memslots.vm import Vm

__all__ = ["Event", "Hit", "SlotView", "VmHistory", "histories"]

_KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: Final = 168
_KVM_CAP_DIRTY_LOG_RING: Final = 192
_KVM_CAP_DIRTY_LOG_RING_ACQ_REL: Final = 223
#: a guest_memfd number no process has open (a traced fd whose creation the trace lacks)
_NO_FD: Final = 0x7FFFFFFF
_HVA_KINDS: Final = (Munmap, Mremap, Madvise)
#: most other slots noted as aliasing one slot's host memory (a trace mapping every slot
#: onto the same memory would otherwise cost O(n^2))
_MAX_ALIASES: Final = 16


@dataclasses.dataclass(frozen=True, slots=True)
class SlotView:
    """A slot as it was at one moment (the engine's slots change under later calls)."""

    as_id: int
    id: int
    base_gfn: int
    npages: int
    flags: int
    hva: int

    @classmethod
    def of(cls, s: Memslot | None) -> SlotView | None:
        """The view of ``s`` (None for None). O(1)."""
        if s is None:
            return None
        return cls(s.as_id, s.id, s.base_gfn, s.npages, s.flags & 0xFFFF, s.userspace_addr)

    @property
    def gfn_end(self) -> int:
        """One past the last gfn."""
        return self.base_gfn + self.npages

    @property
    def hva_end(self) -> int:
        """One past the last host address."""
        return self.hva + (self.npages << PAGE_SHIFT)

    def gpa_text(self) -> str:
        """``0xfd000000-0xfdffffff``."""
        return f"{self.base_gfn << PAGE_SHIFT:#x}-{(self.gfn_end << PAGE_SHIFT) - 1:#x}"


@dataclasses.dataclass(frozen=True, slots=True)
class Hit:
    """Part of a live slot whose host memory an hva change took away: gfns
    ``[gfn_start, gfn_end)`` of ``slot``."""

    slot: SlotView
    gfn_start: int
    gfn_end: int


@dataclasses.dataclass(slots=True)
class Event:
    """One record of a VM and what it did on the engine.

    ``result`` is the kernel's answer (the recorded one; the engine's when the trace does
    not say), ``engine`` the engine's (None where it models nothing), ``change`` the
    kind of a memslot call that succeeded (``create``, ``delete``, ``move``, ``flags``,
    ``no-op``), ``before``/``after`` its slot around it, ``vcpus`` the vCPUs the VM had
    before the record, ``hits`` what an hva change took away, ``explanation`` why a
    failed record failed, ``aliases`` the other live slots of the address space whose
    host memory overlaps the slot a create, move or flags change left."""

    record: Record
    result: int | None
    engine: int | None = None
    change: str = ""
    before: SlotView | None = None
    after: SlotView | None = None
    vcpus: int = 0
    hits: list[Hit] = dataclasses.field(default_factory=list)
    explanation: Explanation | None = None
    aliases: list[SlotView] = dataclasses.field(default_factory=list)

    @property
    def line(self) -> int:
        """The record's line in the trace."""
        return self.record.line

    @property
    def failed(self) -> bool:
        """Whether the call failed (as the kernel answered it)."""
        return bool(self.result)


@dataclasses.dataclass
class VmHistory:
    """Every record of one VM in trace order (its hva changes included), as
    :class:`Event`; ``released`` is the index of its ``release_vm`` (None if the trace
    does not show it); ``peak`` the most live slots per address space and the line where
    that was first reached; ``notes`` what the engine could not follow."""

    vm: int
    pid: int
    limits: VmLimits
    events: list[Event] = dataclasses.field(default_factory=list)
    released: int | None = None
    peak: dict[int, tuple[int, int]] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)

    def failures(self) -> list[Event]:
        """The events of calls that failed."""
        return [e for e in self.events if e.failed]


def _streams(trace: Trace) -> Iterator[tuple[int, int, int | None, list[Record]]]:
    """``(vm, pid, vm_type, records)`` per VM: its own records and the hva changes its
    process made while it lived, in trace order."""
    info = {v.number: v for v in trace.vms()}
    streams: dict[int, list[Record]] = {n: [] for n in info}
    alive: set[int] = set()
    ended: set[int] = set()
    for rec in trace.records:
        if isinstance(rec, _HVA_KINDS):
            for n in sorted(alive):
                if not rec.pid or not info[n].pid or info[n].pid == rec.pid:
                    streams[n].append(rec)
            continue
        if rec.vm is None or rec.vm not in streams:
            continue
        if isinstance(rec, CreateVm):
            alive.add(rec.vm)
            continue
        if isinstance(rec, ReleaseVm):
            alive.discard(rec.vm)
            ended.add(rec.vm)
        elif rec.vm not in alive and rec.vm not in ended:
            alive.add(rec.vm)  # a VM whose creation the trace does not show
        streams[rec.vm].append(rec)
    for n in sorted(streams):
        yield n, info[n].pid, info[n].vm_type, streams[n]


class _Walker:
    """Replays one VM's records on the engine and makes its events."""

    def __init__(self, history: VmHistory) -> None:
        self.h = history
        self.vm = Vm(profile=history.limits)
        self.placements = Placements()
        self.gmem: dict[int, int] = {}
        self.owned: list[int] = []
        self.vcpus = 0
        self.live = [0] * history.limits.nr_address_spaces

    def close(self) -> None:
        for fd in self.owned:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.vm.close()

    def _slot(self, slot: int) -> Memslot | None:
        if slot >> 16 >= self.vm.nr_address_spaces:
            return None
        return self.vm.id_to_memslot(slot)

    def step(self, rec: Record) -> Event:
        ev = Event(rec, rec.result, vcpus=self.vcpus)
        if isinstance(rec, _HVA_KINDS):
            ev.hits = self._hits(rec)
            return ev
        if isinstance(rec, ReleaseVm):
            return ev
        if isinstance(rec, MemslotCall):
            self._memslot_call(rec, ev)
            return ev
        action = self._action(rec)
        if action is None:
            return ev
        try:
            action()
        except OSError as exc:
            ev.engine = exc.errno if isinstance(exc.errno, int) and exc.errno > 0 else EINVAL
            self._failed(rec, ev, exc)
            return ev
        ev.engine = 0
        if rec.result is None:
            ev.result = 0
        elif rec.result:
            ev.explanation = unexplained(rec.result, 0)
            self.h.notes.append(
                f"line {rec.line}: the engine accepts this {rec.kind}, the kernel refused it"
                f" ({errno_name(rec.result)}): what follows assumes it took effect"
            )
        if isinstance(rec, CreateVcpu):
            self.vcpus += 1
        return ev

    def _failed(self, rec: Record, ev: Event, exc: OSError) -> None:
        """The engine refused ``rec``: explain it (a failure of the kernel too), or note
        that the engine cannot follow the kernel from here."""
        if rec.result is None:
            ev.result = ev.engine
        if rec.result == 0:
            self.h.notes.append(
                f"line {rec.line}: the engine refuses this {rec.kind} ({exc}), the kernel"
                " accepted it: findings after it may be wrong"
            )
            return
        explanation = explain(exc, rec, self.placements)
        if rec.result is not None and rec.result != ev.engine:
            base = unexplained(rec.result, ev.engine)
            explanation = dataclasses.replace(
                explanation, errno=rec.result, text=f"{base.text} ({explanation.text})"
            )
        ev.explanation = explanation

    def _action(self, rec: Record) -> Callable[[], object] | None:
        vm = self.vm
        if isinstance(rec, CreateVcpu):
            return lambda: vm.create_vcpu(rec.vcpu_id)
        if isinstance(rec, CreateGuestMemfd):

            def create() -> None:
                fd = vm.create_guest_memfd(rec.size, rec.flags)
                self.owned.append(fd)
                if rec.fd is not None:
                    self.gmem[rec.fd] = fd

            return create
        if isinstance(rec, EnableCap):
            if rec.cap == _KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2:
                return lambda: vm.enable_manual_dirty_log_protect(rec.args[0])
            if rec.cap in (_KVM_CAP_DIRTY_LOG_RING, _KVM_CAP_DIRTY_LOG_RING_ACQ_REL):
                acq = rec.cap == _KVM_CAP_DIRTY_LOG_RING_ACQ_REL
                return lambda: vm.enable_dirty_ring(rec.args[0], acq_rel=acq)
            return None
        if isinstance(rec, GetDirtyLog):
            return lambda: vm.get_dirty_log(rec.slot)
        if isinstance(rec, ClearDirtyLog):
            pages = [
                p
                for first, count in rec.dirty or ()
                for p in range(first, first + count)
                if p < rec.num_pages
            ]
            bitmap = bytes(pages_to_bitmap(pages, rec.num_pages)) if rec.dirty is not None else b""
            return lambda: vm.clear_dirty_log(rec.slot, rec.first_page, rec.num_pages, bitmap)
        if isinstance(rec, ResetDirtyRings):
            return vm.reset_dirty_rings
        return None

    def _memslot_call(self, rec: MemslotCall, ev: Event) -> None:
        vm = self.vm
        old = self._slot(rec.slot)
        ev.before = SlotView.of(old)
        gmem = None
        if rec.v2 and rec.guest_memfd in self.gmem:
            gmem = self.gmem[rec.guest_memfd]
        elif rec.v2 and rec.flags & 4:
            gmem = _NO_FD
        try:
            rec.apply(vm, guest_memfd=gmem)
        except OSError as exc:
            ev.engine = exc.errno if isinstance(exc.errno, int) and exc.errno > 0 else EINVAL
            self._failed(rec, ev, exc)
            return
        ev.engine = 0
        change = vm.last_change.value if vm.last_change is not None else "no-op"
        new = self._slot(rec.slot)
        if rec.result:
            self._undo(rec, old, new)
            ev.explanation = unexplained(rec.result, 0)
            return
        if rec.result is None:
            ev.result = 0
        ev.change = change
        ev.after = SlotView.of(new)
        self.placements.note(rec, change)
        if new is not None and change in ("create", "move", "flags"):
            last = new.userspace_addr + (new.npages << PAGE_SHIFT) - 1
            hits = vm.memslots(new.as_id).iter_hva_range(new.userspace_addr, last)
            ev.aliases = [
                v
                for s in itertools.islice(hits, _MAX_ALIASES + 1)
                if s.id != new.id and (v := SlotView.of(s)) is not None
            ][:_MAX_ALIASES]
        as_id = rec.as_id
        if change in ("create", "delete"):
            self.live[as_id] += 1 if change == "create" else -1
            best = self.h.peak.get(as_id, (0, 0))[0]
            if self.live[as_id] > best:
                self.h.peak[as_id] = (self.live[as_id], rec.line)

    def _undo(self, rec: MemslotCall, old: Memslot | None, new: Memslot | None) -> None:
        """Take back a change the engine made where the kernel refused the call."""
        view = SlotView.of(old)
        with contextlib.suppress(OSError):
            if view is None:  # a create: delete it
                if new is not None:
                    self.vm.set_user_memory_region(rec.slot, 0, 0, 0, 0)
                return
            # a delete: create it again; a move or flags change: move or change it back
            self.vm.set_user_memory_region(
                rec.slot,
                view.flags,
                view.base_gfn << PAGE_SHIFT,
                view.npages << PAGE_SHIFT,
                view.hva,
            )

    def _hits(self, rec: HvaChange) -> list[Hit]:
        out: list[Hit] = []
        for start, end in rec.removed():
            for as_id in range(self.vm.nr_address_spaces):
                for s in self.vm.memslots(as_id).iter_hva_range(start, end - 1):
                    view = SlotView.of(s)
                    assert view is not None
                    lo = max(start, view.hva)
                    hi = min(end, view.hva_end)
                    first = view.base_gfn + ((lo - view.hva) >> PAGE_SHIFT)
                    last = view.base_gfn + ((hi - view.hva + (1 << PAGE_SHIFT) - 1) >> PAGE_SHIFT)
                    out.append(Hit(view, first, last))
        return out


def histories(
    trace: Trace,
    limits: Callable[[int | None], VmLimits],
    progress: Callable[[int, int], None] | None = None,
) -> list[VmHistory]:
    """Each VM of ``trace`` replayed on the engine (``limits(vm_type)`` gives its
    limits). ``progress(done, total)`` is told every 4096 records. O(n log n)."""
    out: list[VmHistory] = []
    total = len(trace.records)
    done = 0
    for number, pid, vm_type, records in _streams(trace):
        history = VmHistory(number, pid, limits(vm_type))
        walker = _Walker(history)
        try:
            for rec in records:
                ev = walker.step(rec)
                if isinstance(rec, ReleaseVm) and history.released is None:
                    history.released = len(history.events)
                history.events.append(ev)
                done += 1
                if progress is not None and not done % 4096:
                    progress(done, total)
        finally:
            walker.close()
        out.append(history)
    return out
