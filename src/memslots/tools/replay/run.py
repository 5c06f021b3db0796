"""The replay itself: every record of a VM, in order, on each implementation.

:func:`replay` replays one VM's records on a fresh engine (:class:`memslots.Vm`), a fresh
:class:`memslots.baseline.ArrayVm` and, when asked or when usable, a fresh ``/dev/kvm`` VM
(:class:`~memslots.tools.replay.kernel.KernelSession`); :func:`replay_trace` does it for
every VM of a :class:`~memslots.tools.traces.Trace`, one VM after the other, and finds the
hazards. What each kind of record does on a replay VM, and what is compared, is in the
package docstring (:mod:`memslots.tools.replay`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import time
from collections.abc import Callable, Iterable, Sequence
from errno import EINVAL
from typing import Any, Final, cast

from memslots.baseline import ArrayVm
from memslots.dirty_log import pages_to_bitmap
from memslots.errors import KvmUnavailable, MemslotError
from memslots.kvm import kvm_unavailable
from memslots.kvm.abi import (
    KVM_CAP_DIRTY_LOG_RING,
    KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
)
from memslots.profiles import KernelProfile
from memslots.tools.check.explain import Explanation, Placements, explain, unexplained
from memslots.tools.replay.kernel import KernelSession, KernelVm, open_kernel
from memslots.tools.replay.relocation import HvaCluster
from memslots.tools.replay.report import (
    Hazard,
    ImplName,
    ImplRun,
    MapEntry,
    ReplayReport,
    SlotChange,
    TraceReport,
    memory_map,
)
from memslots.tools.traces import (
    ClearDirtyLog,
    CreateGuestMemfd,
    CreateVcpu,
    CreateVm,
    EnableCap,
    GetDirtyLog,
    Madvise,
    MemslotCall,
    Mremap,
    Munmap,
    Record,
    ReleaseVm,
    ResetDirtyRings,
    Runs,
    Trace,
    TraceFormatError,
)
from memslots.validate import VmLimits
from memslots.vm import Vm

__all__ = ["PROGRESS_EVERY", "replay", "replay_trace"]

#: how many records between two progress reports
PROGRESS_EVERY: Final = 256

#: a guest_memfd number no process has open: stands in for a traced fd that the trace
#: never showed being created (the kernel answers EBADF)
_NO_FD: Final = 0x7FFFFFFF

_HVA_KINDS: Final = (Munmap, Mremap, Madvise)
#: the records that are not replayed (they only feed the hazard check)
_NOT_REPLAYED: Final = (*_HVA_KINDS, ReleaseVm)
_RING_CAPS: Final = (KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL)
#: the kinds of memslot calls that change the map (a :class:`SlotChange` each)
_CHANGES: Final = frozenset(("create", "delete", "move", "flags"))

Step = Record


@dataclasses.dataclass
class _Ctx:
    """Per implementation and VM: traced guest_memfd numbers -> ours, and what is known."""

    gmem: dict[int, int] = dataclasses.field(default_factory=dict)
    #: the traced VM turned on a dirty ring, which the implementation does not model
    ring_unmodelled: bool = False
    #: the local descriptors to close at the end
    owned: list[int] = dataclasses.field(default_factory=list)


def _mask(runs: Iterable[tuple[int, int]]) -> int:
    """The pages of ``runs`` as an integer, bit ``p`` for page ``p``: what a KVM bitmap
    (bit ``p & 7`` of byte ``p >> 3``) is read as with ``int.from_bytes(bitmap, "little")``."""
    value = 0
    for first, count in runs:
        value |= ((1 << count) - 1) << first
    return value


def _pages_text(mask: int, limit: int = 6) -> str:
    pages: list[int] = []
    index = 0
    while mask and len(pages) <= limit:
        low = (mask & -mask).bit_length() - 1
        pages.append(index + low)
        mask >>= low + 1
        index += low + 1
    more = ", ..." if len(pages) > limit else ""
    return "[" + ", ".join(map(str, pages[:limit])) + more + "]"


def _compare_bitmap(recorded: Runs | None, got: bytes, exact: bool) -> str:
    """'' when ``got`` fits the recorded bitmap: equal while no guest can have written
    (``exact``), else a subset of it (a guest only adds dirty pages)."""
    if recorded is None:
        return ""
    want = _mask(recorded)
    have = int.from_bytes(got, "little")
    if have == want or (not exact and not have & ~want):
        return ""
    if exact:
        return (
            f"dirty pages: recorded {_pages_text(want)}, replayed {_pages_text(have)}"
            " (no vCPU yet: they must be equal)"
        )
    return f"dirty pages replayed but not recorded: {_pages_text(have & ~want)}"


class _Runner:
    """Replays one VM's steps on one implementation."""

    def __init__(
        self,
        name: ImplName,
        target: Any,
        session: KernelSession | None,
        hazards: list[Hazard] | None,
        vm_number: int,
        exact_until: int,
        explain: bool = False,
    ) -> None:
        self.name = name
        self.target = target
        self.session = session
        self.hazards = hazards
        self.vm_number = vm_number
        #: records before this index come before the traced VM's first vCPU
        self.exact_until = exact_until
        self.ctx = _Ctx()
        self.bitmaps: dict[int, bytes] = {}
        self.details: dict[int, str] = {}
        self.alive = True
        #: why each failed record failed (the primary model's refusals; see
        #: memslots.tools.check.explain), and where each live slot was placed
        self.explanations: dict[int, Explanation] | None = {} if explain else None
        self.placements = Placements()
        self.error: OSError | None = None

    # ------------------------------------------------------------------ one step
    def step(self, index: int, rec: Record) -> int | None:
        """Make ``rec`` on the target; its errno, or None where it is not modelled."""
        try:
            return self._step(index, rec)
        except OSError as exc:
            self.error = exc
            return exc.errno if isinstance(exc.errno, int) and exc.errno > 0 else EINVAL

    def explain_step(self, index: int, rec: Record, err: int | None, change: str) -> None:
        """After ``step`` (outside the measured time): explain a failure of the record,
        or note where a memslot call placed its slot. Only the primary model explains."""
        explanations = self.explanations
        if explanations is None:
            return
        if err and self.error is not None:
            explanations[index] = explain(self.error, rec, self.placements)
        elif rec.result and err == 0:
            explanations[index] = unexplained(rec.result, err)
        elif err == 0 and isinstance(rec, MemslotCall):
            self.placements.note(rec, change)
        self.error = None

    def _step(self, index: int, rec: Record) -> int | None:
        t = self.target
        ctx = self.ctx
        if isinstance(rec, MemslotCall):
            gmem = None
            if rec.v2 and rec.guest_memfd in ctx.gmem:
                gmem = ctx.gmem[rec.guest_memfd]
            elif rec.v2 and rec.flags & 4:  # KVM_MEM_GUEST_MEMFD with an fd never created
                gmem = _NO_FD
            call = self.session.translate_call(rec) if self.session is not None else rec
            call.apply(t, guest_memfd=gmem)
            return 0
        if isinstance(rec, CreateGuestMemfd):
            fd = int(t.create_guest_memfd(rec.size, rec.flags))
            ctx.owned.append(fd)
            if rec.fd is not None:
                ctx.gmem[rec.fd] = fd
            return 0
        if isinstance(rec, CreateVcpu):
            t.create_vcpu(rec.vcpu_id)
            return 0
        if isinstance(rec, EnableCap):
            if rec.cap == KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2:
                t.enable_manual_dirty_log_protect(rec.args[0])
                return 0
            if rec.cap in _RING_CAPS:
                # the engine and KvmVm (kernel and engine) model the ring; the kernel
                # ignores flags and args[1..3] (kvm_vm_ioctl_enable_cap_generic)
                enable = getattr(t, "enable_dirty_ring", None)
                if enable is None:  # ArrayVm: its dirty logs are unknown once a ring is on
                    ctx.ring_unmodelled = ctx.ring_unmodelled or not rec.result
                    return None
                enable(rec.args[0], acq_rel=rec.cap == KVM_CAP_DIRTY_LOG_RING_ACQ_REL)
                return 0
            return None
        if isinstance(rec, ResetDirtyRings):
            reset = getattr(t, "reset_dirty_rings", None)
            if reset is None:
                return None
            reset()
            return 0
        if isinstance(rec, GetDirtyLog):
            if ctx.ring_unmodelled:
                return None
            bits = bytes(t.get_dirty_log(rec.slot))
            self.bitmaps[index] = bits
            detail = _compare_bitmap(rec.dirty, bits, exact=index < self.exact_until)
            if detail:
                self.details[index] = detail
            return 0
        if isinstance(rec, ClearDirtyLog):
            if ctx.ring_unmodelled:
                return None
            pages = [
                p
                for first, count in rec.dirty or ()
                for p in range(first, first + count)
                if p < rec.num_pages
            ]
            bitmap = (
                pages_to_bitmap(pages, rec.num_pages)
                if rec.dirty is not None
                else b""  # unreadable in the traced process: a short buffer
            )
            t.clear_dirty_log(rec.slot, rec.first_page, rec.num_pages, bytes(bitmap))
            return 0
        return None  # pragma: no cover - hva changes and lifetime records are not steps

    # ------------------------------------------------------------------ hazards
    def hazard_check(self, rec: Munmap | Mremap | Madvise, index: int = 0) -> None:
        """Record a :class:`Hazard` for every live slot whose hvas ``rec`` took away, found
        with the set's hva interval tree as the kernel's MMU notifier finds them; ``index``
        is the number of records replayed before it."""
        if self.hazards is None or not self.alive:
            return
        t = self.target
        for start, end in rec.removed():
            for as_id in range(t.nr_address_spaces):
                for s in t.memslots(as_id).iter_hva_range(start, end - 1):
                    hva_end = s.userspace_addr + (s.npages << s.page_shift)
                    self.hazards.append(
                        Hazard(
                            vm=self.vm_number,
                            slot=s.slot,
                            as_id=s.as_id,
                            id=s.id,
                            base_gfn=s.base_gfn,
                            npages=s.npages,
                            flags=s.flags & 0xFFFF,
                            userspace_addr=s.userspace_addr,
                            start=max(start, s.userspace_addr),
                            end=min(end, hva_end),
                            call=rec,
                            index=index,
                            page_shift=s.page_shift,
                        )
                    )

    def close(self) -> None:
        """Close the guest_memfds this run made: a kernel's through its VM fd (under QEMU
        they are the guest's descriptors), a model's memfds here."""
        vm_fd = getattr(self.target, "fd", None)  # KvmVm's VM fd; the models have none
        close = vm_fd.close_fd if vm_fd is not None else os.close
        for fd in self.ctx.owned:
            with contextlib.suppress(OSError):
                close(fd)


def _slot_entry(target: Any, slot: int) -> MapEntry | None:
    """The model's slot ``slot`` (ABI number) as a :class:`MapEntry`, or None: read from
    the active set, which only this thread changes, between two calls. O(1)."""
    as_id = slot >> 16
    if as_id >= target.nr_address_spaces:
        return None
    s = target.memslots(as_id).id_to_memslot(slot & 0xFFFF)
    return None if s is None else MapEntry.of(s)


def _run(
    runner: _Runner,
    steps: Sequence[Record],
    *,
    kinds: bool,
    timer: Callable[[], int] | None = None,
    progress: Callable[[int], None] | None = None,
    changes: list[SlotChange] | None = None,
) -> tuple[list[int | None], list[int], list[str] | None, str | None]:
    """Make every step on the runner's target; return the results, the times, the kinds
    (when asked: ``target.last_change`` after a successful memslot call, ``failed`` after
    an error, the record's kind for other records) and a note when the target crashed
    (the lists then stop before the crashing record). Hva changes and ``release_vm`` only
    feed the hazard check and take no place in the lists. ``timer``, when given, supplies
    a memslot call's duration instead of the wall time around it; ``progress(done)`` is
    told every :data:`PROGRESS_EVERY` records (outside the measured time). ``changes``,
    when given (a model, with ``kinds``), gets a :class:`SlotChange` for every memslot
    call that changed the map: the slot as the previous change left it, and as the model
    holds it after the call (looked up outside the measured time, O(1))."""
    results: list[int | None] = []
    times: list[int] = []
    kind_list: list[str] | None = [] if kinds else None
    #: the slots as the changes so far left them (the old slot of the next change)
    live: dict[int, MapEntry] = {}
    perf = time.perf_counter_ns
    target = runner.target
    gc_was_enabled = gc.isenabled()
    gc.disable()  # as timeit does: no collection pauses inside the measured calls
    rec: Record | None = None
    try:
        for rec in steps:
            if isinstance(rec, _HVA_KINDS):
                runner.hazard_check(rec, len(results))
                continue
            if isinstance(rec, ReleaseVm):
                runner.alive = False
                continue
            index = len(results)
            is_call = isinstance(rec, MemslotCall)
            t0 = perf()
            err = runner.step(index, rec)
            t1 = perf()
            elapsed = timer() if timer is not None and is_call else t1 - t0
            results.append(err)
            times.append(elapsed)
            if kind_list is not None:
                if not is_call:
                    kind_list.append(rec.kind)
                    runner.explain_step(index, rec, err, "")
                elif err:
                    kind_list.append("failed")
                    runner.explain_step(index, rec, err, "failed")
                else:
                    change = getattr(target, "last_change", None)
                    kind = str(getattr(change, "value", "unknown"))
                    kind_list.append(kind)
                    runner.explain_step(index, rec, err, kind)
                    if changes is not None and kind in _CHANGES and isinstance(rec, MemslotCall):
                        old = live.pop(rec.slot, None)
                        new = None if kind == "delete" else _slot_entry(target, rec.slot)
                        if new is not None:
                            live[rec.slot] = new
                        changes.append(SlotChange(index, kind, old, new))
            if progress is not None and not len(results) % PROGRESS_EVERY:
                progress(len(results))
        if progress is not None:
            progress(len(results))
    except Exception as exc:
        where = rec.where if rec is not None else "?"
        return results, times, kind_list, f"crashed at {where}: {type(exc).__name__}: {exc}"
    finally:
        if gc_was_enabled:
            gc.enable()
    return results, times, kind_list, None


def _reporter(
    progress: Callable[[str, int, int], None] | None, name: str, total: int
) -> Callable[[int], None] | None:
    """``progress`` bound to one implementation, told at once that it starts."""
    if progress is None:
        return None
    progress(name, 0, total)
    return lambda done: progress(name, done, total)


_DESCRIPTIONS: Final = {
    "engine": "memslots.Vm (tree-based engine)",
    "array": "memslots.baseline.ArrayVm (sorted array, copied on every change)",
}


def _make_model(name: ImplName, limits: VmLimits) -> Vm | ArrayVm:
    """A fresh model VM with ``limits``."""
    return Vm(profile=limits) if name == "engine" else ArrayVm(profile=limits)


def _first_vcpu(replayed: Sequence[Record], attached: bool) -> int:
    """Index among the ``replayed`` records of the traced VM's first vCPU (their number
    when there is none): dirty bitmaps before it are predictable exactly. 0 for a VM that
    existed before the recording."""
    if attached:
        return 0
    created = (i for i, r in enumerate(replayed) if isinstance(r, CreateVcpu) and r.result == 0)
    return next(created, len(replayed))


def replay(
    calls: Sequence[Record],
    *,
    impls: Iterable[ImplName] = ("engine", "array"),
    kernel: bool | None = None,
    primary: ImplName | None = None,
    source: str = "",
    embedded: bool = False,
    fmt: str | None = None,
    skipped: Sequence[TraceFormatError] = (),
    progress: Callable[[str, int, int], None] | None = None,
    limits: VmLimits | None = None,
    limits_source: str = "defaults",
    vm: int = 0,
    pid: int = 0,
    vm_type: int | None = None,
    attached: bool = False,
    hazards: list[Hazard] | None = None,
    kernel_vm: KernelVm | None = None,
) -> ReplayReport:
    """Replay one VM's records (``calls``: memslot calls, and any other record of the VM;
    hva changes and ``release_vm`` only feed ``hazards`` when a list is given) on fresh VMs
    of each implementation and report.

    ``impls``: the models to run (``"engine"``, ``"array"``). ``kernel``: replay on
    ``/dev/kvm`` too: None means "when it is usable", True requires it (OSError when it
    cannot be used), False turns it off. ``primary``: whose kinds, memory map and hazards
    are reported (default: the engine if it runs, else the array). ``limits``: what the
    models accept when the kernel does not run (default: :class:`memslots.Vm`'s x86-64
    defaults); with the kernel its own limits are used. ``source``, ``embedded``, ``fmt``,
    ``skipped``, ``vm``, ``pid``, ``vm_type``, ``attached`` only label the report.
    ``kernel_vm``: the kernel column's VM on another kernel (one booted under QEMU:
    :class:`memslots.tools.replay.kernel.KernelVm`) instead of this machine's /dev/kvm.
    ``progress(impl, done, total)`` is called before each implementation starts, every
    :data:`PROGRESS_EVERY` records and when it ends (never inside a measured call).

    Cost: O(n) records on each implementation plus O(n log n) for the hva relocation.
    """
    steps = list(calls)
    models = [n for n in ("engine", "array") if n in set(impls)]
    if not models:
        raise ValueError("replay needs at least one of the models 'engine' and 'array'")
    if primary is None:
        primary = cast(ImplName, models[0])
    if primary not in models:
        raise ValueError(f"primary {primary!r} is not among the models replayed")
    replayed: list[Record] = [r for r in steps if not isinstance(r, _NOT_REPLAYED)]
    n_records = len(replayed)
    exact_until = _first_vcpu(replayed, attached)
    memslot_calls = [r for r in replayed if isinstance(r, MemslotCall)]

    runs: dict[str, ImplRun] = {n: ImplRun(n, "off") for n in ("engine", "array", "kernel")}
    session: KernelSession | None = None
    if kernel is None:
        unavailable = kvm_unavailable()
        if unavailable is not None:
            kernel = False
            runs["kernel"] = ImplRun("kernel", "unavailable", note=str(unavailable))
    relocation: tuple[HvaCluster, ...] | None = None
    bitmaps: dict[str, dict[int, bytes]] = {}
    try:
        if kernel is None:
            try:
                session = open_kernel(memslot_calls, kernel_vm)
            except OSError as exc:
                note = str(exc) if isinstance(exc, KvmUnavailable) else f"/dev/kvm: {exc}"
                runs["kernel"] = ImplRun("kernel", "unavailable", note=note)
        elif kernel:
            session = open_kernel(memslot_calls, kernel_vm)
        if session is not None:
            limits, limits_source = session.limits, "kernel"
        elif limits is None:
            limits, limits_source = Vm().limits, "defaults"

        for name in models:
            model = _make_model(cast(ImplName, name), limits)
            runner = _Runner(
                cast(ImplName, name),
                model,
                None,
                hazards if name == primary else None,
                vm,
                exact_until,
                explain=name == primary,
            )
            changes: list[SlotChange] = []
            try:
                results, times, kinds, crash = _run(
                    runner,
                    steps,
                    kinds=True,
                    progress=_reporter(progress, name, n_records),
                    changes=changes if name == primary else None,
                )
            finally:
                runner.close()
            run = ImplRun(
                cast(ImplName, name),
                "crashed" if crash else "ok",
                _DESCRIPTIONS[name],
                crash,
                results,
                times,
                kinds,
                details=runner.details,
                changes=changes,
                explanations=runner.explanations or {},
            )
            if not crash:
                run.memory_map = memory_map(model.memslots, limits.nr_address_spaces)
            runs[name] = run
            bitmaps[name] = runner.bitmaps

        if session is not None:
            relocation = session.relocation.clusters
            session.ioctl_ns()
            runner = _Runner("kernel", session.target, session, None, vm, exact_until)
            try:
                results, times, _, crash = _run(
                    runner,
                    steps,
                    kinds=False,
                    timer=session.ioctl_ns,
                    progress=_reporter(progress, "kernel", n_records),
                )
                memmap = None if crash else session.memory_map()
            finally:
                session.close()
                runner.close()
            runs["kernel"] = ImplRun(
                "kernel",
                "crashed" if crash else "ok",
                session.description,
                crash,
                results,
                times,
                details=runner.details,
            )
            runs["kernel"].memory_map = memmap
            bitmaps["kernel"] = runner.bitmaps
            _compare_replayed_bitmaps(runs, bitmaps, primary)
    finally:
        if session is not None:
            session.close()

    if limits is None:  # pragma: no cover - set above
        raise ValueError("no limits")
    notes = []
    if any(r is None for run in runs.values() for r in run.results):
        notes.append(
            "some records are not modelled by an implementation (shown as n/a): the array"
            " has no dirty ring (KVM_ENABLE_CAP of KVM_CAP_DIRTY_LOG_RING,"
            " KVM_RESET_DIRTY_RINGS), nor dirty logs once the traced VM's ring is on;"
            " KVM_ENABLE_CAP of other capabilities is replayed nowhere"
        )
    if attached:
        notes.append(
            "this VM existed before recording began: its earlier slots are unknown, so"
            " calls that depend on them may disagree"
        )
    return ReplayReport(
        calls_and_records=replayed,
        runs=runs,
        primary=primary,
        limits=limits,
        limits_source=limits_source,
        relocation=relocation,
        source=source,
        embedded=embedded,
        fmt=fmt,
        skipped=list(skipped),
        vm=vm,
        pid=pid,
        vm_type=vm_type,
        attached=attached,
        notes=notes,
    )


def _compare_replayed_bitmaps(
    runs: dict[str, ImplRun], bitmaps: dict[str, dict[int, bytes]], primary: str
) -> None:
    """The models' and the kernel's replayed bitmaps must be equal: no guest ran in the
    replay. A difference is noted on the kernel's run."""
    kernel_maps = bitmaps.get("kernel", {})
    for index, kbits in kernel_maps.items():
        mbits = bitmaps.get(primary, {}).get(index)
        if mbits is None or mbits == kbits:
            continue
        k, m = int.from_bytes(kbits, "little"), int.from_bytes(mbits, "little")
        if k != m:
            runs["kernel"].details.setdefault(
                index,
                f"dirty pages: kernel {_pages_text(k)}, {primary} {_pages_text(m)}",
            )


# =========================================================================== a trace


def _vm_streams(trace: Trace) -> list[tuple[int, int, int | None, bool, list[Record]]]:
    """``(vm, pid, type, attached, steps)`` for each VM of ``trace``: the VM's own records
    and the hva changes its process made while the VM lived, in trace order."""
    info = {v.number: v for v in trace.vms()}
    streams: dict[int, list[Record]] = {n: [] for n in info}
    alive: set[int] = set()
    for rec in trace.records:
        if isinstance(rec, _HVA_KINDS):
            for n in alive:
                if not rec.pid or not info[n].pid or info[n].pid == rec.pid:
                    streams[n].append(rec)
            continue
        if rec.vm is None:
            continue
        if isinstance(rec, CreateVm):
            alive.add(rec.vm)
            continue
        if isinstance(rec, ReleaseVm):
            alive.discard(rec.vm)
        elif rec.vm not in alive and not any(isinstance(r, ReleaseVm) for r in streams[rec.vm]):
            alive.add(rec.vm)  # a VM whose creation the trace does not show
        streams[rec.vm].append(rec)
    return [
        (n, info[n].pid, info[n].vm_type, info[n].attached, streams[n]) for n in sorted(streams)
    ]


def replay_trace(
    trace: Trace,
    *,
    impls: Iterable[ImplName] = ("engine", "array"),
    kernel: bool | None = None,
    primary: ImplName | None = None,
    embedded: bool = False,
    skipped: Sequence[TraceFormatError] = (),
    progress: Callable[[str, int, int], None] | None = None,
    profile: KernelProfile | None = None,
    kernel_vm: KernelVm | None = None,
) -> TraceReport:
    """Replay every VM of ``trace``, each on its own fresh engine, ArrayVm and ``/dev/kvm``
    VM (one after the other), and find the hazards (hva ranges taken away under live
    slots). Arguments as in :func:`replay`. The models answer as the kernel they are
    compared with: with the kernel column, that kernel's profile (probed); else
    ``profile`` when given (``memslots replay --profile NAME``: how that kernel would
    answer the trace); else the profile or limits the trace's header gives (``memslots
    record`` writes them); else the x86-64 defaults. O(n) records overall on each
    implementation."""
    unavailable = kvm_unavailable() if kernel is None else None
    if unavailable is not None:
        kernel = False
    source = "defaults"
    if profile is None:
        profile = trace.profile()
        source = "trace"
    else:
        source = f"profile {profile.name}"
    fixed = trace.limits() if profile is None else None
    if fixed is None and profile is None:
        source = "defaults"
    reports: list[ReplayReport] = []
    hazards: list[Hazard] = []
    streams = _vm_streams(trace)
    if not streams:
        streams = [(0, 0, None, False, [])]
    for number, pid, vm_type, attached, steps in streams:
        limits = fixed
        if profile is not None:
            try:
                limits = profile.vm_limits(vm_type or 0)
            except MemslotError:  # a VM type that kernel does not offer
                limits = profile.vm_limits(0)
        report = replay(
            steps,
            impls=impls,
            kernel=kernel,
            primary=primary,
            source=trace.source,
            embedded=embedded,
            fmt=trace.fmt,
            skipped=skipped,
            progress=progress,
            limits=limits,
            limits_source=source,
            vm=number,
            pid=pid,
            vm_type=vm_type,
            attached=attached,
            hazards=hazards,
            kernel_vm=kernel_vm,
        )
        if unavailable is not None:
            report.runs["kernel"] = ImplRun("kernel", "unavailable", note=str(unavailable))
        if kernel is None and report.runs["kernel"].status == "unavailable":
            kernel = False  # do not try again for every VM
        reports.append(report)
    return TraceReport(
        vms=reports,
        hazards=hazards,
        source=trace.source,
        embedded=embedded,
        fmt=trace.fmt,
        version=trace.version,
        skipped=list(skipped),
        header=trace.header,
    )
