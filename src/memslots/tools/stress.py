"""Concurrent stress checking: readers that check every answer against the history of
published states while a writer changes slots, injects faults and checks what is left.

The pieces are reusable (tests/test_stress.py, tests/test_faults_concurrent.py and
``memslots stress`` use them):

:class:`HistoryVm`
    a :class:`~memslots.vm.Vm` that records every publish through the engine's
    ``publish_observer`` hook: it snapshots the set about to be published and takes a
    sequence number before the publish and after the grace period. Sequence numbers come from one
    ``itertools.count`` shared by the writer and the readers (``next()`` on it is atomic),
    so they order events consistently with the threads' execution.
:class:`History`
    the published states of one address space. Version ``k`` (a snapshot) is the active
    set from somewhere inside swap ``k`` to somewhere inside swap ``k + 1``, so it was
    active only within ``[start_k, end_(k+1)]``.
:class:`Reader`
    a reader thread's checks. Each check takes ``t0 = next(seq)``, makes one reader call,
    takes ``t1 = next(seq)`` and requires the answer to agree with a version that was
    active at some moment of ``[t0, t1]``: for a gfn lookup, the slot the version holds at
    that gfn, the very same object (INVALID copies are published versions too), or None
    for a hole; for a read section that holds a set, the whole set (same objects, same
    order) and every index of it (gfn iteration, hva iteration, id map, lookups, length)
    agreeing with the others and staying unchanged while held.
:class:`RandomWriter`
    random create/delete/move/flags/no-op/invalid requests through
    ``set_user_memory_region`` against a model of the slots, each with its expected
    result and errno; optionally an injected fault before a request, after which the
    state must be as the kernel's ``kvm_set_memslot`` leaves it: same slot objects, the
    generation advanced by ``2 * nr_address_spaces`` for a DELETE/MOVE that failed in
    prepare and unchanged otherwise, no leaked dirty bitmap (``vm.check_invariants()``).
:func:`run_stress`
    readers plus one writer for a number of seconds, returning a :class:`StressReport`.

Soundness of the history check: under the GIL every bytecode of every thread runs in one
global order. A reader's answer comes from the set it loaded at some moment ``tau`` of its
call (for a vCPU cache hit, the set whose generation matched, see
:meth:`memslots.vm.Vcpu.gfn_to_memslot`), ``t0 < tau < t1``; that set is version ``k``
with ``start_k < tau < end_(k+1)``, so a correct engine never fails the check. Memory is
bounded: the writer drops versions that every in-flight reader call began after.
"""

from __future__ import annotations

import errno as _errno
import itertools
import random
import sys
import threading
import time
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from memslots.constants import (
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
    KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS,
    PAGE_SHIFT,
    PAGE_SIZE,
    U64_MAX,
)
from memslots.errors import MemslotError, errno_name
from memslots.faults import POINTS
from memslots.memslot_set import MemslotSet
from memslots.slot import Memslot
from memslots.validate import Change
from memslots.vm import Vcpu, Vm

_BIT = KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS
_INF = float("inf")
#: answers of :meth:`History.find`
FOUND, NOT_FOUND, LOST = 1, 0, -1

#: where the writer puts slots: gfns below this, hvas in a pool this many pages long
GFN_SPACE = 1 << 13
HVA_BASE = 0x7F00_0000_0000
HVA_POOL_PAGES = 1 << 10
MAX_SLOT_PAGES = 64
#: seconds :func:`run_stress` waits for each thread to stop once the run is over
JOIN_TIMEOUT = 30.0


def same_objects(a: Sequence[object], b: Sequence[object]) -> bool:
    """True when ``a`` and ``b`` hold the very same objects in the same order. O(n)."""
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


# ======================================================================================
# The history of published states
# ======================================================================================
class Version:
    """One published state of an address space: the slots (ascending base_gfn) and the
    sequence numbers taken before (``start``) and after (``end``, None while the swap is
    in flight) the swap that published it."""

    __slots__ = ("bases", "end", "slots", "start")

    def __init__(self, start: int, slots: tuple[Memslot, ...]) -> None:
        self.start = start
        self.end: int | None = None
        self.slots = slots
        self.bases = [s.base_gfn for s in slots]

    def slot_at(self, gfn: int) -> Memslot | None:
        """The slot of this version holding ``gfn``, or None. O(log n)."""
        i = bisect_right(self.bases, gfn) - 1
        if i >= 0:
            s = self.slots[i]
            if gfn < s.base_gfn + s.npages:
                return s
        return None


class History:
    """The versions of one address space, by number; written by the writer only, read by
    readers concurrently (dict stores and loads are atomic under the GIL)."""

    __slots__ = ("first", "last", "versions")

    def __init__(self, initial: tuple[Memslot, ...]) -> None:
        v = Version(0, initial)
        v.end = 0
        self.versions: dict[int, Version] = {0: v}
        self.first = 0
        self.last = 0

    def record(self, start: int, slots: tuple[Memslot, ...]) -> Version:
        """Add the version a swap is about to publish (before it is published). O(n)."""
        v = Version(start, slots)
        k = self.last + 1
        self.versions[k] = v
        self.last = k
        return v

    def find(self, t0: int, t1: int, pred: Callable[[Version], bool]) -> int:
        """:data:`FOUND` if a version active at some moment of ``[t0, t1]`` satisfies
        ``pred``, :data:`NOT_FOUND` if none does, :data:`LOST` if a version that might
        have was already pruned. O(number of versions overlapping the interval)."""
        k = self.last
        bound: float = _INF  # end of the swap that replaced version k
        while True:
            v = self.versions.get(k)
            if v is None:
                return LOST
            if v.start < t1 and t0 < bound and pred(v):
                return FOUND
            e = v.end
            bound = _INF if e is None else e
            if bound <= t0:
                return NOT_FOUND
            k -= 1

    def prune(self, before: int) -> int:
        """Drop versions replaced by a swap that ended before ``before``; returns how many.
        Amortised O(1) per version."""
        n = 0
        k = self.first
        versions = self.versions
        while k < self.last:
            nxt = versions[k + 1]
            if nxt.end is None or nxt.end >= before:
                break
            del versions[k]
            k += 1
            n += 1
        self.first = k
        return n

    def __len__(self) -> int:
        return len(self.versions)


class HistoryVm(Vm):
    """A :class:`~memslots.vm.Vm` that records every published state (see the module
    docstring): it is its own ``publish_observer`` (:class:`memslots.vm_api.PublishObserver`).
    Same constructor; adds ``seq`` (the shared sequence), ``histories`` (one
    :class:`History` per address space), ``swaps`` and ``swap_serial`` (odd while a swap,
    i.e. a publish and its grace period, is in flight)."""

    #: record a pruning pass every this many swaps
    PRUNE_EVERY = 256

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seq = itertools.count(1)
        self.histories = [History(tuple(s)) for s in self._memslots]
        self.swaps = 0
        self.swap_serial = 0
        #: per registered reader: a sequence number taken before its current call
        #: (None when idle); versions still needed by that call are kept
        self.reader_marks: list[int | None] = []
        self.pruned = 0
        self._recording: Version | None = None
        self.publish_observer = self

    def add_reader_mark(self) -> int:
        """Reserve a mark slot for a reader; returns its index."""
        self.reader_marks.append(None)
        return len(self.reader_marks) - 1

    def publishing(self, as_id: int, slots: MemslotSet) -> None:
        """Record the version about to be published (with the sequence number before
        the publish)."""
        self._recording = self.histories[as_id].record(next(self.seq), tuple(slots))
        self.swap_serial += 1

    def published(self, as_id: int, slots: MemslotSet) -> None:
        """Close the version's publishing swap (the sequence number after its grace
        period); prune the history now and then."""
        v = self._recording
        assert v is not None, "published() without publishing()"
        self._recording = None
        self.swap_serial += 1
        v.end = next(self.seq)
        self.swaps += 1
        if not self.swaps % self.PRUNE_EVERY:
            self.prune_history()

    def prune_history(self) -> None:
        """Drop versions no in-flight reader call can need. O(pruned + readers)."""
        before = next(self.seq)
        for m in list(self.reader_marks):
            if m is not None and m < before:
                before = m
        for h in self.histories:
            self.pruned += h.prune(before)


# ======================================================================================
# What a reader holding a set sees
# ======================================================================================
@dataclass
class SetObservation:
    """Everything one read section read from one set: ``slots`` (iteration) at the
    start and ``slots_after`` at the end, ``length``, ``by_gfn`` (``iter_gfn_range(gfn,
    end)``), ``by_hva`` (``iter_hva_range(hva, hva_last)``), ``all_by_hva`` (the whole hva
    tree), ``by_id`` (``id_to_memslot`` of every slot), ``probe`` (``gfn_to_memslot(gfn)``),
    ``first``/``last`` and the generation at the start and the end."""

    gfn: int
    end: int
    hva: int
    hva_last: int
    slots: tuple[Memslot, ...]
    slots_after: tuple[Memslot, ...]
    length: int
    by_gfn: list[Memslot]
    by_hva: list[Memslot]
    all_by_hva: list[Memslot]
    by_id: list[Memslot | None]
    probe: Memslot | None
    first: Memslot | None
    last: Memslot | None
    generation: int
    generation_after: int


def observe_set(
    s: MemslotSet,
    gfn: int,
    end: int,
    hva: int,
    hva_last: int,
    hold: Callable[[], None] | None = None,
) -> SetObservation:
    """Read ``s`` every way its API offers (call it inside a read section). O(n log n)."""
    generation = s.generation
    slots = tuple(s)
    length = len(s)
    by_gfn = list(s.iter_gfn_range(gfn, end))
    by_hva = list(s.iter_hva_range(hva, hva_last))
    all_by_hva = list(s.iter_hva_range(0, U64_MAX))
    by_id = [s.id_to_memslot(x.id) for x in slots]
    probe = s.gfn_to_memslot(gfn)
    first, last = s.first(), s.last()
    if hold is not None:
        hold()
    return SetObservation(
        gfn, end, hva, hva_last, slots, tuple(s), length, by_gfn, by_hva, all_by_hva, by_id,
        probe, first, last, generation, s.generation,
    )  # fmt: skip


def set_problems(obs: SetObservation, as_id: int, nr_address_spaces: int) -> list[str]:
    """What is inconsistent in ``obs`` (empty when the indexes agree with each other and
    nothing changed while the set was held). O(n log n)."""
    bad: list[str] = []
    full = obs.slots
    if not same_objects(obs.slots_after, full):
        bad.append("changed while held in a read section")
    if obs.length != len(full):
        bad.append(f"len() = {obs.length} but iteration gives {len(full)} slots")
    for a, b in itertools.pairwise(full):
        if a.base_gfn + a.npages > b.base_gfn:
            bad.append(f"gfn order or overlap broken: {a!r} then {b!r}")
    for x, y in zip(full, obs.by_id, strict=True):
        if x.as_id != as_id:
            bad.append(f"slot of address space {x.as_id} in the set: {x!r}")
        if y is not x:
            bad.append(f"id map gives {y!r} for {x!r}")
    gfn, end = obs.gfn, obs.end
    expect = [x for x in full if x.base_gfn < end and gfn < x.base_gfn + x.npages]
    if not same_objects(obs.by_gfn, expect):
        bad.append(f"iter_gfn_range({gfn:#x}, {end:#x}) = {obs.by_gfn}, expected {expect}")
    hva_order = sorted(full, key=lambda x: (x.userspace_addr, x.id))
    if not same_objects(obs.all_by_hva, hva_order):
        bad.append(f"hva tree {obs.all_by_hva} disagrees with the gfn index {hva_order}")
    hva, hva_last = obs.hva, obs.hva_last
    expect = [x for x in hva_order if x.userspace_addr <= hva_last and x.hva_last >= hva]
    if not same_objects(obs.by_hva, expect):
        bad.append(f"iter_hva_range({hva:#x}, {hva_last:#x}) = {obs.by_hva}, expected {expect}")
    holder = [x for x in full if x.base_gfn <= gfn < x.base_gfn + x.npages]
    if obs.probe is not (holder[0] if holder else None):
        bad.append(f"gfn_to_memslot({gfn:#x}) = {obs.probe!r}, expected {holder}")
    if obs.first is not (full[0] if full else None) or obs.last is not (full[-1] if full else None):
        bad.append("first()/last() disagree with iteration")
    g1, g2 = obs.generation & ~_BIT, obs.generation_after & ~_BIT
    if g1 % nr_address_spaces != as_id or g2 % nr_address_spaces != as_id:
        bad.append(f"generation {obs.generation:#x} is not one of address space {as_id}")
    if g2 < g1:
        bad.append(f"generation went back from {g1:#x} to {g2:#x} while held")
    return bad


# ======================================================================================
# Readers
# ======================================================================================
@dataclass
class ReaderStats:
    """What one reader did and found."""

    vm_lookups: int = 0
    vcpu_lookups: int = 0
    range_checks: int = 0
    #: calls that began and ended inside one writer swap (publish + grace period)
    during_swap: int = 0
    violations: int = 0
    lost: int = 0
    messages: list[str] = field(default_factory=list)
    max_latency_ns: int = 0
    #: latency histogram: bucket i counts calls with ``2**(i-1) <= ns < 2**i``
    latency_log2: list[int] = field(default_factory=lambda: [0] * 48)

    @property
    def lookups(self) -> int:
        """All checked reader calls."""
        return self.vm_lookups + self.vcpu_lookups + self.range_checks


class Reader:
    """The checks of one reader thread (a vCPU of its own, random gfns and ranges).

    ``run(stop)`` loops until ``stop`` is set; every method ``check_*`` makes one reader
    call and checks it (complexity: that of the call plus O(k log n) for the k versions
    overlapping it; a range check is O(n) in the slots of the set).
    """

    #: messages kept per reader (the count is exact)
    MAX_MESSAGES = 20

    def __init__(self, vm: HistoryVm, index: int, seed: int) -> None:
        self.vm = vm
        self.index = index
        self.rng = random.Random(seed)
        self.vcpu: Vcpu = vm.create_vcpu(index)
        self.mark = vm.add_reader_mark()
        self.stats = ReaderStats()
        self.last_gen = [-1] * vm.nr_address_spaces

    # --- bookkeeping --------------------------------------------------------------------
    def violation(self, msg: str) -> None:
        """Count a violation and keep its message (the first few)."""
        self.stats.violations += 1
        if len(self.stats.messages) < self.MAX_MESSAGES:
            self.stats.messages.append(f"reader {self.index}: {msg}")

    def _latency(self, ns: int) -> None:
        st = self.stats
        if ns > st.max_latency_ns:
            st.max_latency_ns = ns
        st.latency_log2[min(ns.bit_length(), 47)] += 1

    def _find(self, as_id: int, t0: int, t1: int, pred: Callable[[Version], bool]) -> int:
        r = self.vm.histories[as_id].find(t0, t1, pred)
        if r == LOST:
            self.stats.lost += 1
        return r

    # --- the checks ---------------------------------------------------------------------
    def check_vm_lookup(self, gfn: int) -> None:
        """``vm.gfn_to_memslot(gfn)`` (address space 0) against the history."""
        self.stats.vm_lookups += 1
        self._check_lookup(0, gfn, self.vm.gfn_to_memslot, "vm.gfn_to_memslot({gfn:#x})")

    def check_vcpu_lookup(self, gfn: int) -> None:
        """``vcpu.gfn_to_memslot(gfn)`` in the vCPU's address space against the history."""
        self.stats.vcpu_lookups += 1
        as_id = self.vcpu.as_id
        what = "vcpu.gfn_to_memslot({gfn:#x}) in as {as_id}"
        self._check_lookup(as_id, gfn, self.vcpu.gfn_to_memslot, what)

    def _check_lookup(
        self, as_id: int, gfn: int, lookup: Callable[[int], Memslot | None], what: str
    ) -> None:
        """Time one lookup between two history marks and check that its answer was
        published for ``gfn`` in ``as_id`` at some point between them; ``what`` names
        the call in a violation (``{gfn}`` and ``{as_id}`` are filled in)."""
        vm = self.vm
        seq = vm.seq
        vm.reader_marks[self.mark] = next(seq)
        serial = vm.swap_serial
        t0 = next(seq)
        p0 = time.perf_counter_ns()
        got = lookup(gfn)
        p1 = time.perf_counter_ns()
        t1 = next(seq)
        if serial & 1 and vm.swap_serial == serial:
            self.stats.during_swap += 1
        self._latency(p1 - p0)
        if self._find(as_id, t0, t1, lambda v: v.slot_at(gfn) is got) == NOT_FOUND:
            self.violation(f"{what.format(gfn=gfn, as_id=as_id)} = {got!r}: never published there")
        vm.reader_marks[self.mark] = None

    def check_range(
        self,
        as_id: int,
        gfn: int,
        npages: int,
        hva: int,
        hva_len: int,
        hold: Callable[[], None] | None = None,
    ) -> None:
        """Hold the active set of ``as_id`` in a read section and read it every way (see
        :func:`observe_set`; ``hold()`` runs in the middle, for tests). Checks that the
        indexes agree, that nothing changed while held, that the generation never goes
        back, and that the set is a published version."""
        vm = self.vm
        seq = vm.seq
        vm.reader_marks[self.mark] = next(seq)
        serial = vm.swap_serial
        t0 = next(seq)
        p0 = time.perf_counter_ns()
        with vm.read_section():
            obs = observe_set(vm.memslots(as_id), gfn, gfn + npages, hva, hva + hva_len - 1, hold)
        p1 = time.perf_counter_ns()
        t1 = next(seq)
        if serial & 1 and vm.swap_serial == serial:
            self.stats.during_swap += 1
        self._latency(p1 - p0)
        self.stats.range_checks += 1
        bad = set_problems(obs, as_id, vm.nr_address_spaces)
        g1, g2 = obs.generation & ~_BIT, obs.generation_after & ~_BIT
        if g1 < self.last_gen[as_id]:
            bad.append(f"generation went back from {self.last_gen[as_id]:#x} to {g1:#x}")
        self.last_gen[as_id] = max(self.last_gen[as_id], g2)
        for msg in bad:
            self.violation(f"set of as {as_id}: {msg}")
        full = obs.slots
        if (
            not bad
            and self._find(as_id, t0, t1, lambda v: same_objects(v.slots, full)) == NOT_FOUND
        ):
            self.violation(f"set of as {as_id}: these slots were never published together: {full}")
        vm.reader_marks[self.mark] = None

    # --- the loop -----------------------------------------------------------------------
    def step(self) -> None:
        """One random check (4 in 10 VM lookups, 4 in 10 vCPU lookups, 2 in 10 range
        checks); an exception raised by the engine is a violation."""
        rng = self.rng
        r = rng.random()
        gfn = rng.randrange(GFN_SPACE + MAX_SLOT_PAGES)
        try:
            if r < 0.4:
                self.check_vm_lookup(gfn)
            elif r < 0.8:
                if rng.random() < 0.01:
                    self.vcpu.as_id = rng.randrange(self.vm.nr_address_spaces)
                self.check_vcpu_lookup(gfn)
            else:
                as_id = rng.randrange(self.vm.nr_address_spaces)
                npages = rng.randrange(1, 512)
                hva = HVA_BASE + (rng.randrange(HVA_POOL_PAGES + MAX_SLOT_PAGES) << PAGE_SHIFT)
                hva_len = rng.randrange(1, 128) << PAGE_SHIFT
                self.check_range(as_id, gfn, npages, hva, hva_len)
        except Exception as exc:  # the point: readers must never raise
            self.violation(f"raised {type(exc).__name__}: {exc}")
            self.vm.reader_marks[self.mark] = None

    def run(self, stop: threading.Event) -> None:
        """Check until ``stop`` is set."""
        step = self.step
        while not stop.is_set():
            for _ in range(64):
                step()


# ======================================================================================
# The writer
# ======================================================================================
@dataclass
class WriterStats:
    """What the writer did and found."""

    ops: dict[str, int] = field(default_factory=dict)
    #: requests that failed with the expected errno (invalid ones, overlaps)
    expected_errors: int = 0
    #: faults armed before a request, by point (armed faults that the request does not
    #: pass through are disarmed unfired)
    armed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(POINTS, 0))
    #: injected faults that fired, by point
    faults: dict[str, int] = field(default_factory=lambda: dict.fromkeys(POINTS, 0))
    callback_calls: int = 0
    callback_raises: int = 0
    state_checks: int = 0
    violations: int = 0
    messages: list[str] = field(default_factory=list)
    max_op_ns: int = 0
    total_op_ns: int = 0

    @property
    def operations(self) -> int:
        """All requests made."""
        return sum(self.ops.values())


#: (base_gfn, npages, flags, userspace_addr) of a modelled slot
_Model = tuple[int, int, int, int]


@dataclass
class _Request:
    """One ``set_user_memory_region`` call and what it must do: ``change`` (None: fail
    with ``err``); ``old`` is the modelled slot it targets, if any."""

    kind: str
    slot: int
    flags: int
    gpa: int
    size: int
    hva: int
    change: Change | None
    err: int = 0
    old: _Model | None = None

    @property
    def as_id(self) -> int:
        """The address space of the request."""
        return self.slot >> 16

    @property
    def id(self) -> int:
        """The slot id of the request."""
        return self.slot & 0xFFFF


def generation_delta(change: Change, failed_in_prepare: bool, nr_address_spaces: int) -> int:
    """How much a request moves its address space's active generation
    (``kvm_swap_active_memslots``):
    ``nr_address_spaces`` per swap; CREATE and FLAGS_ONLY swap once, DELETE and MOVE twice
    (also when they fail in prepare, which swaps the INVALID copy in and out); a request
    that fails before ``kvm_set_memslot`` or a CREATE/FLAGS_ONLY failing in prepare: 0."""
    if change in (Change.DELETE, Change.MOVE):
        return 2 * nr_address_spaces
    if change in (Change.CREATE, Change.FLAGS_ONLY) and not failed_in_prepare:
        return nr_address_spaces
    return 0


def fault_reached(point: str, change: Change, new_flags: int, old: _Model | None) -> bool:
    """Whether a request making ``change`` passes through fault ``point`` (an
    ``invalidate_callback`` point also needs a registered callback)."""
    if change is Change.NONE:
        return False
    if point == "kzalloc_new":
        return change is not Change.DELETE
    if point in ("kzalloc_invalid", "invalidate_callback"):
        return change in (Change.DELETE, Change.MOVE)
    if point == "dirty_bitmap":
        return (
            change is not Change.DELETE
            and bool(new_flags & KVM_MEM_LOG_DIRTY_PAGES)
            and (old is None or not old[2] & KVM_MEM_LOG_DIRTY_PAGES)
        )
    if point == "arch_prepare":
        return True
    raise ValueError(point)


class RandomWriter:
    """Random requests with known expected outcomes (see the module docstring).

    ``step()`` makes one request and checks it: O(log n) for the request plus O(n) for
    the before/after comparison of a failed one. ``check_state()`` compares the whole VM
    with the model, O(n). Registers two invalidation callbacks: one that checks the
    INVALID copy is what readers see when it runs, and one that raises on every third
    call (the engine must record it and complete the update).
    """

    MAX_MESSAGES = 20

    def __init__(
        self,
        vm: Vm,
        seed: int,
        *,
        max_slots: int = 16,
        fault_rate: float = 0.05,
        callbacks: bool = True,
        check_every: int = 64,
    ) -> None:
        self.vm = vm
        self.rng = random.Random(seed)
        self.max_slots = max_slots
        self.fault_rate = fault_rate
        self.check_every = check_every
        self.nr = vm.nr_address_spaces
        self.model: list[dict[int, _Model]] = [{} for _ in range(self.nr)]
        self.stats = WriterStats()
        self.callbacks = callbacks
        self._cb_errors_expected = 0
        if callbacks:
            vm.register_invalidate_callback(self._check_invalidation)
            vm.register_invalidate_callback(self._raise_sometimes)

    # --- callbacks ----------------------------------------------------------------------
    def _check_invalidation(self, old: Memslot) -> None:
        self.stats.callback_calls += 1
        seen = self.vm.memslots(old.as_id).id_to_memslot(old.id)
        if seen is None or not seen.invalid or seen.base_gfn != old.base_gfn:
            self.violation(f"invalidation callback for {old!r}: readers see {seen!r}")

    def _raise_sometimes(self, old: Memslot) -> None:
        self.stats.callback_calls += 1
        if self.stats.callback_calls % 3 == 0:
            self.stats.callback_raises += 1
            self._cb_errors_expected += 1
            raise RuntimeError(f"flush of slot {old.slot:#x} failed (test)")

    # --- bookkeeping --------------------------------------------------------------------
    def violation(self, msg: str) -> None:
        """Count a violation and keep its message (the first few)."""
        self.stats.violations += 1
        if len(self.stats.messages) < self.MAX_MESSAGES:
            self.stats.messages.append(f"writer: {msg}")

    def _count(self, kind: str) -> None:
        self.stats.ops[kind] = self.stats.ops.get(kind, 0) + 1

    # --- request generation ---------------------------------------------------------------
    def _overlaps(self, as_id: int, id: int, base: int, npages: int) -> bool:
        for other, (b, n, _f, _h) in self.model[as_id].items():
            if other != id and b < base + npages and base < b + n:
                return True
        return False

    def _random_flags(self) -> int:
        return self.rng.choice((0, 0, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY))

    def next_request(self) -> _Request:
        """A random request and its expected outcome, from the model."""
        rng = self.rng
        as_id = rng.randrange(self.nr)
        model = self.model[as_id]
        kinds = ["create", "invalid"]
        if model:
            kinds += ["delete", "move", "move", "flags", "no-op"]
        if len(model) < self.max_slots:
            kinds += ["create", "create"]
        kind = rng.choice(kinds)
        free = [i for i in range(self.max_slots) if i not in model]
        if kind == "invalid" or (kind == "create" and not free):
            return self._invalid_request(as_id)
        if kind == "create":
            id = rng.choice(free)
            base = rng.randrange(GFN_SPACE // 16) * 16
            npages = rng.randrange(1, MAX_SLOT_PAGES + 1)
            overlap = self._overlaps(as_id, id, base, npages)
            return _Request(
                kind,
                as_id << 16 | id,
                flags=self._random_flags(),
                gpa=base << PAGE_SHIFT,
                size=npages << PAGE_SHIFT,
                hva=HVA_BASE + (rng.randrange(HVA_POOL_PAGES) << PAGE_SHIFT),
                change=None if overlap else Change.CREATE,
                err=_errno.EEXIST if overlap else 0,
            )
        id = rng.choice(list(model))
        old = model[id]
        base, npages, flags, hva = old
        slot = as_id << 16 | id
        gpa, size = base << PAGE_SHIFT, npages << PAGE_SHIFT
        if kind == "delete":
            return _Request(kind, slot, flags, gpa, 0, hva, Change.DELETE, old=old)
        if kind == "flags":
            flags ^= KVM_MEM_LOG_DIRTY_PAGES
            return _Request(kind, slot, flags, gpa, size, hva, Change.FLAGS_ONLY, old=old)
        if kind == "no-op":
            return _Request(kind, slot, flags, gpa, size, hva, Change.NONE, old=old)
        # move, sometimes toggling dirty logging on the way
        nbase = base
        while nbase == base:
            nbase = rng.randrange(GFN_SPACE // 16) * 16
        if rng.random() < 0.25:
            flags ^= KVM_MEM_LOG_DIRTY_PAGES
        overlap = self._overlaps(as_id, id, nbase, npages)
        return _Request(
            kind,
            slot,
            flags,
            nbase << PAGE_SHIFT,
            size,
            hva,
            change=None if overlap else Change.MOVE,
            err=_errno.EEXIST if overlap else 0,
            old=old,
        )

    def _invalid_request(self, as_id: int) -> _Request:
        """A request the kernel refuses with EINVAL before changing anything."""
        rng = self.rng
        model = self.model[as_id]
        choices = ["misaligned", "bad-flags", "bad-as", "delete-missing"]
        if model:
            choices += ["resize", "readonly-toggle", "hva-change"]
        what = rng.choice(choices)
        slot, flags, gpa, size, hva = as_id << 16, 0, 0, PAGE_SIZE, HVA_BASE
        old: _Model | None = None
        if what in ("resize", "readonly-toggle", "hva-change"):
            id = rng.choice(list(model))
            old = model[id]
            base, npages, flags, hva = old
            slot, gpa, size = as_id << 16 | id, base << PAGE_SHIFT, npages << PAGE_SHIFT
            if what == "resize":
                size += PAGE_SIZE
            elif what == "readonly-toggle":
                flags ^= KVM_MEM_READONLY
            else:
                hva += PAGE_SIZE
        elif what == "delete-missing":
            free = [i for i in range(self.max_slots) if i not in model]
            slot, size = as_id << 16 | (rng.choice(free) if free else self.max_slots), 0
        elif what == "bad-as":
            slot = self.nr << 16
        elif what == "bad-flags":
            flags = 1 << 5
        else:
            gpa = PAGE_SIZE // 2
        return _Request("invalid", slot, flags, gpa, size, hva, None, _errno.EINVAL, old=old)

    # --- doing and checking ---------------------------------------------------------------
    def _snapshot(self) -> tuple[list[tuple[Memslot, ...]], list[int], int, int]:
        vm = self.vm
        with vm.read_section():
            sets = [tuple(vm.memslots(a)) for a in range(self.nr)]
            gens = [vm.memslots(a).generation for a in range(self.nr)]
        return sets, gens, vm.nr_memslot_pages, vm.dirty_bitmap_bytes

    def step(self) -> None:
        """Make one random request (with an injected fault now and then) and check it."""
        req = self.next_request()
        point: str | None = None
        if req.change not in (None, Change.NONE) and self.rng.random() < self.fault_rate:
            point = self.rng.choice(POINTS)
        try:
            self.do(req, point)
        except Exception as exc:  # a checker must not die: report and go on
            self.violation(f"{req.kind} {req!r} raised {type(exc).__name__}: {exc}")
            self.vm.faults.clear()
            self.resync()
        if self.check_every and not self.stats.operations % self.check_every:
            self.check_state()

    def do(self, req: _Request, point: str | None = None) -> None:
        """Make ``req`` (with fault ``point`` armed, if given) and check the outcome."""
        vm = self.vm
        st = self.stats
        self._count(req.kind)
        if point is not None:
            st.armed[point] += 1
        before = self._snapshot()
        cb_before = len(vm.callback_errors)
        self._cb_errors_expected = 0
        reached = False
        fault_errno = 0
        hits = 0
        if point is not None:
            assert req.change is not None
            reached = fault_reached(point, req.change, req.flags, req.old)
            if point == "invalidate_callback" and not self.callbacks:
                reached = False
            fault_errno = _errno.ENOMEM
            if point == "arch_prepare":
                fault_errno = self.rng.choice((_errno.ENOMEM, _errno.EINVAL, _errno.EIO))
            vm.faults.inject(point, fault_errno)
            hits = vm.faults.hits[point]
        got: MemslotError | None = None
        p0 = time.perf_counter_ns()
        try:
            vm.set_user_memory_region(req.slot, req.flags, req.gpa, req.size, req.hva)
        except MemslotError as exc:
            got = exc
        finally:
            ns = time.perf_counter_ns() - p0
            st.max_op_ns = max(st.max_op_ns, ns)
            st.total_op_ns += ns
            if point is not None:
                vm.faults.clear()
        fired = point is not None and vm.faults.hits[point] != hits
        if point is not None and fired != reached:
            self.violation(f"fault {point} {'fired' if fired else 'not reached'} on {req!r}")
        if fired:
            assert point is not None
            st.faults[point] += 1
        fails = fired and point != "invalidate_callback"
        if fails:
            assert req.change is not None
            self._check_failed(req, point, fault_errno, got, before)
        elif req.change is None:
            if got is None or got.errno != req.err:
                self.violation(
                    f"{req!r}: expected {errno_name(req.err)}, got "
                    f"{errno_name(got.errno) if got is not None else 'success'}"
                )
                self.resync()
            else:
                st.expected_errors += 1
        elif got is not None:
            self.violation(f"{req!r}: unexpected {errno_name(got.errno)} ({got})")
            self.resync()
        else:
            if vm.last_change is not req.change:
                self.violation(f"{req!r}: engine did {vm.last_change}, expected {req.change}")
            self._apply_model(req)
            delta = generation_delta(req.change, False, self.nr)
            self._check_generations(req, before[1], delta)
        expected_cb = self._cb_errors_expected + (1 if fired and not fails else 0)
        if len(vm.callback_errors) - cb_before != expected_cb:
            self.violation(
                f"{req!r}: {len(vm.callback_errors) - cb_before} callback errors recorded, "
                f"expected {expected_cb}"
            )
        if len(vm.callback_errors) > 1000:
            vm.callback_errors.clear()

    def _check_generations(self, req: _Request, gens: list[int], delta: int) -> None:
        vm = self.vm
        for a in range(self.nr):
            want = gens[a] + (delta if a == req.as_id else 0)
            got = vm.memslots(a).generation
            if got != want:
                self.violation(
                    f"{req!r}: generation of as {a} is {got:#x}, expected {want:#x} "
                    f"(before {gens[a]:#x})"
                )

    def _check_failed(
        self,
        req: _Request,
        point: str | None,
        fault_errno: int,
        got: MemslotError | None,
        before: tuple[list[tuple[Memslot, ...]], list[int], int, int],
    ) -> None:
        """A request failed at an injected fault: the kernel leaves everything as it was
        (the same slot objects) except the generation of a DELETE/MOVE that failed in
        prepare, which advanced by two swaps."""
        assert req.change is not None
        if got is None or got.errno != fault_errno:
            self.violation(f"fault {point} on {req!r}: got {got!r}, expected {fault_errno}")
        sets, _gens, pages, bitmap_bytes = self._snapshot()
        for a in range(self.nr):
            if not same_objects(sets[a], before[0][a]):
                self.violation(f"fault {point} on {req!r}: slots of as {a} changed")
        in_prepare = point in ("dirty_bitmap", "arch_prepare")
        delta = generation_delta(req.change, True, self.nr) if in_prepare else 0
        self._check_generations(req, before[1], delta)
        if pages != before[2]:
            self.violation(f"fault {point} on {req!r}: nr_memslot_pages {before[2]} -> {pages}")
        if bitmap_bytes != before[3]:
            self.violation(
                f"fault {point} on {req!r}: dirty bitmap bytes {before[3]} -> {bitmap_bytes}"
            )
        self.check_state()

    def _apply_model(self, req: _Request) -> None:
        model = self.model[req.as_id]
        if req.change is Change.DELETE:
            del model[req.id]
        elif req.change is not Change.NONE:
            model[req.id] = (req.gpa >> PAGE_SHIFT, req.size >> PAGE_SHIFT, req.flags, req.hva)

    def resync(self) -> None:
        """Adopt the engine's state as the model (after a reported surprise)."""
        with self.vm.read_section():
            for a in range(self.nr):
                self.model[a] = {
                    s.id: (s.base_gfn, s.npages, s.flags, s.userspace_addr)
                    for s in self.vm.memslots(a)
                }

    def check_invariants(self) -> None:
        """:func:`check_invariants` as violations."""
        for p in check_invariants(self.vm):
            self.violation(p)

    def check_state(self) -> None:
        """The engine holds exactly the modelled slots and its invariants hold. O(n)."""
        vm = self.vm
        self.stats.state_checks += 1
        self.check_invariants()
        with vm.read_section():
            for a in range(self.nr):
                got = {
                    s.id: (s.base_gfn, s.npages, s.flags, s.userspace_addr) for s in vm.memslots(a)
                }
                if got != self.model[a]:
                    self.violation(f"as {a}: engine {got} != model {self.model[a]}")
                    self.resync()
        pages = sum(m[1] for model in self.model for m in model.values())
        if vm.nr_memslot_pages != pages:
            self.violation(f"nr_memslot_pages {vm.nr_memslot_pages} != {pages}")

    def run(self, stop: threading.Event, deadline: float) -> None:
        """Make requests until ``stop`` is set or ``time.monotonic()`` passes
        ``deadline``."""
        while not stop.is_set() and time.monotonic() < deadline:
            self.step()


def check_invariants(vm: Vm) -> list[str]:
    """``vm.check_invariants()`` as a list of problems (empty when it holds). Safe while
    readers run: the engine's check loads each set cache once. O(n)."""
    try:
        vm.check_invariants()
    except AssertionError as exc:
        return [f"invariants broken: {exc}"]
    return []


# ======================================================================================
# A whole run
# ======================================================================================
@dataclass
class StressReport:
    """The outcome of :func:`run_stress`."""

    seconds: float
    readers: int
    seed: int
    writer: WriterStats
    reader_stats: list[ReaderStats]
    swaps: int
    grace_periods: int
    versions_pruned: int
    switch_interval: float
    interrupted: bool = False

    @property
    def operations(self) -> int:
        """Writer requests made."""
        return self.writer.operations

    @property
    def lookups(self) -> int:
        """Checked reader calls."""
        return sum(r.lookups for r in self.reader_stats)

    @property
    def violations(self) -> int:
        """Violations found by readers and writer (answers that no history can explain
        count too)."""
        return (
            self.writer.violations
            + sum(r.violations for r in self.reader_stats)
            + sum(r.lost for r in self.reader_stats)
        )

    @property
    def messages(self) -> list[str]:
        """The kept violation messages."""
        out = list(self.writer.messages)
        for r in self.reader_stats:
            out.extend(r.messages)
            if r.lost:
                out.append(f"{r.lost} reader answers could not be checked (history pruned)")
        return out

    @property
    def max_reader_latency_ns(self) -> int:
        """The slowest checked reader call, in nanoseconds."""
        return max((r.max_latency_ns for r in self.reader_stats), default=0)

    def reader_latency_quantile(self, q: float) -> int:
        """Upper bound (a power of two, ns) of the ``q`` quantile of reader call latency."""
        hist = [sum(col) for col in zip(*(r.latency_log2 for r in self.reader_stats), strict=True)]
        total = sum(hist)
        if not total:
            return 0
        acc = 0
        for i, c in enumerate(hist):
            acc += c
            if acc >= q * total:
                return 1 << i
        return 1 << (len(hist) - 1)

    def lines(self) -> list[str]:
        """The report as printable lines (what ``memslots stress`` prints)."""
        w = self.writer
        rs = self.reader_stats
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(w.ops.items()))
        fired = ", ".join(f"{k} {w.faults[k]}/{w.armed[k]}" for k in w.faults)
        mean_op = w.total_op_ns / w.operations / 1e3 if w.operations else 0.0
        return [
            f"duration     {self.seconds:.1f} s, {self.readers} reader threads, seed {self.seed}"
            + (" (interrupted)" if self.interrupted else ""),
            f"operations   {self.operations}  ({kinds})",
            f"  failed as expected {w.expected_errors}; faults fired/armed: {fired}",
            f"  invalidation callbacks {w.callback_calls} (raised {w.callback_raises}), "
            f"state checks {w.state_checks}",
            f"  swaps {self.swaps}, grace periods {self.grace_periods}, "
            f"writer latency mean {mean_op:.1f} us, max {w.max_op_ns / 1e6:.2f} ms",
            f"lookups      {self.lookups}  (vm {sum(r.vm_lookups for r in rs)}, "
            f"vcpu {sum(r.vcpu_lookups for r in rs)}, "
            f"range/read-section {sum(r.range_checks for r in rs)}; "
            f"{sum(r.during_swap for r in rs)} completed inside a writer's grace period)",
            f"  reader call latency p50 < {self.reader_latency_quantile(0.5) / 1e3:.1f} us, "
            f"p99.9 < {self.reader_latency_quantile(0.999) / 1e3:.1f} us, "
            f"max {self.max_reader_latency_ns / 1e6:.2f} ms "
            f"(switch interval {self.switch_interval * 1e6:g} us)",
            f"violations   {self.violations}",
        ]


@dataclass
class StressProgress:
    """A progress sample passed to :func:`run_stress`'s ``progress`` callback."""

    elapsed: float
    seconds: float
    operations: int
    lookups: int
    violations: int


def run_stress(
    seconds: float,
    readers: int = 2,
    seed: int = 0,
    *,
    max_slots: int = 16,
    fault_rate: float = 0.05,
    switch_interval: float | None = None,
    progress: Callable[[StressProgress], None] | None = None,
    progress_every: float = 10.0,
    progress_first: float | None = None,
    vm_factory: Callable[[], HistoryVm] = HistoryVm,
) -> StressReport:
    """Run ``readers`` reader threads and one writer thread against a fresh
    :class:`HistoryVm` for ``seconds``; return what they did and found.

    ``switch_interval`` sets ``sys.setswitchinterval`` for the run (smaller: more thread
    interleavings per second) and restores it after. ``progress`` is called from the
    calling thread ``progress_first`` seconds into the run (default: ``progress_every``)
    and then every ``progress_every`` seconds. Ctrl-C stops the run early and
    returns the report so far (``interrupted``). Time: ``seconds`` plus thread joins
    (each bounded by :data:`JOIN_TIMEOUT`; a thread still running then is a violation).
    """
    if seconds <= 0:
        raise ValueError("seconds must be > 0")
    if readers < 1:
        raise ValueError("at least one reader is needed")
    vm = vm_factory()
    rdrs = [Reader(vm, i, seed * 1000 + i + 1) for i in range(readers)]
    writer = RandomWriter(vm, seed, max_slots=max_slots, fault_rate=fault_rate)
    stop = threading.Event()
    old_interval = sys.getswitchinterval()
    if switch_interval is not None:
        sys.setswitchinterval(switch_interval)
    threads = [
        threading.Thread(target=r.run, args=(stop,), name=f"stress-reader-{r.index}", daemon=True)
        for r in rdrs
    ]
    t_start = time.monotonic()
    deadline = t_start + seconds
    wthread = threading.Thread(
        target=writer.run, args=(stop, deadline), name="stress-writer", daemon=True
    )
    interrupted = False
    try:
        for t in threads:
            t.start()
        wthread.start()
        next_progress = t_start + (progress_every if progress_first is None else progress_first)
        while wthread.is_alive():
            wthread.join(min(0.1, max(0.0, deadline - time.monotonic()) + 0.01))
            now = time.monotonic()
            if progress is not None and now >= next_progress and wthread.is_alive():
                next_progress = max(next_progress + progress_every, now)
                progress(
                    StressProgress(
                        now - t_start,
                        seconds,
                        writer.stats.operations,
                        sum(r.stats.lookups for r in rdrs),
                        writer.stats.violations + sum(r.stats.violations for r in rdrs),
                    )
                )
    except KeyboardInterrupt:
        interrupted = True
    finally:
        stop.set()
        stuck = []
        for t in (wthread, *threads):
            t.join(JOIN_TIMEOUT)
            if t.is_alive():
                stuck.append(t.name)
        sys.setswitchinterval(old_interval)
    elapsed = time.monotonic() - t_start
    if stuck:  # a call that never returns (a deadlock, a grace period that never ends)
        writer.violation(f"{', '.join(stuck)} did not stop within {JOIN_TIMEOUT:g} s")
    else:
        writer.check_state()
    return StressReport(
        seconds=elapsed,
        readers=readers,
        seed=seed,
        writer=writer.stats,
        reader_stats=[r.stats for r in rdrs],
        swaps=vm.swaps,
        grace_periods=vm.srcu.grace_periods,
        versions_pruned=vm.pruned,
        switch_interval=sys.getswitchinterval() if switch_interval is None else switch_interval,
        interrupted=interrupted,
    )


__all__ = [
    "FOUND",
    "LOST",
    "NOT_FOUND",
    "History",
    "HistoryVm",
    "RandomWriter",
    "Reader",
    "ReaderStats",
    "SetObservation",
    "StressProgress",
    "StressReport",
    "Version",
    "WriterStats",
    "check_invariants",
    "fault_reached",
    "generation_delta",
    "observe_set",
    "run_stress",
    "same_objects",
    "set_problems",
]
