"""The narrow, typed interfaces between the layers.

The engine's helpers for dirty logging (:mod:`memslots.dirty_log`) and guest memory
(:mod:`memslots.guest_memory`) do not reach into a VM's internals: they work on anything
that offers :class:`VmView`, which the tree engine (:class:`memslots.Vm`), the array
baseline (:class:`memslots.baseline.ArrayVm`) and the ``/dev/kvm`` mirror
(:class:`memslots.kvm.KvmVm`) all do. The tools (replay, conform, bench) drive any VM
through :class:`MemslotTarget`.

These are :class:`typing.Protocol` classes: a VM satisfies them by having the members, not
by inheriting from them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from typing import Protocol

from memslots.slot import Memslot
from memslots.sync import Srcu
from memslots.validate import VmLimits

__all__ = ["MemslotTarget", "RegionTarget", "SlotsView", "VmView"]


class SlotsView(Protocol):
    """The read side of one memslot set (``struct kvm_memslots``):
    :class:`memslots.MemslotSet` and :class:`memslots.baseline.ArrayMemslotSet`."""

    @property
    def as_id(self) -> int: ...

    @property
    def generation(self) -> int: ...

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Memslot]: ...

    def gfn_to_memslot(self, gfn: int) -> Memslot | None: ...

    def search(self, gfn: int) -> Memslot | None: ...

    def id_to_memslot(self, id: int) -> Memslot | None: ...

    def iter_gfn_range(self, start: int, end: int) -> Iterable[Memslot]: ...

    def iter_hva_range(self, start: int, last: int) -> Iterable[Memslot]: ...


class VmView(Protocol):
    """What dirty logging and guest-memory access need of a VM: its limits, its read-side
    grace periods, its writer lock and the active set of each address space."""

    @property
    def nr_address_spaces(self) -> int: ...

    @property
    def limits(self) -> VmLimits: ...

    @property
    def srcu(self) -> Srcu: ...

    @property
    def slots_lock(self) -> AbstractContextManager[bool]: ...

    #: the ``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`` value
    manual_dirty_log_protect: int

    def memslots(self, as_id: int = 0) -> SlotsView:
        """The active set of ``as_id`` (EINVAL for an address space that does not
        exist); valid only inside a read section or under ``slots_lock``."""
        ...


class RegionTarget(Protocol):
    """Anything that takes ``KVM_SET_USER_MEMORY_REGION``: every :class:`MemslotTarget`
    and the peers ``memslots bench`` measures (Unicorn, a model of rust-vmm vm-memory)."""

    def set_user_memory_region(
        self, slot: int, flags: int, guest_phys_addr: int, memory_size: int, userspace_addr: int
    ) -> None: ...


class MemslotTarget(RegionTarget, Protocol):
    """Anything that takes the two memslot ioctls: ``Vm``, ``ArrayVm``, ``KvmVm``, a raw
    ``memslots.kvm.abi.VmFd`` or a recorder wrapping one of them."""

    def set_user_memory_region2(
        self,
        slot: int,
        flags: int,
        guest_phys_addr: int,
        memory_size: int,
        userspace_addr: int,
        guest_memfd_offset: int = 0,
        guest_memfd: int = 0,
    ) -> None: ...
