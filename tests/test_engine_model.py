"""Model-based test: random create / delete / move / flags / no-op / invalid requests
(and injected faults) against the naive model in tests/model.py. After every step the
errno, the slot table, every generation and the page count must agree, and the
implementation's invariants must hold. Both designs run with 4 KiB pages, and with the
16 and 64 KiB pages of arm64 kernels built so (``VmLimits.page_shift`` 14 and 16)."""

from __future__ import annotations

import errno
from typing import Any, ClassVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from memslots import MemslotError, Vm
from memslots.baseline import ArrayVm
from memslots.constants import X86_MAX_GFN
from memslots.faults import POINTS
from memslots.validate import VmLimits
from model import Model

NR_AS = 2
IDS = st.one_of(st.integers(0, 5), st.sampled_from([32763, 32764, 0xFFFF]))
AS = st.one_of(st.just(0), st.just(0), st.just(1), st.just(2))
PAGES = st.one_of(st.integers(0, 40), st.just(1 << 28), st.sampled_from([(1 << 40) - 3]))
# Addresses and sizes are drawn as ("p", pages), scaled by the machine's page size, or as
# ("b", bytes); -1 bytes stands for 2^64 - one page. Bytes such as 4096 are aligned for
# 4 KiB pages only.
GPA = st.one_of(
    PAGES.map(lambda p: ("p", p)),
    st.sampled_from([1, 4095, 4096, -1, 1 << 52]).map(lambda b: ("b", b)),
)
SIZE = st.one_of(
    st.integers(0, 12).map(lambda p: ("p", p)),
    st.sampled_from([0, 100, 4096, 1 << 43, -1]).map(lambda b: ("b", b)),
)
HVA = st.one_of(
    st.integers(0, 8).map(lambda p: ("p", p)),
    st.sampled_from([8, 0x100000 + 4096, 0x7FFFFFFFE000, 0x7FFFFFFFF000, 0xFFFF800000000000]).map(
        lambda b: ("b", b)
    ),
)
FLAGS = st.sampled_from([0, 0, 1, 2, 3, 4, 8, 1 << 31])
#: the hvas of generated slots start here (aligned for every page size)
HVA_BASE = 0x100000


class EngineMachine(RuleBasedStateMachine):
    impl: ClassVar[Any] = Vm
    #: log2 of the page size of the VM under test
    page_shift: ClassVar[int] = 12

    def __init__(self) -> None:
        super().__init__()
        self.page = 1 << self.page_shift
        limits = VmLimits(NR_AS, 32764, X86_MAX_GFN, page_shift=self.page_shift)
        self.vm = self.impl(profile=limits)
        self.model = Model(nr_as=NR_AS, page=self.page)

    def _bytes(self, value: tuple[str, int], base: int = 0) -> int:
        """A drawn ("p", pages) or ("b", bytes) value in bytes."""
        kind, n = value
        if kind == "p":
            return base + n * self.page
        return (1 << 64) - self.page if n == -1 else n

    def _do(
        self,
        v2: bool,
        slot: int,
        flags: int,
        gpa: int,
        size: int,
        hva: int,
        fault: str | None = None,
    ) -> None:
        expected = self.model.apply(v2, slot, flags, gpa, size, hva, fault)
        if fault is not None:
            self.vm.faults.inject(fault)
        call = self.vm.set_user_memory_region2 if v2 else self.vm.set_user_memory_region
        try:
            call(slot, flags, gpa, size, hva)
            got = 0
        except MemslotError as exc:
            got = exc.errno or 0
        finally:
            self.vm.faults.clear()
        assert got == expected, (
            f"request slot={slot:#x} flags={flags:#x} gpa={gpa:#x} size={size:#x} "
            f"hva={hva:#x} fault={fault}: got {errno.errorcode.get(got, got)}, "
            f"model says {errno.errorcode.get(expected, expected)}"
        )

    @rule(v2=st.booleans(), as_id=AS, id=IDS, flags=FLAGS, gpa=GPA, size=SIZE, hva=HVA)
    def any_request(
        self,
        v2: bool,
        as_id: int,
        id: int,
        flags: int,
        gpa: tuple[str, int],
        size: tuple[str, int],
        hva: tuple[str, int],
    ) -> None:
        self._do(
            v2, (as_id << 16) | id, flags, self._bytes(gpa), self._bytes(size),
            self._bytes(hva, HVA_BASE),
        )  # fmt: skip

    @rule(id=st.integers(0, 5), as_id=st.sampled_from([0, 0, 1]), pages=st.integers(0, 40),
          npages=st.integers(1, 8), flags=st.sampled_from([0, 1, 2, 3]),
          hva=st.integers(0, 8))  # fmt: skip
    def create(self, id: int, as_id: int, pages: int, npages: int, flags: int, hva: int) -> None:
        p = self.page
        self._do(False, (as_id << 16) | id, flags, pages * p, npages * p,
                 HVA_BASE + hva * p)  # fmt: skip

    def _existing(self, data: st.DataObject) -> tuple[tuple[int, int], tuple[int, ...]] | None:
        if not self.model.slots:
            return None
        key = data.draw(st.sampled_from(sorted(self.model.slots)))
        return key, self.model.slots[key]

    @rule(data=st.data(), fault=st.one_of(st.none(), st.sampled_from(POINTS[:4])))
    def delete(self, data: st.DataObject, fault: str | None) -> None:
        e = self._existing(data)
        if e is not None:
            (a, i), _ = e
            self._do(False, (a << 16) | i, 0, 0, 0, 0, fault)

    @rule(data=st.data(), to=st.integers(0, 48), log=st.booleans(),
          fault=st.one_of(st.none(), st.sampled_from(POINTS[:4])))  # fmt: skip
    def move(self, data: st.DataObject, to: int, log: bool, fault: str | None) -> None:
        e = self._existing(data)
        if e is not None:
            (a, i), (_, n, f, hva) = e
            flags = (f & ~1) | int(log)
            self._do(False, (a << 16) | i, flags, to * self.page, n * self.page, hva, fault)

    @rule(data=st.data(), fault=st.one_of(st.none(), st.sampled_from(POINTS[:4])))
    def toggle_logging(self, data: st.DataObject, fault: str | None) -> None:
        e = self._existing(data)
        if e is not None:
            (a, i), (b, n, f, hva) = e
            self._do(False, (a << 16) | i, f ^ 1, b * self.page, n * self.page, hva, fault)

    @rule(data=st.data())
    def noop(self, data: st.DataObject) -> None:
        e = self._existing(data)
        if e is not None:
            (a, i), (b, n, f, hva) = e
            self._do(False, (a << 16) | i, f, b * self.page, n * self.page, hva)

    @rule(data=st.data(), fault=st.sampled_from(POINTS[:4]), id=st.integers(0, 5),
          pages=st.integers(0, 40), flags=st.sampled_from([0, 1]))  # fmt: skip
    def create_with_fault(
        self, data: st.DataObject, fault: str, id: int, pages: int, flags: int
    ) -> None:
        self._do(False, id, flags, pages * self.page, self.page, HVA_BASE, fault)

    @invariant()
    def agrees_with_model(self) -> None:
        table = [s.as_tuple() for s in self.vm.slots()]
        assert table == self.model.table()
        for s in self.vm.slots():
            assert s.page_shift == self.page_shift
            assert s.memory_size == s.npages * self.page
            assert s.hva_last == s.userspace_addr + s.npages * self.page - 1
        for a in range(NR_AS):
            assert self.vm.memslots(a).generation == self.model.gen[a], f"generation of as {a}"
        assert self.vm.nr_memslot_pages == self.model.pages
        self.vm.check_invariants()


EngineMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestTreeEngine = EngineMachine.TestCase


class ArrayMachine(EngineMachine):
    impl = ArrayVm


ArrayMachine.TestCase.settings = EngineMachine.TestCase.settings
TestArrayBaseline = ArrayMachine.TestCase


# The same machines with 16 KiB and 64 KiB pages (arm64 kernels built with
# CONFIG_ARM64_16K_PAGES / CONFIG_ARM64_64K_PAGES), fewer examples each.
_LARGER_PAGES = settings(
    max_examples=40,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


class Engine16K(EngineMachine):
    page_shift = 14


class Array16K(ArrayMachine):
    page_shift = 14


class Engine64K(EngineMachine):
    page_shift = 16


class Array64K(ArrayMachine):
    page_shift = 16


for _machine in (Engine16K, Array16K, Engine64K, Array64K):
    _machine.TestCase.settings = _LARGER_PAGES
TestTreeEngine16K = Engine16K.TestCase
TestArrayBaseline16K = Array16K.TestCase
TestTreeEngine64K = Engine64K.TestCase
TestArrayBaseline64K = Array64K.TestCase
