"""Live migration by pre-copy, with dirty logging.

A source VM runs a guest that keeps writing to its memory. The migration loop copies the
whole memory once, then, round after round, only the pages the dirty log reports, until
a round finds few enough dirty pages; then it stops the guest, copies what is left, and
checks that the destination equals the source byte for byte. The copy goes at the speed
of a simulated link (``--bandwidth``), so that, as in a real migration, the guest dirties
pages while a round is being sent.

    python examples/live_migration.py [--engine] [--dirty-ring [--ring-bytes N]]
                                      [--threshold N] [--max-rounds N]
                                      [--bandwidth MIB_PER_S]

On a machine with /dev/kvm the source is a :class:`memslots.kvm.KvmVm` and the guest is
real code (the pattern-writer program from :mod:`memslots.kvm.guests`) running on a vCPU
thread; its writes reach the dirty log through the kernel. Without /dev/kvm, or with
``--engine``, the source is the engine (:class:`memslots.Vm`) and a Python thread plays the
guest, writing through ``vm.write_guest`` (which marks pages dirty as the kernel's guest
writes do). Only :class:`KvmGuest` / :class:`PythonGuest` and the constructor differ: the
migration itself is the same code for both.

What the loop does each round, as QEMU does with KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2:
``get_dirty_log`` (which does not clear in manual mode), ``clear_dirty_log`` of exactly the
pages found (re-arming the log for them) and only then copying them. A page the guest
writes after its bit was cleared is reported again in the next round, so nothing is
missed. Enabling INITIALLY_SET before the slots exist makes the first round report every
page: the first round is the full copy.

With ``--dirty-ring`` the same migration is driven by the dirty ring
(``KVM_CAP_DIRTY_LOG_RING``, 64 KiB per vCPU unless ``--ring-bytes``) instead of bitmaps,
as QEMU does with ``-accel kvm,dirty-ring-size=N``: the first round copies everything;
every later sync harvests each vCPU's ring into a set of ``(slot, offset)`` and calls
``KVM_RESET_DIRTY_RINGS`` before the pages are copied, so a page written after its entry
was harvested gets a new entry and is sent again. When a ring fills up, the vCPU gets
``KVM_EXIT_DIRTY_RING_FULL`` (on the engine: its soft-full request) and, like QEMU's vCPU
thread, reaps the rings itself before going on.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from memslots import KVM_MEM_LOG_DIRTY_PAGES, PAGE_SIZE, HostMemory, Vm
from memslots.dirty_log import count_dirty, dirty_runs, pages_to_bitmap
from memslots.dirty_ring import KVM_DIRTY_RING_MAX_BYTES

CODE_GPA = 0x1000  # the guest program, in slot 0
DATA_GPA = 0x10000  # the guest's data: slots 1 and 2, up to the real-mode limit of 1 MiB
LAYOUT = [  # (slot, gpa, pages): 64 KiB with the code, then 112 + 128 pages of data
    (0, 0, 16),
    (1, DATA_GPA, 112),
    (2, DATA_GPA + 112 * PAGE_SIZE, 128),
]
DATA_PAGES = 240
HOT_PAGES = 24  # the guest's working set: most writes land here
RING_BYTES = 64 << 10  # per vCPU: 4096 entries, soft-full at 4032


def build_vm(vm: Vm, new_memory: Any, ring_bytes: int = 0) -> list[HostMemory]:
    """Create the slots of LAYOUT on ``vm``, each on its own fresh host memory, with
    dirty logging and (set first) manual protect with INITIALLY_SET, or a dirty ring of
    ``ring_bytes`` per vCPU."""
    if ring_bytes:
        vm.enable_dirty_ring(ring_bytes)
    else:
        vm.enable_manual_dirty_log_protect(3)
    mems = []
    for slot, gpa, pages in LAYOUT:
        mem = new_memory(pages * PAGE_SIZE)
        mems.append(mem)
        vm.set_user_memory_region(slot, KVM_MEM_LOG_DIRTY_PAGES, gpa, pages * PAGE_SIZE, mem.addr)
    return mems


# ======================================================================================
# Guests: a thread that keeps dirtying the source's memory until stopped
# ======================================================================================
class Guest:
    """Writes to guest memory on its own thread until :meth:`stop`."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="guest", daemon=True)
        self.runs = 0
        self.pages_written = 0
        self.error: BaseException | None = None
        #: called when the vCPU's dirty ring is full (set by the ring tracker)
        self.on_ring_full: Any = None
        self.ring_full_exits = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop and wait: no guest write happens after this returns."""
        self._stop.set()
        self._thread.join(30.0)
        if self._thread.is_alive():
            raise RuntimeError("the guest thread did not stop within 30 s")
        if self.error is not None:
            raise self.error

    def _loop(self) -> None:
        rng = random.Random(2024)
        try:
            while not self._stop.is_set():
                if rng.random() < 0.95:  # the hot working set
                    count = rng.randint(1, 8)
                    first = rng.randrange(HOT_PAGES - count + 1)
                else:  # now and then a sweep over a larger area
                    count = rng.randint(16, 64)
                    first = rng.randrange(DATA_PAGES - count + 1)
                self.write_pages(first, count, rng.randrange(0x10000), rng.randrange(0, 4094, 2))
                self.runs += 1
                self.pages_written += count
                time.sleep(0.0002)  # the rest of the guest's work
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def write_pages(self, first: int, count: int, word: int, offset: int) -> None:
        raise NotImplementedError


class KvmGuest(Guest):
    """Real guest code on a vCPU of a KvmVm: the pattern writer writes ``word + k`` at
    ``offset`` of data page ``first + k``; the kernel logs the pages."""

    def __init__(self, vm: Any) -> None:
        from memslots.kvm import guests

        super().__init__()
        self.guests = guests
        vm.write_guest(CODE_GPA, guests.PATTERN_WRITER)
        self.vcpu = vm.create_vcpu(0)  # from the main thread (installs the kick handler)

    def _ring_full(self, exit: Any) -> None:
        self.ring_full_exits += 1
        self.on_ring_full()

    def write_pages(self, first: int, count: int, word: int, offset: int) -> None:
        args = self.guests.pattern_writer_args(
            DATA_GPA + first * PAGE_SIZE, count, first_word=word, offset=offset
        )
        self.vcpu.setup_real_mode(CODE_GPA, regs=args.regs, segments=args.segments)
        result = self.vcpu.run_until_hlt(
            on_io=lambda io: None, timeout=10, on_dirty_ring_full=self._ring_full
        )
        if not result.halted:
            raise RuntimeError(f"guest did not halt: {result}")


class PythonGuest(Guest):
    """A Python thread standing in for a guest on the engine: the same writes, through
    a vCPU's ``write_guest``, which marks the pages dirty (bitmap) or pushes them into
    the vCPU's ring. With a ring, each "run" first does what KVM does on entering the
    guest: a soft-full ring makes it exit (reap) instead."""

    def __init__(self, vm: Vm) -> None:
        super().__init__()
        self.vm = vm
        vm.write_guest(CODE_GPA, b"\xf4")  # a "program" (HLT), so slot 0 has content too
        self.vcpu = vm.create_vcpu(0)

    def write_pages(self, first: int, count: int, word: int, offset: int) -> None:
        ring = self.vcpu.dirty_ring
        while ring is not None and ring.check_request():  # KVM_EXIT_DIRTY_RING_FULL
            self.ring_full_exits += 1
            self.on_ring_full()
        for k in range(count):
            gpa = DATA_GPA + (first + k) * PAGE_SIZE + offset
            self.vcpu.write_guest(gpa, ((word + k) & 0xFFFF).to_bytes(2, "little"))


# ======================================================================================
# The migration
# ======================================================================================
@dataclass
class Stats:
    rounds: list[tuple[int, int, float]] = field(default_factory=list)  # pages, bytes, s

    @property
    def bytes_sent(self) -> int:
        return sum(r[1] for r in self.rounds)


class BitmapTracker:
    """Dirty pages from the bitmaps: GET, then CLEAR of exactly the pages found."""

    name = "dirty bitmaps (manual protect, INITIALLY_SET)"

    def __init__(self, src: Vm) -> None:
        self.src = src

    def sync(self) -> dict[int, bytes]:
        """Fetch and re-arm the dirty log of every slot: the pages to send now; writes
        from here on show up in the next sync."""
        logs = {}
        for slot, _, npages in LAYOUT:
            log = self.src.get_dirty_log(slot)
            if count_dirty(log):
                self.src.clear_dirty_log(slot, 0, npages, log)
            logs[slot] = log
        return logs


class RingTracker:
    """Dirty pages from the vCPUs' dirty rings: harvest every ring, reset, and collect
    the ``(slot, offset)`` entries into a set; :meth:`reap` also runs on the vCPU thread
    when its ring is full."""

    def __init__(self, src: Vm, vcpus: list[Any]) -> None:
        self.name = f"the dirty ring ({src.dirty_ring_size >> 10} KiB per vCPU)"
        self.src = src
        self.vcpus = vcpus
        self._lock = threading.Lock()
        # the first round is the full copy
        self._pending = {(slot, p) for slot, _, npages in LAYOUT for p in range(npages)}
        self.entries = 0
        self.reaps = 0

    def reap(self) -> None:
        """Harvest every vCPU's ring into the pending set, then KVM_RESET_DIRTY_RINGS
        (before the pages are read, so later writes are caught again)."""
        with self._lock:
            for vcpu in self.vcpus:
                got = vcpu.harvest_dirty_ring()
                self.entries += len(got)
                self._pending.update(got)
            self.src.reset_dirty_rings()
            self.reaps += 1

    def sync(self) -> dict[int, bytes]:
        """Reap, then hand over the pending pages as one bitmap per slot."""
        self.reap()
        with self._lock:
            pending, self._pending = self._pending, set()
        by_slot: dict[int, list[int]] = {slot: [] for slot, _, _ in LAYOUT}
        for slot, page in pending:
            by_slot[slot].append(page)
        return {slot: bytes(pages_to_bitmap(by_slot[slot], npages)) for slot, _, npages in LAYOUT}


def merge(a: dict[int, bytes], b: dict[int, bytes]) -> dict[int, bytes]:
    """The union of two syncs' logs."""
    return {
        s: (int.from_bytes(a[s], "little") | int.from_bytes(b[s], "little")).to_bytes(
            len(a[s]), "little"
        )
        for s in a
    }


def send(src: Vm, dst: Vm, logs: dict[int, bytes], stats: Stats, bandwidth: float) -> int:
    """Copy the pages of ``logs`` from ``src`` to ``dst``, one slice per run of dirty
    pages, taking as long as a link of ``bandwidth`` bytes/s (0: no limit) would; the
    guest keeps running meanwhile. Returns the number of pages sent."""
    t0 = time.perf_counter()
    sent = 0
    for slot, gpa, _ in LAYOUT:
        for first, count in dirty_runs(logs[slot]):
            run_gpa = gpa + first * PAGE_SIZE
            dst.write_guest(run_gpa, src.read_guest(run_gpa, count * PAGE_SIZE))
            sent += count * PAGE_SIZE
    if bandwidth:
        time.sleep(max(0.0, sent / bandwidth - (time.perf_counter() - t0)))
    stats.rounds.append((sent // PAGE_SIZE, sent, time.perf_counter() - t0))
    return sent // PAGE_SIZE


def migrate(
    tracker: BitmapTracker | RingTracker,
    src: Vm,
    dst: Vm,
    guest: Guest,
    threshold: int,
    max_rounds: int,
    bandwidth: float,
) -> Stats:
    """Pre-copy: sync and send, round after round, until a sync finds at most
    ``threshold`` dirty pages (after the first, full round) or ``max_rounds`` is reached;
    then stop the guest, sync once more and send what both last syncs found."""
    stats = Stats()
    guest.start()
    try:
        while True:
            logs = tracker.sync()
            found = sum(count_dirty(log) for log in logs.values())
            last = (stats.rounds and found <= threshold) or len(stats.rounds) + 1 >= max_rounds
            if last:
                break
            send(src, dst, logs, stats, bandwidth)
            print(f"  round {len(stats.rounds):2d}: {found:4d} dirty pages sent, guest running")
    finally:
        guest.stop()
    logs = merge(logs, tracker.sync())  # and what the guest wrote before it stopped
    n = send(src, dst, logs, stats, 0)
    print(f"  round {len(stats.rounds):2d}: {n:4d} dirty pages sent, guest stopped")
    return stats


def verify(src: Vm, dst: Vm) -> None:
    for slot, gpa, npages in LAYOUT:
        a = src.read_guest(gpa, npages * PAGE_SIZE)
        b = dst.read_guest(gpa, npages * PAGE_SIZE)
        if a != b:
            bad = [p for p in range(npages) if a[p * PAGE_SIZE : (p + 1) * PAGE_SIZE]
                   != b[p * PAGE_SIZE : (p + 1) * PAGE_SIZE]]  # fmt: skip
            raise SystemExit(f"slot {slot}: {len(bad)} pages differ, first at page {bad[0]}")


def integer(lo: int, hi: int, *, power_of_two: bool = False) -> Any:
    """An argparse type: an integer in ``lo..hi`` (a power of two with ``power_of_two``),
    so that a bad value is a one-line usage error, not a traceback from the VM."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{value}: must be in {lo}..{hi}")
        if power_of_two and value & (value - 1):
            raise argparse.ArgumentTypeError(f"{value}: must be a power of two")
        return value

    return parse


def megabytes(text: str) -> float:
    """An argparse type: MiB/s of the link, 0 (no limit) to 1e6."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and 0 <= value <= 1e6):
        raise argparse.ArgumentTypeError(f"{text}: must be in 0..1e6")
    return value


def main(argv: list[str] | None = None) -> int:
    total = sum(p for _, _, p in LAYOUT)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", action="store_true", help="use the engine even with /dev/kvm")
    ap.add_argument("--dirty-ring", action="store_true", help="track dirty pages with the ring")
    ap.add_argument(
        "--ring-bytes",
        type=integer(PAGE_SIZE, KVM_DIRTY_RING_MAX_BYTES, power_of_two=True),
        default=None,
        help=f"ring size per vCPU with --dirty-ring: a power of two, {PAGE_SIZE}.."
        f"{KVM_DIRTY_RING_MAX_BYTES} (default {RING_BYTES})",
    )
    ap.add_argument(
        "--threshold",
        type=integer(0, total),
        default=32,
        help=f"stop-and-copy at this many dirty pages, 0..{total} (default 32)",
    )
    ap.add_argument("--max-rounds", type=integer(1, 1000), default=30, help="1..1000 (default 30)")
    ap.add_argument(
        "--bandwidth", type=megabytes, default=32, help="MiB/s of the simulated link (0: no limit)"
    )
    args = ap.parse_args(argv)
    if args.ring_bytes is not None and not args.dirty_ring:
        ap.error("--ring-bytes needs --dirty-ring")
    ring_bytes = (args.ring_bytes or RING_BYTES) if args.dirty_ring else 0

    from memslots.kvm import kvm_available

    use_kvm = not args.engine and kvm_available()
    cleanup: list[Any] = []
    try:
        if use_kvm:
            from memslots.kvm import KvmVm

            src: Vm = KvmVm()
            dst: Vm = KvmVm()
        else:
            src, dst = Vm(), Vm()
        cleanup += [src, dst]  # close() unmaps the memory each made with host_memory()
        build_vm(src, src.host_memory, ring_bytes)
        build_vm(dst, dst.host_memory)
        if use_kvm:
            guest: Guest = KvmGuest(src)
            print("source and destination: KvmVm on /dev/kvm; guest: real code on a vCPU")
        else:
            guest = PythonGuest(src)
            print("source and destination: the engine; guest: a Python thread (write_guest)")
        tracker: BitmapTracker | RingTracker = BitmapTracker(src)
        if args.dirty_ring:
            tracker = RingTracker(src, [guest.vcpu])  # type: ignore[attr-defined]
            guest.on_ring_full = tracker.reap
        print(f"dirty tracking: {tracker.name}")

        t0 = time.perf_counter()
        stats = migrate(
            tracker, src, dst, guest, args.threshold, args.max_rounds, args.bandwidth * 2**20
        )
        elapsed = time.perf_counter() - t0
        verify(src, dst)
        print(f"guest: {guest.runs} runs, {guest.pages_written} page writes during migration")
        print(
            f"migrated {total} pages ({total * PAGE_SIZE >> 10} KiB) in {len(stats.rounds)} "
            f"rounds, {elapsed * 1e3:.1f} ms; sent {stats.bytes_sent} bytes "
            f"({stats.bytes_sent / (total * PAGE_SIZE):.2f}x the memory)"
        )
        print("pages per round: " + ", ".join(str(p) for p, _, _ in stats.rounds))
        if isinstance(tracker, RingTracker):
            print(
                f"ring: {tracker.entries} entries harvested in {tracker.reaps} reaps, "
                f"{guest.ring_full_exits} dirty-ring-full exits"
            )
        print("destination equals source byte for byte: OK")
        if use_kvm:
            bad = src.disagreements + dst.disagreements  # type: ignore[attr-defined]
            print(f"kernel/engine disagreements: {len(bad)}")
            if bad:
                return 1
    finally:
        for obj in reversed(cleanup):
            obj.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
