"""Memslot traces: what a VMM did to its VMs' memory maps, read and written.

A trace is a sequence of *records*, each one call the traced program made, with the result
the kernel gave it: the memslot ioctls (:class:`MemslotCall`), and in traces made by
``memslots record`` also ``KVM_CREATE_VM`` (:class:`CreateVm`), ``KVM_CREATE_VCPU``,
``KVM_CREATE_GUEST_MEMFD``, ``KVM_ENABLE_CAP`` of the dirty-log capabilities, the dirty-log
ioctls, ``KVM_RESET_DIRTY_RINGS`` and the ``munmap``/``mremap``/``madvise`` calls that
touched a live slot's memory. Every record names its VM (``vm``: 0, 1, ... in creation
order), so one trace holds every VM of the traced processes. :class:`Trace` is a whole
trace: the records, the header and the VMs.

Four formats are read (``docs/trace-format.md`` describes each in full):

``jsonl``
    the project's JSON Lines format. Version 2 starts with a header line
    ``{"format": "memslots-trace", "version": 2, "recorder": {...}}`` and holds one record
    a line, ``{"kind": "set_user_memory_region", "vm": 0, "slot": 0, ...}``; version 1
    (no header) holds one memslot call a line, ``{"slot": 0, "flags": 0,
    "guest_phys_addr": 0, "memory_size": 4096, "userspace_addr": 140478234329088,
    "result": 0}``, all of one VM. Blank lines and lines starting with ``#`` are allowed.
``qemu``
    QEMU's ``log`` trace backend (``-trace kvm_set_user_memory -D FILE``), every form QEMU
    has printed: ``Slot#0 flags=0x0 gpa=0x0 size=0x20000000 ua=0x7fc3b7e00000 ret=0``,
    QEMU 8's ``AddrSpace#0 Slot#0 ...`` and QEMU 9's ``... guest_memfd=-1
    guest_memfd_offset=0x0 ret=0``; optionally prefixed by ``PID@SECONDS.MICROS:``
    (``-msg timestamp=on``: one VM per PID) or by anything ending in a blank or a colon.
``strace``
    ``strace -f [-tt] [-T] [-y] -e trace=ioctl`` output: ``KVM_CREATE_VM`` starts a new VM
    (per process, so a closed VM fd's number reused for a new VM is a new VM) and the
    ``KVM_SET_USER_MEMORY_REGION`` calls on its fd belong to it. strace prints
    ``KVM_SET_USER_MEMORY_REGION2``'s argument as an address only; such a line is an error
    that names ``memslots record``, which records it in full.

A line that clearly is a record of its format but does not parse raises
:class:`TraceFormatError`, whose text is one line ``FILE:LINE: message``; so do lines
longer than :data:`MAX_LINE` characters and numbers of more than a few dozen digits.
Every reader takes ``skip_bad=True`` to skip such lines instead (and an ``errors`` list to
collect them).

:class:`TraceWriter` writes version 2 as it goes (``memslots record`` uses it: every line
is written with one ``write`` and is complete on disk at once); :func:`write_jsonl` writes
version 1. :class:`Recorder` wraps a ``Vm`` (or ``KvmVm``, ``ArrayVm``) and records every
memslot call made on it.

All readers are generators over lines and cost O(1) per line (O(length of the line)), in
memory bounded by the longest line; :func:`load_trace` keeps at most :data:`MAX_RECORDS`
records.
"""

from __future__ import annotations

import dataclasses
import errno as _errno
import itertools
import json
import os
import re
import threading
from collections.abc import Iterable, Iterator, Sequence
from importlib.resources import files
from importlib.resources.abc import Traversable
from typing import IO, Any, ClassVar, Final, Generic, Literal, TypeAlias, TypeVar

from memslots.constants import (
    KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
    PAGE_SIZE,
    U32_MAX,
    U64_MAX,
)
from memslots.errors import errno_name
from memslots.profiles import KernelProfile
from memslots.validate import VmLimits
from memslots.view import MemslotTarget

__all__ = [
    "BINARY",
    "EMBEDDED_TRACE_NAME",
    "FORMATS",
    "MAX_LINE",
    "MAX_RECORDS",
    "NOT_A_TRACE",
    "TRACE_FORMAT_NAME",
    "TRACE_VERSION",
    "ClearDirtyLog",
    "CreateGuestMemfd",
    "CreateVcpu",
    "CreateVm",
    "EnableCap",
    "GetDirtyLog",
    "HvaChange",
    "Madvise",
    "MemslotCall",
    "MemslotTarget",
    "Mremap",
    "Munmap",
    "Record",
    "Recorder",
    "ReleaseVm",
    "ResetDirtyRings",
    "Trace",
    "TraceFormat",
    "TraceFormatError",
    "TraceVm",
    "TraceWriteError",
    "TraceWriter",
    "bounded_lines",
    "call_to_json",
    "detect_format",
    "embedded_trace_path",
    "is_binary",
    "load_trace",
    "parse_errno",
    "parse_trace",
    "read_embedded_trace",
    "read_jsonl",
    "read_qemu_log",
    "read_strace",
    "read_trace",
    "record_to_json",
    "write_jsonl",
]

TraceFormat = Literal["qemu", "strace", "jsonl"]
#: the formats :func:`read_trace` understands
FORMATS: Final[tuple[TraceFormat, ...]] = ("qemu", "strace", "jsonl")

#: file name of the trace shipped inside the package (``memslots/data/``)
EMBEDDED_TRACE_NAME: Final = "seabios.log"

#: ``format`` of a version 2 header line
TRACE_FORMAT_NAME: Final = "memslots-trace"
#: the JSON Lines version :class:`TraceWriter` writes
TRACE_VERSION: Final = 2

#: longest line any reader accepts, in characters (a 16 GiB slot's dirty bitmap, written
#: as runs, fits many times over); a longer line is an error, never a memory hog
MAX_LINE: Final = 16 << 20

#: most records (plus malformed lines skipped) a trace may hold: replay keeps them all in
#: memory (about 1 KiB each on three implementations), so memory stays bounded; ten times
#: the longest traces measured (docs/trace-format.md, "Speed")
MAX_RECORDS: Final = 1_000_000

#: most lines read to detect a format (blank and comment lines before the first record)
_MAX_DETECT_LINES: Final = 100_000

#: longest number (in digits) the readers parse: far more than a u64 needs, far fewer than
#: Python's own limit for converting text to int
_MAX_DIGITS: Final = 64

#: errnos are below this (the kernel's MAX_ERRNO is 4095)
_MAX_ERRNO: Final = 4095

#: kernel-internal errno names strace may print; not in Python's :mod:`errno`
_KERNEL_ERRNOS: Final[dict[str, int]] = {
    "ERESTARTSYS": 512,
    "ERESTARTNOINTR": 513,
    "ERESTARTNOHAND": 514,
    "ENOIOCTLCMD": 515,
    "ERESTART_RESTARTBLOCK": 516,
    "EPROBE_DEFER": 517,
    "EOPENSTALE": 518,
    "ENOPARAM": 519,
    "ENOTSUPP": 524,
}

#: flag names as strace prints them
_FLAG_NAMES: Final[dict[str, int]] = {
    "KVM_MEM_LOG_DIRTY_PAGES": KVM_MEM_LOG_DIRTY_PAGES,
    "KVM_MEM_READONLY": KVM_MEM_READONLY,
    "KVM_MEM_GUEST_MEMFD": KVM_MEM_GUEST_MEMFD,
}

#: ``madvise`` advice values that discard pages (``include/uapi/asm-generic/mman-common.h``)
MADV_DONTNEED: Final = 4
MADV_REMOVE: Final = 9
#: ``mremap`` flags
MREMAP_MAYMOVE: Final = 1
MREMAP_FIXED: Final = 2
MREMAP_DONTUNMAP: Final = 4

#: runs of dirty pages ``((first, count), ...)``, relative to the slot (or ``first_page``)
Runs: TypeAlias = tuple[tuple[int, int], ...]


# --------------------------------------------------------------------------- records


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class _Meta:
    """What every record carries besides its call: the VM (``vm``, its number in creation
    order; None for calls that are not made on a VM), the process (``pid``, the thread
    group id) and thread (``tid``) that made it, a monotonic timestamp (``time_ns``, 0 when
    unknown) and where the record was read from (``line``, 1-based, and ``source``). Only
    ``vm`` takes part in equality, so the same calls read from two files compare equal.
    Each record class names its ``kind`` in a version 2 trace (``"create_vm"``...): a
    class attribute, a property of :class:`MemslotCall` (REGION or REGION2)."""

    vm: int | None = 0
    pid: int = dataclasses.field(default=0, compare=False)
    tid: int = dataclasses.field(default=0, compare=False)
    time_ns: int = dataclasses.field(default=0, compare=False)
    line: int = dataclasses.field(default=0, compare=False)
    source: str = dataclasses.field(default="", compare=False)

    @property
    def where(self) -> str:
        """``FILE:LINE`` of the record, as far as it is known. O(1)."""
        if self.line:
            return f"{self.source or '<trace>'}:{self.line}"
        return self.source or "<trace>"


@dataclasses.dataclass(frozen=True, slots=True)
class MemslotCall(_Meta):
    """One ``KVM_SET_USER_MEMORY_REGION`` (or ``..._REGION2``) call.

    The first five fields are those of ``struct kvm_userspace_memory_region``; ``slot`` is
    the ABI value ``as_id << 16 | id``. ``result`` is what the kernel answered when the call
    was recorded: 0, a positive errno, or None when the trace does not say.
    ``guest_memfd_offset`` and ``guest_memfd`` are the extra fields of
    ``struct kvm_userspace_memory_region2`` and ``v2`` says which ioctl was used. The
    fields every record has (``vm``, ``line``...) are keyword-only.
    """

    slot: int
    flags: int
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    result: int | None = None
    guest_memfd_offset: int = 0
    guest_memfd: int = 0
    v2: bool = False

    @property
    def kind(self) -> str:
        """``"set_user_memory_region"`` or ``"set_user_memory_region2"``."""
        return "set_user_memory_region2" if self.v2 else "set_user_memory_region"

    @property
    def as_id(self) -> int:
        """The address space: ``slot >> 16``. O(1)."""
        return self.slot >> 16

    @property
    def id(self) -> int:
        """The slot id inside its address space: ``slot & 0xffff``. O(1)."""
        return self.slot & 0xFFFF

    def apply(self, target: MemslotTarget, *, guest_memfd: int | None = None) -> None:
        """Make this call on ``target`` (a ``Vm``, ``KvmVm``, ``ArrayVm``, a
        :class:`Recorder`...) with the ioctl it was recorded with; ``guest_memfd``, when
        given, replaces the recorded fd (the traced process's) by one of this process.
        Raises what the target raises (:class:`~memslots.errors.MemslotError` on
        failure). Cost: the target's.
        """
        if self.v2:
            target.set_user_memory_region2(
                self.slot,
                self.flags,
                self.guest_phys_addr,
                self.memory_size,
                self.userspace_addr,
                guest_memfd_offset=self.guest_memfd_offset,
                guest_memfd=self.guest_memfd if guest_memfd is None else guest_memfd,
            )
        else:
            target.set_user_memory_region(
                self.slot, self.flags, self.guest_phys_addr, self.memory_size, self.userspace_addr
            )

    def describe(self) -> str:
        """One human-readable line, e.g.
        ``slot 0 (as 0, id 0) flags=0x0 gpa=0x0 size=0x20000000 ua=0x7fc3b7e00000 -> OK``. O(1).
        """
        text = (
            f"slot {self.slot} (as {self.as_id}, id {self.id}) flags={self.flags:#x}"
            f" gpa={self.guest_phys_addr:#x} size={self.memory_size:#x}"
            f" ua={self.userspace_addr:#x}"
        )
        if self.v2:
            text += f" guest_memfd={self.guest_memfd} offset={self.guest_memfd_offset:#x} (v2)"
        if self.result is not None:
            text += f" -> {errno_name(self.result)}"
        return text


@dataclasses.dataclass(frozen=True, slots=True)
class CreateVm(_Meta):
    """``KVM_CREATE_VM(vm_type)`` on ``/dev/kvm``: the start of VM ``vm`` (None when the
    call failed). ``fd`` is the VM's descriptor in the traced process; ``attached`` marks
    a VM that existed before recording began (``memslots record --pid``: its earlier
    calls are unknown)."""

    vm_type: int = 0
    fd: int | None = None
    result: int | None = None
    attached: bool = False

    kind: ClassVar[str] = "create_vm"


@dataclasses.dataclass(frozen=True, slots=True)
class CreateVcpu(_Meta):
    """``KVM_CREATE_VCPU(vcpu_id)``; ``fd`` is the new vCPU's descriptor."""

    vcpu_id: int
    fd: int | None = None
    result: int | None = None

    kind: ClassVar[str] = "create_vcpu"


@dataclasses.dataclass(frozen=True, slots=True)
class CreateGuestMemfd(_Meta):
    """``KVM_CREATE_GUEST_MEMFD({size, flags})``; ``fd`` is the new guest_memfd's
    descriptor in the traced process, the number later ``KVM_SET_USER_MEMORY_REGION2``
    calls name in ``guest_memfd``."""

    size: int
    flags: int = 0
    fd: int | None = None
    result: int | None = None

    kind: ClassVar[str] = "create_guest_memfd"


@dataclasses.dataclass(frozen=True, slots=True)
class EnableCap(_Meta):
    """``KVM_ENABLE_CAP({cap, flags, args})`` on a VM, for the dirty-log capabilities
    (``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2``, ``KVM_CAP_DIRTY_LOG_RING`` and ``..._ACQ_REL``)."""

    cap: int
    flags: int = 0
    args: tuple[int, int, int, int] = (0, 0, 0, 0)
    result: int | None = None

    kind: ClassVar[str] = "enable_cap"


@dataclasses.dataclass(frozen=True, slots=True)
class GetDirtyLog(_Meta):
    """``KVM_GET_DIRTY_LOG(slot)``; ``dirty`` is the bitmap the kernel returned, as runs
    of dirty pages relative to the slot (None when unknown, e.g. for a failed call)."""

    slot: int
    dirty: Runs | None = None
    result: int | None = None

    kind: ClassVar[str] = "get_dirty_log"


@dataclasses.dataclass(frozen=True, slots=True)
class ClearDirtyLog(_Meta):
    """``KVM_CLEAR_DIRTY_LOG({slot, first_page, num_pages, bitmap})``; ``dirty`` is the
    bitmap the caller passed, as runs of pages relative to ``first_page``."""

    slot: int
    first_page: int
    num_pages: int
    dirty: Runs | None = None
    result: int | None = None

    kind: ClassVar[str] = "clear_dirty_log"


@dataclasses.dataclass(frozen=True, slots=True)
class ResetDirtyRings(_Meta):
    """``KVM_RESET_DIRTY_RINGS``; ``value`` is what it returned (entries reset)."""

    value: int | None = None
    result: int | None = None

    kind: ClassVar[str] = "reset_dirty_rings"


@dataclasses.dataclass(frozen=True, slots=True)
class ReleaseVm(_Meta):
    """VM ``vm`` is gone: the traced processes no longer hold a descriptor of it (noticed
    by ``memslots record`` no later than the next call that touches a slot's memory)."""

    result: int | None = None

    kind: ClassVar[str] = "release_vm"


def _pages_up(length: int) -> int:
    return (length + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)


@dataclasses.dataclass(frozen=True, slots=True)
class Munmap(_Meta):
    """``munmap(addr, length)`` of a range that overlapped a live slot's hvas (``vm`` is
    None: it is a call on the process, whose VMs' slots it may hit)."""

    addr: int
    length: int
    result: int | None = None

    kind: ClassVar[str] = "munmap"

    def removed(self) -> list[tuple[int, int]]:
        """The hva ranges ``[start, end)`` whose mappings the call took away (none when
        it failed). O(1)."""
        if self.result != 0 or not self.length:
            return []
        return [(self.addr, self.addr + _pages_up(self.length))]


@dataclasses.dataclass(frozen=True, slots=True)
class Mremap(_Meta):
    """``mremap(old_address, old_size, new_size, flags, new_address)``; ``value`` is the
    address it returned."""

    old_address: int
    old_size: int
    new_size: int
    flags: int = 0
    new_address: int = 0
    value: int | None = None
    result: int | None = None

    kind: ClassVar[str] = "mremap"

    def removed(self) -> list[tuple[int, int]]:
        """The old hva ranges the call unmapped or emptied: all of it when the mapping
        moved (also with ``MREMAP_DONTUNMAP``, which leaves it empty), the tail when it
        shrank in place. O(1)."""
        if self.result != 0 or not self.old_size:
            return []
        old_end = self.old_address + _pages_up(self.old_size)
        if self.value is not None and self.value != self.old_address:
            return [(self.old_address, old_end)]
        new_end = self.old_address + _pages_up(self.new_size)
        return [(new_end, old_end)] if new_end < old_end else []


@dataclasses.dataclass(frozen=True, slots=True)
class Madvise(_Meta):
    """``madvise(addr, length, advice)`` with ``MADV_DONTNEED`` or ``MADV_REMOVE``, which
    discard the pages of the range."""

    addr: int
    length: int
    advice: int
    result: int | None = None

    kind: ClassVar[str] = "madvise"

    def removed(self) -> list[tuple[int, int]]:
        """The hva range whose pages were discarded (none when the call failed). O(1)."""
        if self.result != 0 or not self.length:
            return []
        return [(self.addr, self.addr + _pages_up(self.length))]


#: any record of a trace
Record: TypeAlias = (
    MemslotCall
    | CreateVm
    | CreateVcpu
    | CreateGuestMemfd
    | EnableCap
    | GetDirtyLog
    | ClearDirtyLog
    | ResetDirtyRings
    | ReleaseVm
    | Munmap
    | Mremap
    | Madvise
)
#: the records that change what an hva range maps (MMU-notifier events)
HvaChange: TypeAlias = Munmap | Mremap | Madvise


@dataclasses.dataclass(frozen=True, slots=True)
class TraceVm:
    """One VM of a trace: its number (creation order), the process that created it (its
    memory map is the one the VM's slots point into), its type, whether it existed before
    recording began, and how many records and memslot calls it has."""

    number: int
    pid: int = 0
    vm_type: int | None = None
    attached: bool = False
    records: int = 0
    calls: int = 0


@dataclasses.dataclass
class Trace:
    """A whole trace: ``records`` in the order they happened, where they came from
    (``source``, ``fmt``), the version 2 ``header`` (None for other formats) and the
    ``end`` record (status and reason the recording stopped; None when absent)."""

    records: list[Record]
    source: str = ""
    fmt: TraceFormat | None = None
    header: dict[str, Any] | None = None
    end: dict[str, Any] | None = None

    @property
    def version(self) -> int | None:
        """2 for a version 2 file, 1 for version 1 JSON Lines, None for QEMU and strace."""
        if self.header is not None:
            return int(self.header["version"])
        return 1 if self.fmt == "jsonl" else None

    @property
    def calls(self) -> list[MemslotCall]:
        """The memslot calls of every VM, in order. O(n)."""
        return [r for r in self.records if isinstance(r, MemslotCall)]

    def vms(self) -> list[TraceVm]:
        """The VMs, in creation order: every ``create_vm`` that succeeded, and every VM
        number a record names without one (traces that do not record creation). O(n)."""
        info: dict[int, dict[str, Any]] = {}
        for r in self.records:
            if r.vm is None:
                continue
            entry = info.setdefault(r.vm, {"pid": r.pid, "records": 0, "calls": 0})
            if isinstance(r, CreateVm):
                entry.update(pid=r.pid, vm_type=r.vm_type, attached=r.attached)
            entry["records"] += 1
            entry["calls"] += isinstance(r, MemslotCall)
        return [TraceVm(n, **info[n]) for n in sorted(info)]

    def profile(self) -> KernelProfile | None:
        """The profile of the kernel the trace was recorded on (the header's ``host``
        ``profile``, which ``memslots record`` writes since 0.3), or None when the trace
        does not say (or says something that is not a profile). O(1)."""
        host = (self.header or {}).get("host") or {}
        data = host.get("profile")
        if not isinstance(data, dict):
            return None
        try:
            return KernelProfile.from_dict(data)
        except ValueError:
            return None

    def limits(self) -> VmLimits | None:
        """The limits of the kernel the trace was recorded on (the header's ``host``
        ``limits``), or None when the trace does not say. O(1)."""
        host = (self.header or {}).get("host") or {}
        limits = host.get("limits")
        if not isinstance(limits, dict):
            return None
        try:
            return VmLimits(**limits)
        except TypeError:
            return None


# --------------------------------------------------------------------------- errors


class TraceFormatError(ValueError):
    """A line of a trace that should be a record but cannot be read.

    ``.source`` is the file (or other label), ``.line`` the 1-based line number (0 when the
    error is about the whole input) and ``.message`` the reason; ``str()`` is the single line
    ``FILE:LINE: message``.
    """

    def __init__(self, source: str, line: int, message: str, skippable: bool = False) -> None:
        self.source = source
        self.line = line
        self.message = message
        #: a malformed line that ``skip_bad`` (``memslots replay --skip-bad``) would skip;
        #: False for what ends the whole input (binary data, a line too long, too many)
        self.skippable = skippable
        where = f"{source}:{line}" if line else source
        super().__init__(f"{where}: {message}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.source, self.line, self.message, self.skippable))


#: how every reader ends the message of an input that is no trace at all
NOT_A_TRACE: Final = "not a memslot trace"
#: what a reader says of a line that is binary data (a NUL, or bytes that are not UTF-8)
BINARY: Final = "binary data, not text"


def is_binary(line: str) -> bool:
    """Whether a line read as UTF-8 with ``errors="replace"`` is binary data: it holds
    a NUL or a byte that is not UTF-8 (U+FFFD). O(len(line))."""
    return "\x00" in line or "\ufffd" in line


class _LineError(Exception):
    """Internal: a field of the current line is bad (line and source are added later)."""


def _to_int(text: str, base: int = 10) -> int:
    """``int(text, base)`` for at most :data:`_MAX_DIGITS` digits; ValueError otherwise
    (Python's own limit would raise only at 4300 digits, after quadratic work)."""
    if len(text) > _MAX_DIGITS + 3:
        raise ValueError("too many digits")
    return int(text, base)


def parse_errno(text: str) -> int:
    """The errno number of a name such as ``"EEXIST"`` (also ``"OK"`` -> 0, kernel-internal
    names such as ``"ERESTARTSYS"``, and strace's ``"ERRNO_530"``). Raises ValueError for
    anything else. O(1).
    """
    if text == "OK":
        return 0
    value = getattr(_errno, text, None) if text.startswith("E") else None
    if isinstance(value, int):
        return value
    if text in _KERNEL_ERRNOS:
        return _KERNEL_ERRNOS[text]
    match = re.fullmatch(r"ERRNO_(\d{1,4})", text)
    if match and 0 < int(match.group(1)) <= _MAX_ERRNO:
        return int(match.group(1))
    raise ValueError(f"unknown errno name {text[:40]!r}")


def _check_range(name: str, value: int, limit: int) -> int:
    if not 0 <= value <= limit:
        width = "u32" if limit == U32_MAX else "u64" if limit == U64_MAX else f"0..{limit}"
        if abs(value) < 1 << 80:
            raise _LineError(f"{name}={value} is out of range ({width})")
        digits = len(str(abs(value)))
        raise _LineError(f"{name} is out of range ({width}): a number of {digits} digits")
    return value


def _int(name: str, text: str, limit: int) -> int:
    """A number as QEMU or strace print it: ``0x``-hex or decimal."""
    try:
        value = _to_int(text, 16) if text[:2] in ("0x", "0X") else _to_int(text, 10)
    except ValueError:
        raise _LineError(f"{name}: {text[:40]!r} is not a number") from None
    return _check_range(name, value, limit)


class _Reader:
    """Shared error handling of the readers."""

    def __init__(self, source: str, skip_bad: bool, errors: list[TraceFormatError] | None) -> None:
        self.source = source
        self.skip_bad = skip_bad
        self.errors = errors

    def bad(self, line: int, message: str) -> None:
        """Raise, or (with ``skip_bad``) note, a malformed line (at most
        :data:`MAX_RECORDS` are noted: more is an error)."""
        error = TraceFormatError(self.source, line, message, skippable=True)
        if not self.skip_bad:
            raise error
        if self.errors is not None:
            if len(self.errors) >= MAX_RECORDS:
                raise TraceFormatError(
                    self.source, line, f"more than {MAX_RECORDS} malformed lines: {NOT_A_TRACE}"
                )
            self.errors.append(error)

    def lines(self, lines: Iterable[str]) -> Iterator[tuple[int, str]]:
        """``(number, line)`` pairs; a line over :data:`MAX_LINE` characters is an error
        that ends the input (what follows cannot be trusted to be lines); a line of binary
        data (:func:`is_binary`) is a malformed line (:meth:`bad`)."""
        for number, raw in enumerate(lines, 1):
            if len(raw) > MAX_LINE:
                raise TraceFormatError(
                    self.source,
                    number,
                    f"line longer than {MAX_LINE >> 20} MiB: {NOT_A_TRACE}",
                )
            if is_binary(raw):
                self.bad(number, f"{BINARY}: {NOT_A_TRACE}")
                continue
            yield number, raw


# --------------------------------------------------------------------------- QEMU

_QEMU_EVENT = re.compile(r"(?:^|(?<=[\s:]))kvm_set_user_memory(?:\s+(?P<body>.*)|\s*)$")
_QEMU_PID = re.compile(r"^\s*(?P<pid>\d+)@\d+\.\d+:")
_QEMU_BODY = re.compile(
    r"(?:AddrSpace#(?P<as_id>\S+)\s+)?"
    r"Slot#(?P<slot>\S+)\s+"
    r"flags=(?P<flags>\S+)\s+"
    r"gpa=(?P<gpa>\S+)\s+"
    r"size=(?P<size>\S+)\s+"
    r"ua=(?P<ua>\S+)"
    r"(?:\s+guest_memfd=(?P<gmem_fd>\S+)\s+guest_memfd_offset=(?P<gmem_off>\S+))?"
    r"\s+ret=(?P<ret>\S+)\s*"
)


def _parse_qemu_body(body: str, line: int, source: str, vm: int, pid: int) -> MemslotCall:
    match = _QEMU_BODY.fullmatch(body)
    if match is None:
        raise _LineError(
            "kvm_set_user_memory line does not read "
            "'Slot#N flags=0x.. gpa=0x.. size=0x.. ua=0x.. ret=N'"
        )
    if match["as_id"] is not None:
        # QEMU 8+: the address space and the id are printed apart
        as_id = _int("AddrSpace", match["as_id"], 0xFFFF)
        slot = as_id << 16 | _int("Slot", match["slot"], 0xFFFF)
    else:
        slot = _int("Slot", match["slot"], U32_MAX)
    for name in ("flags", "gpa", "size", "ua"):
        if not match[name].startswith("0x"):
            raise _LineError(f"{name}={match[name][:40]} is not 0x-hex")
    flags = _int("flags", match["flags"], U32_MAX)
    try:
        ret = _to_int(match["ret"], 10)
    except ValueError:
        raise _LineError(f"ret={match['ret'][:40]} is not a number") from None
    if not -_MAX_ERRNO <= ret <= 0:
        raise _LineError(f"ret={ret} is neither 0 nor a negative errno")
    gmem_fd = gmem_off = 0
    v2 = False
    if match["gmem_fd"] is not None:
        try:
            fd = _to_int(match["gmem_fd"], 10)
        except ValueError:
            raise _LineError(f"guest_memfd={match['gmem_fd'][:40]} is not a number") from None
        # QEMU prints -1 for "no guest_memfd"; the kernel ignores the field then
        gmem_fd = 0 if fd == -1 else _check_range("guest_memfd", fd, U32_MAX)
        gmem_off = _int("guest_memfd_offset", match["gmem_off"], U64_MAX)
        # QEMU 9 uses REGION2 whenever the host supports guest_memfd; only a slot with
        # KVM_MEM_GUEST_MEMFD certainly needs it (REGION rejects the flag)
        v2 = bool(flags & KVM_MEM_GUEST_MEMFD)
    return MemslotCall(
        slot,
        flags,
        _int("gpa", match["gpa"], U64_MAX),
        _int("size", match["size"], U64_MAX),
        _int("ua", match["ua"], U64_MAX),
        -ret,
        gmem_off,
        gmem_fd,
        v2,
        vm=vm,
        pid=pid,
        line=line,
        source=source,
    )


def read_qemu_log(
    lines: Iterable[str],
    source: str = "<qemu log>",
    *,
    skip_bad: bool = False,
    errors: list[TraceFormatError] | None = None,
) -> Iterator[MemslotCall]:
    """Yield the calls of QEMU ``kvm_set_user_memory`` trace lines, in order.

    ``lines`` is any iterable of text lines (an open file works); ``source`` names it in
    errors. Other trace events, other text and blank lines are ignored; ``ret=-22`` gives
    ``result=22``. A QEMU process makes one VM: lines prefixed ``PID@SECONDS:``
    (``-msg timestamp=on``) get one VM per PID, in the order the PIDs first appear;
    a line without the prefix belongs to the VM of the line before (VM 0 at first). A
    ``kvm_set_user_memory`` line that does not parse, or has a number
    out of its field's range, raises :class:`TraceFormatError` (or, with ``skip_bad``, is
    skipped and appended to ``errors`` when given). O(1) per line.
    """
    reader = _Reader(source, skip_bad, errors)
    vms: dict[int, int] = {}
    current = 0
    for number, raw in reader.lines(lines):
        if "kvm_set_user_memory" not in raw:
            continue
        text = raw.rstrip("\r\n")
        event = _QEMU_EVENT.search(text)
        if event is None:
            continue  # e.g. kvm_set_user_memory_region in some other message
        prefix = _QEMU_PID.match(text)
        if prefix and len(prefix["pid"]) < 12:
            pid = int(prefix["pid"])
            vm = current = vms.setdefault(pid, len(vms))
        else:
            pid, vm = 0, current
        try:
            yield _parse_qemu_body(event["body"] or "", number, source, vm, pid)
        except _LineError as exc:
            reader.bad(number, str(exc))


# --------------------------------------------------------------------------- strace

_V1_REQUESTS: Final = ("KVM_SET_USER_MEMORY_REGION", "0x4020ae46")
_V2_REQUESTS: Final = (
    "KVM_SET_USER_MEMORY_REGION2",
    "0x40a0ae49",
    "_IOC(_IOC_WRITE, 0xae, 0x49, 0xa0)",
)
_CREATE_VM_REQUESTS: Final = ("KVM_CREATE_VM", "0xae01")
#: the request part of a memslot ioctl line, in every form strace prints it
_REQUEST: Final = (
    r"(?:0x[0-9a-fA-F]+\s*/\*\s*)?"
    r"(?P<request>KVM_SET_USER_MEMORY_REGION2?\b|KVM_CREATE_VM\b|0x4020ae46\b|0x40a0ae49\b"
    r"|0xae01\b|_IOC\(_IOC_WRITE,\s*0xae,\s*0x49,\s*0xa0\))"
    r"(?:\s*\*/)?"
)
_STRACE_CALL = re.compile(
    r"(?:^|(?<=[\s\]]))ioctl\((?P<fd>[^,()]*),\s*" + _REQUEST + r"\s*,\s*(?P<rest>.*)$"
)
_STRACE_RESUMED = re.compile(r"<\.\.\.\s+ioctl\s+resumed>\s*(?P<rest>.*)$")
_STRACE_PID = re.compile(r"^\s*(?:\[pid\s+(?P<bracketed>\d{1,10})\]|(?P<bare>\d{1,10})\s)")
_STRACE_RETURN = re.compile(
    r"\)\s*=\s*(?P<ret>-?\d{1,30}|\?)"
    r"(?:\s+(?P<name>E[A-Z0-9_?]*))?"
    r"(?:\s+\([^)]*\))?"
    r"(?:\s+<[\d.]+>)?\s*$"
)
_UNFINISHED = "<unfinished ...>"
_V1_FIELDS: Final = ("slot", "flags", "guest_phys_addr", "memory_size", "userspace_addr")
_V2_FIELDS: Final = (*_V1_FIELDS, "guest_memfd_offset", "guest_memfd")


def _split_top_level(text: str) -> list[str]:
    """Split ``a=1, b=[2, 3], c={...}`` at the commas outside brackets."""
    parts: list[str] = []
    depth = 0
    start = 0
    for index, char in enumerate(text):
        if char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:index].strip())
            start = index + 1
    parts.append(text[start:].strip())
    return parts


def _strace_flags(text: str) -> int:
    """``0``, ``KVM_MEM_LOG_DIRTY_PAGES|KVM_MEM_READONLY``, ``KVM_MEM_READONLY|0x10``,
    ``0x4 /* KVM_MEM_??? */`` or ``0x2 /* KVM_MEM_READONLY */``."""
    text = re.sub(r"/\*.*?\*/", "", text).strip()
    value = 0
    for token in text.split("|"):
        token = token.strip()
        if token in _FLAG_NAMES:
            value |= _FLAG_NAMES[token]
        elif token and token[0].isdigit():
            value |= _int("flags", token, U32_MAX)
        else:
            raise _LineError(f"flags: unknown flag {token[:40]!r}")
    return _check_range("flags", value, U32_MAX)


def _strace_struct(request: str, rest: str) -> tuple[dict[str, int], str]:
    """Parse ``{slot=..., ...}`` at the start of ``rest``; return the fields and the text
    after the closing brace."""
    v2 = request in _V2_REQUESTS
    name = _V2_REQUESTS[0] if v2 else _V1_REQUESTS[0]
    if not rest.startswith("{"):
        arg = rest.split(")")[0].strip()[:40]
        raise _LineError(
            f"{name} argument was not decoded by strace ({arg!r}), so the call cannot be"
            " replayed; record the program with `memslots record -- COMMAND`, which reads"
            " every field"
        )
    depth = 0
    end = -1
    for index, char in enumerate(rest):
        if char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
            if depth == 0:
                end = index
                break
    if end < 0:
        raise _LineError(f"{name} argument has no closing brace")
    fields: dict[str, int] = {}
    for part in _split_top_level(rest[1:end]):
        key, sep, value = part.partition("=")
        key = key.strip()
        value = value.strip()
        if not sep or not key:
            if part.strip() == "...":
                continue
            raise _LineError(f"{name} argument: cannot read {part[:40]!r}")
        if key in fields:
            raise _LineError(f"{name} argument: {key} given twice")
        if key == "flags":
            fields[key] = _strace_flags(value)
        elif key in ("slot", "guest_memfd"):
            fields[key] = _int(key, value, U32_MAX)
        elif key in ("guest_phys_addr", "memory_size", "userspace_addr", "guest_memfd_offset"):
            fields[key] = _int(key, value, U64_MAX)
        # padding and anything newer is ignored, as the kernel ignores the padding
    missing = [key for key in (_V2_FIELDS if v2 else _V1_FIELDS) if key not in fields]
    if missing:
        raise _LineError(f"{name} argument lacks {', '.join(missing)}")
    return fields, rest[end + 1 :]


def _strace_return(text: str) -> tuple[int | None, int | None]:
    """``(errno, value)`` of ``) = 0 <0.0001>`` / ``) = 4`` / ``) = -1 EEXIST (File
    exists)`` / ``) = ?``: errno 0 and the value on success, the errno and None on failure,
    (None, None) when unknown."""
    match = _STRACE_RETURN.match(text.strip())
    if match is None:
        raise _LineError(f"cannot read the return value in {text.strip()[:60]!r}")
    if match["ret"] == "?":
        return None, None
    ret = int(match["ret"])
    if ret >= 0:
        return 0, ret
    if ret != -1:
        raise _LineError(f"return value {ret} is neither 0 nor -1")
    if not match["name"]:
        raise _LineError("return value -1 without an errno name")
    try:
        return parse_errno(match["name"]), None
    except ValueError as exc:
        raise _LineError(str(exc)) from None


def _strace_result(text: str) -> int | None:
    """The result of a memslot call: 0, the errno, or None when unknown."""
    err, value = _strace_return(text)
    if err == 0 and value != 0:
        raise _LineError(f"return value {value} is neither 0 nor -1")
    return err


def _strace_pid(line: str) -> int | None:
    match = _STRACE_PID.match(line)
    if match is None:
        return None
    return int(match["bracketed"] or match["bare"])


def _strace_fd(text: str) -> int | None:
    """The number of ``10``, ``10</dev/kvm>`` or ``10<anon_inode:kvm-vm>``."""
    match = re.match(r"\s*(\d{1,10})", text)
    return int(match.group(1)) if match else None


class _StraceVms:
    """Which VM each memslot ioctl of a strace belongs to.

    ``KVM_CREATE_VM`` on a process's fd returns the new VM's fd: from then on that
    (pid, fd) is the new VM, whatever VM the number named before (a closed fd's number
    is reused by the next open). A call on an fd no ``KVM_CREATE_VM`` of its own pid
    returned is the last VM created with that fd number by any pid (strace ``-f``
    prints thread ids, and threads share their process's fds), or else a VM of its own,
    numbered when first seen (traces that begin after the VM was created).
    """

    def __init__(self) -> None:
        self.count = 0
        self.by_pid_fd: dict[tuple[int | None, int | None], int] = {}
        self.by_fd: dict[int | None, int] = {}

    def create(self, pid: int | None, fd: int | None) -> int:
        vm = self.count
        self.count += 1
        self.by_pid_fd[(pid, fd)] = vm
        self.by_fd[fd] = vm
        return vm

    def of(self, pid: int | None, fd: int | None) -> int:
        vm = self.by_pid_fd.get((pid, fd))
        if vm is None:
            vm = self.by_fd.get(fd)
        if vm is None:
            vm = self.create(pid, fd)
        return vm


def read_strace(
    lines: Iterable[str],
    source: str = "<strace>",
    *,
    skip_bad: bool = False,
    errors: list[TraceFormatError] | None = None,
) -> Iterator[MemslotCall | CreateVm]:
    """Yield the ``KVM_CREATE_VM`` and memslot calls of ``strace`` output, in the order
    they returned, each memslot call with its VM (see :class:`_StraceVms`).

    Reads ``ioctl(FD, KVM_SET_USER_MEMORY_REGION, {...}) = RET`` lines with or without
    ``-f`` pids (``PID `` or ``[pid PID] ``), timestamps (``-t``, ``-tt``, ``-ttt``, ``-r``),
    ``-T`` durations, ``-y`` fd paths and ``-X verbose``/``raw`` constants, and
    ``ioctl(3, KVM_CREATE_VM, 0) = 4``. A call split into ``<unfinished ...>`` and
    ``<... ioctl resumed>`` lines (matched by pid) is yielded when it resumes, with the line
    number where it started; one still unfinished at the end is yielded last with
    ``result=None``. ``KVM_SET_USER_MEMORY_REGION2`` lines are read if their struct is
    decoded (same field names plus ``guest_memfd_offset`` and ``guest_memfd``); strace
    versions that print only its address give an error naming ``memslots record``, as does
    any memslot ioctl that does not parse. Errors raise :class:`TraceFormatError` unless
    ``skip_bad`` (then they are skipped and appended to ``errors`` when given). O(1) per
    line.
    """
    reader = _Reader(source, skip_bad, errors)
    vms = _StraceVms()
    pending: dict[int | None, MemslotCall | CreateVm] = {}

    def finish(started: MemslotCall | CreateVm, rest: str) -> MemslotCall | CreateVm:
        if isinstance(started, CreateVm):
            err, value = _strace_return(rest)
            if err != 0:
                return dataclasses.replace(started, result=err)
            vm = vms.create(started.pid, value)
            return dataclasses.replace(started, vm=vm, fd=value, result=0)
        return dataclasses.replace(started, result=_strace_result(rest))

    for number, raw in reader.lines(lines):
        if "ioctl" not in raw:
            continue
        text = raw.rstrip("\r\n")
        try:
            call_match = _STRACE_CALL.search(text)
            if call_match is None:
                resumed = _STRACE_RESUMED.search(text)
                if resumed is None:
                    continue
                started = pending.pop(_strace_pid(text), None)
                if started is None:
                    continue  # the end of some other ioctl
                yield finish(started, resumed["rest"])
                continue
            request = call_match["request"]
            pid = _strace_pid(text)
            fd = _strace_fd(call_match["fd"])
            call: MemslotCall | CreateVm
            if request in _CREATE_VM_REQUESTS:
                arg = call_match["rest"].split(")")[0].strip()
                call = CreateVm(
                    _int("type", arg, U64_MAX) if arg[:1].isdigit() else 0,
                    vm=None,
                    pid=pid or 0,
                    tid=pid or 0,
                    line=number,
                    source=source,
                )
                after = call_match["rest"][call_match["rest"].find(")") :]
                if call_match["rest"].rstrip().endswith(_UNFINISHED):
                    after = _UNFINISHED
            else:
                request = re.sub(r"\s+", " ", request)
                fields, after = _strace_struct(request, call_match["rest"])
                call = MemslotCall(
                    fields["slot"],
                    fields["flags"],
                    fields["guest_phys_addr"],
                    fields["memory_size"],
                    fields["userspace_addr"],
                    None,
                    fields.get("guest_memfd_offset", 0),
                    fields.get("guest_memfd", 0),
                    request in _V2_REQUESTS,
                    vm=vms.of(pid, fd),
                    pid=pid or 0,
                    tid=pid or 0,
                    line=number,
                    source=source,
                )
            if after.strip() == _UNFINISHED:
                if pid in pending:
                    reader.bad(pending[pid].line, "unfinished ioctl never resumed")
                pending[pid] = call
                continue
            yield finish(call, after)
        except _LineError as exc:
            reader.bad(number, str(exc))
    # calls still in flight when the trace ended (a killed process): result unknown
    for started in sorted(pending.values(), key=lambda call: call.line):
        if isinstance(started, MemslotCall):
            yield started


# --------------------------------------------------------------------------- JSON Lines

_JSON_REQUIRED: Final = ("slot", "flags", "guest_phys_addr", "memory_size", "userspace_addr")
_JSON_LIMITS: Final[dict[str, int]] = {
    "slot": U32_MAX,
    "flags": U32_MAX,
    "guest_phys_addr": U64_MAX,
    "memory_size": U64_MAX,
    "userspace_addr": U64_MAX,
    "guest_memfd_offset": U64_MAX,
    "guest_memfd": U32_MAX,
}
_JSON_KEYS: Final = frozenset((*_JSON_LIMITS, "result", "v2"))
_V1_FAST_KEYS: Final = frozenset((*_JSON_REQUIRED, "result"))
_V1_LIMITS: Final = tuple(_JSON_LIMITS[k] for k in _JSON_REQUIRED)
#: keys every version 2 record may have
_COMMON_KEYS: Final = frozenset(("kind", "vm", "pid", "tid", "t_ns", "result"))
#: kinds of version 2 records that are not made on a VM
_PROCESS_KINDS: Final = frozenset(("munmap", "mremap", "madvise"))
#: the highest number of runs one bitmap may have in a record
_MAX_RUNS: Final = 1 << 22


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _LineError(f"key {key[:40]!r} given twice")
        result[key] = value
    return result


def _json_number(key: str, value: object, limit: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise _LineError(f"{key} must be an integer, not {json.dumps(value)[:40]}")
    if isinstance(value, str):
        if not re.fullmatch(r"0[xX][0-9a-fA-F]{1,64}|[0-9]{1,64}", value):
            raise _LineError(f"{key} must be an integer, not {json.dumps(value)[:40]}")
        value = int(value, 0) if value[:2] in ("0x", "0X") else int(value, 10)
    return _check_range(key, value, limit)


def _json_int(key: str, value: object) -> int:
    return _json_number(key, value, _JSON_LIMITS[key])


def _json_result(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            return parse_errno(value)
        except ValueError:
            raise _LineError(f"result: unknown errno name {json.dumps(value)[:40]}") from None
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_ERRNO:
        return value
    raise _LineError(
        f"result must be 0, a positive errno or an errno name, not {json.dumps(value)[:40]}"
    )


_KEY = re.compile(r'"\s*:')


def _load_object(text: str) -> dict[str, Any]:
    try:
        obj = json.loads(text)
        if isinstance(obj, dict) and len(obj) < len(_KEY.findall(text)):
            # a key given twice (or a '":' inside a string): find out with the slow hook
            obj = json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as exc:
        # ("Unterminated string starting at" names its column itself)
        at = "" if exc.msg.endswith(" at") else " at"
        raise _LineError(f"bad JSON: {exc.msg}{at} column {exc.colno}") from None
    except (ValueError, RecursionError):
        # Python refuses integers of more than 4300 digits and very deep nesting
        raise _LineError("bad JSON: a number too long or nesting too deep") from None
    if not isinstance(obj, dict):
        raise _LineError("expected a JSON object")
    return obj


def _parse_v1(obj: dict[str, Any], line: int, source: str) -> MemslotCall:
    if obj.keys() <= _V1_FAST_KEYS:
        # the common line (plain integers in range): no per-field calls
        got = [obj.get(k) for k in _JSON_REQUIRED]
        values = [v for i, v in enumerate(got) if type(v) is int and 0 <= v <= _V1_LIMITS[i]]
        if len(values) == len(_JSON_REQUIRED):
            slot, flags, gpa, size, hva = values
            return MemslotCall(
                slot, flags, gpa, size, hva, _json_result(obj.get("result")),
                line=line, source=source,
            )  # fmt: skip
    unknown = sorted(set(obj) - _JSON_KEYS)
    if unknown:
        raise _LineError(f"unknown key {unknown[0][:40]!r}")
    missing = [key for key in _JSON_REQUIRED if key not in obj]
    if missing:
        raise _LineError(f"missing {', '.join(missing)}")
    v2 = obj.get("v2", False)
    if not isinstance(v2, bool):
        raise _LineError(f"v2 must be true or false, not {json.dumps(v2)[:40]}")
    return MemslotCall(
        _json_int("slot", obj["slot"]),
        _json_int("flags", obj["flags"]),
        _json_int("guest_phys_addr", obj["guest_phys_addr"]),
        _json_int("memory_size", obj["memory_size"]),
        _json_int("userspace_addr", obj["userspace_addr"]),
        _json_result(obj.get("result")),
        _json_int("guest_memfd_offset", obj.get("guest_memfd_offset", 0)),
        _json_int("guest_memfd", obj.get("guest_memfd", 0)),
        v2,
        line=line,
        source=source,
    )


# version 2: the fields of each kind, as (key, parser, required)


def _u32(key: str, value: object) -> int:
    return _json_number(key, value, U32_MAX)


def _u64(key: str, value: object) -> int:
    return _json_number(key, value, U64_MAX)


def _fd(key: str, value: object) -> int | None:
    return None if value is None else _json_number(key, value, 0x7FFFFFFF)


def _u64_or_null(key: str, value: object) -> int | None:
    return None if value is None else _u64(key, value)


def _bool(key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise _LineError(f"{key} must be true or false, not {json.dumps(value)[:40]}")
    return value


def _args(key: str, value: object) -> tuple[int, int, int, int]:
    if not isinstance(value, list) or len(value) != 4:
        raise _LineError(f"{key} must be a list of 4 integers")
    a, b, c, d = (_u64(f"{key}[{i}]", v) for i, v in enumerate(value))
    return a, b, c, d


def _runs(key: str, value: object) -> Runs | None:
    """``[[first, count], ...]``: ascending, non-overlapping, count > 0."""
    if value is None:
        return None
    if not isinstance(value, list) or len(value) > _MAX_RUNS:
        raise _LineError(f"{key} must be a list of [first, count] runs")
    runs: list[tuple[int, int]] = []
    end = -1
    for item in value:
        if not (isinstance(item, list) and len(item) == 2):
            raise _LineError(f"{key} must be a list of [first, count] runs")
        first = _json_number(f"{key} first", item[0], U64_MAX)
        count = _json_number(f"{key} count", item[1], U32_MAX)
        if count == 0 or first <= end:
            raise _LineError(f"{key}: runs must be ascending, apart and non-empty")
        end = first + count
        runs.append((first, count))
    return tuple(runs)


_Field = tuple[str, Any, bool]
_V2_KINDS: Final[dict[str, tuple[type, tuple[_Field, ...]]]] = {
    "create_vm": (
        CreateVm,
        (("type", _u64, True), ("fd", _fd, False), ("attached", _bool, False)),
    ),
    "set_user_memory_region": (
        MemslotCall,
        tuple((k, _u32 if _JSON_LIMITS[k] == U32_MAX else _u64, True) for k in _JSON_REQUIRED),
    ),
    "set_user_memory_region2": (
        MemslotCall,
        tuple(
            (k, _u32 if _JSON_LIMITS[k] == U32_MAX else _u64, True)
            for k in (*_JSON_REQUIRED, "guest_memfd_offset", "guest_memfd")
        ),
    ),
    "create_vcpu": (CreateVcpu, (("id", _u32, True), ("fd", _fd, False))),
    "create_guest_memfd": (
        CreateGuestMemfd,
        (("size", _u64, True), ("flags", _u64, True), ("fd", _fd, False)),
    ),
    "enable_cap": (
        EnableCap,
        (("cap", _u32, True), ("flags", _u32, False), ("args", _args, True)),
    ),
    "get_dirty_log": (GetDirtyLog, (("slot", _u32, True), ("dirty", _runs, False))),
    "clear_dirty_log": (
        ClearDirtyLog,
        (
            ("slot", _u32, True),
            ("first_page", _u64, True),
            ("num_pages", _u32, True),
            ("dirty", _runs, False),
        ),
    ),
    "reset_dirty_rings": (ResetDirtyRings, (("value", _u64_or_null, False),)),
    "release_vm": (ReleaseVm, ()),
    "munmap": (Munmap, (("addr", _u64, True), ("length", _u64, True))),
    "mremap": (
        Mremap,
        (
            ("old_address", _u64, True),
            ("old_size", _u64, True),
            ("new_size", _u64, True),
            ("flags", _u64, False),
            ("new_address", _u64, False),
            ("value", _u64_or_null, False),
        ),
    ),
    "madvise": (
        Madvise,
        (("addr", _u64, True), ("length", _u64, True), ("advice", _u32, True)),
    ),
}
#: JSON key -> dataclass field where they differ
_FIELD_NAMES: Final = {"type": "vm_type", "id": "vcpu_id"}
_END_KEYS: Final = frozenset(("kind", "status", "reason", "records", "t_ns"))


def _parse_v2(obj: dict[str, Any], line: int, source: str) -> Record:
    kind = obj.get("kind")
    if not isinstance(kind, str):
        raise _LineError("a version 2 record needs a 'kind' (a string)")
    if kind not in _V2_KINDS:
        raise _LineError(f"unknown kind {json.dumps(kind)[:40]}")
    cls, fields = _V2_KINDS[kind]
    known = _COMMON_KEYS | {k for k, _, _ in fields}
    unknown = sorted(set(obj) - known)
    if unknown:
        raise _LineError(f"{kind}: unknown key {unknown[0][:40]!r}")
    missing = [k for k, _, required in fields if required and k not in obj]
    if missing:
        raise _LineError(f"{kind}: missing {', '.join(missing)}")
    values: dict[str, Any] = {}
    for key, parse, _ in fields:
        if key in obj:
            values[_FIELD_NAMES.get(key, key)] = parse(key, obj[key])
    if kind in _PROCESS_KINDS:
        if obj.get("vm") is not None:
            raise _LineError(f"{kind} is a call on a process: its vm must be null or absent")
        vm = None
    elif "vm" not in obj:
        raise _LineError(f"{kind}: missing vm")
    else:
        vm = None if obj["vm"] is None else _json_number("vm", obj["vm"], 0xFFFFFF)
        if vm is None and kind != "create_vm":
            raise _LineError(f"{kind}: vm must be a VM number")
    values["vm"] = vm
    values["pid"] = _json_number("pid", obj.get("pid", 0), 0x7FFFFFFF)
    values["tid"] = _json_number("tid", obj.get("tid", 0), 0x7FFFFFFF)
    values["time_ns"] = _json_number("t_ns", obj.get("t_ns", 0), U64_MAX)
    values["result"] = _json_result(obj.get("result"))
    if kind == "set_user_memory_region2":
        values["v2"] = True
    return cls(**values, line=line, source=source)  # type: ignore[no-any-return]


def _check_header(obj: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(obj) - {"format", "version", "recorder", "host", "comment"})
    if unknown:
        raise _LineError(f"header: unknown key {unknown[0][:40]!r}")
    version = obj.get("version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise _LineError("header: version must be an integer")
    if version > TRACE_VERSION:
        raise _LineError(
            f"trace format version {version} is newer than this memslots reads"
            f" (up to {TRACE_VERSION}); upgrade memslots"
        )
    if version != TRACE_VERSION:
        raise _LineError(f"header: version {version} has no header line (only 2 does)")
    for key in ("recorder", "host"):
        if key in obj and not isinstance(obj[key], dict):
            raise _LineError(f"header: {key} must be an object")
    limits = (obj.get("host") or {}).get("limits")
    if limits is not None:
        try:
            VmLimits(**limits)
        except (TypeError, ValueError) as exc:
            raise _LineError(f"header: host limits: {exc}") from None
    return obj


class _JsonlReader:
    """Reads JSON Lines of either version; keeps the header and the end record."""

    def __init__(self, reader: _Reader) -> None:
        self.reader = reader
        self.header: dict[str, Any] | None = None
        self.end: dict[str, Any] | None = None
        self.vms = 0

    def records(self, lines: Iterable[str]) -> Iterator[Record]:
        source = self.reader.source
        first = True
        for number, raw in self.reader.lines(lines):
            text = raw.strip()
            if not text or text.startswith("#"):
                continue
            try:
                obj = _load_object(text)
                if first:
                    first = False
                    if "format" in obj:
                        if obj["format"] != TRACE_FORMAT_NAME:
                            raise _LineError(
                                f"header: format {json.dumps(obj['format'])[:40]} is not"
                                f" {TRACE_FORMAT_NAME!r}"
                            )
                        self.header = _check_header(obj)
                        continue
                if self.header is None:
                    if "kind" in obj or "format" in obj:
                        raise _LineError(
                            "a version 2 record in a file without a version 2 header line"
                        )
                    yield _parse_v1(obj, number, source)
                    continue
                if self.end is not None:
                    raise _LineError("record after the end record")
                if obj.get("kind") == "end":
                    unknown = sorted(set(obj) - _END_KEYS)
                    if unknown:
                        raise _LineError(f"end: unknown key {unknown[0][:40]!r}")
                    self.end = obj
                    continue
                record = _parse_v2(obj, number, source)
                self._check_vm(record)
                yield record
            except _LineError as exc:
                self.reader.bad(number, str(exc))

    def _check_vm(self, record: Record) -> None:
        """VMs are numbered 0, 1, ... in the order of their create_vm records, and every
        record of a VM comes after its create_vm."""
        if isinstance(record, CreateVm):
            if record.vm is None:
                if record.result == 0:
                    raise _LineError("create_vm: a call that succeeded needs its vm number")
                return
            if record.vm != self.vms:
                raise _LineError(f"create_vm: the next VM is number {self.vms}, not {record.vm}")
            if record.result not in (0, None):
                raise _LineError("create_vm: a failed call has no vm (null)")
            self.vms += 1
        elif record.vm is not None and record.vm >= self.vms:
            raise _LineError(f"{record.kind}: vm {record.vm} was not created before")


def read_jsonl(
    lines: Iterable[str],
    source: str = "<jsonl>",
    *,
    skip_bad: bool = False,
    errors: list[TraceFormatError] | None = None,
) -> Iterator[Record]:
    """Yield the records of the project's JSON Lines format (either version), in order.

    Version 1 (no header line): each non-blank line not starting with ``#`` must be one
    JSON object with the integer keys ``slot``, ``flags``, ``guest_phys_addr``,
    ``memory_size``, ``userspace_addr`` (a ``"0x..."`` string is accepted for any of them)
    and optionally ``result`` (0, a positive errno, an errno name such as ``"EEXIST"``,
    ``"OK"`` or null), ``guest_memfd_offset``, ``guest_memfd`` and ``v2`` (true for
    REGION2); every call is of VM 0. Version 2: a header line, then one record a line with
    a ``kind`` (``docs/trace-format.md`` lists every kind and key). Bad JSON, unknown or
    missing keys, out-of-range numbers and records of a VM not created yet raise
    :class:`TraceFormatError` (or, with ``skip_bad``, are skipped and appended to
    ``errors`` when given). O(1) per line.
    """
    yield from _JsonlReader(_Reader(source, skip_bad, errors)).records(lines)


def _errno_json(result: int | None) -> int | str | None:
    if result is None:
        return None
    name = errno_name(result)
    return 0 if result == 0 else name if name.startswith("E") else result


def call_to_json(call: MemslotCall) -> str:
    """One version 1 JSON Lines line (no newline) for ``call``; :func:`read_jsonl` reads
    it back equal (its VM aside).

    ``result`` is written as 0, or as the errno name (``"EEXIST"``) from
    :func:`memslots.errors.errno_name`, and left out when None; the REGION2 fields are
    written only for v2 calls or when not 0. O(1).
    """
    obj: dict[str, object] = {
        "slot": call.slot,
        "flags": call.flags,
        "guest_phys_addr": call.guest_phys_addr,
        "memory_size": call.memory_size,
        "userspace_addr": call.userspace_addr,
    }
    if call.result is not None:
        obj["result"] = _errno_json(call.result)
    if call.v2 or call.guest_memfd_offset or call.guest_memfd:
        obj["guest_memfd_offset"] = call.guest_memfd_offset
        obj["guest_memfd"] = call.guest_memfd
    if call.v2:
        obj["v2"] = True
    return json.dumps(obj)


def write_jsonl(calls: Iterable[MemslotCall], fp: IO[str], *, header: str | None = None) -> int:
    """Write ``calls`` to the text file ``fp`` as version 1 JSON Lines (one VM); return how
    many were written.

    ``header``, if given, is written first as ``#`` comment lines (one per line of it).
    O(n).
    """
    if header is not None:
        for text in header.splitlines() or [""]:
            fp.write(f"# {text}\n" if text else "#\n")
    count = 0
    for call in calls:
        fp.write(call_to_json(call) + "\n")
        count += 1
    return count


def record_to_json(record: Record) -> dict[str, Any]:
    """The version 2 JSON object of ``record`` (what :class:`TraceWriter` writes a line
    of); :func:`read_jsonl` reads it back equal. ``pid``, ``tid`` and ``t_ns`` are left
    out when 0, ``result`` when None. O(1), O(runs) for dirty logs."""
    obj: dict[str, Any] = {"kind": record.kind}
    if record.kind not in _PROCESS_KINDS:
        obj["vm"] = record.vm
    for key, value in (("pid", record.pid), ("tid", record.tid), ("t_ns", record.time_ns)):
        if value:
            obj[key] = value
    _, fields = _V2_KINDS[record.kind]
    for key, _, required in fields:
        field: Any = getattr(record, _FIELD_NAMES.get(key, key))
        if isinstance(field, tuple):
            field = [list(v) if isinstance(v, tuple) else v for v in field]
        if required or (field is not None and field is not False):
            obj[key] = field
    if record.result is not None:
        obj["result"] = _errno_json(record.result)
    return obj


def header_json(recorder: dict[str, Any], host: dict[str, Any] | None = None) -> dict[str, Any]:
    """A version 2 header object: ``format``, ``version``, ``recorder`` (what made the
    trace: ``name``, ``version`` and anything else) and ``host`` (e.g. ``kernel`` and the
    VM ``limits`` of the machine it was recorded on). O(1)."""
    obj: dict[str, Any] = {
        "format": TRACE_FORMAT_NAME,
        "version": TRACE_VERSION,
        "recorder": recorder,
    }
    if host is not None:
        obj["host"] = host
    return obj


class TraceWriteError(OSError):
    """:class:`TraceWriter` could not write to its file descriptor (a full disk, a pipe
    whose reader went away): the OS error's errno and text."""


class TraceWriter:
    """Writes a version 2 trace to the file descriptor ``fd`` as records arrive.

    The header goes out at once; :meth:`write` writes one record a line, each with a
    single ``write`` system call, so every line is complete in the file as soon as it is
    written (the process may be killed at any moment after that); :meth:`end` writes the
    end record. Lines are never buffered in this process. A failed write raises
    :class:`TraceWriteError`. O(1) per record (O(runs) for a dirty log).
    """

    def __init__(self, fd: int, header: dict[str, Any]) -> None:
        self.fd = fd
        self.records = 0
        self.ended = False
        self._emit(header)

    def _emit(self, obj: dict[str, Any]) -> None:
        data = (json.dumps(obj, separators=(", ", ": ")) + "\n").encode()
        view = memoryview(data)
        while view:
            try:
                written = os.write(self.fd, view)
            except OSError as exc:
                raise TraceWriteError(exc.errno or 0, exc.strerror or str(exc)) from None
            view = view[written:]

    def write(self, record: Record) -> None:
        """Write ``record`` (flushed to the kernel before this returns)."""
        self._emit(record_to_json(record))
        self.records += 1

    def end(self, status: int | None, reason: str, time_ns: int = 0) -> None:
        """Write the end record once: ``status`` (the traced command's exit status, None
        when unknown) and ``reason`` (``"exited"``, ``"interrupted"``, ``"detached"``...)."""
        if self.ended:
            return
        self.ended = True
        obj: dict[str, Any] = {
            "kind": "end",
            "status": status,
            "reason": reason,
            "records": self.records,
        }
        if time_ns:
            obj["t_ns"] = time_ns
        self._emit(obj)


def write_trace(trace: Trace, fp: IO[str], recorder: dict[str, Any] | None = None) -> int:
    """Write ``trace`` as version 2 JSON Lines to the text file ``fp`` (its header, or one
    naming ``recorder``); return the number of records. O(n)."""
    header = trace.header or header_json(recorder or {"name": "memslots"})
    fp.write(json.dumps(header) + "\n")
    for record in trace.records:
        fp.write(json.dumps(record_to_json(record)) + "\n")
    if trace.end is not None:
        fp.write(json.dumps(trace.end) + "\n")
    return len(trace.records)


# --------------------------------------------------------------------------- any format

_DETECT_QEMU = re.compile(r"(?:^|(?<=[\s:]))kvm_set_user_memory(?:\s|$)")
_DETECT_STRACE = re.compile(r"(?:^|(?<=[\s\]]))ioctl\([^,()]*,\s*" + _REQUEST)

StrPath = str | os.PathLike[str]


def _detect_in(lines: Iterable[str], source: str) -> TraceFormat | None:
    """The format of the first line that tells; ``"jsonl"`` when nothing but blank and
    comment lines; None when no line tells. Reads at most :data:`_MAX_DETECT_LINES`
    lines (more is an error, and so is binary data: neither is a malformed line that
    ``skip_bad`` could skip)."""
    try:
        return _detect_format_of(lines, source)
    except TraceFormatError as exc:
        raise TraceFormatError(exc.source, exc.line, exc.message) from None


def _detect_format_of(lines: Iterable[str], source: str) -> TraceFormat | None:
    only_comments = True
    for number, raw in _Reader(source, False, None).lines(lines):
        if number > _MAX_DETECT_LINES:
            raise TraceFormatError(
                source,
                number,
                f"no memslot record in the first {_MAX_DETECT_LINES} lines: {NOT_A_TRACE}",
            )
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        if text.startswith("{"):
            return "jsonl"
        only_comments = False
        if "kvm_set_user_memory" in text and _DETECT_QEMU.search(text):
            return "qemu"
        if "ioctl" in text and _DETECT_STRACE.search(text):
            return "strace"
    return "jsonl" if only_comments else None


def _open(path: StrPath | Traversable) -> IO[str]:
    if isinstance(path, str | os.PathLike):
        return open(path, encoding="utf-8-sig", errors="replace")
    return path.open("r", encoding="utf-8-sig", errors="replace")


def _name(path: StrPath | Traversable) -> str:
    return os.fspath(path) if isinstance(path, str | os.PathLike) else str(path)


def bounded_lines(fp: IO[str]) -> Iterator[str]:
    """The lines of the text file ``fp`` (a trace file, standard input) as they come, none
    read whole if it is longer than :data:`MAX_LINE` characters (the readers then stop
    with an error), so memory stays bounded whatever the input (``/dev/zero`` included).
    O(1) memory besides the line."""
    while True:
        line = fp.readline(MAX_LINE + 1)
        if not line:
            return
        yield line
        if len(line) > MAX_LINE:
            return


def detect_format(
    path_or_first_lines: StrPath | Traversable | Iterable[str], source: str | None = None
) -> TraceFormat:
    """Which format a trace is in, by content: ``"qemu"``, ``"strace"`` or ``"jsonl"``.

    Takes a path (a ``str`` is always a path) or the lines themselves, and reads only up to
    the first line that tells: a ``kvm_set_user_memory`` trace event, a memslot or
    ``KVM_CREATE_VM`` ``ioctl(`` of strace, or a line that starts with ``{`` (JSON Lines);
    blank and ``#`` lines do not tell. Input with no such line, only blank and comment
    lines, counts as (empty) JSON Lines. Raises :class:`TraceFormatError` (line 0) when no
    line tells or a line is longer than :data:`MAX_LINE`, OSError when the file cannot be
    read. O(lines read).
    """
    if isinstance(path_or_first_lines, str | os.PathLike | Traversable):
        label = source or _name(path_or_first_lines)
        with _open(path_or_first_lines) as fp:
            fmt = _detect_in(bounded_lines(fp), label)
    else:
        label = source or "<trace>"
        fmt = _detect_in(path_or_first_lines, label)
    if fmt is None:
        raise TraceFormatError(
            label,
            0,
            f"{NOT_A_TRACE}: no QEMU kvm_set_user_memory line, no strace"
            " KVM_SET_USER_MEMORY_REGION or KVM_CREATE_VM ioctl and no JSON Lines object found",
        )
    return fmt


def load_trace(
    path_or_lines: StrPath | Traversable | Iterable[str],
    *,
    fmt: TraceFormat | None = None,
    skip_bad: bool = False,
    errors: list[TraceFormatError] | None = None,
    source: str | None = None,
) -> Trace:
    """The whole :class:`Trace` of a file (a path; a ``str`` is always a path) or of lines
    already read, in the format ``fmt`` or, when None, the one its content shows
    (:func:`detect_format`). ``source`` (default: the path, or ``"<trace>"``) names it in
    errors and in each record's ``.source``. Raises :class:`TraceFormatError` for a
    malformed line (unless ``skip_bad``) or an unrecognisable input, OSError when the file
    cannot be read. Lines that are not a sequence (standard input) are read once, as
    they come. O(n) time; memory O(records) plus the longest line, records (and skipped
    lines) being at most :data:`MAX_RECORDS`: more is a :class:`TraceFormatError`.
    """
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"unknown trace format {fmt!r} (one of {', '.join(FORMATS)})")
    if isinstance(path_or_lines, str | os.PathLike | Traversable):
        label = source or _name(path_or_lines)
        if fmt is None:
            fmt = detect_format(path_or_lines, label)
        with _open(path_or_lines) as fp:
            return _parse(bounded_lines(fp), label, fmt, skip_bad, errors)
    label = source or "<trace>"
    if isinstance(path_or_lines, Sequence):
        if fmt is None:
            fmt = detect_format(path_or_lines, label)
        return _parse(path_or_lines, label, fmt, skip_bad, errors)
    it = iter(path_or_lines)  # a stream (standard input): read once, never held whole
    head: list[str] = []
    if fmt is None:
        fmt = detect_format(_kept(it, head), label)
    return _parse(itertools.chain(head, it), label, fmt, skip_bad, errors)


def _kept(lines: Iterator[str], kept: list[str]) -> Iterator[str]:
    """``lines``, each also appended to ``kept`` (what format detection read)."""
    for line in lines:
        kept.append(line)
        yield line


def _at_most(records: Iterable[Record], source: str) -> list[Record]:
    """The records, or TraceFormatError past :data:`MAX_RECORDS` of them."""
    out: list[Record] = []
    for record in records:
        if len(out) >= MAX_RECORDS:
            raise TraceFormatError(
                source,
                record.line,
                f"more than {MAX_RECORDS} records: too long to replay (split the trace)",
            )
        out.append(record)
    return out


def _parse(
    lines: Iterable[str],
    source: str,
    fmt: TraceFormat,
    skip_bad: bool,
    errors: list[TraceFormatError] | None,
) -> Trace:
    reader = _Reader(source, skip_bad, errors)
    if fmt == "jsonl":
        jsonl = _JsonlReader(reader)
        records = _at_most(jsonl.records(lines), source)
        return Trace(records, source, fmt, jsonl.header, jsonl.end)
    if fmt == "qemu":
        records = _at_most(read_qemu_log(lines, source, skip_bad=skip_bad, errors=errors), source)
    else:
        records = _at_most(read_strace(lines, source, skip_bad=skip_bad, errors=errors), source)
    return Trace(records, source, fmt)


def parse_trace(
    lines: Iterable[str],
    source: str = "<trace>",
    *,
    fmt: TraceFormat | None = None,
    skip_bad: bool = False,
    errors: list[TraceFormatError] | None = None,
) -> list[MemslotCall]:
    """The memslot calls (of every VM) of ``lines`` (text already in memory, or
    ``sys.stdin``), in the format ``fmt`` or, when None, the one :func:`detect_format`
    finds. Errors as in the readers; :func:`load_trace` gives every record. O(n).
    """
    return load_trace(lines, fmt=fmt, skip_bad=skip_bad, errors=errors, source=source).calls


def read_trace(
    path: StrPath | Traversable,
    *,
    fmt: TraceFormat | None = None,
    skip_bad: bool = False,
    errors: list[TraceFormatError] | None = None,
    source: str | None = None,
) -> list[MemslotCall]:
    """The memslot calls (of every VM) of the trace file ``path``, in the format ``fmt``
    or, when None, the one its content shows (:func:`detect_format`). ``source`` (default:
    the path) names the file in errors and in each call's ``.source``. Raises
    :class:`TraceFormatError` for a malformed line (unless ``skip_bad``) or an
    unrecognisable file, OSError when it cannot be read; :func:`load_trace` gives every
    record. O(n).
    """
    return load_trace(path, fmt=fmt, skip_bad=skip_bad, errors=errors, source=source).calls


def embedded_trace_path() -> Traversable:
    """The trace shipped in the package (``memslots/data/seabios.log``: QEMU 7.2 booting
    SeaBIOS, 37 calls). A :class:`pathlib.Path` for an ordinary install. O(1).
    """
    return files("memslots").joinpath("data", EMBEDDED_TRACE_NAME)


def read_embedded_trace() -> list[MemslotCall]:
    """The calls of the embedded trace (:func:`embedded_trace_path`), each with
    ``source="seabios.log"``. O(n).
    """
    return read_trace(embedded_trace_path(), fmt="qemu", source=EMBEDDED_TRACE_NAME)


# --------------------------------------------------------------------------- recording

_TargetT = TypeVar("_TargetT", bound=MemslotTarget)


class Recorder(Generic[_TargetT]):
    """Wraps a memslot target (``Vm``, ``KvmVm``, ``ArrayVm``...) and records its calls.

    ``set_user_memory_region`` and ``set_user_memory_region2`` are forwarded to the target
    and recorded with their result: 0, or the errno of the :class:`OSError`
    (:class:`~memslots.errors.MemslotError`) the target raised, which is re-raised. Calls
    that raise anything else are not recorded. Every other attribute is the target's
    (``rec.memslots(0)``, ``rec.get_dirty_log(slot)``...); ``with Recorder(vm) as rec``
    enters and exits the target too. Recording is serialised by a lock, so the recorded
    order is the order the target ran the calls in. ``.calls`` is the list so far and
    ``.dump(fp)`` writes it as JSON Lines. Overhead: O(1) per call.
    """

    def __init__(self, target: _TargetT, source: str = "") -> None:
        self._target = target
        self._source = source
        self._calls: list[MemslotCall] = []
        self._lock = threading.Lock()

    @property
    def target(self) -> _TargetT:
        """The wrapped object."""
        return self._target

    @property
    def calls(self) -> list[MemslotCall]:
        """A copy of the calls recorded so far, in order; ``line`` is each call's 1-based
        position. O(n)."""
        with self._lock:
            return list(self._calls)

    def clear(self) -> None:
        """Forget the calls recorded so far. O(1)."""
        with self._lock:
            self._calls = []

    def _record(self, call: MemslotCall) -> None:
        self._calls.append(
            dataclasses.replace(call, line=len(self._calls) + 1, source=self._source)
        )

    def set_user_memory_region(
        self,
        slot: int,
        flags: int,
        guest_phys_addr: int,
        memory_size: int,
        userspace_addr: int,
    ) -> None:
        """Forward ``KVM_SET_USER_MEMORY_REGION`` to the target and record it. Raises what
        the target raises."""
        call = MemslotCall(slot, flags, guest_phys_addr, memory_size, userspace_addr)
        with self._lock:
            try:
                self._target.set_user_memory_region(
                    slot, flags, guest_phys_addr, memory_size, userspace_addr
                )
            except OSError as exc:
                if isinstance(exc.errno, int):
                    self._record(dataclasses.replace(call, result=exc.errno))
                raise
            self._record(dataclasses.replace(call, result=0))

    def set_user_memory_region2(
        self,
        slot: int,
        flags: int,
        guest_phys_addr: int,
        memory_size: int,
        userspace_addr: int,
        guest_memfd_offset: int = 0,
        guest_memfd: int = 0,
    ) -> None:
        """Forward ``KVM_SET_USER_MEMORY_REGION2`` to the target and record it (``v2``).
        Raises what the target raises."""
        call = MemslotCall(
            slot,
            flags,
            guest_phys_addr,
            memory_size,
            userspace_addr,
            guest_memfd_offset=guest_memfd_offset,
            guest_memfd=guest_memfd,
            v2=True,
        )
        with self._lock:
            try:
                self._target.set_user_memory_region2(
                    slot,
                    flags,
                    guest_phys_addr,
                    memory_size,
                    userspace_addr,
                    guest_memfd_offset=guest_memfd_offset,
                    guest_memfd=guest_memfd,
                )
            except OSError as exc:
                if isinstance(exc.errno, int):
                    self._record(dataclasses.replace(call, result=exc.errno))
                raise
            self._record(dataclasses.replace(call, result=0))

    def dump(self, fp: IO[str] | StrPath, *, header: str | None = None) -> int:
        """Write the recorded calls as JSON Lines to an open text file or a path; return
        how many. O(n)."""
        if isinstance(fp, str | os.PathLike):
            with open(fp, "w", encoding="utf-8") as out:
                return write_jsonl(self.calls, out, header=header)
        return write_jsonl(self.calls, fp, header=header)

    def __getattr__(self, name: str) -> Any:
        # only called for attributes not found on the Recorder itself
        if name.startswith("__") or "_target" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self._target, name)

    def __enter__(self) -> Recorder[_TargetT]:
        enter = getattr(self._target, "__enter__", None)
        if enter is not None:
            enter()
        return self

    def __exit__(self, *exc_info: object) -> None:
        leave = getattr(self._target, "__exit__", None)
        if leave is not None:
            leave(*exc_info)

    def __repr__(self) -> str:
        return f"Recorder({self._target!r}, {len(self._calls)} calls)"
