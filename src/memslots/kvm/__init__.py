"""The ``/dev/kvm`` backend.

- :class:`KvmVm`: the memslots API of :class:`memslots.Vm` on a real VM; every memslot call goes
  to the kernel and is checked against the engine (:class:`ConformanceError` in strict
  mode).
- :mod:`memslots.kvm.abi`: the raw ABI (uapi structures, ioctls,
  :class:`~memslots.kvm.abi.KvmSystem`, :class:`~memslots.kvm.abi.VmFd`,
  :func:`kvm_available`, :func:`kvm_unavailable`).
- :class:`KvmUnavailable` (:mod:`memslots.errors`): what :class:`KvmVm` raises when the
  device cannot be used, naming the cause (permission, no device, no driver, API version).
- :mod:`memslots.kvm.vcpu`: vCPUs that run small real-mode guests.
- :mod:`memslots.kvm.guests`: those guests, as bytes with their assembly source.

Importing this package opens no device.
"""

from __future__ import annotations

from memslots.errors import KvmUnavailable
from memslots.kvm.abi import kvm_available, kvm_unavailable
from memslots.kvm.vm import ConformanceError, Disagreement, KvmVcpuHandle, KvmVm, probe_max_gfn

__all__ = [
    "ConformanceError",
    "Disagreement",
    "KvmUnavailable",
    "KvmVcpuHandle",
    "KvmVm",
    "kvm_available",
    "kvm_unavailable",
    "probe_max_gfn",
]
