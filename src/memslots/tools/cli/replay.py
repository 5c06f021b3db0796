"""``memslots replay``: replay a real memslot trace and compare engine, array and kernel.

Usage::

    memslots replay [TRACE] [--kvm | --no-kvm] [--impl engine|array|all] [--json]
                    [--skip-bad] [--format qemu|strace|jsonl] [--record FILE] [--calls]

``TRACE`` is a QEMU ``kvm_set_user_memory`` log, strace output or the project's JSON
Lines (see :mod:`memslots.tools.traces`; the format is detected unless ``--format`` is given),
``-`` for standard input, or nothing for the trace shipped in the package (QEMU 7.2
booting SeaBIOS). Every call is made on a fresh engine VM, a fresh ``ArrayVm`` and, when
``/dev/kvm`` is usable (or with ``--kvm``), a fresh real VM whose hvas are relocated into
this process (see :mod:`memslots.tools.replay`).

Output: the calls by kind, errors by errno, every disagreement between the recorded
result and an implementation's (with its trace line), the final memory map of each
address space and the timings of each implementation (mean per call and total, per kind
too). ``--calls`` adds one row per call. ``--json`` prints one JSON document instead,
whose keys are documented in :mod:`memslots.tools.replay`. ``--record FILE`` writes the calls
with the primary implementation's results as JSON Lines, which replays to the same
tables.

Exit status: 0 when every result agrees, 1 when some call or final map disagrees or an
implementation crashed, 2 for a malformed trace (one line ``FILE:LINE: message``; use
``--skip-bad`` to go on and list the skipped lines) or another usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import IO, Any, Final, cast

from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn
from rich.table import Table
from rich.text import Text

from memslots.constants import PAGE_SIZE
from memslots.errors import errno_name
from memslots.tools.cli import CliError
from memslots.tools.replay import (
    KINDS,
    ImplName,
    MapEntry,
    ReplayReport,
    flag_names,
    kernel_available,
    replay,
)
from memslots.tools.traces import (
    EMBEDDED_TRACE_NAME,
    FORMATS,
    MemslotCall,
    TraceFormat,
    TraceFormatError,
    detect_format,
    embedded_trace_path,
    parse_trace,
    read_trace,
    write_jsonl,
)

#: what the embedded trace is (``memslots/data/seabios.log``)
EMBEDDED_DESCRIPTION: Final = "QEMU 7.2 booting SeaBIOS with 512 MiB, std VGA and e1000"

#: most clusters / skipped lines listed before "... and N more"
_LIST_LIMIT: Final = 8

#: rich's width when the output is not a terminal (a terminal's own width is used)
_PIPE_WIDTH: Final = 110


def register(sub: Any) -> None:
    """Add the ``replay`` subcommand."""
    p = sub.add_parser(
        "replay",
        help="replay a memslot trace on the engine, the array and /dev/kvm, and compare",
        description=(
            "Replay a recorded sequence of KVM_SET_USER_MEMORY_REGION calls (QEMU trace, "
            "strace or JSON Lines) on the engine, ArrayVm and /dev/kvm; show calls by kind, "
            "errors, disagreements with the recorded results, the final memory map and "
            "timings. Without TRACE, replays the trace shipped in the package."
        ),
    )
    p.add_argument(
        "trace",
        nargs="?",
        metavar="TRACE",
        help="trace file, '-' for stdin; default: the embedded SeaBIOS trace",
    )
    p.add_argument(
        "--kvm",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="replay on /dev/kvm too (default: when it is usable)",
    )
    p.add_argument(
        "--impl",
        choices=("engine", "array", "all"),
        default="all",
        help="models to replay (default: all); kinds and map are the engine's, or the"
        " array's with --impl array",
    )
    p.add_argument("--json", action="store_true", help="print one JSON document instead")
    p.add_argument("--skip-bad", action="store_true", help="skip malformed lines (and list them)")
    p.add_argument(
        "--format", choices=FORMATS, default=None, help="trace format (default: detected)"
    )
    p.add_argument(
        "--record",
        metavar="FILE",
        help="write the calls with the replayed results as JSON Lines to FILE",
    )
    p.add_argument("--calls", action="store_true", help="also list every call with its results")
    p.set_defaults(func=run)


# =========================================================================== input


def _load(
    args: argparse.Namespace,
) -> tuple[list[MemslotCall], str, str, bool, list[TraceFormatError]]:
    """The calls, their source label, their format, whether they are the embedded trace,
    and the skipped lines (``--skip-bad``)."""
    errors: list[TraceFormatError] = []
    fmt = cast("TraceFormat | None", args.format)
    label = args.trace or EMBEDDED_TRACE_NAME
    try:
        if args.trace == "-":
            label = "<stdin>"
            lines = sys.stdin.readlines()
            fmt = fmt or detect_format(lines, label)
            calls = parse_trace(lines, label, fmt=fmt, skip_bad=args.skip_bad, errors=errors)
            return calls, label, fmt, False, errors
        path = embedded_trace_path() if args.trace is None else args.trace
        fmt = fmt or detect_format(path, label)
        calls = read_trace(path, fmt=fmt, skip_bad=args.skip_bad, errors=errors, source=label)
        return calls, label, fmt, args.trace is None, errors
    except TraceFormatError as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"{label}: {exc.strerror or exc}") from None


# =========================================================================== formatting


def _size(n: int) -> str:
    """``512 MiB``, ``44 KiB``: exact in the largest unit that divides ``n``; a long
    number of KiB becomes ``528.7 MiB``; ``0`` for 0."""
    if not n:
        return "0"
    units = (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10))
    for unit, shift in units:
        if n and n % (1 << shift) == 0 and (n >> shift) < 100_000:
            return f"{n >> shift} {unit}"
    for unit, shift in units:
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} B"


def _us(ns: float) -> str:
    return f"{ns / 1000:.1f}"


def _ms(ns: float) -> str:
    return f"{ns / 1e6:.2f}"


def _result(err: int | None) -> Text:
    if err is None:
        return Text("?", style="dim")
    return Text(errno_name(err), style="green" if err == 0 else "red")


def _flags(flags: int) -> str:
    return "|".join(flag_names(flags)) or "-"


_CALL_COLUMNS: Final = ("slot", "flags", "gpa", "size", "hva")
_CALL_RIGHT: Final = ("line", "slot", "size")


def _call_cells(c: MemslotCall) -> tuple[str, ...]:
    """The cells of :data:`_CALL_COLUMNS` for a call."""
    return (
        str(c.slot),
        _flags(c.flags) + (" (v2)" if c.v2 else ""),
        f"{c.guest_phys_addr:#x}",
        _size(c.memory_size) if c.memory_size % PAGE_SIZE == 0 else f"{c.memory_size:#x}",
        f"{c.userspace_addr:#x}",
    )


def _table(*columns: str, right: tuple[str, ...] = ()) -> Table:
    t = Table()
    for col in columns:
        t.add_column(col, justify="right" if col in right else "left", no_wrap=True)
    return t


def _show(con: Console, title: str, t: Table) -> None:
    """The title on its own line (rich would wrap it to the table's width), then the
    table."""
    if title:
        con.print(f"[bold]{title}[/]", highlight=False)
    con.print(t)


def _header(con: Console, report: ReplayReport, embedded: bool) -> None:
    con.print(
        f"[bold]Replaying {report.source}[/]: {len(report.calls)} calls, {report.fmt} format",
        highlight=False,
    )
    if embedded:
        con.print(f"  no TRACE given: the embedded trace, {EMBEDDED_DESCRIPTION}", highlight=False)
    for name, run in report.runs.items():
        if run.status == "ok":
            text = run.description
        elif run.status == "off":
            text = "[dim]off[/]"
        else:
            text = f"[yellow]{run.status}[/]: {run.note}"
        con.print(f"  {name:<7} {text}", highlight=False)
    lim = report.limits
    con.print(
        f"  limits  {'from /dev/kvm' if report.limits_source == 'kernel' else 'x86-64 defaults'}"
        f": {lim.nr_address_spaces} address space{'s' if lim.nr_address_spaces > 1 else ''},"
        f" {lim.max_user_slots} slots, max gfn {lim.max_gfn:#x},"
        f" READONLY {'yes' if lim.readonly_mem else 'no'}",
        highlight=False,
    )
    if report.skipped:
        con.print(f"[yellow]Skipped {len(report.skipped)} malformed line(s):[/]")
        for e in report.skipped[:_LIST_LIMIT]:
            con.print(f"  {e}", highlight=False, markup=False)
        if len(report.skipped) > _LIST_LIMIT:
            con.print(f"  ... and {len(report.skipped) - _LIST_LIMIT} more")


def _relocation(con: Console, report: ReplayReport) -> None:
    clusters = report.relocation
    if clusters is None:
        return
    if not clusters:
        con.print("hvas: no hva range to relocate for /dev/kvm")
        return
    total = sum(c.size for c in clusters)
    con.print(
        f"[bold]hvas relocated[/] for /dev/kvm: the trace's hvas belong to the traced process;"
        f"\n  its {len(clusters)} hva cluster{'s' if len(clusters) > 1 else ''} ({_size(total)})"
        f" {'are' if len(clusters) > 1 else 'is'} mapped onto HostMemory here,"
        " keeping every offset and overlap:",
        highlight=False,
    )
    t = _table("trace hva range", "size", "mapped at", "moved by", right=("size",))
    for c in clusters[:_LIST_LIMIT]:
        t.add_row(
            f"{c.start:#x}-{c.end - 1:#x}",
            _size(c.size),
            f"{c.addr:#x}",
            f"{'+' if c.delta >= 0 else '-'}{abs(c.delta):#x}",
        )
    if len(clusters) > _LIST_LIMIT:
        t.add_row(f"... and {len(clusters) - _LIST_LIMIT} more", "", "", "")
    _show(con, "", t)


def _agreement(con: Console, report: ReplayReport) -> None:
    outcomes = report.outcomes()
    n = len(outcomes)
    agreeing = sum(o.agree for o in outcomes)
    pct = f"{100 * agreeing / n:.1f}%" if n else "-"
    style = "green" if agreeing == n else "red"
    pairs = report.agreement_pairs()
    con.print(f"[bold {style}]Agreement: {agreeing}/{n} calls ({pct})[/]", highlight=False)
    for against in ("recorded", "kernel", "engine"):
        group = [f"{a} {g}/{c}" for a, b, c, g in pairs if b == against]
        if group:
            con.print(f"  vs {against}: {', '.join(group)}", highlight=False)


def _kinds(con: Console, report: ReplayReport) -> None:
    ran = report.ran
    timings = report.timings()
    cols = [f"{name} µs" for name in ran]
    t = _table("kind", "calls", *cols, right=("calls", *cols))
    for kind, count in report.kinds().items():
        if not count and kind not in KINDS:
            continue
        row = [kind, str(count)]
        for name in ran:
            k = timings[name]["by_kind"].get(kind)
            row.append(_us(k["mean_ns"]) if k else "-")
        t.add_row(*row)
    _show(con, f"Calls by kind ({report.primary}), mean time per call", t)


def _errors(con: Console, report: ReplayReport) -> None:
    table = report.errors()
    if not table:
        con.print("[bold]Errors by errno:[/] none (every call succeeded everywhere)")
        return
    cols = ["recorded", *report.ran]
    t = _table("errno", "name", *cols, right=("errno", *cols))
    for err, row in table.items():
        t.add_row(str(err), errno_name(err), *(str(row[c]) for c in cols))
    _show(con, "Errors by errno (number of calls)", t)


def _disagreements(con: Console, report: ReplayReport) -> None:
    found = report.disagreements()
    maps = report.map_disagreements()
    if not found and not maps:
        con.print("[bold]Disagreements:[/] [green]none[/]")
        return
    if found:
        cols = ["recorded", *report.ran]
        t = _table("line", *_CALL_COLUMNS, *cols, right=_CALL_RIGHT)
        for d in found:
            t.add_row(
                str(d.call.line), *_call_cells(d.call), *(_result(d.results[c]) for c in cols)
            )
        _show(con, f"Disagreements ({len(found)} calls; line of {report.source})", t)
    for name, detail in maps:
        con.print(f"[bold red]Final memory map differs[/] ({name}): {detail}", highlight=False)


def map_table(entries: list[MapEntry]) -> Table:
    """A rich table of a memory map: slot, gpa range, size, flags, hva."""
    t = _table("slot", "gpa range", "size", "flags", "hva", right=("slot", "size"))
    for e in entries:
        t.add_row(
            str(e.id),
            f"{e.gpa_start:#x}-{e.gpa_end:#x}",
            _size(e.size),
            _flags(e.flags),
            f"{e.userspace_addr:#x}",
        )
    return t


def _memory_map(con: Console, report: ReplayReport) -> None:
    for as_id, entries in report.memory_map().items():
        title = f"Final memory map, address space {as_id} ({report.primary}, hvas as in the trace)"
        if not entries:
            con.print(f"[bold]{title}:[/] no slots")
            continue
        _show(con, title, map_table(entries))


def _timings(con: Console, report: ReplayReport) -> None:
    timings = report.timings()
    if not timings:
        return
    kernel_mean = timings.get("kernel", {}).get("mean_ns")
    cols = ["impl", "calls", "total ms", "mean µs/call", "median µs/call"]
    if kernel_mean:
        cols.append("mean vs kernel")
    t = _table(*cols, right=tuple(cols[1:]))
    for name, tm in timings.items():
        row = [
            name,
            str(tm["calls"]),
            _ms(tm["total_ns"]),
            _us(tm["mean_ns"]),
            _us(tm["median_ns"]),
        ]
        if kernel_mean:
            row.append(f"{tm['mean_ns'] / kernel_mean:.2g}x")
        t.add_row(*row)
    _show(con, "Timings", t)
    if "kernel" in timings:
        con.print(
            "  kernel: the ioctl alone, called from Python; one run, noisy on a busy machine",
            style="dim",
        )


def _calls(con: Console, report: ReplayReport) -> None:
    ran = report.ran
    t = _table("line", "kind", *_CALL_COLUMNS, "recorded", "results", "µs", right=_CALL_RIGHT)
    t.box = box.SIMPLE_HEAD
    t.pad_edge = False
    t.collapse_padding = True
    for o in report.outcomes():
        c = o.call
        values = set(o.results.values())
        if len(values) == 1 and (c.result is None or c.result in values):
            results = _result(values.pop()) if c.result is None else Text("same", style="green")
        else:
            results = Text(
                " ".join(f"{n}={errno_name(e)}" for n, e in o.results.items()), style="red"
            )
        t.add_row(
            str(c.line),
            o.kind,
            *_call_cells(c),
            _result(c.result),
            results,
            "/".join(_us(o.times_ns[n]) for n in ran),
        )
    _show(con, f"Calls (µs: {'/'.join(ran)})", t)


def render(
    report: ReplayReport, out: IO[str], *, embedded: bool = False, calls: bool = False
) -> None:
    """Print the human-readable report to ``out`` (rich tables). O(n)."""
    con = Console(file=out, width=None if out.isatty() else _PIPE_WIDTH)
    _header(con, report, embedded)
    _relocation(con, report)
    _agreement(con, report)
    if calls:
        _calls(con, report)
    _kinds(con, report)
    _errors(con, report)
    _disagreements(con, report)
    _memory_map(con, report)
    _timings(con, report)


# =========================================================================== run

#: traces at least this long show a progress bar on a terminal
_PROGRESS_MIN: Final = 2000


class _ProgressBar:
    """A transient progress bar on stderr, one line per implementation, redrawn at most
    ten times a second (between measured calls, never during one)."""

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self._progress = Progress(
            TextColumn("replaying on {task.description:<6}"),
            BarColumn(),
            MofNCompleteColumn(),
            console=Console(stderr=True),
            transient=True,
            auto_refresh=False,
        )
        self._tasks: dict[str, TaskID] = {}
        self._last = 0.0

    def __enter__(self) -> _ProgressBar:
        if self.enabled:
            self._progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.enabled:
            self._progress.stop()

    def __call__(self, name: str, done: int, total: int) -> None:
        if name not in self._tasks:
            self._tasks[name] = self._progress.add_task(name, total=total)
        self._progress.update(self._tasks[name], completed=done)
        now = time.monotonic()
        if now - self._last >= 0.1 or done == total:
            self._last = now
            self._progress.refresh()


def run(args: argparse.Namespace) -> int:
    """Run the subcommand: 0 when everything agrees, 1 on a disagreement or a crash."""
    calls, source, fmt, embedded, skipped = _load(args)
    if not calls:
        bad = f", {len(skipped)} malformed line(s) skipped" if skipped else ""
        raise CliError(f"{source}: no memslot calls found ({fmt} format{bad})")
    if args.kvm and not kernel_available():
        raise CliError("--kvm: /dev/kvm is not usable here")
    impls: tuple[ImplName, ...] = ("engine", "array") if args.impl == "all" else (args.impl,)
    try:
        with _ProgressBar(enabled=len(calls) >= _PROGRESS_MIN and sys.stderr.isatty()) as bar:
            report = replay(
                calls,
                impls=impls,
                kernel=args.kvm,
                source=source,
                embedded=embedded,
                fmt=fmt,
                skipped=skipped,
                progress=bar if bar.enabled else None,
            )
    except ValueError as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"/dev/kvm: {exc}", status=1) from None

    if args.record:
        header = (
            f"recorded by memslots replay from {source}: the calls with the results of the "
            f"{report.primary}"
        )
        try:
            with open(args.record, "w", encoding="utf-8") as fp:
                write_jsonl(report.recorded_calls(), fp, header=header)
        except OSError as exc:
            raise CliError(f"--record {args.record}: {exc.strerror or exc}") from None

    status = 0 if report.ok else 1
    try:
        if args.json:
            json.dump(report.to_json(), sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            render(report, sys.stdout, embedded=embedded, calls=args.calls)
            if args.record:
                print(
                    f"Recorded {len(report.calls)} calls with the {report.primary}'s results "
                    f"to {args.record}"
                )
        sys.stdout.flush()
    except BrokenPipeError:
        # the reader went away (``| head``): stop quietly, and keep the interpreter from
        # complaining when it flushes stdout at exit
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return status
