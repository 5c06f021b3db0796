"""The ``/dev/kvm`` backend: the raw ABI (:mod:`memslots.kvm.abi`), vCPUs that run small
real-mode guests (:mod:`memslots.kvm.vcpu`) and those guests (:mod:`memslots.kvm.guests`).

Importing this package loads nothing heavy and opens no device; use
:func:`memslots.kvm.abi.kvm_available` to learn whether ``/dev/kvm`` is usable.
"""

from __future__ import annotations

# Placeholder: ``KvmVm`` (the SPEC section 3 API on a real VM) and ``ConformanceError`` are
# exported here by the module that implements them; nothing else is exported yet.
