"""Grace periods for memslot readers, in the spirit of the kernel's SRCU.

Readers (vCPU threads, MMU-notifier-style hva walks) enter a *read section* before they
load the active memslot set and leave it when they no longer use that set. Entering and
leaving take no lock and never wait. :meth:`Srcu.synchronize` (the writer side) returns
only once every read section that could have loaded a set published before the call has
ended, so a set that was unpublished before ``synchronize()`` can be changed afterwards
without any reader seeing the change.

Algorithm
---------
Every thread that reads owns two counters, one per index ``i`` in {0, 1}. A counter is a
:class:`collections.deque` whose length is the number of the thread's open read sections
counted on that index. ``read_lock`` loads the current index ``idx``, adds an entry to that
counter and returns the counter itself as the token; ``read_unlock(token)`` is
``deque.pop`` itself. So the fast path finds the thread's counters with one
``threading.local`` attribute load (on entry only: the token carries the counter to the
exit) and updates them with one C operation each way.

``synchronize`` (one writer at a time, under ``_lock``) flips ``idx``, waits until every
thread's counter of the old index has been seen empty, flips ``idx`` back and waits the
same way for the other index.

Why it is safe (both builds)
    The writer publishes a new set (unpublishing the set S that was active), then calls
    ``synchronize``. Let R be a read section that loaded S while it was active. R appended
    to some counter ``c`` of its thread before that load, and the load came before the
    unpublish, so the append came before ``synchronize`` started. ``synchronize`` waits
    on *both* indices, and each wait reads ``c`` only after it started; every such read
    sees R's entry until R pops it (counts are exact: see below). So the wait that covers
    ``c``'s index cannot finish before R ends. Conversely a reader whose append is not
    seen by that wait made it after the writer's read, hence after the unpublish, and
    loads the new set. Which index a reader picked does not matter for safety, only for
    progress.

Why it terminates
    Readers that load ``idx`` after a flip count on the other index, so a stream of new
    readers cannot keep the waited-for counter busy: each wait lasts as long as the
    sections that were already open, plus at most one late entry per thread (one that
    loaded ``idx`` just before the flip and appended just after). Flipping twice restores
    ``idx``, and both indices are drained with the same bound.

Why the counts are exact and the order holds
    - GIL builds: ``deque.append`` and ``deque.pop`` are single C calls that do not release
      the GIL, so they are atomic; no update is lost even if a token is handed to another
      thread and released there. Bytecodes of all threads run one at a time in one global
      order (sequential consistency), so "before" above is that order: the publish (one
      store into ``Vm._memslots``) precedes the writer's reads of the counters, and a
      reader's append precedes its load of the active set.
    - Free-threaded builds (PEP 703): plain loads and stores are no longer sequentially
      consistent, and the reader's "append, then load the set" against the writer's
      "publish, then read the counter" is the store-buffering pattern that needs a full
      barrier on both sides (the kernel's ``smp_mb()`` in ``srcu_read_lock`` and
      ``synchronize_srcu``). Pure Python has no fence, and the per-object critical
      sections of builtins are not documented as one. So on these builds :class:`Srcu`
      is :class:`LockedSrcu`: each thread's counters carry a ``threading.Lock``; the
      reader changes its counter while holding it and the writer reads the counter while
      holding it. Lock release/acquire orders memory (happens-before), which turns the
      argument above into: either the writer's read of ``c`` follows the reader's append
      (it sees the entry) or the reader's append follows the writer's read, and then
      everything the writer did before it, including the publish, happens before the
      reader's load of the set. Registration (below) takes a lock there too, so a reader
      the writer's copy of the registry misses registered after the copy and sees the
      publish. A reader can then wait for the writer's O(1) read of its own counter (a
      few instructions), never for a grace period or an update. The choice is made by
      build (``sysconfig``'s ``Py_GIL_DISABLED``), not by whether the GIL is currently
      on: the locked variant is also correct with a GIL.

Interrupts (GIL builds). ``KeyboardInterrupt`` is raised in the main thread at the
interpreter's periodic checks, which CPython 3.11 makes at function entry, on backward
jumps and after calls of C functions, not after operators nor on return. A section
counted but never left would make every later ``synchronize`` wait forever, so the entry
is ``counter += (None,)`` (an operator, after which ``read_lock`` only returns) instead
of ``counter.append(None)`` (a call, after which an interrupt would be raised with the
entry counted but the token lost), and ``read_unlock`` is the C function ``deque.pop``,
which runs before any check. So with the usual pattern ``tok = srcu.read_lock()``,
``try: ... finally: srcu.read_unlock(tok)``, an interrupt anywhere leaves the counts
exact (tests/test_sync.py interrupts such a loop thousands of times). The ``with
srcu.read():`` form and :class:`LockedSrcu` run Python code between the count and the
caller (``__exit__``, the lock release), where an interrupt can still leak a section; use
the explicit form where that matters.

The compiled build (see ``memslots.COMPILED``) keeps this module interpreted, on purpose.
The exit argument would survive compilation (``read_unlock`` is ``deque.pop`` either
way), the entry argument would not: an interpreted caller's ``tok = srcu.read_lock()``
would then be a call of a C function, after which CPython checks for interrupts, which is
the window of ``counter.append(None)`` again (entry counted, token lost). Interpreted,
``read_lock`` is entered through the eval loop (an interrupt is raised at its entry,
before the count) and returns without a check, to interpreted and compiled callers alike;
the compiled engine's lookups make no interrupt checks of their own between that return
and their ``try``, nor before ``read_unlock`` (compiled code checks only where it calls
back into Python or into C that checks, like ``time.sleep``). The writer side has none of
these concerns and runs on every update, so its fast path lives in
:mod:`memslots.grace_period`, which the compiled build compiles.

Registration: a thread's first read section creates its counters and appends weak
references to them to two registry lists (under the GIL a list append is atomic, so no
lock); a thread that exits drops its counters and a weakref callback removes them.
``synchronize`` copies the registry, so it costs O(number of live reader threads) plus
the wait. A thread that registers after the writer's copy registers, appends and loads
the set after it, so it sees the publish.

Costs (benchmarks/bench_sync.py): an empty read section, ``read_unlock(read_lock())``, is
two Python calls, one ``threading.local`` lookup and two C deque operations, about 110 ns
on this machine with CPython 3.11. Waiting writers poll: ``time.sleep(0)`` (which hands
the GIL to readers) for the first polls, then 50 us sleeps, so a writer never burns a core
against a long reader.

Writer latency and expedited grace periods. With the GIL, a writer that finds a reader
inside a section hands the GIL over and gets it back only when the interpreter next
switches threads (``sys.getswitchinterval()``, 5 ms by default) if the readers are busy,
so a grace period with CPU-bound readers costs milliseconds. ``Srcu(expedited=True)``
(:class:`ExpeditedSrcu`) shortens that the way the kernel's
``synchronize_srcu_expedited`` (which ``kvm_swap_active_memslots`` uses) does, by
disturbing readers: while a writer waits, a reader entering a read section first yields
the GIL (``time.sleep(0)``), so a reader that just left the section the writer waits for
hands over at once. Readers still never wait for a grace period; they give up their time
slice, and entering a section costs one more attribute test and call (tens of ns). The
counting itself is written once (:meth:`Srcu.read_lock`): the expedited variant yields
and then calls it, and :class:`LockedSrcu`'s counters take their lock in their ``+=``.
The benchmark shows the costs. It only matters with a GIL, so free-threaded builds use
:class:`LockedSrcu` either way.
"""

from __future__ import annotations

import sysconfig
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any, Self, cast

from memslots import grace_period as _grace_period

#: True on free-threaded (PEP 703) builds: :class:`Srcu` then builds a :class:`LockedSrcu`
FREE_THREADED_BUILD = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))

#: the token ``read_lock`` returns: the calling thread's counter it entered on
SrcuToken = deque[None]

#: what ``read_lock`` adds to a counter (with ``+=``: see "Interrupts" above)
_ENTRY = (None,)

#: polls of a waiting writer that only yield (``time.sleep(0)``) before it sleeps
_YIELD_POLLS = 64
#: sleep between later polls, seconds
_POLL_SLEEP = 50e-6


class _LockedCounter(deque[None]):
    """A reader thread's counter in :class:`LockedSrcu`: a deque plus the thread's lock,
    which its ``+=`` (the entry of :meth:`Srcu.read_lock`) holds."""

    __slots__ = ("lock",)

    def __init__(self, lock: threading.Lock) -> None:
        super().__init__()
        self.lock = lock

    def __iadd__(self, entries: Iterable[None]) -> Self:
        with self.lock:
            self.extend(entries)
        return self


class _ReadSection:
    """The context manager of :meth:`Srcu.read` (cheaper than a generator-based one)."""

    __slots__ = ("_srcu", "_token")

    def __init__(self, srcu: Srcu) -> None:
        self._srcu = srcu

    def __enter__(self) -> None:
        self._token = self._srcu.read_lock()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._srcu.read_unlock(self._token)


class Srcu:
    """Sleepable-RCU-style grace periods: lock-free readers, waiting writers.

    - ``tok = srcu.read_lock()`` / ``srcu.read_unlock(tok)``: enter and leave a read
      section, O(1), never wait. Sections nest. ``tok`` is opaque (the kernel's ``idx``);
      it may be released by another thread.
    - ``with srcu.read(): ...``: the same as a context manager.
    - ``srcu.synchronize()``: wait until every read section that may have loaded a set
      published before the call has ended. O(reader threads) plus the wait. Calling it
      inside a read section of the same thread would wait for itself forever; this is
      detected and raises ``RuntimeError``.

    ``Srcu()`` returns a :class:`LockedSrcu` on free-threaded builds (see the module
    docstring) or when called as ``Srcu(locked=True)``, and an :class:`ExpeditedSrcu`
    for ``Srcu(expedited=True)`` on GIL builds.
    """

    __slots__ = ("_idx", "_local", "_lock", "_registry", "grace_periods")

    def __new__(cls, *, locked: bool | None = None, expedited: bool = False) -> Srcu:
        if cls is Srcu:
            if FREE_THREADED_BUILD if locked is None else locked:
                cls = LockedSrcu
            elif expedited:
                cls = ExpeditedSrcu
        return object.__new__(cls)

    def __init__(self, *, locked: bool | None = None, expedited: bool = False) -> None:
        self._idx = 0
        self._local = threading.local()
        #: weak references to every live thread's counter, per index
        self._registry: tuple[list[weakref.ref[Any]], list[weakref.ref[Any]]] = ([], [])
        self._lock = threading.Lock()  # serialises writers
        #: completed grace periods (for tests and statistics)
        self.grace_periods = 0

    # --- read side ----------------------------------------------------------------------
    def _new_counters(self) -> tuple[SrcuToken, SrcuToken]:
        return deque(), deque()

    def _register(self) -> tuple[SrcuToken, SrcuToken]:
        """Create and publish the calling thread's counters (its first read section).
        They are registered before the thread uses them (an interrupt in between leaves
        only registrations of counters that die at once)."""
        counters = self._new_counters()
        for reg, c in zip(self._registry, counters, strict=True):
            reg.append(weakref.ref(c, reg.remove))
        self._local.c = counters
        return counters

    def _registered(self, idx: int) -> list[weakref.ref[Any]]:
        """A copy of the registry of index ``idx`` (an atomic list copy under the GIL)."""
        return self._registry[idx][:]

    def read_lock(self) -> SrcuToken:
        """Enter a read section; returns the token to pass to :meth:`read_unlock`. O(1),
        never waits."""
        try:
            c: SrcuToken = self._local.c[self._idx]
        except AttributeError:
            c = self._register()[self._idx]
        # The count is the last thing: `+=` (an operator), not c.append(None) (a call,
        # after which an interrupt could strike with the entry counted but the token
        # lost); see "Interrupts" in the module docstring.
        c += _ENTRY
        return c

    #: ``read_unlock(token)``: leave the read section entered by the :meth:`read_lock`
    #: that returned ``token``. O(1), never waits. It is ``deque.pop`` itself, a C
    #: function, so that no interrupt can come between the call and the exit; an
    #: unbalanced call raises ``IndexError``.
    read_unlock: Callable[[SrcuToken], object] = staticmethod(deque.pop)

    def read(self) -> _ReadSection:
        """``with srcu.read():`` a read section as a context manager. O(1)."""
        return _ReadSection(self)

    def in_read_section(self) -> bool:
        """True when the calling thread has an open read section. O(1)."""
        # the thread's own __dict__ of the local: getattr(local, "c", None) would build and
        # drop an AttributeError in every thread that never read (most writers)
        counters: tuple[SrcuToken, SrcuToken] | None = self._local.__dict__.get("c")
        return counters is not None and bool(counters[0] or counters[1])

    def reader_threads(self) -> int:
        """Number of live threads that have entered a read section. O(1)."""
        return len(self._registry[0])

    # --- write side ---------------------------------------------------------------------
    #: whether a counter may only be read under its lock (:class:`LockedSrcu`)
    _counters_need_lock = False

    def synchronize(self) -> None:
        """Wait for a grace period (see the class docstring). Never call it inside a read
        section; a writer holding a lock that readers take would deadlock as well. The
        work is :func:`memslots.grace_period.synchronize`'s (compiled in the compiled
        build): when every reader is outside its sections it ends at once, else it runs
        the two flips of ``idx`` with :meth:`_wait_for_readers`."""
        _grace_period.synchronize(self)

    def _all_idle(self) -> bool:
        """True when every registered counter of both indices is empty right now. Then
        every read section that may have loaded a set published before the call has
        ended (the safety argument above, with both waits finding their counters empty
        at once), so the grace period is over without flipping ``idx``; the flips are
        only needed, for termination, when readers are inside. O(reader threads).
        (:func:`memslots.grace_period.synchronize` tests this itself for the counters
        that need no lock.)"""
        busy = self._busy
        for idx in (0, 1):
            for r in self._registered(idx):
                c = r()
                if c is not None and busy(c):
                    return False
        return True

    def _busy(self, c: SrcuToken) -> bool:
        return bool(c)

    def _wait_for_readers(self, idx: int) -> None:
        """Return once every registered counter of ``idx`` has been seen empty."""
        busy = self._busy
        pending = [c for r in self._registered(idx) if (c := r()) is not None and busy(c)]
        polls = 0
        while pending:
            polls += 1
            time.sleep(0 if polls < _YIELD_POLLS else _POLL_SLEEP)
            pending = [c for c in pending if busy(c)]


class ExpeditedSrcu(Srcu):
    """:class:`Srcu` whose waiting writers ask readers to yield: while ``synchronize``
    waits, a reader entering a read section first calls ``time.sleep(0)``, handing the
    GIL over so the writer sees the sections it waits for end without waiting for the
    thread switch interval (see the module docstring). Same API and complexity."""

    __slots__ = ("_expediting",)

    def __init__(self, *, locked: bool | None = None, expedited: bool = True) -> None:
        super().__init__()
        #: writers waiting right now (read by readers entering a section)
        self._expediting = 0

    def read_lock(self) -> SrcuToken:
        """Enter a read section (:meth:`Srcu.read_lock`), after yielding the GIL if a
        writer is waiting."""
        if self._expediting:
            time.sleep(0)
        return Srcu.read_lock(self)  # no interrupt check on the way back: still safe

    def _wait_for_readers(self, idx: int) -> None:
        self._expediting += 1  # only under _lock: one writer at a time
        try:
            super()._wait_for_readers(idx)
        finally:
            self._expediting -= 1


class LockedSrcu(Srcu):
    """:class:`Srcu` for free-threaded builds: each reader thread's counters carry a lock
    that the reader holds while it changes them and the writer holds while it reads them,
    so that lock release/acquire orders the reader's entry against the writer's check (see
    the module docstring). Same API and complexity; readers may wait only for the writer's
    O(1) read of their own counter."""

    __slots__ = ("_reg_lock",)

    _counters_need_lock = True

    def __init__(self, *, locked: bool | None = None, expedited: bool = False) -> None:
        super().__init__()
        self._reg_lock = threading.Lock()  # orders registrations against registry copies

    def _new_counters(self) -> tuple[SrcuToken, SrcuToken]:
        lock = threading.Lock()
        return _LockedCounter(lock), _LockedCounter(lock)

    def _register(self) -> tuple[SrcuToken, SrcuToken]:
        with self._reg_lock:
            return super()._register()

    def _registered(self, idx: int) -> list[weakref.ref[Any]]:
        with self._reg_lock:
            return super()._registered(idx)

    def read_unlock(self, token: SrcuToken) -> None:
        """Leave a read section (see :meth:`Srcu.read_unlock`), holding the thread's
        lock."""
        with cast(_LockedCounter, token).lock:
            token.pop()

    def _busy(self, c: SrcuToken) -> bool:
        with cast(_LockedCounter, c).lock:
            return bool(c)


__all__ = [
    "FREE_THREADED_BUILD",
    "ExpeditedSrcu",
    "LockedSrcu",
    "Srcu",
    "SrcuToken",
]
