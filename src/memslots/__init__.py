"""memslots: Linux KVM's tree-based memory slots, in Python.

The engine (:class:`Vm`) keeps two memslot sets per address space that share memslot
objects, changes only the inactive one, publishes it and waits for readers of the old one
before bringing it in line (commit a54d806688fe). See README.md and docs/design.md.

The names below are imported on first use (PEP 562), so that importing a submodule, or
``python -m memslots`` and the ``memslots`` command, does not load the whole engine
first; ``from memslots import Vm`` works as usual.
"""

from __future__ import annotations

# typing is not imported: ``import memslots`` loads nothing but this file and __future__
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

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
    from memslots.profiles import KernelProfile
    from memslots.slot import Memslot, kvm_is_error_hva
    from memslots.validate import Change
    from memslots.vm import Vcpu, Vm

    #: True when the engine runs compiled by mypyc, False for the pure-Python build
    #: (chosen at install time: ``MEMSLOTS_PURE_PYTHON=1 pip install ...`` builds pure
    #: Python). Both behave identically; the compiled one is 2-3x faster per memslot
    #: update.
    COMPILED: bool

__version__ = "0.3.0"

#: each public name and the module that defines it
_EXPORTS: dict[str, str] = {
    "KVM_HVA_ERR_BAD": "constants",
    "KVM_HVA_ERR_RO_BAD": "constants",
    "KVM_MEMSLOT_INVALID": "constants",
    "KVM_MEM_GUEST_MEMFD": "constants",
    "KVM_MEM_LOG_DIRTY_PAGES": "constants",
    "KVM_MEM_READONLY": "constants",
    "PAGE_SHIFT": "constants",
    "PAGE_SIZE": "constants",
    "Change": "validate",
    "HostMemory": "guest_memory",
    "KernelProfile": "profiles",
    "Memslot": "slot",
    "MemslotError": "errors",
    "MemslotSet": "memslot_set",
    "Vcpu": "vm",
    "Vm": "vm",
    "kvm_is_error_hva": "slot",
}

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
    "KernelProfile",
    "Memslot",
    "MemslotError",
    "MemslotSet",
    "Vcpu",
    "Vm",
    "kvm_is_error_hva",
]


def __getattr__(name: str) -> Any:
    """The public names, imported on first use; ``COMPILED`` first (which imports the
    engine and warns when a source checkout's compiled modules are older than their
    sources). A submodule not imported yet (``memslots.vm``) is imported too."""
    import importlib

    if name == "COMPILED":
        from memslots._build import compiled

        value: Any = compiled()
    elif name in _EXPORTS:
        __getattr__("COMPILED")
        value = getattr(importlib.import_module(f"memslots.{_EXPORTS[name]}"), name)
    elif name.startswith("__"):
        raise AttributeError(f"module 'memslots' has no attribute {name!r}")
    else:
        try:
            value = importlib.import_module(f"memslots.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"memslots.{name}":
                raise
            raise AttributeError(f"module 'memslots' has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
