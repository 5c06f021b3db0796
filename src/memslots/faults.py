"""Fault injection into the update protocol.

Every step of ``kvm_set_memslot`` that can fail in the kernel is a named point. Tests arm
a point to make the next pass through it fail with an errno, then check that the VM is
left exactly as the kernel leaves it (the error paths of ``kvm_set_memslot`` and
``kvm_set_memory_region``, ``virt/kvm/kvm_main.c``).

Points (in the order an update reaches them):

``kzalloc_new``
    allocation of the new slot (``__kvm_set_memory_region``): ENOMEM, nothing changed.
``kzalloc_invalid``
    allocation of the INVALID copy (DELETE, MOVE): ENOMEM, nothing changed.
``dirty_bitmap``
    dirty bitmap allocation in ``kvm_prepare_memory_region``: ENOMEM; a DELETE/MOVE has
    already been invalidated and is restored (two swaps: the generation still advances).
``arch_prepare``
    ``kvm_arch_prepare_memory_region`` (x86: metadata allocation): any errno, same
    rollback as ``dirty_bitmap``.
``invalidate_callback``
    a failing invalidation callback (the MMU-notifier side of the protocol), checked once
    per flush of a DELETE/MOVE whether or not callbacks are registered. Like the
    exceptions of real callbacks (``Vm.register_invalidate_callback``) it is recorded in
    ``Vm.callback_errors`` and the update completes: the kernel's flush cannot fail.
"""

from __future__ import annotations

import errno as _errno
from dataclasses import dataclass

from memslots.errors import MemslotError

POINTS = ("kzalloc_new", "kzalloc_invalid", "dirty_bitmap", "arch_prepare", "invalidate_callback")


@dataclass
class _Armed:
    errno: int
    skip: int
    times: int


class FaultInjector:
    """Named failure points. ``inject("dirty_bitmap")`` makes the next pass fail with
    ENOMEM; ``skip`` lets that many passes succeed first, ``times`` fails that many.
    Checking an unarmed injector is one dict truth test."""

    __slots__ = ("_armed", "hits")

    def __init__(self) -> None:
        self._armed: dict[str, _Armed] = {}
        #: how many faults each point has raised
        self.hits: dict[str, int] = dict.fromkeys(POINTS, 0)

    def inject(self, point: str, errno: int = _errno.ENOMEM, skip: int = 0, times: int = 1) -> None:
        """Arm ``point`` to fail ``times`` times with ``errno`` after ``skip`` passes."""
        if point not in POINTS:
            raise ValueError(f"unknown fault point {point!r}; known: {', '.join(POINTS)}")
        if times < 1 or skip < 0:
            raise ValueError("times must be >= 1 and skip >= 0")
        self._armed[point] = _Armed(errno, skip, times)

    def clear(self) -> None:
        """Disarm every point."""
        self._armed.clear()

    def armed(self, point: str) -> bool:
        """True while ``point`` still has faults to raise."""
        return point in self._armed

    def check(self, point: str) -> None:
        """Raise the armed fault of ``point`` (a :class:`MemslotError`), if any."""
        if not self._armed:
            return
        a = self._armed.get(point)
        if a is None:
            return
        if a.skip:
            a.skip -= 1
            return
        a.times -= 1
        if not a.times:
            del self._armed[point]
        self.hits[point] += 1
        raise MemslotError(a.errno, f"injected fault at {point}")
