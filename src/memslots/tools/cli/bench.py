"""``memslots bench``: the memslot_perf_test scenarios and the per-operation sweep over
slot counts, for the tree engine, the array baseline and the kernel (see
:mod:`memslots.tools.bench`), as rich tables, JSON and a log-log plot."""

from __future__ import annotations

import argparse
import importlib.util
import os
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from memslots.tools import bench as _bench
from memslots.tools.bench import (
    IMPLS,
    OPS,
    SCENARIO_IMPLS,
    SCENARIOS,
    BenchConfig,
    BenchResults,
)
from memslots.tools.cli import CliError
from memslots.tools.cli import console as cli_console

#: what one iteration of each scenario is, for the table's legend
ITERATION: dict[str, str] = {
    "setup": "create all N slots",
    "move-active": "2 MOVEs of the last slot, 96 vCPU lookups straddling its start",
    "move-inactive": "2 MOVEs of the last slot, 96 vCPU lookups just before it",
    "unmap": "invalidate 64 MiB of hva, 4 KiB per call",
    "unmap-chunked": "invalidate 64 MiB of hva, 2 MiB per call",
    "rw": "write_guest + read_guest of 8 bytes in each page of 512 MiB",
}
#: column headings
SHORT: dict[str, str] = {
    "tree": "tree",
    "pure": "pure",
    "array": "array",
    "kvm": "KvmVm",
    "ioctl": "ioctl",
    "vmmemory": "vm-mem*",
    "unicorn": "unicorn",
}
LEGEND = (
    f"tree: memslots.Vm as installed ({_bench.BUILD}); pure: the same engine's pure-Python "
    "build (a worker process); array: memslots.baseline.ArrayVm; KvmVm: memslots.kvm.KvmVm "
    "(the kernel plus the engine mirroring it); ioctl: the bare KVM_SET_USER_MEMORY_REGION; "
    "vm-mem*: a Python model of rust-vmm vm-memory's GuestRegionCollection (clone, push, "
    "sort and check per insert), not the crate; unicorn: Unicorn's mem_map_ptr / mem_unmap "
    "/ mem_protect"
)


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of integers: {text!r}"
        ) from None


def _names(known: tuple[str, ...]) -> Any:
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(x.strip() for x in text.split(",") if x.strip())
        for n in names:
            if n not in known:
                raise argparse.ArgumentTypeError(f"unknown name {n!r}; known: {', '.join(known)}")
        return names

    return parse


def _cpu(text: str) -> int | None:
    if text.lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--cpu takes a CPU number or 'none', not {text!r}"
        ) from None


def register(sub: Any) -> None:
    """Add the ``bench`` subcommand."""
    p = sub.add_parser(
        "bench",
        help="memslot_perf_test scenarios and a slot-count sweep: the engine (compiled and "
        "pure), the array design, the kernel and peer libraries",
        description=(
            "Measure the tree engine (Vm), the array design it replaced (ArrayVm) and, when "
            "/dev/kvm is usable, the kernel (KvmVm and the bare ioctl): the memslot_perf_test "
            "scenarios with N slots, and the cost of CREATE, DELETE, MOVE and FLAGS_ONLY "
            "over slot counts, also for the engine's pure-Python build (when this one is "
            "compiled), a model of rust-vmm vm-memory and Unicorn (pip install "
            "'memslots[peers]'). Times are the best of the repetitions."
        ),
    )
    d = BenchConfig()
    p.add_argument("--quick", action="store_true",
                   help=f"short measurements, one repetition, {_bench.QUICK_SLOTS} slots in the"
                   " scenarios, the array swept to as many (about 20 s)")  # fmt: skip
    p.add_argument("--slots", type=int, default=None, metavar="N",
                   help=f"slots in the scenarios (default {d.slots})")  # fmt: skip
    p.add_argument("--counts", type=_ints, default=None, metavar="N,N,...",
                   help="slot counts of the sweep (default "
                   + ",".join(map(str, d.counts)) + ")")  # fmt: skip
    p.add_argument("--duration", type=float, default=None, metavar="SECONDS",
                   help=f"time per measurement (default {d.duration}; --quick: "
                   f"{BenchConfig.quick().duration})")  # fmt: skip
    p.add_argument("--repetitions", type=int, default=None, metavar="R",
                   help=f"measurements per number, the best is kept (default {d.repetitions}; "
                   "--quick: 1)")  # fmt: skip
    p.add_argument("--impl", type=_names(IMPLS), default=None, metavar="NAME,...",
                   help=f"implementations: {','.join(IMPLS)} (default: all usable)")  # fmt: skip
    p.add_argument("--scenario", type=_names(SCENARIOS), default=None, metavar="NAME,...",
                   help="scenarios: " + ",".join(SCENARIOS) + " (default: all)")  # fmt: skip
    p.add_argument("--cpu", type=_cpu, default=0, metavar="CPU",
                   help="pin the process to this CPU, or 'none' (default 0)")  # fmt: skip
    p.add_argument("--json", metavar="FILE", help="write every result to FILE as JSON")
    p.add_argument("--plot", metavar="FILE.png",
                   help="save a log-log plot of the sweep (needs the plot extra: "
                   "pip install 'memslots[plot]')")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="do not show progress bars")
    p.add_argument("--dirty", action="store_true",
                   help="instead: dirty-page harvest, ring vs GET_DIRTY_LOG")  # fmt: skip
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The :class:`BenchConfig` the command line asks for."""
    values: dict[str, Any] = {"cpu": args.cpu}
    for name in ("slots", "counts", "duration", "repetitions"):
        v = getattr(args, name)
        if v is not None:
            values[name] = v
    if args.impl is not None:
        values["impls"] = args.impl
    if args.scenario is not None:
        values["scenarios"] = args.scenario
    cfg = BenchConfig.quick(**values) if args.quick else BenchConfig(**values)
    try:
        cfg.validate()
    except ValueError as exc:
        raise CliError(str(exc)) from None
    return cfg


class RichProgress:
    """:class:`memslots.tools.bench.Progress` as a rich progress bar per phase."""

    def __init__(self, progress: Progress) -> None:
        self._p = progress
        self._task: Any = None

    def phase(self, description: str, total: int) -> None:
        if self._task is not None:
            self._p.update(self._task, completed=self._p.tasks[-1].total)
        self._task = self._p.add_task(description, total=total)

    def advance(self, steps: int = 1) -> None:
        if self._task is not None:
            self._p.advance(self._task, steps)


def fmt_time(seconds: float) -> str:
    """``1.23 s`` / ``45.6 ms`` / ``78.9 µs`` with three significant digits."""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds * 1e9:.3g} ns"


def _ratio(x: float | None, y: float | None) -> str:
    if x is None or y is None or y == 0:
        return ""
    r = x / y
    return f"{r:.0f}x" if r >= 100 else f"{r:.2g}x" if r < 10 else f"{r:.1f}x"


def scenario_table(results: BenchResults) -> Table | None:
    """The memslot_perf_test scenarios: seconds per iteration per implementation."""
    rows = [
        s for s in SCENARIOS if s != "sweep" and any(r.scenario == s for r in results.scenarios)
    ]
    if not rows:
        return None
    cfg = results.config
    impls = [i for i in IMPLS if any(r.impl == i for r in results.scenarios)]
    t = Table(
        title=f"memslot_perf_test scenarios, {cfg.slots} slots: time per iteration "
        f"(best of {cfg.repetitions})",
        title_justify="left",
    )
    t.add_column("scenario", no_wrap=True)
    for i in impls:
        t.add_column(SHORT[i], justify="right", no_wrap=True)
    if "tree" in impls and "array" in impls:
        t.add_column("array/tree", justify="right")
    extrapolated = False
    for s in rows:
        cells = [s]
        for i in impls:
            r = results.scenario(s, i)
            if r is None:
                cells.append("-" if i not in SCENARIO_IMPLS[s] else "")
            else:
                cells.append(fmt_time(r.seconds) + ("*" if r.extrapolated else ""))
                extrapolated |= r.extrapolated
        if "tree" in impls and "array" in impls:
            a, b = results.scenario(s, "array"), results.scenario(s, "tree")
            cells.append(_ratio(a.seconds if a else None, b.seconds if b else None))
        t.add_row(*cells)
    notes = [f"{s}: {ITERATION[s]}" for s in rows]
    notes.append("-: not applicable (lookups, hva walks and guest access are the engine's)")
    if extrapolated:
        notes.append("*: a pass took longer than the measurement; scaled from part of one")
    t.caption = "\n".join(notes)
    t.caption_justify = "left"
    return t


def sweep_table(results: BenchResults) -> Table | None:
    """The per-operation sweep: microseconds per operation at each slot count."""
    if not results.sweep:
        return None
    cfg = results.config
    impls = [i for i in IMPLS if any(p.impl == i for p in results.sweep)]
    t = Table(
        title=f"Per-operation cost with N slots present: µs per operation "
        f"(best of {cfg.repetitions})",
        title_justify="left",
    )
    t.add_column("slots", justify="right")
    t.add_column("op")
    for i in impls:
        t.add_column(SHORT[i], justify="right")
    pairs = [("array", "tree"), ("tree", "pure"), ("tree", "ioctl")]
    pairs = [(a, b) for a, b in pairs if a in impls and b in impls]
    for a, b in pairs:
        t.add_column(f"{a}/{b}", justify="right")
    for count in cfg.counts:
        for op in (*OPS, "mean"):
            cells = [str(count) if op == "create" else "", op]
            for i in impls:
                v = results.point(i, count, op)
                cells.append("" if v is None else f"{v:.1f}")
            for a, b in pairs:
                cells.append(_ratio(results.point(a, count, op), results.point(b, count, op)))
            t.add_row(*cells, style="bold" if op == "mean" else None)
        t.add_section()
    return t


def criteria_lines(results: BenchResults) -> list[str]:
    """The acceptance ratios as console markup lines."""
    c = results.criteria
    out: list[str] = []
    top = c.get("largest_count")

    def ops(r: dict[str, float]) -> str:
        return ", ".join(f"{op} {r[op]:.2f}x" for op in OPS)

    def mark(key: str, target: str) -> str:
        if key not in c:
            return f"(target {target} is stated for 32764 slots)"
        verdict = "[green]met[/green]" if c[key] else "[red]NOT MET[/red]"
        return f"target {target}: {verdict}"

    if "tree_top_vs_64" in c:
        r = c["tree_top_vs_64"]
        out.append(
            f"tree at {top} slots vs 64 slots: mean {r['mean']:.2f}x ({ops(r)}); "
            + mark("tree_top_vs_64_ok", "<= 2x per operation")
        )
    if "array_vs_tree_at_top" in c:
        r = c["array_vs_tree_at_top"]
        out.append(
            f"array vs tree at {top} slots: mean {_ratio(r['mean'], 1.0)} "
            f"({', '.join(f'{op} {_ratio(r[op], 1.0)}' for op in OPS)}); "
            + mark("array_vs_tree_at_top_ok", ">= 20x on the mean")
        )
    if "compiled_vs_pure_at_top" in c:
        r = c["compiled_vs_pure_at_top"]
        out.append(
            f"compiled vs pure at {top} slots: {ops(r)}; "
            + mark("compiled_vs_pure_at_top_ok", "<= 0.4x per operation")
        )
    if "tree_vs_ioctl_at_top" in c:
        r = c["tree_vs_ioctl_at_top"]
        line = f"tree ({c.get('build')}) vs the kernel's ioctl at {top} slots: {ops(r)}"
        if c.get("build") == "compiled":
            line += "; " + mark("tree_vs_ioctl_at_top_ok", "<= 1.0x per operation, goal 0.5x")
        out.append(line)
    for peer, name in (("vmmemory", "vm-memory model"), ("unicorn", "Unicorn")):
        if f"{peer}_vs_tree" in c:
            r = c[f"{peer}_vs_tree"]
            out.append(f"{name} vs tree at {r['count']} slots: {ops(r)}")
    if "kvmvm_vs_ioctl_at_top" in c:
        r = c["kvmvm_vs_ioctl_at_top"]
        out.append(f"KvmVm (ioctl + engine mirror) vs the bare ioctl: mean {r['mean']:.2f}x")
    return out


def print_results(results: BenchResults, console: Console) -> None:
    """Print the machine, both tables, the acceptance ratios and the notes."""
    m = results.machine
    kvm = m.get("kvm")
    kvm_text = (
        f"/dev/kvm API {kvm['api_version']}, {kvm['nr_memslots']} memslots, "
        f"{kvm['address_spaces']} address space(s)"
        if kvm
        else f"no KVM ({m.get('kvm_unavailable', 'not usable')})"
    )
    pinned = m.get("pinned_cpu")
    console.print(
        f"[bold]memslots bench[/bold]: {m.get('cpu_model', m.get('machine'))}, "
        f"{m.get('cpus')} CPUs, Linux {m.get('kernel')}, Python {m.get('python')}, {kvm_text}"
        + (f", pinned to CPU {pinned}" if pinned is not None else "")
    )
    for table in (scenario_table(results), sweep_table(results)):
        if table is not None:
            console.print(table)
    console.print(f"[dim]{LEGEND}[/dim]")
    for line in criteria_lines(results):
        console.print(line)
    for note in results.notes:
        console.print(f"[yellow]note[/yellow]: {escape(note)}")
    console.print(f"[dim]{results.seconds:.1f} s in total[/dim]")


def check_output_file(option: str, path: str) -> None:
    """Raise :class:`CliError` now, before a long run, when ``path`` cannot be written
    at its end: its directory is missing or not writable, or it is a directory."""
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        raise CliError(f"{option} {path}: no such directory: {directory}")
    if os.path.isdir(path):
        raise CliError(f"{option} {path}: is a directory")
    if not os.access(directory, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise CliError(f"{option} {path}: permission denied")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark and print, save and plot the results."""
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        if path:
            check_output_file(option, path)
    if getattr(args, "dirty", False):
        from memslots.tools.cli.bench_dirty import run_dirty

        return run_dirty(args)
    cfg = config_from_args(args)
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise CliError("--plot needs matplotlib: pip install 'memslots[plot]'")
    if args.plot and "sweep" not in cfg.scenarios:
        raise CliError("--plot draws the sweep: add 'sweep' to --scenario")
    console = cli_console()
    try:
        if args.no_progress:
            results = _bench.run(cfg)
        else:
            columns = (
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
            )
            with Progress(*columns, console=console, transient=True) as p:
                results = _bench.run(cfg, RichProgress(p))
    except AssertionError as exc:  # KvmVm's ConformanceError, a failed read-back check
        raise CliError(f"benchmark stopped: {exc}", status=1) from None
    print_results(results, console)
    if args.json:
        results.save_json(args.json)
        console.print(f"results written to {args.json}")
    if args.plot:
        _bench.plot(results, args.plot)
        console.print(f"plot written to {args.plot}")
    return 0
