"""Engine benchmark (issue 2): per-operation cost with 64 and 32764 slots present, and
gfn lookup cost against a bare bisect / a bare range check, all measured in one run.

    python benchmarks/bench_engine.py [--json FILE] [--reps N]

Every number is the best of several repeats (the machines are noisy); the ratios are what
matter and are computed from numbers taken in this same run.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from bisect import bisect_right
from collections.abc import Callable

from memslots import KVM_MEM_LOG_DIRTY_PAGES, Vm

SMALL, LARGE = 64, 32764
STRIDE = 4  # pages between slot starts; slots are 2 pages


def build(n: int) -> Vm:
    """A VM with ``n`` two-page slots (ids 0..n-1) in address space 0."""
    vm = Vm(nr_address_spaces=1)
    for i in range(n - 1):
        vm.set_user_memory_region(i, 0, i * STRIDE << 12, 2 << 12, 0x100000000 + (i << 13))
    return vm


def best(fn: Callable[[], None], ops: int, repeats: int) -> float:
    """Best per-op time in seconds over ``repeats`` runs of ``fn`` (which does ``ops``)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) / ops)
    return min(times)


def op_costs(n: int, reps: int, repeats: int) -> dict[str, float]:
    vm = build(n)  # n - 1 slots; create+delete adds the n-th
    last = n - 2  # the slot that moves and changes flags
    top = (n + 16) * STRIDE
    hva = 0x100000000 + (last << 13)
    sur = vm.set_user_memory_region
    sur(last, 0, 0, 0, 0)
    sur(last, 0, top << 12, 2 << 12, hva)

    def create_delete() -> None:
        for _ in range(reps):
            sur(n - 1, 0, (top + 64) << 12, 2 << 12, hva)
            sur(n - 1, 0, 0, 0, 0)

    def move() -> None:
        for _ in range(reps // 2):
            sur(last, 0, (top + 8) << 12, 2 << 12, hva)
            sur(last, 0, top << 12, 2 << 12, hva)

    def flags() -> None:
        for _ in range(reps // 2):
            sur(last, KVM_MEM_LOG_DIRTY_PAGES, top << 12, 2 << 12, hva)
            sur(last, 0, top << 12, 2 << 12, hva)

    out = {
        "create+delete": best(create_delete, reps, repeats),
        "move": best(move, reps // 2 * 2, repeats),
        "flags": best(flags, reps // 2 * 2, repeats),
    }
    vm.check_invariants()
    return out


def lookup_costs(n: int, repeats: int) -> dict[str, float]:
    vm = build(n)
    s = vm.memslots(0)
    rng = random.Random(1)
    slots = list(s)
    gfns = [rng.choice(slots).base_gfn + rng.randrange(2) for _ in range(20000)]
    # consecutive lookups in different slots: every set lookup misses the cache
    for i in range(1, len(gfns)):
        if gfns[i] // STRIDE == gfns[i - 1] // STRIDE:
            gfns[i] = (gfns[i] + STRIDE) % ((n - 1) * STRIDE)
    plain = [x.base_gfn for x in slots]
    lookup = s.gfn_to_memslot
    vcpu = vm.create_vcpu(0)

    def miss() -> None:
        for g in gfns:
            lookup(g)

    def bare_bisect() -> None:
        for g in gfns:
            bisect_right(plain, g)

    hit_slot = slots[len(slots) // 2]
    hit_gfns = [hit_slot.base_gfn + (i & 1) for i in range(20000)]

    def hit() -> None:
        for g in hit_gfns:
            lookup(g)

    def vcpu_hit() -> None:
        f = vcpu.gfn_to_memslot
        for g in hit_gfns:
            f(g)

    def vm_hit() -> None:
        f = vm.gfn_to_memslot
        for g in hit_gfns:
            f(g)

    def bare_range_check() -> None:
        sl = hit_slot
        for g in hit_gfns:
            sl.base_gfn <= g < sl.base_gfn + sl.npages  # noqa: B015

    def empty_loop() -> None:
        for g in hit_gfns:  # noqa: B007
            pass

    k = len(gfns)
    return {
        "miss (MemslotSet.gfn_to_memslot)": best(miss, k, repeats),
        "bare bisect on a sorted list": best(bare_bisect, k, repeats),
        "hit (MemslotSet.gfn_to_memslot)": best(hit, k, repeats),
        "hit (Vcpu.gfn_to_memslot)": best(vcpu_hit, k, repeats),
        "hit (Vm.gfn_to_memslot, read section)": best(vm_hit, k, repeats),
        "bare range check on one object": best(bare_range_check, k, repeats),
        "empty loop": best(empty_loop, k, repeats),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=400, help="operations per timing")
    ap.add_argument("--repeats", type=int, default=7, help="timings per number (best kept)")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = ap.parse_args(argv)

    results: dict[str, object] = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "command": "python benchmarks/bench_engine.py " + " ".join(argv or sys.argv[1:]),
    }
    ops = {}
    for n in (SMALL, LARGE):
        print(f"building {n} slots and timing operations...", file=sys.stderr)
        ops[n] = op_costs(n, args.reps, args.repeats)
    print(f"\nper-operation cost (us), best of {args.repeats}")
    print(f"{'operation':16} {SMALL:>10} {LARGE:>10} {'ratio':>7}")
    ratios = {}
    for k in ops[SMALL]:
        r = ops[LARGE][k] / ops[SMALL][k]
        ratios[k] = r
        print(f"{k:16} {ops[SMALL][k] * 1e6:10.1f} {ops[LARGE][k] * 1e6:10.1f} {r:7.2f}x")
    print(f"\nlookups with {LARGE} slots (ns per call, loop included)", file=sys.stdout)
    look = lookup_costs(LARGE, args.repeats)
    for k, v in look.items():
        print(f"  {k:40} {v * 1e9:8.0f}")
    miss_ratio = look["miss (MemslotSet.gfn_to_memslot)"] / look["bare bisect on a sorted list"]
    hit_ratio = look["hit (MemslotSet.gfn_to_memslot)"] / look["bare range check on one object"]
    vcpu_ratio = look["hit (Vcpu.gfn_to_memslot)"] / look["bare range check on one object"]
    print(f"\nmiss / bare bisect      = {miss_ratio:.2f}x   (target <= 3x)")
    print(f"set hit / range check   = {hit_ratio:.2f}x   (target <= 2x)")
    print(f"vCPU hit / range check  = {vcpu_ratio:.2f}x")
    worst = max(ratios.values())
    print(f"worst op ratio {LARGE}/{SMALL} = {worst:.2f}x   (target <= 2x)")
    results.update(
        ops_us={str(n): {k: v * 1e6 for k, v in d.items()} for n, d in ops.items()},
        op_ratio=ratios,
        lookups_ns={k: v * 1e9 for k, v in look.items()},
        miss_over_bisect=miss_ratio,
        hit_over_range_check=hit_ratio,
        vcpu_hit_over_range_check=vcpu_ratio,
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
