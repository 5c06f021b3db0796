"""Conformance operations and their JSON Lines form (the reproducer format of
``memslots conform``).

Memslot calls are :class:`memslots.tools.traces.MemslotCall` objects, written with
:func:`memslots.tools.traces.call_to_json` (so a reproducer made only of memslot calls is
a trace ``memslots replay`` reads)::

    {"slot": 1, "flags": 1, "guest_phys_addr": 65536, "memory_size": 8192,
     "userspace_addr": 139637976727552, "result": 0}

Every other operation is an object with an ``"op"`` key, ``"result"`` being the kernel's
answer (0 or an errno name) where the operation has one:

- ``{"op": "get_dirty_log", "slot": 1, "result": "ENOENT"}``: :class:`GetDirtyLog`;
- ``{"op": "clear_dirty_log", "slot": 1, "first_page": 0, "num_pages": 64,
  "bitmap": "ff00ff00ff00ff00", "result": 0}`` (``bitmap`` in hex, the kernel's layout):
  :class:`ClearDirtyLog`;
- ``{"op": "enable_manual_dirty_log_protect", "flags": 3, "result": 0}``:
  :class:`EnableManualDirtyLogProtect`;
- ``{"op": "create_guest_memfd", "fd": 1000, "size": 1048576, "flags": 0, "result": 0}``:
  :class:`CreateGuestMemfd`, a guest_memfd of the VM that later operations call ``fd``;
- ``{"op": "open_devnull", "fd": 1001}``: :class:`OpenDevNull`, an open fd that is not a
  guest_memfd, called ``fd``;
- ``{"op": "close_fd", "fd": 1000}``: :class:`CloseFd`;
- ``{"op": "create_vm", "type": 36, "result": 0}``: :class:`CreateVm`, first in a
  sequence: the VM is made with that type (arm64: a 36-bit IPA).

The dirty ring (``KVM_CAP_DIRTY_LOG_RING``, see :mod:`memslots.dirty_ring`):

- ``{"op": "enable_dirty_ring", "size": 65536, "acq_rel": false, "result": 0}``:
  :class:`EnableDirtyRing`, ``KVM_ENABLE_CAP`` of ``KVM_CAP_DIRTY_LOG_RING`` (of
  ``..._ACQ_REL`` with ``"acq_rel": true``) with ``args[0]`` = ``size``, a u64 that the
  kernel truncates to u32 before its checks;
- ``{"op": "create_vcpu", "id": 0, "result": 0}``: :class:`CreateVcpu`,
  ``KVM_CREATE_VCPU``; later operations name the vCPU by its ``id``;
- ``{"op": "reset_dirty_rings", "result": 0}``: :class:`ResetDirtyRings`,
  ``KVM_RESET_DIRTY_RINGS``; besides the errno, the number of entries the kernel reset is
  compared with the engine's prediction (:meth:`memslots.kvm.KvmVm.reset_dirty_rings`);
- ``{"op": "harvest_dirty_ring", "vcpu": 0}``: :class:`HarvestDirtyRing`, the VMM's side
  of the protocol on that vCPU's rings: the kernel's mapped ring (which must hold only what
  the engine's model of it allows: no guest runs in a conformance run, so nothing) and the
  engine's ring of host-side writes;
- ``{"op": "vcpu_mark_page_dirty", "vcpu": 0, "gfn": 16}`` and
  ``{"op": "vcpu_write_guest", "vcpu": 0, "gpa": 65536, "length": 4096}`` (``length``
  bytes of 0xa5): :class:`VcpuMarkPageDirty`, :class:`VcpuWriteGuest`, writes made from
  Python through that vCPU. The kernel never sees them: they go to the engine's own ring
  of the vCPU (or its bitmaps without a ring), so they answer nothing the kernel answers;
  what they can break is the engine (an exception, a broken invariant) and the kernel's
  reset count, which must still be what the kernel's ring alone predicts;
- ``{"op": "map_memory", "hva": 139637976727552, "size": 1090519040}``:
  :class:`MapMemory`, host memory (:class:`memslots.HostMemory`) behind the hvas
  ``hva .. hva + size - 1``, so that :class:`VcpuWriteGuest` has memory to write.

The ``fd`` numbers are aliases: wherever a memslot call's ``guest_memfd`` equals an alias
that is open, the real descriptor is passed instead; any other number is passed as it is
(:data:`CLOSED_FD` is never open). So are the hvas of a :class:`MapMemory`: a memslot
call's ``userspace_addr`` inside its range is moved by the same offset onto the mapping
(the kernel does not look at what an hva maps when it creates a slot, so no errno changes;
a reproducer's hvas mean the same in every process). Operations naming a vCPU that does
not exist do nothing. Lines starting with ``#`` are comments: the report puts the
disagreement above each reproducer. :func:`read_ops` reads the format back and
``memslots conform --replay FILE`` runs it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Final

from memslots.constants import U32_MAX, U64_MAX
from memslots.errors import errno_name
from memslots.tools.traces import (
    MemslotCall,
    TraceFormatError,
    call_to_json,
    parse_errno,
    parse_trace,
)

__all__ = [
    "CLOSED_FD",
    "GMEM_FD",
    "GMEM_SIZE",
    "MEM_HVA",
    "MEM_SIZE",
    "OTHER_FD",
    "RING_OPS",
    "WRITE_BYTE",
    "ClearDirtyLog",
    "CloseFd",
    "CreateGuestMemfd",
    "CreateVcpu",
    "EnableDirtyRing",
    "EnableManualDirtyLogProtect",
    "GetDirtyLog",
    "HarvestDirtyRing",
    "MapMemory",
    "Op",
    "OpenDevNull",
    "ResetDirtyRings",
    "VcpuMarkPageDirty",
    "VcpuWriteGuest",
    "is_compared",
    "op_kind",
    "op_to_json",
    "read_ops",
    "with_result",
]

#: fd alias of the guest_memfd every generated VM starts with
GMEM_FD: Final = 1000
#: fd alias of an open file that is not a guest_memfd (``/dev/null``)
OTHER_FD: Final = 1001
#: a descriptor number that is never open: binding it is EBADF
CLOSED_FD: Final = 0x7FFFFFFF
#: size of the generated guest_memfd (256 pages)
GMEM_SIZE: Final = 1 << 20
#: the alias of the guest_memfds the generator makes with creation flags, good and bad
GMEM_FLAGS_FD: Final = 1002
#: where the host memory of a generated :class:`MapMemory` starts (the generator's hvas)
MEM_HVA: Final = 0x7F00_0000_0000
#: its size: the generator's 1 GiB of hvas and 16 MiB beyond, for slots that start near
#: the end (mapped without reserving swap: only pages written cost memory)
MEM_SIZE: Final = (1 << 30) + (1 << 24)
#: the byte :class:`VcpuWriteGuest` writes
WRITE_BYTE: Final = 0xA5


@dataclass(frozen=True, slots=True)
class GetDirtyLog:
    """``KVM_GET_DIRTY_LOG`` of ``slot`` (bitmaps compared as :class:`KvmVm` does)."""

    slot: int
    result: int | None = None
    name: ClassVar[str] = "get_dirty_log"


@dataclass(frozen=True, slots=True)
class ClearDirtyLog:
    """``KVM_CLEAR_DIRTY_LOG``: clear the pages set in ``bitmap`` among ``num_pages``
    pages from ``first_page``."""

    slot: int
    first_page: int
    num_pages: int
    bitmap: bytes
    result: int | None = None
    name: ClassVar[str] = "clear_dirty_log"


@dataclass(frozen=True, slots=True)
class EnableManualDirtyLogProtect:
    """``KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, flags)``."""

    flags: int
    result: int | None = None
    name: ClassVar[str] = "enable_manual_dirty_log_protect"


@dataclass(frozen=True, slots=True)
class CreateGuestMemfd:
    """``KVM_CREATE_GUEST_MEMFD`` of ``size`` bytes; later operations name it ``fd``."""

    fd: int
    size: int
    flags: int = 0
    result: int | None = None
    name: ClassVar[str] = "create_guest_memfd"


@dataclass(frozen=True, slots=True)
class OpenDevNull:
    """Open ``/dev/null`` (a file that is not a guest_memfd); later operations name it
    ``fd``."""

    fd: int
    name: ClassVar[str] = "open_devnull"


@dataclass(frozen=True, slots=True)
class CreateVm:
    """``KVM_CREATE_VM`` of ``type`` (arm64: the IPA size in bits, 0 for 40; x86: a VM
    type of ``KVM_CAP_VM_TYPES``). Only as the first operation of a sequence: the
    session's VM is made with that type (a sequence without one uses type 0)."""

    type: int
    result: int | None = None
    name: ClassVar[str] = "create_vm"


@dataclass(frozen=True, slots=True)
class CloseFd:
    """Close the file aliased ``fd`` (a guest_memfd's bindings end with it)."""

    fd: int
    name: ClassVar[str] = "close_fd"


@dataclass(frozen=True, slots=True)
class EnableDirtyRing:
    """``KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING, size)``, or ``..._ACQ_REL`` with
    ``acq_rel``: ``size`` is ``args[0]`` (bytes per vCPU, a u64 truncated to u32)."""

    size: int
    acq_rel: bool = False
    result: int | None = None
    name: ClassVar[str] = "enable_dirty_ring"


@dataclass(frozen=True, slots=True)
class CreateVcpu:
    """``KVM_CREATE_VCPU(id)``; later operations name the vCPU ``id``."""

    id: int
    result: int | None = None
    name: ClassVar[str] = "create_vcpu"


@dataclass(frozen=True, slots=True)
class ResetDirtyRings:
    """``KVM_RESET_DIRTY_RINGS`` (its count is compared with the engine's prediction)."""

    result: int | None = None
    name: ClassVar[str] = "reset_dirty_rings"


@dataclass(frozen=True, slots=True)
class HarvestDirtyRing:
    """Harvest vCPU ``vcpu``'s rings: the kernel's (checked against the engine's model)
    and the engine's ring of host-side writes."""

    vcpu: int
    name: ClassVar[str] = "harvest_dirty_ring"


@dataclass(frozen=True, slots=True)
class VcpuMarkPageDirty:
    """``vcpu.mark_page_dirty(gfn)`` from Python: into the engine's ring of that vCPU."""

    vcpu: int
    gfn: int
    name: ClassVar[str] = "vcpu_mark_page_dirty"


@dataclass(frozen=True, slots=True)
class VcpuWriteGuest:
    """``vcpu.write_guest(gpa, data)`` from Python, ``data`` being ``length`` bytes of
    :data:`WRITE_BYTE`: the pages written go to the engine's ring of that vCPU."""

    vcpu: int
    gpa: int
    length: int
    name: ClassVar[str] = "vcpu_write_guest"


@dataclass(frozen=True, slots=True)
class MapMemory:
    """Host memory behind the hvas ``hva .. hva + size - 1`` (module docstring)."""

    hva: int
    size: int
    name: ClassVar[str] = "map_memory"


#: one operation of a conformance run
Op = (
    MemslotCall
    | CreateVm
    | GetDirtyLog
    | ClearDirtyLog
    | EnableManualDirtyLogProtect
    | CreateGuestMemfd
    | OpenDevNull
    | CloseFd
    | EnableDirtyRing
    | CreateVcpu
    | ResetDirtyRings
    | HarvestDirtyRing
    | VcpuMarkPageDirty
    | VcpuWriteGuest
    | MapMemory
)

_COMPARED: Final = (
    MemslotCall,
    CreateVm,
    CreateGuestMemfd,
    GetDirtyLog,
    ClearDirtyLog,
    EnableManualDirtyLogProtect,
    EnableDirtyRing,
    CreateVcpu,
    ResetDirtyRings,
)
_NO_RESULT: Final = (
    OpenDevNull,
    CloseFd,
    HarvestDirtyRing,
    VcpuMarkPageDirty,
    VcpuWriteGuest,
    MapMemory,
)
#: the operations of the dirty ring and its vCPUs (what ``memslots conform`` counts as
#: ring operations)
RING_OPS: Final = (
    EnableDirtyRing,
    CreateVcpu,
    ResetDirtyRings,
    HarvestDirtyRing,
    VcpuMarkPageDirty,
    VcpuWriteGuest,
)


def is_compared(op: Op) -> bool:
    """True for the operations both the kernel and the engine answer (memslot calls,
    guest_memfd creation, dirty-log calls, manual-protect and dirty-ring enables, vCPU
    creation, ring resets);
    the others set up files and memory, or act on the engine alone (host-side writes,
    harvests). O(1)."""
    return isinstance(op, _COMPARED)


def op_kind(op: Op) -> str:
    """``"set_user_memory_region"``, ``"set_user_memory_region2"`` (the call's own
    :attr:`~memslots.tools.traces.MemslotCall.kind`), or the operation's ``"op"`` name.
    O(1)."""
    return op.kind if isinstance(op, MemslotCall) else op.name


def _result_json(result: int) -> int | str:
    return 0 if result == 0 else errno_name(result)


def op_to_json(op: Op) -> str:
    """One JSON Lines line (no newline) for ``op`` in the format of the module docstring;
    :func:`read_ops` reads it back equal. O(size of the op)."""
    if isinstance(op, MemslotCall):
        return call_to_json(op)
    obj: dict[str, Any] = {"op": op.name}
    if isinstance(op, GetDirtyLog):
        obj["slot"] = op.slot
    elif isinstance(op, ClearDirtyLog):
        obj.update(
            slot=op.slot, first_page=op.first_page, num_pages=op.num_pages, bitmap=op.bitmap.hex()
        )
    elif isinstance(op, EnableManualDirtyLogProtect):
        obj["flags"] = op.flags
    elif isinstance(op, CreateGuestMemfd):
        obj.update(fd=op.fd, size=op.size, flags=op.flags)
    elif isinstance(op, EnableDirtyRing):
        obj.update(size=op.size, acq_rel=op.acq_rel)
    elif isinstance(op, CreateVcpu):
        obj["id"] = op.id
    elif isinstance(op, HarvestDirtyRing):
        obj["vcpu"] = op.vcpu
    elif isinstance(op, VcpuMarkPageDirty):
        obj.update(vcpu=op.vcpu, gfn=op.gfn)
    elif isinstance(op, VcpuWriteGuest):
        obj.update(vcpu=op.vcpu, gpa=op.gpa, length=op.length)
    elif isinstance(op, MapMemory):
        obj.update(hva=op.hva, size=op.size)
    elif isinstance(op, OpenDevNull | CloseFd):
        obj["fd"] = op.fd
    elif isinstance(op, CreateVm):
        obj["type"] = op.type
    result = getattr(op, "result", None)
    if result is not None:
        obj["result"] = _result_json(result)
    return json.dumps(obj)


def _int(obj: dict[str, Any], key: str, limit: int) -> int:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        raise ValueError(f"{key} must be an integer in 0..{limit:#x}, not {json.dumps(value)}")
    return value


def _result(obj: dict[str, Any]) -> int | None:
    value = obj.get("result")
    if value is None:
        return None
    if isinstance(value, str):
        return parse_errno(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ValueError(f"result must be 0 or an errno, not {json.dumps(value)}")


_OP_KEYS: Final[dict[str, frozenset[str]]] = {
    "create_vm": frozenset({"type"}),
    "get_dirty_log": frozenset({"slot"}),
    "clear_dirty_log": frozenset({"slot", "first_page", "num_pages", "bitmap"}),
    "enable_manual_dirty_log_protect": frozenset({"flags"}),
    "create_guest_memfd": frozenset({"fd", "size", "flags"}),
    "open_devnull": frozenset({"fd"}),
    "close_fd": frozenset({"fd"}),
    "enable_dirty_ring": frozenset({"size", "acq_rel"}),
    "create_vcpu": frozenset({"id"}),
    "reset_dirty_rings": frozenset(),
    "harvest_dirty_ring": frozenset({"vcpu"}),
    "vcpu_mark_page_dirty": frozenset({"vcpu", "gfn"}),
    "vcpu_write_guest": frozenset({"vcpu", "gpa", "length"}),
    "map_memory": frozenset({"hva", "size"}),
}
#: the longest write a reproducer may ask for (64 MiB), the largest memory it may map
#: (1 TiB of address space, reserved without swap)
_MAX_WRITE: Final = 1 << 26
_MAX_MAP: Final = 1 << 40


def _op_from_obj(obj: dict[str, Any]) -> Op:
    name = obj["op"]
    if name not in _OP_KEYS:
        raise ValueError(f"unknown op {json.dumps(name)}")
    unknown = sorted(set(obj) - _OP_KEYS[name] - {"op", "result"})
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} for op {name}")
    if name == "create_vm":
        return CreateVm(_int(obj, "type", U32_MAX), _result(obj))
    if name == "get_dirty_log":
        return GetDirtyLog(_int(obj, "slot", U32_MAX), _result(obj))
    if name == "clear_dirty_log":
        bitmap = obj.get("bitmap")
        if not isinstance(bitmap, str):
            raise ValueError("bitmap must be a hex string")
        return ClearDirtyLog(
            _int(obj, "slot", U32_MAX),
            _int(obj, "first_page", U64_MAX),
            _int(obj, "num_pages", U32_MAX),
            bytes.fromhex(bitmap),
            _result(obj),
        )
    if name == "enable_manual_dirty_log_protect":
        return EnableManualDirtyLogProtect(_int(obj, "flags", U64_MAX), _result(obj))
    if name == "create_guest_memfd":
        return CreateGuestMemfd(
            _int(obj, "fd", U32_MAX),
            _int(obj, "size", U64_MAX),
            _int(obj, "flags", U64_MAX) if "flags" in obj else 0,
            _result(obj),
        )
    if name == "open_devnull":
        return OpenDevNull(_int(obj, "fd", U32_MAX))
    if name == "close_fd":
        return CloseFd(_int(obj, "fd", U32_MAX))
    return _ring_op_from_obj(name, obj)


def _ring_op_from_obj(name: str, obj: dict[str, Any]) -> Op:
    if name == "enable_dirty_ring":
        acq_rel = obj.get("acq_rel", False)
        if not isinstance(acq_rel, bool):
            raise ValueError(f"acq_rel must be true or false, not {json.dumps(acq_rel)}")
        return EnableDirtyRing(_int(obj, "size", U64_MAX), acq_rel, _result(obj))
    if name == "create_vcpu":
        return CreateVcpu(_int(obj, "id", U32_MAX), _result(obj))
    if name == "reset_dirty_rings":
        return ResetDirtyRings(_result(obj))
    if name == "harvest_dirty_ring":
        return HarvestDirtyRing(_int(obj, "vcpu", U32_MAX))
    if name == "vcpu_mark_page_dirty":
        return VcpuMarkPageDirty(_int(obj, "vcpu", U32_MAX), _int(obj, "gfn", U64_MAX))
    if name == "vcpu_write_guest":
        return VcpuWriteGuest(
            _int(obj, "vcpu", U32_MAX), _int(obj, "gpa", U64_MAX), _int(obj, "length", _MAX_WRITE)
        )
    size = _int(obj, "size", _MAX_MAP)
    if not size:
        raise ValueError("size must be positive")
    return MapMemory(_int(obj, "hva", U64_MAX), size)


def read_ops(lines: Iterable[str], source: str = "<ops>") -> Iterator[Op]:
    """Yield the operations of a reproducer (the module docstring's format), in order.
    Blank lines and ``#`` comments are skipped; a bad line raises :class:`ValueError`
    whose text is ``SOURCE:LINE: message``. O(1) per line."""
    for number, raw in enumerate(lines, 1):
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        try:
            obj = json.loads(text)
            if not isinstance(obj, dict):
                raise ValueError("expected a JSON object")
            if "op" in obj:
                yield _op_from_obj(obj)
            else:
                yield from parse_trace([text], source, fmt="jsonl")
        except TraceFormatError as exc:
            raise ValueError(f"{source}:{number}: {exc.message}") from None
        except (ValueError, KeyError) as exc:
            raise ValueError(f"{source}:{number}: {exc}") from None


def with_result(op: Op, result: int) -> Op:
    """``op`` with its ``result`` set (operations without one are returned as they are).
    O(1)."""
    if isinstance(op, _NO_RESULT):
        return op
    return dataclasses.replace(op, result=result)
