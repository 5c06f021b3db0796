"""Memslot traces: reading recorded ``KVM_SET_USER_MEMORY_REGION`` calls, and recording them.

A trace is a sequence of memslot calls, each with the result the kernel gave when it was
recorded. Three formats are read, all one call a line:

``qemu``
    QEMU's ``log`` trace backend (``-trace kvm_set_user_memory -D FILE``)::

        kvm_set_user_memory Slot#0 flags=0x0 gpa=0x0 size=0x20000000 ua=0x7fc3b7e00000 ret=0

    optionally prefixed by ``PID@SECONDS.MICROS:`` (``-msg timestamp=on``) or by anything
    that ends in a blank or a colon (ftrace's ``print:``). QEMU 8's ``AddrSpace#%d Slot#%d``
    form and QEMU 9's ``guest_memfd=%d guest_memfd_offset=0x%x`` fields are read too.
    Other trace events are ignored.
``strace``
    ``strace -f -tt -T -e trace=ioctl`` output::

        9000  13:49:47.551372 ioctl(10, KVM_SET_USER_MEMORY_REGION, {slot=0, flags=0,
        guest_phys_addr=0, memory_size=536870912, userspace_addr=0x7f0c53e00000}) = 0 <0.000199>

    (one line in the file). Flags are symbolic (``KVM_MEM_LOG_DIRTY_PAGES|KVM_MEM_READONLY``)
    or numeric; a failure reads ``= -1 EEXIST (File exists)``. A call split by another
    thread into ``... <unfinished ...>`` and ``<... ioctl resumed>) = 0`` is joined again.
    Other syscalls, other ioctls and strace's own lines are ignored.
``jsonl``
    the project's own JSON Lines format, one object a line::

        {"slot": 0, "flags": 0, "guest_phys_addr": 0, "memory_size": 536870912,
         "userspace_addr": 140478234329088, "result": 0}

    (one line in the file). ``result`` (0, a positive errno or an errno name such as
    ``"EEXIST"``), ``guest_memfd_offset``, ``guest_memfd`` and ``v2`` are optional.
    Blank lines and lines starting with ``#`` are allowed.

A line that clearly is a memslot call of its format but does not parse raises
:class:`TraceFormatError`, whose text is one line ``FILE:LINE: message``. Every reader takes
``skip_bad=True`` to skip such lines instead (and an ``errors`` list to collect them).

:class:`Recorder` wraps a ``Vm`` (or ``KvmVm``, ``ArrayVm``) and records every memslot call
with its result, for :func:`write_jsonl`.

All readers are generators over lines and cost O(1) per line (O(length of the line)).
"""

from __future__ import annotations

import dataclasses
import errno as _errno
import json
import os
import re
import threading
from collections.abc import Iterable, Iterator, Sequence
from importlib.resources import files
from importlib.resources.abc import Traversable
from typing import IO, Any, Final, Generic, Literal, Protocol, TypeVar

from memslots.constants import (
    KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
    U32_MAX,
    U64_MAX,
)
from memslots.errors import errno_name

__all__ = [
    "EMBEDDED_TRACE_NAME",
    "FORMATS",
    "MemslotCall",
    "MemslotTarget",
    "Recorder",
    "TraceFormat",
    "TraceFormatError",
    "call_to_json",
    "detect_format",
    "embedded_trace_path",
    "parse_errno",
    "parse_trace",
    "read_embedded_trace",
    "read_jsonl",
    "read_qemu_log",
    "read_strace",
    "read_trace",
    "write_jsonl",
]

TraceFormat = Literal["qemu", "strace", "jsonl"]
#: the formats :func:`read_trace` understands
FORMATS: Final[tuple[TraceFormat, ...]] = ("qemu", "strace", "jsonl")

#: file name of the trace shipped inside the package (``memslots/data/``)
EMBEDDED_TRACE_NAME: Final = "seabios.log"

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


# --------------------------------------------------------------------------- the call


@dataclasses.dataclass(frozen=True, slots=True)
class MemslotCall:
    """One recorded ``KVM_SET_USER_MEMORY_REGION`` (or ``..._REGION2``) call.

    The first five fields are those of ``struct kvm_userspace_memory_region``; ``slot`` is
    the ABI value ``as_id << 16 | id``. ``result`` is what the kernel answered when the call
    was recorded: 0, a positive errno, or None when the trace does not say.
    ``guest_memfd_offset`` and ``guest_memfd`` are the extra fields of
    ``struct kvm_userspace_memory_region2`` and ``v2`` says which ioctl was used.

    ``line`` (1-based, 0 when unknown) and ``source`` say where the call was read from; they
    take no part in equality, so the same calls read from two files compare equal.
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
    line: int = dataclasses.field(default=0, compare=False)
    source: str = dataclasses.field(default="", compare=False)

    @property
    def as_id(self) -> int:
        """The address space: ``slot >> 16``. O(1)."""
        return self.slot >> 16

    @property
    def id(self) -> int:
        """The slot id inside its address space: ``slot & 0xffff``. O(1)."""
        return self.slot & 0xFFFF

    @property
    def where(self) -> str:
        """``FILE:LINE`` of the call, as far as it is known. O(1)."""
        if self.line:
            return f"{self.source or '<trace>'}:{self.line}"
        return self.source or "<trace>"

    def apply(self, target: MemslotTarget) -> None:
        """Make this call on ``target`` (a ``Vm``, ``KvmVm``, ``ArrayVm``, a
        :class:`Recorder`...) with the ioctl it was recorded with. Raises what the target
        raises (:class:`~memslots.errors.MemslotError` on failure). Cost: the target's.
        """
        if self.v2:
            target.set_user_memory_region2(
                self.slot,
                self.flags,
                self.guest_phys_addr,
                self.memory_size,
                self.userspace_addr,
                guest_memfd_offset=self.guest_memfd_offset,
                guest_memfd=self.guest_memfd,
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


class MemslotTarget(Protocol):
    """Anything that takes memslot calls: ``Vm``, ``KvmVm``, ``ArrayVm``, :class:`Recorder`.

    Both methods return normally on success and raise
    :class:`~memslots.errors.MemslotError` (an :class:`OSError` with ``.errno``) on failure.
    """

    def set_user_memory_region(
        self,
        slot: int,
        flags: int,
        guest_phys_addr: int,
        memory_size: int,
        userspace_addr: int,
    ) -> object:
        """``KVM_SET_USER_MEMORY_REGION``."""
        ...

    def set_user_memory_region2(
        self,
        slot: int,
        flags: int,
        guest_phys_addr: int,
        memory_size: int,
        userspace_addr: int,
        guest_memfd_offset: int = 0,
        guest_memfd: int = 0,
    ) -> object:
        """``KVM_SET_USER_MEMORY_REGION2``."""
        ...


# --------------------------------------------------------------------------- errors


class TraceFormatError(ValueError):
    """A line of a trace that should be a memslot call but cannot be read.

    ``.source`` is the file (or other label), ``.line`` the 1-based line number (0 when the
    error is about the whole input) and ``.message`` the reason; ``str()`` is the single line
    ``FILE:LINE: message``.
    """

    def __init__(self, source: str, line: int, message: str) -> None:
        self.source = source
        self.line = line
        self.message = message
        where = f"{source}:{line}" if line else source
        super().__init__(f"{where}: {message}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.source, self.line, self.message))


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
    match = re.fullmatch(r"ERRNO_(\d+)", text)
    if match and 0 < int(match.group(1)) <= _MAX_ERRNO:
        return int(match.group(1))
    raise ValueError(f"unknown errno name {text!r}")


class _LineError(Exception):
    """Internal: a field of the current line is bad (line and source are added later)."""


def _check_range(name: str, value: int, limit: int) -> int:
    if not 0 <= value <= limit:
        width = "u32" if limit == U32_MAX else "u64" if limit == U64_MAX else f"0..{limit}"
        raise _LineError(f"{name}={value} is out of range ({width})")
    return value


def _int(name: str, text: str, limit: int) -> int:
    """A number as QEMU or strace print it: ``0x``-hex or decimal."""
    try:
        value = int(text, 16) if text[:2] in ("0x", "0X") else int(text, 10)
    except ValueError:
        raise _LineError(f"{name}: {text!r} is not a number") from None
    return _check_range(name, value, limit)


class _Reader:
    """Shared error handling of the three readers."""

    def __init__(self, source: str, skip_bad: bool, errors: list[TraceFormatError] | None) -> None:
        self.source = source
        self.skip_bad = skip_bad
        self.errors = errors

    def bad(self, line: int, message: str) -> None:
        """Raise, or (with ``skip_bad``) note, a malformed line."""
        error = TraceFormatError(self.source, line, message)
        if not self.skip_bad:
            raise error
        if self.errors is not None:
            self.errors.append(error)


# --------------------------------------------------------------------------- QEMU

_QEMU_EVENT = re.compile(r"(?:^|(?<=[\s:]))kvm_set_user_memory(?:\s+(?P<body>.*)|\s*)$")
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


def _parse_qemu_body(body: str, line: int, source: str) -> MemslotCall:
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
            raise _LineError(f"{name}={match[name]} is not 0x-hex")
    flags = _int("flags", match["flags"], U32_MAX)
    try:
        ret = int(match["ret"], 10)
    except ValueError:
        raise _LineError(f"ret={match['ret']} is not a number") from None
    if not -_MAX_ERRNO <= ret <= 0:
        raise _LineError(f"ret={ret} is neither 0 nor a negative errno")
    gmem_fd = gmem_off = 0
    v2 = False
    if match["gmem_fd"] is not None:
        try:
            fd = int(match["gmem_fd"], 10)
        except ValueError:
            raise _LineError(f"guest_memfd={match['gmem_fd']} is not a number") from None
        # QEMU prints -1 for "no guest_memfd"; the kernel ignores the field then
        gmem_fd = 0 if fd == -1 else _check_range("guest_memfd", fd, U32_MAX)
        gmem_off = _int("guest_memfd_offset", match["gmem_off"], U64_MAX)
        # QEMU 9 uses REGION2 whenever the host supports guest_memfd; only a slot with
        # KVM_MEM_GUEST_MEMFD certainly needs it (REGION rejects the flag)
        v2 = bool(flags & KVM_MEM_GUEST_MEMFD)
    return MemslotCall(
        slot=slot,
        flags=flags,
        guest_phys_addr=_int("gpa", match["gpa"], U64_MAX),
        memory_size=_int("size", match["size"], U64_MAX),
        userspace_addr=_int("ua", match["ua"], U64_MAX),
        result=-ret,
        guest_memfd_offset=gmem_off,
        guest_memfd=gmem_fd,
        v2=v2,
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
    ``result=22``. A ``kvm_set_user_memory`` line that does not parse, or has a number out of
    its field's range, raises :class:`TraceFormatError` (or, with ``skip_bad``, is skipped
    and appended to ``errors`` when given). O(1) per line.
    """
    reader = _Reader(source, skip_bad, errors)
    for number, raw in enumerate(lines, 1):
        if "kvm_set_user_memory" not in raw:
            continue
        event = _QEMU_EVENT.search(raw.rstrip("\r\n"))
        if event is None:
            continue  # e.g. kvm_set_user_memory_region in some other message
        try:
            yield _parse_qemu_body(event["body"] or "", number, source)
        except _LineError as exc:
            reader.bad(number, str(exc))


# --------------------------------------------------------------------------- strace

_V1_REQUESTS: Final = ("KVM_SET_USER_MEMORY_REGION", "0x4020ae46")
_V2_REQUESTS: Final = ("KVM_SET_USER_MEMORY_REGION2", "0x40a0ae49")
_STRACE_CALL = re.compile(
    r"(?:^|(?<=[\s\]]))ioctl\((?P<fd>[^,()]*),\s*"
    r"(?:0x[0-9a-fA-F]+\s*/\*\s*)?(?P<request>KVM_SET_USER_MEMORY_REGION2?|0x4020ae46|0x40a0ae49)"
    r"(?:\s*\*/)?\s*,\s*(?P<rest>.*)$"
)
_STRACE_RESUMED = re.compile(r"<\.\.\.\s+ioctl\s+resumed>\s*(?P<rest>.*)$")
_STRACE_PID = re.compile(r"^\s*(?:\[pid\s+(?P<bracketed>\d+)\]|(?P<bare>\d+)\s)")
_STRACE_RETURN = re.compile(
    r"\)\s*=\s*(?P<ret>-?\d+|\?)"
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
            raise _LineError(f"flags: unknown flag {token!r}")
    return _check_range("flags", value, U32_MAX)


def _strace_struct(request: str, rest: str) -> tuple[dict[str, int], str]:
    """Parse ``{slot=..., ...}`` at the start of ``rest``; return the fields and the text
    after the closing brace."""
    v2 = request in _V2_REQUESTS
    name = _V2_REQUESTS[0] if v2 else _V1_REQUESTS[0]
    if not rest.startswith("{"):
        raise _LineError(
            f"{name} argument was not decoded by strace ({rest.split(')')[0].strip()!r});"
            " the call cannot be replayed"
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
            raise _LineError(f"{name} argument: cannot read {part!r}")
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


def _strace_result(text: str) -> int | None:
    """The result of ``) = 0 <0.0001>`` / ``) = -1 EEXIST (File exists)`` / ``) = ?``."""
    match = _STRACE_RETURN.match(text.strip())
    if match is None:
        raise _LineError(f"cannot read the return value in {text.strip()!r}")
    if match["ret"] == "?":
        return None
    ret = int(match["ret"])
    if ret == 0:
        return 0
    if ret != -1:
        raise _LineError(f"return value {ret} is neither 0 nor -1")
    if not match["name"]:
        raise _LineError("return value -1 without an errno name")
    try:
        return parse_errno(match["name"])
    except ValueError as exc:
        raise _LineError(str(exc)) from None


def _strace_pid(line: str) -> int | None:
    match = _STRACE_PID.match(line)
    if match is None:
        return None
    return int(match["bracketed"] or match["bare"])


def read_strace(
    lines: Iterable[str],
    source: str = "<strace>",
    *,
    skip_bad: bool = False,
    errors: list[TraceFormatError] | None = None,
) -> Iterator[MemslotCall]:
    """Yield the memslot calls of ``strace`` output, in the order they returned.

    Reads ``ioctl(FD, KVM_SET_USER_MEMORY_REGION, {...}) = RET`` lines with or without
    ``-f`` pids (``PID `` or ``[pid PID] ``), timestamps (``-t``, ``-tt``, ``-ttt``, ``-r``),
    ``-T`` durations, ``-y`` fd paths and ``-X verbose``/``raw`` constants. A call split
    into ``<unfinished ...>`` and ``<... ioctl resumed>`` lines (matched by pid) is yielded
    when it resumes, with the line number where it started; one still unfinished at the end
    is yielded last with ``result=None``. ``KVM_SET_USER_MEMORY_REGION2`` lines are read if
    their struct is decoded (same field names plus ``guest_memfd_offset`` and
    ``guest_memfd``); strace versions that print only its address give an error, as does
    any memslot ioctl that does not parse. Errors raise :class:`TraceFormatError` unless
    ``skip_bad`` (then they are skipped and appended to ``errors`` when given). O(1) per line.
    """
    reader = _Reader(source, skip_bad, errors)
    pending: dict[int | None, MemslotCall] = {}
    for number, raw in enumerate(lines, 1):
        if "ioctl" not in raw:
            continue
        text = raw.rstrip("\r\n")
        try:
            call_match = _STRACE_CALL.search(text)
            if call_match is None:
                resumed = _STRACE_RESUMED.search(text)
                if resumed is None:
                    continue
                pid = _strace_pid(text)
                started = pending.pop(pid, None)
                if started is None:
                    continue  # the end of some other ioctl
                result = _strace_result(resumed["rest"])
                yield dataclasses.replace(started, result=result)
                continue
            request = call_match["request"]
            fields, after = _strace_struct(request, call_match["rest"])
            call = MemslotCall(
                slot=fields["slot"],
                flags=fields["flags"],
                guest_phys_addr=fields["guest_phys_addr"],
                memory_size=fields["memory_size"],
                userspace_addr=fields["userspace_addr"],
                guest_memfd_offset=fields.get("guest_memfd_offset", 0),
                guest_memfd=fields.get("guest_memfd", 0),
                v2=request in _V2_REQUESTS,
                line=number,
                source=source,
            )
            if after.strip() == _UNFINISHED:
                pid = _strace_pid(text)
                if pid in pending:
                    reader.bad(pending[pid].line, "unfinished ioctl never resumed")
                pending[pid] = call
                continue
            yield dataclasses.replace(call, result=_strace_result(after))
        except _LineError as exc:
            reader.bad(number, str(exc))
    # calls still in flight when the trace ended (a killed process): result unknown
    yield from sorted(pending.values(), key=lambda call: call.line)


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


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _LineError(f"key {key!r} given twice")
        result[key] = value
    return result


def _json_int(key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise _LineError(f"{key} must be an integer, not {json.dumps(value)}")
    if isinstance(value, str):
        if not re.fullmatch(r"0[xX][0-9a-fA-F]+|[0-9]+", value):
            raise _LineError(f"{key} must be an integer, not {json.dumps(value)}")
        value = int(value, 0) if value[:2] in ("0x", "0X") else int(value, 10)
    return _check_range(key, value, _JSON_LIMITS[key])


def _json_result(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            return parse_errno(value)
        except ValueError:
            raise _LineError(f"result: unknown errno name {json.dumps(value)}") from None
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_ERRNO:
        return value
    raise _LineError(
        f"result must be 0, a positive errno or an errno name, not {json.dumps(value)}"
    )


def _parse_json_line(text: str, line: int, source: str) -> MemslotCall:
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as exc:
        raise _LineError(f"bad JSON: {exc.msg} at column {exc.colno}") from None
    if not isinstance(obj, dict):
        raise _LineError("expected a JSON object")
    unknown = sorted(set(obj) - _JSON_KEYS)
    if unknown:
        raise _LineError(f"unknown key {unknown[0]!r}")
    missing = [key for key in _JSON_REQUIRED if key not in obj]
    if missing:
        raise _LineError(f"missing {', '.join(missing)}")
    v2 = obj.get("v2", False)
    if not isinstance(v2, bool):
        raise _LineError(f"v2 must be true or false, not {json.dumps(v2)}")
    return MemslotCall(
        slot=_json_int("slot", obj["slot"]),
        flags=_json_int("flags", obj["flags"]),
        guest_phys_addr=_json_int("guest_phys_addr", obj["guest_phys_addr"]),
        memory_size=_json_int("memory_size", obj["memory_size"]),
        userspace_addr=_json_int("userspace_addr", obj["userspace_addr"]),
        result=_json_result(obj.get("result")),
        guest_memfd_offset=_json_int("guest_memfd_offset", obj.get("guest_memfd_offset", 0)),
        guest_memfd=_json_int("guest_memfd", obj.get("guest_memfd", 0)),
        v2=v2,
        line=line,
        source=source,
    )


def read_jsonl(
    lines: Iterable[str],
    source: str = "<jsonl>",
    *,
    skip_bad: bool = False,
    errors: list[TraceFormatError] | None = None,
) -> Iterator[MemslotCall]:
    """Yield the calls of the project's JSON Lines format, in order.

    Each non-blank line not starting with ``#`` must be one JSON object with the integer
    keys ``slot``, ``flags``, ``guest_phys_addr``, ``memory_size``, ``userspace_addr``
    (a ``"0x..."`` string is accepted for any of them) and optionally ``result`` (0, a
    positive errno, an errno name such as ``"EEXIST"``, ``"OK"`` or null),
    ``guest_memfd_offset``, ``guest_memfd`` and ``v2`` (true for REGION2). Bad JSON, unknown
    or missing keys and out-of-range numbers raise :class:`TraceFormatError` (or, with
    ``skip_bad``, are skipped and appended to ``errors`` when given). O(1) per line.
    """
    reader = _Reader(source, skip_bad, errors)
    for number, raw in enumerate(lines, 1):
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        try:
            yield _parse_json_line(text, number, source)
        except _LineError as exc:
            reader.bad(number, str(exc))


def call_to_json(call: MemslotCall) -> str:
    """One JSON Lines line (no newline) for ``call``; :func:`read_jsonl` reads it back equal.

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
        name = errno_name(call.result)
        obj["result"] = 0 if call.result == 0 else name if name.startswith("E") else call.result
    if call.v2 or call.guest_memfd_offset or call.guest_memfd:
        obj["guest_memfd_offset"] = call.guest_memfd_offset
        obj["guest_memfd"] = call.guest_memfd
    if call.v2:
        obj["v2"] = True
    return json.dumps(obj)


def write_jsonl(calls: Iterable[MemslotCall], fp: IO[str], *, header: str | None = None) -> int:
    """Write ``calls`` to the text file ``fp`` as JSON Lines; return how many were written.

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


# --------------------------------------------------------------------------- any format

_DETECT_QEMU = re.compile(r"(?:^|(?<=[\s:]))kvm_set_user_memory(?:\s|$)")
_DETECT_STRACE = re.compile(
    r"(?:^|(?<=[\s\]]))ioctl\([^,()]*,\s*(?:0x[0-9a-fA-F]+\s*/\*\s*)?"
    r"(?:KVM_SET_USER_MEMORY_REGION2?\b|0x4020ae46\b|0x40a0ae49\b)"
)

StrPath = str | os.PathLike[str]


def _detect_in(lines: Iterable[str]) -> TraceFormat | None:
    """The format of the first line that tells; ``"jsonl"`` when nothing but blank and
    comment lines; None when no line tells."""
    only_comments = True
    for raw in lines:
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        if text.startswith("{"):
            return "jsonl"
        only_comments = False
        if _DETECT_QEMU.search(text):
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


def detect_format(
    path_or_first_lines: StrPath | Traversable | Iterable[str], source: str | None = None
) -> TraceFormat:
    """Which format a trace is in, by content: ``"qemu"``, ``"strace"`` or ``"jsonl"``.

    Takes a path (a ``str`` is always a path) or the lines themselves, and reads only up to
    the first line that tells: a ``kvm_set_user_memory`` trace event, a memslot ``ioctl(``
    of strace, or a line that starts with ``{`` (JSON Lines); blank and ``#`` lines do not tell.
    Input with no such line, only blank and comment lines, counts as (empty) JSON Lines.
    Raises :class:`TraceFormatError` (line 0) when no line tells, OSError when the file
    cannot be read. O(lines read).
    """
    if isinstance(path_or_first_lines, str | os.PathLike | Traversable):
        label = source or _name(path_or_first_lines)
        with _open(path_or_first_lines) as fp:
            fmt = _detect_in(fp)
    else:
        label = source or "<trace>"
        fmt = _detect_in(path_or_first_lines)
    if fmt is None:
        raise TraceFormatError(
            label,
            0,
            "not a memslot trace: no QEMU kvm_set_user_memory line, no strace"
            " KVM_SET_USER_MEMORY_REGION ioctl and no JSON Lines object found",
        )
    return fmt


def parse_trace(
    lines: Iterable[str],
    source: str = "<trace>",
    *,
    fmt: TraceFormat | None = None,
    skip_bad: bool = False,
    errors: list[TraceFormatError] | None = None,
) -> list[MemslotCall]:
    """All calls of ``lines`` (text already in memory, or ``sys.stdin``), in the format
    ``fmt`` or, when None, the one :func:`detect_format` finds. Errors as in the readers.
    O(n).
    """
    seq: Sequence[str] = lines if isinstance(lines, Sequence) else list(lines)
    if fmt is None:
        fmt = detect_format(seq, source)
    readers = {"qemu": read_qemu_log, "strace": read_strace, "jsonl": read_jsonl}
    if fmt not in readers:
        raise ValueError(f"unknown trace format {fmt!r} (one of {', '.join(FORMATS)})")
    return list(readers[fmt](seq, source, skip_bad=skip_bad, errors=errors))


def read_trace(
    path: StrPath | Traversable,
    *,
    fmt: TraceFormat | None = None,
    skip_bad: bool = False,
    errors: list[TraceFormatError] | None = None,
    source: str | None = None,
) -> list[MemslotCall]:
    """All calls of the trace file ``path``, in the format ``fmt`` or, when None, the one
    its content shows (:func:`detect_format`). ``source`` (default: the path) names the
    file in errors and in each call's ``.source``. Raises :class:`TraceFormatError` for a
    malformed line (unless ``skip_bad``) or an unrecognisable file, OSError when it cannot
    be read. O(n).
    """
    label = source or _name(path)
    with _open(path) as fp:
        lines = fp.readlines()
    return parse_trace(lines, label, fmt=fmt, skip_bad=skip_bad, errors=errors)


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
