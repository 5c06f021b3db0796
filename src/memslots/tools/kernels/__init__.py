"""Checking the engine against any Linux kernel: boot it under QEMU (TCG, no host KVM
needed) with a tiny agent as ``/init`` and run KVM calls in it.

``--kernel KERNEL`` of ``memslots conform`` and ``memslots replay`` names the kernel:
``debian:SERIES`` (5.10, 6.1, 6.12, 7.2: the newest Debian package of the series, fetched
with apt under a private configuration and verified against the Debian archive keyring)
or the path of a kernel image, with ``--modules DIR`` when its KVM is built as modules.

The pieces:

- :mod:`~memslots.tools.kernels.spec`: parsing ``--kernel``, the cache folder,
  :class:`KernelBootError`;
- :mod:`~memslots.tools.kernels.debian`: resolving, fetching and unpacking Debian kernels;
- :mod:`~memslots.tools.kernels.agent`: building the agent (``agent.c``) with the local
  compiler; :mod:`~memslots.tools.kernels.initramfs`: the cpio archive with the agent and
  the KVM modules in dependency order;
- :mod:`~memslots.tools.kernels.qemu`: :class:`GuestKernel`, QEMU's lifetime and the
  request/reply exchange; :mod:`~memslots.tools.kernels.protocol`: the framing;
- :mod:`~memslots.tools.kernels.remote`: :class:`RemoteKvmSystem`, :class:`RemoteVmFd`,
  :class:`RemoteVcpu`: the local KVM ABI's interface, served by the guest;
- :mod:`~memslots.tools.kernels.session`: :func:`open_kernel`, what a command uses.

Typical use::

    with open_kernel("debian:6.1") as k:             # a KvmVm on the guest kernel
        with k.vm_factory(strict=True) as vm:
            vm.set_user_memory_region(0, 0, 0, 1 << 20, 0x7F0000000000)

    with GuestKernel(parse_spec("debian:6.1")) as guest:   # the raw calls
        vm = RemoteKvmSystem(guest).create_vm()
        vm.set_user_memory_region(0, 0, 0, 1 << 20, 0x7F0000000000)
"""

from memslots.tools.kernels.qemu import GuestInfo, GuestKernel
from memslots.tools.kernels.remote import (
    RemoteKvmSystem,
    RemoteUnsupported,
    RemoteVcpu,
    RemoteVmFd,
    RingMirror,
)
from memslots.tools.kernels.session import KernelSession, open_kernel
from memslots.tools.kernels.spec import KernelBootError, KernelSpec, parse_spec

__all__ = [
    "GuestInfo",
    "GuestKernel",
    "KernelBootError",
    "KernelSession",
    "KernelSpec",
    "RemoteKvmSystem",
    "RemoteUnsupported",
    "RemoteVcpu",
    "RemoteVmFd",
    "RingMirror",
    "open_kernel",
    "parse_spec",
]
