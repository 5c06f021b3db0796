"""Replaying memslot traces: run recorded calls through every implementation and compare.

:func:`replay` takes a list of :class:`~memslots.tools.traces.MemslotCall` (from
:mod:`memslots.tools.traces`) and makes every call, in order, on a fresh VM of each
implementation:

``engine``
    :class:`memslots.Vm`, the tree-based engine;
``array``
    :class:`memslots.baseline.ArrayVm`, the array design before the commit (reported as
    unavailable, with a note, while it cannot be imported);
``kernel``
    a real VM on ``/dev/kvm`` (by default when it is usable).

It collects each call's result (0 or the errno) and time on each of them, classifies each
call by what the primary implementation (the engine unless told otherwise) did with it
(create, delete, move, flags, no-op, failed), and compares every result with the one the
trace recorded and with the kernel's. The outcome is a :class:`ReplayReport`: counts by
kind, errors by errno, disagreements, the final memory map of every address space, and
timings.

Host addresses. The hvas of a trace belong to the process that was traced. Before the
kernel sees them they are relocated (:class:`HvaRelocation`): the union of the hva ranges
of the trace is split into clusters of overlapping or adjacent ranges, each cluster gets
one :class:`~memslots.HostMemory` mapping of this process, owned by the ``KvmVm``
(``MAP_NORESERVE``: nothing is touched or committed), and every trace hva inside a
cluster becomes ``mapping.addr + (hva - cluster_start)``. Every offset inside a cluster
and every overlap between slots is kept, page offsets too, so the kernel takes the same
decisions as for the traced process. Hvas of calls the kernel rejects for their hva range
(beyond the user address space) are not relocated, so they are rejected the same way.
The engine and the array replay the trace's own hvas (they never touch host memory), and
the memory map shows those.

Limits. With the kernel column on, the engine and the array get the limits ``KvmVm``
finds in the kernel (address spaces, ``KVM_CAP_NR_MEMSLOTS``, ``KVM_CAP_READONLY_MEM``,
the highest gfn, private memory), so they model this kernel; without it they use the
x86-64 defaults of :class:`memslots.Vm`. A ``KVM_MEM_GUEST_MEMFD`` call names a
guest_memfd of the traced process, which does not exist here: such calls are replayed
as recorded but cannot be expected to succeed.

JSON document (:meth:`ReplayReport.to_json`, what ``memslots replay --json`` prints).
Keys are stable; numbers are integers unless stated; errnos are numbers (0 for success)
except where keyed by name::

    {
      "version": 1,
      "trace": {"source": str, "embedded": bool, "format": str | null, "calls": int,
                "skipped": [{"source": str, "line": int, "message": str}, ...]},
      "primary": "engine" | "array",
      "implementations": {
        "engine" | "array" | "kernel": {
            "status": "ok" | "unavailable" | "crashed" | "off",
            "description": str,          # what ran, e.g. "memslots.Vm (tree)"
            "note": str | null}},        # why unavailable / crashed, or null
      "limits": {"nr_address_spaces", "max_user_slots", "max_gfn": int,
                 "readonly_mem", "private_mem": bool, "task_size_max": int,
                 "source": "kernel" | "defaults"},
      "hva_relocation": null | {
            "total_bytes": int,
            "clusters": [{"start": int, "end": int, "addr": int, "delta": int}]},
                                         # trace [start, end) -> here [addr, addr+end-start)
      "kinds": {"create", "delete", "move", "flags", "no-op", "failed": int},
      "errors": {"EEXIST": {"errno": 17, "recorded": int, "engine": int, "array": int,
                            "kernel": int}, ...},   # only columns that ran
      "agreement": {"calls": int, "agreeing": int, "rate": float | null,
                    "pairs": [{"a": str, "b": str, "compared": int, "agree": int}]},
      "disagreements": [{"index": int, "where": "FILE:LINE", "line": int,
                         "call": str, "results": {"recorded": int | null,
                                                  "engine": int, ...}}],
      "map_disagreements": [{"impl": str, "detail": str}],
      "memory_map": {"0": [{"slot", "as_id", "id", "gpa_start", "gpa_end", "size",
                            "flags", "flag_names": [str], "hva"}], "1": [...]},
                                         # gpa_end is inclusive; hva is the trace's
      "timings": {"engine" | "array" | "kernel": {
            "calls": int, "total_ns": int, "mean_ns": float, "median_ns": float,
            "by_kind": {kind: {"calls": int, "mean_ns": float}}}},
      "calls": [{"index": int, "where": str, "line": int, "slot": int, "flags": int,
                 "guest_phys_addr": int, "memory_size": int, "userspace_addr": int,
                 "v2": bool, "kind": str, "recorded": int | null,
                 "results": {impl: int}, "time_ns": {impl: int}, "agree": bool}]
    }

Costs: a replay is O(n) calls on each implementation, each at the implementation's cost
(O(log n) for the engine, O(n) for the array); relocation is O(n log n) once.
"""

from __future__ import annotations

import bisect
import dataclasses
import gc
import os
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from errno import EINVAL
from typing import Any, Final, Literal, Protocol, cast

from memslots.constants import (
    KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
    PAGE_SIZE,
    X86_TASK_SIZE_MAX,
)
from memslots.errors import errno_name
from memslots.guest_memory import HostMemory
from memslots.slot import Memslot
from memslots.tools.traces import MemslotCall, MemslotTarget, TraceFormatError
from memslots.validate import VmLimits
from memslots.vm import Vm

__all__ = [
    "IMPLS",
    "KINDS",
    "CallOutcome",
    "Disagreement",
    "HvaCluster",
    "HvaRelocation",
    "ImplName",
    "ImplRun",
    "KernelSession",
    "MapEntry",
    "ReplayReport",
    "flag_names",
    "kernel_available",
    "open_kernel",
    "replay",
]

ImplName = Literal["engine", "array", "kernel"]
#: the implementations a replay runs, in report order
IMPLS: Final[tuple[ImplName, ...]] = ("engine", "array", "kernel")
#: call kinds, in report order (``failed``: the primary implementation returned an error)
KINDS: Final = ("create", "delete", "move", "flags", "no-op", "failed")

#: how many calls between two progress reports
PROGRESS_EVERY: Final = 256

#: report version in the JSON document
JSON_VERSION: Final = 1

_PAGE_MASK: Final = PAGE_SIZE - 1


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


# =========================================================================== hva relocation


@dataclasses.dataclass(frozen=True, slots=True)
class HvaCluster:
    """One cluster of overlapping or adjacent trace hva ranges, ``[start, end)`` (page
    aligned), mapped here at ``addr``."""

    start: int
    end: int
    addr: int

    @property
    def size(self) -> int:
        """Bytes in the cluster."""
        return self.end - self.start

    @property
    def delta(self) -> int:
        """What relocation adds to a trace hva of this cluster: ``addr - start``."""
        return self.addr - self.start


class _Mapping(Protocol):
    addr: int

    def close(self) -> None: ...


def _valid_hva_range(hva: int, size: int, task_size_max: int) -> bool:
    """Whether the kernel's ``access_ok(hva, size)`` accepts the range."""
    return hva + size <= task_size_max


def _page_range(hva: int, size: int) -> tuple[int, int]:
    """``[hva, hva + size)`` rounded out to whole pages."""
    return hva & ~_PAGE_MASK, (hva + size + _PAGE_MASK) & ~_PAGE_MASK


class HvaRelocation:
    """Trace hvas mapped onto address space of this process, keeping offsets and overlaps.

    The ranges ``[hva, hva + size)`` of the calls with ``size > 0`` whose range the kernel
    accepts (it ends at or below ``task_size_max``) are rounded out to pages and merged
    into clusters where they overlap or touch; each cluster gets one mapping made by
    ``allocate(size)`` (default :class:`~memslots.HostMemory`, reserved with
    ``MAP_NORESERVE``: nothing is committed or touched). :meth:`translate` moves an hva that
    lies in a cluster by that cluster's delta and leaves any other hva alone.

    Building it costs O(n log n) for n calls plus one mmap per cluster; :meth:`translate`
    is O(log c) for c clusters. Call :meth:`close` (or use ``with``) to unmap.
    """

    def __init__(
        self,
        calls: Iterable[MemslotCall],
        *,
        task_size_max: int = X86_TASK_SIZE_MAX,
        allocate: Callable[[int], _Mapping] = HostMemory,
    ) -> None:
        self.task_size_max = task_size_max
        ranges = sorted(
            _page_range(c.userspace_addr, c.memory_size)
            for c in calls
            if c.memory_size and _valid_hva_range(c.userspace_addr, c.memory_size, task_size_max)
        )
        merged: list[list[int]] = []
        for start, end in ranges:
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        self._mappings: list[_Mapping] = []
        clusters: list[HvaCluster] = []
        try:
            for start, end in merged:
                mapping = allocate(end - start)
                self._mappings.append(mapping)
                clusters.append(HvaCluster(start, end, mapping.addr))
        except BaseException:
            self.close()
            raise
        self.clusters: tuple[HvaCluster, ...] = tuple(clusters)
        self._starts = [c.start for c in clusters]

    @property
    def total_bytes(self) -> int:
        """Bytes of address space reserved, over all clusters. O(c)."""
        return sum(c.size for c in self.clusters)

    def cluster_of(self, hva: int) -> HvaCluster | None:
        """The cluster holding ``hva``, or None. O(log c)."""
        i = bisect.bisect_right(self._starts, hva) - 1
        if i >= 0 and hva < self.clusters[i].end:
            return self.clusters[i]
        return None

    def translate(self, hva: int) -> int:
        """``hva`` moved into this process when it lies in a cluster; else ``hva``. O(log c)."""
        cluster = self.cluster_of(hva)
        return hva if cluster is None else hva + cluster.delta

    def untranslate(self, addr: int) -> int:
        """The inverse of :meth:`translate` for addresses inside a mapping. O(c)."""
        for c in self.clusters:
            if c.addr <= addr < c.addr + c.size:
                return addr - c.delta
        return addr

    def translate_call(self, call: MemslotCall) -> MemslotCall:
        """``call`` with its hva relocated: always for a delete (size 0) whose hva is in a
        cluster, and for a call whose range went into a cluster; other calls unchanged (their
        hva range is rejected by the kernel in both processes alike). O(log c)."""
        if call.memory_size and not _valid_hva_range(
            call.userspace_addr, call.memory_size, self.task_size_max
        ):
            return call
        new = self.translate(call.userspace_addr)
        if new == call.userspace_addr:
            return call
        return dataclasses.replace(call, userspace_addr=new)

    def close(self) -> None:
        """Unmap every cluster (idempotent)."""
        mappings, self._mappings = self._mappings, []
        for m in mappings:
            m.close()

    def __enter__(self) -> HvaRelocation:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self.clusters)


# =========================================================================== the kernel


def kernel_available() -> bool:
    """Whether ``/dev/kvm`` is usable here (opens read-write and speaks API 12). Never
    raises. O(1)."""
    try:
        from memslots.kvm.abi import kvm_available
    except ImportError:  # pragma: no cover - the ABI layer is part of the package
        return False
    return kvm_available()


class _TimedFd:
    """Stands in for a :class:`KvmVm`'s VM fd and times its memslot ioctls alone, so the
    kernel column does not include the engine that mirrors the kernel inside ``KvmVm``.
    Everything else is the fd's."""

    def __init__(self, fd: Any) -> None:
        self._fd = fd
        #: duration of the last memslot ioctl, in ns (0 when none was made)
        self.last_ns = 0

    def set_user_memory_region(self, *args: int) -> None:
        t0 = time.perf_counter_ns()
        try:
            self._fd.set_user_memory_region(*args)
        finally:
            self.last_ns = time.perf_counter_ns() - t0

    def set_user_memory_region2(self, *args: int) -> None:
        t0 = time.perf_counter_ns()
        try:
            self._fd.set_user_memory_region2(*args)
        finally:
            self.last_ns = time.perf_counter_ns() - t0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fd, name)


class KernelSession:
    """A fresh :class:`memslots.kvm.KvmVm` (non-strict) with the trace's hvas relocated
    onto :class:`~memslots.HostMemory` mappings the VM owns.

    ``target`` takes the memslot calls (relocate them first with :meth:`translate_call`);
    ``limits`` are the kernel's (the models get them too); ``ioctl_ns()`` is the duration
    of the last memslot ioctl alone. :meth:`close` (or ``with``) deletes every slot in the
    kernel, destroys the VM and unmaps the memory, in that order. Raises OSError when
    ``/dev/kvm`` cannot be used.
    """

    def __init__(self, calls: Sequence[MemslotCall]) -> None:
        from memslots.kvm import KvmVm

        self.vm = KvmVm(strict=False)
        try:
            self._fd = _TimedFd(self.vm.fd)
            self.vm.fd = cast(Any, self._fd)
            self.relocation = HvaRelocation(
                calls, task_size_max=self.vm.limits.task_size_max, allocate=self.vm.host_memory
            )
        except BaseException:
            self.vm.close()
            raise
        self.limits: VmLimits = self.vm.limits
        self.target: MemslotTarget = self.vm
        self.description = f"/dev/kvm (Linux {os.uname().release}) through memslots.kvm.KvmVm"

    def ioctl_ns(self) -> int:
        """Duration of the last memslot ioctl in ns (0 if the last call made none)."""
        ns, self._fd.last_ns = self._fd.last_ns, 0
        return ns

    def translate_call(self, call: MemslotCall) -> MemslotCall:
        """``call`` with its hva relocated (see :class:`HvaRelocation`). O(log c)."""
        return self.relocation.translate_call(call)

    def memory_map(self) -> dict[int, list[MapEntry]]:
        """The final map as the VM mirrors it, hvas translated back to the trace's."""
        return _memory_map(self.vm, self.vm.nr_address_spaces, self.relocation.untranslate)

    def close(self) -> None:
        """Delete every slot in the kernel, destroy the VM, unmap (idempotent)."""
        self.vm.close()
        self.relocation.close()

    def __enter__(self) -> KernelSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def open_kernel(calls: Sequence[MemslotCall]) -> KernelSession:
    """A :class:`KernelSession` for ``calls``; raises OSError when ``/dev/kvm`` cannot be
    used. O(n log n) for the relocation."""
    return KernelSession(calls)


# =========================================================================== results


@dataclasses.dataclass(frozen=True, slots=True)
class MapEntry:
    """One slot of a final memory map (hva as in the trace)."""

    as_id: int
    id: int
    base_gfn: int
    npages: int
    flags: int
    userspace_addr: int

    @classmethod
    def of(cls, s: Memslot) -> MapEntry:
        """The entry of a :class:`~memslots.slot.Memslot`. O(1)."""
        return cls(s.as_id, s.id, s.base_gfn, s.npages, s.flags & 0xFFFF, s.userspace_addr)

    @property
    def slot(self) -> int:
        """ABI slot number ``as_id << 16 | id``."""
        return self.as_id << 16 | self.id

    @property
    def gpa_start(self) -> int:
        """First guest physical address."""
        return self.base_gfn * PAGE_SIZE

    @property
    def size(self) -> int:
        """Bytes."""
        return self.npages * PAGE_SIZE

    @property
    def gpa_end(self) -> int:
        """Last guest physical address (inclusive)."""
        return self.gpa_start + self.size - 1

    def to_json(self) -> dict[str, Any]:
        """The JSON object of the entry (see the module docstring)."""
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


Status = Literal["ok", "unavailable", "crashed", "off"]


@dataclasses.dataclass
class ImplRun:
    """What one implementation did with the trace.

    ``results[i]`` is call i's errno (0 for success) and ``times_ns[i]`` its duration;
    ``kinds[i]`` what the implementation did with it when it can tell (the models), else
    None. ``memory_map`` maps each address space to its final slots (trace hvas), None
    when the implementation cannot show it. ``status`` is ``"ok"``, ``"unavailable"``
    (not importable or not present), ``"crashed"`` (raised something other than a memslot
    error; ``note`` says what and where; results cover the calls before) or ``"off"``.
    """

    name: ImplName
    status: Status
    description: str = ""
    note: str | None = None
    results: list[int] = dataclasses.field(default_factory=list)
    times_ns: list[int] = dataclasses.field(default_factory=list)
    kinds: list[str] | None = None
    memory_map: dict[int, list[MapEntry]] | None = None

    @property
    def ran(self) -> bool:
        """Whether it replayed every call."""
        return self.status == "ok"


@dataclasses.dataclass(frozen=True, slots=True)
class Disagreement:
    """A call whose known results are not all equal: ``results`` maps ``"recorded"`` and
    each implementation that ran to its errno (0 for success; ``recorded`` may be None)."""

    index: int
    call: MemslotCall
    results: dict[str, int | None]


@dataclasses.dataclass(frozen=True, slots=True)
class CallOutcome:
    """One call with its kind (primary implementation), recorded result and results and
    times on each implementation that ran."""

    index: int
    call: MemslotCall
    kind: str
    results: dict[str, int]
    times_ns: dict[str, int]

    @property
    def agree(self) -> bool:
        """All known results (recorded included) are equal."""
        values = set(self.results.values())
        if self.call.result is not None:
            values.add(self.call.result)
        return len(values) <= 1


class _Model(MemslotTarget, Protocol):
    def memslots(self, as_id: int = 0) -> Iterable[Memslot]: ...


def _load_array() -> tuple[Callable[..., Any] | None, str]:
    """``ArrayVm`` or None, and a description or the reason it is missing."""
    try:
        from memslots.baseline import ArrayVm
    except ImportError as exc:
        return None, f"memslots.baseline.ArrayVm is not importable yet ({exc})"
    return ArrayVm, "memslots.baseline.ArrayVm (sorted array, copied on every change)"


def _run(
    target: MemslotTarget,
    calls: Sequence[MemslotCall],
    *,
    kinds: bool,
    timer: Callable[[], int] | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[int], list[int], list[str] | None, str | None]:
    """Make every call on ``target``; return the results, the times, the kinds (when
    asked: ``target.last_change`` after a success, ``failed`` after an error) and a note
    when the target crashed (the lists then stop before the crashing call). ``timer``,
    when given, supplies each call's duration instead of the wall time around it;
    ``progress(done)``, when given, is told every :data:`PROGRESS_EVERY` calls (outside the
    measured time)."""
    results: list[int] = []
    times: list[int] = []
    kind_list: list[str] | None = [] if kinds else None
    perf = time.perf_counter_ns
    gc_was_enabled = gc.isenabled()
    gc.disable()  # as timeit does: no collection pauses inside the measured calls
    call = None
    try:
        for call in calls:
            t0 = perf()
            try:
                call.apply(target)
                err = 0
            except OSError as exc:
                t1 = perf()
                err = exc.errno if isinstance(exc.errno, int) and exc.errno > 0 else EINVAL
            else:
                t1 = perf()
            kind = "failed"
            if not err:
                kind = str(getattr(getattr(target, "last_change", None), "value", "unknown"))
            elapsed = t1 - t0 if timer is None else timer()
            results.append(err)
            times.append(elapsed)
            if kind_list is not None:
                kind_list.append(kind)
            if progress is not None and not len(results) % PROGRESS_EVERY:
                progress(len(results))
        if progress is not None:
            progress(len(results))
    except Exception as exc:
        where = call.where if call is not None else "?"
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


def _memory_map(
    model: _Model, nr_address_spaces: int, untranslate: Callable[[int], int] | None = None
) -> dict[int, list[MapEntry]]:
    out: dict[int, list[MapEntry]] = {}
    for a in range(nr_address_spaces):
        entries = [MapEntry.of(s) for s in model.memslots(a)]
        if untranslate is not None:
            entries = [
                dataclasses.replace(e, userspace_addr=untranslate(e.userspace_addr))
                for e in entries
            ]
        out[a] = entries
    return out


def _make_model(name: ImplName, limits: VmLimits) -> tuple[Any | None, str, str | None]:
    """A fresh model VM with ``limits``: (vm, description, None) or (None, "", reason)."""
    kwargs: dict[str, Any] = {
        "nr_address_spaces": limits.nr_address_spaces,
        "max_user_slots": limits.max_user_slots,
        "max_gfn": limits.max_gfn,
        "readonly_mem": limits.readonly_mem,
        "private_mem": limits.private_mem,
        "task_size_max": limits.task_size_max,
    }
    if name == "engine":
        return Vm(**kwargs), "memslots.Vm (tree-based engine)", None
    factory, text = _load_array()
    if factory is None:
        return None, "", text
    try:
        return factory(**kwargs), text, None
    except Exception as exc:  # an ArrayVm that does not take these limits yet
        return None, "", f"ArrayVm(**limits) failed: {type(exc).__name__}: {exc}"


# =========================================================================== the report


@dataclasses.dataclass
class ReplayReport:
    """The outcome of :func:`replay`. ``runs`` holds one :class:`ImplRun` per
    implementation (``engine``, ``array``, ``kernel``, in that order); ``primary`` names
    the one whose kinds and memory map are reported. Summaries are computed on demand,
    each O(n) in the number of calls."""

    calls: list[MemslotCall]
    runs: dict[str, ImplRun]
    primary: ImplName
    limits: VmLimits
    limits_source: str
    relocation: tuple[HvaCluster, ...] | None = None
    source: str = ""
    embedded: bool = False
    fmt: str | None = None
    skipped: list[TraceFormatError] = dataclasses.field(default_factory=list)

    # ------------------------------------------------------------------ per call
    @property
    def ran(self) -> list[str]:
        """Names of the implementations that replayed every call, in report order."""
        return [name for name, run in self.runs.items() if run.ran]

    def outcomes(self) -> list[CallOutcome]:
        """Every call with its kind, results and times. O(n)."""
        names = self.ran
        kinds = self.runs[self.primary].kinds if self.runs[self.primary].ran else None
        out = []
        for i, call in enumerate(self.calls):
            out.append(
                CallOutcome(
                    i,
                    call,
                    kinds[i] if kinds is not None else "unknown",
                    {n: self.runs[n].results[i] for n in names},
                    {n: self.runs[n].times_ns[i] for n in names},
                )
            )
        return out

    def kinds(self) -> dict[str, int]:
        """Calls by kind (every kind of :data:`KINDS`, zeros included). O(n)."""
        counts = Counter(o.kind for o in self.outcomes())
        result = {k: counts.get(k, 0) for k in KINDS}
        for k, v in counts.items():
            if k not in result:
                result[k] = v
        return result

    def errors(self) -> dict[int, dict[str, int]]:
        """For each errno any column saw: how many calls got it, per column (``recorded``
        and every implementation that ran), ascending errno. O(n)."""
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
        """Calls whose known results differ (recorded vs implementations, or between
        implementations), in trace order. O(n)."""
        out = []
        for o in self.outcomes():
            if not o.agree:
                results: dict[str, int | None] = {"recorded": o.call.result}
                results.update(o.results)
                out.append(Disagreement(o.index, o.call, results))
        return out

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
            for i, call in enumerate(self.calls):
                x = self.runs[a].results[i]
                y = call.result if b == "recorded" else self.runs[b].results[i]
                if y is None:
                    continue
                compared += 1
                agree += x == y
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
                            f"address space {a}: {len(only_p)} slot(s) only in {self.primary}"
                            f" (ids {[e.id for e in only_p]}), {len(only_o)} only in {name}"
                            f" (ids {[e.id for e in only_o]})",
                        )
                    )
        return out

    def memory_map(self) -> dict[int, list[MapEntry]]:
        """The primary implementation's final memory map: address space -> slots in gfn
        order, hvas as in the trace (empty when it did not finish). O(slots)."""
        return self.runs[self.primary].memory_map or {}

    def timings(self) -> dict[str, dict[str, Any]]:
        """For each implementation that ran: calls, total, mean and median ns per call, and
        the mean per kind. O(n log n)."""
        kinds = [o.kind for o in self.outcomes()]
        out: dict[str, dict[str, Any]] = {}
        for name in self.ran:
            times = self.runs[name].times_ns
            by_kind: dict[str, list[int]] = {}
            for k, t in zip(kinds, times, strict=True):
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
        """No disagreement (per call or in the final maps) and no implementation crashed."""
        return (
            not self.disagreements()
            and not self.map_disagreements()
            and all(r.status != "crashed" for r in self.runs.values())
            and self.runs[self.primary].ran
        )

    # ------------------------------------------------------------------ JSON
    def to_json(self) -> dict[str, Any]:
        """The JSON document described in the module docstring. O(n)."""
        outcomes = self.outcomes()
        n_agree = sum(o.agree for o in outcomes)
        return {
            "version": JSON_VERSION,
            "trace": {
                "source": self.source,
                "embedded": self.embedded,
                "format": self.fmt,
                "calls": len(self.calls),
                "skipped": [
                    {"source": e.source, "line": e.line, "message": e.message} for e in self.skipped
                ],
            },
            "primary": self.primary,
            "implementations": {
                name: {"status": r.status, "description": r.description, "note": r.note}
                for name, r in self.runs.items()
            },
            "limits": {
                "nr_address_spaces": self.limits.nr_address_spaces,
                "max_user_slots": self.limits.max_user_slots,
                "max_gfn": self.limits.max_gfn,
                "readonly_mem": self.limits.readonly_mem,
                "private_mem": self.limits.private_mem,
                "task_size_max": self.limits.task_size_max,
                "source": self.limits_source,
            },
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
                "calls": len(outcomes),
                "agreeing": n_agree,
                "rate": n_agree / len(outcomes) if outcomes else None,
                "pairs": [
                    {"a": a, "b": b, "compared": c, "agree": g}
                    for a, b, c, g in self.agreement_pairs()
                ],
            },
            "disagreements": [
                {
                    "index": d.index,
                    "where": d.call.where,
                    "line": d.call.line,
                    "call": d.call.describe(),
                    "results": d.results,
                }
                for d in self.disagreements()
            ],
            "map_disagreements": [
                {"impl": name, "detail": detail} for name, detail in self.map_disagreements()
            ],
            "memory_map": {
                str(a): [e.to_json() for e in entries] for a, entries in self.memory_map().items()
            },
            "timings": self.timings(),
            "calls": [
                {
                    "index": o.index,
                    "where": o.call.where,
                    "line": o.call.line,
                    "slot": o.call.slot,
                    "flags": o.call.flags,
                    "guest_phys_addr": o.call.guest_phys_addr,
                    "memory_size": o.call.memory_size,
                    "userspace_addr": o.call.userspace_addr,
                    "v2": o.call.v2,
                    "kind": o.kind,
                    "recorded": o.call.result,
                    "results": o.results,
                    "time_ns": o.times_ns,
                    "agree": o.agree,
                }
                for o in outcomes
            ],
        }

    def recorded_calls(self) -> list[MemslotCall]:
        """The calls with the primary implementation's results as their recorded result
        (what ``--record`` writes). O(n)."""
        results = self.runs[self.primary].results
        return [
            dataclasses.replace(c, result=results[i]) if i < len(results) else c
            for i, c in enumerate(self.calls)
        ]


# =========================================================================== replay


def replay(
    calls: Sequence[MemslotCall],
    *,
    impls: Iterable[ImplName] = ("engine", "array"),
    kernel: bool | None = None,
    primary: ImplName | None = None,
    source: str = "",
    embedded: bool = False,
    fmt: str | None = None,
    skipped: Sequence[TraceFormatError] = (),
    progress: Callable[[str, int, int], None] | None = None,
) -> ReplayReport:
    """Replay ``calls`` on fresh VMs of each implementation and report.

    ``impls``: the models to run (``"engine"``, ``"array"``); one that is not available
    (``ArrayVm`` not importable) is reported as such with a note instead of failing.
    ``kernel``: replay on ``/dev/kvm`` too: None means "when it is usable", True requires
    it (OSError when it cannot be used), False turns it off. ``primary``: whose kinds and
    memory map are reported (default: the engine if it runs, else the first model).
    ``source``, ``embedded``, ``fmt`` and ``skipped`` only label the report.
    ``progress(impl, done, total)`` is called before each implementation starts, every
    :data:`PROGRESS_EVERY` calls and when it ends (never inside a measured call).

    Cost: O(n) calls on each implementation plus O(n log n) for the hva relocation.
    """
    calls = list(calls)
    models = [n for n in ("engine", "array") if n in set(impls)]
    if not models:
        raise ValueError("replay needs at least one of the models 'engine' and 'array'")
    if primary is None:
        primary = cast(ImplName, models[0])
    if primary not in models:
        raise ValueError(f"primary {primary!r} is not among the models replayed")

    runs: dict[str, ImplRun] = {n: ImplRun(n, "off") for n in IMPLS}
    session: KernelSession | None = None
    if kernel is None and not kernel_available():
        kernel = False
        runs["kernel"] = ImplRun("kernel", "unavailable", note="/dev/kvm is not usable here")
    try:
        if kernel is None:
            try:
                session = open_kernel(calls)
            except OSError as exc:
                runs["kernel"] = ImplRun("kernel", "unavailable", note=f"/dev/kvm: {exc}")
        elif kernel:
            session = open_kernel(calls)
        limits = session.limits if session is not None else Vm().limits
        limits_source = "kernel" if session is not None else "defaults"

        for name in models:
            vm, description, why = _make_model(cast(ImplName, name), limits)
            if vm is None:
                runs[name] = ImplRun(cast(ImplName, name), "unavailable", note=why)
                continue
            results, times, kinds, crash = _run(
                vm, calls, kinds=True, progress=_reporter(progress, name, len(calls))
            )
            run = ImplRun(
                cast(ImplName, name),
                "crashed" if crash else "ok",
                description,
                crash,
                results,
                times,
                kinds,
            )
            if not crash:
                run.memory_map = _memory_map(vm, limits.nr_address_spaces)
            runs[name] = run

        relocation: tuple[HvaCluster, ...] | None = None
        if session is not None:
            relocation = session.relocation.clusters
            kcalls = [session.translate_call(c) for c in calls]
            session.ioctl_ns()
            results, times, _, crash = _run(
                session.target,
                kcalls,
                kinds=False,
                timer=session.ioctl_ns,
                progress=_reporter(progress, "kernel", len(calls)),
            )
            runs["kernel"] = ImplRun(
                "kernel",
                "crashed" if crash else "ok",
                session.description,
                crash,
                results,
                times,
            )
            if not crash:
                runs["kernel"].memory_map = session.memory_map()
    finally:
        if session is not None:
            session.close()

    if not runs[primary].ran and runs[primary].status == "unavailable":
        raise ValueError(f"the {primary} implementation is not available: {runs[primary].note}")
    return ReplayReport(
        calls=calls,
        runs=runs,
        primary=primary,
        limits=limits,
        limits_source=limits_source,
        relocation=relocation,
        source=source,
        embedded=embedded,
        fmt=fmt,
        skipped=list(skipped),
    )
