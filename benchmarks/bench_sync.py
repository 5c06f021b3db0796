"""Grace-period benchmark (issue 5): the cost of an empty read section, reader throughput
with and without a concurrent writer, writer latency with readers present.

    python benchmarks/bench_sync.py [--seconds S] [--json FILE]

- Empty read section: ``srcu.read_unlock(srcu.read_lock())`` in a loop, minus the same
  loop doing nothing, best of several repeats (ns). Also ``with vm.read_section():``,
  :class:`~memslots.sync.LockedSrcu` (the free-threaded variant) and a bare method call
  for scale.
- Reader throughput: R threads calling ``vm.gfn_to_memslot`` and ``vcpu.gfn_to_memslot``
  on random gfns of a VM with 64 slots for S seconds, alone and while a writer thread
  loops create/move/flags/delete on other slots; lookups per second (all threads).
- Writer latency: the same writer loop alone and with R busy readers: per request mean,
  median, p99 and max, and the grace period (``srcu.synchronize``) alone. The runs with a
  writer are repeated with ``Srcu(expedited=True)`` (readers leaving a section yield the
  GIL while a writer waits, see :mod:`memslots.sync`) and at a 0.1 ms switch interval.

With the GIL only one thread runs at a time, so the total lookup rate cannot grow with
threads, and a writer that must wait for a reader gets the CPU back only when the
interpreter switches threads (``sys.getswitchinterval()``, 5 ms by default): the table
shows the writer latency at the default interval and at 0.1 ms. Numbers are from one run
on a shared machine; compare ratios within a run.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from memslots import Vm
from memslots.sync import ExpeditedSrcu, LockedSrcu, Srcu
from memslots.tools.cli.options import float_range

HVA = 0x7F00_0000_0000
NSLOTS = 64
SLOT_PAGES = 256


def build(expedited: bool = False) -> Vm:
    """A VM with 64 slots of 256 pages in address space 0 (ids 0..63)."""
    vm = Vm()
    if expedited:
        vm.srcu = Srcu(expedited=True)  # before any reader exists
    for i in range(NSLOTS):
        vm.set_user_memory_region(
            i, 0, i * SLOT_PAGES * 2 << 12, SLOT_PAGES << 12, HVA + (i * SLOT_PAGES << 12)
        )
    return vm


def join(t: threading.Thread, timeout: float = 60.0) -> None:
    """Join ``t``; RuntimeError if it is still running after ``timeout`` seconds."""
    t.join(timeout)
    if t.is_alive():
        raise RuntimeError(f"thread {t.name} did not stop within {timeout} s")


def loop_cost(body: Callable[[int], None], n: int, repeats: int = 7) -> float:
    """Best ns per iteration of ``body(n)`` (which loops n times) minus an empty loop."""

    def empty(n: int) -> None:
        for _ in range(n):
            pass

    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        body(n)
        t1 = time.perf_counter_ns()
        empty(n)
        t2 = time.perf_counter_ns()
        best = min(best, ((t1 - t0) - (t2 - t1)) / n)
    return best


def read_section_costs(n: int) -> dict[str, float]:
    """ns per empty read section, several ways."""
    out: dict[str, float] = {}
    variants: tuple[tuple[str, Srcu], ...] = (
        ("Srcu", Srcu(locked=False)),
        ("ExpeditedSrcu", ExpeditedSrcu()),
        ("LockedSrcu", LockedSrcu()),
    )
    for name, srcu in variants:

        def lock_unlock(n: int, srcu: Srcu = srcu) -> None:
            for _ in range(n):
                tok = srcu.read_lock()
                srcu.read_unlock(tok)

        out[f"read_lock+read_unlock ({name})"] = loop_cost(lock_unlock, n)
    vm = Vm()

    def with_section(n: int) -> None:
        rs = vm.read_section
        for _ in range(n):
            with rs():
                pass

    out["with vm.read_section()"] = loop_cost(with_section, n // 4)

    class C:
        def m(self) -> None:
            pass

    c = C()

    def two_calls(n: int) -> None:
        for _ in range(n):
            c.m()
            c.m()

    out["two empty method calls (scale)"] = loop_cost(two_calls, n)
    return out


class Writer:
    """Loops create/move/flags/delete of slots 100..103 and records each request's time."""

    def __init__(self, vm: Vm) -> None:
        self.vm = vm
        self.times: list[int] = []

    def run(self, stop: threading.Event, limit: int = 1 << 62) -> None:
        sur = self.vm.set_user_memory_region
        base = NSLOTS * SLOT_PAGES * 2
        rec = self.times.append
        i = 0
        while not stop.is_set() and len(self.times) < limit:
            slot = 100 + (i & 3)
            g = (base + (i & 3) * 64) << 12
            for args in (
                (slot, 0, g, 16 << 12, HVA),
                (slot, 0, g + (512 << 12), 16 << 12, HVA),
                (slot, 1, g + (512 << 12), 16 << 12, HVA),
                (slot, 1, 0, 0, HVA),
            ):
                t0 = time.perf_counter_ns()
                sur(*args)
                rec(time.perf_counter_ns() - t0)
            i += 1


def reader(vm: Vm, vcpu_id: int, stop: threading.Event, counts: list[int], i: int) -> None:
    vcpu = vm.create_vcpu(vcpu_id)
    rng = random.Random(i)
    gfns = [rng.randrange(NSLOTS * SLOT_PAGES * 2) for _ in range(4096)]
    g2m = vm.gfn_to_memslot
    v2m = vcpu.gfn_to_memslot
    n = 0
    while not stop.is_set():
        for g in gfns:
            g2m(g)
            v2m(g)
        n += 2 * len(gfns)
    counts[i] = n


def throughput(
    readers: int, with_writer: bool, seconds: float, expedited: bool = False
) -> dict[str, Any]:
    """Lookups/s of ``readers`` threads (and the writer's request times, if any)."""
    vm = build(expedited)
    stop = threading.Event()
    counts = [0] * readers
    threads = [
        threading.Thread(target=reader, args=(vm, i, stop, counts, i)) for i in range(readers)
    ]
    w = Writer(vm)
    if with_writer:
        threads.append(threading.Thread(target=w.run, args=(stop,)))
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        join(t)
    elapsed = time.perf_counter() - t0
    return {"lookups_per_s": sum(counts) / elapsed, "writer_ns": w.times}


def latency(times: list[int]) -> dict[str, float]:
    """mean/p50/p99/max in microseconds."""
    if not times:
        return {"n": 0}
    s = sorted(times)
    return {
        "n": len(s),
        "mean_us": statistics.fmean(s) / 1e3,
        "p50_us": s[len(s) // 2] / 1e3,
        "p99_us": s[min(len(s) - 1, int(len(s) * 0.99))] / 1e3,
        "max_us": s[-1] / 1e3,
    }


def writer_alone(seconds: float) -> list[int]:
    vm = build()
    w = Writer(vm)
    stop = threading.Event()
    t = threading.Thread(target=w.run, args=(stop,))
    t.start()
    time.sleep(seconds)
    stop.set()
    join(t)
    return w.times


def synchronize_alone(n: int) -> float:
    """ns per ``synchronize()`` with one idle registered reader thread."""
    srcu = Srcu()
    done = threading.Event()
    t = threading.Thread(target=lambda: (srcu.read_unlock(srcu.read_lock()), done.wait()))
    t.start()
    t0 = time.perf_counter_ns()
    for _ in range(n):
        srcu.synchronize()
    ns = (time.perf_counter_ns() - t0) / n
    done.set()
    join(t)
    return ns


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float_range(0.01, 3600.0), default=3.0,
                    help="per throughput run, 0.01..3600 (default 3)")  # fmt: skip
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = ap.parse_args()
    S = args.seconds
    res: dict[str, Any] = {
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "switch_interval_s": sys.getswitchinterval(),
    }

    print("Empty read section (best of 7, loop overhead removed)")
    costs = read_section_costs(1_000_000)
    res["empty_read_section_ns"] = costs
    for k, v in costs.items():
        print(f"  {k:42s} {v:7.1f} ns")

    print(f"\nReader throughput (lookups/s, all reader threads, {S:g} s each)")
    print(
        f"  {'readers':>7s} {'no writer':>12s} {'with writer':>12s} {'ratio':>6s} "
        f"{'expedited':>12s} {'ratio':>6s}"
    )
    res["throughput"] = {}
    writer_with: dict[str, list[int]] = {}
    for r in (1, 2):
        alone = throughput(r, False, S)["lookups_per_s"]
        both = throughput(r, True, S)
        exp = throughput(r, True, S, expedited=True)
        writer_with[f"{r} busy reader(s)"] = both["writer_ns"]
        writer_with[f"{r} busy reader(s), expedited"] = exp["writer_ns"]
        res["throughput"][r] = {
            "alone": alone,
            "with_writer": both["lookups_per_s"],
            "with_writer_expedited": exp["lookups_per_s"],
        }
        print(
            f"  {r:7d} {alone:12.0f} {both['lookups_per_s']:12.0f} "
            f"{both['lookups_per_s'] / alone:6.2f} {exp['lookups_per_s']:12.0f} "
            f"{exp['lookups_per_s'] / alone:6.2f}"
        )

    print("\nWriter latency per request (create/move/flags/delete loop)")
    print(f"  {'':34s} {'n':>7s} {'mean':>10s} {'p50':>10s} {'p99':>10s} {'max':>10s}")
    rows = {"no readers": writer_alone(S), **writer_with}
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    try:
        rows["2 busy readers, switch 0.1 ms"] = throughput(2, True, S)["writer_ns"]
    finally:
        sys.setswitchinterval(old)
    res["writer_latency"] = {}
    for name, times in rows.items():
        lat = latency(times)
        res["writer_latency"][name] = lat
        print(
            f"  {name:34s} {lat['n']:7d} {lat['mean_us']:8.1f}us {lat['p50_us']:8.1f}us "
            f"{lat['p99_us']:8.1f}us {lat['max_us'] / 1e3:8.2f}ms"
        )
    gp = synchronize_alone(20_000)
    res["synchronize_no_reader_ns"] = gp
    print(f"\nGrace period with no reader in a section: {gp / 1e3:.2f} us")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
