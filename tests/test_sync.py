"""Grace periods (memslots.sync): read sections never wait, synchronize waits for exactly
the readers that may still use an unpublished object, for both implementations (the GIL
one and the lock-ordered one used on free-threaded builds)."""

from __future__ import annotations

import _thread
import gc
import random
import signal
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from memslots import Vm
from memslots.sync import FREE_THREADED_BUILD, ExpeditedSrcu, LockedSrcu, Srcu

#: bounded waits for events that must happen; a broken implementation fails, not hangs
WAIT = 10.0
#: how long to let a writer run before checking it is (still) blocked
SETTLE = 0.2


@pytest.fixture(params=["gil", "locked", "expedited"])
def srcu(request: pytest.FixtureRequest) -> Srcu:
    if request.param == "expedited":
        return ExpeditedSrcu()
    return Srcu(locked=request.param == "locked")


@pytest.fixture
def fast_switching() -> Iterator[None]:
    """More thread switches per second: more interleavings in the randomised tests."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


def start(target: object, *args: object) -> threading.Thread:
    t = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
    t.start()
    return t


def test_constructor_picks_the_implementation() -> None:
    assert type(Srcu(locked=False)) is Srcu
    assert type(Srcu(locked=True)) is LockedSrcu
    assert type(LockedSrcu()) is LockedSrcu
    assert type(Srcu()) is (LockedSrcu if FREE_THREADED_BUILD else Srcu)
    assert type(Srcu(expedited=True)) is (LockedSrcu if FREE_THREADED_BUILD else ExpeditedSrcu)
    assert type(Srcu(locked=True, expedited=True)) is LockedSrcu
    assert type(ExpeditedSrcu()) is ExpeditedSrcu


def test_sections_nest_and_balance(srcu: Srcu) -> None:
    assert not srcu.in_read_section()
    a = srcu.read_lock()
    b = srcu.read_lock()
    assert srcu.in_read_section()
    srcu.read_unlock(b)
    assert srcu.in_read_section()
    srcu.read_unlock(a)
    assert not srcu.in_read_section()
    with srcu.read():
        assert srcu.in_read_section()
        with srcu.read():
            assert srcu.in_read_section()
    assert not srcu.in_read_section()


def test_context_manager_leaves_on_exception(srcu: Srcu) -> None:
    with pytest.raises(ValueError), srcu.read():
        raise ValueError("boom")
    assert not srcu.in_read_section()
    srcu.synchronize()  # nothing left open


def test_unbalanced_unlock_is_an_error(srcu: Srcu) -> None:
    tok = srcu.read_lock()
    srcu.read_unlock(tok)
    with pytest.raises(IndexError):
        srcu.read_unlock(tok)
    assert not srcu.in_read_section()


def test_synchronize_without_readers(srcu: Srcu) -> None:
    srcu.synchronize()
    srcu.synchronize()
    assert srcu.grace_periods == 2


def test_synchronize_inside_a_read_section_is_refused(srcu: Srcu) -> None:
    with srcu.read(), pytest.raises(RuntimeError, match="inside a read section"):
        srcu.synchronize()
    assert srcu.grace_periods == 0


def test_synchronize_waits_for_an_open_section(srcu: Srcu) -> None:
    entered, leave = threading.Event(), threading.Event()

    def reader() -> None:
        with srcu.read():
            entered.set()
            leave.wait(WAIT)

    r = start(reader)
    assert entered.wait(WAIT)
    w = start(srcu.synchronize)
    w.join(SETTLE)
    assert w.is_alive(), "synchronize returned while a read section was open"
    leave.set()
    w.join(WAIT)
    r.join(WAIT)
    assert not w.is_alive()
    assert srcu.grace_periods == 1


@pytest.mark.parametrize("index", [0, 1])
def test_a_section_counted_on_either_index_is_waited_for(srcu: Srcu, index: int) -> None:
    """The safety argument: synchronize drains both indices, so a reader that loaded
    ``idx`` long ago and counts on the index that is not current is waited for too."""
    entered, leave = threading.Event(), threading.Event()

    def reader() -> None:
        srcu._idx = index  # as if this reader had loaded idx at that value
        tok = srcu.read_lock()
        srcu._idx = 0
        entered.set()
        leave.wait(WAIT)
        srcu.read_unlock(tok)

    r = start(reader)
    assert entered.wait(WAIT)
    w = start(srcu.synchronize)
    w.join(SETTLE)
    assert w.is_alive(), f"a section counted on index {index} was not waited for"
    leave.set()
    w.join(WAIT)
    r.join(WAIT)
    assert not w.is_alive()


def test_readers_enter_and_leave_while_a_writer_waits(srcu: Srcu) -> None:
    """Readers never wait: while synchronize is blocked on one open section, other threads
    (and the holder itself) run many read sections to completion."""
    entered, leave = threading.Event(), threading.Event()

    def holder() -> None:
        with srcu.read():
            entered.set()
            leave.wait(WAIT)
            for _ in range(100):  # the holder nests more sections meanwhile
                srcu.read_unlock(srcu.read_lock())

    h = start(holder)
    assert entered.wait(WAIT)
    w = start(srcu.synchronize)
    done = []

    def other() -> None:
        for _ in range(2_000):
            with srcu.read():
                pass
            srcu.read_unlock(srcu.read_lock())
        done.append(True)

    o = start(other)
    o.join(WAIT)
    assert done == [True], "a reader waited while a writer was in a grace period"
    assert w.is_alive()
    leave.set()
    for t in (h, w):
        t.join(WAIT)
        assert not t.is_alive()


def test_a_stream_of_new_readers_does_not_starve_the_writer(srcu: Srcu) -> None:
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            tok = srcu.read_lock()
            tok2 = srcu.read_lock()
            srcu.read_unlock(tok2)
            srcu.read_unlock(tok)

    readers = [start(churn) for _ in range(3)]
    try:

        def ten_grace_periods() -> None:
            for _ in range(10):
                srcu.synchronize()

        w = start(ten_grace_periods)
        w.join(WAIT * 3)
        assert not w.is_alive(), "synchronize starved by new readers"
        assert srcu.grace_periods == 10
    finally:
        stop.set()
        for t in readers:
            t.join(WAIT)


def test_a_token_may_be_released_by_another_thread(srcu: Srcu) -> None:
    tok = srcu.read_lock()
    t = start(srcu.read_unlock, tok)
    t.join(WAIT)
    assert not srcu.in_read_section()
    srcu.synchronize()


def test_exited_threads_are_dropped_from_the_registry(srcu: Srcu) -> None:
    def reader() -> None:
        with srcu.read():
            pass

    threads = [start(reader) for _ in range(5)]
    for t in threads:
        t.join(WAIT)
    del threads, t
    gc.collect()
    assert srcu.reader_threads() == 0
    with srcu.read():
        assert srcu.reader_threads() == 1
    srcu.synchronize()


class _Box:
    """A published object; the writer poisons it once no reader may use it."""

    __slots__ = ("dead", "serial")

    def __init__(self, serial: int) -> None:
        self.serial = serial
        self.dead = False


def test_no_reader_ever_sees_a_reclaimed_object(srcu: Srcu, fast_switching: None) -> None:
    """The RCU contract end to end: publish a new object, synchronize, reclaim (poison) the
    old one. Readers load the pointer inside a section and check it repeatedly."""
    holder = [_Box(0)]
    stop = threading.Event()
    errors: list[str] = []
    sections = [0]

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            with srcu.read():
                box = holder[0]
                for _ in range(rng.randrange(1, 40)):
                    if box.dead:
                        errors.append(f"box {box.serial} reclaimed under a reader")
                        return
                sections[0] += 1

    readers = [start(reader, i) for i in range(3)]
    try:
        for serial in range(1, 301):
            old = holder[0]
            holder[0] = _Box(serial)  # publish
            srcu.synchronize()
            old.dead = True  # reclaim
    finally:
        stop.set()
        for t in readers:
            t.join(WAIT)
    assert errors == []
    assert sections[0] > 0
    assert srcu.grace_periods == 300


def test_the_poison_check_detects_a_missing_grace_period() -> None:
    """Control for the test above: without a grace period, a reader holding the old object
    sees it reclaimed (deterministic interleaving)."""
    srcu = Srcu()
    holder = [_Box(0)]
    loaded, reclaimed = threading.Event(), threading.Event()
    seen: list[bool] = []

    def reader() -> None:
        with srcu.read():
            box = holder[0]
            loaded.set()
            reclaimed.wait(WAIT)
            seen.append(box.dead)

    r = start(reader)
    assert loaded.wait(WAIT)
    old = holder[0]
    holder[0] = _Box(1)
    # (no srcu.synchronize() here)
    old.dead = True
    reclaimed.set()
    r.join(WAIT)
    assert seen == [True]


def test_vm_update_waits_for_a_reader_that_holds_the_set(srcu: Srcu) -> None:
    """Two sets: while a reader holds the old set, the writer has already published the new
    one (new lookups see the new slot) and waits; the held set does not change."""
    vm = Vm(nr_address_spaces=1)
    vm.srcu = srcu
    vm.set_user_memory_region(0, 0, 0, 0x10000, 0x7F0000000000)
    held_ready, leave = threading.Event(), threading.Event()
    observed: dict[str, object] = {}

    def reader() -> None:
        with vm.read_section():
            s = vm.memslots(0)
            before = [x.as_tuple() for x in s]
            held_ready.set()
            leave.wait(WAIT)
            observed["held_before"] = before
            observed["held_after"] = [x.as_tuple() for x in s]

    r = start(reader)
    assert held_ready.wait(WAIT)
    w = start(vm.set_user_memory_region, 1, 0, 0x100000, 0x1000, 0x7F0000100000)
    # the writer publishes before it waits: a new lookup finds slot 1 (bounded poll)
    for _ in range(int(WAIT / 0.01)):
        if vm.gfn_to_memslot(0x100) is not None:
            break
        threading.Event().wait(0.01)
    found = vm.gfn_to_memslot(0x100)
    assert found is not None and found.id == 1
    w.join(SETTLE)
    assert w.is_alive(), "the update finished while a reader held the old set"
    leave.set()
    w.join(WAIT)
    r.join(WAIT)
    assert not w.is_alive()
    assert observed["held_before"] == observed["held_after"]
    assert len(observed["held_after"]) == 1  # type: ignore[arg-type]
    vm.check_invariants()


@pytest.mark.parametrize("expedited", [False, True], ids=["srcu", "expedited"])
def test_interrupts_never_leak_a_read_section(expedited: bool, fast_switching: None) -> None:
    """KeyboardInterrupt arrives at arbitrary points of lookups in the main thread: no read
    section may stay counted (it would make every later update wait forever)."""
    assert threading.current_thread() is threading.main_thread()
    vm = Vm()
    vm.srcu = Srcu(expedited=expedited)
    vm.set_user_memory_region(0, 0, 0, 1 << 20, 0x7F0000000000)
    vcpu = vm.create_vcpu(0)
    armed = [False]

    def handler(signum: int, frame: object) -> None:
        if armed[0]:  # only inside the lookup loop below
            armed[0] = False
            raise KeyboardInterrupt

    stop = threading.Event()

    def interrupter() -> None:
        rng = random.Random(1)
        while not stop.is_set():
            time.sleep(rng.random() * 2e-4)
            _thread.interrupt_main()

    old = signal.signal(signal.SIGINT, handler)
    t = threading.Thread(target=interrupter, daemon=True)
    interrupts = 0
    try:
        t.start()
        while interrupts < 500:
            try:
                armed[0] = True
                for g in range(1 << 40):
                    vm.gfn_to_memslot(g & 255)
                    vm.id_to_memslot(0)
                    vm.gfn_to_hva(g & 255)
                    vcpu.last_used_slot_gen = -1  # force the miss path (a read section)
                    vcpu.gfn_to_memslot(g & 255)
            except KeyboardInterrupt:
                interrupts += 1
    finally:
        armed[0] = False
        stop.set()
        t.join(WAIT)
        signal.signal(signal.SIGINT, old)
    assert not vm.srcu.in_read_section()
    vm.set_user_memory_region(0, 0, 0, 0, 0x7F0000000000)  # a grace period completes
