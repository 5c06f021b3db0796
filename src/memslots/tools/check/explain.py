"""Why a call failed: the kernel check that refused it, in words, with its kernel function.

The engine raises every refusal as a :class:`memslots.errors.MemslotError` whose
``.refusal`` (a :class:`memslots.errors.Refusal`) names the check and the kernel function
that makes it, and the slot in the way or concerned. :func:`explain` turns one into an
:class:`Explanation`; :class:`Placements` remembers which record put each live slot where
it is, so that an explanation of a conflict names that record too::

    EEXIST: gpa 0xfebf0000-0xfebf0fff overlaps slot 7, gpa 0xfe000000-0xfeffffff,
    created at line 41

:data:`CHECKS` lists every check with its words and kernel function (docs/check.md shows
the same list). ``memslots check``, ``memslots replay`` (text, ``--json``) and its
``--html`` page all explain failures with this module.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Final

from memslots.errors import MemslotError, errno_name
from memslots.slot import Memslot
from memslots.tools.traces import MemslotCall, Record

__all__ = ["CHECKS", "Explanation", "Placements", "explain", "unexplained"]

_MAIN: Final = "virt/kvm/kvm_main.c"

#: every check the engine can refuse a call with: id -> (what it checks, in words; the
#: kernel function that makes it)
CHECKS: Final[dict[str, tuple[str, str]]] = {
    "no-ioctl": ("the ioctl does not exist in this kernel", f"{_MAIN}: kvm_vm_ioctl"),
    "abi-field": (
        "a field does not fit the ioctl's structure",
        "include/uapi/linux/kvm.h: struct kvm_userspace_memory_region2",
    ),
    "v1-flags": (
        "KVM_SET_USER_MEMORY_REGION takes only LOG_DIRTY_PAGES and READONLY",
        f"{_MAIN}: kvm_vm_ioctl",
    ),
    "slot-id": (
        "the slot id is not below the VM's number of user slots",
        f"{_MAIN}: kvm_vm_ioctl_set_memory_region",
    ),
    "flags": ("the flags are not supported by this VM", f"{_MAIN}: check_memory_region_flags"),
    "size-unaligned": ("memory_size is not page aligned", f"{_MAIN}: kvm_set_memory_region"),
    "gpa-unaligned": ("guest_phys_addr is not page aligned", f"{_MAIN}: kvm_set_memory_region"),
    "hva-unaligned": ("userspace_addr is not page aligned", f"{_MAIN}: kvm_set_memory_region"),
    "hva-range": (
        "the host range is not in the user address space (access_ok)",
        f"{_MAIN}: kvm_set_memory_region",
    ),
    "gmem-offset": (
        "guest_memfd_offset is not page aligned or wraps",
        f"{_MAIN}: kvm_set_memory_region",
    ),
    "as-id": ("the address space does not exist", f"{_MAIN}: kvm_set_memory_region"),
    "gpa-wraps": ("the guest range wraps past 2^64", f"{_MAIN}: kvm_set_memory_region"),
    "npages": ("more than KVM_MEM_MAX_NR_PAGES pages", f"{_MAIN}: kvm_set_memory_region"),
    "delete-missing": ("delete of a slot that does not exist", f"{_MAIN}: kvm_set_memory_region"),
    "accounting": ("page accounting underflow", f"{_MAIN}: kvm_set_memory_region"),
    "nr-pages-overflow": ("the VM's page count overflows", f"{_MAIN}: kvm_set_memory_region"),
    "gmem-immutable": (
        "a guest_memfd slot can only be deleted",
        f"{_MAIN}: kvm_set_memory_region",
    ),
    "modify-changed": (
        "an existing slot may change only its gpa and LOG_DIRTY_PAGES",
        f"{_MAIN}: kvm_set_memory_region",
    ),
    "overlap": (
        "the new range overlaps a live slot of the address space",
        f"{_MAIN}: kvm_check_memslot_overlap",
    ),
    "max-gfn": (
        "the range ends past the highest gfn the MMU maps",
        "arch/x86/kvm/x86.c: kvm_arch_prepare_memory_region",
    ),
    "gmem-fd": ("the guest_memfd is not an open file", "virt/kvm/guest_memfd.c: kvm_gmem_bind"),
    "gmem-file": (
        "the file is not a guest_memfd of this VM",
        "virt/kvm/guest_memfd.c: kvm_gmem_bind",
    ),
    "gmem-range": (
        "the range is outside the guest_memfd",
        "virt/kvm/guest_memfd.c: kvm_gmem_bind",
    ),
    "gmem-bound": (
        "part of the guest_memfd range is bound to another slot",
        "virt/kvm/guest_memfd.c: kvm_gmem_bind",
    ),
    "gmem-create-flags": (
        "guest_memfd creation flags not supported",
        "virt/kvm/guest_memfd.c: kvm_gmem_create",
    ),
    "gmem-create-size": (
        "guest_memfd size is zero or not page aligned",
        "virt/kvm/guest_memfd.c: kvm_gmem_create",
    ),
    "log-slot": (
        "the dirty log names an address space or id that is no user slot",
        f"{_MAIN}: kvm_get_dirty_log_protect, kvm_clear_dirty_log_protect",
    ),
    "log-missing": (
        "the dirty log names a slot that does not exist",
        f"{_MAIN}: kvm_get_dirty_log_protect, kvm_clear_dirty_log_protect",
    ),
    "log-not-logging": (
        "the dirty log names a slot without LOG_DIRTY_PAGES",
        f"{_MAIN}: kvm_get_dirty_log_protect, kvm_clear_dirty_log_protect",
    ),
    "log-ring-on": (
        "the dirty ring is on: there are no dirty bitmaps",
        f"{_MAIN}: kvm_get_dirty_log_protect",
    ),
    "clear-range": (
        "the pages to clear are misaligned or outside the slot",
        f"{_MAIN}: kvm_clear_dirty_log_protect",
    ),
    "clear-bitmap": ("the bitmap is too short", f"{_MAIN}: kvm_clear_dirty_log_protect"),
    "manual-protect-flags": (
        "manual dirty log protect flags not supported",
        f"{_MAIN}: kvm_vm_ioctl_enable_cap_generic",
    ),
    "ring-cap": (
        "the dirty ring capability is not offered by this kernel",
        f"{_MAIN}: kvm_vm_ioctl_enable_cap_generic",
    ),
    "ring-size": (
        "the ring size is not a power of two in the allowed range",
        f"{_MAIN}: kvm_vm_ioctl_enable_dirty_log_ring",
    ),
    "ring-enabled": (
        "the dirty ring is already on",
        f"{_MAIN}: kvm_vm_ioctl_enable_dirty_log_ring",
    ),
    "ring-after-vcpu": (
        "the dirty ring must be enabled before the first vCPU",
        f"{_MAIN}: kvm_vm_ioctl_enable_dirty_log_ring",
    ),
    "ring-off": ("the VM has no dirty ring", f"{_MAIN}: kvm_vm_ioctl_reset_dirty_pages"),
    "vcpu-id": ("the vCPU id is not below KVM_MAX_VCPU_IDS", f"{_MAIN}: kvm_vm_ioctl_create_vcpu"),
    "vcpu-count": ("the VM has KVM_MAX_VCPUS vCPUs already", f"{_MAIN}: kvm_vm_ioctl_create_vcpu"),
    "vcpu-exists": ("a vCPU with this id exists", f"{_MAIN}: kvm_vm_ioctl_create_vcpu"),
}


@dataclasses.dataclass(frozen=True, slots=True)
class Explanation:
    """Why one call failed: ``check`` (a key of :data:`CHECKS`, or ``"unexplained"`` when
    the engine does not refuse the call, ``"unknown"`` when it refuses it without naming
    a check), ``function`` (the kernel function), ``text`` (the reason in words, e.g.
    ``"EEXIST: gpa ... overlaps slot 7, gpa ..., created at line 41"``), ``slot`` (ABI
    number ``as_id << 16 | id`` of the slot in the way or concerned, or None) and
    ``record`` (line of the record that put that slot where it is, or None)."""

    errno: int
    check: str
    function: str
    text: str
    slot: int | None = None
    record: int | None = None

    @property
    def summary(self) -> str:
        """The check in words (:data:`CHECKS`), or ``""``."""
        return CHECKS.get(self.check, ("", ""))[0]

    def line(self) -> str:
        """One line for a text report: the text, then the kernel function in brackets."""
        return f"{self.text} [{self.function}]" if self.function else self.text

    def to_json(self) -> dict[str, Any]:
        """``{"errno", "check", "function", "text", "summary", "slot", "record"}``."""
        return {
            "errno": errno_name(self.errno),
            "check": self.check,
            "function": self.function,
            "text": self.text,
            "summary": self.summary,
            "slot": self.slot,
            "record": self.record,
        }


class Placements:
    """Which record put each live slot of a VM where it is: the line of its create or
    of its last move (a change of flags keeps it). :meth:`note` is told every memslot
    call that succeeded and what it did (``create``, ``delete``, ``move``...). O(1)
    each."""

    def __init__(self) -> None:
        self._where: dict[int, tuple[int, str]] = {}

    def note(self, call: MemslotCall, change: str) -> None:
        """``call`` succeeded and made ``change`` (``Vm.last_change``'s value)."""
        if change == "delete":
            self._where.pop(call.slot, None)
        elif change == "create":
            self._where[call.slot] = (call.line, "created")
        elif change == "move":
            self._where[call.slot] = (call.line, "moved there")

    def of(self, slot: int) -> tuple[int, str] | None:
        """``(line, "created" | "moved there")`` of live slot ``slot`` (ABI number)."""
        return self._where.get(slot)


def explain(
    exc: OSError, record: Record | None = None, placements: Placements | None = None
) -> Explanation:
    """The explanation of the engine's refusal ``exc`` of ``record`` (for a
    :class:`MemslotError` with a refusal: its check, function and slot; the slot's
    placing record from ``placements``). O(1)."""
    err = exc.errno if isinstance(exc.errno, int) else 0
    name = errno_name(err)
    refusal = getattr(exc, "refusal", None) if isinstance(exc, MemslotError) else None
    detail = exc.detail if isinstance(exc, MemslotError) else str(exc)
    if refusal is None:
        return Explanation(err, "unknown", "", f"{name}: {detail}" if detail else name)
    slot: Memslot | None = refusal.slot
    abi = None if slot is None else slot.as_id << 16 | slot.id
    placed = None if abi is None or placements is None else placements.of(abi)
    text = f"{name}: {detail}"
    if placed is not None:
        text += f", {placed[1]} at line {placed[0]}"
    return Explanation(
        err, refusal.check, refusal.function, text, abi, None if placed is None else placed[0]
    )


def unexplained(recorded: int, engine: int | None) -> Explanation:
    """The explanation of a recorded failure the engine does not reproduce: it accepts
    the call (``engine`` 0) or refuses it with another errno. The kernel refused it for
    a reason outside the memslot checks (memory allocation, a signal) or the trace does
    not show what made it fail (an earlier VM state, another kernel)."""
    name = errno_name(recorded)
    if engine == 0:
        why = "the engine accepts this call: the kernel refused it for a reason outside the"
        why += " memslot checks (memory allocation, a signal, state the trace does not show)"
    else:
        why = f"the engine answers {errno_name(engine)} instead: the kernel's state or"
        why += " version differs from what the trace shows"
    return Explanation(recorded, "unexplained", "", f"{name}: {why}")
