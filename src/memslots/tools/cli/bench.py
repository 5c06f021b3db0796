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

from memslots.constants import KVM_USER_MEM_SLOTS_X86
from memslots.tools import bench as _bench
from memslots.tools.bench import (
    IMPLS,
    JUDGED_REPETITIONS,
    OPS,
    SCENARIO_IMPLS,
    SCENARIOS,
    BenchConfig,
    BenchResults,
    available_cpus,
    cpu_ranges,
    spread,
)
from memslots.tools.cli import CliError
from memslots.tools.cli import console as cli_console
from memslots.tools.cli.options import int_range
from memslots.tools.cli.progress import PROGRESS_EVERY, LineProgress, stderr_is_terminal

#: what ``bench --quick`` takes, measured on this project's 2-core machine
#: (docs/benchmarks.md, "How long a run takes")
QUICK_TIME = "15-30 s"
#: what the full run takes there
FULL_TIME = "2-4 minutes"

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
#: what each column is, for the legend (only the implementations that ran are listed)
LEGENDS: dict[str, str] = {
    "tree": f"tree: memslots.Vm as installed ({_bench.BUILD})",
    "pure": "pure: the same engine's pure-Python build (a worker process)",
    "array": "array: memslots.baseline.ArrayVm",
    "kvm": "KvmVm: memslots.kvm.KvmVm (the kernel plus the engine mirroring it)",
    "ioctl": "ioctl: the bare KVM_SET_USER_MEMORY_REGION",
    "vmmemory": "vm-mem*: a Python model of rust-vmm vm-memory's GuestRegionCollection "
    "(clone, push, sort and check per insert), not the crate",
    "unicorn": "unicorn: Unicorn's mem_map_ptr / mem_unmap / mem_protect",
}
#: the mark of a cell that was not measured, in every table
UNMEASURED = "-"


def legend(results: BenchResults) -> str:
    """The legend of the implementations that ran."""
    ran = {r.impl for r in results.scenarios} | {p.impl for p in results.sweep}
    return "; ".join(LEGENDS[i] for i in IMPLS if i in ran)


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


def check_cpu(cpu: int | None) -> None:
    """Raise :class:`CliError` unless ``cpu`` is None or a CPU this process may run on
    (``os.sched_getaffinity``)."""
    cpus = available_cpus()
    if cpu is not None and cpus is not None and cpu not in cpus:
        raise CliError(f"--cpu {cpu}: not an available CPU ({cpu_ranges(cpus)})")


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
            "compiled), a Python model of rust-vmm vm-memory and Unicorn (pip install "
            "'memslots[peers]'). Every number is the median of the repetitions, shown with "
            f"their spread; targets are judged from {JUDGED_REPETITIONS} repetitions on "
            "(--quick: indicative)."
        ),
    )
    d = BenchConfig()
    p.add_argument("--quick", action="store_true",
                   help=f"short measurements, one repetition, {_bench.QUICK_SLOTS} slots in the"
                   f" scenarios, the array swept to as many ({QUICK_TIME} on 2 CPUs); its "
                   "verdicts are indicative")  # fmt: skip
    p.add_argument("--slots", type=int_range(4, KVM_USER_MEM_SLOTS_X86), default=None,
                   metavar="N", help=f"slots in the scenarios, 4..{d.slots} "
                   f"(default {d.slots})")  # fmt: skip
    p.add_argument("--counts", type=_ints, default=None, metavar="N,N,...",
                   help="slot counts of the sweep, increasing, each 4..32764 (default "
                   + ",".join(map(str, d.counts)) + ")")  # fmt: skip
    p.add_argument("--duration", type=float, default=None, metavar="SECONDS",
                   help=f"seconds per measurement, above 0 and at most 60 (default "
                   f"{d.duration}; --quick: {BenchConfig.quick().duration})")  # fmt: skip
    p.add_argument("--repetitions", type=int, default=None, metavar="R",
                   help=f"measurements per number, 1..1000: the median and spread are shown"
                   f", targets judged from {JUDGED_REPETITIONS} on (default {d.repetitions}; "
                   "--quick: 1; --dirty: 10, --quick 3)")  # fmt: skip
    p.add_argument("--impl", type=_names(IMPLS), default=None, metavar="NAME,...",
                   help=f"implementations: {','.join(IMPLS)} (default: all usable)")  # fmt: skip
    p.add_argument("--scenario", type=_names(SCENARIOS), default=None, metavar="NAME,...",
                   help="scenarios: " + ",".join(SCENARIOS) + " (default: all)")  # fmt: skip
    p.add_argument("--cpu", type=_cpu, default=argparse.SUPPRESS, metavar="CPU",
                   help="pin the process to this CPU (one of os.sched_getaffinity), or "
                   "'none' (default 0)")  # fmt: skip
    p.add_argument("--json", metavar="FILE", help="write every result to FILE as JSON")
    p.add_argument("--plot", metavar="FILE.png",
                   help="save a log-log plot of the sweep (needs the plot extra: "
                   "pip install 'memslots[plot]')")  # fmt: skip
    p.add_argument("--no-progress", action="store_true",
                   help="no progress on stderr (a bar on a terminal, else a line every "
                   f"{PROGRESS_EVERY:g} s)")  # fmt: skip
    p.add_argument("--dirty", action="store_true",
                   help="instead: dirty-page harvest, ring vs GET_DIRTY_LOG (takes --quick, "
                   "--repetitions, --json, --no-progress)")  # fmt: skip
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The :class:`BenchConfig` the command line asks for."""
    cpu = getattr(args, "cpu", 0)
    check_cpu(cpu)
    values: dict[str, Any] = {"cpu": cpu}
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
        return UNMEASURED
    return _times(x / y)


def _times(r: float) -> str:
    return f"{r:.0f}x" if r >= 100 else f"{r:.2g}x" if r < 10 else f"{r:.1f}x"


def repetitions_text(repetitions: int) -> str:
    """What a number of the tables is: ``one repetition`` or ``median of 3 repetitions``."""
    return "one repetition" if repetitions == 1 else f"median of {repetitions} repetitions"


def spread_note(results: BenchResults, what: str, named: list[tuple[str, list[float]]]) -> str:
    """One line on the spread of the repeated measurements behind a table: the median
    and the widest relative range, (max - min) / median, and where it was."""
    reps = results.config.repetitions
    if reps < 2 or not named:
        return f"{what}: one measurement each, no spread to show"
    spreads = sorted((spread(runs), name) for name, runs in named if len(runs) > 1)
    if not spreads:
        return f"{what}: one measurement each, no spread to show"
    mid = spreads[len(spreads) // 2][0]
    top, where = spreads[-1]
    return (
        f"{what}: spread over the {reps} repetitions, (max - min) / median: {mid:.0%} for "
        f"half of the numbers or less, {top:.0%} at most ({where})"
    )


def scenario_table(results: BenchResults) -> tuple[str, Table, list[str]] | None:
    """The memslot_perf_test scenarios, seconds per iteration per implementation: the
    title line, the table and the notes to print below it."""
    rows = [
        s for s in SCENARIOS if s != "sweep" and any(r.scenario == s for r in results.scenarios)
    ]
    if not rows:
        return None
    cfg = results.config
    impls = [i for i in IMPLS if any(r.impl == i for r in results.scenarios)]
    title = (
        f"memslot_perf_test scenarios, {cfg.slots} slots: time per iteration "
        f"({repetitions_text(cfg.repetitions)})"
    )
    t = Table()
    t.add_column("scenario", no_wrap=True)
    for i in impls:
        t.add_column(SHORT[i], justify="right", no_wrap=True)
    if "tree" in impls and "array" in impls:
        t.add_column("array/tree", justify="right")
    extrapolated = False
    named: list[tuple[str, list[float]]] = []
    for s in rows:
        cells = [s]
        for i in impls:
            r = results.scenario(s, i)
            if r is None:
                cells.append(UNMEASURED)
            else:
                cells.append(fmt_time(r.seconds) + ("*" if r.extrapolated else ""))
                extrapolated |= r.extrapolated
                named.append((f"{SHORT[i]}, {s}", r.runs))
        if "tree" in impls and "array" in impls:
            a, b = results.scenario(s, "array"), results.scenario(s, "tree")
            cells.append(_ratio(a.seconds if a else None, b.seconds if b else None))
        t.add_row(*cells)
    notes = [f"{s}: {ITERATION[s]}" for s in rows]
    if any(
        i not in SCENARIO_IMPLS[s] for s in rows for i in impls
    ):  # a cell the scenario does not apply to
        notes.append(
            f"{UNMEASURED}: not measured (lookups, hva walks and guest access are the engine's)"
        )
    if extrapolated:
        notes.append("*: a pass took longer than the measurement; scaled from part of one")
    notes.append(spread_note(results, "scenarios", named))
    return title, t, notes


def sweep_table(results: BenchResults) -> tuple[str, Table, list[str]] | None:
    """The per-operation sweep, microseconds per operation at each slot count: the title
    line, the table and the notes to print below it."""
    if not results.sweep:
        return None
    cfg = results.config
    impls = [i for i in IMPLS if any(p.impl == i for p in results.sweep)]
    title = (
        f"Per-operation cost with N slots present: µs per operation "
        f"({repetitions_text(cfg.repetitions)})"
    )
    t = Table()
    t.add_column("slots", justify="right")
    t.add_column("op")
    for i in impls:
        t.add_column(SHORT[i], justify="right")
    pairs = [("array", "tree"), ("tree", "pure"), ("tree", "ioctl")]
    pairs = [(a, b) for a, b in pairs if a in impls and b in impls]
    for a, b in pairs:
        t.add_column(f"{a}/{b}", justify="right")
    unmeasured = False
    named: list[tuple[str, list[float]]] = []
    for count in cfg.counts:
        for op in (*OPS, "mean"):
            cells = [str(count) if op == "create" else "", op]
            for i in impls:
                v = results.point(i, count, op)
                unmeasured |= v is None
                cells.append(UNMEASURED if v is None else f"{v:.1f}")
                runs = results.runs(i, count, op)
                if runs and op != "mean":
                    named.append((f"{SHORT[i]}, {op} at {count} slots", runs))
            for a, b in pairs:
                cells.append(_ratio(results.point(a, count, op), results.point(b, count, op)))
            t.add_row(*cells, style="bold" if op == "mean" else None)
        t.add_section()
    notes = []
    if unmeasured:
        notes.append(f"{UNMEASURED}: not measured at this count (see the notes below)")
    notes.append(spread_note(results, "sweep", named))
    return title, t, notes


def criteria_lines(results: BenchResults) -> list[str]:
    """The acceptance ratios as console markup lines: medians over the repetitions with
    their range, and a verdict only from :data:`JUDGED_REPETITIONS` repetitions on."""
    c = results.criteria
    out: list[str] = []
    top = c.get("largest_count")
    reps = results.config.repetitions

    def one(key: str, op: str, r: dict[str, float]) -> str:
        rng = c.get(f"{key}_range", {}).get(op)
        text = _times(r[op])
        if rng and reps > 1:
            text += f" ({_times(rng[0])}-{_times(rng[1])})"
        return text

    def ops(key: str, r: dict[str, float]) -> str:
        return ", ".join(f"{op} {one(key, op, r)}" for op in OPS)

    def mark(key: str, target: str) -> str:
        if f"{key}_ok" in c:
            verdict = "[green]met[/green]" if c[f"{key}_ok"] else "[red]NOT MET[/red]"
            return f"target {target}: {verdict} (on the medians of {reps} repetitions)"
        if f"{key}_indicative" in c:
            outcome = "met" if c[f"{key}_indicative"] else "not met"
            n = f"{reps} repetition" + ("s" if reps > 1 else "")
            return (
                f"target {target}: indicative ({n}): {outcome} in this run; "
                f"judged from {JUDGED_REPETITIONS} repetitions"
            )
        return f"(target {target} is stated for {KVM_USER_MEM_SLOTS_X86} slots)"

    if "tree_top_vs_64" in c:
        r = c["tree_top_vs_64"]
        out.append(
            f"tree at {top} slots vs 64 slots: mean {one('tree_top_vs_64', 'mean', r)} "
            f"({ops('tree_top_vs_64', r)}); " + mark("tree_top_vs_64", "<= 2x per operation")
        )
    if "array_vs_tree_at_top" in c:
        key = "array_vs_tree_at_top"
        r = c[key]
        out.append(
            f"array vs tree at {top} slots: mean {one(key, 'mean', r)} ({ops(key, r)}); "
            + mark(key, ">= 20x on the mean")
        )
    if "compiled_vs_pure_at_top" in c:
        key = "compiled_vs_pure_at_top"
        out.append(
            f"compiled vs pure at {top} slots: {ops(key, c[key])}; "
            + mark(key, "<= 0.4x per operation")
        )
    if "tree_vs_ioctl_at_top" in c:
        key = "tree_vs_ioctl_at_top"
        line = f"tree ({c.get('build')}) vs the kernel's ioctl at {top} slots: {ops(key, c[key])}"
        if c.get("build") == "compiled":
            line += "; " + mark(key, "<= 1.0x per operation, goal 0.5x")
        out.append(line)
    for peer, name in (
        ("vmmemory", "a Python model of rust-vmm's vm-memory (not the crate)"),
        ("unicorn", "Unicorn"),
    ):
        if f"{peer}_vs_tree" in c:
            r = c[f"{peer}_vs_tree"]
            out.append(f"{name} vs tree at {r['count']} slots: {ops(f'{peer}_vs_tree', r)}")
    if "kvmvm_vs_ioctl_at_top" in c:
        key = "kvmvm_vs_ioctl_at_top"
        r = c[key]
        out.append(f"KvmVm (ioctl + engine mirror) vs the bare ioctl: mean {one(key, 'mean', r)}")
    return out


def print_results(results: BenchResults, console: Console) -> None:
    """Print the machine, both tables (each with its title line above and its notes
    below), the legend, the acceptance ratios and the notes."""
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
        f"[bold]memslots bench[/bold]: {escape(str(m.get('cpu_model', m.get('machine'))))}, "
        f"{m.get('cpus')} CPUs, Linux {escape(str(m.get('kernel')))}, Python "
        f"{m.get('python')}, {escape(kvm_text)}"
        + (f", pinned to CPU {pinned}" if pinned is not None else ""),
        highlight=False,
    )
    for part in (scenario_table(results), sweep_table(results)):
        if part is not None:
            title, table, notes = part
            console.print()
            console.print(f"[bold]{escape(title)}[/bold]", highlight=False, soft_wrap=True)
            console.print(table)
            for note in notes:
                console.print(f"[dim]{escape(note)}[/dim]", highlight=False, soft_wrap=True)
    console.print()
    for line in legend(results).split("; "):
        console.print(f"[dim]{escape(line)}[/dim]", highlight=False, soft_wrap=True)
    for line in criteria_lines(results):
        console.print(line, highlight=False, soft_wrap=True)
    for note in results.notes:
        console.print(f"[yellow]note[/yellow]: {escape(note)}", highlight=False, soft_wrap=True)
    console.print(f"[dim]{results.seconds:.1f} s in total[/dim]", highlight=False)


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


#: the options of the scenarios and the sweep, which ``--dirty`` does not use
NOT_DIRTY = ("slots", "counts", "duration", "impl", "scenario", "cpu", "plot")


def refuse_unused_by_dirty(args: argparse.Namespace) -> None:
    """Raise :class:`CliError` (status 2) for an option given with ``--dirty`` that it
    does not use, rather than ignoring it."""
    given = [
        name
        for name in NOT_DIRTY
        if getattr(args, name, None) is not None or (name == "cpu" and hasattr(args, name))
    ]
    if given:
        options = ", ".join("--" + name for name in given)
        raise CliError(
            f"--dirty does not use {options} (it takes --quick, --repetitions, --json and "
            "--no-progress)"
        )


def run(args: argparse.Namespace) -> int:
    """Run the benchmark and print, save and plot the results."""
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        if path:
            check_output_file(option, path)
    if getattr(args, "dirty", False):
        from memslots.tools.cli.bench_dirty import run_dirty

        refuse_unused_by_dirty(args)
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
        elif not stderr_is_terminal():
            results = _bench.run(cfg, LineProgress())
        else:
            columns = (
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
            )
            bar = cli_console(stderr=True)
            with Progress(*columns, console=bar, transient=True) as p:
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
