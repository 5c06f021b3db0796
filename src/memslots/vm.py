"""The VM: address spaces with two memslot sets each, and the update protocol.

This module is the kernel's ``kvm_set_memslot`` and its helpers, in the kernel's names and
order; read :meth:`Vm._set_memslot` top to bottom. The design (commit a54d806688fe, "KVM:
Keep memslots in tree-based structures instead of array-based ones"):

- Memslot data lives apart from the sets. Each address space has two
  :class:`~memslots.memslot_set.MemslotSet` objects, the *active* one (published in
  ``Vm._memslots[as_id]``, read by lookups) and the *inactive* one. Outside an update both
  hold the very same :class:`~memslots.slot.Memslot` objects.
- An update changes only the inactive set, replacing just the one slot that changes with
  its copy (O(log n)), publishes it (a swap), waits for a grace period so no reader still
  uses the previously active set, then applies the same replacement there. Both sets then
  share every slot again.
- DELETE and MOVE first publish an INVALID copy of the slot, so that while the slot is
  being taken away lookups find the INVALID copy (and guest accesses fault) instead of a
  slot that is about to disappear.
- Generations: both sets of address space ``as`` start at ``as``; a swap sets bit 63 in the
  set being published and, once readers of the old set are gone, stores
  ``old + nr_address_spaces``. Caches tagged with a generation (vCPU last-used slot) can
  therefore never confuse two states of the sets.

Locks: ``slots_lock`` serialises writers (one update at a time). Readers take no lock:
they use :class:`~memslots.sync.Srcu` read sections, which never block.
"""

from __future__ import annotations

from errno import EINVAL
from typing import TYPE_CHECKING

from mypy_extensions import mypyc_attr

from memslots import dirty_log as _dirty_log
from memslots import dirty_ring as _dirty_ring
from memslots import guest_memory as _guest_memory
from memslots.constants import (
    KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS,
    KVM_MEMSLOT_INVALID,
)
from memslots.errors import MemslotError, require
from memslots.lockdep import lockdep_assert_held
from memslots.memslot_set import MemslotSet
from memslots.slot import Memslot
from memslots.sync import FREE_THREADED_BUILD
from memslots.validate import (
    Change,
    Decision,
    LimitsSource,
    check_gmem_only,
    check_max_gfn,
    make_limits,
)
from memslots.vm_api import VmApi

if TYPE_CHECKING:
    from typing_extensions import Buffer

#: the vCPU cache hit path may skip the read section (see Vcpu.gfn_to_memslot)
_LOCK_FREE_HIT = not FREE_THREADED_BUILD


@mypyc_attr(allow_interpreted_subclasses=True)
class Vcpu:
    """A vCPU's view of the memslots: its address space and its last-used-slot cache,
    and, when the VM has one, its dirty ring (:attr:`dirty_ring`, a
    :class:`memslots.dirty_ring.DirtyRing`).

    ``as_id`` may be changed at any time (x86 SMM entry/exit switches to address space 1).
    The cache is dropped whenever the active set's generation differs from the one it was
    filled under (``kvm_vcpu_gfn_to_memslot``). :meth:`mark_page_dirty` and
    :meth:`write_guest` are writes made by this vCPU: with a ring on they push into its
    ring, otherwise they mark dirty bitmaps.

    >>> vm = Vm()
    >>> vm.set_user_memory_region(0, 0, 0, 0x10000, 0x7F0000000000)
    >>> vcpu = vm.create_vcpu(0)
    >>> vcpu.gfn_to_memslot(3) is vcpu.last_used_slot is vm.id_to_memslot(0)
    True
    >>> vcpu.as_id = 1          # SMM: address space 1 has no slots
    >>> vcpu.gfn_to_memslot(3) is None
    True
    """

    __slots__ = ("as_id", "dirty_ring", "id", "last_used_slot", "last_used_slot_gen", "vm")

    def __init__(self, vm: Vm, id: int) -> None:
        self.vm = vm
        self.id = id
        self.as_id = 0
        self.last_used_slot: Memslot | None = None
        self.last_used_slot_gen = -1
        #: the vCPU's dirty ring (``kvm_dirty_ring_alloc`` at creation), None while off
        self.dirty_ring = vm.dirty_rings.new_ring()

    def gfn_to_memslot(self, gfn: int) -> Memslot | None:
        """The slot holding ``gfn`` in this vCPU's address space, or None.

        Hit: O(1), no read section: a cached slot whose generation equals the active set's
        generation was in that set when it was loaded (every swap changes the generation).
        That argument needs the GIL's ordering of loads; free-threaded builds take the
        read section for hits too.
        Miss: a read section and one O(log n) search of the active set; the VM-wide cache
        is deliberately not used, as in the kernel.
        """
        vm = self.vm
        slots = vm._memslots[self.as_id]
        if _LOCK_FREE_HIT and slots.generation == self.last_used_slot_gen:
            s = self.last_used_slot
            if s is not None and s.base_gfn <= gfn < s.base_gfn + s.npages:
                return s
        srcu = vm.srcu
        idx = srcu.read_lock()
        try:
            slots = vm._memslots[self.as_id]
            gen = slots.generation
            if gen != self.last_used_slot_gen:
                self.last_used_slot = None
                self.last_used_slot_gen = gen
            s = slots.search(gfn)
            if s is not None:
                self.last_used_slot = s
            return s
        finally:
            srcu.read_unlock(idx)

    def memslots(self) -> MemslotSet:
        """The active set of this vCPU's address space (hold a read section to use it)."""
        return self.vm._memslots[self.as_id]

    # -- writes by this vCPU and its dirty ring (memslots.dirty_ring) ---------------
    def mark_page_dirty(self, gfn: int) -> None:
        """``kvm_vcpu_mark_page_dirty``: a write by this vCPU to ``gfn`` (its address
        space): pushed into its ring when the VM has one (per
        ``vm.dirty_rings.push_mode``), else the page's bitmap bit; nothing for a hole or a
        slot that does not log. O(1) on a slot-cache hit, O(log n) otherwise."""
        srcu = self.vm.srcu
        idx = srcu.read_lock()
        try:
            _dirty_ring.mark_page_dirty_in_slot(
                self.vm.dirty_rings, self.dirty_ring, self.gfn_to_memslot(gfn), gfn
            )
        finally:
            srcu.read_unlock(idx)

    def write_guest(self, gpa: int, data: Buffer) -> None:
        """``kvm_vcpu_write_guest``: as :meth:`Vm.write_guest` in this vCPU's address
        space, each written page marked as by :meth:`mark_page_dirty` (in page order).
        O(len(data))."""
        _guest_memory.write_guest(self.vm, gpa, data, as_id=self.as_id, mark=self._mark_run)

    def _mark_run(self, slot: Memslot, gfn: int, count: int) -> None:
        _dirty_ring.mark_pages_dirty_in_slot(self.vm.dirty_rings, self.dirty_ring, slot, gfn, count)

    def harvest_dirty_ring(self) -> list[tuple[int, int]]:
        """The ``(slot, offset)`` of every entry this vCPU's ring published that was not
        harvested yet, in ring order; each is marked harvested (``KVM_DIRTY_GFN_F_RESET``)
        as a VMM does. EINVAL when the VM has no ring. O(entries)."""
        ring = self.dirty_ring
        if ring is None:
            raise MemslotError(EINVAL, "the VM has no dirty ring")
        return ring.harvest()

    def __repr__(self) -> str:
        return f"Vcpu(id={self.id}, as_id={self.as_id})"


@mypyc_attr(allow_interpreted_subclasses=True)
class Vm(VmApi[MemslotSet]):
    """A virtual machine's memslots: the tree-based engine with the kernel's semantics.

    ``Vm()`` has x86-64 defaults (2 address spaces, 32764 user slots, max gfn 2^40-1,
    READONLY supported). Keyword arguments: ``nr_address_spaces``, ``max_user_slots``,
    ``max_gfn``, ``readonly_mem``, ``private_mem``, ``task_size_max``.

    Writers: :meth:`set_user_memory_region` and :meth:`set_user_memory_region2` (O(log n)
    each; one at a time, under ``slots_lock``). Readers: :meth:`gfn_to_memslot`,
    :meth:`memslots`, vCPUs; they never block. Lookups, dirty logging and guest memory
    are :class:`memslots.vm_api.VmApi`'s. ``publish_observer`` (None by default, see
    :class:`memslots.vm_api.PublishObserver`) watches every swap.

    >>> vm = Vm()
    >>> vm.set_user_memory_region(1, 0, 0x200000, 0x2000, 0x7F0000000000)
    >>> vm.last_change, vm.nr_memslot_pages, vm.memslots(0).generation
    (<Change.CREATE: 'create'>, 2, 2)
    >>> vm.set_user_memory_region(1, 0, 0x400000, 0x2000, 0x7F0000000000)   # a MOVE
    >>> vm.last_change, vm.id_to_memslot(1).base_gfn, vm.memslots(0).generation
    (<Change.MOVE: 'move'>, 1024, 6)
    >>> vm.set_user_memory_region(1, 0, 0, 0, 0)                            # a DELETE
    >>> len(vm.memslots(0)), vm.nr_memslot_pages
    (0, 0)
    """

    def __init__(
        self,
        *,
        profile: LimitsSource | None = None,
        vm_type: int = 0,
        nr_address_spaces: int | None = None,
        max_user_slots: int | None = None,
        max_gfn: int | None = None,
        readonly_mem: bool | None = None,
        private_mem: bool | None = None,
        task_size_max: int | None = None,
    ) -> None:
        super().__init__(
            make_limits(
                profile,
                vm_type,
                nr_address_spaces,
                max_user_slots,
                max_gfn,
                readonly_mem,
                private_mem,
                task_size_max,
            )
        )
        nr_address_spaces = self.limits.nr_address_spaces
        #: both sets of each address space: ``_sets[as_id][node_idx]``
        self._sets = [(MemslotSet(a, 0), MemslotSet(a, 1)) for a in range(nr_address_spaces)]
        #: the published (active) set of each address space
        self._memslots = [pair[0] for pair in self._sets]
        self._vcpus: dict[int, Vcpu] = {}
        #: an interrupt that arrived during an update, raised when the update completes
        self._deferred: BaseException | None = None

    # ==================================================================================
    # The ioctls
    # ==================================================================================
    def set_user_memory_region(
        self, slot: int, flags: int, guest_phys_addr: int, memory_size: int, userspace_addr: int
    ) -> None:
        """``KVM_SET_USER_MEMORY_REGION``: create, delete (size 0), move or change the
        flags of a slot. Raises :class:`MemslotError` with the kernel's errno; a failure
        changes nothing (except the generation of a DELETE/MOVE that failed in prepare,
        as in the kernel). O(log n)."""
        with self.slots_lock:
            self._apply(
                self.check_region(False, slot, flags, guest_phys_addr, memory_size, userspace_addr)
            )

    def set_user_memory_region2(
        self,
        slot: int,
        flags: int,
        guest_phys_addr: int,
        memory_size: int,
        userspace_addr: int,
        guest_memfd_offset: int = 0,
        guest_memfd: int = 0,
    ) -> None:
        """``KVM_SET_USER_MEMORY_REGION2``: as :meth:`set_user_memory_region`, also taking
        ``KVM_MEM_GUEST_MEMFD`` (when the VM allows it: ``private_mem``), which binds the
        slot to ``[guest_memfd_offset, + memory_size)`` of a guest_memfd made by
        :meth:`create_guest_memfd`. O(log n)."""
        with self.slots_lock:
            d = self.check_region(
                True,
                slot,
                flags,
                guest_phys_addr,
                memory_size,
                userspace_addr,
                guest_memfd_offset,
                guest_memfd,
            )
            self._apply(d)

    def _apply(self, d: Decision) -> None:
        """Carry out a validated request (the end of ``kvm_set_memory_region``). Private:
        a :class:`Decision` is only valid for the state it was made against, under
        ``slots_lock``.
        ``RuntimeError`` (and nothing changed) when the calling thread is inside a read
        section of this VM, whose grace period the update would wait for forever (the
        kernel's lockdep reports the same as an illegal ``synchronize_srcu``)."""
        with self.slots_lock:
            if d.change is Change.NONE:
                self.last_change = Change.NONE
                return
            self._check_not_in_read_section()
            new: Memslot | None = None
            if d.change is not Change.DELETE:
                self.faults.check("kzalloc_new")
                new = Memslot(
                    d.id, d.as_id, d.base_gfn, d.npages, d.flags, d.userspace_addr,
                    None, None, self.limits.page_shift,
                )  # fmt: skip
                if d.flags & KVM_MEM_GUEST_MEMFD:
                    self.guest_memfds.bind(
                        new, d.guest_memfd, d.guest_memfd_offset, self.limits.gmem_bound_errno
                    )
            try:
                self._set_memslot(d.old, new, d.change)
            except MemslotError:
                if new is not None:
                    self.guest_memfds.unbind(new)
                raise
            finally:
                deferred, self._deferred = self._deferred, None
                if deferred is not None:
                    raise deferred
            self.last_change = d.change

    # ==================================================================================
    # The update protocol: kvm_set_memslot and its helpers
    # ==================================================================================
    def _set_memslot(self, old: Memslot | None, new: Memslot | None, change: Change) -> None:
        """``kvm_set_memslot``: the whole update, with rollback on failure."""
        if __debug__:
            lockdep_assert_held(self.slots_lock, "kvm_set_memslot")
        invalid: Memslot | None = None
        if change in (Change.DELETE, Change.MOVE):
            assert old is not None
            # The INVALID copy must exist before anything is touched.
            self.faults.check("kzalloc_invalid")
            # Swap #1: readers now find the INVALID copy; `old` stays in the other set.
            invalid = self._invalidate_memslot(old)

        try:
            self._prepare_memory_region(old, new, change)
        except MemslotError:
            if invalid is not None:
                # Swap #2 in reverse: readers see `old` again and both sets hold it.
                assert old is not None
                self._activate_memslot(invalid, old)
            raise

        # From here on nothing can fail.
        if change is Change.CREATE:
            assert new is not None
            self._create_memslot(new)
        elif change is Change.DELETE:
            assert old is not None and invalid is not None
            self._delete_memslot(old, invalid)
        elif change is Change.MOVE:
            assert old is not None and new is not None and invalid is not None
            self._move_memslot(old, new, invalid)
        elif change is Change.FLAGS_ONLY:
            assert old is not None and new is not None
            self._update_flags_memslot(old, new)
        else:  # pragma: no cover
            raise AssertionError(change)

        self._commit_memory_region(old, new, change)

    def _create_memslot(self, new: Memslot) -> None:
        """``kvm_create_memslot``: add to the inactive set, publish, add to the other."""
        self._replace_memslot(None, new)
        self._activate_memslot(None, new)

    def _delete_memslot(self, old: Memslot, invalid: Memslot) -> None:
        """``kvm_delete_memslot``: remove `old` from the inactive set (the INVALID copy is
        published), publish that, then remove the INVALID copy from the other set."""
        self._replace_memslot(old, None)
        self._activate_memslot(invalid, None)

    def _move_memslot(self, old: Memslot, new: Memslot, invalid: Memslot) -> None:
        """``kvm_move_memslot``: `old` becomes `new` in the inactive set, publish, then the
        INVALID copy becomes `new` in the other set."""
        self._replace_memslot(old, new)
        self._activate_memslot(invalid, new)

    def _update_flags_memslot(self, old: Memslot, new: Memslot) -> None:
        """``kvm_update_flags_memslot``: one swap, no INVALID step."""
        self._replace_memslot(old, new)
        self._activate_memslot(old, new)

    def _inactive_memslots(self, as_id: int) -> MemslotSet:
        """``kvm_get_inactive_memslots``: the set of ``as_id`` that is not published
        (only writers may touch it: the kernel's ``__kvm_memslots`` checks that they hold
        ``slots_lock``)."""
        if __debug__:
            lockdep_assert_held(self.slots_lock, "kvm_get_inactive_memslots")
        return self._sets[as_id][self._memslots[as_id].node_idx ^ 1]

    def _replace_memslot(self, old: Memslot | None, new: Memslot | None) -> None:
        """``kvm_replace_memslot``: on the inactive set only."""
        s = old if old is not None else new
        assert s is not None
        self._inactive_memslots(s.as_id)._replace(old, new)

    def _swap_active_memslots(self, as_id: int) -> None:
        """``kvm_swap_active_memslots``: publish the inactive set, wait for every reader of
        the previously active set to leave, then settle the generation. The
        ``publish_observer``, if any, is told just before the publish and after the
        generation is settled."""
        active = self._memslots[as_id]
        inactive = self._inactive_memslots(as_id)
        gen = active.generation
        if __debug__:
            require(not gen & KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS, "swap already in progress")
        observer = self.publish_observer
        if observer is not None:
            observer.publishing(as_id, inactive)
        # Caches tagged with any final generation miss while the swap is in flight.
        inactive.generation = gen | KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS
        self._memslots[as_id] = inactive  # publish: new readers see this set
        try:
            self.srcu.synchronize()  # all readers of `active` are gone
        except BaseException as exc:  # an interrupt must not cut the grace period short
            self._defer(exc)
            self.srcu.synchronize()
        gen = (inactive.generation & ~KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS) + self.nr_address_spaces
        inactive.generation = gen
        if observer is not None:
            observer.published(as_id, inactive)

    def _activate_memslot(self, old: Memslot | None, new: Memslot | None) -> None:
        """``kvm_activate_memslot``: swap, then repeat the replacement on the set that was
        active before the swap, so both sets converge."""
        s = old if old is not None else new
        assert s is not None
        self._swap_active_memslots(s.as_id)
        self._replace_memslot(old, new)

    def _invalidate_memslot(self, old: Memslot) -> Memslot:
        """``kvm_invalidate_memslot``: publish an INVALID copy of `old` (swap #1) and
        flush what was mapped through `old`."""
        invalid = old.copy()
        invalid.flags |= KVM_MEMSLOT_INVALID
        self._replace_memslot(old, invalid)
        self._swap_active_memslots(old.as_id)
        self._arch_flush_shadow_memslot(old)
        old.arch = invalid.arch
        return invalid

    def _arch_flush_shadow_memslot(self, old: Memslot) -> None:
        """``kvm_arch_flush_shadow_memslot``: tell registered invalidation callbacks
        (shadow MMUs, caches of hvas) that `old` is going away. A callback that raises is
        reported after the update, never half-way (the kernel's flush cannot fail)."""
        try:  # an injected failure stands for a failing callback, registered or not
            self.faults.check("invalidate_callback")
        except MemslotError as exc:
            self.callback_errors.append((old.slot, exc))
        for cb in list(self._invalidate_callbacks):
            try:
                cb(old)
            except Exception as exc:  # recorded: the protocol must go on
                self.callback_errors.append((old.slot, exc))
            except BaseException as exc:  # KeyboardInterrupt, SystemExit: after the update
                self.callback_errors.append((old.slot, exc))
                self._defer(exc)

    def _defer(self, exc: BaseException) -> None:
        """Keep an interrupt (KeyboardInterrupt, SystemExit, ...) that arrived in the middle
        of an update; ``_apply`` raises it once the update has completed, like a
        signal that the kernel handles when the ioctl returns."""
        if self._deferred is None:
            self._deferred = exc

    def _prepare_memory_region(
        self, old: Memslot | None, new: Memslot | None, change: Change
    ) -> None:
        """``kvm_prepare_memory_region``: dirty bitmap, then the arch hook; on failure
        frees what it allocated."""
        allocated = False
        if change is not Change.DELETE:
            assert new is not None
            if not new.flags & KVM_MEM_LOG_DIRTY_PAGES:
                new.dirty_bitmap = None
            elif old is not None and old.dirty_bitmap is not None:
                new.dirty_bitmap = old.dirty_bitmap  # shared: MOVE/FLAGS keep pending bits
            elif not _dirty_ring.kvm_use_dirty_bitmap(self):
                new.dirty_bitmap = None  # the dirty ring is on: no bitmap
            else:
                self.faults.check("dirty_bitmap")
                new.dirty_bitmap = _dirty_log.alloc_dirty_bitmap(
                    new.npages, self.manual_dirty_log_protect
                )
                self.dirty_bitmap_bytes += len(new.dirty_bitmap)
                allocated = True
        try:
            self._arch_prepare_memory_region(old, new, change)
        except MemslotError:
            if allocated:
                assert new is not None and new.dirty_bitmap is not None
                self.dirty_bitmap_bytes -= len(new.dirty_bitmap)
                new.dirty_bitmap = None
            raise

    def _arch_prepare_memory_region(
        self, old: Memslot | None, new: Memslot | None, change: Change
    ) -> None:
        """``kvm_arch_prepare_memory_region``: the max-gfn check and metadata allocation
        for CREATE/MOVE, arch data carried over on FLAGS_ONLY."""
        if change in (Change.CREATE, Change.MOVE):
            assert new is not None
            check_max_gfn(self.limits, new.base_gfn, new.npages)
            check_gmem_only(self.limits, new)
        self.faults.check("arch_prepare")
        if change is Change.FLAGS_ONLY:
            assert old is not None and new is not None
            new.arch = old.arch

    def _commit_memory_region(
        self, old: Memslot | None, new: Memslot | None, change: Change
    ) -> None:
        """``kvm_commit_memory_region``: page accounting, then free what `old` no longer
        needs."""
        if change is Change.DELETE:
            assert old is not None
            self.nr_memslot_pages -= old.npages
            self.guest_memfds.unbind(old)
        elif change is Change.CREATE:
            assert new is not None
            self.nr_memslot_pages += new.npages
        old_flags = old.flags if old is not None else 0
        new_flags = new.flags if new is not None else 0
        if (old_flags ^ new_flags) & KVM_MEM_LOG_DIRTY_PAGES:
            self.nr_memslots_dirty_logging += 1 if new_flags & KVM_MEM_LOG_DIRTY_PAGES else -1
        if (
            old is not None
            and old.dirty_bitmap is not None
            and (new is None or new.dirty_bitmap is None)
        ):
            self.dirty_bitmap_bytes -= len(old.dirty_bitmap)
            old.dirty_bitmap = None  # kvm_destroy_dirty_bitmap

    # ==================================================================================
    # vCPUs
    # ==================================================================================
    def create_vcpu(self, id: int) -> Vcpu:
        """``KVM_CREATE_VCPU``: a vCPU with its own last-used-slot cache (address space 0
        to start with) and, if the VM has a dirty ring, its ring. EINVAL for an id at or
        past ``KVM_MAX_VCPU_IDS`` (4096) or past ``KVM_MAX_VCPUS`` (1024) vCPUs, EEXIST for
        an id in use; a failure is not counted in :attr:`created_vcpus`."""
        with self.slots_lock:
            self._check_new_vcpu(id, self._vcpus)
            vcpu = Vcpu(self, id)
            self._vcpus[id] = vcpu
            self.created_vcpus += 1
            return vcpu

    # ==================================================================================
    # The dirty ring (memslots.dirty_ring)
    # ==================================================================================
    def enable_dirty_ring(self, size: int, acq_rel: bool = False) -> None:
        """``KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING, size)`` (``..._ACQ_REL`` with
        ``acq_rel``): a ring of ``size`` bytes for each vCPU created afterwards. The
        kernel's checks and errnos in its order: EINVAL (not a power of two, below the page size),
        E2BIG (over 1 MiB), EINVAL (already on, or a vCPU was ever created); ``size`` is
        truncated to u32 first. O(1)."""
        _dirty_ring.enable_dirty_ring(self, size, acq_rel)

    def reset_dirty_rings(self) -> int:
        """``KVM_RESET_DIRTY_RINGS``: reset the harvested entries of every vCPU's ring
        (each ring up to its first entry not harvested) and return how many; EINVAL
        without a ring. O(entries reset)."""
        return _dirty_ring.reset_dirty_rings(self, [v.dirty_ring for v in self._vcpus.values()])

    # ==================================================================================
    # Checks
    # ==================================================================================
    def check_invariants(self) -> None:
        """As :meth:`memslots.vm_api.VmApi.check_invariants`, and the vCPUs' dirty rings
        match the VM's (size, indexes in range)."""
        with self.slots_lock:
            super().check_invariants()
            _dirty_ring.check_invariants(self, [v.dirty_ring for v in self._vcpus.values()])

    def _check_address_space(self, as_id: int) -> None:
        """The set-structure part of :meth:`check_invariants` for one address space: both
        sets are consistent and share the very same slot objects (outside an update)."""
        s0, s1 = self._sets[as_id]
        s0.check_invariants()
        s1.check_invariants()
        l0, l1 = list(s0), list(s1)
        require(len(l0) == len(l1), "sets differ in size")
        for x, y in zip(l0, l1, strict=True):
            require(x is y, f"sets do not share slot objects: {x} / {y}")
        require(self._memslots[as_id] in (s0, s1), "active set is not one of the two")

    def __repr__(self) -> str:
        n = sum(len(s) for s in self._memslots)
        return f"Vm(address_spaces={self.nr_address_spaces}, slots={n})"


__all__ = ["Vcpu", "Vm"]
