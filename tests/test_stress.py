"""Concurrent stress: readers check every answer against the history of published states
while a writer changes slots (memslots.tools.stress), the checker's own sensitivity, and
``memslots stress``."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from memslots import Memslot
from memslots.faults import POINTS
from memslots.memslot_set import MemslotSet
from memslots.sync import Srcu
from memslots.tools.cli import main
from memslots.tools.stress import (
    FOUND,
    LOST,
    NOT_FOUND,
    History,
    HistoryVm,
    RandomWriter,
    Reader,
    StressReport,
    check_invariants,
    run_stress,
)

WAIT = 10.0
HVA = 0x7F00_0000_0000


@pytest.fixture
def fast_switching() -> Iterator[None]:
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


def slot(id: int, base: int, npages: int = 1) -> Memslot:
    return Memslot(id, 0, base, npages, 0, HVA + (id << 20))


# --- the history ------------------------------------------------------------------------
def test_history_finds_versions_active_during_a_call() -> None:
    a, b = slot(0, 0x10), slot(1, 0x20)
    h = History(())
    v1 = h.record(10, (a,))
    v1.end = 20
    v2 = h.record(30, (a, b))
    v2.end = 40
    # version 0 (empty) was active until swap 1 ended (20), version 1 until 40
    assert h.find(1, 5, lambda v: v.slot_at(0x10) is None) == FOUND
    assert h.find(25, 28, lambda v: v.slot_at(0x10) is None) == NOT_FOUND
    assert h.find(25, 28, lambda v: v.slot_at(0x10) is a) == FOUND
    assert h.find(25, 28, lambda v: v.slot_at(0x20) is b) == NOT_FOUND
    assert h.find(25, 35, lambda v: v.slot_at(0x20) is b) == FOUND  # overlaps swap 2
    assert h.find(45, 50, lambda v: v.slot_at(0x20) is b) == FOUND  # latest, open-ended
    assert h.find(45, 50, lambda v: v.slot_at(0x20) is None) == NOT_FOUND


def test_history_in_flight_swap_counts_as_possibly_published() -> None:
    a = slot(0, 0x10)
    h = History(())
    h.record(10, (a,))  # end None: the swap is still running
    assert h.find(11, 12, lambda v: v.slot_at(0x10) is a) == FOUND
    assert h.find(11, 12, lambda v: v.slot_at(0x10) is None) == FOUND  # old one too


def test_history_pruning() -> None:
    h = History(())
    for i in range(1, 6):
        v = h.record(10 * i, (slot(0, i),))
        v.end = 10 * i + 5
    # versions 0 and 1 were replaced by swaps that ended at 15 and 25; version 2 at 35
    assert h.prune(32) == 2
    assert h.first == 2 and len(h) == 4
    assert h.find(100, 101, lambda v: v.slot_at(5) is not None) == FOUND
    assert h.find(1, 2, lambda v: False) == LOST


# --- the checker finds what it must find --------------------------------------------------
def test_reader_flags_a_slot_that_was_never_published() -> None:
    class Forged(HistoryVm):
        def gfn_to_memslot(self, gfn: int) -> Memslot | None:
            return slot(0, gfn)  # a fresh object nobody published

    vm = Forged()
    r = Reader(vm, 0, seed=1)
    r.check_vm_lookup(0x42)
    assert r.stats.violations == 1
    assert "never published" in r.stats.messages[0]


def test_reader_flags_a_stale_vcpu_answer() -> None:
    vm = HistoryVm()
    vm.set_user_memory_region(0, 0, 0, 0x10000, HVA)
    r = Reader(vm, 0, seed=1)
    r.check_vcpu_lookup(0)
    assert r.stats.violations == 0
    stale = vm.gfn_to_memslot(0)
    vm.set_user_memory_region(0, 0, 0, 0, HVA)  # deleted; then let the vCPU lie

    class LyingVcpu:
        as_id = 0

        def gfn_to_memslot(self, gfn: int) -> Memslot | None:
            return stale

    r.vcpu = LyingVcpu()  # type: ignore[assignment]
    r.check_vcpu_lookup(0)
    assert r.stats.violations == 1


def test_reader_flags_a_set_changed_under_it_without_a_grace_period() -> None:
    """A writer without grace periods changes the set a reader holds: caught."""

    class NoGrace(Srcu):
        __slots__ = ()

        def synchronize(self) -> None:
            self.grace_periods += 1

    vm = HistoryVm()
    vm.srcu = NoGrace()
    vm.set_user_memory_region(0, 0, 0, 0x10000, HVA)
    r = Reader(vm, 0, seed=1)

    def write() -> None:
        vm.set_user_memory_region(1, 0, 0x100000, 0x1000, HVA)
        vm.set_user_memory_region(2, 0, 0x200000, 0x1000, HVA)

    def hold() -> None:  # the writer runs (in its own thread) while the reader holds the set
        w = threading.Thread(target=write, daemon=True)
        w.start()
        w.join(WAIT)
        assert not w.is_alive()

    r.check_range(0, 0, 0x400, HVA, 0x1000, hold=hold)
    assert r.stats.violations >= 1
    assert any("changed while held" in m for m in r.stats.messages)


def test_reader_holding_a_set_delays_the_writer_and_sees_no_change() -> None:
    """The same interleaving with the real engine: the update publishes, then waits for
    the reader; the reader's checks pass."""
    vm = HistoryVm()
    vm.set_user_memory_region(0, 0, 0, 0x10000, HVA)
    r = Reader(vm, 0, seed=1)
    writer_started = threading.Event()
    published = threading.Event()
    done: list[bool] = []

    def write() -> None:
        writer_started.set()
        vm.set_user_memory_region(1, 0, 0x100000, 0x1000, HVA)
        done.append(True)

    def hold() -> None:
        w = threading.Thread(target=write, daemon=True)
        w.start()
        assert writer_started.wait(WAIT)
        for _ in range(1000):  # until the new set is published (bounded)
            if vm.histories[0].last >= 1 and vm.memslots(0).id_to_memslot(1) is not None:
                published.set()
                break
            threading.Event().wait(0.005)
        assert not done, "the update completed while a reader held the old set"

    r.check_range(0, 0, 0x400, HVA, 0x1000, hold=hold)
    assert published.is_set()
    assert r.stats.violations == 0, r.stats.messages
    for _ in range(1000):
        if done:
            break
        threading.Event().wait(0.005)
    assert done == [True]
    problems = check_invariants(vm)
    assert problems == []


# --- the writer alone ---------------------------------------------------------------------
def test_random_writer_expectations_hold_with_many_faults() -> None:
    vm = HistoryVm()
    w = RandomWriter(vm, seed=7, fault_rate=0.4)
    for _ in range(3000):
        w.step()
    w.check_state()
    assert w.stats.violations == 0, w.stats.messages
    assert set(w.stats.ops) == {"create", "delete", "move", "flags", "no-op", "invalid"}
    assert all(w.stats.faults[p] > 0 for p in POINTS), w.stats.faults
    assert w.stats.expected_errors > 0
    assert w.stats.callback_raises > 0
    assert len(vm.callback_errors) > 0


# --- the stress run -----------------------------------------------------------------------
def solo_rates(seconds: float = 0.3) -> tuple[float, float]:
    """Writer requests and reader checks per second, each running alone, here and now: the
    yardstick for a stress run's throughput, so that its thresholds hold on a slow or busy
    machine as on a fast one."""
    vm = HistoryVm()
    writer = RandomWriter(vm, seed=99, fault_rate=0.1)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        writer.step()
        n += 1
    writer_rate = n / (time.perf_counter() - t0)
    reader = Reader(vm, 0, seed=98)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(64):
            reader.step()
    return writer_rate, reader.stats.lookups / (time.perf_counter() - t0)


def assert_throughput(report: StressReport, writer_share: float, reader_share: float) -> None:
    """The run made at least these fractions of what the writer and one reader make alone
    in the same time (measured right before)."""
    writer_rate, reader_rate = solo_rates()
    assert report.operations >= writer_share * writer_rate * report.seconds, (
        report.operations, writer_rate, report.seconds,
    )  # fmt: skip
    assert report.lookups >= reader_share * reader_rate * report.seconds, (
        report.lookups, reader_rate, report.seconds,
    )  # fmt: skip


@pytest.mark.stress
def test_stress_readers_see_only_published_states() -> None:
    report = run_stress(8.0, readers=2, seed=11, fault_rate=0.1, switch_interval=1e-5)
    assert report.violations == 0, "\n".join(report.messages)
    # measured here: the writer gets about 28% of its solo rate, the readers 50% of one
    # reader's; the thresholds are ten times lower
    assert_throughput(report, writer_share=0.03, reader_share=0.05)
    rs = report.reader_stats
    assert all(r.vm_lookups and r.vcpu_lookups and r.range_checks for r in rs)
    assert sum(r.during_swap for r in rs) > 0  # readers ran while the writer waited
    assert all(report.writer.faults[p] > 0 for p in POINTS), report.writer.faults
    assert report.grace_periods == report.swaps > 0
    assert report.versions_pruned > 0  # the history stays bounded


@pytest.mark.stress
def test_stress_with_one_address_space_and_many_readers(fast_switching: None) -> None:
    report = run_stress(
        3.0,
        readers=4,
        seed=5,
        max_slots=64,
        vm_factory=lambda: HistoryVm(nr_address_spaces=1),
    )
    assert report.violations == 0, "\n".join(report.messages)
    # at the default switch interval with four readers the writer gets about 4% of its
    # solo rate (each grace period waits for a thread switch), the readers 65%
    assert_throughput(report, writer_share=0.004, reader_share=0.06)


# --- the command line ---------------------------------------------------------------------
@pytest.mark.stress
def test_cli_stress(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stress", "--seconds", "1.5", "--readers", "1", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "violations   0" in out
    assert "operations" in out and "lookups" in out


@pytest.mark.stress
def test_cli_stress_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stress", "--seconds", "1", "--json", "--no-progress"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["violations"] == 0
    assert doc["operations"] > 0 and doc["lookups"] > 0
    assert set(doc["faults_fired"]) == set(POINTS)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seconds", "0"], "--seconds must be in (0, 1e+06], not 0"),
        (["--seconds", "inf"], "--seconds must be in (0, 1e+06], not inf"),
        (["--seconds", "nan"], "--seconds must be in (0, 1e+06], not nan"),
        (["--seconds", "-1"], "--seconds must be in (0, 1e+06], not -1"),
        (["--readers", "0"], "--readers must be in 1..64"),
        (["--fault-rate", "2"], "--fault-rate must be in 0..1"),
        (["--max-slots", "0"], "--max-slots must be in 1..512"),
        (["--switch-interval-us", "0"], "--switch-interval-us"),
    ],
)
def test_cli_stress_usage_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["stress", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert err.startswith("memslots stress: error: ")


# --- a known engine race (see the test's reason) ------------------------------------------
class _PausingSet(MemslotSet):
    """A memslot set that pauses one thread right after it loaded the set, as its first
    use of it (a subclass, not a wrapper of ``vm._memslots``: the compiled engine reads
    that list directly)."""

    pause: _Pause

    def id_to_memslot(self, id: int) -> Memslot | None:
        p = self.pause
        if threading.current_thread() is p.target:
            p.target = None
            p.in_read_section = p.srcu.in_read_section()
            p.loaded.set()
            p.resume.wait(WAIT)
        return super().id_to_memslot(id)


class _Pause:
    def __init__(self, srcu: Srcu) -> None:
        self.srcu = srcu
        self.target: threading.Thread | None = None
        self.in_read_section = False
        self.loaded = threading.Event()
        self.resume = threading.Event()


def test_vm_id_to_memslot_never_answers_with_an_unpublished_slot() -> None:
    class PauseBeforeSecondSwap(HistoryVm):
        arm = False
        at_swap = threading.Event()
        go_on = threading.Event()

        def publishing(self, as_id: int, slots: MemslotSet) -> None:
            if self.arm and slots.id_to_memslot(8) is not None:
                self.at_swap.set()
                self.go_on.wait(WAIT)
            super().publishing(as_id, slots)

    vm = PauseBeforeSecondSwap(nr_address_spaces=1)
    sets = _Pause(vm.srcu)  # pauses the reader right after it loaded the active set
    pair = (_PausingSet(0, 0), _PausingSet(0, 1))
    for x in pair:
        x.pause = sets
    vm._sets = [pair]  # the VM is empty: both sets start out alike
    vm._memslots = [pair[0]]
    answer: list[Memslot | None] = []
    reader = threading.Thread(target=lambda: answer.append(vm.id_to_memslot(8)), daemon=True)
    sets.target = reader
    reader.start()
    assert sets.loaded.wait(WAIT)  # the reader holds the (empty) active set
    vm.arm = True

    def write() -> None:
        vm.set_user_memory_region(1, 0, 0x100000, 0x1000, HVA)  # publishes the other set
        vm.set_user_memory_region(8, 0, 0x200000, 0x1000, HVA)  # prepares the held one

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    if sets.in_read_section:
        # a correct lookup holds a read section: the writer publishes the other set and
        # then waits for this reader in its first grace period
        for _ in range(int(WAIT / 0.001)):
            if vm.swap_serial & 1:
                break
            threading.Event().wait(0.001)
        assert vm.swap_serial & 1 and not vm.at_swap.is_set()
    else:
        # without one, the writer goes on to change the set the reader still uses
        assert vm.at_swap.wait(WAIT)
    sets.resume.set()
    reader.join(WAIT)
    vm.go_on.set()
    writer.join(WAIT)
    assert not writer.is_alive() and not reader.is_alive()
    # slot 8 was published only after the reader returned
    assert answer == [None], f"id_to_memslot returned an unpublished slot: {answer}"
