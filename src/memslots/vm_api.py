"""What every VM design answers alike, written once: :class:`VmApi`.

The tree engine (:class:`memslots.vm.Vm`) and the array baseline
(:class:`memslots.baseline.ArrayVm`) differ in how a memslot set is built and updated, and
in nothing a caller can see. ``VmApi`` is their common base and holds only what does not
depend on that:

- the state both keep the same way (limits, grace periods, the writer lock, the
  accounting counters, fault points, invalidation callbacks, guest_memfds);
- validation (:meth:`VmApi.check_region`, :mod:`memslots.validate`);
- lookups on the published sets (:meth:`~VmApi.gfn_to_memslot`,
  :meth:`~VmApi.id_to_memslot`, :meth:`~VmApi.gfn_to_hva`, read sections, ...);
- dirty logging and guest memory: the functions of :mod:`memslots.dirty_log` and
  :mod:`memslots.guest_memory`, which work through :class:`memslots.view.VmView`, as
  methods with the same signatures;
- the part of :meth:`~VmApi.check_invariants` that checks published state and
  accounting.

It holds no update-protocol code: each design has its own sets, its own
``set_user_memory_region`` / ``set_user_memory_region2`` and ``kvm_set_memslot``, its own
vCPUs and its own structure check (``_check_address_space``). So comparing the two designs
(``tests/test_baseline.py``) is a real differential test of the protocol.

>>> from memslots import Vm
>>> vm = Vm()
>>> vm.set_user_memory_region(0, 0, 0x100000, 0x4000, 0x7F0000000000)
>>> vm.gfn_to_memslot(0x101)
Memslot(as_id=0, id=0, base_gfn=0x100, npages=0x4, flags=0x0, userspace_addr=0x7f0000000000)
>>> hex(vm.gfn_to_hva(0x101))
'0x7f0000001000'
>>> vm.gfn_to_memslot(0x104) is None   # one past the end: a hole
True
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Container, Iterator
from contextlib import AbstractContextManager
from errno import EBADF, EEXIST, EINVAL, ENXIO
from types import TracebackType
from typing import TYPE_CHECKING, Generic, Protocol, Self, TypeVar

from mypy_extensions import mypyc_attr

from memslots import dirty_log as _dirty_log
from memslots import dirty_ring as _dirty_ring
from memslots import guest_memfd as _guest_memfd
from memslots import guest_memory as _guest_memory
from memslots.constants import (
    KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS,
)
from memslots.errors import MemslotError, Refusal, require
from memslots.faults import FaultInjector
from memslots.guest_memfd import GuestMemfdTable
from memslots.guest_memory import GuestRegion, HostMemory
from memslots.slot import Memslot, gfn_to_hva_memslot_prot
from memslots.sync import Srcu
from memslots.validate import Change, Decision, VmLimits, check_set_user_memory_region
from memslots.view import SlotsView

if TYPE_CHECKING:
    import ctypes

    from typing_extensions import Buffer

__all__ = ["InvalidateCallback", "PublishObserver", "VmApi"]

InvalidateCallback = Callable[[Memslot], None]

#: the set type of a design (:class:`memslots.MemslotSet`, ``ArrayMemslotSet``)
SetT = TypeVar("SetT", bound=SlotsView)
SetT_contra = TypeVar("SetT_contra", bound=SlotsView, contravariant=True)
#: a ctypes type read by :meth:`VmApi.read_obj`
_CT = TypeVar("_CT", bound="ctypes._CData")


class PublishObserver(Protocol[SetT_contra]):
    """Watches every swap of a VM (``kvm_swap_active_memslots``, v5.15's
    ``install_new_memslots``): set ``vm.publish_observer`` to an object with these two
    methods. Both run in the writer, under ``slots_lock``; they must not start an update
    or wait for readers.

    - ``publishing(as_id, slots)``: ``slots`` is complete and about to become the active
      set of ``as_id`` (the next statement publishes it).
    - ``published(as_id, slots)``: the grace period after publishing ``slots`` has ended
      (no reader uses the previous set any more) and its generation is settled.

    Neither may change ``slots``. :class:`memslots.tools.stress.HistoryVm` records the
    history of published states this way.
    """

    def publishing(self, as_id: int, slots: SetT_contra) -> None: ...

    def published(self, as_id: int, slots: SetT_contra) -> None: ...


@mypyc_attr(allow_interpreted_subclasses=True)
class VmApi(Generic[SetT]):
    """The public calls and state a VM has whatever its memslot sets are (see the module
    docstring). A design subclasses ``VmApi[ItsSet]``, fills ``_memslots`` with the
    published set of each address space and implements the ioctls, ``create_vcpu`` and
    ``_check_address_space``.

    Attributes: ``limits`` (:class:`memslots.validate.VmLimits`), ``nr_address_spaces``,
    ``srcu`` (readers' grace periods), ``slots_lock`` (the writers' lock, the kernel's
    ``kvm->slots_lock``), ``nr_memslot_pages``, ``nr_memslots_dirty_logging``,
    ``manual_dirty_log_protect``, ``dirty_bitmap_bytes``, ``faults``
    (:class:`memslots.faults.FaultInjector`), ``last_change``, ``callback_errors``,
    ``guest_memfds``, ``publish_observer`` (:class:`PublishObserver`, None by default),
    ``dirty_rings`` (the dirty ring's VM-wide state, :class:`memslots.dirty_ring.DirtyRings`;
    a design that offers the ring enables it there).
    """

    #: the published (active) set of each address space: what readers load
    _memslots: list[SetT]

    def __init__(self, limits: VmLimits) -> None:
        self.limits = limits
        self.nr_address_spaces = limits.nr_address_spaces
        self.srcu = Srcu()
        #: serialises updates (the kernel's kvm->slots_lock)
        self.slots_lock = threading.RLock()
        #: sum of npages over all slots of all address spaces
        self.nr_memslot_pages = 0
        #: number of slots with dirty logging on (mainline's nr_memslots_dirty_logging)
        self.nr_memslots_dirty_logging = 0
        #: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 value
        self.manual_dirty_log_protect = 0
        #: bytes of dirty bitmap currently allocated (leak accounting for tests)
        self.dirty_bitmap_bytes = 0
        self.faults = FaultInjector()
        #: what the last successful set_user_memory_region call did
        self.last_change: Change | None = None
        self._invalidate_callbacks: list[InvalidateCallback] = []
        #: exceptions raised by invalidation callbacks: ``(slot, exception)``
        self.callback_errors: list[tuple[int, BaseException]] = []
        #: guest_memfd files of this VM and their bindings to slots
        self.guest_memfds = GuestMemfdTable()
        #: watches every swap (see :class:`PublishObserver`)
        self.publish_observer: PublishObserver[SetT] | None = None
        #: the dirty ring's VM-wide state (size, push mode): memslots.dirty_ring
        self.dirty_rings = _dirty_ring.DirtyRings()
        #: vCPUs ever created (``kvm->created_vcpus``; never drops)
        self.created_vcpus = 0
        #: mappings made by host_memory(), unmapped by close()
        self._owned_memory: list[HostMemory] = []
        self._closed = False

    # ==================================================================================
    # Validation
    # ==================================================================================
    def check_region(
        self,
        v2: bool,
        slot: int,
        flags: int,
        guest_phys_addr: int,
        memory_size: int,
        userspace_addr: int,
        guest_memfd_offset: int = 0,
        guest_memfd: int = 0,
    ) -> Decision:
        """Validate and classify a request without changing anything (what the kernel
        decides before ``kvm_set_memslot``); raises :class:`MemslotError`. O(log n).

        >>> from memslots import Vm
        >>> Vm().check_region(False, 0, 0, 0, 0x1000, 0).change
        <Change.CREATE: 'create'>
        """
        return check_set_user_memory_region(
            self.limits,
            self._memslots,
            self.nr_memslot_pages,
            v2=v2,
            slot=slot,
            flags=flags,
            guest_phys_addr=guest_phys_addr,
            memory_size=memory_size,
            userspace_addr=userspace_addr,
            guest_memfd_offset=guest_memfd_offset,
            guest_memfd=guest_memfd,
        )

    # ==================================================================================
    # Lookups (readers)
    # ==================================================================================
    def memslots(self, as_id: int = 0) -> SetT:
        """The active set of ``as_id`` (``__kvm_memslots``); EINVAL for an address space
        that does not exist. O(1).

        The set stays valid only inside a read section: ``with vm.read_section(): ...``.
        """
        if not 0 <= as_id < self.nr_address_spaces:
            raise MemslotError(EINVAL, f"address space {as_id} does not exist")
        return self._memslots[as_id]

    def read_section(self) -> AbstractContextManager[None]:
        """``with vm.read_section():`` a read section (``srcu_read_lock``): sets obtained
        inside it are not changed by writers until it ends. Never blocks."""
        return self.srcu.read()

    def gfn_to_memslot(self, gfn: int) -> Memslot | None:
        """``gfn_to_memslot(kvm, gfn)``: the slot of address space 0 holding ``gfn``, or
        None; uses and fills the set's last-used cache. O(1) on a hit, O(log n) else."""
        srcu = self.srcu
        idx = srcu.read_lock()
        try:
            return self._memslots[0].gfn_to_memslot(gfn)
        finally:
            srcu.read_unlock(idx)

    def id_to_memslot(self, slot: int) -> Memslot | None:
        """The slot with ABI number ``slot`` (``as_id << 16 | id``) in the active set, or
        None. O(1)."""
        as_id = slot >> 16
        if as_id >= self.nr_address_spaces:
            return None
        srcu = self.srcu
        idx = srcu.read_lock()
        try:
            return self._memslots[as_id].id_to_memslot(slot & 0xFFFF)
        finally:
            srcu.read_unlock(idx)

    def gfn_to_hva(self, gfn: int, write: bool = True) -> int:
        """``gfn_to_hva`` (write semantics by default, so a read-only slot gives
        ``KVM_HVA_ERR_RO_BAD``) or ``gfn_to_hva_prot`` with ``write=False``. Returns an
        error hva (see :func:`memslots.kvm_is_error_hva`) for holes and INVALID slots.
        O(log n)."""
        srcu = self.srcu
        idx = srcu.read_lock()
        try:
            slot = self._memslots[0].gfn_to_memslot(gfn)
            return gfn_to_hva_memslot_prot(slot, gfn, write)
        finally:
            srcu.read_unlock(idx)

    def is_visible_gfn(self, gfn: int) -> bool:
        """``kvm_is_visible_gfn``: a user slot that is not INVALID holds ``gfn``."""
        s = self.gfn_to_memslot(gfn)
        return s is not None and s.id < self.limits.max_user_slots and not s.invalid

    def slots(self) -> list[Memslot]:
        """A snapshot of every slot of every address space (as_id, then base_gfn order).
        O(n)."""
        with self.read_section():
            return [s for a in range(self.nr_address_spaces) for s in self._memslots[a]]

    def __iter__(self) -> Iterator[Memslot]:
        return iter(self.slots())

    # ==================================================================================
    # guest_memfd and invalidation callbacks (the MMU-notifier side)
    # ==================================================================================
    def _check_new_vcpu(self, id: int, vcpus: Container[int]) -> None:
        """``kvm_vm_ioctl_create_vcpu``'s checks, in order, for a design's
        ``create_vcpu`` (under ``slots_lock``; ``vcpus`` holds the ids in use): EINVAL for
        an id at or past ``KVM_MAX_VCPU_IDS`` or past ``KVM_MAX_VCPUS`` vCPUs ever
        created, EEXIST for an id in use. O(1)."""
        limits = self.limits
        if not 0 <= id < limits.max_vcpu_ids:
            raise MemslotError(
                EINVAL,
                f"vCPU id {id} is not below {limits.max_vcpu_ids}",
                Refusal("vcpu-id", "virt/kvm/kvm_main.c: kvm_vm_ioctl_create_vcpu"),
            )
        if self.created_vcpus >= limits.max_vcpus:
            raise MemslotError(
                EINVAL,
                f"the VM has {limits.max_vcpus} vCPUs already",
                Refusal("vcpu-count", "virt/kvm/kvm_main.c: kvm_vm_ioctl_create_vcpu"),
            )
        if id in vcpus:
            raise MemslotError(
                EEXIST,
                f"vCPU {id} exists",
                Refusal("vcpu-exists", "virt/kvm/kvm_main.c: kvm_vm_ioctl_create_vcpu"),
            )

    def create_guest_memfd(self, size: int, flags: int = 0) -> int:
        """``KVM_CREATE_GUEST_MEMFD``: a guest_memfd of ``size`` bytes for this VM's
        ``KVM_MEM_GUEST_MEMFD`` slots. The engine alone stands in a memfd for it; the
        caller owns the returned fd. ENOTTY where the kernel has no guest_memfd
        (``kvm_vm_ioctl``: before 6.8, or built without ``CONFIG_KVM_GUEST_MEMFD``); EINVAL
        for creation flags ``kvm_gmem_create`` does not accept, then for a size that is
        zero or not page aligned."""
        self.check_create_guest_memfd(size, flags)
        return self.guest_memfds.create(
            size, flags, self.limits.guest_memfd_flags, self.limits.page_shift
        )

    def check_create_guest_memfd(self, size: int, flags: int) -> None:
        """What ``KVM_CREATE_GUEST_MEMFD`` answers, without creating anything: ENOTTY where
        the kernel has no guest_memfd, then ``kvm_gmem_create``'s checks. O(1)."""
        if not self.limits.guest_memfd:
            raise MemslotError(
                self.limits.unknown_ioctl_errno,
                "KVM_CREATE_GUEST_MEMFD does not exist in this kernel",
                Refusal("no-ioctl", "virt/kvm/kvm_main.c: kvm_vm_ioctl"),
            )
        _guest_memfd.check_create(
            size, flags, self.limits.guest_memfd_flags, self.limits.page_shift
        )

    def register_invalidate_callback(self, cb: InvalidateCallback) -> None:
        """Call ``cb(old_slot)`` whenever a slot is invalidated (DELETE and MOVE, right
        after the INVALID copy is published), like ``kvm_arch_flush_shadow_memslot``."""
        self._invalidate_callbacks.append(cb)

    # ==================================================================================
    # Dirty logging (memslots.dirty_log) and guest memory (memslots.guest_memory)
    # ==================================================================================
    def enable_manual_dirty_log_protect(self, flags: int) -> None:
        """``KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)``: 0, 1 or 3; 2 alone is
        EINVAL. INITIALLY_SET applies to bitmaps allocated afterwards."""
        _dirty_log.enable_manual_dirty_log_protect(self, flags)

    def get_dirty_log(self, slot: int) -> bytes:
        """``KVM_GET_DIRTY_LOG``: the slot's bitmap as little-endian u64 words
        (``ALIGN(npages, 64) / 8`` bytes); clears it unless manual protect is on; ENXIO,
        before any other check, while the dirty ring is on.
        See :func:`memslots.dirty_log.get_dirty_log`. O(npages / 8).

        >>> from memslots import Vm, KVM_MEM_LOG_DIRTY_PAGES
        >>> vm = Vm()
        >>> vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, 70 << 12, 0x10000000)
        >>> vm.mark_page_dirty(65)
        >>> vm.get_dirty_log(0).hex()
        '00000000000000000200000000000000'
        >>> vm.get_dirty_log(0) == bytes(16)   # GET cleared it
        True
        """
        if not _dirty_ring.kvm_use_dirty_bitmap(self):
            raise MemslotError(
                ENXIO,
                "the dirty ring is on: there are no dirty bitmaps",
                Refusal("log-ring-on", "virt/kvm/kvm_main.c: kvm_get_dirty_log_protect"),
            )
        return _dirty_log.get_dirty_log(self, slot)

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int, bitmap: Buffer) -> None:
        """``KVM_CLEAR_DIRTY_LOG``: clear the pages set in ``bitmap`` (any bytes-like
        object; bit 0 is ``first_page``), with the kernel's alignment rules and errnos;
        ENXIO first while the dirty ring is on.
        See :func:`memslots.dirty_log.clear_dirty_log`. O(num_pages / 8)."""
        if not _dirty_ring.kvm_use_dirty_bitmap(self):
            raise MemslotError(
                ENXIO,
                "the dirty ring is on: there are no dirty bitmaps",
                Refusal("log-ring-on", "virt/kvm/kvm_main.c: kvm_clear_dirty_log_protect"),
            )
        _dirty_log.clear_dirty_log(self, slot, first_page, num_pages, bitmap)

    @property
    def dirty_ring_size(self) -> int:
        """Bytes of each vCPU's dirty ring (``kvm->dirty_ring_size``); 0 while off."""
        return self.dirty_rings.size

    def mark_page_dirty(self, gfn: int) -> None:
        """``mark_page_dirty``: set ``gfn``'s bit if its slot (address space 0) logs."""
        _dirty_log.mark_page_dirty(self, gfn)

    def read_guest(self, gpa: int, length: int, *, as_id: int = 0) -> bytes:
        """``kvm_read_guest``: ``length`` bytes at guest physical ``gpa`` of address
        space ``as_id``, page by page across slots; EFAULT for holes and INVALID slots.
        See :func:`memslots.guest_memory.read_guest`."""
        return _guest_memory.read_guest(self, gpa, length, as_id=as_id)

    def read_guest_into(self, gpa: int, buf: Buffer, *, as_id: int = 0) -> None:
        """As :meth:`read_guest`, into the writable buffer ``buf`` (``len(buf)`` bytes).
        See :func:`memslots.guest_memory.read_guest_into`."""
        _guest_memory.read_guest_into(self, gpa, buf, as_id=as_id)

    def write_guest(self, gpa: int, data: Buffer, *, as_id: int = 0) -> None:
        """``kvm_write_guest``: write ``data`` (any bytes-like object) at ``gpa``; EFAULT
        for holes, INVALID or read-only slots (earlier pages stay written, as in the
        kernel); marks pages dirty in their bitmaps. No vCPU makes this write, so it never
        reaches a dirty ring (a vCPU's ``write_guest`` does). See
        :func:`memslots.guest_memory.write_guest`."""
        _guest_memory.write_guest(self, gpa, data, as_id=as_id)

    def clear_guest(self, gpa: int, length: int, *, as_id: int = 0) -> None:
        """``kvm_clear_guest``: write zeros, as :meth:`write_guest`."""
        _guest_memory.clear_guest(self, gpa, length, as_id=as_id)

    def read_obj(self, gpa: int, ctype: type[_CT], *, as_id: int = 0) -> _CT:
        """A new instance of the ctypes type ``ctype`` (a structure, union, array or
        scalar of plain data: :func:`memslots.guest_memory.check_ctype`) filled with the
        ``sizeof(ctype)`` bytes at ``gpa``, as rust-vmm vm-memory's ``Bytes::read_obj``;
        a scalar's value is its ``.value``. Errors as :meth:`read_guest`, TypeError for a
        type that holds pointers. O(size + runs x log n). (To fill an object you have,
        pass it to :meth:`read_guest_into`: ctypes objects are writable buffers.)

        >>> import ctypes
        >>> from memslots import Vm
        >>> class Entry(ctypes.Structure):
        ...     _fields_ = [("addr", ctypes.c_uint64), ("len", ctypes.c_uint32)]
        >>> with Vm() as vm:
        ...     mem = vm.host_memory(0x1000)
        ...     vm.set_user_memory_region(0, 0, 0x10000, mem.size, mem.addr)
        ...     vm.write_obj(0x10000, Entry(0xFEE00000, 0x1000))
        ...     vm.write_obj(0x10010, 0xAA55, ctypes.c_uint16)
        ...     e = vm.read_obj(0x10000, Entry)
        ...     hex(e.addr), e.len, hex(vm.read_obj(0x10010, ctypes.c_uint16).value)
        ('0xfee00000', 4096, '0xaa55')
        """
        obj = _guest_memory.new_obj(ctype)
        self.read_guest_into(gpa, obj, as_id=as_id)
        return obj

    def write_obj(
        self, gpa: int, obj: object, ctype: type | None = None, *, as_id: int = 0
    ) -> None:
        """Write a ctypes object (structure, union, array, scalar: its own bytes) or a
        Python ``int``/``float``/``bool`` in the ctypes scalar type ``ctype``,
        little-endian (``vm.write_obj(gpa, 0x1234, ctypes.c_uint16)``), at ``gpa``, as
        :meth:`write_guest` (same errors, same dirty logging), as rust-vmm vm-memory's
        ``Bytes::write_obj``. A value that does not fit its type is a ValueError, never
        truncated; see :func:`memslots.guest_memory.obj_bytes`. O(size + runs x log n).

        >>> import ctypes
        >>> from memslots import Vm
        >>> with Vm() as vm:
        ...     mem = vm.host_memory(0x1000)
        ...     vm.set_user_memory_region(0, 0, 0, mem.size, mem.addr)
        ...     vm.write_obj(0x10, 0x1234, ctypes.c_uint16)
        ...     vm.write_obj(0x12, (ctypes.c_uint8 * 2)(0xAB, 0xCD))
        ...     vm.read_guest(0x10, 4).hex()
        '3412abcd'
        """
        self.write_guest(gpa, _guest_memory.obj_bytes(obj, ctype), as_id=as_id)

    # ==================================================================================
    # Regions and host memory
    # ==================================================================================
    def regions(self, as_id: int = 0) -> list[GuestRegion]:
        """Every slot of address space ``as_id`` with the host memory behind it, in
        ascending gpa order (:class:`memslots.guest_memory.GuestRegion`; Unicorn's
        ``mem_regions()``): a snapshot taken in one read section. A region whose slot
        lies in one live :class:`memslots.HostMemory` has a zero-copy, writable
        ``view()``; one whose hva is not library memory has ``memory`` None and no view.
        EINVAL for an address space that does not exist. O(n log mappings).

        >>> from memslots import Vm
        >>> with Vm() as vm:
        ...     mem = vm.host_memory(0x3000)
        ...     vm.set_user_memory_region(0, 0, 0x100000, 0x2000, mem.addr)
        ...     vm.set_user_memory_region(1, 0, 0x0, 0x1000, 0x7F0000000000)  # not ours
        ...     for r in vm.regions():
        ...         print(hex(r.gpa), r.size, r.memory is mem, r.offset)
        ...     with vm.regions()[1].view() as v:
        ...         v[0x1FFF] = 7
        ...     vm.read_guest(0x101FFF, 1)
        0x0 4096 False 0
        0x100000 8192 True 0
        b'\\x07'
        """
        with self.read_section():
            return [_guest_memory.region_of(s) for s in self.memslots(as_id)]

    def host_memory(self, size: int) -> HostMemory:
        """A new :class:`memslots.HostMemory` of ``size`` bytes (rounded up to whole
        pages) owned by this VM: :meth:`close` unmaps it (on ``KvmVm`` after deleting,
        in the kernel, the slots over it). EBADF once the VM is closed. O(live
        mappings).

        >>> from memslots import Vm
        >>> vm = Vm()
        >>> mem = vm.host_memory(5000)
        >>> mem.size, mem.closed
        (8192, False)
        >>> vm.close()
        >>> mem.closed, vm.closed
        (True, True)
        """
        with self.slots_lock:
            self._check_open()
            mem = HostMemory(size)
            self._owned_memory.append(mem)
            return mem

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has run."""
        return self._closed

    def close(self) -> None:
        """Unmap the :class:`memslots.HostMemory` mappings made by :meth:`host_memory`
        (slots over them then give EFAULT on guest access). The engine holds nothing
        else: its memslot calls and lookups keep working; only :meth:`host_memory`
        refuses (EBADF). ``KvmVm`` also closes the kernel VM. Idempotent. O(mappings).
        Also ``with Vm() as vm: ...``."""
        with self.slots_lock:
            self._closed = True
            owned, self._owned_memory = self._owned_memory, []
        for mem in owned:
            mem.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise MemslotError(EBADF, "the VM is closed")

    def _check_not_in_read_section(self) -> None:
        """``RuntimeError`` when the calling thread is inside a read section of this VM:
        a memslot update would wait in its grace period for that section, that is
        forever (the kernel's lockdep reports the same as an illegal
        ``synchronize_srcu``). Called before an update changes anything. O(1)."""
        if self.srcu.in_read_section():
            raise RuntimeError("a memslot update inside a read section of the same VM")

    # ==================================================================================
    # Free guest-physical space and slot ids
    # ==================================================================================
    def free_gfn_ranges(
        self, start: int = 0, end: int | None = None, *, as_id: int = 0
    ) -> list[tuple[int, int]]:
        """The gfn ranges ``(first, end)`` (end exclusive) in ``[start, end)`` that no
        slot of address space ``as_id`` covers, ascending; ``end`` defaults to one past
        the VM's highest gfn. An INVALID copy of a slot being deleted or moved still
        counts as covering its range. EINVAL for an address space that does not exist.
        O(log n + k) for k slots in the range (the gfn index).

        >>> from memslots import Vm
        >>> vm = Vm()
        >>> vm.set_user_memory_region(0, 0, 0x2000, 0x2000, 0x7F0000000000)
        >>> vm.free_gfn_ranges(0, 0x10)
        [(0, 2), (4, 16)]
        """
        if start < 0:
            raise ValueError(f"start {start:#x} is negative")
        if end is None:
            end = self.limits.max_gfn + 1
        out: list[tuple[int, int]] = []
        if end <= start:
            return out
        pos = start
        with self.read_section():
            for s in self.memslots(as_id).iter_gfn_range(start, end):
                if s.base_gfn > pos:
                    out.append((pos, s.base_gfn))
                pos = max(pos, s.base_gfn + s.npages)
        if pos < end:
            out.append((pos, end))
        return out

    def find_free_gpa(
        self, size: int, *, align: int | None = None, start: int = 0, as_id: int = 0
    ) -> int | None:
        """The lowest guest physical address at or above ``start``, a multiple of
        ``align``, where ``size`` bytes are covered by no slot of ``as_id`` and lie below
        the VM's highest gfn; None when there is no such place. ``size``: a positive
        multiple of the kernel's page size (``limits.page_shift``); ``align``: a power of
        two, at least the page size (the default) (ValueError otherwise). O(log n + k) for
        the k slots skipped.

        >>> from memslots import Vm
        >>> vm = Vm()
        >>> vm.set_user_memory_region(0, 0, 0, 0xA0000, 0x7F0000000000)
        >>> hex(vm.find_free_gpa(0x200000, align=0x200000))   # 2 MiB, 2 MiB-aligned
        '0x200000'
        """
        shift = self.limits.page_shift
        page = 1 << shift
        if align is None:
            align = page
        if size <= 0 or size & (page - 1):
            raise ValueError(f"size {size:#x} is not a positive multiple of {page:#x}")
        if align < page or align & (align - 1):
            raise ValueError(f"align {align:#x} is not a power of two >= {page:#x}")
        if start < 0:
            raise ValueError(f"start {start:#x} is negative")
        npages = size >> shift
        step = align >> shift
        limit = self.limits.max_gfn + 1
        gfn = -(-start // align) * step  # start rounded up to align, in pages
        with self.read_section():
            for s in self.memslots(as_id).iter_gfn_range(gfn, limit):
                if s.base_gfn >= gfn + npages:
                    break  # the hole before s holds it
                end = s.base_gfn + s.npages
                if end > gfn:
                    gfn = -(-end // step) * step
        return gfn << shift if gfn + npages <= limit else None

    def free_slot_id(self, *, as_id: int = 0) -> int | None:
        """The lowest slot id (0 .. ``limits.max_user_slots - 1``) that address space
        ``as_id`` does not use, or None when every id is in use; pass ``as_id << 16 |
        id`` to ``set_user_memory_region``. O(k) for the k used ids below it.

        >>> from memslots import Vm
        >>> vm = Vm()
        >>> for i in (0, 1, 3):
        ...     vm.set_user_memory_region(i, 0, i << 20, 0x1000, 0x7F0000000000)
        >>> vm.free_slot_id(), vm.free_slot_id(as_id=1)
        (2, 0)
        """
        with self.read_section():
            slots = self.memslots(as_id)
            for i in range(self.limits.max_user_slots):
                if slots.id_to_memslot(i) is None:
                    return i
        return None

    # ==================================================================================
    # Checks
    # ==================================================================================
    def check_invariants(self) -> None:
        """Raise :class:`memslots.errors.InvariantError` unless the VM is consistent (for
        tests; O(n); works under ``python -O``): each address space's sets are consistent
        (the design's ``_check_address_space``), published generations are settled and
        belong to their address space, no INVALID copy is left, and page, dirty bitmap
        and guest_memfd accounting add up.

        >>> from memslots import Vm
        >>> vm = Vm()
        >>> vm.set_user_memory_region(0, 0, 0, 0x1000, 0)
        >>> vm.check_invariants()
        >>> vm.nr_memslot_pages += 1   # corrupt it
        >>> vm.check_invariants()
        Traceback (most recent call last):
        ...
        memslots.errors.InvariantError: nr_memslot_pages is off
        """
        nr = self.nr_address_spaces
        with self.slots_lock:
            pages = bitmap_bytes = logging = gmem_pages = 0
            for a in range(nr):
                self._check_address_space(a)
                gen = self._memslots[a].generation
                require(not gen & KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS, f"as {a}: swap unsettled")
                require(gen % nr == a, f"as {a}: generation {gen:#x} of another address space")
                for x in self._memslots[a]:
                    require(not x.invalid, "INVALID slot left behind")
                    pages += x.npages
                    if x.flags & KVM_MEM_LOG_DIRTY_PAGES:
                        logging += 1
                    if x.flags & KVM_MEM_GUEST_MEMFD:
                        gmem_pages += x.npages
                    if x.dirty_bitmap is not None:
                        require(x.flags & KVM_MEM_LOG_DIRTY_PAGES, f"{x}: bitmap without logging")
                        require(
                            len(x.dirty_bitmap) == _dirty_log.dirty_bitmap_bytes(x.npages),
                            f"{x}: dirty bitmap of the wrong size",
                        )
                        bitmap_bytes += len(x.dirty_bitmap)
            require(pages == self.nr_memslot_pages, "nr_memslot_pages is off")
            require(logging == self.nr_memslots_dirty_logging, "nr_memslots_dirty_logging is off")
            require(bitmap_bytes == self.dirty_bitmap_bytes, "dirty bitmap leaked")
            require(gmem_pages == self.guest_memfds.bound_pages(), "guest_memfd binding leaked")

    def _check_address_space(self, as_id: int) -> None:
        """The design's structure check of one address space (both sets, their indexes).
        Called by :meth:`check_invariants` under ``slots_lock``."""
        raise NotImplementedError
