"""The kernel column of a replay: one fresh ``/dev/kvm`` VM per traced VM.

:class:`KernelSession` is a :class:`memslots.kvm.KvmVm` (non-strict: the engine inside it
mirrors the kernel and notes where they differ) with the trace's hvas relocated onto
:class:`~memslots.HostMemory` mappings the VM owns (:mod:`.relocation`). Every record
goes through ``KvmVm``'s own calls (the dirty ring's enable and reset too), so the kernel
answers it and the engine inside checks the answer.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from memslots.kvm import KvmVm
from memslots.slot import Memslot
from memslots.tools.replay.relocation import HvaRelocation
from memslots.tools.replay.report import MapEntry, memory_map
from memslots.tools.traces import MemslotCall
from memslots.validate import VmLimits
from memslots.view import MemslotTarget

__all__ = ["KernelSession", "KernelVm", "open_kernel"]


@dataclass(frozen=True, slots=True)
class KernelVm:
    """Where the kernel column's VMs come from when it is not this machine's /dev/kvm:
    ``factory(strict=...)`` makes a :class:`memslots.kvm.KvmVm` on that kernel (a kernel
    booted under QEMU: :attr:`memslots.tools.kernels.KernelSession.vm_factory`), and
    ``description`` names it in the report."""

    factory: Callable[..., KvmVm]
    description: str


class _TimedFd:
    """Stands in for a :class:`KvmVm`'s VM fd and times its memslot ioctls alone, so the
    kernel column does not include the engine that mirrors the kernel inside ``KvmVm``.
    Everything else is the fd's."""

    def __init__(self, fd: Any) -> None:
        self._fd = fd
        #: duration of the last memslot ioctl, in ns (0 when none was made)
        self.last_ns = 0

    def set_user_memory_region(self, *args: int) -> None:
        t0 = time.perf_counter_ns()
        try:
            self._fd.set_user_memory_region(*args)
        finally:
            self.last_ns = time.perf_counter_ns() - t0

    def set_user_memory_region2(self, *args: int) -> None:
        t0 = time.perf_counter_ns()
        try:
            self._fd.set_user_memory_region2(*args)
        finally:
            self.last_ns = time.perf_counter_ns() - t0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fd, name)


class KernelSession:
    """A fresh :class:`memslots.kvm.KvmVm` (non-strict) with the hvas of ``calls``
    relocated onto :class:`~memslots.HostMemory` mappings the VM owns.

    ``target`` takes the memslot calls (relocate them first with :meth:`translate_call`);
    ``limits`` are the kernel's (the models get them too); ``ioctl_ns()`` is the duration
    of the last memslot ioctl alone. :meth:`close` (or ``with``) deletes every slot in the
    kernel, destroys the VM and unmaps the memory, in that order. Raises OSError when
    ``/dev/kvm`` cannot be used.
    """

    def __init__(self, calls: Sequence[MemslotCall], kernel_vm: KernelVm | None = None) -> None:
        self.vm = KvmVm(strict=False) if kernel_vm is None else kernel_vm.factory(strict=False)
        try:
            self._fd = _TimedFd(self.vm.fd)
            self.vm.fd = cast(Any, self._fd)
            self.relocation = HvaRelocation(
                calls, task_size_max=self.vm.limits.task_size_max, allocate=self.vm.host_memory
            )
        except BaseException:
            self.vm.close()
            raise
        self.limits: VmLimits = self.vm.limits
        self.target: MemslotTarget = self.vm
        self.description = (
            f"/dev/kvm (Linux {os.uname().release}) through memslots.kvm.KvmVm"
            if kernel_vm is None
            else f"{kernel_vm.description} through memslots.kvm.KvmVm"
        )

    def ioctl_ns(self) -> int:
        """Duration of the last memslot ioctl in ns (0 if the last call made none)."""
        ns, self._fd.last_ns = self._fd.last_ns, 0
        return ns

    def translate_call(self, call: MemslotCall) -> MemslotCall:
        """``call`` with its hva relocated (see :class:`HvaRelocation`). O(log c)."""
        return self.relocation.translate_call(call)

    def memory_map(self) -> dict[int, list[MapEntry]]:
        """The final map as the VM mirrors it, hvas translated back to the trace's."""

        def slots(a: int) -> list[Memslot]:
            return list(self.vm.memslots(a))

        return memory_map(slots, self.vm.nr_address_spaces, self.relocation.untranslate)

    def close(self) -> None:
        """Delete every slot in the kernel, destroy the VM, unmap (idempotent)."""
        self.vm.close()
        self.relocation.close()

    def __enter__(self) -> KernelSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def open_kernel(calls: Sequence[MemslotCall], kernel_vm: KernelVm | None = None) -> KernelSession:
    """A :class:`KernelSession` for ``calls`` (on ``kernel_vm``'s kernel when given);
    raises OSError when ``/dev/kvm`` cannot be used. O(n log n) for the relocation."""
    return KernelSession(calls, kernel_vm)
