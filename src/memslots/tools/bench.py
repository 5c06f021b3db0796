"""Benchmarks: the ``memslot_perf_test`` scenarios adapted to the library, and a sweep of
per-operation cost over slot counts, for the tree engine, the array baseline and the
kernel. ``memslots bench`` is the command line front end; this module is usable on its own:

    from memslots.tools.bench import BenchConfig, run
    results = run(BenchConfig.quick())
    print(results.criteria)

Implementations (``BenchConfig.impls``):

``tree``
    :class:`memslots.vm.Vm`, the engine.
``array``
    :class:`memslots.baseline.ArrayVm`, the design before commit a54d806688fe.
``kvm``
    :class:`memslots.kvm.KvmVm` (``/dev/kvm``): every memslot call goes to the kernel
    and to the engine that mirrors it; lookups are the engine's.
``ioctl``
    the bare ``KVM_SET_USER_MEMORY_REGION`` ioctl through :mod:`memslots.kvm.abi`: what
    the kernel itself costs, seen from Python. The engine's ratios to the kernel use it.
``pure``
    the engine's pure-Python build, when ``tree`` is the compiled one
    (``memslots.COMPILED``), in a worker process (sweep only; see
    :mod:`memslots.tools.bench_peers`).
``vmmemory``
    a model of rust-vmm vm-memory's ``GuestRegionCollection`` (sweep only).
``unicorn``
    Unicorn's ``mem_map_ptr``/``mem_unmap``/``mem_protect`` (sweep only; needs the
    ``peers`` extra).

Scenarios (those of the kernel's ``tools/testing/selftests/kvm/memslot_perf_test.c``, with
its slot layout: ``N`` slots split ``MEM_SIZE`` = 512 MiB + 64 KiB at guest physical
256 MiB, the last slot takes the remainder; times are per iteration, the median of the
repetitions, each repetition's time kept in ``runs``):

``setup``
    create the ``N`` slots (seconds for all of them).
``move-active`` / ``move-inactive``
    MOVE the last slot to just above the test memory and back (two MOVEs per
    iteration); after each MOVE a vCPU looks up every page of a 192 KiB area, which
    straddles the start of the moved slot (active: half the lookups find nothing while
    the slot is away, the guest's MMIO exits) or lies just before it (inactive). A
    kernel vCPU would run concurrently; Python's GIL would turn that into a measure of
    thread switching, so lookups and moves alternate in one thread here.
``unmap`` / ``unmap-chunked``
    hva-range invalidation (the MMU-notifier side, ``kvm_handle_hva_range``) over a
    64 MiB area, one 4 KiB page or 2 MiB at a time: every call walks the slots whose hva
    range meets the piece (``iter_hva_range``) and computes the gfn range of each. An
    iteration is the whole 64 MiB; when fewer calls than that fit in the measurement
    time, the per-call cost is scaled to a whole pass (marked "extrapolated").
``rw``
    ``write_guest`` of 8 bytes into every page of the test memory, then ``read_guest``
    of every page and a check of the value (no slot changes: plain access throughput).
``sweep``
    per-operation cost of CREATE, DELETE, MOVE and FLAGS_ONLY with ``count`` slots
    present, for every count of ``BenchConfig.counts``: slot ``count // 2`` is deleted
    and created again (in the middle of the gfn range, so an array shifts half its
    entries whichever way it is sorted), the last slot moves above the others and back,
    and slot ``count // 2`` turns dirty logging on and off. Every operation is timed on
    its own; the result is the median over the repetitions of each repetition's mean.

Statistics: every number is the median of ``BenchConfig.repetitions`` measurements, and
the measurements themselves are kept, so that the spread (their range) is reported
with it. A ratio between two implementations is computed per repetition (they are
measured in turn within each repetition, so noise hits both alike) and reported as the
median and range of those ratios. A target is judged (met or not) only from 3
repetitions or more; with fewer (``--quick``: one) the outcome is reported as
indicative.

Every ratio is computed from numbers taken in the same run, the implementations
measured in turn at each count so that machine noise hits all of them alike.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from typing import Any, Final, Protocol

import memslots
from memslots.baseline import ArrayVcpu, ArrayVm
from memslots.constants import KVM_MEM_LOG_DIRTY_PAGES, KVM_USER_MEM_SLOTS_X86, PAGE_SHIFT
from memslots.guest_memory import HostMemory
from memslots.kvm.abi import kvm_unavailable
from memslots.slot import gfn_to_hva_memslot_prot, kvm_is_error_hva
from memslots.tools.bench_peers import (
    EngineWorker,
    UnicornTarget,
    VmMemoryModel,
    unicorn_available,
)
from memslots.view import RegionTarget
from memslots.vm import Vcpu, Vm

#: the implementations that answer lookups and guest memory (not a bare VM fd)
EngineVm = Vm | ArrayVm

KiB: Final = 1 << 10
MiB: Final = 1 << 20

#: memslot_perf_test (current): test memory at 256 MiB, 512 MiB + 64 KiB long
MEM_GPA: Final = 256 * MiB
MEM_SIZE: Final = 512 * MiB + 64 * KiB
#: the area the guest touches in the move tests
MEM_TEST_MOVE_SIZE: Final = 192 * KiB
#: the area invalidated per unmap iteration (half of memslot_perf_test's 128 MiB)
MEM_TEST_UNMAP_SIZE: Final = 64 * MiB
MEM_TEST_UNMAP_CHUNK: Final = 2 * MiB
#: the sweep's slots: 4 pages each, one after the other (32764 of them fill MEM_SIZE)
SWEEP_SLOT_PAGES: Final = 4

IMPLS: Final = ("tree", "pure", "array", "kvm", "ioctl", "vmmemory", "unicorn")
#: the build of the engine this process runs
BUILD: Final = "compiled" if memslots.COMPILED else "pure Python"
IMPL_LABELS: Final = {
    "tree": f"tree (Vm, {BUILD})",
    "pure": "tree (Vm, pure Python)",
    "array": "array (ArrayVm)",
    "kvm": "KvmVm",
    "ioctl": "kernel ioctl",
    "vmmemory": "vm-memory model (Python)",
    "unicorn": "Unicorn",
}
#: the implementations that take part in the sweep only
SWEEP_ONLY: Final = ("pure", "vmmemory", "unicorn")
#: the largest slot count the sweep measures an implementation at, and why
SWEEP_LIMITS: Final = {"unicorn": 2048}
#: the sweep's implementations measured in a worker process of their own, as ``(design,
#: pure build)``: the pure build (the sweep's process runs the compiled one), the array
#: and the vm-memory model, whose O(n) copies of large lists churn the heap and the
#: caches of the process they run in (measured in the sweep's own process, either
#: doubled the compiled tree's cost at 32764 slots); see
#: :class:`~memslots.tools.bench_peers.EngineWorker`
WORKER_IMPLS: Final[dict[str, tuple[str, bool]]] = {
    "pure": ("tree", True),
    "array": ("array", False),
    "vmmemory": ("vmmemory", False),
}
SWEEP_LIMIT_REASONS: Final = {
    "unicorn": "each mem_map rebuilds the emulator's memory map: mapping 4000 regions "
    "took 17 s on this project's machine, 32764 would take many minutes",
}
SCENARIOS: Final = (
    "setup",
    "move-active",
    "move-inactive",
    "unmap",
    "unmap-chunked",
    "rw",
    "sweep",
)
#: which implementations each scenario applies to (lookups, hva walks and guest access
#: are the engine's in KvmVm and do not exist for the bare ioctl)
SCENARIO_IMPLS: Final = {
    "setup": ("tree", "array", "kvm", "ioctl"),
    "move-active": ("tree", "array", "kvm"),
    "move-inactive": ("tree", "array", "kvm"),
    "unmap": ("tree", "array"),
    "unmap-chunked": ("tree", "array"),
    "rw": ("tree", "array"),
}
OPS: Final = ("create", "delete", "move", "flags")
DEFAULT_COUNTS: Final = (16, 64, 256, 1024, 4096, 16384, 32764)
#: slots of the scenarios, and the array's largest sweep count, with ``--quick``
QUICK_SLOTS: Final = 8192
#: the smallest number of operation pairs (or calls) in any measurement
MIN_PAIRS: Final = 3
#: the fewest repetitions a target is judged on (fewer: the outcome is indicative)
JUDGED_REPETITIONS: Final = 3


def available_cpus() -> set[int] | None:
    """The CPUs this process may run on (``os.sched_getaffinity``), None where the
    platform does not tell."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    return set(os.sched_getaffinity(0))


def cpu_ranges(cpus: set[int]) -> str:
    """``0-1``, ``0,2-5``: a CPU set as the kernel's cpulist format writes it."""
    spans: list[tuple[int, int]] = []
    for c in sorted(cpus):
        if spans and spans[-1][1] == c - 1:
            spans[-1] = (spans[-1][0], c)
        else:
            spans.append((c, c))
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans)


@dataclass(frozen=True)
class BenchConfig:
    """What to run. ``slots``: N for the scenarios; ``counts``: slot counts of the sweep;
    ``duration``: seconds per measurement (at least ``MIN_PAIRS`` operations are always
    made); ``repetitions``: measurements per number (the median is reported with their
    range; targets are judged from :data:`JUDGED_REPETITIONS` on); ``impls`` and
    ``scenarios``: subsets of :data:`IMPLS` and :data:`SCENARIOS`; ``cpu``: pin the
    process to this CPU (None: do not pin; the kernel's grace periods are cheapest for a
    caller on CPU 0 on the machine this was measured on: docs/benchmarks.md);
    ``array_limit``: most slots the array design is swept to (None: all counts; its O(n)
    updates make building 32764 slots take about 20 s)."""

    slots: int = KVM_USER_MEM_SLOTS_X86
    counts: tuple[int, ...] = DEFAULT_COUNTS
    duration: float = 0.2
    repetitions: int = 3
    impls: tuple[str, ...] = IMPLS
    scenarios: tuple[str, ...] = SCENARIOS
    cpu: int | None = 0
    array_limit: int | None = None

    @classmethod
    def quick(cls, **overrides: Any) -> BenchConfig:
        """The ``--quick`` preset: every scenario with :data:`QUICK_SLOTS` slots, the
        sweep over every count (the array to :data:`QUICK_SLOTS`), short measurements,
        one repetition, so its verdicts are indicative (docs/benchmarks.md gives its time
        on a 2-core machine)."""
        values: dict[str, Any] = {
            "duration": 0.03,
            "repetitions": 1,
            "slots": QUICK_SLOTS,
            "array_limit": QUICK_SLOTS,
        }
        values.update(overrides)
        return cls(**values)

    def validate(self) -> None:
        """Raise ValueError for values the benchmark cannot run with."""
        if not self.counts:
            raise ValueError("no slot counts to sweep")
        if not self.impls:
            raise ValueError("no implementation to measure")
        if not self.scenarios:
            raise ValueError("no scenario to run")
        if not 0 < self.duration <= 60:  # also refuses nan
            raise ValueError(f"duration must be in (0, 60] seconds, not {self.duration}")
        if not 1 <= self.repetitions <= 1000:
            raise ValueError(f"repetitions must be in 1..1000, not {self.repetitions}")
        if self.array_limit is not None and self.array_limit < 4:
            raise ValueError("array_limit must be at least 4")
        if not 4 <= self.slots <= KVM_USER_MEM_SLOTS_X86:
            raise ValueError(f"slots must be in 4..{KVM_USER_MEM_SLOTS_X86}")
        for c in self.counts:
            if not 4 <= c <= KVM_USER_MEM_SLOTS_X86:
                raise ValueError(f"slot counts must be in 4..{KVM_USER_MEM_SLOTS_X86}, not {c}")
        if list(self.counts) != sorted(set(self.counts)):
            raise ValueError("slot counts must be increasing")
        for name in self.impls:
            if name not in IMPLS:
                raise ValueError(f"unknown implementation {name!r}; known: {', '.join(IMPLS)}")
        for name in self.scenarios:
            if name not in SCENARIOS:
                raise ValueError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}")
        cpus = available_cpus()
        if self.cpu is not None and cpus is not None and self.cpu not in cpus:
            raise ValueError(f"cpu {self.cpu}: not an available CPU ({cpu_ranges(cpus)})")


@dataclass
class ScenarioResult:
    """One scenario on one implementation: ``seconds`` per iteration (the median of the
    repetitions, ``runs``: each repetition's), ``iterations`` measured in total,
    ``extrapolated`` when an iteration was longer than the measurement and its cost was
    scaled up from part of it; ``detail``: scenario-specific counts (lookups without a
    slot, pages invalidated)."""

    scenario: str
    impl: str
    slots: int
    seconds: float
    iterations: float
    extrapolated: bool = False
    detail: dict[str, int] = field(default_factory=dict)
    runs: list[float] = field(default_factory=list)


@dataclass
class SweepPoint:
    """Cost of one operation with ``count`` slots present: ``us`` microseconds per
    operation (the median of the repetitions' means, ``runs``: each repetition's mean,
    in order), ``samples`` operations timed in total."""

    impl: str
    count: int
    op: str
    us: float
    samples: int
    runs: list[float] = field(default_factory=list)


def spread(runs: Sequence[float]) -> float:
    """The relative spread of repeated measurements: (max - min) / median (0 for fewer
    than two)."""
    if len(runs) < 2:
        return 0.0
    mid = statistics.median(runs)
    return (max(runs) - min(runs)) / mid if mid else 0.0


@dataclass
class BenchResults:
    """Everything one run measured, with the machine, the configuration, notes about
    what was skipped, and the acceptance ratios (:meth:`compute_criteria`)."""

    config: BenchConfig
    machine: dict[str, Any]
    scenarios: list[ScenarioResult] = field(default_factory=list)
    sweep: list[SweepPoint] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    criteria: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def point(self, impl: str, count: int, op: str) -> float | None:
        """Microseconds per ``op`` for ``impl`` at ``count`` slots, the median of the
        repetitions (``op`` "mean": the median of each repetition's mean of the four
        operations), or None if not measured."""
        runs = self.runs(impl, count, op)
        return statistics.median(runs) if runs else None

    def runs(self, impl: str, count: int, op: str) -> list[float] | None:
        """Each repetition's microseconds per ``op`` for ``impl`` at ``count`` slots
        (``op`` "mean": the mean of the four operations in each repetition), or None."""
        if op == "mean":
            per_op = [self.runs(impl, count, o) for o in OPS]
            if any(not r for r in per_op):
                return None
            return [sum(vals) / len(vals) for vals in zip(*per_op, strict=False)]
        for p in self.sweep:
            if p.impl == impl and p.count == count and p.op == op:
                return p.runs or [p.us]
        return None

    def scenario(self, scenario: str, impl: str) -> ScenarioResult | None:
        """The result of ``scenario`` for ``impl``, if it ran."""
        for r in self.scenarios:
            if r.scenario == scenario and r.impl == impl:
                return r
        return None

    def compute_criteria(self) -> dict[str, Any]:
        """The acceptance ratios, from this run's sweep: the engine at the largest count
        against 64 slots (target: <= 2 for every operation), the array baseline against
        the engine at the largest count (target: >= 20 on the mean of the four
        operations; each operation is reported too), the engine against the kernel's
        ioctl at the largest count (target for the compiled build: <= 1 per operation),
        the compiled build against the pure one (target: <= 0.4 per operation) and each
        peer against the engine at the largest count it was measured at.

        Each ratio is the median of the per-repetition ratios; ``KEY_range`` holds
        their ``[min, max]`` per operation. The targets are judged on the medians
        (``*_ok``) only when the largest count is 32764, the count they are stated for,
        and the run made at least :data:`JUDGED_REPETITIONS` repetitions; with fewer,
        the same comparison is stored as ``*_indicative``. ``repetitions`` and
        ``judged`` say which."""
        c: dict[str, Any] = {}
        counts = self.config.counts
        if not counts:
            return c
        top = counts[-1]
        c["largest_count"] = top
        c["repetitions"] = self.config.repetitions
        ops = (*OPS, "mean")
        ranges: dict[str, dict[str, list[float]]] = {}

        def ratios(a: str, ca: int, b: str, cb: int) -> dict[str, float] | None:
            out, rng = {}, {}
            for op in ops:
                xs, ys = self.runs(a, ca, op), self.runs(b, cb, op)
                if not xs or not ys or any(y == 0 for y in ys):
                    return None
                per_rep = [x / y for x, y in zip(xs, ys, strict=False)]
                out[op] = statistics.median(per_rep)
                rng[op] = [min(per_rep), max(per_rep)]
            ranges[f"{a}:{ca}/{b}:{cb}"] = rng
            return out

        def put(key: str, r: dict[str, float], a: str, ca: int, b: str, cb: int) -> None:
            c[key] = r
            c[f"{key}_range"] = ranges[f"{a}:{ca}/{b}:{cb}"]

        # the targets are stated for the largest slot count the ABI allows, and judged
        # from enough repetitions only
        stated = top == KVM_USER_MEM_SLOTS_X86
        enough = self.config.repetitions >= JUDGED_REPETITIONS
        judged = stated and enough
        c["judged"] = judged
        verdict = "_ok" if enough else "_indicative"
        if 64 in counts and top != 64:
            r = ratios("tree", top, "tree", 64)
            if r is not None:
                put("tree_top_vs_64", r, "tree", top, "tree", 64)
                if stated:
                    c["tree_top_vs_64" + verdict] = all(v <= 2.0 for v in r.values())
        r = ratios("array", top, "tree", top)
        if r is not None:
            put("array_vs_tree_at_top", r, "array", top, "tree", top)
            if stated:
                c["array_vs_tree_at_top" + verdict] = r["mean"] >= 20.0
        c["build"] = self.machine.get("build", BUILD)
        compiled = c["build"] == "compiled"
        r = ratios("tree", top, "ioctl", top)
        if r is not None:
            put("tree_vs_ioctl_at_top", r, "tree", top, "ioctl", top)
            if stated and compiled:
                c["tree_vs_ioctl_at_top" + verdict] = all(r[op] <= 1.0 for op in OPS)
        r = ratios("tree", top, "pure", top)
        if r is not None:
            put("compiled_vs_pure_at_top", r, "tree", top, "pure", top)
            if stated:
                c["compiled_vs_pure_at_top" + verdict] = all(r[op] <= 0.4 for op in OPS)
        r = ratios("kvm", top, "ioctl", top)
        if r is not None:
            put("kvmvm_vs_ioctl_at_top", r, "kvm", top, "ioctl", top)
        for peer in ("vmmemory", "unicorn"):
            counts_of = sorted({p.count for p in self.sweep if p.impl == peer})
            if counts_of:
                at = counts_of[-1]
                r = ratios(peer, at, "tree", at)
                if r is not None:
                    c[f"{peer}_vs_tree"] = {"count": at, **r}
                    c[f"{peer}_vs_tree_range"] = ranges[f"{peer}:{at}/tree:{at}"]
        self.criteria = c
        return c

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of the whole run."""
        return {
            "tool": "memslots bench",
            "machine": self.machine,
            "config": asdict(self.config),
            "seconds": round(self.seconds, 3),
            "notes": self.notes,
            "criteria": self.criteria,
            "scenarios": [asdict(r) for r in self.scenarios],
            "sweep": [asdict(p) for p in self.sweep],
        }

    def save_json(self, path: str) -> None:
        """Write :meth:`to_json` to ``path`` (indented, trailing newline)."""
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_json(), f, indent=1)
            f.write("\n")


class Progress(Protocol):
    """Where the runner reports progress: ``phase`` starts a named phase of ``total``
    steps, ``advance`` completes steps of the current phase."""

    def phase(self, description: str, total: int) -> None: ...

    def advance(self, steps: int = 1) -> None: ...


class _NoProgress:
    def phase(self, description: str, total: int) -> None:
        pass

    def advance(self, steps: int = 1) -> None:
        pass


# ======================================================================================
# Implementations under test
# ======================================================================================
def make_target(impl: str) -> RegionTarget:
    """A new, empty VM of implementation ``impl`` (one address space, as the kernel on
    this machine has). Close it with :func:`close_target`."""
    if impl == "tree":
        return Vm(nr_address_spaces=1)
    if impl == "array":
        from memslots.baseline import ArrayVm

        return ArrayVm(nr_address_spaces=1)
    if impl == "kvm":
        from memslots.kvm import KvmVm

        return KvmVm()
    if impl == "ioctl":
        from memslots.kvm.abi import KvmSystem

        with KvmSystem() as system:
            return system.create_vm()
    if impl == "unicorn":
        return UnicornTarget()
    if impl in WORKER_IMPLS:
        raise ValueError(f"{impl} runs in a worker process: use EngineWorker")
    raise ValueError(f"unknown implementation {impl!r}")


def close_target(t: RegionTarget) -> None:
    """Release what :func:`make_target` created (a kernel VM is destroyed)."""
    close = getattr(t, "close", None)
    if close is not None:
        close()


def available_impls(wanted: Sequence[str]) -> tuple[list[str], list[str]]:
    """The implementations of ``wanted`` that can run here, and a note for each one that
    cannot."""
    ok, notes = [], []
    checked, unavailable = False, None
    for name in wanted:
        if name in ("kvm", "ioctl"):
            if not checked:
                checked, unavailable = True, kvm_unavailable()
            if unavailable is not None:
                notes.append(f"{IMPL_LABELS[name]}: skipped, {unavailable}")
                continue
        if name == "pure" and not memslots.COMPILED:
            notes.append("pure: skipped, this install is itself pure Python (the tree column)")
            continue
        if name == "unicorn" and not unicorn_available():
            notes.append("Unicorn: skipped, not installed (pip install 'memslots[peers]')")
            continue
        ok.append(name)
    return ok, notes


# ======================================================================================
# Helpers
# ======================================================================================
@contextmanager
def _no_gc() -> Iterator[None]:
    """Collect, then keep the cyclic collector off while timing (as timeit does)."""
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def perf_layout(n: int) -> list[tuple[int, int]]:
    """memslot_perf_test's layout of ``n`` slots: ``(guest_phys_addr, size)`` of each,
    splitting MEM_SIZE evenly from MEM_GPA, the last slot taking the remainder."""
    pages = MEM_SIZE >> PAGE_SHIFT
    per = pages // n
    out = [(MEM_GPA + ((i * per) << PAGE_SHIFT), per << PAGE_SHIFT) for i in range(n - 1)]
    out.append((MEM_GPA + (((n - 1) * per) << PAGE_SHIFT), (pages - (n - 1) * per) << PAGE_SHIFT))
    return out


def invalidate_hva_range(vm: EngineVm, start: int, end: int) -> int:
    """``__kvm_handle_hva_range`` for ``[start, end)``: in a read section, for every
    address space, each slot whose hva range meets the range and the gfn range it maps
    there. Returns the number of gfns the handler would see. O(log n + k log n) on the
    engine, O(n) on the array baseline."""
    pages = 0
    srcu = vm.srcu
    idx = srcu.read_lock()
    try:
        for as_id in range(vm.nr_address_spaces):
            for s in vm._memslots[as_id].iter_hva_range(start, end - 1):
                uaddr = s.userspace_addr
                hs = start if start > uaddr else uaddr
                send = uaddr + (s.npages << PAGE_SHIFT)
                he = end if end < send else send
                first = s.base_gfn + ((hs - uaddr) >> PAGE_SHIFT)
                last = s.base_gfn + ((he + (1 << PAGE_SHIFT) - 1 - uaddr) >> PAGE_SHIFT)
                pages += last - first
    finally:
        srcu.read_unlock(idx)
    return pages


def machine_info() -> dict[str, Any]:
    """The machine: CPU model and count, kernel, Python, and KVM facts when available."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "kernel": platform.release(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "build": BUILD,
    }
    with suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    unavailable = kvm_unavailable()
    if unavailable is not None:
        info["kvm_unavailable"] = str(unavailable)
    else:
        from memslots.kvm.abi import (
            KVM_CAP_MULTI_ADDRESS_SPACE,
            KVM_CAP_NR_MEMSLOTS,
            KvmSystem,
        )

        with suppress(OSError), KvmSystem() as system:
            info["kvm"] = {
                "api_version": system.api_version(),
                "nr_memslots": system.check_extension(KVM_CAP_NR_MEMSLOTS),
                "address_spaces": max(1, system.check_extension(KVM_CAP_MULTI_ADDRESS_SPACE)),
            }
    return info


# ======================================================================================
# Scenarios
# ======================================================================================
class _Runner:
    def __init__(self, cfg: BenchConfig, progress: Progress, results: BenchResults) -> None:
        self.cfg = cfg
        self.progress = progress
        self.results = results
        #: the vCPU of each scenario VM (by id of the VM), created on first use
        self._vcpus: dict[int, Vcpu | ArrayVcpu] = {}

    # --- memslot_perf_test scenarios --------------------------------------------------
    def scenarios(self, impls: list[str], mem: HostMemory) -> None:
        cfg = self.cfg
        wanted = [s for s in cfg.scenarios if s != "sweep"]
        if not wanted:
            return
        n = cfg.slots
        layout = perf_layout(n)
        plan = {impl: [s for s in wanted if impl in SCENARIO_IMPLS[s]] for impl in impls}
        steps = sum(
            len(todo) - 1 + cfg.repetitions if "setup" in todo else len(todo)
            for todo in plan.values()
        )
        self.progress.phase(f"scenarios with {n} slots", max(steps, 1))
        for impl, todo in plan.items():
            if not todo:
                continue
            target = self._setup(impl, layout, mem, "setup" in todo)
            try:
                for s in todo:
                    if s == "setup":
                        continue
                    if s.startswith("move"):
                        r = self._move(impl, target, layout, mem, active=s == "move-active")
                    elif s.startswith("unmap"):
                        assert isinstance(target, EngineVm)
                        r = self._unmap(impl, target, mem, chunked=s == "unmap-chunked")
                    else:
                        assert isinstance(target, EngineVm)
                        r = self._rw(impl, target, layout)
                    self.results.scenarios.append(r)
                    self.progress.advance()
            finally:
                self._vcpus.pop(id(target), None)
                close_target(target)

    def _create_all(self, t: RegionTarget, layout: list[tuple[int, int]], mem: HostMemory) -> None:
        sur = t.set_user_memory_region
        base = mem.addr - MEM_GPA
        for i, (gpa, size) in enumerate(layout):
            sur(i, 0, gpa, size, base + gpa)

    def _setup(
        self, impl: str, layout: list[tuple[int, int]], mem: HostMemory, timed: bool
    ) -> RegionTarget:
        """Build a VM with the layout; when ``timed``, build it ``repetitions`` times and
        record the best creation time. Returns the last VM built."""
        reps = self.cfg.repetitions if timed else 1
        runs: list[float] = []
        target: RegionTarget | None = None
        for _ in range(reps):
            if target is not None:
                close_target(target)
            target = make_target(impl)
            with _no_gc():
                t0 = time.perf_counter()
                self._create_all(target, layout, mem)
                runs.append(time.perf_counter() - t0)
            if timed:
                self.progress.advance()
        assert target is not None
        if timed:
            self.results.scenarios.append(
                ScenarioResult("setup", impl, len(layout), statistics.median(runs), reps, runs=runs)
            )
        return target

    def _move(
        self,
        impl: str,
        t: RegionTarget,
        layout: list[tuple[int, int]],
        mem: HostMemory,
        *,
        active: bool,
    ) -> ScenarioResult:
        assert isinstance(t, EngineVm)
        last = len(layout) - 1
        gpa, size = layout[last]
        hva = mem.addr - MEM_GPA + gpa
        away = MEM_GPA + MEM_SIZE
        area_pages = MEM_TEST_MOVE_SIZE >> PAGE_SHIFT
        first_gfn = (gpa >> PAGE_SHIFT) - (area_pages // 2 if active else area_pages)
        gfns = range(first_gfn, first_gfn + area_pages)
        vcpu = self._vcpus.get(id(t))
        if vcpu is None:
            vcpu = self._vcpus[id(t)] = t.create_vcpu(0)
        sur = t.set_user_memory_region
        lookup = vcpu.gfn_to_memslot

        def touch() -> int:
            mmio = 0
            for gfn in gfns:
                if kvm_is_error_hva(gfn_to_hva_memslot_prot(lookup(gfn), gfn, True)):
                    mmio += 1
            return mmio

        runs: list[float] = []
        total = 0
        mmio = 0
        for _ in range(self.cfg.repetitions):
            n = 0
            with _no_gc():
                t0 = time.perf_counter()
                deadline = t0 + self.cfg.duration
                while True:
                    sur(last, 0, away, size, hva)
                    mmio += touch()
                    sur(last, 0, gpa, size, hva)
                    mmio += touch()
                    n += 1
                    now = time.perf_counter()
                    if n >= MIN_PAIRS and now >= deadline:
                        break
            runs.append((now - t0) / n)
            total += n
        name = "move-active" if active else "move-inactive"
        return ScenarioResult(
            name, impl, len(layout), statistics.median(runs), total,
            detail={"lookups": total * 2 * area_pages, "lookups_without_slot": mmio},
            runs=runs,
        )  # fmt: skip

    def _unmap(self, impl: str, vm: EngineVm, mem: HostMemory, *, chunked: bool) -> ScenarioResult:
        piece = MEM_TEST_UNMAP_CHUNK if chunked else 1 << PAGE_SHIFT
        per_pass = MEM_TEST_UNMAP_SIZE // piece
        start0 = mem.addr
        runs: list[float] = []
        total = 0
        pages = 0
        extrapolated = False
        for _ in range(self.cfg.repetitions):
            calls = 0
            with _no_gc():
                t0 = time.perf_counter()
                deadline = t0 + self.cfg.duration
                while True:
                    start = start0 + (calls % per_pass) * piece
                    pages += invalidate_hva_range(vm, start, start + piece)
                    calls += 1
                    now = time.perf_counter()
                    if now >= deadline and calls >= MIN_PAIRS:
                        break
            if calls < per_pass:
                extrapolated = True
            runs.append((now - t0) / calls * per_pass)
            total += calls
        name = "unmap-chunked" if chunked else "unmap"
        return ScenarioResult(
            name, impl, len(vm.memslots(0)), statistics.median(runs), total / per_pass,
            extrapolated, detail={"calls": total, "pages_invalidated": pages}, runs=runs,
        )  # fmt: skip

    def _rw(self, impl: str, vm: EngineVm, layout: list[tuple[int, int]]) -> ScenarioResult:
        npages = MEM_SIZE >> PAGE_SHIFT
        gpas = range(MEM_GPA, MEM_GPA + (npages << PAGE_SHIFT), 1 << PAGE_SHIFT)
        write, read = vm.write_guest, vm.read_guest
        vm.clear_guest(MEM_GPA, MEM_SIZE)  # fault every page in before timing
        runs: list[float] = []
        total = 0
        bad = 0
        for rep in range(self.cfg.repetitions):
            n = 0
            with _no_gc():
                t0 = time.perf_counter()
                deadline = t0 + self.cfg.duration
                while True:
                    tag = (rep * 1000 + n) & 0xFFFF
                    for gpa in gpas:
                        write(gpa, ((gpa << 16) | tag).to_bytes(8, "little"))
                    for gpa in gpas:
                        if int.from_bytes(read(gpa, 8), "little") != ((gpa << 16) | tag):
                            bad += 1
                    n += 1
                    now = time.perf_counter()
                    if now >= deadline:
                        break
            runs.append((now - t0) / n)
            total += n
        if bad:
            raise AssertionError(f"rw: {bad} pages read back a wrong value")
        return ScenarioResult(
            "rw", impl, len(layout), statistics.median(runs), total,
            detail={"pages": npages, "accesses": 2 * npages}, runs=runs,
        )  # fmt: skip

    # --- the sweep --------------------------------------------------------------------
    def sweep(self, impls: list[str], mem: HostMemory) -> None:
        cfg = self.cfg
        counts = cfg.counts
        targets: dict[str, RegionTarget] = {}
        workers: dict[str, EngineWorker] = {}
        present = dict.fromkeys(impls, 0)
        self.progress.phase(
            "per-operation sweep", len(counts) * (len(impls) + cfg.repetitions * len(impls))
        )
        base = mem.addr - MEM_GPA
        step = SWEEP_SLOT_PAGES << PAGE_SHIFT
        size = step
        duration = cfg.duration / 3
        limits = dict(SWEEP_LIMITS)
        reasons = dict(SWEEP_LIMIT_REASONS)
        if cfg.array_limit is not None:
            limits["array"] = min(limits.get("array", cfg.array_limit), cfg.array_limit)
            reasons["array"] = "its updates cost O(n): building 32764 slots takes about 20 s"
        capped = [i for i in impls if limits.get(i, counts[-1]) < counts[-1]]
        for impl in capped:
            swept = [c for c in counts if c <= limits[impl]]
            reach = (
                f"swept up to {swept[-1]} slots, not beyond {limits[impl]}"
                if swept
                else f"not swept (every count is above {limits[impl]})"
            )
            self.results.notes.append(f"{IMPL_LABELS[impl]}: {reach} ({reasons[impl]})")
        try:
            for impl in impls:
                if impl in WORKER_IMPLS:
                    design, pure = WORKER_IMPLS[impl]
                    workers[impl] = EngineWorker(design, pure=pure)
                else:
                    targets[impl] = make_target(impl)
            for count in counts:
                active = [i for i in impls if count <= limits.get(i, count)]
                for impl in active:
                    if impl in workers:
                        workers[impl].grow(count, base, step)
                        present[impl] = count
                        self.progress.advance()
                        continue
                    t = targets[impl]
                    with _no_gc():
                        sur = t.set_user_memory_region
                        for i in range(present[impl], count):
                            gpa = MEM_GPA + i * step
                            sur(i, 0, gpa, size, base + gpa)
                    present[impl] = count
                    self.progress.advance()
                if count == counts[0]:  # a warm-up, not kept: first calls pay for caches
                    for impl in active:
                        if impl in workers:
                            workers[impl].time_ops(count, base, step, duration / 4)
                        else:
                            time_ops(targets[impl], count, base, step, duration / 4)
                samples: dict[tuple[str, str], list[tuple[float, int]]] = {}
                for _ in range(cfg.repetitions):
                    for impl in active:
                        if impl in workers:
                            ops = workers[impl].time_ops(count, base, step, duration)
                        else:
                            ops = time_ops(targets[impl], count, base, step, duration)
                        for op, us, n in ops:
                            samples.setdefault((impl, op), []).append((us, n))
                        self.progress.advance()
                for (impl, op), vals in samples.items():
                    runs = [v for v, _ in vals]
                    self.results.sweep.append(
                        SweepPoint(
                            impl, count, op, statistics.median(runs), sum(n for _, n in vals),
                            runs=runs,
                        )
                    )  # fmt: skip
        finally:
            # every one closed even if closing one fails or a second Ctrl-C comes
            _close_all(
                [lambda t=t: close_target(t) for t in targets.values()]
                + [w.close for w in workers.values()]
            )


def _close_all(closers: list[Callable[[], None]]) -> None:
    """Call every closer; the first exception (KeyboardInterrupt included) is raised
    after all of them ran."""
    first: BaseException | None = None
    for close in closers:
        try:
            close()
        except BaseException as exc:  # re-raised below
            first = first or exc
    if first is not None:
        raise first


def time_ops(
    t: RegionTarget, count: int, base: int, step: int, duration: float
) -> list[tuple[str, float, int]]:
    """Time the sweep's four operations on ``t`` with ``count`` slots present (laid out
    by the sweep: slot i at ``MEM_GPA + i * step``, hva ``base + gpa``), each pair of
    operations repeated for ``duration`` seconds; returns ``(op, microseconds per op,
    operations timed)``."""
    sur = t.set_user_memory_region
    clock = time.perf_counter
    mid = count // 2
    last = count - 1
    size = step
    mgpa = MEM_GPA + mid * step
    lgpa = MEM_GPA + last * step
    away = MEM_GPA + MEM_SIZE
    out: list[tuple[str, float, int]] = []

    def pair(a: Callable[[], None], b: Callable[[], None], same: bool) -> tuple[float, float, int]:
        ta = tb = 0.0
        n = 0
        with _no_gc():
            deadline = clock() + duration
            while True:
                t0 = clock()
                a()
                t1 = clock()
                b()
                t2 = clock()
                ta += t1 - t0
                tb += t2 - t1
                n += 1
                if n >= MIN_PAIRS and t2 >= deadline:
                    break
        if same:
            return (ta + tb) / (2 * n) * 1e6, 0.0, 2 * n
        return ta / n * 1e6, tb / n * 1e6, n

    # delete then re-create the middle slot (its id is reused)
    d_us, c_us, n = pair(
        lambda: sur(mid, 0, 0, 0, 0),
        lambda: sur(mid, 0, mgpa, size, base + mgpa),
        False,
    )
    out += [("create", c_us, n), ("delete", d_us, n)]
    m_us, _, n = pair(
        lambda: sur(last, 0, away, size, base + lgpa),
        lambda: sur(last, 0, lgpa, size, base + lgpa),
        True,
    )
    out.append(("move", m_us, n))
    f_us, _, n = pair(
        lambda: sur(mid, KVM_MEM_LOG_DIRTY_PAGES, mgpa, size, base + mgpa),
        lambda: sur(mid, 0, mgpa, size, base + mgpa),
        True,
    )
    out.append(("flags", f_us, n))
    return out


def engine_worker(impl: str = "tree") -> None:
    """The loop of :class:`~memslots.tools.bench_peers.EngineWorker`'s worker process, on
    a VM of design ``impl`` (``"tree"``, ``"array"`` or ``"vmmemory"``): one JSON request
    per line on stdin, one answer per line on stdout, until stdin ends (the parent
    closed it) or stdout fails (the parent went away); both end it quietly."""
    vm: EngineVm | VmMemoryModel
    if impl == "tree":
        vm = Vm(nr_address_spaces=1)
    elif impl == "array":
        vm = ArrayVm(nr_address_spaces=1)
    else:
        vm = VmMemoryModel()
    present = 0
    for line in sys.stdin:
        msg = json.loads(line)
        try:
            cmd = msg["cmd"]
            if cmd == "hello":
                out: dict[str, Any] = {"compiled": memslots.COMPILED}
            elif cmd == "grow":
                base, step = msg["base"], msg["step"]
                if isinstance(vm, VmMemoryModel):  # from_regions: O(n log n), not O(n^2)
                    vm.preload(
                        [(MEM_GPA + i * step, step, base + MEM_GPA + i * step)
                         for i in range(msg["count"])]
                    )  # fmt: skip
                else:
                    for i in range(present, msg["count"]):
                        gpa = MEM_GPA + i * step
                        vm.set_user_memory_region(i, 0, gpa, step, base + gpa)
                present = max(present, msg["count"])
                out = {}
            elif cmd == "ops":
                ops = time_ops(vm, msg["count"], msg["base"], msg["step"], msg["duration"])
                out = {"ops": ops}
            else:
                out = {"error": f"unknown command {cmd!r}"}
        except Exception as exc:  # reported to the parent, which raises it
            out = {"error": f"{type(exc).__name__}: {exc}"}
        try:
            sys.stdout.write(json.dumps(out) + "\n")
            sys.stdout.flush()
        except OSError:  # the parent went away: end quietly
            with suppress(OSError):
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, sys.stdout.fileno())
            return


@contextmanager
def _pinned(cpu: int | None) -> Iterator[int | None]:
    """Pin the process to ``cpu`` for the duration (if possible); yields the CPU used."""
    if cpu is None or not hasattr(os, "sched_setaffinity"):
        yield None
        return
    before = os.sched_getaffinity(0)
    if cpu not in before:
        yield None
        return
    os.sched_setaffinity(0, {cpu})
    try:
        yield cpu
    finally:
        os.sched_setaffinity(0, before)


def run(cfg: BenchConfig, progress: Progress | None = None) -> BenchResults:
    """Run the configured scenarios and sweep; returns the results with the acceptance
    ratios computed. Raises ValueError for a bad configuration."""
    cfg.validate()
    prog: Progress = progress if progress is not None else _NoProgress()
    results = BenchResults(cfg, machine_info())
    impls, notes = available_impls(cfg.impls)
    results.notes.extend(notes)
    t_start = time.perf_counter()
    with _pinned(cfg.cpu) as cpu:
        results.machine["pinned_cpu"] = cpu
        mem = HostMemory(MEM_SIZE)
        try:
            runner = _Runner(cfg, prog, results)
            runner.scenarios(impls, mem)
            if "sweep" in cfg.scenarios:
                runner.sweep(impls, mem)
        finally:
            mem.close()
    results.seconds = time.perf_counter() - t_start
    results.compute_criteria()
    return results


def plot(results: BenchResults, path: str) -> None:
    """Save a log-log plot of the sweep (microseconds per operation against slots
    present, one panel per operation, one line per implementation) to ``path``.
    Needs matplotlib (the ``plot`` extra); raises ImportError without it."""
    # imported by name: matplotlib is an optional extra (and has no say in type checks)
    matplotlib: Any = importlib.import_module("matplotlib")
    matplotlib.use("Agg")
    plt: Any = importlib.import_module("matplotlib.pyplot")

    impls = [i for i in IMPLS if any(p.impl == i for p in results.sweep)]
    styles = {
        "tree": "o-",
        "pure": "o:",
        "array": "s-",
        "kvm": "^--",
        "ioctl": "v-",
        "vmmemory": "d-.",
        "unicorn": "x-.",
    }
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5), sharex=True, sharey=True)
    for ax, op in zip(axes.flat, OPS, strict=True):
        for impl in impls:
            pts = sorted((p.count, p.us) for p in results.sweep if p.impl == impl and p.op == op)
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, styles.get(impl, "o-"), label=IMPL_LABELS[impl], markersize=4)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(op.upper() if op != "flags" else "FLAGS_ONLY")
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("slots present")
    for ax in axes[:, 0]:
        ax.set_ylabel("µs per operation")
    axes[0][0].legend(loc="upper left", fontsize="small")
    m = results.machine
    fig.suptitle(
        "memslots bench: per-operation cost against slot count "
        f"(Python {m.get('python')}, Linux {m.get('kernel')}, {m.get('cpus')} CPUs)",
        fontsize="medium",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = [
    "DEFAULT_COUNTS",
    "IMPLS",
    "MEM_GPA",
    "MEM_SIZE",
    "OPS",
    "QUICK_SLOTS",
    "SCENARIOS",
    "BenchConfig",
    "BenchResults",
    "Progress",
    "ScenarioResult",
    "SweepPoint",
    "invalidate_hva_range",
    "machine_info",
    "perf_layout",
    "plot",
    "run",
]
