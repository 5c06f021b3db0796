"""The writer side of :class:`memslots.sync.Srcu`: one grace period
(``synchronize_srcu``, ``kernel/rcu/srcutree.c``), in a module of its own so that the
compiled build compiles it.

:mod:`memslots.sync` must stay interpreted for its readers' sake (its docstring says
why: the entry into a read section relies on the eval loop's interrupt checks). Nothing
of that concerns the writer, and every update waits for one or two grace periods, so the
writer's fast path is here: :func:`synchronize` checks that the caller is not inside a
read section, and when every reader thread is outside its read sections (the common
case: readers are brief) it ends at once without flipping the index; otherwise it runs
the two-flip wait of :class:`~memslots.sync.Srcu`. Compiled, an idle grace period costs
about a quarter of what it costs interpreted.

The module imports nothing of :mod:`memslots.sync` (which calls it): it works on any
object with the members of :class:`SrcuState`.
"""

from __future__ import annotations

import threading
import weakref
from collections import deque
from typing import Any, Protocol

__all__ = ["SrcuState", "all_idle", "synchronize"]


class SrcuState(Protocol):
    """What :func:`synchronize` needs of an :class:`memslots.sync.Srcu`."""

    _local: threading.local
    _lock: threading.Lock
    _idx: int
    _registry: tuple[list[weakref.ref[Any]], list[weakref.ref[Any]]]
    grace_periods: int

    @property
    def _counters_need_lock(self) -> bool:
        """True when a counter may only be read under its lock (:class:`LockedSrcu`):
        then the idle test goes through :meth:`_all_idle`."""
        ...

    def _all_idle(self) -> bool: ...

    def _wait_for_readers(self, idx: int) -> None: ...


def all_idle(registry: tuple[list[weakref.ref[Any]], list[weakref.ref[Any]]]) -> bool:
    """True when every live counter of both indices is empty right now. Each registry
    list is copied first (one atomic C call under the GIL): a reader thread that
    registers after the copy loads the active set after it too. A counter is a deque,
    true while it holds an entry; a dead reference gives None. O(reader threads)."""
    for reg in registry:
        for ref in reg[:]:
            counter: deque[None] | None = ref()
            if counter:
                return False
    return True


def synchronize(srcu: SrcuState) -> None:
    """``srcu.synchronize()``: return once every read section that may have loaded a
    set published before the call has ended (see :class:`memslots.sync.Srcu` for the
    algorithm and why it is safe). ``RuntimeError`` inside a read section of the calling
    thread, which would wait for itself forever. O(reader threads) plus the wait."""
    counters: tuple[deque[None], deque[None]] | None = srcu._local.__dict__.get("c")
    if counters is not None and (counters[0] or counters[1]):
        raise RuntimeError("synchronize() called inside a read section")
    with srcu._lock:
        idle = srcu._all_idle() if srcu._counters_need_lock else all_idle(srcu._registry)
        if not idle:
            idx = srcu._idx
            srcu._idx = idx ^ 1
            srcu._wait_for_readers(idx)
            srcu._idx = idx
            srcu._wait_for_readers(idx ^ 1)
        srcu.grace_periods += 1
