"""The kernel's lock assertions (``include/linux/lockdep.h``): preconditions of the
update protocol, checked in debug mode.

``kvm_swap_active_memslots``, ``kvm_replace_memslot`` and their callers assert that
``kvm->slots_lock`` is held. The engine and the array baseline check the same with
:func:`lockdep_assert_held`, always written ``if __debug__: lockdep_assert_held(...)`` so
that ``python -O`` pays nothing. A module of its own (compiled in the compiled build), as
the check runs several times on every update.
"""

from __future__ import annotations

import threading

from memslots.errors import InvariantError

__all__ = ["lockdep_assert_held"]


def lockdep_assert_held(lock: threading.RLock, what: str) -> None:
    """The kernel's ``lockdep_assert_held(lock)``: raise
    :class:`memslots.errors.InvariantError` unless the calling thread holds ``lock`` (a
    :func:`threading.RLock`). Callers write ``if __debug__: lockdep_assert_held(...)``,
    so that the check costs nothing under ``python -O``. O(1).

    >>> import threading
    >>> lock = threading.RLock()
    >>> with lock:
    ...     lockdep_assert_held(lock, "swap")
    >>> lockdep_assert_held(lock, "swap")
    Traceback (most recent call last):
    ...
    memslots.errors.InvariantError: swap: lock not held by this thread
    """
    if not lock._is_owned():  # type: ignore[attr-defined]
        raise InvariantError(f"{what}: lock not held by this thread")
