"""Hva relocation: a trace's host addresses mapped onto memory of this process.

The hvas of a trace belong to the process that was traced. Before the kernel sees them
they are relocated (:class:`HvaRelocation`): the union of the hva ranges of the trace is
split into clusters of overlapping or adjacent ranges, each cluster gets one
:class:`~memslots.HostMemory` mapping of this process (``MAP_NORESERVE``: nothing is touched
or committed), and every trace hva inside a cluster becomes
``mapping.addr + (hva - cluster_start)``. Every offset inside a cluster and every overlap
between slots is kept, page offsets too, so the kernel takes the same decisions as for the
traced process. Hvas of calls the kernel rejects for their hva range (beyond the user
address space) are not relocated, so they are rejected the same way.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Callable, Iterable
from typing import Final, Protocol

from memslots.constants import PAGE_SIZE, X86_TASK_SIZE_MAX
from memslots.guest_memory import HostMemory
from memslots.tools.traces import MemslotCall

__all__ = ["HvaCluster", "HvaRelocation"]

_PAGE_MASK: Final = PAGE_SIZE - 1


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
