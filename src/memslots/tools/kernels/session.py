"""What a command needs to run against ``--kernel KERNEL``: one context manager that boots
the kernel and hands out what the tools take.

::

    with open_kernel("debian:6.1") as k:
        report = run_conform(2000, seed, vm_factory=k.vm_factory)

``k.vm_factory(strict=..., path=...)`` makes a :class:`memslots.kvm.KvmVm` on the guest
kernel (``path`` is ignored), with the kernel's profile probed once at boot
(:attr:`KernelSession.profile`), so every VM of a run costs one ``KVM_CREATE_VM`` round
trip, not a probe. A run of many VMs shares one boot: each VM's descriptors are closed
in the guest when the VM closes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from memslots.kvm.vm import KvmVm
from memslots.profiles import KernelProfile
from memslots.tools.kernels.qemu import GuestKernel
from memslots.tools.kernels.remote import RemoteKvmSystem
from memslots.tools.kernels.spec import parse_spec

__all__ = ["KernelSession", "open_kernel"]


@dataclass(frozen=True, slots=True)
class KernelSession:
    """A booted kernel and what the tools take of it."""

    guest: GuestKernel
    system: RemoteKvmSystem
    #: the guest kernel's profile, probed at boot
    profile: KernelProfile
    #: ``factory(strict=..., path=...)`` -> a :class:`memslots.kvm.KvmVm` on the guest
    vm_factory: Callable[..., KvmVm]

    @property
    def description(self) -> str:
        """E.g. ``debian:6.1 linux-image-6.1.0-50-amd64 6.1.176-1 (6.1.0-50-amd64 under
        QEMU)``."""
        info = self.guest.info
        release = info.release if info is not None else "?"
        return f"{self.guest.description} ({release} under QEMU)"


@contextlib.contextmanager
def open_kernel(
    spec: str,
    *,
    arch: str = "x86_64",
    modules: str | None = None,
    la57: bool = False,
    progress: bool = True,
) -> Iterator[KernelSession]:
    """Boot ``spec`` (``debian:SERIES`` or an image path, with ``modules``) for ``arch``
    under QEMU, probe its profile, and yield a :class:`KernelSession`; QEMU is killed on
    the way out, whatever happens (Ctrl-C included). Raises
    :class:`~memslots.tools.kernels.spec.KernelBootError` (one-line message) when the
    kernel cannot be booted or has no KVM."""
    guest = GuestKernel(parse_spec(spec, arch=arch, modules=modules), la57=la57, progress=progress)
    with guest:
        system = RemoteKvmSystem(guest)
        profile = system.profile()
        yield KernelSession(guest, system, profile, system.vm_factory(profile))
