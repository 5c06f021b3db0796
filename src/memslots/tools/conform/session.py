"""Running conformance operations on a fresh :class:`~memslots.kvm.KvmVm` (non-strict:
disagreements are recorded, not raised), with the files operations name by alias."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

from memslots.errors import MemslotError
from memslots.kvm.abi import KVM_DEV_PATH
from memslots.kvm.vm import Disagreement, KvmVm
from memslots.tools.conform.ops import (
    ClearDirtyLog,
    CreateGuestMemfd,
    EnableManualDirtyLogProtect,
    GetDirtyLog,
    Op,
    OpenDevNull,
    with_result,
)
from memslots.tools.traces import MemslotCall

__all__ = ["Session", "VmFactory", "replay_ops"]

VmFactory = Callable[..., KvmVm]


class Session:
    """A fresh :class:`KvmVm` and the files that operations name by alias.

    ``Session(strict=False, path="/dev/kvm", vm_factory=KvmVm)``; use it as a context
    manager (:meth:`close` closes the VM, then the aliased files). ``vm_factory`` lets
    tests plant a bug in the engine (a ``KvmVm`` subclass).
    """

    def __init__(
        self, *, strict: bool = False, path: str = KVM_DEV_PATH, vm_factory: VmFactory = KvmVm
    ) -> None:
        self.vm = vm_factory(strict=strict, path=path)
        self._fds: dict[int, int] = {}

    def fd(self, alias: int) -> int:
        """The real descriptor of ``alias``, or ``alias`` itself if it names nothing."""
        return self._fds.get(alias, alias)

    def _close_alias(self, alias: int) -> None:
        fd = self._fds.pop(alias, None)
        if fd is not None:
            os.close(fd)

    def run(self, op: Op) -> int:
        """Run ``op``; return the kernel's errno (0 for success). In a strict session an
        engine that disagrees raises :class:`~memslots.kvm.ConformanceError`. Cost: one
        kernel call and its mirror."""
        vm = self.vm
        try:
            if isinstance(op, MemslotCall):
                if op.v2:
                    vm.set_user_memory_region2(
                        op.slot,
                        op.flags,
                        op.guest_phys_addr,
                        op.memory_size,
                        op.userspace_addr,
                        op.guest_memfd_offset,
                        self.fd(op.guest_memfd),
                    )
                else:
                    vm.set_user_memory_region(
                        op.slot, op.flags, op.guest_phys_addr, op.memory_size, op.userspace_addr
                    )
            elif isinstance(op, GetDirtyLog):
                vm.get_dirty_log(op.slot)
            elif isinstance(op, ClearDirtyLog):
                vm.clear_dirty_log(op.slot, op.first_page, op.num_pages, op.bitmap)
            elif isinstance(op, EnableManualDirtyLogProtect):
                vm.enable_manual_dirty_log_protect(op.flags)
            elif isinstance(op, CreateGuestMemfd):
                fd = vm.create_guest_memfd(op.size, op.flags)
                self._close_alias(op.fd)
                self._fds[op.fd] = fd
            elif isinstance(op, OpenDevNull):
                fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
                self._close_alias(op.fd)
                self._fds[op.fd] = fd
            else:
                self._close_alias(op.fd)
        except MemslotError as exc:
            return exc.errno or 0
        return 0

    def close(self) -> None:
        """Close the VM, then every aliased file. Idempotent."""
        self.vm.close()
        for alias in list(self._fds):
            self._close_alias(alias)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def replay_ops(
    ops: Iterable[Op], *, path: str = KVM_DEV_PATH, vm_factory: VmFactory = KvmVm
) -> tuple[list[Op], list[tuple[int, Disagreement]]]:
    """Run ``ops`` on a fresh VM (non-strict). Returns the operations with the kernel's
    answers as their ``result``, and ``(index, disagreement)`` for every call the kernel
    and the engine answered differently. O(len(ops)) kernel calls."""
    done: list[Op] = []
    found: list[tuple[int, Disagreement]] = []
    with Session(path=path, vm_factory=vm_factory) as s:
        for i, op in enumerate(ops):
            before = len(s.vm.disagreements)
            done.append(with_result(op, s.run(op)))
            found.extend((i, d) for d in s.vm.disagreements[before:])
    return done, found
