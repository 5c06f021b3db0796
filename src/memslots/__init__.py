"""memslots: Linux KVM's tree-based memory slots, in Python.

The engine (:class:`Vm`) keeps two memslot sets per address space that share memslot
objects, changes only the inactive one, publishes it and waits for readers of the old one
before bringing it in line (commit a54d806688fe). See README.md and docs/design.md.
"""

from memslots._build import compiled as _compiled
from memslots.constants import (
    KVM_HVA_ERR_BAD,
    KVM_HVA_ERR_RO_BAD,
    KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
    KVM_MEMSLOT_INVALID,
    PAGE_SHIFT,
    PAGE_SIZE,
)
from memslots.errors import MemslotError
from memslots.guest_memory import HostMemory
from memslots.memslot_set import MemslotSet
from memslots.slot import Memslot, kvm_is_error_hva
from memslots.validate import Change
from memslots.vm import Vcpu, Vm

__version__ = "0.1.0"

#: True when the engine runs compiled by mypyc, False for the pure-Python build (chosen
#: at install time: ``MEMSLOTS_PURE_PYTHON=1 pip install ...`` builds pure Python). Both
#: behave identically; the compiled one is 2-3x faster per memslot update.
COMPILED: bool = _compiled()

__all__ = [
    "COMPILED",
    "KVM_HVA_ERR_BAD",
    "KVM_HVA_ERR_RO_BAD",
    "KVM_MEMSLOT_INVALID",
    "KVM_MEM_GUEST_MEMFD",
    "KVM_MEM_LOG_DIRTY_PAGES",
    "KVM_MEM_READONLY",
    "PAGE_SHIFT",
    "PAGE_SIZE",
    "Change",
    "HostMemory",
    "Memslot",
    "MemslotError",
    "MemslotSet",
    "Vcpu",
    "Vm",
    "kvm_is_error_hva",
]
