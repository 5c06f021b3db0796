"""Grace periods for memslot readers, in the spirit of the kernel's SRCU.

Readers (vCPU threads, MMU-notifier-style hva walks) enter a *read section* before they
load the active memslot set and leave it when they no longer use that set. Entering and
leaving take no lock and never wait: each thread bumps a counter that only it writes.
:meth:`Srcu.synchronize` (the writer side) returns only once every read section that began
before the call has ended, so a set that was unpublished before ``synchronize()`` can be
changed afterwards without any reader seeing the change.

Algorithm: every thread owns a pair of counters; ``read_lock`` increments the counter
selected by the current index ``idx`` (0 or 1) and returns that index, ``read_unlock``
decrements the same one. ``synchronize`` flips ``idx`` and waits for the sum of the old
index's counters to drop to zero, twice (flip, wait, flip, wait). Two flips are needed
because a reader may load ``idx``, be preempted, and increment the *old* counter only after
the writer's first check; the second wait catches it. A reader that increments after the
writer published the new set also loads the set after that, so it can only see the new one.

Why this is correct
- GIL builds: bytecodes run one at a time in one global order (sequential consistency).
  A thread's counter list is written only by that thread (``c[i] += 1`` is a load and a
  store of one list item, no other thread writes it, so no update is lost), and the writer
  only reads it. The publish (one attribute store of the active set) happens before the
  flip; a reader's increment happens before its load of the active set.
- Free-threaded builds (PEP 703): the same reasoning holds if stores are not reordered
  after later loads. ``list.__setitem__`` on a shared list runs inside the list's
  per-object critical section (a mutex: an atomic read-modify-write, which is a full
  barrier on x86-64 and an acquire/release pair on arm64), and the writer's flip is done
  under ``_lock``; so a reader's counter store is globally visible before its load of the
  active set, which is what the kernel's ``smp_mb()`` in ``srcu_read_lock`` ensures.

Costs: an empty read section (``read_lock`` plus ``read_unlock``) is two method calls and
two list updates, measured in benchmarks/bench_sync.py; ``synchronize`` with no readers is
O(number of threads that ever read). Waiting spins with ``time.sleep(0)`` first and then
short sleeps, so a writer never burns a core against a long reader.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager


class _Counters(list[int]):
    """A thread's pair of read-section counters (a list subclass so it is weak-referable)."""

    __slots__ = ("__weakref__",)
    __hash__ = object.__hash__  # type: ignore[assignment]  # identity, for the WeakSet


class Srcu:
    """Sleepable-RCU-style grace periods: lock-free readers, waiting writers.

    - ``idx = srcu.read_lock()`` / ``srcu.read_unlock(idx)``: O(1), never block.
    - ``with srcu.read(): ...``: the same as a context manager.
    - ``srcu.synchronize()``: wait until every read section begun before it has ended.
      Must not be called from inside a read section of the same thread (it would wait
      for itself forever); this is detected and raises ``RuntimeError``.
    """

    __slots__ = ("_idx", "_local", "_lock", "_readers", "_reg_lock", "grace_periods")

    def __init__(self) -> None:
        self._idx = 0
        self._local = threading.local()
        self._readers: weakref.WeakSet[_Counters] = weakref.WeakSet()
        self._lock = threading.Lock()  # serialises writers
        self._reg_lock = threading.Lock()  # held only to add or snapshot readers
        #: completed grace periods (for tests and statistics)
        self.grace_periods = 0

    def _register(self) -> _Counters:
        c = _Counters((0, 0))
        self._local.c = c
        with self._reg_lock:
            self._readers.add(c)
        return c

    def read_lock(self) -> int:
        """Enter a read section; returns the index to pass to :meth:`read_unlock`."""
        try:
            c: _Counters = self._local.c
        except AttributeError:
            c = self._register()
        i = self._idx
        c[i] += 1
        return i

    def read_unlock(self, idx: int) -> None:
        """Leave the read section entered by the matching :meth:`read_lock`."""
        self._local.c[idx] -= 1

    @contextmanager
    def read(self) -> Iterator[None]:
        """``with srcu.read():`` a read section as a context manager."""
        i = self.read_lock()
        try:
            yield
        finally:
            self.read_unlock(i)

    def in_read_section(self) -> bool:
        """True when the calling thread is inside a read section."""
        c: _Counters | None = getattr(self._local, "c", None)
        return c is not None and (c[0] > 0 or c[1] > 0)

    def synchronize(self) -> None:
        """Wait for a grace period: every read section that began before this call ends."""
        if self.in_read_section():
            raise RuntimeError("synchronize() called inside a read section")
        with self._lock:
            for _ in range(2):
                old = self._idx
                self._idx = old ^ 1
                self._wait_for_readers(old)
            self.grace_periods += 1

    def _wait_for_readers(self, idx: int) -> None:
        with self._reg_lock:
            readers = list(self._readers)
        spins = 0
        while True:
            busy = [c for c in readers if c[idx]]
            if not busy:
                return
            readers = busy
            spins += 1
            time.sleep(0 if spins < 100 else 0.0001)
