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
- ``{"op": "close_fd", "fd": 1000}``: :class:`CloseFd`.

The ``fd`` numbers are aliases: wherever a memslot call's ``guest_memfd`` equals an alias
that is open, the real descriptor is passed instead; any other number is passed as it is
(:data:`CLOSED_FD` is never open). Lines starting with ``#`` are comments: the report puts
the disagreement above each reproducer. :func:`read_ops` reads the format back and
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
    "OTHER_FD",
    "ClearDirtyLog",
    "CloseFd",
    "CreateGuestMemfd",
    "EnableManualDirtyLogProtect",
    "GetDirtyLog",
    "Op",
    "OpenDevNull",
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
class CloseFd:
    """Close the file aliased ``fd`` (a guest_memfd's bindings end with it)."""

    fd: int
    name: ClassVar[str] = "close_fd"


#: one operation of a conformance run
Op = (
    MemslotCall
    | GetDirtyLog
    | ClearDirtyLog
    | EnableManualDirtyLogProtect
    | CreateGuestMemfd
    | OpenDevNull
    | CloseFd
)

_COMPARED: Final = (MemslotCall, GetDirtyLog, ClearDirtyLog, EnableManualDirtyLogProtect)


def is_compared(op: Op) -> bool:
    """True for the operations both the kernel and the engine answer (memslot calls,
    dirty-log calls, manual-protect enables); the others only set up fds. O(1)."""
    return isinstance(op, _COMPARED)


def op_kind(op: Op) -> str:
    """``"set_user_memory_region"``, ``"set_user_memory_region2"``, or the operation's
    ``"op"`` name. O(1)."""
    if isinstance(op, MemslotCall):
        return "set_user_memory_region2" if op.v2 else "set_user_memory_region"
    return op.name


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
    else:
        obj["fd"] = op.fd
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
    "get_dirty_log": frozenset({"slot"}),
    "clear_dirty_log": frozenset({"slot", "first_page", "num_pages", "bitmap"}),
    "enable_manual_dirty_log_protect": frozenset({"flags"}),
    "create_guest_memfd": frozenset({"fd", "size", "flags"}),
    "open_devnull": frozenset({"fd"}),
    "close_fd": frozenset({"fd"}),
}


def _op_from_obj(obj: dict[str, Any]) -> Op:
    name = obj["op"]
    if name not in _OP_KEYS:
        raise ValueError(f"unknown op {json.dumps(name)}")
    unknown = sorted(set(obj) - _OP_KEYS[name] - {"op", "result"})
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} for op {name}")
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
    return CloseFd(_int(obj, "fd", U32_MAX))


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
    if isinstance(op, OpenDevNull | CloseFd):
        return op
    return dataclasses.replace(op, result=result)
