"""Engine benchmark (issue 2): per-operation cost with 64 and 32764 slots present, and
gfn lookup cost against a bare bisect / a bare range check, all measured in one run.

    python benchmarks/bench_engine.py [--json FILE] [--reps N] [--this-build-only]

Every number is the best of several repeats (the machines are noisy); the ratios are what
matter and are computed from numbers taken in this same run. When the installed engine is
the compiled one (``memslots.COMPILED``), the same measurements are also made on the pure
Python build, in a subprocess importing a copy of the package's sources, and both are
printed side by side. The references are built the same way in both builds: the bare
``bisect`` runs on a freshly built list of the slots' base gfns, the bare range check on a
plain Python object holding the slot's two fields.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from bisect import bisect_right
from collections.abc import Callable

import memslots
from memslots import KVM_MEM_LOG_DIRTY_PAGES, Vm
from memslots.tools.cli.options import int_range

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
    plain = [x.base_gfn + 0 for x in slots]  # fresh ints, alike in both builds
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

    class Plain:
        __slots__ = ("base_gfn", "npages")

        def __init__(self, base_gfn: int, npages: int) -> None:
            self.base_gfn, self.npages = base_gfn, npages

    plain_slot = Plain(hit_slot.base_gfn + 0, hit_slot.npages + 0)

    def bare_range_check() -> None:
        sl = plain_slot
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


def measure(reps: int, repeats: int) -> dict[str, object]:
    """Every number of this build, as a JSON-ready dict."""
    ops = {}
    for n in (SMALL, LARGE):
        print(f"building {n} slots and timing operations...", file=sys.stderr)
        ops[n] = op_costs(n, reps, repeats)
    look = lookup_costs(LARGE, repeats)
    return {
        "compiled": memslots.COMPILED,
        "ops_us": {str(n): {k: v * 1e6 for k, v in d.items()} for n, d in ops.items()},
        "lookups_ns": {k: v * 1e9 for k, v in look.items()},
    }


def pure_build(reps: int, repeats: int) -> dict[str, object]:
    """:func:`measure` in a subprocess running the package's pure-Python sources."""
    from memslots.tools.bench_peers import pure_sources

    with tempfile.TemporaryDirectory() as tmp:
        path = pure_sources(tmp)
        out = os.path.join(tmp, "pure.json")
        env = dict(os.environ, PYTHONPATH=path)
        cmd = [sys.executable, __file__, "--this-build-only", "--json", out]
        cmd += ["--reps", str(reps), "--repeats", str(repeats)]
        # a process group of its own: Ctrl-C reaches this process only, and run() kills
        # the child on the way out (no second traceback, and the copy is removed)
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, process_group=0)
        with open(out) as f:
            data: dict[str, object] = json.load(f)["builds"]["pure"]
    return data


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int_range(2, 10**7), default=400,
                    help="operations per timing, 2..10^7 (default 400)")  # fmt: skip
    ap.add_argument("--repeats", type=int_range(1, 1000), default=7,
                    help="timings per number, 1..1000 (best kept; default 7)")  # fmt: skip
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--this-build-only", action="store_true",
                    help="do not also measure the pure build")  # fmt: skip
    args = ap.parse_args(argv)
    builds: dict[str, dict[str, object]] = {}
    this = "compiled" if memslots.COMPILED else "pure"
    builds[this] = measure(args.reps, args.repeats)
    if this == "compiled" and not args.this_build_only:
        print("the same on the pure-Python build (a subprocess)...", file=sys.stderr)
        builds["pure"] = pure_build(args.reps, args.repeats)
    names = list(builds)
    results: dict[str, object] = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "command": "python benchmarks/bench_engine.py " + " ".join(argv or sys.argv[1:]),
        "builds": builds,
    }

    def col(values: list[float], fmt: str) -> str:
        return "".join(format(v, fmt) for v in values)

    print(f"\nper-operation cost (us), best of {args.repeats}; columns: "
          + ", ".join(f"{b} {SMALL}, {b} {LARGE}, ratio" for b in names))  # fmt: skip
    worst: dict[str, float] = {}
    first = builds[names[0]]["ops_us"]
    assert isinstance(first, dict)
    for k in first[str(SMALL)]:
        cells = []
        for b in names:
            d = builds[b]["ops_us"]
            assert isinstance(d, dict)
            small, large = d[str(SMALL)][k], d[str(LARGE)][k]
            worst[b] = max(worst.get(b, 0.0), large / small)
            cells += [small, large, large / small]
        print(f"{k:16}" + col(cells, "10.2f"))
    print(f"\nlookups with {LARGE} slots (ns per call, loop included): " + ", ".join(names))
    lk0 = builds[names[0]]["lookups_ns"]
    assert isinstance(lk0, dict)
    ratios: dict[str, dict[str, float]] = {}
    for k in lk0:
        vals = []
        for b in names:
            lk = builds[b]["lookups_ns"]
            assert isinstance(lk, dict)
            vals.append(lk[k])
        print(f"  {k:40}" + col(vals, "8.0f"))
    for b in names:
        lk = builds[b]["lookups_ns"]
        assert isinstance(lk, dict)
        rng = lk["bare range check on one object"]
        ratios[b] = {
            "miss_over_bisect": lk["miss (MemslotSet.gfn_to_memslot)"]
            / lk["bare bisect on a sorted list"],
            "hit_over_range_check": lk["hit (MemslotSet.gfn_to_memslot)"] / rng,
            "vcpu_hit_over_range_check": lk["hit (Vcpu.gfn_to_memslot)"] / rng,
            "worst_op_ratio": worst[b],
        }
        r = ratios[b]
        print(f"\n{b}: miss / bare bisect = {r['miss_over_bisect']:.2f}x, "
              f"set hit / range check = {r['hit_over_range_check']:.2f}x, "
              f"vCPU hit / range check = {r['vcpu_hit_over_range_check']:.2f}x, "
              f"worst op ratio {LARGE}/{SMALL} = {r['worst_op_ratio']:.2f}x")  # fmt: skip
    if "compiled" in builds and "pure" in builds:
        c, p = builds["compiled"]["ops_us"], builds["pure"]["ops_us"]
        assert isinstance(c, dict) and isinstance(p, dict)
        cvp = {k: c[str(LARGE)][k] / p[str(LARGE)][k] for k in c[str(LARGE)]}
        results["compiled_over_pure_at_large"] = cvp
        print("compiled / pure at {}: {}".format(
            LARGE, ", ".join(f"{k} {v:.2f}x" for k, v in cvp.items())))  # fmt: skip
    print("targets: compiled miss <= 1x bisect, compiled hit <= 1x range check, "
          "compiled/pure <= 0.4, worst op ratio <= 2x")  # fmt: skip
    results["ratios"] = ratios
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("bench_engine.py: interrupted", file=sys.stderr)
        sys.exit(130)
