"""What a VMM author reaches for beyond the ioctls, on both designs (and KvmVm in
tests/test_kvm_vm.py): typed objects (read_obj/write_obj), regions with their host memory,
host_memory()/close(), free gfn ranges, free gpas and free slot ids, and the update
protocol's internals kept private."""

from __future__ import annotations

import ctypes
import errno
import itertools
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import AnyVm
from memslots import KVM_MEM_LOG_DIRTY_PAGES, PAGE_SIZE, HostMemory, MemslotSet, Vm
from memslots.baseline import ArrayMemslotSet, ArrayVm
from memslots.dirty_log import dirty_pages
from memslots.guest_memory import GuestRegion, check_ctype, obj_bytes
from test_guest_memory import errno_of

P = PAGE_SIZE
MakeVm = Callable[..., AnyVm]


class Entry(ctypes.Structure):
    _fields_ = (("addr", ctypes.c_uint64), ("len", ctypes.c_uint32), ("flags", ctypes.c_uint16))


class Word(ctypes.Union):
    _fields_ = (("u32", ctypes.c_uint32), ("b", ctypes.c_uint8 * 4))


class BeHeader(ctypes.BigEndianStructure):
    _fields_ = (("magic", ctypes.c_uint32),)


class WithPointer(ctypes.Structure):
    _fields_ = (("n", ctypes.c_int), ("p", ctypes.POINTER(ctypes.c_int)))


def vm_with_memory(make_vm: MakeVm, size: int = 4 * P, flags: int = 0) -> tuple[AnyVm, HostMemory]:
    vm = make_vm()
    mem = vm.host_memory(size)
    vm.set_user_memory_region(0, flags, 0x100000, size, mem.addr)
    return vm, mem


# ---------------------------------------------------------------- read_obj / write_obj


def test_structures_unions_arrays_and_scalars_round_trip(make_vm: MakeVm) -> None:
    vm, _ = vm_with_memory(make_vm)
    with vm:
        gpa = 0x100000 + P - 6  # every object below crosses the page boundary
        vm.write_obj(gpa, Entry(0xFEE00000, 0x1000, 7))
        e = vm.read_obj(gpa, Entry)
        assert isinstance(e, Entry) and (e.addr, e.len, e.flags) == (0xFEE00000, 0x1000, 7)
        assert vm.read_guest(gpa, 8) == (0xFEE00000).to_bytes(8, "little")

        vm.write_obj(gpa, Word(u32=0x11223344))
        assert list(vm.read_obj(gpa, Word).b) == [0x44, 0x33, 0x22, 0x11]

        vm.write_obj(gpa, (ctypes.c_uint16 * 3)(1, 2, 0xFFFF))
        assert list(vm.read_obj(gpa, ctypes.c_uint16 * 3)) == [1, 2, 0xFFFF]
        assert vm.read_obj(gpa, Entry * 2)[0].addr == 0xFFFF00020001

        vm.write_obj(gpa, ctypes.c_int32(-5))
        assert vm.read_obj(gpa, ctypes.c_int32).value == -5
        vm.write_obj(gpa, BeHeader(0x7F454C46))  # its own layout: big-endian
        assert vm.read_guest(gpa, 4) == b"\x7fELF"
        assert vm.read_obj(gpa, BeHeader).magic == 0x7F454C46


def test_plain_values_are_little_endian_and_never_truncated(make_vm: MakeVm) -> None:
    vm, mem = vm_with_memory(make_vm)
    with vm:
        vm.write_obj(0x100000, 0x1234, ctypes.c_uint16)
        assert mem.read(0, 2) == b"\x34\x12"
        vm.write_obj(0x100000, -2, ctypes.c_int16)
        assert mem.read(0, 2) == b"\xfe\xff"
        vm.write_obj(0x100000, 1.5, ctypes.c_double)
        assert vm.read_obj(0x100000, ctypes.c_double).value == 1.5
        vm.write_obj(0x100000, True, ctypes.c_bool)
        assert mem.read(0, 1) == b"\x01"
        vm.write_obj(0x100000, 2**64 - 1, ctypes.c_uint64)
        assert vm.read_obj(0x100000, ctypes.c_uint64).value == 2**64 - 1
        before = mem.read(0, 8)
        for value, ctype in (
            (0x12345, ctypes.c_uint16),
            (-1, ctypes.c_uint32),
            (2**63, ctypes.c_int64),
            (2, ctypes.c_bool),
            (10**400, ctypes.c_double),
        ):
            with pytest.raises(ValueError, match=r"does not fit|is not a bool"):
                vm.write_obj(0x100000, value, ctype)
        assert mem.read(0, 8) == before  # nothing was written


@pytest.mark.parametrize(
    "ctype",
    [
        ctypes.c_char_p,
        ctypes.c_void_p,
        ctypes.POINTER(ctypes.c_int),
        ctypes.py_object,
        WithPointer,
        ctypes.c_void_p * 2,
        ctypes.CFUNCTYPE(None),
    ],
    ids=["char_p", "void_p", "POINTER", "py_object", "struct", "array", "function"],
)
def test_types_holding_pointers_are_refused(make_vm: MakeVm, ctype: type) -> None:
    """A pointer read from guest memory would be dereferenced by ctypes: refused before
    anything is read or written."""
    vm, mem = vm_with_memory(make_vm)
    with vm:
        with pytest.raises(TypeError, match="not plain data"):
            vm.read_obj(0x100000, ctype)
        with pytest.raises(TypeError, match="not plain data"):
            vm.write_obj(0x100000, ctype())
        assert mem.read(0, 16) == bytes(16)


def test_bad_write_obj_arguments(make_vm: MakeVm) -> None:
    vm, mem = vm_with_memory(make_vm)
    with vm:
        with pytest.raises(TypeError, match="ctype must be given for a value of type int"):
            vm.write_obj(0x100000, 5)
        with pytest.raises(TypeError, match="write_guest"):
            vm.write_obj(0x100000, b"abc")
        with pytest.raises(TypeError, match="cannot be written"):
            vm.write_obj(0x100000, b"abc", ctypes.c_uint32)
        with pytest.raises(TypeError, match="cannot be written"):
            vm.write_obj(0x100000, 1.5, ctypes.c_uint32)
        with pytest.raises(TypeError, match="is not a"):
            vm.write_obj(0x100000, ctypes.c_uint8(1), ctypes.c_uint16)
        with pytest.raises(TypeError, match="not a ctypes type"):
            check_ctype(5)  # type: ignore[arg-type]
        assert mem.read(0, 8) == bytes(8)


def test_typed_access_has_guest_memory_semantics(make_vm: MakeVm) -> None:
    """Holes fault, writes are dirty-logged, other address spaces are reached by as_id."""
    vm, mem = vm_with_memory(make_vm, flags=KVM_MEM_LOG_DIRTY_PAGES)
    with vm:
        assert errno_of(lambda: vm.read_obj(0x100000 + 4 * P - 4, Entry)) == errno.EFAULT
        assert errno_of(lambda: vm.write_obj(0x0, 1, ctypes.c_uint8)) == errno.EFAULT
        vm.get_dirty_log(0)
        vm.write_obj(0x100000 + 2 * P + 8, Entry(1, 2, 3))
        assert dirty_pages(vm.get_dirty_log(0)) == [2]
        smm = vm.host_memory(P)
        vm.set_user_memory_region(1 << 16, 0, 0x100000, P, smm.addr)
        vm.write_obj(0x100000, 0xABCD, ctypes.c_uint16, as_id=1)
        assert smm.read(0, 2) == b"\xcd\xab" and mem.read(0, 2) == bytes(2)
        assert vm.read_obj(0x100000, ctypes.c_uint16, as_id=1).value == 0xABCD
        assert errno_of(lambda: vm.read_obj(0, ctypes.c_uint8, as_id=2)) == errno.EINVAL


def test_read_guest_into_fills_a_ctypes_object_in_place(make_vm: MakeVm) -> None:
    vm, _ = vm_with_memory(make_vm)
    with vm:
        vm.write_obj(0x100010, Entry(9, 8, 7))
        e = Entry()
        vm.read_guest_into(0x100010, e)
        assert (e.addr, e.len, e.flags) == (9, 8, 7)


@given(st.binary(min_size=16, max_size=16))
def test_obj_bytes_is_the_objects_own_bytes(data: bytes) -> None:
    e = Entry.from_buffer_copy(data)
    assert bytes(obj_bytes(e)) == data


# ---------------------------------------------------------------- regions


def test_regions_list_every_slot_with_its_host_memory(make_vm: MakeVm) -> None:
    vm = make_vm()
    with vm:
        mem = vm.host_memory(8 * P)
        vm.set_user_memory_region(2, 0, 0x200000, 2 * P, mem.addr + 4 * P)
        vm.set_user_memory_region(0, 0, 0x0, 4 * P, mem.addr)
        vm.set_user_memory_region(1, 0, 0x100000, P, 0x7F0000000000)  # not library memory
        vm.set_user_memory_region(3, 0, 0x300000, 4 * P, mem.addr + 6 * P)  # runs past it
        regions = vm.regions()
        assert [r.slot.id for r in regions] == [0, 1, 2, 3]  # by gpa
        assert [(r.memory is mem, r.offset) for r in regions] == [
            (True, 0),
            (False, 0),
            (True, 4 * P),
            (False, 0),
        ]
        assert [(r.gpa, r.size, r.hva) for r in regions[:1]] == [(0, 4 * P, mem.addr)]
        for bad in (regions[1], regions[3]):
            with pytest.raises(ValueError, match="not one live HostMemory"):
                bad.view()
        assert vm.regions(as_id=1) == []
        assert errno_of(lambda: vm.regions(as_id=2)) == errno.EINVAL


def test_a_region_view_is_zero_copy_both_ways(make_vm: MakeVm) -> None:
    vm = make_vm()
    with vm:
        mem = vm.host_memory(4 * P)
        vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0x10000, 2 * P, mem.addr + 2 * P)
        (region,) = vm.regions()
        with region.view() as v:
            assert len(v) == 2 * P and not v.readonly
            v[P : P + 3] = b"abc"
            assert vm.read_guest(0x10000 + P, 3) == b"abc"
            vm.write_guest(0x10000, b"xyz")
            assert bytes(v[:3]) == b"xyz"
            with pytest.raises(IndexError):
                v[2 * P] = 0  # bounds-checked like any memoryview
            with pytest.raises(ValueError):
                v[2 * P - 1 : 2 * P + 1] = b"ab"
        assert mem.read(2 * P + P, 3) == b"abc"
        # host writes through a view are not dirty-logged; write_guest's are
        assert dirty_pages(vm.get_dirty_log(0)) == [0]


def test_a_region_outlives_its_closed_memory_safely() -> None:
    vm = Vm()
    mem = HostMemory(2 * P)
    vm.set_user_memory_region(0, 0, 0, 2 * P, mem.addr)
    (region,) = vm.regions()
    v = region.view()
    v[0] = 1
    mem.close()  # detaches at once; the pages stay mapped until the view is released
    assert errno_of(lambda: vm.read_guest(0, 1)) == errno.EFAULT
    v[1] = 2
    assert bytes(v[:2]) == b"\x01\x02"
    v.release()
    with pytest.raises(ValueError, match="closed"):
        region.view()
    (after,) = vm.regions()
    assert after.memory is None


def test_guest_region_is_a_frozen_snapshot() -> None:
    vm = Vm()
    vm.set_user_memory_region(0, 0, 0, P, 0x7F0000000000)
    (r,) = vm.regions()
    assert isinstance(r, GuestRegion)
    with pytest.raises(AttributeError):
        r.offset = 5  # type: ignore[misc]
    vm.set_user_memory_region(0, 0, 0x10000, P, 0x7F0000000000)  # MOVE: a new slot object
    assert r.gpa == 0 and vm.regions()[0].gpa == 0x10000


# ---------------------------------------------------------------- host_memory / close


def test_close_unmaps_the_memory_the_vm_owns(make_vm: MakeVm) -> None:
    with make_vm() as vm:
        a, b = vm.host_memory(P), vm.host_memory(3 * P + 1)
        outside = HostMemory(P)
        assert (a.size, b.size) == (P, 4 * P)
        vm.set_user_memory_region(0, 0, 0, P, a.addr)
        vm.write_guest(0, b"hi")
        assert not vm.closed
    assert vm.closed and a.closed and b.closed and not outside.closed
    assert errno_of(lambda: vm.read_guest(0, 2)) == errno.EFAULT  # the slot's memory is gone
    assert errno_of(lambda: vm.host_memory(P)) == errno.EBADF
    vm.close()  # idempotent
    vm.set_user_memory_region(0, 0, 0, 0, 0)  # the engine itself keeps working
    assert len(vm.memslots(0)) == 0
    outside.close()


# ---------------------------------------------------------------- free space


@st.composite
def layouts(draw: st.DrawFn) -> list[tuple[int, int]]:
    """Non-overlapping ``(base_gfn, npages)`` in gfns 0..255."""
    cuts = sorted(draw(st.sets(st.integers(0, 256), max_size=24)))
    out = []
    for lo, hi in zip(cuts[::2], cuts[1::2], strict=False):
        if hi > lo:
            out.append((lo, hi - lo))
    return out


def build(make: Callable[..., AnyVm], layout: list[tuple[int, int]]) -> AnyVm:
    vm = make(max_gfn=255, max_user_slots=32)
    for i, (gfn, npages) in enumerate(layout):
        vm.set_user_memory_region(i, 0, gfn * P, npages * P, 0x7F0000000000 + gfn * P)
    return vm


@settings(max_examples=150, deadline=None)
@given(
    layouts(),
    st.integers(0, 260),
    st.integers(0, 260),
    st.sampled_from([Vm, ArrayVm]),
)
def test_free_gfn_ranges_are_exactly_the_holes(
    layout: list[tuple[int, int]], start: int, end: int, make: Callable[..., AnyVm]
) -> None:
    vm = build(make, layout)
    used = {g for gfn, n in layout for g in range(gfn, gfn + n)}
    free = {g for g in range(start, end) if g not in used}
    ranges = vm.free_gfn_ranges(start, end)
    assert {g for a, b in ranges for g in range(a, b)} == free
    assert all(a < b for a, b in ranges)
    assert all(b1 < a2 for (_, b1), (a2, _) in itertools.pairwise(ranges))  # maximal
    assert vm.free_gfn_ranges(0) == vm.free_gfn_ranges(0, 256)  # default end: max_gfn + 1


@settings(max_examples=150, deadline=None)
@given(
    layouts(),
    st.integers(1, 40),
    st.sampled_from([1, 2, 4, 16, 64]),
    st.integers(0, 300),
    st.sampled_from([Vm, ArrayVm]),
)
def test_find_free_gpa_is_the_lowest_aligned_fit(
    layout: list[tuple[int, int]], npages: int, align: int, start: int, make: Callable[..., AnyVm]
) -> None:
    vm = build(make, layout)
    used = {g for gfn, n in layout for g in range(gfn, gfn + n)}
    first = -(-start // align) * align
    expected = next(
        (
            g
            for g in range(first, 256, align)
            if g + npages <= 256 and not used & set(range(g, g + npages))
        ),
        None,
    )
    got = vm.find_free_gpa(npages * P, align=align * P, start=start * P)
    assert got == (None if expected is None else expected * P)
    if got is not None:  # and the kernel rules agree: it can be created there
        vm.set_user_memory_region(31, 0, got, npages * P, 0x7F1000000000)


def test_find_free_gpa_arguments() -> None:
    vm = Vm()
    for kwargs in ({"size": 0}, {"size": P + 1}, {"size": P, "align": P // 2},
                   {"size": P, "align": 3 * P}, {"size": P, "start": -1}):  # fmt: skip
        with pytest.raises(ValueError):
            vm.find_free_gpa(**kwargs)
    with pytest.raises(ValueError):
        vm.free_gfn_ranges(-1, 5)
    assert vm.free_gfn_ranges(5, 5) == []
    assert vm.find_free_gpa(1 << 52) == 0  # the whole gfn space (max gfn 2^40 - 1)
    assert vm.find_free_gpa((1 << 52) + P) is None  # larger than it


def test_free_slot_id(make_vm: MakeVm) -> None:
    vm = make_vm(max_user_slots=3)
    assert vm.free_slot_id() == 0
    for i in (0, 2):
        vm.set_user_memory_region(i, 0, i * P, P, 0x7F0000000000)
    assert vm.free_slot_id() == 1 and vm.free_slot_id(as_id=1) == 0
    vm.set_user_memory_region(1, 0, 8 * P, P, 0x7F0000000000)
    assert vm.free_slot_id() is None
    vm.set_user_memory_region(2, 0, 0, 0, 0)
    assert vm.free_slot_id() == 2
    assert errno_of(lambda: vm.free_slot_id(as_id=5)) == errno.EINVAL


# ---------------------------------------------------------------- private internals


def test_the_update_protocols_internals_are_not_public() -> None:
    """A set's write side and the protocol's entry point after validation would corrupt
    a VM if called from outside; they have no public names on either design."""
    for cls, names in (
        (MemslotSet, ("replace",)),
        (ArrayMemslotSet, ("replace", "copy_from", "free", "set_slot", "update_memslots")),
        (Vm, ("apply",)),
        (ArrayVm, ("apply",)),
    ):
        for name in names:
            assert not hasattr(cls, name), f"{cls.__name__}.{name} is public"
    public = {n for n in dir(Vm()) if not n.startswith("_")}
    assert {"read_obj", "write_obj", "regions", "host_memory", "close", "free_gfn_ranges",
            "find_free_gpa", "free_slot_id", "read_guest_into"} <= public  # fmt: skip
