"""Running conformance operations on a fresh :class:`~memslots.kvm.KvmVm` (non-strict:
disagreements are recorded, not raised), with the files, vCPUs and host memory that
operations name by alias."""

from __future__ import annotations

import bisect
import os
from collections.abc import Callable, Iterable

from memslots.errors import MemslotError
from memslots.guest_memory import HostMemory
from memslots.kvm.abi import KVM_DEV_PATH
from memslots.kvm.vm import ENGINE_RAISED, ConformanceError, Disagreement, KvmVcpuHandle, KvmVm
from memslots.tools.conform.ops import (
    WRITE_BYTE,
    ClearDirtyLog,
    CreateGuestMemfd,
    CreateVcpu,
    CreateVm,
    EnableDirtyRing,
    EnableManualDirtyLogProtect,
    GetDirtyLog,
    HarvestDirtyRing,
    MapMemory,
    Op,
    OpenDevNull,
    ResetDirtyRings,
    VcpuMarkPageDirty,
    VcpuWriteGuest,
    with_result,
)
from memslots.tools.traces import MemslotCall

__all__ = ["Session", "VmFactory", "replay_ops"]

VmFactory = Callable[..., KvmVm]


class Session:
    """A fresh :class:`KvmVm` and the files, vCPUs and host memory that operations name
    by alias (see :mod:`memslots.tools.conform.ops`).

    ``Session(strict=False, path="/dev/kvm", vm_factory=KvmVm)``; use it as a context
    manager (:meth:`close` closes the VM, with its vCPUs and memory, then the aliased
    files). ``vm_factory`` lets tests plant a bug in the engine (a ``KvmVm`` subclass).
    """

    def __init__(
        self,
        *,
        strict: bool = False,
        path: str = KVM_DEV_PATH,
        vm_factory: VmFactory = KvmVm,
        vm_type: int = 0,
    ) -> None:
        if vm_type:
            self.vm = vm_factory(strict=strict, path=path, vm_type=vm_type)
        else:  # (factories of tests that plant bugs take no type)
            self.vm = vm_factory(strict=strict, path=path)
        self._fds: dict[int, int] = {}
        #: the vCPUs created so far, by id
        self.vcpus: dict[int, KvmVcpuHandle] = {}
        #: ``(alias hva, mapping)`` of every :class:`MapMemory`, sorted by alias
        self._memory: list[tuple[int, HostMemory]] = []

    def fd(self, alias: int) -> int:
        """The real descriptor of ``alias``, or ``alias`` itself if it names nothing."""
        return self._fds.get(alias, alias)

    def hva(self, alias: int) -> int:
        """The real hva of ``alias`` (inside a :class:`MapMemory` range), or ``alias``
        itself. O(log mappings)."""
        i = bisect.bisect_right(self._memory, alias, key=lambda m: m[0]) - 1
        if i >= 0:
            start, mem = self._memory[i]
            if alias - start < mem.size:
                return mem.addr + (alias - start)
        return alias

    def alias_hva(self, hva: int) -> int:
        """The inverse of :meth:`hva`: the alias of a real hva inside a mapping (what
        the generator must name), or ``hva`` itself. O(mappings)."""
        for start, mem in self._memory:
            if 0 <= hva - mem.addr < mem.size:
                return start + (hva - mem.addr)
        return hva

    def _close_alias(self, alias: int) -> None:
        fd = self._fds.pop(alias, None)
        if fd is not None:
            self.vm.fd.close_fd(fd)

    def _map(self, op: MapMemory) -> None:
        """Map ``op``'s memory unless its range overlaps one mapped already."""
        end = op.hva + op.size
        if any(start < end and op.hva < start + mem.size for start, mem in self._memory):
            return
        bisect.insort(self._memory, (op.hva, self.vm.host_memory(op.size)), key=lambda m: m[0])

    def run(self, op: Op) -> int:
        """Run ``op``; return the kernel's errno (0 for success; for the operations the
        kernel does not see, the engine's). In a strict session an engine that disagrees
        raises :class:`~memslots.kvm.ConformanceError`. Cost: one kernel call and its
        mirror (a host-side write: O(its length))."""
        vm = self.vm
        try:
            if isinstance(op, MemslotCall):
                hva = self.hva(op.userspace_addr) if self._memory else op.userspace_addr
                if op.v2:
                    vm.set_user_memory_region2(
                        op.slot,
                        op.flags,
                        op.guest_phys_addr,
                        op.memory_size,
                        hva,
                        op.guest_memfd_offset,
                        self.fd(op.guest_memfd),
                    )
                else:
                    vm.set_user_memory_region(
                        op.slot, op.flags, op.guest_phys_addr, op.memory_size, hva
                    )
            elif isinstance(op, GetDirtyLog):
                vm.get_dirty_log(op.slot)
            elif isinstance(op, ClearDirtyLog):
                vm.clear_dirty_log(op.slot, op.first_page, op.num_pages, op.bitmap)
            elif isinstance(op, EnableManualDirtyLogProtect):
                vm.enable_manual_dirty_log_protect(op.flags)
            elif isinstance(op, EnableDirtyRing):
                vm.enable_dirty_ring(op.size, op.acq_rel)
            elif isinstance(op, CreateVcpu):
                self.vcpus[op.id] = vm.create_vcpu(op.id)
            elif isinstance(op, ResetDirtyRings):
                vm.reset_dirty_rings()
            elif isinstance(op, HarvestDirtyRing | VcpuMarkPageDirty | VcpuWriteGuest):
                self._on_vcpu(op)
            elif isinstance(op, MapMemory):
                self._map(op)
            elif isinstance(op, CreateGuestMemfd):
                fd = vm.create_guest_memfd(op.size, op.flags)
                self._close_alias(op.fd)
                self._fds[op.fd] = fd
            elif isinstance(op, OpenDevNull):
                fd = _open_devnull(self.vm)
                self._close_alias(op.fd)
                self._fds[op.fd] = fd
            elif isinstance(op, CreateVm):  # only first in a sequence (replay_ops)
                raise ValueError("create_vm is only the first operation of a sequence")
            else:
                self._close_alias(op.fd)
        except MemslotError as exc:
            return exc.errno or 0
        return 0

    def _on_vcpu(self, op: HarvestDirtyRing | VcpuMarkPageDirty | VcpuWriteGuest) -> None:
        """An operation on one vCPU that only the engine (and the kernel's mapped ring)
        sees. An engine that raises anything but :class:`MemslotError` is recorded as a
        :class:`Disagreement` (the kernel, which is not asked, stands for success)."""
        vcpu = self.vcpus.get(op.vcpu)
        if vcpu is None:
            return
        try:
            if isinstance(op, HarvestDirtyRing):
                vcpu.harvest_dirty_ring()
            elif isinstance(op, VcpuMarkPageDirty):
                vcpu.mark_page_dirty(op.gfn)
            else:
                vcpu.write_guest(op.gpa, bytes([WRITE_BYTE]) * op.length)
        except MemslotError:
            raise
        except Exception as exc:
            d = Disagreement(_describe(op), 0, ENGINE_RAISED, f"{type(exc).__name__}: {exc}")
            self.vm.disagreements.append(d)
            if self.vm.strict:
                raise ConformanceError(d) from exc

    def vcpu_ids(self) -> list[int]:
        """The ids of the vCPUs created so far, in creation order."""
        return list(self.vcpus)

    def close(self) -> None:
        """Close the VM (its vCPUs and memory with it), then every aliased file.
        Idempotent."""
        self.vm.close()
        self.vcpus.clear()
        self._memory.clear()
        for alias in list(self._fds):
            self._close_alias(alias)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open_devnull(vm: KvmVm) -> int:
    """An fd that is not a guest_memfd, where the VM's kernel is: ``/dev/null`` opened
    here, or through the VM fd's ``open_devnull`` for a kernel under QEMU."""
    opener: Callable[[], int] | None = getattr(vm.fd, "open_devnull", None)
    if opener is not None:
        return opener()
    return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)


def _describe(op: HarvestDirtyRing | VcpuMarkPageDirty | VcpuWriteGuest) -> str:
    if isinstance(op, HarvestDirtyRing):
        return f"vcpu{op.vcpu}.harvest_dirty_ring()"
    if isinstance(op, VcpuMarkPageDirty):
        return f"vcpu{op.vcpu}.mark_page_dirty({op.gfn:#x})"
    return f"vcpu{op.vcpu}.write_guest({op.gpa:#x}, {op.length} bytes)"


def replay_ops(
    ops: Iterable[Op], *, path: str = KVM_DEV_PATH, vm_factory: VmFactory = KvmVm
) -> tuple[list[Op], list[tuple[int, Disagreement]]]:
    """Run ``ops`` on a fresh VM (non-strict). Returns the operations with the kernel's
    answers as their ``result``, and ``(index, disagreement)`` for every call the kernel
    and the engine answered differently. O(len(ops)) kernel calls."""
    ops = list(ops)
    done: list[Op] = []
    found: list[tuple[int, Disagreement]] = []
    vm_type = 0
    if ops and isinstance(ops[0], CreateVm):  # the VM's type: made by the session
        vm_type = ops[0].type
        try:
            session = Session(path=path, vm_factory=vm_factory, vm_type=vm_type)
        except MemslotError as exc:  # the kernel refused the type: nothing more to run
            return [with_result(ops[0], exc.errno or 0)], found
        session.close()
        done.append(with_result(ops[0], 0))
    with Session(path=path, vm_factory=vm_factory, vm_type=vm_type) as s:
        for i, op in enumerate(ops[len(done) :], start=len(done)):
            before = len(s.vm.disagreements)
            done.append(with_result(op, s.run(op)))
            found.extend((i, d) for d in s.vm.disagreements[before:])
    return done, found
