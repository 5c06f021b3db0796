"""Harvest cost: the dirty ring against ``KVM_GET_DIRTY_LOG`` of bitmaps, for the same
dirty pages (``memslots bench --dirty``, ``benchmarks/bench_dirty_guest.py``).

Two dirty sets, as a VMM sees them at one sync of a live migration:

- ``1 slot``: one 2^20-page (4 GiB) slot with 1% of its pages dirty (every 100th page:
  10486 pages);
- ``1000 slots``: a thousand 16-page slots with every 5th page dirty (3200 pages, 3 or 4
  per slot).

For each, the time from "the pages are dirty" to "the VMM holds every dirty
``(slot, page)`` and tracking is re-armed":

- **bitmap**: ``KVM_GET_DIRTY_LOG`` of every slot, then listing the set bits
  (:func:`memslots.dirty_log.dirty_pages`);
- **ring**: harvesting every vCPU's ring (:meth:`memslots.dirty_ring.DirtyRing.harvest`),
  then ``KVM_RESET_DIRTY_RINGS``.

On the engine (:class:`memslots.Vm`) the pages are dirtied with ``mark_page_dirty`` (a
vCPU's for the ring); on the kernel (a bare VM fd, when ``/dev/kvm`` is usable) by the
stride-writer guest running on a vCPU, each repetition dirtying them again. Dirtying is
not timed. Every number is the median of ``repeats`` runs (each run's time is kept in
``DirtyBenchResult.runs``).
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Final

from memslots.constants import KVM_MEM_LOG_DIRTY_PAGES, PAGE_SIZE
from memslots.dirty_log import dirty_bitmap_bytes, dirty_pages
from memslots.dirty_ring import DirtyRing
from memslots.guest_memory import HostMemory
from memslots.vm import Vm

if TYPE_CHECKING:
    from memslots.tools.bench import Progress

__all__ = ["SCENARIOS", "DirtyBenchResult", "Scenario", "run"]

LOG: Final = KVM_MEM_LOG_DIRTY_PAGES
_HVA: Final = 0x100000000000  # engine slots: no memory behind them, never accessed
_CODE_GPA: Final = 0x1000


@dataclass(frozen=True)
class Scenario:
    """``nslots`` slots of ``npages`` pages from gpa ``first_gpa`` (slot ids from
    ``first_id``); every ``stride``-th page over all of them is dirty."""

    name: str
    nslots: int
    npages: int
    stride: int
    first_gpa: int
    first_id: int

    def slots(self) -> list[tuple[int, int]]:
        """``(slot id, base gfn)`` of every slot."""
        base = self.first_gpa // PAGE_SIZE
        return [(self.first_id + i, base + i * self.npages) for i in range(self.nslots)]

    def dirty(self) -> list[tuple[int, int]]:
        """Every dirty ``(slot id, page in the slot)``, in write order."""
        total = self.nslots * self.npages
        return [
            (self.first_id + p // self.npages, p % self.npages)
            for p in range(0, total, self.stride)
        ]

    def ring_bytes(self) -> int:
        """The smallest ring whose soft limit holds every dirty page."""
        entries = 256
        while entries - 64 < len(self.dirty()):
            entries *= 2
        return entries * 16


#: the scenarios: one big slot at gpa 0 (the guest's code lives in its page 1), and a
#: thousand small ones from 1 MiB (the code in a slot of its own below them)
SCENARIOS: Final = (
    Scenario("1 slot, 1% of 2^20 pages", 1, 1 << 20, 100, 0, 1),
    Scenario("1000 slots x 3-4 pages", 1000, 16, 5, 1 << 20, 1),
)


@dataclass
class DirtyBenchResult:
    """Seconds per harvest (the median of the repetitions), per scenario and method."""

    repeats: int
    #: ``{scenario: {"dirty_pages": n, "engine_bitmap_s": t, "engine_ring_s": t,
    #: "kernel_bitmap_s": t, "kernel_ring_s": t, ...}}`` (kernel keys only with /dev/kvm)
    scenarios: dict[str, dict[str, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: ``{scenario: {"engine_bitmap_s": [t, ...], ...}}``: every repetition's time
    runs: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of the whole run."""
        return asdict(self)


def _times(fn: Callable[[], object], repeats: int, setup: Callable[[], object]) -> list[float]:
    """Each of ``repeats`` timed runs of ``fn`` (``setup`` before each, not timed), after
    one untimed warm-up run, with the cyclic garbage collector off while timing (as
    timeit does: a collection of the harvested lists would land in one run)."""
    setup()
    fn()
    times = []
    was = gc.isenabled()
    try:
        for _ in range(repeats):
            setup()
            gc.collect()
            gc.disable()
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
            gc.enable()
    finally:
        if was:
            gc.enable()
        else:
            gc.disable()
    return times


def _check(got: list[tuple[int, int]], expected: list[tuple[int, int]], what: str) -> None:
    """A harvest must find exactly the pages dirtied (else the numbers mean nothing)."""
    if sorted(got) != expected:
        raise RuntimeError(f"{what}: {len(got)} entries, {len(expected)} pages dirtied")


def _bitmap_harvest(get: Callable[[int], bytes], slots: list[int]) -> list[tuple[int, int]]:
    """GET every slot's log and list its pages: what a bitmap VMM does per sync."""
    out: list[tuple[int, int]] = []
    for slot in slots:
        out.extend((slot, p) for p in dirty_pages(get(slot)))
    return out


# ======================================================================================
# The engine
# ======================================================================================
def _engine(sc: Scenario, repeats: int) -> dict[str, list[float]]:
    slots = sc.slots()
    ids = [i for i, _ in slots]
    expected = sorted(sc.dirty())
    size = sc.npages * PAGE_SIZE
    out: dict[str, list[float]] = {}

    vm = Vm()
    for i, base in slots:
        vm.set_user_memory_region(i, LOG, base * PAGE_SIZE, size, _HVA + base * PAGE_SIZE)
    gfns = [slots[i - sc.first_id][1] + p for i, p in sc.dirty()]
    got: list[list[tuple[int, int]]] = []

    def dirty_bitmaps() -> None:
        for g in gfns:
            vm.mark_page_dirty(g)

    def bitmap() -> None:
        got.append(_bitmap_harvest(vm.get_dirty_log, ids))

    out["engine_bitmap_s"] = _times(bitmap, repeats, dirty_bitmaps)
    _check(got[-1], expected, "engine bitmap harvest lost pages")

    vm = Vm()
    vm.enable_dirty_ring(sc.ring_bytes())
    for i, base in slots:
        vm.set_user_memory_region(i, LOG, base * PAGE_SIZE, size, _HVA + base * PAGE_SIZE)
    vcpu = vm.create_vcpu(0)

    def dirty_ring() -> None:
        for g in gfns:
            vcpu.mark_page_dirty(g)

    def ring() -> None:
        got.append(vcpu.harvest_dirty_ring())
        vm.reset_dirty_rings()

    out["engine_ring_s"] = _times(ring, repeats, dirty_ring)
    _check(got[-1], expected, "engine ring harvest lost pages")
    return out


# ======================================================================================
# The kernel
# ======================================================================================
class _KernelRig:
    """A bare VM on /dev/kvm with the scenario's slots over one host mapping and the
    stride writer on a vCPU that dirties the scenario's pages."""

    def __init__(self, sc: Scenario, ring_bytes: int) -> None:
        from memslots.kvm.abi import KvmSystem
        from memslots.kvm.guests import STRIDE_WRITER
        from memslots.kvm.vcpu import KvmVcpu

        self.sc = sc
        self.system = KvmSystem()
        self.vm = self.system.create_vm()
        if ring_bytes:
            self.vm.enable_cap(192, ring_bytes)  # KVM_CAP_DIRTY_LOG_RING
        size = sc.nslots * sc.npages * PAGE_SIZE
        self.mem = HostMemory(size)
        self.code: HostMemory | None = None
        if sc.first_gpa:  # the code in a slot of its own
            self.code = HostMemory(0x10000)
            self.code.write(_CODE_GPA, STRIDE_WRITER)
            self.vm.set_user_memory_region(0, 0, 0, self.code.size, self.code.addr)
        else:
            self.mem.write(_CODE_GPA, STRIDE_WRITER)
        slot_bytes = sc.npages * PAGE_SIZE
        for k, (i, base) in enumerate(sc.slots()):
            hva = self.mem.addr + k * slot_bytes
            self.vm.set_user_memory_region(i, LOG, base * PAGE_SIZE, slot_bytes, hva)
        self.vcpu = KvmVcpu(self.vm, 0)
        self.ring: DirtyRing | None = None
        if ring_bytes:
            self.ring = DirtyRing(ring_bytes, self.vcpu.map_dirty_ring(ring_bytes))

    def dirty(self) -> None:
        """The guest writes a word into every ``stride``-th page (from offset 0x800)."""
        from memslots.kvm.guests import stride_writer_args

        sc = self.sc
        count = len(sc.dirty())
        a = stride_writer_args(sc.first_gpa + 0x800, count, stride=sc.stride * PAGE_SIZE)
        self.vcpu.setup_real_mode(
            _CODE_GPA, regs=a.regs, segments=a.segments, big_real_mode=a.big_real_mode
        )
        reports: list[int] = []
        result = self.vcpu.run_until_hlt(on_io=lambda io: reports.append(io.value), timeout=60)
        if not result.halted or reports != [count]:
            raise RuntimeError(f"the guest did not write the {count} pages: {result}")

    def close(self) -> None:
        if self.ring is not None:
            self.ring.release()
        self.vcpu.close()
        self.vm.close()
        self.system.close()
        self.mem.close()
        if self.code is not None:
            self.code.close()


def _kernel(sc: Scenario, repeats: int) -> dict[str, list[float]]:
    ids = [i for i, _ in sc.slots()]
    expected = sorted(sc.dirty())
    nbytes = dirty_bitmap_bytes(sc.npages)
    out: dict[str, list[float]] = {}
    got: list[list[tuple[int, int]]] = []

    rig = _KernelRig(sc, 0)
    try:

        def bitmap() -> None:
            got.append(_bitmap_harvest(lambda s: rig.vm.get_dirty_log(s, nbytes), ids))

        out["kernel_bitmap_s"] = _times(bitmap, repeats, rig.dirty)
        _check(got[-1], expected, "kernel bitmap harvest lost pages")
    finally:
        rig.close()

    rig = _KernelRig(sc, sc.ring_bytes())
    try:
        ring = rig.ring
        if ring is None:  # pragma: no cover - _KernelRig maps it with ring_bytes
            raise RuntimeError("no ring mapped")

        def harvest() -> None:
            got.append(ring.harvest())
            rig.vm.reset_dirty_rings()

        out["kernel_ring_s"] = _times(harvest, repeats, rig.dirty)
        _check(got[-1], expected, "kernel ring harvest lost pages")
    finally:
        rig.close()
    return out


def run(
    repeats: int = 5, *, kernel: bool | None = None, progress: Progress | None = None
) -> DirtyBenchResult:
    """Measure every scenario on the engine and (``kernel`` None: when /dev/kvm is
    usable) on the kernel. Takes a few seconds per repetition with the kernel.
    ``progress`` (a :class:`memslots.tools.bench.Progress`) hears of each step."""
    from memslots.kvm.abi import kvm_unavailable

    if not 1 <= repeats <= 1000:
        raise ValueError(f"repetitions must be in 1..1000, not {repeats}")
    result = DirtyBenchResult(repeats)
    if kernel is None:
        unavailable = kvm_unavailable()
        kernel = unavailable is None
        if unavailable is not None:
            result.notes.append(f"engine only: {unavailable}")
    elif not kernel:
        result.notes.append("engine only: the kernel was not asked")
    if progress is not None:
        progress.phase("dirty-page harvest", len(SCENARIOS) * (2 if kernel else 1))
    for sc in SCENARIOS:
        r: dict[str, float] = {"dirty_pages": len(sc.dirty()), "slots": sc.nslots}
        runs = _engine(sc, repeats)
        if progress is not None:
            progress.advance()
        if kernel:
            runs.update(_kernel(sc, repeats))
            if progress is not None:
                progress.advance()
        r.update({key: statistics.median(times) for key, times in runs.items()})
        result.scenarios[sc.name] = r
        result.runs[sc.name] = runs
    return result
