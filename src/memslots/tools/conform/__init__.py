"""Random conformance runs: the engine checked against ``/dev/kvm`` call by call, with a
minimal reproducer for every disagreement (``memslots conform``).

How a run works
---------------
:func:`run_conform` draws random operations (:class:`OpGenerator`) and runs each on a
:class:`~memslots.kvm.KvmVm` in non-strict mode (:class:`Session`). ``KvmVm`` sends every
call to the kernel and to the engine and records each call the two answered differently
(an errno, a dirty bitmap, or an engine that raised) in ``vm.disagreements``. The generator
looks at the engine's slot table before each operation, so most operations touch slots
that exist: creates (often overlapping), deletes, moves, flag changes, no-ops, invalid
requests of every kind (each validation rule broken alone and two at a time, to check the
kernel's order), guest_memfd binds good and bad, dirty-log GET and CLEAR with valid and
invalid arguments, and manual-protect enables. VMs are replaced every few hundred
operations (and after any disagreement, since the two states may then differ), so the slot
count stays what a VMM has: tens of slots, up to 32763 as an id.

A fraction of the VMs (``ring_vms``, 30% by default) also exercises the dirty ring
(:mod:`memslots.dirty_ring`), between the memslot and dirty-log operations: ring enables
of every size class (valid, 0, below the minimum, not a power of two, over 1 MiB, both,
u64 values that truncate to u32), plain and ACQ_REL, twice, and after a vCPU exists;
vCPU creation with new, duplicate and out-of-range ids; ``KVM_RESET_DIRTY_RINGS`` with and
without a ring; harvests; and host-side writes and marks through a vCPU. The errno of each
enable, vCPU creation and reset is compared, and so is each reset's count (the kernel's
against what the engine predicts from the kernel's mapped rings); with the ring on, every
GET and CLEAR must be ENXIO before any other check. Host-side writes go to the engine's own
ring of the vCPU, never to the kernel's (the kernel does not see userspace writes): they
are there to break the engine if they can, and to check that the kernel's rings and reset
counts stay what the kernel alone predicts.

After the run each distinct disagreement (same operation kind, same kernel and engine
answers) is shrunk: :func:`memslots.tools.ddmin.ddmin` (delta debugging) removes
operations from the sequence that led to it, replaying every candidate on a fresh VM,
until no single operation can be left out. The reproducer is that minimal sequence with
the kernel's answer to each step.

The package: :mod:`~memslots.tools.conform.ops` (the operations and their JSON Lines
form, the format of reproducers), :mod:`~memslots.tools.conform.session` (running them
on a :class:`~memslots.kvm.KvmVm`), :mod:`~memslots.tools.conform.generator` (the random
:class:`OpGenerator`); the run, the shrinking and the report are here. Every public name
is importable from ``memslots.tools.conform``.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from memslots.errors import MemslotError, errno_name
from memslots.kvm.abi import KVM_DEV_PATH
from memslots.kvm.vm import ENGINE_RAISED, ConformanceError, Disagreement, KvmVm
from memslots.profiles import KernelProfile
from memslots.tools.conform.generator import OpGenerator
from memslots.tools.conform.ops import (
    CLOSED_FD,
    GMEM_FD,
    GMEM_SIZE,
    MEM_HVA,
    MEM_SIZE,
    OTHER_FD,
    RING_OPS,
    WRITE_BYTE,
    ClearDirtyLog,
    CloseFd,
    CreateGuestMemfd,
    CreateVcpu,
    CreateVm,
    EnableDirtyRing,
    EnableManualDirtyLogProtect,
    GetDirtyLog,
    HarvestDirtyRing,
    MapMemory,
    Op,
    OpenDevNull,
    ResetDirtyRings,
    VcpuMarkPageDirty,
    VcpuWriteGuest,
    is_compared,
    op_kind,
    op_to_json,
    read_ops,
    with_result,
)
from memslots.tools.conform.session import Session, VmFactory, replay_ops
from memslots.tools.ddmin import ddmin

__all__ = [
    "CLOSED_FD",
    "GMEM_FD",
    "GMEM_SIZE",
    "MEM_HVA",
    "MEM_SIZE",
    "OTHER_FD",
    "RING_OPS",
    "WRITE_BYTE",
    "ClearDirtyLog",
    "CloseFd",
    "ConformReport",
    "CreateGuestMemfd",
    "CreateVcpu",
    "EnableDirtyRing",
    "EnableManualDirtyLogProtect",
    "Finding",
    "GetDirtyLog",
    "HarvestDirtyRing",
    "MapMemory",
    "Op",
    "OpGenerator",
    "OpenDevNull",
    "ResetDirtyRings",
    "Session",
    "Signature",
    "VcpuMarkPageDirty",
    "VcpuWriteGuest",
    "ddmin",
    "is_compared",
    "op_kind",
    "op_to_json",
    "read_ops",
    "replay_ops",
    "reproduce",
    "run_conform",
    "shrink",
    "signature",
    "with_result",
]


Signature = tuple[str, int, int, str]


def signature(op: Op, d: Disagreement) -> Signature:
    """What makes two disagreements "the same": the operation kind, both answers and, for
    a difference in returned data or an engine that raised, the kind of difference."""
    kind = d.detail.split(":", 1)[0] if d.engine == ENGINE_RAISED or d.detail else ""
    return (op_kind(op), d.kernel, d.engine, kind)


def shrink(
    ops: Sequence[Op],
    sig: Signature,
    *,
    path: str = KVM_DEV_PATH,
    vm_factory: VmFactory = KvmVm,
    budget: int = 3000,
) -> list[Op]:
    """The smallest sequence :func:`ddmin` finds within ``ops`` that still makes the
    kernel and the engine disagree as ``sig`` says, each candidate replayed on a fresh VM.
    O(tests x len(ops)) kernel calls."""

    def reproduces(candidate: list[Op]) -> bool:
        vm_type = 0
        if candidate and isinstance(candidate[0], CreateVm):  # the VM's type
            vm_type, candidate = candidate[0].type, candidate[1:]
        with Session(path=path, vm_factory=vm_factory, vm_type=vm_type) as s:
            for op in candidate:
                before = len(s.vm.disagreements)
                s.run(op)
                if any(signature(op, d) == sig for d in s.vm.disagreements[before:]):
                    return True
        return False

    return ddmin(ops, reproduces, budget=budget)


@dataclass
class Finding:
    """One kind of disagreement (one :func:`signature`) met during a run."""

    #: the first disagreement of this kind
    disagreement: Disagreement
    sig: Signature
    #: the operations of that VM, up to and including the one that disagreed
    ops: list[Op]
    #: how many calls disagreed this way
    count: int = 1
    #: the shrunk sequence with the kernel's answers, once :func:`run_conform` shrank it
    reproducer: list[Op] | None = None
    #: False if replaying ``ops`` on a fresh VM did not disagree again (not shrunk)
    reproducible: bool = True

    def to_json(self) -> dict[str, Any]:
        """The finding as a JSON-ready dict (answers as errno names)."""
        d = self.disagreement
        return {
            "call": d.call,
            "kernel": errno_name(d.kernel),
            "engine": "raised" if d.engine == ENGINE_RAISED else errno_name(d.engine),
            "detail": d.detail,
            "count": self.count,
            "operations": len(self.ops),
            "reproducible": self.reproducible,
            "reproducer": None
            if self.reproducer is None
            else [json.loads(op_to_json(op)) for op in self.reproducer],
        }


@dataclass
class ConformReport:
    """What :func:`run_conform` found."""

    seed: int
    #: operations run (compared calls plus fd set-up operations)
    operations: int = 0
    #: calls answered by both the kernel and the engine
    calls: int = 0
    #: calls the two answered differently
    disagreeing_calls: int = 0
    #: ioctls made through the VMs (mirrored calls and set-up)
    kernel_calls: int = 0
    vms: int = 0
    seconds: float = 0.0
    shrink_seconds: float = 0.0
    findings: list[Finding] = field(default_factory=list)
    #: operations run, by kind (:func:`op_kind`)
    kinds: dict[str, int] = field(default_factory=dict)
    #: VMs that had the dirty ring's operations
    ring_vms: int = 0
    #: operations of the dirty ring and its vCPUs (the kinds of :data:`RING_OPS`)
    ring_operations: int = 0
    #: GET and CLEAR_DIRTY_LOG calls made while the VM's ring was on (ENXIO)
    dirty_log_with_ring: int = 0
    #: the profile of the kernel the run faced (as :class:`~memslots.kvm.KvmVm` probed it)
    profile: KernelProfile | None = None

    @property
    def agreed(self) -> int:
        """Calls both answered the same way."""
        return self.calls - self.disagreeing_calls

    @property
    def agreement(self) -> float:
        """``agreed / calls`` (1.0 for no calls)."""
        return self.agreed / self.calls if self.calls else 1.0

    def to_json(self) -> dict[str, Any]:
        """The report as a JSON-ready dict."""
        return {
            "kernel": None if self.profile is None else self.profile.to_dict(),
            "seed": self.seed,
            "operations": self.operations,
            "calls": self.calls,
            "agreed": self.agreed,
            "agreement": self.agreement,
            "disagreeing_calls": self.disagreeing_calls,
            "kernel_calls": self.kernel_calls,
            "vms": self.vms,
            "seconds": round(self.seconds, 3),
            "shrink_seconds": round(self.shrink_seconds, 3),
            "kinds": dict(sorted(self.kinds.items())),
            "ring": {
                "vms": self.ring_vms,
                "operations": self.ring_operations,
                "dirty_log_calls_with_ring_on": self.dirty_log_with_ring,
            },
            "disagreements": [f.to_json() for f in self.findings],
        }


def reproduce(
    ops: Sequence[Op], sig: Signature, *, path: str = KVM_DEV_PATH, vm_factory: VmFactory = KvmVm
) -> list[Op] | None:
    """Shrink ``ops`` to a minimal sequence that disagrees as ``sig`` says and return it
    with the kernel's answers; None if ``ops`` itself does not disagree that way again
    on a fresh VM. Cost: :func:`shrink`."""
    small = shrink(ops, sig, path=path, vm_factory=vm_factory)
    done, found = replay_ops(small, path=path, vm_factory=vm_factory)
    if not any(signature(small[i], d) == sig for i, d in found):
        return None
    return done


def run_conform(
    ops: int,
    seed: int,
    *,
    path: str = KVM_DEV_PATH,
    vm_factory: VmFactory = KvmVm,
    segment: tuple[int, int] = (100, 600),
    progress: Callable[[int, int], None] | None = None,
    shrink_findings: bool = True,
    max_reproducers: int = 10,
    on_shrink: Callable[[int, int], None] | None = None,
    ring_vms: float = 0.3,
) -> ConformReport:
    """Run ``ops`` random operations (seeded by ``seed``) against the kernel and the
    engine, on a new VM every ``segment`` operations (a random length in that range;
    most VMs use slot ids below 24 in an 8 MiB gpa range, one in five ids below 400 in
    a 256 MiB one) and after every disagreement; a fraction ``ring_vms`` of the VMs
    also gets the dirty ring's operations. ``progress(done, disagreeing_calls)``
    is called after each operation. Then, unless ``shrink_findings`` is False, shrink
    the first ``max_reproducers`` kinds of disagreement (``on_shrink(i, n)`` before
    each).

    O(ops) kernel calls for the run, plus the shrinking's (see :func:`shrink`).
    """
    rng = random.Random(seed)
    gen = OpGenerator(rng)
    report = ConformReport(seed)
    by_sig: dict[Signature, Finding] = {}
    start = time.perf_counter()
    while report.operations < ops:
        length = min(rng.randint(*segment), ops - report.operations)
        # most VMs keep tens of slots in a small gpa range (many collisions); some spread
        # hundreds of slots over a wider one (deeper trees, fewer collisions)
        gen.ids, gen.gpa_pages = (24, 2048) if rng.random() < 0.8 else (400, 1 << 16)
        ring = rng.random() < ring_vms
        vm_type = gen.vm_type(report.profile)
        if vm_type:
            # KVM_CREATE_VM of that type: KvmVm compares the kernel's answer with the
            # profile's (arm64: an IPA size out of range is EINVAL) and raises
            # ConformanceError when they differ, MemslotError when both refuse
            try:
                made = Session(path=path, vm_factory=vm_factory, vm_type=vm_type)
                made.close()
                answered = predicted = 0
            except ConformanceError as exc:
                answered, predicted = exc.kernel, exc.engine
            except MemslotError as exc:
                answered = predicted = exc.errno or 0
            create = CreateVm(vm_type, answered)
            report.operations += 1
            report.calls += 1
            report.kinds["create_vm"] = report.kinds.get("create_vm", 0) + 1
            if answered != predicted:
                report.disagreeing_calls += 1
                d = Disagreement(f"create_vm(type={vm_type:#x})", answered, predicted)
                sig = signature(create, d)
                if sig not in by_sig:
                    by_sig[sig] = Finding(d, sig, [create])
                else:
                    by_sig[sig].count += 1
            if answered:
                continue
        with Session(path=path, vm_factory=vm_factory, vm_type=vm_type) as s:
            vm = s.vm
            gen.use_limits(vm.limits)  # the kernel's, as KvmVm probed them
            report.profile = vm.profile
            report.vms += 1
            report.ring_vms += ring
            gen.untranslate = s.alias_hva
            history = gen.prelude(ring=ring)
            for op in history:
                s.run(op)
            if vm_type:  # a reproducer starts by making a VM of the same type
                history.insert(0, CreateVm(vm_type, 0))
            clean = True
            for _ in range(length):
                op = gen.next(vm.slots(), s.vcpu_ids(), vm.dirty_ring_size)
                history.append(op)
                kind = op_kind(op)
                report.kinds[kind] = report.kinds.get(kind, 0) + 1
                report.ring_operations += isinstance(op, RING_OPS)
                if vm.dirty_ring_size and isinstance(op, GetDirtyLog | ClearDirtyLog):
                    report.dirty_log_with_ring += 1
                before = len(vm.disagreements)
                s.run(op)
                report.operations += 1
                report.calls += is_compared(op)
                new = vm.disagreements[before:]
                if new:
                    report.disagreeing_calls += 1
                    for d in new:
                        sig = signature(op, d)
                        if sig in by_sig:
                            by_sig[sig].count += 1
                        else:
                            by_sig[sig] = Finding(d, sig, list(history))
                if progress is not None:
                    progress(report.operations, report.disagreeing_calls)
                if new:  # the two states may differ from here on: start afresh
                    clean = False
                    break
            if clean:
                try:
                    vm.check_invariants()
                except AssertionError as exc:
                    d = Disagreement(
                        "check_invariants()", 0, ENGINE_RAISED, f"AssertionError: {exc}"
                    )
                    sig = ("check_invariants", 0, ENGINE_RAISED, "AssertionError")
                    by_sig.setdefault(sig, Finding(d, sig, list(history), reproducible=False))
            report.kernel_calls += vm.kernel_calls
    report.seconds = time.perf_counter() - start
    report.findings = list(by_sig.values())
    if shrink_findings:
        t0 = time.perf_counter()
        todo = [f for f in report.findings if f.reproducible][:max_reproducers]
        for i, f in enumerate(todo):
            if on_shrink is not None:
                on_shrink(i, len(todo))
            f.reproducer = reproduce(f.ops, f.sig, path=path, vm_factory=vm_factory)
            f.reproducible = f.reproducer is not None
        report.shrink_seconds = time.perf_counter() - t0
    return report
