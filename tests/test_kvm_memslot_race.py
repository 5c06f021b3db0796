"""set_memory_region_test-style checks on the real kernel (the kernel selftest
``tools/testing/selftests/kvm/set_memory_region_test.c``), through
KvmVm in strict mode:

- a vCPU thread spins reading a gpa inside a slot while the main thread moves the slot
  away and back: the guest sees only the old value, the new value, or MMIO exits (answered
  with 0xbeef) while the slot is INVALID, never the value the host put where the slot used
  to be ("foreign" data);
- deleting the slot gives MMIO exits; re-creating it over new memory shows fresh (zero)
  memory, never the old mapping's contents;
- all 32764 slot ids can be created (one page each over one MAP_NORESERVE mapping), and
  id 32764 is EINVAL.

The host writes distinct values at known points and waits until the guest has reported
the value it must see next, so every phase is really observed. Memslot calls slow down to
about 0.5 ms per grace period while the vCPU is inside KVM_RUN: the loops stay short.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from memslots import MemslotError
from memslots.guest_memory import HostMemory
from memslots.kvm import KvmVcpuHandle, KvmVm
from memslots.kvm.guests import SPIN_CONTROL_PORT, SPIN_READER, SPIN_VALUE_PORT, spin_reader_args
from memslots.kvm.vcpu import IoExit, MmioExit, RunResult

pytestmark = pytest.mark.kvm

PAGE = 4096
MEM_REGION_GPA = 0xC0000000  # the selftest's values
MEM_REGION_SIZE = 0x200000
MEM_REGION_SLOT = 10
MMIO_VAL = 0xBEEF
CODE = 0x1000
ROUNDS = 8
WAIT = 10.0  # seconds; only reached if the guest stops making progress
_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)  # Linux; Python 3.11's mmap lacks it


@dataclass
class SpinGuest:
    """The SPIN_READER guest on a thread: every value it reads, every MMIO exit."""

    vcpu: KvmVcpuHandle
    gpa: int
    values: list[int] = field(default_factory=list)
    mmio: list[MmioExit] = field(default_factory=list)
    stop: bool = False
    result: RunResult | None = None
    error: BaseException | None = None
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _thread: threading.Thread | None = None

    def _on_io(self, io: IoExit) -> int | None:
        if io.port == SPIN_VALUE_PORT:
            with self._cond:
                self.values.append(io.value)
                self._cond.notify_all()
            return None
        assert io.port == SPIN_CONTROL_PORT
        return int(self.stop)

    def _on_mmio(self, exit: MmioExit) -> int:
        self.mmio.append(exit)
        return MMIO_VAL

    def _run(self) -> None:
        try:
            self.result = self.vcpu.run_until_hlt(self._on_io, self._on_mmio, timeout=60)
        except BaseException as exc:  # reported by join()
            self.error = exc
        finally:
            with self._cond:
                self._cond.notify_all()

    def start(self) -> None:
        args = spin_reader_args(self.gpa)
        self.vcpu.setup_real_mode(CODE, regs=args.regs, segments=args.segments)
        self._thread = threading.Thread(target=self._run, name="spin-guest", daemon=True)
        self._thread.start()

    def wait_for(self, value: int, reads: int = 1) -> None:
        """Wait until the guest has read ``value`` ``reads`` times in a row since now."""
        with self._cond:
            mark = len(self.values)

            def seen() -> bool:
                tail = self.values[mark:]
                return self.error is not None or (
                    len(tail) >= reads and tail[-reads:] == [value] * reads
                )

            assert self._cond.wait_for(seen, WAIT), (
                f"the guest did not read {value:#x}; last reads: {self.values[-5:]}"
            )
            assert self.error is None, self.error

    def join(self) -> RunResult:
        self.stop = True
        assert self._thread is not None
        self._thread.join(WAIT)
        assert not self._thread.is_alive(), "the guest did not halt"
        if self.error is not None:
            raise self.error
        assert self.result is not None and self.result.halted
        return self.result


def check_order(observed: list[int], expected: list[int], *, optional: int = MMIO_VAL) -> None:
    """``observed`` (what the guest read, in order) must walk through ``expected`` in
    order: each value equals the current expected one or a later one; ``optional``
    values in ``expected`` may be skipped, the others may not (the host waited for them).
    Anything not in ``expected`` (the foreign values) fails."""
    pos = 0
    for i, v in enumerate(observed):
        if v == expected[pos]:
            continue
        nxt = pos + 1
        while nxt < len(expected) and expected[nxt] != v:
            assert expected[nxt] == optional, (
                f"read {i} = {v:#x} skips required {expected[nxt]:#x} (expected {expected})"
            )
            nxt += 1
        assert nxt < len(expected), (
            f"read {i} = {v:#x} is not allowed after {expected[pos]:#x}: foreign or stale data"
        )
        pos = nxt
    assert pos == len(expected) - 1, f"the guest stopped at {expected[pos]:#x}"


@pytest.fixture
def vm() -> Iterator[KvmVm]:
    with KvmVm() as v:
        code = v.host_memory(0x10000)
        v.set_user_memory_region(0, 0, 0, code.size, code.addr)
        v.write_guest(CODE, SPIN_READER)
        yield v


def put(mem: HostMemory, offset: int, value: int) -> None:
    mem.write(offset, value.to_bytes(4, "little"))


def test_move_never_shows_foreign_data(vm: KvmVm) -> None:
    # The slot alternates between base G (gpa G = offset 0 of the memory) and base G-4096
    # (gpa G = offset 4096). While the guest reads one offset, the host writes a foreign
    # value into the other, waits for the guest to read on, then puts the value the guest
    # must see after the next move there. Only old, new and MMIO_VAL may ever be read.
    mem = vm.host_memory(MEM_REGION_SIZE)
    offsets = (0, PAGE)  # what gpa G maps to at base G, at base G - 4096
    bases = (MEM_REGION_GPA, MEM_REGION_GPA - PAGE)
    values = [0x1000_0000 + r for r in range(ROUNDS + 1)]  # what the guest must see
    foreign = [0xF000_0000 + r for r in range(ROUNDS)]
    put(mem, 0, values[0])
    put(mem, PAGE, values[1])
    vm.set_user_memory_region(MEM_REGION_SLOT, 0, bases[0], MEM_REGION_SIZE, mem.addr)
    guest = SpinGuest(vm.create_vcpu(0), MEM_REGION_GPA)
    guest.start()
    guest.wait_for(values[0])
    for r in range(ROUNDS):
        now = (r + 1) % 2  # the base the slot moves to in this round
        vm.set_user_memory_region(MEM_REGION_SLOT, 0, bases[now], MEM_REGION_SIZE, mem.addr)
        guest.wait_for(values[r + 1])
        # the offset gpa G no longer maps to: foreign from the guest's point of view
        stale = offsets[1 - now]
        put(mem, stale, foreign[r])
        guest.wait_for(values[r + 1], reads=20)  # give a stale translation time to show
        if r + 2 <= ROUNDS:
            put(mem, stale, values[r + 2])  # what the next move must reveal
    result = guest.join()
    expected = [v for r in range(ROUNDS) for v in (values[r], MMIO_VAL)] + [values[ROUNDS]]
    check_order(guest.values, expected)
    for m in guest.mmio:  # every MMIO exit is the guest's 4-byte read of gpa G
        assert (m.phys_addr, m.length, m.is_write) == (MEM_REGION_GPA, 4, False)
    assert result.mmio_exits == len(guest.mmio) == guest.values.count(MMIO_VAL)
    assert not set(foreign) & set(guest.values)
    assert vm.disagreements == []


def test_delete_gives_mmio_and_recreate_gives_fresh_memory(vm: KvmVm) -> None:
    old = vm.host_memory(MEM_REGION_SIZE)
    put(old, 0, 0x600D_0000)
    vm.set_user_memory_region(MEM_REGION_SLOT, 0, MEM_REGION_GPA, MEM_REGION_SIZE, old.addr)
    guest = SpinGuest(vm.create_vcpu(0), MEM_REGION_GPA)
    guest.start()
    guest.wait_for(0x600D_0000)
    expected = [0x600D_0000]
    for r in range(ROUNDS):
        vm.set_user_memory_region(MEM_REGION_SLOT, 0, 0, 0, 0)  # delete
        guest.wait_for(MMIO_VAL)
        put(old, 0, 0xF000_0000 + r)  # the deleted slot's memory: never visible again
        guest.wait_for(MMIO_VAL, reads=10)
        fresh = vm.host_memory(MEM_REGION_SIZE)  # re-create over new, zeroed memory
        vm.set_user_memory_region(MEM_REGION_SLOT, 0, MEM_REGION_GPA, MEM_REGION_SIZE, fresh.addr)
        guest.wait_for(0)
        put(fresh, 0, 0x600D_0001 + r)
        guest.wait_for(0x600D_0001 + r)
        old = fresh
        expected += [MMIO_VAL, 0, 0x600D_0001 + r]
    guest.join()
    check_order(guest.values, expected, optional=-1)  # every phase was waited for
    assert all(m.phys_addr == MEM_REGION_GPA and not m.is_write for m in guest.mmio)
    assert vm.disagreements == []


def test_check_order() -> None:
    check_order([1, 1, MMIO_VAL, 2, 2], [1, MMIO_VAL, 2])
    check_order([1, 2, 2, 3], [1, MMIO_VAL, 2, MMIO_VAL, 3])
    for bad in ([1, 7, 2], [2, 1], [1, MMIO_VAL, 1, 2], [1, 3]):
        with pytest.raises(AssertionError):
            check_order(bad, [1, MMIO_VAL, 2, 3] if bad == [1, 3] else [1, MMIO_VAL, 2])


def test_all_32764_slots_then_the_next_id_is_einval() -> None:
    # one page per slot over one lazily-backed mapping (no page is ever touched); not a
    # HostMemory of the VM, so close() need not delete 32764 slots one by one first
    n = 32764  # KVM_CAP_NR_MEMSLOTS on x86
    backing = mmap.mmap(-1, n * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _NORESERVE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(backing))
    try:
        with KvmVm() as vm:
            assert vm.limits.max_user_slots == n
            t0 = time.perf_counter()
            for i in range(n):
                vm.set_user_memory_region(i, 0, i * PAGE, PAGE, base + i * PAGE)
            t1 = time.perf_counter()
            with pytest.raises(MemslotError) as info:
                vm.set_user_memory_region(n, 0, n * PAGE, PAGE, base)
            assert info.value.errno == errno.EINVAL
            assert len(vm.memslots(0)) == n and vm.nr_memslot_pages == n
            # the engine serves lookups over the full table
            assert vm.gfn_to_memslot(n - 1) is vm.memslots(0).id_to_memslot(n - 1)
            assert vm.disagreements == []
            t2 = time.perf_counter()
        t3 = time.perf_counter()  # the VM, with its slots, is gone before the mapping
    finally:
        backing.close()
    # reported (pytest -s), not asserted: timings belong to benchmarks
    print(f"\n{n} creates through KvmVm: {t1 - t0:.2f} s; close(): {t3 - t2:.2f} s")
