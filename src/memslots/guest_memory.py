"""Guest memory: host mappings (:class:`HostMemory`) and guest-physical access
(:func:`read_guest`, :func:`write_guest`, :func:`clear_guest`), as the kernel's
``kvm_read_guest`` family (``virt/kvm/kvm_main.c``).

Host memory is only ever reached through a live :class:`HostMemory`: an anonymous shared,
page-aligned ``mmap``. Every live mapping is in a process-wide registry sorted by address,
so any hva resolves to ``(mapping, offset)`` (:func:`resolve_hva`) or to nothing. A slot
whose hva is not inside a live mapping (never mapped, closed, garbage-collected, or a
foreign address) gives EFAULT, as an unmapped hva makes the kernel's ``copy_from_user``
fail. The library never dereferences a raw address: copies are :class:`memoryview` slice
assignments on the mapping's own ``mmap`` object, which checks its bounds.

Guest access follows the kernel's ``kvm_read_guest``/``kvm_write_guest``/
``kvm_clear_guest``: page by page, the slot looked up again for every page, so crossing
slot boundaries works wherever each page lies in a valid slot, and the first bad page
stops the call with EFAULT after the pages before it were copied (no rollback).

- read: ``gfn_to_hva_memslot_prot`` read semantics: read-only slots are readable; a hole
  or an INVALID slot is EFAULT.
- write and clear: write semantics: a read-only slot, a hole or an INVALID slot is
  EFAULT; each page is marked dirty in its slot (if the slot logs) after it was written.
  A write made by a vCPU (``kvm_vcpu_write_guest``: :meth:`memslots.vm.Vcpu.write_guest`)
  passes its own ``mark``, which pushes into the vCPU's dirty ring when the VM has one.

For speed, pages that follow each other in one slot and one mapping are handled together:
one read section, one slot lookup, one registry lookup, one copy and one dirty-bitmap
update for the whole run, instead of one per page. This gives the same results as the
page-by-page walk, because inside one read section the memslot set cannot change and a
mapping is contiguous, page-aligned and page-sized: the run stops exactly at the first page
that is in another slot, in a hole, or outside the mapping, and that page is then looked up
on its own.

Lifetime and concurrency. :meth:`HostMemory.close` may run while other threads copy: each
mapping has a lock held for the duration of every copy into or out of it; ``close`` takes
the same lock, so it waits for the copy in flight, then marks the mapping closed and takes
it out of the registry, and only then unmaps it. A copy that looks the mapping up after
that finds it closed (EFAULT). Copies into one mapping are therefore serialised; under the
GIL, where a memoryview copy holds the interpreter anyway, this costs no parallelism. The
registry itself is copy-on-write: writers (new mappings, close) build a new sorted snapshot
under a lock and publish it with one store; readers (every copy) load that snapshot once
and bisect it, with no lock. Mappings are referenced weakly by the registry: a
:class:`HostMemory` garbage-collected without ``close`` resolves to nothing from the moment
it is collected (before its ``mmap`` unmaps) and its entry is pruned at the next change.

Each run's slot lookup and copy happen inside one VM read section (``vm.srcu.read_lock``,
what ``with vm.read_section():`` does), so a concurrent memslot update waits for the copy
in flight before it frees or reuses anything the copy looked at, as with the kernel's SRCU.
Lock order: a read section, then one mapping's lock, then
:data:`memslots.dirty_log.bitmap_lock`; ``close`` takes the mapping's lock, then the
registry's.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import mmap
import threading
import weakref
from bisect import bisect_right
from collections.abc import Callable
from errno import EFAULT, EINVAL
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Self, TypeVar, cast

from memslots import dirty_log as _dirty_log
from memslots.constants import (
    KVM_HVA_ERR_BAD,
    KVM_MEM_LOG_DIRTY_PAGES,
    PAGE_SIZE,
    U64_MAX,
)
from memslots.errors import MemslotError
from memslots.slot import Memslot, gfn_to_hva_memslot_prot

if TYPE_CHECKING:
    from typing_extensions import Buffer

    from memslots.view import VmView

__all__ = [
    "GuestRegion",
    "HostMemory",
    "check_ctype",
    "clear_guest",
    "live_mappings",
    "new_obj",
    "obj_bytes",
    "read_guest",
    "read_guest_into",
    "region_of",
    "resolve_hva",
    "write_guest",
]

#: a ctypes type (structure, union, array or scalar) read by ``read_obj``
_CT = TypeVar("_CT", bound="ctypes._CData")

_PAGE_MASK: Final = PAGE_SIZE - 1
#: Linux MAP_NORESERVE (the mmap module of Python 3.11 does not export it): large guest
#: memories are backed lazily, page by page, without reserving swap up front
_MAP_NORESERVE: Final = getattr(mmap, "MAP_NORESERVE", 0x4000)
_EMPTY_VIEW: Final = memoryview(b"")
#: zeros copied by clear_guest, a piece at a time
_ZEROS: Final = memoryview(bytes(1 << 20))

#: ``mark(slot, gfn, count)``: a write covered ``count`` pages from ``gfn`` of ``slot``
#: (a slot that logs); the default sets their dirty-bitmap bits
MarkDirty = Callable[[Memslot, int, int], None]


# ======================================================================================
# Host memory and the registry
# ======================================================================================
class HostMemory:
    """An anonymous shared, page-aligned host mapping that guest memory can live in.

    ``HostMemory(size)`` maps ``size`` bytes rounded up to whole pages (``size > 0``;
    ``ValueError`` otherwise, ``OSError`` if the kernel refuses the mapping). Attributes:
    ``addr``, its real host virtual address (pass it as a slot's ``userspace_addr``, here
    and to ``/dev/kvm``); ``size``, in bytes; ``closed``. Use as a context manager or call
    :meth:`close` (idempotent).

    Host-side access: :meth:`read` and :meth:`write` (bounds-checked, safe against a
    concurrent :meth:`close`), or :meth:`view`, a :class:`memoryview` of the whole
    mapping. A view keeps the pages mapped for as long as it is alive: :meth:`close` then
    only detaches the mapping from the library (guest accesses give EFAULT at once) and
    the unmapping happens when the last view is released. Release views
    (``with mem.view() as v: ...``) to unmap promptly.

    Creation and :meth:`close` cost O(number of live mappings) (the registry snapshot is
    rebuilt); lookups by address cost O(log mappings).

    >>> from memslots import Vm
    >>> vm = Vm()
    >>> with HostMemory(0x4000) as mem:
    ...     vm.set_user_memory_region(0, 0, 0x100000, mem.size, mem.addr)
    ...     vm.write_guest(0x100ffe, b"spans two pages")
    ...     mem.read(0xFFE, 5), vm.read_guest(0x100FFE, 15)
    (b'spans', b'spans two pages')
    >>> vm.read_guest(0x100000, 1)   # the mapping is closed: the slot's memory is gone
    Traceback (most recent call last):
    ...
    memslots.errors.MemslotError: gpa 0x100000: hva ... is not in a live HostMemory (EFAULT)
    """

    __slots__ = ("__weakref__", "_closed", "_lock", "_mmap", "_view", "addr", "size")

    def __init__(self, size: int) -> None:
        if not isinstance(size, int) or size <= 0:
            raise ValueError(f"HostMemory size must be a positive int, not {size!r}")
        size = (size + _PAGE_MASK) & ~_PAGE_MASK
        try:
            mm = mmap.mmap(
                -1,
                size,
                flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS | _MAP_NORESERVE,
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
            )
        except OverflowError as exc:
            raise ValueError(f"HostMemory size {size:#x} is too large") from exc
        anchor = ctypes.c_char.from_buffer(mm)
        addr = ctypes.addressof(anchor)
        del anchor  # drop the buffer export at once, or close() could not unmap
        self._mmap: mmap.mmap | None = mm
        self._view = memoryview(mm)
        self._lock = threading.Lock()
        self._closed = False
        #: host virtual address of the first byte (page-aligned)
        self.addr: int = addr
        #: size in bytes (a multiple of PAGE_SIZE)
        self.size: int = size
        _registry.add(self)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has run."""
        return self._closed

    @property
    def end(self) -> int:
        """One past the last host virtual address of the mapping."""
        return self.addr + self.size

    def close(self) -> None:
        """Detach and unmap. Waits for a copy into or out of this mapping that is in
        flight, then takes the mapping out of the registry (guest accesses through it
        give EFAULT from then on) and unmaps it (deferred while views from :meth:`view`
        are alive). Idempotent. O(live mappings)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            _registry.remove(self)
            view, self._view = self._view, _EMPTY_VIEW
            view.release()
            mm, self._mmap = self._mmap, None
            assert mm is not None
            # With views from view() alive, mmap.close() raises BufferError; the views are
            # then the mmap object's last owners and it unmaps itself when the last of
            # them is released. The library never touches it again either way.
            with contextlib.suppress(BufferError):
                mm.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(
                f"[{offset:#x}, +{length:#x}) is outside the {self.size:#x}-byte mapping"
            )

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset``. ValueError outside the mapping or once closed.
        O(length)."""
        self._check_range(offset, length)
        with self._lock:
            if self._closed:
                raise ValueError("HostMemory is closed")
            return self._view[offset : offset + length].tobytes()

    def write(self, offset: int, data: Buffer) -> None:
        """Copy ``data`` (any bytes-like object) to ``offset``. ValueError outside the
        mapping or once closed. O(len(data))."""
        src = memoryview(data).cast("B")
        self._check_range(offset, len(src))
        with self._lock:
            if self._closed:
                raise ValueError("HostMemory is closed")
            self._view[offset : offset + len(src)] = src

    def view(self, offset: int = 0, length: int | None = None) -> memoryview:
        """A writable :class:`memoryview` of ``length`` bytes at ``offset`` (default: the
        whole mapping), zero-copy; see the class docstring for how it interacts with
        :meth:`close`. ValueError outside the mapping or once closed. O(1).

        >>> with HostMemory(0x2000) as mem:
        ...     with mem.view(0x1000, 4) as v:
        ...         v[:] = b"abcd"
        ...     mem.read(0x1000, 4)
        b'abcd'
        """
        if length is None:
            length = self.size - offset
        self._check_range(offset, length)
        with self._lock:
            if self._mmap is None:
                raise ValueError("HostMemory is closed")
            whole = memoryview(self._mmap)
            if offset == 0 and length == self.size:
                return whole
            part = whole[offset : offset + length]
            whole.release()  # the slice keeps the mapping exported on its own
            return part

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return f"HostMemory(addr={self.addr:#x}, size={self.size:#x}{state})"


class _Registry:
    """Live mappings sorted by address, published as an immutable snapshot
    ``(starts, ends, refs)`` that readers load with one attribute read.

    Entries hold weak references. An entry whose mapping was garbage-collected without
    :meth:`HostMemory.close` resolves to nothing and is pruned at the next change; its
    address range cannot be in use by another live mapping before that mapping
    registers, and registering drops every entry it overlaps.
    """

    __slots__ = ("lock", "snap")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.snap: tuple[tuple[int, ...], tuple[int, ...], tuple[weakref.ref[HostMemory], ...]] = (
            (),
            (),
            (),
        )

    def _publish(self, entries: list[tuple[int, int, weakref.ref[HostMemory]]]) -> None:
        entries.sort(key=lambda t: t[0])
        self.snap = (
            tuple(t[0] for t in entries),
            tuple(t[1] for t in entries),
            tuple(t[2] for t in entries),
        )

    def add(self, mem: HostMemory) -> None:
        with self.lock:
            starts, ends, refs = self.snap
            entries = [
                (s, e, r)
                for s, e, r in zip(starts, ends, refs, strict=True)
                if (e <= mem.addr or s >= mem.end) and r() is not None
            ]
            entries.append((mem.addr, mem.end, weakref.ref(mem)))
            self._publish(entries)

    def remove(self, mem: HostMemory) -> None:
        with self.lock:
            starts, ends, refs = self.snap
            entries = []
            for s, e, r in zip(starts, ends, refs, strict=True):
                m = r()
                if m is not None and m is not mem:
                    entries.append((s, e, r))
            self._publish(entries)


_registry: Final = _Registry()


def resolve_hva(hva: int) -> tuple[HostMemory, int, int] | None:
    """The live mapping holding host virtual address ``hva``: ``(mapping, offset,
    bytes from hva to the mapping's end)``, or None. Lock-free. O(log mappings)."""
    starts, ends, refs = _registry.snap
    i = bisect_right(starts, hva) - 1
    if i < 0 or hva >= ends[i]:
        return None
    mem = refs[i]()
    if mem is None:
        return None
    return mem, hva - starts[i], ends[i] - hva


def live_mappings() -> list[HostMemory]:
    """Every live :class:`HostMemory`, by address. O(mappings)."""
    return [m for r in _registry.snap[2] if (m := r()) is not None]


# ======================================================================================
# Guest access
# ======================================================================================
def _efault(gpa: int, why: str) -> MemslotError:
    return MemslotError(EFAULT, f"gpa {gpa:#x}: {why}")


def _check_args(vm: VmView, gpa: int, length: int, as_id: int) -> None:
    if not 0 <= as_id < vm.nr_address_spaces:
        raise MemslotError(EINVAL, f"address space {as_id} does not exist")
    if not 0 <= gpa <= U64_MAX:
        raise MemslotError(EINVAL, f"gpa {gpa:#x} does not fit in u64")
    if length < 0:
        raise MemslotError(EINVAL, f"length {length} is negative")


def _access(
    vm: VmView,
    gpa: int,
    length: int,
    as_id: int,
    write: bool,
    copy: _Copy,
    mark: MarkDirty | None = None,
) -> None:
    """The page walk shared by read, write and clear: for each run of pages in one slot
    and one mapping, inside one read section, look up the slot and the mapping, call
    ``copy(view, mapping_offset, pos, n)`` under the mapping's lock and (``write``) mark
    the run dirty with ``mark`` (default: the bitmap). Raises EFAULT at the first page
    that cannot be accessed."""
    if mark is None:
        mark = _dirty_log.mark_pages_dirty_in_slot
    srcu = vm.srcu
    memslots = vm.memslots
    shift = vm.limits.page_shift  # the kernel's page size
    page_mask = (1 << shift) - 1
    pos = 0
    while pos < length:
        gfn = gpa >> shift
        off = gpa & page_mask
        idx = srcu.read_lock()
        try:
            slot = memslots(as_id).gfn_to_memslot(gfn)
            hva = gfn_to_hva_memslot_prot(slot, gfn, write)
            if hva >= KVM_HVA_ERR_BAD:
                if slot is None:
                    raise _efault(gpa, "no memslot")
                if slot.invalid:
                    raise _efault(gpa, f"slot {slot.slot:#x} is being deleted or moved")
                raise _efault(gpa, f"slot {slot.slot:#x} is read-only")
            assert slot is not None
            n = ((slot.base_gfn + slot.npages - gfn) << shift) - off
            if n > length - pos:
                n = length - pos
            hva += off
            found = resolve_hva(hva)
            if found is None:
                raise _efault(gpa, f"hva {hva:#x} is not in a live HostMemory")
            mem, moff, avail = found
            if n > avail:
                n = avail
            with mem._lock:
                if mem._closed:
                    raise _efault(gpa, f"hva {hva:#x}: its HostMemory was closed")
                copy(mem._view, moff, pos, n)
            if write and slot.flags & KVM_MEM_LOG_DIRTY_PAGES:
                mark(slot, gfn, (off + n + page_mask) >> shift)
        finally:
            srcu.read_unlock(idx)
        pos += n
        gpa += n


class _Copy:
    """A copy step for :func:`_access` (a tiny class rather than a closure so the hot
    loop calls one bound method)."""

    __slots__ = ()

    def __call__(self, view: memoryview, moff: int, pos: int, n: int) -> None:
        raise NotImplementedError


class _ReadChunks(_Copy):
    __slots__ = ("chunks",)

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def __call__(self, view: memoryview, moff: int, pos: int, n: int) -> None:
        self.chunks.append(view[moff : moff + n].tobytes())


class _ReadInto(_Copy):
    __slots__ = ("dest",)

    def __init__(self, dest: memoryview) -> None:
        self.dest = dest

    def __call__(self, view: memoryview, moff: int, pos: int, n: int) -> None:
        self.dest[pos : pos + n] = view[moff : moff + n]


class _Write(_Copy):
    __slots__ = ("src",)

    def __init__(self, src: memoryview) -> None:
        self.src = src

    def __call__(self, view: memoryview, moff: int, pos: int, n: int) -> None:
        view[moff : moff + n] = self.src[pos : pos + n]


class _Zero(_Copy):
    __slots__ = ()

    def __call__(self, view: memoryview, moff: int, pos: int, n: int) -> None:
        step = len(_ZEROS)
        end = moff + n
        while moff < end:
            k = min(step, end - moff)
            view[moff : moff + k] = _ZEROS[:k]
            moff += k


def read_guest(vm: VmView, gpa: int, length: int, *, as_id: int = 0) -> bytes:
    """``kvm_read_guest``: ``length`` bytes at guest physical ``gpa`` in address space
    ``as_id``. Read-only slots are readable; EFAULT for a hole, an INVALID slot or an hva
    outside a live :class:`HostMemory`; EINVAL for a gpa outside u64 or a negative
    length. O(length + runs x (log slots + log mappings)), a run being the pages that
    lie in one slot and one mapping."""
    _check_args(vm, gpa, length, as_id)
    reader = _ReadChunks()
    _access(vm, gpa, length, as_id, False, reader)
    chunks = reader.chunks
    if len(chunks) == 1:
        return chunks[0]
    return b"".join(chunks)


def read_guest_into(vm: VmView, gpa: int, buf: Buffer, *, as_id: int = 0) -> None:
    """As :func:`read_guest`, into the writable buffer ``buf`` (``len(buf)`` bytes): no
    intermediate copy. On EFAULT, the bytes before the bad page have been filled."""
    dest = memoryview(buf).cast("B")
    if dest.readonly:
        raise TypeError("read_guest_into needs a writable buffer")
    _check_args(vm, gpa, len(dest), as_id)
    _access(vm, gpa, len(dest), as_id, False, _ReadInto(dest))


def write_guest(
    vm: VmView, gpa: int, data: Buffer, *, as_id: int = 0, mark: MarkDirty | None = None
) -> None:
    """``kvm_write_guest``: copy ``data`` (any bytes-like object) to guest physical
    ``gpa`` in address space ``as_id``. EFAULT for a hole, an INVALID or read-only slot,
    or an hva outside a live :class:`HostMemory`; the pages before the bad one stay
    written and marked dirty, as in the kernel. Each written page is marked dirty in
    its slot if the slot logs (by ``mark``, see :data:`MarkDirty`, when given).
    O(len(data) + runs x (log slots + log mappings))."""
    src = memoryview(data).cast("B")
    _check_args(vm, gpa, len(src), as_id)
    _access(vm, gpa, len(src), as_id, True, _Write(src), mark)


def clear_guest(vm: VmView, gpa: int, length: int, *, as_id: int = 0) -> None:
    """``kvm_clear_guest`` (as fixed in 2024: each page gets its own segment): write
    ``length`` zero bytes at ``gpa``, with :func:`write_guest`'s semantics and errors.
    O(length + runs x (log slots + log mappings))."""
    _check_args(vm, gpa, length, as_id)
    _access(vm, gpa, length, as_id, True, _Zero())


# ======================================================================================
# Typed objects: ctypes structures, unions, arrays and scalars
# ======================================================================================
#: ``_type_`` codes of the ctypes scalar types :func:`new_obj` and :func:`obj_bytes`
#: accept: integers, floats, bool and char. Pointer types (``c_void_p``, ``c_char_p``,
#: ``POINTER(...)``, ``py_object``, function pointers) are refused anywhere in a type: an
#: address read from guest memory would be dereferenced by ctypes, and could crash.
_SCALAR_CODES: Final = frozenset("bBhHiIlLqQfdg?c")
#: the base class of every ctypes type (``_ctypes._CData``, which ctypes does not export)
_CDATA: Final[type] = ctypes.c_int.__mro__[-2]
#: codes of the signed integer types (range checks of plain ints)
_SIGNED_CODES: Final = frozenset("bhilq")


def _check_ctype(ctype: type, top: type) -> None:
    if issubclass(ctype, ctypes.Structure | ctypes.Union):
        for field in getattr(ctype, "_fields_", ()):
            _check_ctype(field[1], top)
        return
    item: Any = getattr(ctype, "_type_", None)
    if issubclass(ctype, ctypes.Array):
        _check_ctype(item, top)
        return
    if issubclass(ctype, ctypes._SimpleCData) and item in _SCALAR_CODES:
        return
    raise TypeError(
        f"{top.__name__} is not plain data: {ctype.__name__} is not a ctypes integer,"
        " float, bool, char, or a structure, union or array of them"
    )


_checked_ctypes: Final[set[type]] = set()


def check_ctype(ctype: type) -> None:
    """Raise TypeError unless ``ctype`` is a ctypes type made of plain data only: a
    scalar (integer, float, bool, char), or a structure, union or array whose fields are,
    at any depth (no pointers: see :data:`_SCALAR_CODES`). O(fields) the first time for
    each type, O(1) after.

    >>> import ctypes
    >>> check_ctype(ctypes.c_uint16 * 4)
    >>> check_ctype(ctypes.c_char_p)
    Traceback (most recent call last):
    ...
    TypeError: c_char_p is not plain data: c_char_p is not a ctypes integer, float, bool, ...
    """
    if ctype in _checked_ctypes:
        return
    if not isinstance(ctype, type):
        raise TypeError(f"{ctype!r} is not a ctypes type")
    _check_ctype(ctype, ctype)
    _checked_ctypes.add(ctype)


def new_obj(ctype: type[_CT]) -> _CT:
    """A zeroed instance of the plain-data ctypes type ``ctype`` (:func:`check_ctype`),
    ready to be filled by :func:`read_guest_into`. O(size).

    >>> import ctypes
    >>> list(new_obj(ctypes.c_uint32 * 3))
    [0, 0, 0]
    """
    check_ctype(ctype)
    return ctype()


def obj_bytes(obj: object, ctype: type | None = None) -> memoryview:
    """The bytes :meth:`memslots.vm_api.VmApi.write_obj` writes, without a copy for a
    ctypes instance:

    - a ctypes instance of a plain-data type (``ctype`` None, or its type): its own
      bytes, in its own layout (a ``BigEndianStructure`` stays big-endian);
    - a Python ``int``, ``float`` or ``bool`` with a ctypes scalar type ``ctype``: the
      value in that type, little-endian; an integer that does not fit (``0x12345`` in a
      ``c_uint16``, ``-1`` in an unsigned type) is a ValueError, never truncated.

    TypeError for anything else (bytes-like data: use ``write_guest``). O(size).

    >>> import ctypes
    >>> bytes(obj_bytes(0x1234, ctypes.c_uint16)), bytes(obj_bytes(-2, ctypes.c_int8))
    (b'4\\x12', b'\\xfe')
    >>> obj_bytes(0x12345, ctypes.c_uint16)
    Traceback (most recent call last):
    ...
    ValueError: 74565 does not fit c_ushort (2 bytes, unsigned)
    """
    if isinstance(obj, _CDATA):
        if ctype is not None and not isinstance(obj, ctype):
            raise TypeError(f"{type(obj).__name__} is not a {ctype.__name__}")
        check_ctype(type(obj))
        return memoryview(cast("Buffer", obj)).cast("B")
    if ctype is None:
        raise TypeError(
            f"ctype must be given for a value of type {type(obj).__name__}: write_obj(gpa, value,"
            " ctypes.c_uint32) (bytes-like data goes to write_guest)"
        )
    check_ctype(ctype)
    if not issubclass(ctype, ctypes._SimpleCData) or not isinstance(obj, int | float):
        return _bad(obj, ctype)
    code: str = getattr(ctype, "_type_", "")
    size = ctypes.sizeof(ctype)
    if code == "?":
        if isinstance(obj, int) and obj in (0, 1):
            return memoryview(bytes((int(obj),)))
        raise ValueError(f"{obj!r} is not a bool (0 or 1) for {ctype.__name__}")
    if isinstance(obj, int) and code not in "fdgc?":
        signed = code in _SIGNED_CODES
        try:
            return memoryview(int(obj).to_bytes(size, "little", signed=signed))
        except OverflowError:
            sign = "signed" if signed else "unsigned"
            raise ValueError(
                f"{obj} does not fit {ctype.__name__} ({size} bytes, {sign})"
            ) from None
    if code in "fdg":
        try:
            le: Any = getattr(ctype, "__ctype_le__", ctype)
            return memoryview(le(obj)).cast("B")
        except OverflowError:
            raise ValueError(f"{obj} does not fit {ctype.__name__}") from None
    return _bad(obj, ctype)


def _bad(obj: object, ctype: type) -> memoryview:
    raise TypeError(f"a {type(obj).__name__} value cannot be written as {ctype.__name__}")


# ======================================================================================
# Regions: every slot with its host memory
# ======================================================================================
@dataclasses.dataclass(frozen=True, slots=True)
class GuestRegion:
    """One memslot and the host memory behind it, as
    :meth:`memslots.vm_api.VmApi.regions` lists them (Unicorn's ``mem_regions()``,
    rust-vmm vm-memory's regions).

    ``slot`` is the :class:`memslots.Memslot` (never changed while published, so it
    stays a faithful snapshot); ``memory`` the live :class:`HostMemory` that holds the
    slot's whole hva range, and ``offset`` where in it the slot begins, or ``memory``
    None and ``offset`` 0 when the slot's memory is not (entirely) one live library
    mapping: a foreign or unmapped hva, a mapping that was closed, or a slot spanning two
    mappings. Such a slot has no :meth:`view`; ``read_guest``/``write_guest`` reach the
    parts that are library memory page by page and give EFAULT for the rest.
    """

    slot: Memslot
    memory: HostMemory | None
    offset: int

    @property
    def gpa(self) -> int:
        """Guest physical address of the first byte."""
        return self.slot.guest_phys_addr

    @property
    def size(self) -> int:
        """Bytes of guest memory (``memory_size``)."""
        return self.slot.memory_size

    @property
    def hva(self) -> int:
        """Host virtual address of the first byte (``userspace_addr``)."""
        return self.slot.userspace_addr

    def view(self) -> memoryview:
        """A writable zero-copy :class:`memoryview` of the slot's ``size`` bytes in host
        memory (index 0 is guest physical :attr:`gpa`). Writes through it are the host's:
        they are not marked dirty (call ``vm.mark_page_dirty``, or use ``write_guest``),
        and they may change a ``KVM_MEM_READONLY`` slot, as a VMM loading a ROM does.
        The view is bounds-checked like any memoryview; if the mapping is closed while
        it is alive, its pages stay mapped (detached from the guest) until the view is
        released (``with region.view() as v: ...``), as for :meth:`HostMemory.view`.
        ValueError when the slot has no library memory or the mapping is closed. O(1).
        """
        if self.memory is None:
            raise ValueError(
                f"slot {self.slot.slot:#x}: hva {self.hva:#x} is not one live HostMemory"
            )
        return self.memory.view(self.offset, self.size)


def region_of(slot: Memslot) -> GuestRegion:
    """``slot`` with the live :class:`HostMemory` holding all of it, if any. O(log
    mappings).

    >>> with HostMemory(0x3000) as mem:
    ...     region_of(Memslot(0, 0, 0x10, 2, 0, mem.addr + 0x1000)).offset
    ...     region_of(Memslot(0, 0, 0x10, 3, 0, mem.addr + 0x1000)).memory is None
    4096
    True
    """
    found = resolve_hva(slot.userspace_addr)
    if found is not None:
        mem, off, avail = found
        if avail >= slot.memory_size and not mem.closed:
            return GuestRegion(slot, mem, off)
    return GuestRegion(slot, None, 0)
