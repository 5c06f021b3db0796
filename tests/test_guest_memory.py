"""Guest memory: HostMemory and its registry, and read_guest/write_guest/clear_guest with
the kernel's page-by-page semantics (``kvm_read_guest``, ``kvm_write_guest``): EFAULT for
holes, INVALID slots, writes to read-only slots and hvas outside a live HostMemory;
earlier pages stay written and dirty; nothing outside a live mapping is ever touched."""

from __future__ import annotations

import ctypes
import errno
import gc
import mmap
import random
import threading
import time
from array import array
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import AnyVm
from memslots import (
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
    PAGE_SIZE,
    HostMemory,
    Memslot,
    MemslotError,
    Vm,
)
from memslots.dirty_log import dirty_pages
from memslots.guest_memory import live_mappings, read_guest_into, resolve_hva

EFAULT, EINVAL = errno.EFAULT, errno.EINVAL
LOG, RO = KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY
P = PAGE_SIZE
WAIT = 30.0  # seconds: bound on every thread join
MakeVm = Callable[..., AnyVm]


def errno_of(fn: Callable[[], object]) -> int:
    try:
        fn()
    except MemslotError as exc:
        return exc.errno or 0
    return 0


def pattern(n: int, seed: int = 1) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


@pytest.fixture
def mems() -> Iterator[list[HostMemory]]:
    """Mappings closed at the end of the test."""
    made: list[HostMemory] = []
    yield made
    for m in made:
        m.close()


def mem(mems: list[HostMemory], size: int) -> HostMemory:
    m = HostMemory(size)
    mems.append(m)
    return m


# ======================================================================================
# HostMemory and the registry
# ======================================================================================
def test_host_memory_is_a_real_page_aligned_mapping(mems: list[HostMemory]) -> None:
    m = mem(mems, 3 * P + 1)
    assert m.size == 4 * P  # rounded up to pages
    assert m.addr % P == 0 and m.end == m.addr + m.size
    m.write(P - 2, b"hello")
    assert ctypes.string_at(m.addr + P - 2, 5) == b"hello"  # .addr is the real address
    ctypes.memmove(m.addr + 100, b"xyz", 3)
    assert m.read(100, 3) == b"xyz"
    with m.view() as v:
        assert len(v) == m.size and not v.readonly
        v[0:2] = b"ab"
    assert m.read(0, 2) == b"ab"
    assert resolve_hva(m.addr) == (m, 0, m.size)
    assert resolve_hva(m.addr + m.size - 1) == (m, m.size - 1, 1)
    assert resolve_hva(m.end) is None or resolve_hva(m.end)[0] is not m  # type: ignore[index]
    assert m in live_mappings()


def test_host_memory_bounds_and_arguments(mems: list[HostMemory]) -> None:
    m = mem(mems, P)
    for off, n in [(-1, 1), (0, P + 1), (P, 1), (0, -1)]:
        with pytest.raises(ValueError):
            m.read(off, n)
    with pytest.raises(ValueError):
        m.write(P - 1, b"xx")
    for bad in (0, -P, 1.5, "4096"):
        with pytest.raises(ValueError):
            HostMemory(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        HostMemory(1 << 80)


def test_close_is_idempotent_and_detaches(mems: list[HostMemory]) -> None:
    m = mem(mems, 2 * P)
    addr = m.addr
    with m:
        assert not m.closed
    assert m.closed
    m.close()
    found = resolve_hva(addr)
    assert found is None or found[0] is not m
    assert m not in live_mappings()
    with pytest.raises(ValueError):
        m.read(0, 1)
    with pytest.raises(ValueError):
        m.write(0, b"x")
    with pytest.raises(ValueError):
        m.view()
    assert "closed" in repr(m)


def test_close_with_a_live_view_defers_the_unmap(mems: list[HostMemory]) -> None:
    m = mem(mems, P)
    v = m.view()
    m.close()  # does not raise; the library lets go at once
    assert m.closed and m not in live_mappings()
    v[0:3] = b"abc"  # the pages stay mapped while the view lives: never dangling
    assert bytes(v[0:3]) == b"abc"
    v.release()


def test_garbage_collected_mapping_leaves_the_registry() -> None:
    m = HostMemory(P)
    addr = m.addr
    del m
    gc.collect()
    found = resolve_hva(addr)
    assert found is None or (found[0].addr == addr and not found[0].closed)


# ======================================================================================
# read_guest / write_guest / clear_guest
# ======================================================================================
def test_roundtrip_across_slots_backed_by_different_mappings(
    make_vm: MakeVm, mems: list[HostMemory]
) -> None:
    a, b = mem(mems, 4 * P), mem(mems, 4 * P)
    vm = make_vm()
    vm.set_user_memory_region(0, 0, 0, 4 * P, a.addr)
    vm.set_user_memory_region(1, 0, 4 * P, 4 * P, b.addr)
    data = pattern(5 * P)
    vm.write_guest(1000, data)  # pages 0..5, crosses the slot boundary
    assert vm.read_guest(1000, len(data)) == data
    assert a.read(1000, 4 * P - 1000) == data[: 4 * P - 1000]
    assert b.read(0, 1000 + P) == data[4 * P - 1000 :]
    assert vm.read_guest(4 * P - 3, 6) == data[4 * P - 1003 : 4 * P - 997]
    assert vm.read_guest(0, 0) == b""


def test_write_marks_every_touched_page_dirty_read_does_not(
    make_vm: MakeVm, mems: list[HostMemory]
) -> None:
    a, b = mem(mems, 64 * P), mem(mems, 64 * P)
    vm = make_vm()
    vm.set_user_memory_region(0, LOG, 0, 64 * P, a.addr)
    vm.set_user_memory_region(1, 0, 64 * P, 64 * P, b.addr)  # not logging
    vm.set_user_memory_region(2, LOG, 128 * P, 64 * P, b.addr)  # aliases b
    vm.write_guest(3 * P + 4000, b"x" * 200)  # pages 3 and 4, partly each
    vm.write_guest(62 * P, bytes(4 * P))  # 62, 63 in slot 0, then slot 1
    vm.clear_guest(130 * P + 5, 1)
    vm.read_guest(0, 192 * P)
    assert dirty_pages(vm.get_dirty_log(0)) == [3, 4, 62, 63]
    assert dirty_pages(vm.get_dirty_log(2)) == [2]
    # the alias: written through slot 1, read through slot 2
    vm.write_guest(64 * P + 8, b"alias")
    assert vm.read_guest(128 * P + 8, 5) == b"alias"
    assert dirty_pages(vm.get_dirty_log(2)) == []


def test_read_only_slot_reads_but_refuses_writes(make_vm: MakeVm, mems: list[HostMemory]) -> None:
    a, r = mem(mems, 2 * P), mem(mems, 2 * P)
    r.write(0, b"rom!")
    vm = make_vm()
    vm.set_user_memory_region(0, LOG, 0, 2 * P, a.addr)
    vm.set_user_memory_region(1, RO | LOG, 2 * P, 2 * P, r.addr)
    assert vm.read_guest(2 * P, 4) == b"rom!"
    assert errno_of(lambda: vm.write_guest(2 * P, b"x")) == EFAULT
    assert errno_of(lambda: vm.clear_guest(2 * P, 1)) == EFAULT
    # a write running into the read-only slot: the pages before it stay written
    assert errno_of(lambda: vm.write_guest(P, b"y" * (P + 10))) == EFAULT
    assert a.read(P, P) == b"y" * P
    assert r.read(0, 4) == b"rom!"
    assert dirty_pages(vm.get_dirty_log(0)) == [1]
    assert dirty_pages(vm.get_dirty_log(1)) == []


def test_a_hole_stops_the_access_after_the_pages_before_it(
    make_vm: MakeVm, mems: list[HostMemory]
) -> None:
    a, c = mem(mems, 4 * P), mem(mems, 4 * P)
    vm = make_vm()
    vm.set_user_memory_region(0, LOG, 0, 4 * P, a.addr)
    vm.set_user_memory_region(1, LOG, 5 * P, 3 * P, c.addr)  # page 4 is a hole
    assert errno_of(lambda: vm.write_guest(2 * P, b"z" * (4 * P))) == EFAULT
    assert a.read(2 * P, 2 * P) == b"z" * (2 * P)
    assert c.read(0, 3 * P) == bytes(3 * P)
    assert dirty_pages(vm.get_dirty_log(0)) == [2, 3]
    assert dirty_pages(vm.get_dirty_log(1)) == []
    assert errno_of(lambda: vm.read_guest(3 * P, 2 * P)) == EFAULT
    assert errno_of(lambda: vm.clear_guest(0, 5 * P)) == EFAULT
    assert a.read(0, 4 * P) == bytes(4 * P)  # cleared up to the hole
    assert errno_of(lambda: vm.write_guest(4 * P + 10, b"q")) == EFAULT
    assert errno_of(lambda: vm.read_guest(100 * P, 1)) == EFAULT


def test_invalid_slot_faults(make_vm: MakeVm, mems: list[HostMemory]) -> None:
    a = mem(mems, 2 * P)
    vm = make_vm()
    vm.set_user_memory_region(0, 0, 0, 2 * P, a.addr)
    seen: list[tuple[bool, int, int]] = []

    def during_invalidation(old: Memslot) -> None:
        gpa = old.base_gfn * P
        s = vm.gfn_to_memslot(old.base_gfn)
        seen.append(
            (
                s is not None and s.invalid,
                errno_of(lambda: vm.write_guest(gpa, b"x")),
                errno_of(lambda: vm.read_guest(gpa, 1)),
            )
        )

    vm.register_invalidate_callback(during_invalidation)
    vm.set_user_memory_region(0, 0, 8 * P, 2 * P, a.addr)  # MOVE
    vm.set_user_memory_region(0, 0, 0, 0, 0)  # DELETE
    assert seen == [(True, EFAULT, EFAULT)] * 2
    assert a.read(0, 1) == b"\0"
    assert vm.callback_errors == []


def test_hvas_outside_a_live_host_memory_fault(make_vm: MakeVm, mems: list[HostMemory]) -> None:
    vm = make_vm()
    vm.set_user_memory_region(0, 0, 0, P, 0x7F0000000000)  # a foreign address
    raw = mmap.mmap(-1, P)  # a real mapping the library does not know
    anchor = ctypes.c_char.from_buffer(raw)
    raw_addr = ctypes.addressof(anchor)
    del anchor
    vm.set_user_memory_region(1, 0, P, P, raw_addr)
    closed = HostMemory(P)
    vm.set_user_memory_region(2, 0, 2 * P, P, closed.addr)
    closed.close()
    vm.set_user_memory_region(3, 0, 3 * P, P, 0)  # hva 0
    for gpa in (0, P, 2 * P, 3 * P):
        assert errno_of(lambda: vm.write_guest(gpa, b"x")) == EFAULT  # noqa: B023
        assert errno_of(lambda: vm.read_guest(gpa, 1)) == EFAULT  # noqa: B023
        assert errno_of(lambda: vm.clear_guest(gpa, 1)) == EFAULT  # noqa: B023
    assert raw[0:1] == b"\0"
    raw.close()


def test_a_slot_straddling_the_end_of_its_mapping(make_vm: MakeVm, mems: list[HostMemory]) -> None:
    m = mem(mems, 2 * P)
    vm = make_vm()
    vm.set_user_memory_region(0, LOG, 0, 4 * P, m.addr)  # pages 2, 3 are past the end
    assert errno_of(lambda: vm.write_guest(P, b"w" * (2 * P))) == EFAULT
    assert m.read(P, P) == b"w" * P
    assert dirty_pages(vm.get_dirty_log(0)) == [1]
    assert errno_of(lambda: vm.read_guest(0, 3 * P)) == EFAULT
    assert vm.read_guest(0, 2 * P) == bytes(P) + b"w" * P


def test_a_slot_spanning_two_adjacent_mappings(mems: list[HostMemory]) -> None:
    """Pages are resolved one run at a time: a slot whose hva range runs from one live
    mapping into the next one is accessible throughout."""
    pair = None
    for _ in range(16):
        m = mem(mems, 2 * P)
        for other in mems[:-1]:
            if other.end == m.addr:
                pair = (other, m)
            elif m.end == other.addr:
                pair = (m, other)
        if pair:
            break
    if pair is None:
        pytest.skip("the kernel placed no two mappings next to each other")
    lo, hi = pair
    vm = Vm()
    vm.set_user_memory_region(0, LOG, 0, 4 * P, lo.addr)
    data = pattern(3 * P)
    vm.write_guest(P // 2, data)
    assert lo.read(P // 2, 2 * P - P // 2) + hi.read(0, P + P // 2) == data
    assert vm.read_guest(P // 2, 3 * P) == data
    assert dirty_pages(vm.get_dirty_log(0)) == [0, 1, 2, 3]


def test_address_and_length_limits(mems: list[HostMemory]) -> None:
    m = mem(mems, 4 * P)
    vm = Vm(max_gfn=(1 << 52) - 1)
    top = (1 << 64) - 3 * P
    vm.set_user_memory_region(0, LOG, top, 2 * P, m.addr)  # ends one page below 2^64
    vm.set_user_memory_region(1, LOG, 0, P, m.addr + 2 * P)
    vm.write_guest(top, b"t" * (2 * P))
    assert errno_of(lambda: vm.write_guest(top, b"u" * (3 * P))) == EFAULT
    assert errno_of(lambda: vm.write_guest((1 << 64) - P, b"v" * (2 * P))) == EFAULT  # wraps
    assert errno_of(lambda: vm.read_guest((1 << 64) - 1, 2)) == EFAULT
    assert errno_of(lambda: vm.read_guest(1 << 64, 1)) == EINVAL
    assert errno_of(lambda: vm.read_guest(-1, 1)) == EINVAL
    assert errno_of(lambda: vm.write_guest(-P, b"x")) == EINVAL
    assert errno_of(lambda: vm.read_guest(0, -1)) == EINVAL
    assert errno_of(lambda: vm.clear_guest(0, -1)) == EINVAL
    # huge lengths run into the end of the slot, never into an allocation or other memory
    assert errno_of(lambda: vm.read_guest(0, 1 << 70)) == EFAULT
    m.write(2 * P, b"\xff" * P)
    assert errno_of(lambda: vm.clear_guest(0, 1 << 70)) == EFAULT
    assert m.read(2 * P, P) == bytes(P)
    assert m.read(0, 2 * P) == b"u" * (2 * P)
    vm.write_guest(P, b"")  # empty: nothing to do, even in a hole
    assert vm.read_guest(5 * P, 0) == b""


def test_write_accepts_any_buffer_and_overlapping_sources(
    make_vm: MakeVm, mems: list[HostMemory]
) -> None:
    m = mem(mems, 4 * P)
    vm = make_vm()
    vm.set_user_memory_region(0, 0, 0, 4 * P, m.addr)
    vm.write_guest(0, bytearray(b"ab"))
    vm.write_guest(2, memoryview(b"cd"))
    vm.write_guest(4, array("I", [0x64636261]))
    assert vm.read_guest(0, 8) == b"abcdabcd"
    with m.view() as v:
        vm.write_guest(2, v[0:8])  # source and destination overlap: memmove semantics
    assert vm.read_guest(0, 10) == b"ababcdabcd"


def test_read_guest_into(make_vm: MakeVm, mems: list[HostMemory]) -> None:
    m = mem(mems, 2 * P)
    m.write(0, pattern(2 * P))
    vm = make_vm()
    vm.set_user_memory_region(0, RO, 0, 2 * P, m.addr)
    buf = bytearray(P)
    read_guest_into(vm, P // 2, buf)
    assert bytes(buf) == pattern(2 * P)[P // 2 : P // 2 + P]
    big = bytearray(3 * P)
    assert errno_of(lambda: read_guest_into(vm, 0, big)) == EFAULT
    assert bytes(big[: 2 * P]) == pattern(2 * P)
    with pytest.raises(TypeError):
        read_guest_into(vm, 0, b"readonly")


def test_other_address_space(mems: list[HostMemory]) -> None:
    from memslots.guest_memory import read_guest, write_guest

    a, b = mem(mems, P), mem(mems, P)
    vm = Vm()
    vm.set_user_memory_region(0, 0, 0, P, a.addr)
    vm.set_user_memory_region(1 << 16, 0, 0, P, b.addr)
    write_guest(vm, 0, b"smm", as_id=1)
    assert read_guest(vm, 0, 3, as_id=1) == b"smm"
    assert vm.read_guest(0, 3) == bytes(3)


def test_vm_methods_take_the_address_space_and_any_buffer(
    make_vm: MakeVm, mems: list[HostMemory]
) -> None:
    """The VM's guest-memory methods have the module functions' signatures: ``as_id``
    keyword, any bytes-like data; address space 1 is reached only when asked for."""
    a, b = mem(mems, 2 * P), mem(mems, 2 * P)
    vm = make_vm()
    vm.set_user_memory_region(0, 0, 0, 2 * P, a.addr)
    vm.set_user_memory_region(1 << 16, LOG, 0, 2 * P, b.addr)
    vm.write_guest(P - 4, array("I", [0x11223344, 0x55667788]), as_id=1)
    assert b.read(P - 4, 8) == bytes.fromhex("4433221188776655")
    assert a.read(0, 2 * P) == bytes(2 * P)
    assert vm.read_guest(P - 4, 8, as_id=1) == b.read(P - 4, 8)
    buf = bytearray(8)
    vm.read_guest_into(P - 4, memoryview(buf), as_id=1)
    assert bytes(buf) == b.read(P - 4, 8)
    vm.clear_guest(P - 2, 4, as_id=1)
    assert vm.read_guest(P - 4, 8, as_id=1) == bytes.fromhex("4433000000006655")
    assert vm.read_guest(P - 4, 8) == bytes(8)  # address space 0 is another memory
    assert dirty_pages(vm.get_dirty_log(1 << 16)) == [0, 1]
    assert errno_of(lambda: vm.read_guest(0, 1, as_id=2)) == EINVAL


def test_large_clear(make_vm: MakeVm, mems: list[HostMemory]) -> None:
    m = mem(mems, 3 << 20)
    with m.view() as v:
        v[:] = b"\x5a" * m.size
    vm = make_vm()
    vm.set_user_memory_region(0, LOG, 0, m.size, m.addr)
    vm.clear_guest(10, m.size - 20)
    assert m.read(0, 10) == b"\x5a" * 10 and m.read(m.size - 10, 10) == b"\x5a" * 10
    assert m.read(10, m.size - 20) == bytes(m.size - 20)
    assert dirty_pages(vm.get_dirty_log(0)) == list(range(m.size // P))


# ======================================================================================
# Model-based: random accesses against a page-by-page model of the kernel's walk
# ======================================================================================
@pytest.fixture(scope="module")
def model_memory() -> Iterator[tuple[HostMemory, HostMemory]]:
    a, b = HostMemory(8 * P), HostMemory(4 * P)
    yield a, b
    a.close()
    b.close()


# gfn layout: 0-3 slot 0 on a[0:4], logs; 4-5 slot 1 on b[0:2], read-only; 6-7 slot 2
# on a[4:6], logs; 8 a hole; 9-11 slot 3, logs: 9-10 on b[2:4], 11 past the end of b.
SLOTS = [  # (slot, flags, first gfn, npages, mapping index, page in mapping)
    (0, LOG, 0, 4, 0, 0),
    (1, RO, 4, 2, 1, 0),
    (2, LOG, 6, 2, 0, 4),
    (3, LOG, 9, 3, 1, 2),  # b has 4 pages: pages 9, 10 map b[2:4], page 11 is past its end
]


@settings(max_examples=120, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["read", "write", "clear"]),
            st.integers(0, 12 * P),
            st.integers(0, 5 * P),
            st.integers(0, 255),
        ),
        max_size=12,
    )
)
def test_model(ops: list[tuple[str, int, int, int]], model_memory: tuple[HostMemory, ...]) -> None:
    maps = model_memory
    for m in maps:
        m.write(0, bytes(m.size))
    vm = Vm()
    pages: dict[int, tuple[int, int, bool, bool]] = {}  # gfn -> (map, page, writable, logs)
    for slot, flags, gfn, n, mi, mp in SLOTS:
        vm.set_user_memory_region(slot, flags, gfn * P, n * P, maps[mi].addr + mp * P)
        for i in range(n):
            # the page past the end of b is a fault, unless the kernel happened to place
            # another of the mappings right after b: then the page is in that mapping
            hva = maps[mi].addr + (mp + i) * P
            for j, m in enumerate(maps):
                if m.addr <= hva < m.end:
                    pages[gfn + i] = (j, (hva - m.addr) // P, not flags & RO, bool(flags & LOG))
    model = [bytearray(m.size) for m in maps]
    dirty: set[int] = set()
    for kind, gpa, length, seed in ops:
        write = kind != "read"
        data = pattern(length, seed) if kind == "write" else bytes(length)
        # the kernel's walk, one page at a time
        out = bytearray()
        expect_err = 0
        pos = 0
        while pos < length:
            gfn, off = divmod(gpa + pos, P)
            seg = min(P - off, length - pos)
            page = pages.get(gfn)
            if page is None or (write and not page[2]):
                expect_err = EFAULT
                break
            mi, mp, _, logs = page
            lo = mp * P + off
            if write:
                model[mi][lo : lo + seg] = data[pos : pos + seg]
                if logs:
                    dirty.add(gfn)
            else:
                out += model[mi][lo : lo + seg]
            pos += seg
        got: list[bytes] = []
        if kind == "read":
            err = errno_of(lambda: got.append(vm.read_guest(gpa, length)))  # noqa: B023
        elif kind == "write":
            err = errno_of(lambda: vm.write_guest(gpa, data))  # noqa: B023
        else:
            err = errno_of(lambda: vm.clear_guest(gpa, length))  # noqa: B023
        assert err == expect_err
        if kind == "read" and not err:
            assert got[0] == bytes(out)
        for m, mod in zip(maps, model, strict=True):
            assert m.read(0, m.size) == bytes(mod)
    logged: set[int] = set()
    for slot, flags, gfn, _, _, _ in SLOTS:
        if flags & LOG:
            logged |= {gfn + p for p in dirty_pages(vm.get_dirty_log(slot))}
    assert logged == dirty


# ======================================================================================
# Concurrency: close() and slot changes racing copies
# ======================================================================================
def _copier(
    vm: Vm, kind: str, barrier: threading.Barrier, errors: list[BaseException], done: list[int]
) -> None:
    barrier.wait()
    data = b"k" * (16 * P)
    for i in range(100_000):
        try:
            if kind == "w":
                vm.write_guest(0, data)
            else:
                vm.read_guest(0, 16 * P)
        except MemslotError as exc:
            if exc.errno != EFAULT:
                errors.append(exc)
            done.append(i)
            return
        except BaseException as exc:  # pragma: no cover - a failure
            errors.append(exc)
            return


@pytest.mark.stress
def test_close_racing_copies_only_ever_gives_efault() -> None:
    rng = random.Random(3)
    done: list[int] = []
    for _ in range(20):
        m = HostMemory(16 * P)
        vm = Vm()
        vm.set_user_memory_region(0, LOG, 0, 16 * P, m.addr)
        errors: list[BaseException] = []
        barrier = threading.Barrier(3)
        threads = [
            threading.Thread(target=_copier, args=(vm, k, barrier, errors, done)) for k in "wr"
        ]
        for t in threads:
            t.start()
        barrier.wait()
        time.sleep(rng.random() * 0.003)
        m.close()
        for t in threads:
            t.join(WAIT)
        assert not any(t.is_alive() for t in threads)
        assert errors == []
        assert errno_of(lambda: vm.write_guest(0, b"x")) == EFAULT  # noqa: B023
        assert errno_of(lambda: vm.read_guest(0, 1)) == EFAULT  # noqa: B023
    # every copier stopped at the close, most after copying for a while
    assert len(done) == 40 and sum(done) > 0


@pytest.mark.stress
def test_slot_changes_racing_copies(mems: list[HostMemory]) -> None:
    m = mem(mems, 64 * P)
    vm = Vm()
    vm.set_user_memory_region(0, LOG, 0, 32 * P, m.addr)
    vm.set_user_memory_region(1, LOG, 32 * P, 32 * P, m.addr + 32 * P)
    stop = threading.Event()
    errors: list[BaseException] = []
    results = {"ok": 0, "efault": 0}

    def worker() -> None:
        data = b"r" * (16 * P)
        while not stop.is_set():
            try:
                vm.write_guest(24 * P, data)  # crosses from slot 0 into slot 1
                vm.read_guest(24 * P, 16 * P)
                results["ok"] += 1
            except MemslotError as exc:
                if exc.errno != EFAULT:
                    errors.append(exc)
                results["efault"] += 1
            except BaseException as exc:  # pragma: no cover - a failure
                errors.append(exc)
                return

    t = threading.Thread(target=worker)
    t.start()
    deadline = time.monotonic() + 0.3
    try:
        i = 0
        while time.monotonic() < deadline or results["ok"] < 10:
            i += 1
            # move slot 1 away and back, toggle its logging, delete and re-create it
            vm.set_user_memory_region(1, LOG, 1000 * P, 32 * P, m.addr + 32 * P)
            vm.set_user_memory_region(1, 0, 32 * P, 32 * P, m.addr + 32 * P)
            vm.set_user_memory_region(1, LOG, 32 * P, 32 * P, m.addr + 32 * P)
            if i % 10 == 0:
                vm.set_user_memory_region(1, 0, 0, 0, 0)
                vm.set_user_memory_region(1, LOG, 32 * P, 32 * P, m.addr + 32 * P)
    finally:
        stop.set()
        t.join(WAIT)
    assert not t.is_alive()
    assert errors == []
    vm.check_invariants()
    assert m.read(24 * P, 8 * P) == b"r" * (8 * P)


def test_unknown_address_space_is_einval(mems: list[HostMemory]) -> None:
    from memslots.guest_memory import clear_guest, read_guest, write_guest

    vm = Vm(nr_address_spaces=1)
    for as_id in (1, -1):
        assert errno_of(lambda: read_guest(vm, 0, 1, as_id=as_id)) == EINVAL  # noqa: B023
        assert errno_of(lambda: write_guest(vm, 0, b"x", as_id=as_id)) == EINVAL  # noqa: B023
        assert errno_of(lambda: clear_guest(vm, 0, 1, as_id=as_id)) == EINVAL  # noqa: B023
