"""Random conformance runs: the engine checked against ``/dev/kvm`` call by call, with a
minimal reproducer for every disagreement (``memslots conform``).

How a run works
---------------
:func:`run_conform` draws random operations (:class:`OpGenerator`) and runs each on a
:class:`~memslots.kvm.KvmVm` in non-strict mode (:class:`Session`). ``KvmVm`` sends every
call to the kernel and to the engine and records each call the two answered differently
(an errno, a dirty bitmap, or an engine that raised) in ``vm.disagreements``. The generator
looks at the engine's slot table before each operation, so most operations touch slots
that exist: creates (often overlapping), deletes, moves, flag changes, no-ops, invalid
requests of every kind (each validation rule broken alone and two at a time, to check the
kernel's order), guest_memfd binds good and bad, dirty-log GET and CLEAR with valid and
invalid arguments, and manual-protect enables. VMs are replaced every few hundred
operations (and after any disagreement, since the two states may then differ), so the slot
count stays what a VMM has: tens of slots, up to 32763 as an id.

After the run each distinct disagreement (same operation kind, same kernel and engine
answers) is shrunk: :func:`ddmin` (delta debugging) removes operations from the sequence
that led to it, replaying every candidate on a fresh VM, until no single operation can be
left out. The reproducer is that minimal sequence with the kernel's answer to each step.

Operations and their JSON Lines form
------------------------------------
Memslot calls are :class:`memslots.tools.traces.MemslotCall` objects, written with
:func:`memslots.tools.traces.call_to_json` (so a reproducer made only of memslot calls is a trace
``memslots replay`` reads)::

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
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, TypeVar

from memslots.constants import (
    KVM_DIRTY_LOG_INITIALLY_SET,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
    KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_MAX_NR_PAGES,
    KVM_MEM_READONLY,
    PAGE_SHIFT,
    PAGE_SIZE,
    U32_MAX,
    U64_MAX,
    X86_TASK_SIZE_MAX,
)
from memslots.dirty_log import dirty_bitmap_bytes
from memslots.errors import MemslotError, errno_name
from memslots.kvm.abi import KVM_DEV_PATH
from memslots.kvm.vm import ENGINE_RAISED, Disagreement, KvmVm, probe_max_gfn
from memslots.slot import Memslot
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
    "ConformReport",
    "CreateGuestMemfd",
    "EnableManualDirtyLogProtect",
    "Finding",
    "GetDirtyLog",
    "Op",
    "OpGenerator",
    "OpenDevNull",
    "Session",
    "Signature",
    "ddmin",
    "is_compared",
    "op_kind",
    "op_to_json",
    "read_ops",
    "replay_ops",
    "reproduce",
    "run_conform",
    "shrink",
    "signature",
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

_PAGE_MASK: Final = PAGE_SIZE - 1
#: generated hvas: unmapped, legal user addresses (the kernel does not check the mapping)
_HVA_BASE: Final = 0x7F00_0000_0000


# ======================================================================================
# Operations
# ======================================================================================
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


# ======================================================================================
# Running operations
# ======================================================================================
VmFactory = Callable[..., KvmVm]


class Session:
    """A fresh :class:`KvmVm` and the files that operations name by alias.

    ``Session(strict=False, path="/dev/kvm", vm_factory=KvmVm)``; use it as a context
    manager (:meth:`close` closes the VM, then the aliased files). ``vm_factory`` lets
    tests plant a bug in the engine (a ``KvmVm`` subclass).
    """

    def __init__(
        self, *, strict: bool = False, path: str = KVM_DEV_PATH, vm_factory: VmFactory = KvmVm
    ) -> None:
        self.vm = vm_factory(strict=strict, path=path)
        self._fds: dict[int, int] = {}

    def fd(self, alias: int) -> int:
        """The real descriptor of ``alias``, or ``alias`` itself if it names nothing."""
        return self._fds.get(alias, alias)

    def _close_alias(self, alias: int) -> None:
        fd = self._fds.pop(alias, None)
        if fd is not None:
            os.close(fd)

    def run(self, op: Op) -> int:
        """Run ``op``; return the kernel's errno (0 for success). In a strict session an
        engine that disagrees raises :class:`~memslots.kvm.ConformanceError`. Cost: one
        kernel call and its mirror."""
        vm = self.vm
        try:
            if isinstance(op, MemslotCall):
                if op.v2:
                    vm.set_user_memory_region2(
                        op.slot,
                        op.flags,
                        op.guest_phys_addr,
                        op.memory_size,
                        op.userspace_addr,
                        op.guest_memfd_offset,
                        self.fd(op.guest_memfd),
                    )
                else:
                    vm.set_user_memory_region(
                        op.slot, op.flags, op.guest_phys_addr, op.memory_size, op.userspace_addr
                    )
            elif isinstance(op, GetDirtyLog):
                vm.get_dirty_log(op.slot)
            elif isinstance(op, ClearDirtyLog):
                vm.clear_dirty_log(op.slot, op.first_page, op.num_pages, op.bitmap)
            elif isinstance(op, EnableManualDirtyLogProtect):
                vm.enable_manual_dirty_log_protect(op.flags)
            elif isinstance(op, CreateGuestMemfd):
                fd = vm.create_guest_memfd(op.size, op.flags)
                self._close_alias(op.fd)
                self._fds[op.fd] = fd
            elif isinstance(op, OpenDevNull):
                fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
                self._close_alias(op.fd)
                self._fds[op.fd] = fd
            else:
                self._close_alias(op.fd)
        except MemslotError as exc:
            return exc.errno or 0
        return 0

    def close(self) -> None:
        """Close the VM, then every aliased file. Idempotent."""
        self.vm.close()
        for alias in list(self._fds):
            self._close_alias(alias)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def replay_ops(
    ops: Iterable[Op], *, path: str = KVM_DEV_PATH, vm_factory: VmFactory = KvmVm
) -> tuple[list[Op], list[tuple[int, Disagreement]]]:
    """Run ``ops`` on a fresh VM (non-strict). Returns the operations with the kernel's
    answers as their ``result``, and ``(index, disagreement)`` for every call the kernel
    and the engine answered differently. O(len(ops)) kernel calls."""
    done: list[Op] = []
    found: list[tuple[int, Disagreement]] = []
    with Session(path=path, vm_factory=vm_factory) as s:
        for i, op in enumerate(ops):
            before = len(s.vm.disagreements)
            done.append(with_result(op, s.run(op)))
            found.extend((i, d) for d in s.vm.disagreements[before:])
    return done, found


# ======================================================================================
# Shrinking
# ======================================================================================
T = TypeVar("T")


def ddmin(items: Sequence[T], test: Callable[[list[T]], bool], *, budget: int = 5000) -> list[T]:
    """Zeller's delta debugging: a subsequence of ``items`` for which ``test`` still holds
    and from which no single item can be removed (1-minimal), if ``budget`` tests
    suffice (else the smallest found so far). ``test(list(items))`` must hold.

    Tries removing each of ``n`` chunks (complements first: the usual win is dropping
    unrelated operations), then keeping single chunks, doubling ``n`` when neither
    works. O(len^2) tests in the worst case, O(k log len) when k items matter.
    """
    current = list(items)
    n = 2
    tests = 0
    while len(current) >= 2 and tests < budget:
        size = -(-len(current) // n)
        chunks = [current[i : i + size] for i in range(0, len(current), size)]
        reduced = False
        for i in range(len(chunks)):
            complement = [x for j, c in enumerate(chunks) if j != i for x in c]
            tests += 1
            if test(complement):
                current, n, reduced = complement, max(n - 1, 2), True
                break
        if not reduced and len(chunks) > 2:
            for chunk in chunks:
                tests += 1
                if test(chunk):
                    current, n, reduced = chunk, 2, True
                    break
        if not reduced:
            if n >= len(current):
                break
            n = min(2 * n, len(current))
    return current


Signature = tuple[str, int, int, str]


def signature(op: Op, d: Disagreement) -> Signature:
    """What makes two disagreements "the same": the operation kind, both answers and, for
    a difference in returned data or an engine that raised, the kind of difference."""
    kind = d.detail.split(":", 1)[0] if d.engine == ENGINE_RAISED or d.detail else ""
    return (op_kind(op), d.kernel, d.engine, kind)


def shrink(
    ops: Sequence[Op],
    sig: Signature,
    *,
    path: str = KVM_DEV_PATH,
    vm_factory: VmFactory = KvmVm,
    budget: int = 3000,
) -> list[Op]:
    """The smallest sequence :func:`ddmin` finds within ``ops`` that still makes the
    kernel and the engine disagree as ``sig`` says, each candidate replayed on a fresh VM.
    O(tests x len(ops)) kernel calls."""

    def reproduces(candidate: list[Op]) -> bool:
        with Session(path=path, vm_factory=vm_factory) as s:
            for op in candidate:
                before = len(s.vm.disagreements)
                s.run(op)
                if any(signature(op, d) == sig for d in s.vm.disagreements[before:]):
                    return True
        return False

    return ddmin(ops, reproduces, budget=budget)


# ======================================================================================
# The generator
# ======================================================================================
def _weighted(rng: random.Random, table: Sequence[tuple[T, float]]) -> T:
    return rng.choices([v for v, _ in table], [w for _, w in table])[0]


class OpGenerator:
    """Random operations for a conformance run, drawn with ``rng`` (a
    :class:`random.Random`: a seed gives the same run again).

    :meth:`prelude` gives the operations a fresh VM starts with (a guest_memfd and a file
    that is not one); :meth:`next` draws one operation from the VM's current slot table
    (the engine's, which agrees with the kernel while no disagreement has occurred).
    Slot ids come mostly from ``0 .. ids-1`` and gpas from the first ``gpa_pages`` pages,
    so creates and moves collide often. Sizes stay small (a few pages to a few thousand):
    the kernel allocates per-page metadata for every accepted slot, and an accepted slot
    of 2^31-1 pages would cost 16 GiB. O(slots) per operation.
    """

    KINDS: ClassVar[tuple[tuple[str, float], ...]] = (
        ("create", 16),
        ("delete", 7),
        ("move", 9),
        ("flags", 7),
        ("noop", 3),
        ("modify_bad", 4),
        ("invalid", 14),
        ("gmem", 6),
        ("gmem_cycle", 0.3),
        ("get", 12),
        ("clear", 12),
        ("manual", 3),
    )

    def __init__(
        self,
        rng: random.Random,
        *,
        max_gfn: int,
        max_user_slots: int = 32764,
        ids: int = 24,
        gpa_pages: int = 2048,
    ) -> None:
        self.rng = rng
        self.max_gfn = max_gfn
        self.max_user_slots = max_user_slots
        self.ids = ids
        self.gpa_pages = gpa_pages
        self._gmem_open = True

    # -- building blocks -------------------------------------------------------------
    def prelude(self) -> list[Op]:
        """What every VM of the run starts with."""
        self._gmem_open = True
        return [CreateGuestMemfd(GMEM_FD, GMEM_SIZE), OpenDevNull(OTHER_FD)]

    def _id(self) -> int:
        r = self.rng.random()
        if r < 0.02:
            return self.max_user_slots - 1
        return self.rng.randrange(self.ids)

    def _pages(self) -> int:
        rng = self.rng
        return _weighted(
            rng,
            (
                (rng.randint(1, 8), 50),
                (rng.randint(9, 64), 25),
                (rng.choice((64, 128, 192, 256)), 8),
                (rng.randint(65, 512), 15),
                (rng.randint(513, 4096), 2),
            ),
        )

    def _gpa(self) -> int:
        return self.rng.randrange(self.gpa_pages) << PAGE_SHIFT

    def _hva(self, npages: int) -> int:
        rng = self.rng
        r = rng.random()
        if r < 0.03:
            return 0
        if r < 0.05:
            return X86_TASK_SIZE_MAX - (npages << PAGE_SHIFT)  # ends exactly at the limit
        return _HVA_BASE + (rng.randrange(1 << 18) << PAGE_SHIFT)

    def _random_flags(self) -> int:
        return self.rng.choice((0, 0, 1, 1, 2, 3))

    def _call(
        self,
        slot: int,
        flags: int,
        gpa: int,
        size: int,
        hva: int,
        *,
        v2: bool | None = None,
        offset: int | None = None,
        fd: int | None = None,
    ) -> MemslotCall:
        rng = self.rng
        if v2 is None:
            v2 = rng.random() < 0.2
        if not v2:
            return MemslotCall(slot, flags, gpa, size, hva)
        if offset is None:  # ignored by the kernel without KVM_MEM_GUEST_MEMFD
            offset = rng.choice((0, 0, 1, rng.randrange(1 << 40)))
        if fd is None:
            fd = rng.choice((0, 0, GMEM_FD, OTHER_FD, CLOSED_FD))
        return MemslotCall(
            slot, flags, gpa, size, hva, guest_memfd_offset=offset, guest_memfd=fd, v2=True
        )

    @staticmethod
    def _size(s: Memslot) -> int:
        return s.npages << PAGE_SHIFT

    # -- the operation kinds ---------------------------------------------------------
    def next(self, slots: Sequence[Memslot]) -> Op:
        """One random operation, given the VM's current slots."""
        rng = self.rng
        kind = _weighted(rng, self.KINDS)
        plain = [s for s in slots if not s.flags & KVM_MEM_GUEST_MEMFD]
        if kind in ("delete", "move", "flags", "noop", "modify_bad") and not plain:
            kind = "create"
        method: Callable[[Sequence[Memslot], Sequence[Memslot]], Op] = getattr(self, f"_op_{kind}")
        return method(slots, plain)

    def _op_create(self, slots: Sequence[Memslot], plain: Sequence[Memslot]) -> Op:
        used = {s.id for s in slots}
        free = [i for i in range(self.ids) if i not in used]
        rng = self.rng
        id_ = rng.choice(free) if free and rng.random() < 0.85 else self._id()
        return self._new_call(id_, self._pages())

    def _new_call(self, id_: int, npages: int) -> MemslotCall:
        return self._call(
            id_, self._random_flags(), self._gpa(), npages << PAGE_SHIFT, self._hva(npages)
        )

    def _op_delete(self, slots: Sequence[Memslot], plain: Sequence[Memslot]) -> Op:
        rng = self.rng
        s = rng.choice(slots)
        # only memory_size 0 and the id matter; the rest must merely be legal
        return self._call(s.slot, self._random_flags(), self._gpa(), 0, self._hva(1))

    def _op_move(self, slots: Sequence[Memslot], plain: Sequence[Memslot]) -> Op:
        rng = self.rng
        s = rng.choice(plain)
        flags = s.flags ^ (KVM_MEM_LOG_DIRTY_PAGES if rng.random() < 0.3 else 0)
        gpa = self._gpa()
        if rng.random() < 0.3:  # a small step: overlaps its own old range
            step = rng.randint(-4, 4) << PAGE_SHIFT
            gpa = max(0, (s.base_gfn << PAGE_SHIFT) + step)
        return self._call(s.slot, flags, gpa, self._size(s), s.userspace_addr)

    def _op_flags(self, slots: Sequence[Memslot], plain: Sequence[Memslot]) -> Op:
        s = self.rng.choice(plain)
        return self._call(
            s.slot, s.flags ^ KVM_MEM_LOG_DIRTY_PAGES, s.base_gfn << PAGE_SHIFT, self._size(s),
            s.userspace_addr,
        )  # fmt: skip

    def _op_noop(self, slots: Sequence[Memslot], plain: Sequence[Memslot]) -> Op:
        s = self.rng.choice(plain)
        return self._call(
            s.slot, s.flags, s.base_gfn << PAGE_SHIFT, self._size(s), s.userspace_addr
        )

    def _op_modify_bad(self, slots: Sequence[Memslot], plain: Sequence[Memslot]) -> Op:
        rng = self.rng
        s = rng.choice(plain)
        gpa = s.base_gfn << PAGE_SHIFT if rng.random() < 0.5 else self._gpa()
        size, hva, flags = self._size(s), s.userspace_addr, s.flags
        what = rng.choice(("hva", "size", "readonly", "hva+size"))
        if "hva" in what:
            hva = self._hva(s.npages)
        if "size" in what:
            size = (s.npages + rng.choice((-1, 1, 7))) << PAGE_SHIFT
            size = size or PAGE_SIZE * 2
        if what == "readonly":
            flags ^= KVM_MEM_READONLY
        return self._call(s.slot, flags, gpa, size, hva)

    def _op_invalid(self, slots: Sequence[Memslot], plain: Sequence[Memslot]) -> Op:
        """A request (a create, a modify of an existing slot or a delete) with one or
        two validation rules broken."""
        rng = self.rng
        r = rng.random()
        if plain and r < 0.3:
            s = rng.choice(plain)
            call = self._call(s.slot, s.flags, self._gpa(), self._size(s), s.userspace_addr)
        elif slots and r < 0.45:
            s = rng.choice(slots)
            call = self._call(s.slot, self._random_flags(), self._gpa(), 0, self._hva(1))
        elif r < 0.6:  # a guest_memfd create: its own checks interleave with the others
            call = self._gmem_create(slots)
        else:
            call = self._new_call(self._id(), self._pages())
        for _ in range(1 if rng.random() < 0.75 else 2):
            call = self._break(call, slots)
        return call

    def _break(self, c: MemslotCall, slots: Sequence[Memslot]) -> MemslotCall:
        rng = self.rng
        rule = rng.choice(
            (
                "gpa", "size", "hva", "flag", "gmem_v1", "id", "as_id", "hva_end", "hva_last",
                "hva_kernel", "hva_noncanonical", "wrap", "max_pages", "max_gfn",
                "delete_missing",
            )
        )  # fmt: skip
        replace = dataclasses.replace
        npages = max(c.memory_size >> PAGE_SHIFT, 1)
        if rule == "gpa":
            return replace(c, guest_phys_addr=c.guest_phys_addr | rng.randint(1, _PAGE_MASK))
        if rule == "size":
            return replace(c, memory_size=c.memory_size + rng.randint(1, _PAGE_MASK))
        if rule == "hva":
            return replace(c, userspace_addr=c.userspace_addr | rng.choice((1, 8, 2048)))
        if rule == "flag":
            return replace(c, flags=c.flags | (1 << rng.randint(3, 31)))
        if rule == "gmem_v1":
            return replace(c, flags=c.flags | KVM_MEM_GUEST_MEMFD, v2=False)
        if rule == "id":
            bad = rng.choice(
                (self.max_user_slots, 32766, 32767, 0xFFFF, rng.randint(32764, 0xFFFF))
            )
            return replace(c, slot=(c.slot & ~0xFFFF) | bad)
        if rule == "as_id":
            return replace(c, slot=(rng.choice((1, 2, 0xFFFF)) << 16) | (c.slot & 0xFFFF))
        if rule == "hva_end":  # the range runs past the user address limit
            return replace(
                c,
                userspace_addr=X86_TASK_SIZE_MAX - (rng.randint(0, npages - 1) << PAGE_SHIFT),
                memory_size=npages << PAGE_SHIFT,
            )
        if rule == "hva_last":
            return replace(c, userspace_addr=X86_TASK_SIZE_MAX)
        if rule == "hva_kernel":
            return replace(c, userspace_addr=rng.choice((0xFFFF800000000000, 0xFFFFFFFFFFFFF000)))
        if rule == "hva_noncanonical":
            return replace(c, userspace_addr=rng.choice((1 << 47, 1 << 62)))
        if rule == "wrap":
            back = rng.randint(0, npages - 1) << PAGE_SHIFT
            return replace(
                c, guest_phys_addr=(1 << 64) - PAGE_SIZE - back, memory_size=npages << PAGE_SHIFT
            )
        if rule == "max_pages":
            return replace(
                c, memory_size=(KVM_MEM_MAX_NR_PAGES + rng.randint(1, 1 << 20)) << PAGE_SHIFT
            )
        if rule == "max_gfn":  # ends 1 .. 2^20 pages past the highest gfn
            last = self.max_gfn + rng.choice((1, 2, rng.randint(1, 1 << 20)))
            first = max(last - npages + 1, 0)
            return replace(
                c, guest_phys_addr=first << PAGE_SHIFT, memory_size=(last - first + 1) << PAGE_SHIFT
            )
        # delete of a slot that does not exist
        used = {s.id for s in slots}
        missing = [i for i in range(self.ids) if i not in used] or [self.ids]
        return replace(c, slot=(c.slot & ~0xFFFF) | rng.choice(missing), memory_size=0)

    def _op_gmem(self, slots: Sequence[Memslot], plain: Sequence[Memslot]) -> Op:
        rng = self.rng
        bound = [s for s in slots if s.flags & KVM_MEM_GUEST_MEMFD]
        r = rng.random()
        if bound and r < 0.2:  # guest_memfd slots can only be deleted
            s = rng.choice(bound)
            flags = rng.choice(
                (KVM_MEM_GUEST_MEMFD, 0, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_GUEST_MEMFD | 1)
            )
            gpa = s.base_gfn << PAGE_SHIFT if rng.random() < 0.5 else self._gpa()
            return self._call(s.slot, flags, gpa, self._size(s), s.userspace_addr, v2=True)
        if bound and r < 0.35:  # deletes: the offset is checked when the flag is given
            s = rng.choice(bound)
            flags = rng.choice((0, KVM_MEM_GUEST_MEMFD))
            offset = rng.choice((0, 0, 0, 1, PAGE_SIZE, 1 << 63, U64_MAX & ~_PAGE_MASK))
            return self._call(s.slot, flags, 0, 0, 0, v2=rng.random() < 0.7, offset=offset, fd=0)
        if plain and r < 0.42:  # the flag on a slot that has no binding
            s = rng.choice(plain)
            return self._call(
                s.slot, KVM_MEM_GUEST_MEMFD, s.base_gfn << PAGE_SHIFT, self._size(s),
                s.userspace_addr, v2=True, offset=0, fd=GMEM_FD,
            )  # fmt: skip
        return self._gmem_create(slots)

    def _gmem_create(self, slots: Sequence[Memslot]) -> MemslotCall:
        rng = self.rng
        used = {s.id for s in slots}
        free = [i for i in range(self.ids) if i not in used] or [self._id()]
        npages = rng.randint(1, 16)
        offset = _weighted(
            rng,
            (
                (rng.randrange(GMEM_SIZE >> PAGE_SHIFT) << PAGE_SHIFT, 80),
                (rng.randint(1, _PAGE_MASK), 5),
                (GMEM_SIZE, 4),
                (1 << 63, 3),
                (U64_MAX & ~_PAGE_MASK, 3),
            ),
        )
        fd = _weighted(rng, ((GMEM_FD, 80), (OTHER_FD, 7), (CLOSED_FD, 7), (0, 3), (1 << 31, 1)))
        flags = _weighted(
            rng,
            (
                (KVM_MEM_GUEST_MEMFD, 90),
                (KVM_MEM_GUEST_MEMFD | KVM_MEM_LOG_DIRTY_PAGES, 5),
                (KVM_MEM_GUEST_MEMFD | KVM_MEM_READONLY, 5),
            ),
        )
        return self._call(
            rng.choice(free), flags, self._gpa(), npages << PAGE_SHIFT, self._hva(npages),
            v2=True, offset=offset, fd=fd,
        )  # fmt: skip

    def _op_gmem_cycle(self, slots: Sequence[Memslot], plain: Sequence[Memslot]) -> Op:
        self._gmem_open = not self._gmem_open
        return CreateGuestMemfd(GMEM_FD, GMEM_SIZE) if self._gmem_open else CloseFd(GMEM_FD)

    def _dirty_slot(self, slots: Sequence[Memslot]) -> tuple[int, Memslot | None]:
        rng = self.rng
        logging = [s for s in slots if s.flags & KVM_MEM_LOG_DIRTY_PAGES]
        r = rng.random()
        if logging and r < 0.7:
            s = rng.choice(logging)
            return s.slot, s
        if slots and r < 0.8:
            s = rng.choice(slots)
            return s.slot, s
        if r < 0.9:
            used = {s.id for s in slots}
            return next(i for i in range(self.ids + 1) if i not in used), None
        bad = rng.choice((self.max_user_slots, 32766, 0xFFFF, 1 << 16, (1 << 16) | 1, U32_MAX))
        return bad, None

    def _op_get(self, slots: Sequence[Memslot], plain: Sequence[Memslot]) -> Op:
        return GetDirtyLog(self._dirty_slot(slots)[0])

    def _op_clear(self, slots: Sequence[Memslot], plain: Sequence[Memslot]) -> Op:
        rng = self.rng
        slot, s = self._dirty_slot(slots)
        n = s.npages if s is not None else rng.choice((64, 100))
        first = _weighted(
            rng,
            (
                (rng.randrange(0, n + 1, 64) if n >= 64 else 0, 65),
                (n, 5),
                (rng.randrange(0, n + 1, 64) | rng.randint(1, 63), 10),
                (((n + 63) // 64 + 1) * 64, 8),
                (1 << 63, 2),
                (0, 10),
            ),
        )
        rest = max(n - first, 0)
        num = _weighted(
            rng,
            (
                (rest, 30),
                (rest // 64 * 64, 20),
                (rng.randrange(0, rest + 1, 64) if rest >= 64 else 0, 10),
                (0, 8),
                (rng.randint(0, rest) if rest else 1, 15),
                (rest + rng.randint(1, 64), 10),
                (U32_MAX, 2),
            ),
        )
        nbytes = dirty_bitmap_bytes(num) if num <= 1 << 16 else 0
        bitmap = _weighted(
            rng,
            (
                (rng.randbytes(nbytes), 70),
                (b"\xff" * nbytes, 15),
                (rng.randbytes(max(nbytes - 8, 0)), 10),
                (b"", 5),
            ),
        )
        return ClearDirtyLog(slot, first, num, bitmap)

    def _op_manual(self, slots: Sequence[Memslot], plain: Sequence[Memslot]) -> Op:
        enable, init = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_DIRTY_LOG_INITIALLY_SET
        flags = _weighted(
            self.rng,
            ((enable | init, 35), (enable, 25), (0, 25), (init, 5), (4, 4), (5, 3), (1 << 63, 3)),
        )
        return EnableManualDirtyLogProtect(flags)


# ======================================================================================
# The run
# ======================================================================================
@dataclass
class Finding:
    """One kind of disagreement (one :func:`signature`) met during a run."""

    #: the first disagreement of this kind
    disagreement: Disagreement
    sig: Signature
    #: the operations of that VM, up to and including the one that disagreed
    ops: list[Op]
    #: how many calls disagreed this way
    count: int = 1
    #: the shrunk sequence with the kernel's answers, once :func:`run_conform` shrank it
    reproducer: list[Op] | None = None
    #: False if replaying ``ops`` on a fresh VM did not disagree again (not shrunk)
    reproducible: bool = True

    def to_json(self) -> dict[str, Any]:
        """The finding as a JSON-ready dict (answers as errno names)."""
        d = self.disagreement
        return {
            "call": d.call,
            "kernel": errno_name(d.kernel),
            "engine": "raised" if d.engine == ENGINE_RAISED else errno_name(d.engine),
            "detail": d.detail,
            "count": self.count,
            "operations": len(self.ops),
            "reproducible": self.reproducible,
            "reproducer": None
            if self.reproducer is None
            else [json.loads(op_to_json(op)) for op in self.reproducer],
        }


@dataclass
class ConformReport:
    """What :func:`run_conform` found."""

    seed: int
    #: operations run (compared calls plus fd set-up operations)
    operations: int = 0
    #: calls answered by both the kernel and the engine
    calls: int = 0
    #: calls the two answered differently
    disagreeing_calls: int = 0
    #: ioctls made through the VMs (mirrored calls and set-up)
    kernel_calls: int = 0
    vms: int = 0
    seconds: float = 0.0
    shrink_seconds: float = 0.0
    findings: list[Finding] = field(default_factory=list)

    @property
    def agreed(self) -> int:
        """Calls both answered the same way."""
        return self.calls - self.disagreeing_calls

    @property
    def agreement(self) -> float:
        """``agreed / calls`` (1.0 for no calls)."""
        return self.agreed / self.calls if self.calls else 1.0

    def to_json(self) -> dict[str, Any]:
        """The report as a JSON-ready dict."""
        return {
            "seed": self.seed,
            "operations": self.operations,
            "calls": self.calls,
            "agreed": self.agreed,
            "agreement": self.agreement,
            "disagreeing_calls": self.disagreeing_calls,
            "kernel_calls": self.kernel_calls,
            "vms": self.vms,
            "seconds": round(self.seconds, 3),
            "shrink_seconds": round(self.shrink_seconds, 3),
            "disagreements": [f.to_json() for f in self.findings],
        }


def reproduce(
    ops: Sequence[Op], sig: Signature, *, path: str = KVM_DEV_PATH, vm_factory: VmFactory = KvmVm
) -> list[Op] | None:
    """Shrink ``ops`` to a minimal sequence that disagrees as ``sig`` says and return it
    with the kernel's answers; None if ``ops`` itself does not disagree that way again
    on a fresh VM. Cost: :func:`shrink`."""
    small = shrink(ops, sig, path=path, vm_factory=vm_factory)
    done, found = replay_ops(small, path=path, vm_factory=vm_factory)
    if not any(signature(small[i], d) == sig for i, d in found):
        return None
    return done


def run_conform(
    ops: int,
    seed: int,
    *,
    path: str = KVM_DEV_PATH,
    vm_factory: VmFactory = KvmVm,
    segment: tuple[int, int] = (100, 600),
    progress: Callable[[int, int], None] | None = None,
    shrink_findings: bool = True,
    max_reproducers: int = 10,
    on_shrink: Callable[[int, int], None] | None = None,
) -> ConformReport:
    """Run ``ops`` random operations (seeded by ``seed``) against the kernel and the
    engine, on a new VM every ``segment`` operations (a random length in that range;
    most VMs use slot ids below 24 in an 8 MiB gpa range, one in five ids below 400 in
    a 256 MiB one) and after every disagreement. ``progress(done, disagreeing_calls)``
    is called after each operation. Then, unless ``shrink_findings`` is False, shrink
    the first ``max_reproducers`` kinds of disagreement (``on_shrink(i, n)`` before
    each).

    O(ops) kernel calls for the run, plus the shrinking's (see :func:`shrink`).
    """
    rng = random.Random(seed)
    gen = OpGenerator(rng, max_gfn=probe_max_gfn(path))
    report = ConformReport(seed)
    by_sig: dict[Signature, Finding] = {}
    start = time.perf_counter()
    while report.operations < ops:
        length = min(rng.randint(*segment), ops - report.operations)
        # most VMs keep tens of slots in a small gpa range (many collisions); some spread
        # hundreds of slots over a wider one (deeper trees, fewer collisions)
        gen.ids, gen.gpa_pages = (24, 2048) if rng.random() < 0.8 else (400, 1 << 16)
        with Session(path=path, vm_factory=vm_factory) as s:
            vm = s.vm
            report.vms += 1
            history = gen.prelude()
            for op in history:
                s.run(op)
            clean = True
            for _ in range(length):
                op = gen.next(vm.slots())
                history.append(op)
                before = len(vm.disagreements)
                s.run(op)
                report.operations += 1
                report.calls += is_compared(op)
                new = vm.disagreements[before:]
                if new:
                    report.disagreeing_calls += 1
                    for d in new:
                        sig = signature(op, d)
                        if sig in by_sig:
                            by_sig[sig].count += 1
                        else:
                            by_sig[sig] = Finding(d, sig, list(history))
                if progress is not None:
                    progress(report.operations, report.disagreeing_calls)
                if new:  # the two states may differ from here on: start afresh
                    clean = False
                    break
            if clean:
                try:
                    vm.check_invariants()
                except AssertionError as exc:
                    d = Disagreement(
                        "check_invariants()", 0, ENGINE_RAISED, f"AssertionError: {exc}"
                    )
                    sig = ("check_invariants", 0, ENGINE_RAISED, "AssertionError")
                    by_sig.setdefault(sig, Finding(d, sig, list(history), reproducible=False))
            report.kernel_calls += vm.kernel_calls
    report.seconds = time.perf_counter() - start
    report.findings = list(by_sig.values())
    if shrink_findings:
        t0 = time.perf_counter()
        todo = [f for f in report.findings if f.reproducible][:max_reproducers]
        for i, f in enumerate(todo):
            if on_shrink is not None:
                on_shrink(i, len(todo))
            f.reproducer = reproduce(f.ops, f.sig, path=path, vm_factory=vm_factory)
            f.reproducible = f.reproducer is not None
        report.shrink_seconds = time.perf_counter() - t0
    return report
