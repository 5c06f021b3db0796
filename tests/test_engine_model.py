"""Model-based test: random create / delete / move / flags / no-op / invalid requests
(and injected faults) against the naive model in tests/model.py. After every step the
errno, the slot table, every generation and the page count must agree, and the
implementation's invariants must hold."""

from __future__ import annotations

import errno
from typing import Any, ClassVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from memslots import MemslotError, Vm
from memslots.baseline import ArrayVm
from memslots.faults import POINTS
from model import Model

NR_AS = 2
IDS = st.one_of(st.integers(0, 5), st.sampled_from([32763, 32764, 0xFFFF]))
AS = st.one_of(st.just(0), st.just(0), st.just(1), st.just(2))
PAGES = st.one_of(st.integers(0, 40), st.just(1 << 28), st.sampled_from([(1 << 40) - 3]))
GPA = st.one_of(
    PAGES.map(lambda p: p * 4096),
    st.sampled_from([1, 4095, (1 << 64) - 4096, 1 << 52]),
)
SIZE = st.one_of(
    st.integers(0, 12).map(lambda p: p * 4096),
    st.sampled_from([0, 100, 1 << 43, (1 << 64) - 4096]),
)
HVA = st.one_of(
    st.integers(0, 8).map(lambda p: 0x100000 + p * 4096),
    st.sampled_from([8, 0x7FFFFFFFE000, 0x7FFFFFFFF000, 0xFFFF800000000000]),
)
FLAGS = st.sampled_from([0, 0, 1, 2, 3, 4, 8, 1 << 31])


class EngineMachine(RuleBasedStateMachine):
    impl: ClassVar[Any] = Vm

    def __init__(self) -> None:
        super().__init__()
        self.vm = self.impl(nr_address_spaces=NR_AS)
        self.model = Model(nr_as=NR_AS)

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
        self, v2: bool, as_id: int, id: int, flags: int, gpa: int, size: int, hva: int
    ) -> None:
        self._do(v2, (as_id << 16) | id, flags, gpa, size, hva)

    @rule(id=st.integers(0, 5), as_id=st.sampled_from([0, 0, 1]), pages=st.integers(0, 40),
          npages=st.integers(1, 8), flags=st.sampled_from([0, 1, 2, 3]),
          hva=st.integers(0, 8))  # fmt: skip
    def create(self, id: int, as_id: int, pages: int, npages: int, flags: int, hva: int) -> None:
        self._do(False, (as_id << 16) | id, flags, pages * 4096, npages * 4096,
                 0x100000 + hva * 4096)  # fmt: skip

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
            self._do(False, (a << 16) | i, flags, to * 4096, n * 4096, hva, fault)

    @rule(data=st.data(), fault=st.one_of(st.none(), st.sampled_from(POINTS[:4])))
    def toggle_logging(self, data: st.DataObject, fault: str | None) -> None:
        e = self._existing(data)
        if e is not None:
            (a, i), (b, n, f, hva) = e
            self._do(False, (a << 16) | i, f ^ 1, b * 4096, n * 4096, hva, fault)

    @rule(data=st.data())
    def noop(self, data: st.DataObject) -> None:
        e = self._existing(data)
        if e is not None:
            (a, i), (b, n, f, hva) = e
            self._do(False, (a << 16) | i, f, b * 4096, n * 4096, hva)

    @rule(data=st.data(), fault=st.sampled_from(POINTS[:4]), id=st.integers(0, 5),
          pages=st.integers(0, 40), flags=st.sampled_from([0, 1]))  # fmt: skip
    def create_with_fault(
        self, data: st.DataObject, fault: str, id: int, pages: int, flags: int
    ) -> None:
        self._do(False, id, flags, pages * 4096, 4096, 0x100000, fault)

    @invariant()
    def agrees_with_model(self) -> None:
        table = [s.as_tuple() for s in self.vm.slots()]
        assert table == self.model.table()
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
