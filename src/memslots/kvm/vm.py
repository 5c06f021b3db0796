"""``KvmVm``: the memslots API on a real VM, with the kernel as the oracle.

Every memslot call goes to ``/dev/kvm``; the engine (:class:`memslots.vm.Vm`, which this
class extends) is configured from the kernel it runs on and mirrors the kernel's state.
Each call is answered twice, by the kernel and by the engine: in strict mode (the
default) any difference raises :class:`ConformanceError`, naming the call and both
answers; otherwise it is recorded in :attr:`KvmVm.disagreements` and the kernel's answer
wins. Lookups (``gfn_to_memslot``, ``memslots()``, vCPU caches) and guest memory access
(``read_guest``/``write_guest`` through :class:`memslots.HostMemory`) are served by the
engine, since the kernel does not expose them.

Dirty logs are the union of the kernel's bitmap (pages the guest wrote) and the engine's
(pages Python wrote with :meth:`KvmVm.write_guest` or marked with
:meth:`KvmVm.mark_page_dirty`): this is what QEMU does, which keeps its own bitmap for
device and host writes and ORs the KVM log into it at every sync
(``kvm_physical_sync_dirty_bitmap``). Both are cleared together.

The bitmaps' contents are checked too, as far as they can be predicted. The engine's bitmap
holds what the kernel's must hold (bits set by ``KVM_DIRTY_LOG_INITIALLY_SET``, kept or
dropped across MOVE and flag changes, cleared by GET and CLEAR) plus the pages Python
dirtied; only a running guest can set bits the engine does not know of. So until the VM
has a vCPU, every page the kernel reports must be in the engine's bitmap, and until Python
has dirtied a page (and :meth:`KvmVm.kernel_dirty_log` has bypassed the mirror) the two
must be equal; a difference is a :class:`Disagreement` like a differing errno.

The dirty ring (``KVM_CAP_DIRTY_LOG_RING``, :meth:`KvmVm.enable_dirty_ring`): each vCPU
maps the kernel's ring from its fd, and a guest program's writes appear there; what the
engine checks of it, and how host-side writes are recorded, is described in
:mod:`memslots.kvm.ring`.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from errno import EINVAL
from typing import TYPE_CHECKING, Any

# the module, not the class: importing memslots.profiles first imports this package
# (for memslots.kvm.abi) while profiles is still half-initialised
from memslots import profiles as _profiles
from memslots.constants import KVM_MEM_LOG_DIRTY_PAGES, U32_MAX, U64_MAX
from memslots.dirty_log import dirty_bitmap_bytes, dirty_pages
from memslots.errors import MemslotError, errno_name
from memslots.guest_memfd import GuestMemfdTable
from memslots.kvm.abi import (
    KVM_CAP_DIRTY_LOG_RING,
    KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_DEV_PATH,
    KvmSystem,
    KvmSystemLike,
    VmFd,
)
from memslots.kvm.ring import KernelRing
from memslots.kvm.vcpu import DirtyRingFullHandler, IoExit, KvmVcpu, MmioExit, RunResult, VcpuExit
from memslots.validate import check_abi_fields
from memslots.vm import Vcpu, Vm

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = [
    "ENGINE_RAISED",
    "ConformanceError",
    "Disagreement",
    "KvmVcpuHandle",
    "KvmVm",
    "probe_max_gfn",
]


#: ``Disagreement.engine`` when the engine raised something other than MemslotError
ENGINE_RAISED = -1


@dataclass(frozen=True, slots=True)
class Disagreement:
    """One call the kernel and the engine answered differently: ``kernel`` and ``engine``
    are the errnos (0 = success; ``engine`` is :data:`ENGINE_RAISED` when the engine
    raised something other than :class:`MemslotError`, named in ``detail``); ``detail``
    also describes a difference in what a successful call returned (a dirty bitmap)."""

    call: str
    kernel: int
    engine: int
    detail: str = ""

    def __str__(self) -> str:
        kernel = f"{self.call}: kernel {errno_name(self.kernel)}"
        if self.engine == ENGINE_RAISED:
            return f"{kernel}, engine raised {self.detail}"
        text = f"{kernel}, engine {errno_name(self.engine)}"
        return f"{text}; {self.detail}" if self.detail else text


class ConformanceError(AssertionError):
    """The engine predicted a different result than the kernel gave (strict mode)."""

    def __init__(self, d: Disagreement) -> None:
        super().__init__(str(d))
        self.disagreement = d
        self.call = d.call
        self.kernel = d.kernel
        self.engine = d.engine
        self.detail = d.detail


def probe_max_gfn(path: str = KVM_DEV_PATH) -> int:
    """The highest gfn the kernel lets a slot cover (``KernelProfile.probe(path=path)
    .max_gfn``: a binary search with one-page slots on a scratch VM, cached per process).

    On x86 this is ``kvm_mmu_max_gfn()``, which depends on the MMU in use and the host's
    physical address width.
    """
    return _profiles.KernelProfile.probe(path=path).max_gfn


class KvmVcpuHandle(Vcpu):
    """A vCPU of a :class:`KvmVm`: the engine's :class:`~memslots.vm.Vcpu` (its
    last-used-slot cache and ``gfn_to_memslot``) plus the real vCPU in :attr:`kvm`
    (a :class:`memslots.kvm.vcpu.KvmVcpu`) that runs real-mode guest code.

    With the VM's dirty ring on, :attr:`kernel_ring` is the kernel's ring of this vCPU,
    mapped from its fd (a :class:`memslots.kvm.ring.KernelRing`: the guest's writes),
    and the inherited :attr:`dirty_ring` is the engine's ring of the writes Python makes
    through this vCPU (:meth:`write_guest`, :meth:`mark_page_dirty`), which the kernel
    never sees. :meth:`harvest_dirty_ring` returns both."""

    __slots__ = ("kernel_ring", "kvm")

    def __init__(self, vm: KvmVm, id: int, kvm: KvmVcpu) -> None:
        super().__init__(vm, id)
        self.kvm = kvm
        self.kernel_ring: KernelRing | None = None
        size = vm.dirty_ring_size
        if size:
            self.kernel_ring = KernelRing(
                kvm.map_dirty_ring(size), size, vm._logging_slots, vm._report
            )
            kvm.run_observer = self.kernel_ring

    def setup_real_mode(
        self,
        entry: int,
        *,
        regs: Mapping[str, int] | None = None,
        segments: Mapping[str, int] | None = None,
        big_real_mode: bool = False,
    ) -> None:
        """16-bit real mode, about to run the code at gpa ``entry`` (see
        :meth:`memslots.kvm.vcpu.KvmVcpu.setup_real_mode`)."""
        self.kvm.setup_real_mode(entry, regs=regs, segments=segments, big_real_mode=big_real_mode)

    def run(self) -> VcpuExit:
        """One ``KVM_RUN``; the decoded exit."""
        return self.kvm.run()

    def run_until_hlt(
        self,
        on_io: Callable[[IoExit], Any] | None = None,
        on_mmio: Callable[[MmioExit], Any] | None = None,
        *,
        timeout: float | None = None,
        max_exits: int | None = None,
        on_dirty_ring_full: DirtyRingFullHandler | None = None,
    ) -> RunResult:
        """Run until the guest halts, handing port-I/O, MMIO and dirty-ring-full exits to
        the callbacks (see :meth:`memslots.kvm.vcpu.KvmVcpu.run_until_hlt`; without
        ``on_dirty_ring_full`` a full ring raises
        :class:`memslots.kvm.vcpu.DirtyRingFull`: harvest, reset, call again)."""
        return self.kvm.run_until_hlt(
            on_io,
            on_mmio,
            timeout=timeout,
            max_exits=max_exits,
            on_dirty_ring_full=on_dirty_ring_full,
        )

    def harvest_dirty_ring(self) -> list[tuple[int, int]]:
        """``(slot, offset)`` of every entry not harvested yet: first the kernel's ring
        (what the guest wrote, in ring order; checked as :mod:`memslots.kvm.ring` says),
        then the engine's ring of writes made from Python through this vCPU. Each is
        marked harvested. EINVAL without a ring. O(entries)."""
        vm = self.vm
        assert isinstance(vm, KvmVm)
        with vm._ring_lock:
            vm._check_open()
            if self.kernel_ring is None:
                raise MemslotError(EINVAL, "the VM has no dirty ring")
            return self.kernel_ring.harvest() + Vcpu.harvest_dirty_ring(self)

    def mark_page_dirty(self, gfn: int) -> None:
        """A write by this vCPU made from Python (see
        :meth:`memslots.vm.Vcpu.mark_page_dirty`): into the engine's ring or bitmap; the
        kernel never sees it."""
        vm = self.vm
        assert isinstance(vm, KvmVm)
        vm._no_host_writes = False
        super().mark_page_dirty(gfn)

    def write_guest(self, gpa: int, data: Buffer) -> None:
        """``kvm_vcpu_write_guest`` from Python, through the engine's slots and
        :class:`HostMemory` (the kernel's memory is the same memory): pages are recorded
        in the engine's ring or bitmap, never in the kernel's. O(len(data))."""
        vm = self.vm
        assert isinstance(vm, KvmVm)
        vm._no_host_writes = False
        super().write_guest(gpa, data)

    def kick(self) -> None:
        """Make a running guest exit soon (from any thread)."""
        self.kvm.kick()

    def close(self) -> None:
        """Close the real vCPU and unmap its ring (idempotent)."""
        if self.kernel_ring is not None:
            self.kvm.run_observer = None
            self.kernel_ring.release()
            self.kernel_ring = None
        self.kvm.close()


class KvmVm(Vm):
    """A real VM on ``/dev/kvm`` behind the memslots API of :class:`memslots.Vm`.

    ``KvmVm(strict=True, path="/dev/kvm", system=None, profile=None, vm_type=0)``: opens
    the device (or uses ``system``, a kernel elsewhere with
    :class:`memslots.kvm.abi.KvmSystem`'s calls, such as one booted under QEMU by
    :mod:`memslots.tools.kernels`) and creates a VM of ``vm_type``. The engine answers as
    that kernel: its :class:`memslots.profiles.KernelProfile` is probed
    (:meth:`~memslots.profiles.KernelProfile.probe`, cached per device) unless given, and
    the VM's limits are the profile's for the type (:attr:`profile`). ``KVM_CREATE_VM`` is
    compared too: a type the kernel and the profile answer differently raises
    :class:`ConformanceError` in either mode, since no VM could mirror the other. Use it
    as a context manager or call :meth:`close`, which
    deletes the slots over the VM's own memory in the kernel, then releases vCPUs and
    the VM fd (destroying the VM and its other slots) and unmaps the
    :class:`HostMemory` mappings made by :meth:`host_memory`.

    Raises :class:`memslots.errors.KvmUnavailable` (an :class:`OSError`) when the device
    cannot be used, naming the cause: permission denied (join the kvm group or run as
    root), no such device or no driver behind it (KVM not loaded, nested virtualization
    off), another API version.
    """

    def __init__(
        self,
        *,
        strict: bool = True,
        path: str = KVM_DEV_PATH,
        system: KvmSystemLike | None = None,
        profile: _profiles.KernelProfile | None = None,
        vm_type: int = 0,
    ) -> None:
        self._system: KvmSystemLike = KvmSystem(path) if system is None else system
        try:
            if profile is None:
                profile = (
                    _profiles.KernelProfile.probe(path=path)
                    if system is None
                    else _profiles.KernelProfile.probe(self._system)
                )
            # KVM_CREATE_VM, compared: the engine's answer is the profile's for the type
            engine = 0
            try:
                profile.vm_limits(vm_type)
            except MemslotError as exc:
                engine = exc.errno or 0
            try:
                self.fd: VmFd = self._system.create_vm(vm_type)
            except MemslotError as exc:
                if (exc.errno or 0) != engine:
                    raise ConformanceError(
                        Disagreement(f"create_vm(type={vm_type:#x})", exc.errno or 0, engine)
                    ) from exc
                raise
            if engine:
                self.fd.close()
                raise ConformanceError(Disagreement(f"create_vm(type={vm_type:#x})", 0, engine))
        except BaseException:
            if system is None:
                self._system.close()
            raise
        #: the profile of the kernel under this VM, which the engine answers as
        self.profile = profile
        self._owns_system = system is None
        super().__init__(profile=profile, vm_type=vm_type)
        self.guest_memfds = GuestMemfdTable(self.fd.fd_identity)
        self.strict = strict
        #: every call the kernel and the engine answered differently
        self.disagreements: list[Disagreement] = []
        #: calls made to the kernel (memslot, dirty log and capability ioctls)
        self.kernel_calls = 0
        self._kvm_vcpus: list[KvmVcpuHandle] = []
        #: no vCPU yet: only Python can have dirtied pages (see the module docstring)
        self._no_guest_writes = True
        #: and Python has not either: kernel and engine bitmaps must be equal
        self._no_host_writes = True
        self._close_lock = threading.Lock()
        #: serialises harvests and resets of the dirty rings (their checks assume it)
        self._ring_lock = threading.RLock()
        self._logging_cache: tuple[tuple[int, ...], dict[int, int]] = ((), {})

    # -- the oracle ------------------------------------------------------------------
    def _compare(self, call: str, kernel: int, engine: int, detail: str = "") -> None:
        """Record a disagreement (and raise it in strict mode) unless both answers are
        the same and there is no ``detail`` (a difference in what was returned)."""
        if kernel == engine and not detail:
            return
        d = Disagreement(call, kernel, engine, detail)
        self.disagreements.append(d)
        if self.strict:
            raise ConformanceError(d)

    def _mirror(
        self,
        call: Callable[[], str],
        kernel_fn: Callable[[], Any],
        engine_fn: Callable[[], Any],
    ) -> tuple[int, Any, Any]:
        """Ask the kernel, then the engine; compare the errnos. Returns the kernel's errno
        (0 on success), the kernel's and the engine's return values. An engine that
        raises anything but :class:`MemslotError` disagrees with every kernel answer
        (``engine`` is :data:`ENGINE_RAISED`). ``call`` formats the call's description
        and runs only when there is a disagreement to describe."""
        self.kernel_calls += 1
        k, kval = 0, None
        try:
            kval = kernel_fn()
        except MemslotError as exc:
            k = exc.errno or 0
        e, eval_ = 0, None
        try:
            eval_ = engine_fn()
        except MemslotError as exc:
            e = exc.errno or 0
        except Exception as exc:
            try:
                self._compare(call(), k, ENGINE_RAISED, f"{type(exc).__name__}: {exc}")
            except ConformanceError as err:
                raise err from exc
            return k, kval, None
        if k != e:
            self._compare(call(), k, e)
        return k, kval, eval_

    def set_user_memory_region(
        self, slot: int, flags: int, guest_phys_addr: int, memory_size: int, userspace_addr: int
    ) -> None:
        """``KVM_SET_USER_MEMORY_REGION`` on the kernel, mirrored by the engine; raises
        :class:`MemslotError` with the kernel's errno (and :class:`ConformanceError` in
        strict mode if the engine disagrees). O(log n) plus the kernel's cost."""
        check_abi_fields(slot, flags, guest_phys_addr, memory_size, userspace_addr)
        args = (slot, flags, guest_phys_addr, memory_size, userspace_addr)
        with self.slots_lock:
            self._check_open()
            self._check_not_in_read_section()  # before the kernel: the two stay in step
            k, _, _ = self._mirror(
                lambda: _fmt_call("set_user_memory_region", args),
                lambda: self.fd.set_user_memory_region(*args),
                lambda: Vm.set_user_memory_region(self, *args),
            )
            if k:
                raise MemslotError(k, "KVM_SET_USER_MEMORY_REGION")

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
        """``KVM_SET_USER_MEMORY_REGION2`` on the kernel, mirrored by the engine (which
        knows the guest_memfds made by :meth:`create_guest_memfd`). O(log n) plus the
        kernel's cost."""
        check_abi_fields(
            slot, flags, guest_phys_addr, memory_size, userspace_addr, guest_memfd_offset,
            guest_memfd,
        )  # fmt: skip
        args = (slot, flags, guest_phys_addr, memory_size, userspace_addr)
        with self.slots_lock:
            self._check_open()
            self._check_not_in_read_section()  # before the kernel: the two stay in step
            k, _, _ = self._mirror(
                lambda: (
                    _fmt_call("set_user_memory_region2", args)[:-1]
                    + f", guest_memfd_offset={guest_memfd_offset:#x}, guest_memfd={guest_memfd})"
                ),
                lambda: self.fd.set_user_memory_region2(*args, guest_memfd_offset, guest_memfd),
                lambda: Vm.set_user_memory_region2(self, *args, guest_memfd_offset, guest_memfd),
            )
            if k:
                raise MemslotError(k, "KVM_SET_USER_MEMORY_REGION2")

    def enable_manual_dirty_log_protect(self, flags: int) -> None:
        """``KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, flags)`` on both. O(1)."""
        with self.slots_lock:
            self._check_open()
            if not 0 <= flags < 1 << 64:
                raise MemslotError(EINVAL, "flags do not fit u64")
            k, _, _ = self._mirror(
                lambda: f"enable_manual_dirty_log_protect({flags:#x})",
                lambda: self.fd.enable_cap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, flags),
                lambda: Vm.enable_manual_dirty_log_protect(self, flags),
            )
            if k:
                raise MemslotError(k, "KVM_ENABLE_CAP")

    def get_dirty_log(self, slot: int) -> bytes:
        """``KVM_GET_DIRTY_LOG``: the kernel's bitmap ORed with the engine's (pages written
        from Python); both are cleared unless manual protect is on. The bitmaps are
        compared as the module docstring says. O(npages / 8)."""
        with self.slots_lock:
            self._check_open()
            if not 0 <= slot <= 0xFFFFFFFF:
                raise MemslotError(EINVAL, "slot does not fit u32")
            nbytes = self._dirty_log_bytes(slot)
            k, kbits, ebits = self._mirror(
                lambda: f"get_dirty_log({slot:#x})",
                lambda: self.fd.get_dirty_log(slot, nbytes),
                lambda: Vm.get_dirty_log(self, slot),
            )
            if k:
                raise MemslotError(k, "KVM_GET_DIRTY_LOG")
            if ebits is None or len(ebits) != nbytes:
                return bytes(kbits)
            self._compare_bitmaps(lambda: f"get_dirty_log({slot:#x})", kbits, ebits)
            if not any(ebits):
                return bytes(kbits)
            merged = int.from_bytes(kbits, "little") | int.from_bytes(ebits, "little")
            return merged.to_bytes(nbytes, "little")

    def _compare_bitmaps(self, call: Callable[[], str], kbits: bytes, ebits: bytes) -> None:
        """Check a successful GET's bitmaps: the kernel's pages must be among the engine's
        while no guest can have written, and equal to them while Python has not either."""
        if not self._no_guest_writes or kbits == ebits:
            return
        k = int.from_bytes(kbits, "little")
        e = int.from_bytes(ebits, "little")
        if k & ~e or self._no_host_writes:
            kp, ep = dirty_pages(kbits), dirty_pages(ebits)
            self._compare(call(), 0, 0, f"dirty pages: kernel {_pages(kp)}, engine {_pages(ep)}")

    def _dirty_log_bytes(self, slot: int) -> int:
        """Bytes the kernel writes for ``slot``'s log (8 for a missing slot, which the
        kernel refuses before writing anything)."""
        s = self.id_to_memslot(slot)
        return dirty_bitmap_bytes(s.npages) if s is not None else 8

    def kernel_dirty_log(self, slot: int) -> bytes:
        """The kernel's own dirty bitmap of ``slot`` (``KVM_GET_DIRTY_LOG``), not merged
        and not mirrored; clears the kernel's bits unless manual protect is on (the
        engine's are left alone, so bitmap contents are no longer compared exactly)."""
        with self.slots_lock:
            self._check_open()
            self._no_host_writes = False
            nbytes = self._dirty_log_bytes(slot)
            self.kernel_calls += 1
            return self.fd.get_dirty_log(slot, nbytes)

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int, bitmap: Buffer) -> None:
        """``KVM_CLEAR_DIRTY_LOG`` on both the kernel's and the engine's bitmaps.
        O(num_pages / 8)."""
        with self.slots_lock:
            self._check_open()
            if not (0 <= slot <= 0xFFFFFFFF and 0 <= num_pages <= 0xFFFFFFFF
                    and 0 <= first_page < 1 << 64):  # fmt: skip
                raise MemslotError(EINVAL, "values do not fit the ioctl structure")
            k, _, _ = self._mirror(
                lambda: f"clear_dirty_log({slot:#x}, {first_page}, {num_pages})",
                lambda: self.fd.clear_dirty_log(slot, first_page, num_pages, bytes(bitmap)),
                lambda: Vm.clear_dirty_log(self, slot, first_page, num_pages, bitmap),
            )
            if k:
                raise MemslotError(k, "KVM_CLEAR_DIRTY_LOG")

    # -- the dirty ring ----------------------------------------------------------------
    def enable_dirty_ring(self, size: int, acq_rel: bool = False) -> None:
        """``KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING[_ACQ_REL], size)`` on both; vCPUs made
        afterwards map the kernel's ring. Errnos as
        :meth:`memslots.vm.Vm.enable_dirty_ring`. O(1)."""
        with self.slots_lock:
            self._check_open()
            if not 0 <= size <= U64_MAX:
                raise MemslotError(EINVAL, "size does not fit u64")
            cap = KVM_CAP_DIRTY_LOG_RING_ACQ_REL if acq_rel else KVM_CAP_DIRTY_LOG_RING
            k, _, _ = self._mirror(
                lambda: f"enable_dirty_ring({size:#x}, acq_rel={acq_rel})",
                lambda: self.fd.enable_cap(cap, size),
                lambda: Vm.enable_dirty_ring(self, size, acq_rel),
            )
            if k:
                raise MemslotError(k, "KVM_ENABLE_CAP")
            if not self.dirty_rings.size:  # non-strict and the engine refused: follow
                self.dirty_rings.size = size & U32_MAX
                self.dirty_rings.acq_rel = acq_rel

    def reset_dirty_rings(self) -> int:
        """``KVM_RESET_DIRTY_RINGS`` on the kernel, with its count predicted from the
        kernel's rings (see :mod:`memslots.kvm.ring`), and on the engine's rings of
        host-side writes; returns both counts added. EINVAL without a ring.
        O(entries)."""
        with self.slots_lock, self._ring_lock:
            self._check_open()
            rings = [v.kernel_ring for v in self._kvm_vcpus if v.kernel_ring is not None]
            runs = [r.runs for r in rings]
            predicted = [r.predict_reset() for r in rings]
            applied = 0  # rings whose reset is over: apply_reset ends it before checking
            try:
                k, kcount, host = self._mirror(
                    lambda: "reset_dirty_rings()",
                    self.fd.reset_dirty_rings,
                    lambda: Vm.reset_dirty_rings(self),
                )
                if k:
                    raise MemslotError(k, "KVM_RESET_DIRTY_RINGS")
                if kcount != sum(predicted):
                    self._compare(
                        "reset_dirty_rings()",
                        0,
                        0,
                        f"the kernel reset {kcount} entries, the engine predicted"
                        f" {sum(predicted)} ({predicted} per vCPU)",
                    )
                for ring, count, before in zip(rings, predicted, runs, strict=True):
                    applied += 1
                    ring.apply_reset(count, before)
                return int(kcount) + (host or 0)
            finally:  # a failed reset freed nothing: the rest of the resets are over too
                for ring, count in zip(rings[applied:], predicted[applied:], strict=True):
                    ring.end_reset(count)

    def _report(self, call: str, detail: str) -> None:
        """A kernel ring differs from the engine's model (see :mod:`memslots.kvm.ring`)."""
        self._compare(call, 0, 0, detail)

    def _logging_slots(self) -> dict[int, int]:
        """``{slot number: npages}`` of the slots that log now (cached by generation)."""
        with self.read_section():
            gens = tuple(s.generation for s in self._memslots)
            cached_gens, cached = self._logging_cache
            if gens == cached_gens:
                return cached
            slots = {
                x.slot: x.npages
                for s in self._memslots
                for x in s
                if x.flags & KVM_MEM_LOG_DIRTY_PAGES
            }
            self._logging_cache = (gens, slots)
            return slots

    # -- host-side dirtying (served by the engine) -----------------------------------
    def mark_page_dirty(self, gfn: int) -> None:
        """``mark_page_dirty``: the engine's bitmap only; :meth:`get_dirty_log` merges it
        with the kernel's. O(1) on a slot-cache hit, O(log n) otherwise."""
        self._no_host_writes = False
        super().mark_page_dirty(gfn)

    def write_guest(self, gpa: int, data: Buffer, *, as_id: int = 0) -> None:
        """``kvm_write_guest`` through the engine's slots and :class:`HostMemory` (the
        kernel's memory is the same memory); pages are marked in the engine's bitmap.
        O(len(data))."""
        self._no_host_writes = False
        super().write_guest(gpa, data, as_id=as_id)

    def clear_guest(self, gpa: int, length: int, *, as_id: int = 0) -> None:
        """``kvm_clear_guest``, as :meth:`write_guest`. O(length)."""
        self._no_host_writes = False
        super().clear_guest(gpa, length, as_id=as_id)

    # -- memory and vCPUs ------------------------------------------------------------
    def create_guest_memfd(self, size: int, flags: int = 0) -> int:
        """``KVM_CREATE_GUEST_MEMFD`` in the kernel; the engine records the file so that
        it answers later binds as the kernel does. The caller owns the fd."""
        with self.slots_lock:
            self._check_open()
            k, fd, _ = self._mirror(
                lambda: f"create_guest_memfd({size:#x}, {flags:#x})",
                lambda: self.fd.create_guest_memfd(size, flags),
                lambda: self.check_create_guest_memfd(size, flags),
            )
            if k:
                raise MemslotError(k, "KVM_CREATE_GUEST_MEMFD")
            self.guest_memfds.register(fd, size, flags)
            assert isinstance(fd, int)
            return fd

    def create_vcpu(self, id: int) -> KvmVcpuHandle:
        """``KVM_CREATE_VCPU`` on the kernel, its errno compared with the engine's: a vCPU
        with the engine's lookup cache plus a real vCPU that runs real-mode guests
        (``KVM_SET_TSS_ADDR`` is done on the first one) and, with the dirty ring on, the
        kernel's ring mapped."""
        with self.slots_lock:
            self._check_open()
            if not 0 <= id <= U32_MAX:
                raise MemslotError(EINVAL, "vCPU id does not fit u32")
            made: list[KvmVcpu] = []
            try:
                k, _, _ = self._mirror(
                    lambda: f"create_vcpu({id})",
                    lambda: made.append(_open_vcpu(self.fd, id)),
                    lambda: self._check_new_vcpu(id, self._vcpus),
                )
            except ConformanceError:
                for v in made:
                    v.close()
                raise
            if k:
                raise MemslotError(k, "KVM_CREATE_VCPU")
            self._no_guest_writes = False  # from now on the guest may dirty pages
            self.created_vcpus += 1
            try:
                handle = KvmVcpuHandle(self, id, made[0])
            except BaseException:
                made[0].close()
                raise
            self._vcpus[id] = handle
            self._kvm_vcpus.append(handle)
            return handle

    # -- lifetime --------------------------------------------------------------------
    def close(self) -> None:
        """Delete the slots over memory this VM owns (:meth:`host_memory`) in the kernel,
        so that no slot outlives its memory even if something else keeps the VM alive
        (a guest_memfd, a duplicated fd), close the vCPUs and the VM (which destroys it
        with its remaining slots), then unmap the memory this VM owns. Idempotent.

        O(slots x owned mappings) to find the slots, plus one kernel DELETE per slot over
        owned memory; destroying a VM with 32764 slots takes the kernel about 0.3 s.
        """
        with self._close_lock:
            if self._closed:
                return
            with self.slots_lock:
                try:
                    owned = [(m.addr, m.addr + m.size) for m in self._owned_memory]
                    for s in self.slots() if owned else ():
                        start = s.userspace_addr
                        end = start + (s.npages << s.page_shift)
                        if any(start < hi and lo < end for lo, hi in owned):
                            with contextlib.suppress(MemslotError):
                                self.fd.set_user_memory_region(s.slot, 0, 0, 0, 0)
                finally:
                    self._closed = True
                    for v in self._kvm_vcpus:
                        v.close()
                    self.fd.close()
                    if self._owns_system:
                        self._system.close()
                    mems, self._owned_memory = self._owned_memory, []
                    for mem in mems:
                        mem.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            with contextlib.suppress(Exception):
                self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"fd={self.fd.fd}"
        return f"KvmVm({state}, slots={sum(len(s) for s in self._memslots)}, strict={self.strict})"


def _open_vcpu(fd: VmFd, id: int) -> KvmVcpu:
    """A vCPU of ``fd``: its own ``open_vcpu(id)`` when it has one (a VM of a kernel under
    QEMU, :meth:`memslots.tools.kernels.remote.RemoteVmFd.open_vcpu`), else a local
    :class:`memslots.kvm.vcpu.KvmVcpu`."""
    opener: Callable[[int], KvmVcpu] | None = getattr(fd, "open_vcpu", None)
    return KvmVcpu(fd, id) if opener is None else opener(id)


def _pages(pages: list[int], limit: int = 8) -> str:
    """``[0, 5, 9]``, or the first ``limit`` pages and how many more."""
    if len(pages) <= limit:
        return str(pages)
    return f"[{', '.join(map(str, pages[:limit]))}, ... +{len(pages) - limit}]"


def _fmt_call(name: str, args: tuple[int, ...]) -> str:
    slot, flags, gpa, size, hva = args
    return f"{name}(slot={slot:#x}, flags={flags:#x}, gpa={gpa:#x}, size={size:#x}, hva={hva:#x})"


def open_fd_count() -> int:
    """Number of open file descriptors of this process (for leak tests)."""
    return len(os.listdir("/proc/self/fd"))
