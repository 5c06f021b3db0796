"""The kernel's dirty ring of one :class:`memslots.kvm.KvmVm` vCPU, and what the engine
checks of it.

The ring is the kernel's own memory, mapped from the vCPU fd
(:meth:`memslots.kvm.vcpu.KvmVcpu.map_dirty_ring`), so its entries are exactly what KVM
published; :class:`KernelRing` reads and marks them with the same code the engine's rings
use (:meth:`memslots.dirty_ring.DirtyRing.harvest`). The kernel's private state (the
``dirty_index`` and ``reset_index`` counters, the soft-full request) is not visible, so
the engine keeps its own copy and checks the kernel against it.

What is compared, and why. The engine cannot know which pages a running guest writes, so
the guest's pushes themselves cannot be predicted; everything around them can:

- **Pushes** are learnt after every ``KVM_RUN`` (and before every harvest and reset): the
  entries from the engine's ``dirty_index`` on that have DIRTY set. Each must be
  plausible: it names a slot that was a logging slot at the start or the end of a run
  since the last check, with the offset inside that slot. New entries are contiguous by
  construction (anything else would not be found), in ring order.
- **The soft-full exit** is predicted exactly: a ``KVM_RUN`` entered with the request
  pending and the ring still soft-full must return ``KVM_EXIT_DIRTY_RING_FULL`` with no
  new entry; any ``KVM_EXIT_DIRTY_RING_FULL`` needs the ring soft-full. Not when another
  thread's ``KVM_RESET_DIRTY_RINGS`` freed entries of this ring while the run was on
  (``vcpu_enter_guest`` then looked at the request before or after the reset, which
  nobody outside the kernel can tell): such a run may exit either way, and its
  ``KVM_EXIT_DIRTY_RING_FULL`` needs only the ring soft-full at the run's start or a
  push during it.
- **Reset counts** are predicted exactly: from the engine's ``reset_index``, the entries
  marked RESET up to the first that is not, summed over the vCPUs in creation order; the
  kernel's ``KVM_RESET_DIRTY_RINGS`` must return that, and (when no vCPU ran meanwhile)
  must have cleared exactly those entries' flags.
- **Errnos** of enabling, resetting and vCPU creation are compared like every other call.

Host-side writes (``vcpu.write_guest`` or ``vcpu.mark_page_dirty`` from Python) never
reach the kernel's ring: the kernel does not see userspace writes. The vCPU records them
in a ring of the engine (its ``dirty_ring``), as QEMU keeps its own dirty bitmaps for its
own writes; :meth:`memslots.kvm.vm.KvmVcpuHandle.harvest_dirty_ring` returns the kernel's
entries, then those.
"""

from __future__ import annotations

import mmap
import threading
from collections.abc import Callable

from memslots.constants import KVM_DIRTY_GFN_F_MASK, U32_MAX
from memslots.dirty_ring import DirtyRing
from memslots.kvm.abi import KVM_EXIT_DIRTY_RING_FULL, KVM_EXIT_INTR
from memslots.kvm.vcpu import VcpuExit

__all__ = ["KernelRing", "LoggingSlots"]

#: ``{slot number: npages}`` of the slots that log dirty pages now
LoggingSlots = Callable[[], dict[int, int]]
#: ``report(call, detail)``: a difference between the kernel and the engine
Report = Callable[[str, str], None]


class KernelRing:
    """The kernel's ring of one vCPU, mapped, and the engine's copy of its private state
    (a :class:`memslots.kvm.vcpu.RunObserver` of the vCPU).

    :attr:`ring` is a :class:`memslots.dirty_ring.DirtyRing` over the mapping: its
    entries are the kernel's, its ``dirty_index``/``reset_index``/``soft_full_request``
    are the engine's model of the kernel's. Thread-safe: the vCPU thread learns pushes
    after its runs while another thread harvests or resets.
    """

    def __init__(
        self,
        mapping: mmap.mmap | bytearray,
        nbytes: int,
        logging_slots: LoggingSlots,
        report: Report,
    ) -> None:
        self.ring = DirtyRing(nbytes, mapping)
        # A ring mapped elsewhere (a kernel under QEMU) is a local copy with pull() (copy
        # the kernel's entries in) and push() (write back the flags changed here); the
        # local mapping is the kernel's memory itself and has neither.
        self._pull: Callable[[], None] | None = getattr(mapping, "pull", None)
        self._push: Callable[[], None] | None = getattr(mapping, "push", None)
        self._logging_slots = logging_slots
        self._report = report
        self._lock = threading.RLock()
        #: slots a push since the last check may name: union of run-boundary snapshots
        self._allowed: dict[int, int] = {}
        self._predict_full = False
        self._pushes_before = 0
        #: resets of this ring begun (:meth:`predict_reset`) and not yet applied
        self._resets_in_flight = 0
        #: True when a reset that frees entries overlapped the current (or last) run
        self._reset_overlap = False
        #: True while the vCPU is inside KVM_RUN; ``runs`` counts the runs started
        self.running = False
        self.runs = 0
        #: pushes learnt so far
        self.pushes = 0

    # -- RunObserver ----------------------------------------------------------------
    def before_run(self) -> None:
        """Learn what is new, note the slots a push may name, and predict the soft-full
        exit as ``vcpu_enter_guest`` decides it."""
        with self._lock:
            self.sync()
            self._widen(self._logging_slots())
            self._predict_full = self.ring.check_request()
            self._pushes_before = self.pushes
            self._reset_overlap = self._resets_in_flight > 0
            self.running = True
            self.runs += 1

    def after_run(self, exit: VcpuExit) -> None:
        """Learn the run's pushes and check the exit against the prediction."""
        with self._lock:
            self.running = False
            self._widen(self._logging_slots())
            self.sync()
            ring = self.ring
            reason = exit.reason
            if reason == KVM_EXIT_INTR:  # KVM_RUN stopped before looking at requests
                return
            if self._reset_overlap:  # see the module docstring
                pushed = self.pushes != self._pushes_before
                if reason == KVM_EXIT_DIRTY_RING_FULL and not (self._predict_full or pushed):
                    self._report(
                        "KVM_RUN",
                        "KVM_EXIT_DIRTY_RING_FULL although the ring was not soft-full when"
                        " the run began and the run pushed nothing",
                    )
                return
            if self._predict_full:
                if reason != KVM_EXIT_DIRTY_RING_FULL or self.pushes != self._pushes_before:
                    self._report(
                        "KVM_RUN",
                        f"the ring was soft-full with the request pending (used {ring.used}"
                        f" >= {ring.soft_limit}): expected KVM_EXIT_DIRTY_RING_FULL and no new"
                        f" entry, got exit {reason} and {self.pushes - self._pushes_before}"
                        " entries",
                    )
            elif reason == KVM_EXIT_DIRTY_RING_FULL and not ring.check_request():
                self._report(
                    "KVM_RUN",
                    f"KVM_EXIT_DIRTY_RING_FULL with used {ring.used} < soft limit "
                    f"{ring.soft_limit} or no request pending",
                )

    def _widen(self, slots: dict[int, int]) -> None:
        allowed = self._allowed
        for number, npages in slots.items():
            if allowed.get(number, -1) < npages:
                allowed[number] = npages

    # -- learning and checking ------------------------------------------------------
    def sync(self) -> int:
        """Learn the entries the kernel published since the last call and check each
        (see the module docstring); returns how many. O(new entries)."""
        with self._lock:
            if self._pull is not None:
                self._pull()
            ring = self.ring
            room = ring.size - ring.used
            if room <= 0:
                return 0
            start = ring.dirty_index
            n = ring.count_published(start, room)
            if not n:
                return 0
            allowed = self._allowed
            for k in range(n):
                e = ring.entry(start + k)
                npages = allowed.get(e.slot)
                if npages is None or e.offset >= npages:
                    self._report(
                        "KVM_RUN",
                        f"the kernel pushed {e} at ring index {start + k}, which no "
                        "logging slot of the runs since the last check can produce",
                    )
            ring.dirty_index = (start + n) & U32_MAX
            if ring.used >= ring.soft_limit:
                ring.soft_full_request = True
            self.pushes += n
            self._allowed = dict(self._logging_slots()) if not self.running else allowed
            return n

    def harvest(self) -> list[tuple[int, int]]:
        """Learn, then harvest the kernel's ring (userspace's side of the protocol, with
        :meth:`memslots.dirty_ring.DirtyRing.harvest`'s ordering). O(entries)."""
        with self._lock:
            self.sync()
            entries = self.ring.harvest()
            if self._push is not None and entries:
                self._push()
            return entries

    def predict_reset(self) -> int:
        """Learn, then what the kernel's reset of this ring must count; a reset that
        counts any is in flight until :meth:`apply_reset` or :meth:`end_reset`.
        O(count)."""
        with self._lock:
            self.sync()
            count = self.ring.count_harvested()
            if count:
                self._resets_in_flight += 1
                if self.running:
                    self._reset_overlap = True
            return count

    def end_reset(self, count: int) -> None:
        """The reset :meth:`predict_reset` counted ``count`` for is over (applied, or
        failed and so freed nothing)."""
        with self._lock:
            if count:
                self._resets_in_flight -= 1

    def apply_reset(self, count: int, runs_before: int) -> None:
        """The kernel reset ``count`` entries of this ring: advance ``reset_index``; if
        the vCPU has not run since ``runs_before``, check those entries are free now."""
        with self._lock:
            self.end_reset(count)
            ring = self.ring
            first = ring.reset_index
            ring.reset_index = (first + count) & U32_MAX
            if self.running or self.runs != runs_before or not count:
                return
            if self._pull is not None:
                self._pull()
            left = [
                i for i in range(first, first + count) if ring.entry(i).flags & KVM_DIRTY_GFN_F_MASK
            ]
            if left:
                self._report(
                    "reset_dirty_rings()",
                    f"{len(left)} entries the kernel counted still have flags set, "
                    f"first at ring index {left[0]}: {ring.entry(left[0])}",
                )

    def release(self) -> None:
        """Drop the views of the mapping (before the vCPU unmaps it)."""
        self.ring.release()
