"""``memslots replay``: replay a real memslot trace and compare engine, array and kernel.

Usage::

    memslots replay [TRACE] [--kvm | --no-kvm] [--impl engine|array|all] [--json]
                    [--skip-bad] [--format qemu|strace|jsonl] [--record FILE] [--calls]
                    [--html FILE] [--png FILE]

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
tables. ``--html FILE`` writes a self-contained page of the guest-physical memory map over
the trace (every slot a bar over the records it lived, see :mod:`memslots.tools.mapview`),
``--png FILE`` the same picture as an image (needs matplotlib: the ``plot`` extra).

Exit status: 0 when every result agrees, 1 when some call or final map disagrees or an
implementation crashed, 2 for a malformed trace (one line ``FILE:LINE: message``; use
``--skip-bad`` to go on and list the skipped lines) or another usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from typing import IO, Any, Final, cast

from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn
from rich.table import Table
from rich.text import Text

from memslots.constants import PAGE_SIZE
from memslots.errors import KvmUnavailable, errno_name
from memslots.kvm import kvm_unavailable
from memslots.profiles import KernelProfile
from memslots.tools.cli import CliError
from memslots.tools.cli import console as cli_console
from memslots.tools.cli.kernel_option import add_kernel_options, booted_kernel
from memslots.tools.cli.progress import ProgressLines, stderr_is_terminal
from memslots.tools.mapview import PNG_EXTRA, build, matplotlib_available, render_html, render_png
from memslots.tools.replay import (
    KINDS,
    ImplName,
    MapEntry,
    ReplayReport,
    TraceReport,
    agreement_percent,
    describe_record,
    flag_names,
    replay_trace,
)
from memslots.tools.replay.kernel import KernelVm
from memslots.tools.text import plural, size_text
from memslots.tools.traces import (
    EMBEDDED_TRACE_NAME,
    FORMATS,
    MemslotCall,
    Record,
    Trace,
    TraceFormat,
    TraceFormatError,
    bounded_lines,
    embedded_trace_path,
    load_trace,
    write_jsonl,
    write_trace,
)

#: what the embedded trace is (``memslots/data/seabios.log``)
EMBEDDED_DESCRIPTION: Final = "QEMU 7.2 booting SeaBIOS with 512 MiB, std VGA and e1000"

#: most clusters / skipped lines listed before "... and N more"
_LIST_LIMIT: Final = 8


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
    kvm = p.add_mutually_exclusive_group()
    kvm.add_argument(
        "--kvm",
        action="store_const",
        const=True,
        default=None,
        help="replay on /dev/kvm too (default: when it is usable)",
    )
    kvm.add_argument(
        "--no-kvm", dest="kvm", action="store_const", const=False, help="not on /dev/kvm"
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
    p.add_argument(
        "--profile",
        metavar="NAME",
        help="the engine and the array answer as kernel NAME would (memslots profiles lists"
        " them; with --no-kvm: predict how that kernel answers the trace)",
    )
    add_kernel_options(p)
    # pictures of the memory map over the trace (memslots.tools.mapview)
    p.add_argument(
        "--html",
        metavar="FILE",
        help="write a self-contained HTML page of the guest-physical memory map over the"
        " trace to FILE",
    )
    p.add_argument(
        "--png",
        metavar="FILE",
        help=f"write the same picture as a PNG image to FILE (needs matplotlib: {PNG_EXTRA})",
    )
    p.set_defaults(func=run)


# =========================================================================== input


def _load(args: argparse.Namespace) -> tuple[Trace, bool, list[TraceFormatError]]:
    """The trace, whether it is the embedded one, and the skipped lines (``--skip-bad``)."""
    errors: list[TraceFormatError] = []
    fmt = cast("TraceFormat | None", args.format)
    label = args.trace or EMBEDDED_TRACE_NAME
    try:
        if args.trace == "-":
            label = "<stdin>"
            if sys.stdin is None:
                raise CliError("<stdin>: standard input is closed")
            lines = bounded_lines(sys.stdin)  # read as it comes, never held whole
            trace = load_trace(lines, fmt=fmt, skip_bad=args.skip_bad, errors=errors, source=label)
            return trace, False, errors
        path = embedded_trace_path() if args.trace is None else args.trace
        trace = load_trace(path, fmt=fmt, skip_bad=args.skip_bad, errors=errors, source=label)
        return trace, args.trace is None, errors
    except TraceFormatError as exc:
        hint = " (--skip-bad skips such lines)" if exc.skippable and not args.skip_bad else ""
        raise CliError(f"{exc}{hint}") from None
    except (OSError, ValueError) as exc:
        raise CliError(f"{label}: {getattr(exc, 'strerror', None) or exc}") from None


# =========================================================================== formatting


def _us(ns: float) -> str:
    return f"{ns / 1000:.1f}"


def _ms(ns: float) -> str:
    return f"{ns / 1e6:.2f}"


def _result(err: int | None, unknown: str = "?") -> Text:
    if err is None:
        return Text(unknown, style="dim")
    return Text(errno_name(err), style="green" if err == 0 else "red")


def _flags(flags: int) -> str:
    return "|".join(flag_names(flags)) or "-"


_CALL_COLUMNS: Final = ("slot", "flags", "gpa", "size", "hva")
_CALL_RIGHT: Final = ("line", "slot", "size")


def _call_cells(c: Record) -> tuple[str, ...]:
    """The cells of :data:`_CALL_COLUMNS` for a record (other records than memslot calls
    are described in the flags column)."""
    if not isinstance(c, MemslotCall):
        text = describe_record(c).split(" -> ")[0]
        slot = getattr(c, "slot", None)
        return ("-" if slot is None else str(slot), text, "", "", "")
    return (
        str(c.slot),
        _flags(c.flags) + (" (v2)" if c.v2 else ""),
        f"{c.guest_phys_addr:#x}",
        size_text(c.memory_size) if c.memory_size % PAGE_SIZE == 0 else f"{c.memory_size:#x}",
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


def _header(con: Console, trace: TraceReport, report: ReplayReport, embedded: bool) -> None:
    what = _counts(trace.calls, sum(len(vm.records) for vm in trace.vms))
    if len(trace.vms) > 1:
        what += f" in {plural(len(trace.vms), 'VM')}"
    version = " v2" if trace.version == 2 else ""
    con.print(
        f"[bold]Replaying {trace.source}[/]: {what}, {trace.fmt}{version} format",
        highlight=False,
    )
    if embedded:
        con.print(f"  no TRACE given: the embedded trace, {EMBEDDED_DESCRIPTION}", highlight=False)
    recorder = (trace.header or {}).get("recorder") or {}
    if recorder:
        command = " ".join(map(str, recorder.get("command") or [])) or recorder.get("pid", "")
        con.print(
            f"  recorded by {recorder.get('name', '?')} {recorder.get('version', '')}"
            + (f": {command}" if command else ""),
            highlight=False,
            markup=False,
        )
    for name, run in report.runs.items():
        if run.status == "ok":
            text = run.description
        elif run.status == "off":
            text = "[dim]off[/]"
        else:
            text = f"[yellow]{run.status}[/]: {run.note}"
        con.print(f"  {name:<7} {text}", highlight=False)
    lim = report.limits
    source = {
        "kernel": "of the kernel replayed on (probed)",
        "trace": "of the recording machine",
        "defaults": "x86-64 defaults",
    }.get(report.limits_source, report.limits_source)
    con.print(
        f"  limits  {source}"
        f": {plural(lim.nr_address_spaces, 'address space')},"
        f" {lim.max_user_slots} slots, max gfn {lim.max_gfn:#x},"
        f" READONLY {'yes' if lim.readonly_mem else 'no'}",
        highlight=False,
    )
    if trace.skipped:
        con.print(f"[yellow]Skipped {plural(len(trace.skipped), 'malformed line')}:[/]")
        for e in trace.skipped[:_LIST_LIMIT]:
            con.print(f"  {e}", highlight=False, markup=False)
        if len(trace.skipped) > _LIST_LIMIT:
            con.print(f"  ... and {len(trace.skipped) - _LIST_LIMIT} more")


def _counts(calls: int, records: int) -> str:
    """``30 memslot calls, 34 records`` (the records only when there are others than
    memslot calls)."""
    what = plural(calls, "memslot call")
    return what if records == calls else f"{what}, {plural(records, 'record')}"


def _compared(agreeing: int, n: int) -> str:
    """``32/32 records compared (100.0%)``: the agreement over the records that had two
    results to compare."""
    records = "record" if n == 1 else "records"
    return f"{agreeing}/{n} {records} compared ({agreement_percent(agreeing, n)})"


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
        f"\n  its {plural(len(clusters), 'hva cluster')} ({size_text(total)})"
        f" {'are' if len(clusters) > 1 else 'is'} mapped onto HostMemory here,"
        " keeping every offset and overlap:",
        highlight=False,
    )
    t = _table("trace hva range", "size", "mapped at", "moved by", right=("size",))
    for c in clusters[:_LIST_LIMIT]:
        t.add_row(
            f"{c.start:#x}-{c.end - 1:#x}",
            size_text(c.size),
            f"{c.addr:#x}",
            f"{'+' if c.delta >= 0 else '-'}{abs(c.delta):#x}",
        )
    if len(clusters) > _LIST_LIMIT:
        t.add_row(f"... and {len(clusters) - _LIST_LIMIT} more", "", "", "")
    _show(con, "", t)


def _agreement(con: Console, report: ReplayReport) -> None:
    agreeing, n = report.agreement()
    style = "green" if agreeing == n else "red"
    pairs = report.agreement_pairs()
    con.print(
        f"[bold {style}]Agreement: {_compared(agreeing, n)}[/]",
        highlight=False,
    )
    for against in ("recorded", "kernel", "engine"):
        group = [f"{a} {g}/{c}" for a, b, c, g in pairs if b == against]
        if group:
            con.print(f"  vs {against}: {', '.join(group)}", highlight=False)
    for note in report.notes:
        con.print(f"  note: {note}", highlight=False, style="dim")


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


def _explained(con: Console, report: ReplayReport) -> None:
    """Every failed record with why it failed: the kernel check and its function."""
    rows = [(rec, report.explanation(i)) for i, rec in enumerate(report.records)]
    failed = [(rec, why) for rec, why in rows if why is not None]
    if not failed:
        return
    con.print(f"[bold]Failed calls explained[/] ({plural(len(failed), 'call')}):")
    for rec, why in failed:
        assert why is not None
        con.print(f"  line {rec.line}: {why.line()}", highlight=False, markup=False)


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
                str(d.call.line),
                *_call_cells(d.call),
                *(_result(d.results[c], "?" if c == "recorded" else "n/a") for c in cols),
            )
        _show(con, f"Disagreements ({plural(len(found), 'call')}; line of {report.source})", t)
        for d in found:
            if d.detail:
                con.print(f"  line {d.call.line}: {d.detail}", highlight=False, markup=False)
    for name, detail in maps:
        con.print(f"[bold red]Final memory map differs[/] ({name}): {detail}", highlight=False)


def map_table(entries: list[MapEntry]) -> Table:
    """A rich table of a memory map: slot, gpa range, size, flags, hva."""
    t = _table("slot", "gpa range", "size", "flags", "hva", right=("slot", "size"))
    for e in entries:
        t.add_row(
            str(e.id),
            f"{e.gpa_start:#x}-{e.gpa_end:#x}",
            size_text(e.size),
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
        values = {v for v in o.results.values() if v is not None}
        if o.agree and len(values) <= 1:
            if c.result is None:
                results = _result(values.pop() if values else None, "n/a")
            else:
                results = Text("same", style="green")
        else:
            results = Text(
                " ".join(
                    f"{n}={'n/a' if e is None else errno_name(e)}" for n, e in o.results.items()
                ),
                style="red",
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


def _hazards(con: Console, trace: TraceReport) -> None:
    if not trace.hazards:
        con.print("[bold]Hazards:[/] none (no slot's memory was unmapped under it)")
        return
    t = _table("line", "call", "hva range hit", "VM", "slot", "gfns hit", "of slot gfns")
    t.columns[0].justify = "right"
    for h in trace.hazards:
        t.add_row(
            str(h.call.line),
            h.call.kind,
            f"{h.start:#x}-{h.end - 1:#x}",
            str(h.vm),
            str(h.slot),
            f"{h.gfn_start:#x}-{h.gfn_end - 1:#x}",
            f"{h.base_gfn:#x}-{h.base_gfn + h.npages - 1:#x}",
        )
    _show(
        con,
        f"Hazards ({plural(len(trace.hazards), 'range')} unmapped or discarded while a live"
        " slot mapped it)",
        t,
    )


def _vm_title(con: Console, report: ReplayReport) -> None:
    extra = " (existed before recording began)" if report.attached else ""
    what = "no memslot calls"
    if report.records:
        what = _counts(len(report.calls), len(report.records))
    pid = f", process {report.pid}" if report.pid else ""
    con.print(
        f"\n[bold underline]VM {report.vm}[/]{pid}: {what}{extra}",
        highlight=False,
    )


def render(
    report: TraceReport | ReplayReport,
    out: IO[str],
    *,
    embedded: bool = False,
    calls: bool = False,
) -> None:
    """Print the human-readable report to ``out`` (rich tables): for each VM its calls by
    kind, errors, disagreements, final memory map and timings, then the hazards. O(n)."""
    if isinstance(report, ReplayReport):
        report = TraceReport([report], [], report.source, report.embedded, report.fmt)
    con = cli_console(file=out)
    several = len(report.vms) > 1
    _header(con, report, report.vms[0], embedded)
    for vm in report.vms:
        if several:
            _vm_title(con, vm)
            if not vm.records:
                continue  # the title said it: nothing to tabulate
        _relocation(con, vm)
        _agreement(con, vm)
        if calls:
            _calls(con, vm)
        _kinds(con, vm)
        _errors(con, vm)
        _explained(con, vm)
        _disagreements(con, vm)
        _memory_map(con, vm)
        _timings(con, vm)
    if several:
        agreeing, n = report.agreement()
        style = "green" if agreeing == n else "red"
        bad = [str(vm.vm) for vm in report.vms if not vm.ok]
        con.print(
            f"\n[bold {style}]Total: {plural(len(report.vms), 'VM')}, agreement"
            f" {_compared(agreeing, n)}"
            + (f"; disagreeing VMs: {', '.join(bad)}" if bad else "")
            + "[/]",
            highlight=False,
        )
    _hazards(con, report)


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
            console=cli_console(stderr=True),
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


def _write_record(args: argparse.Namespace, report: TraceReport, trace: Trace) -> None:
    """``--record FILE``: the calls with the primary's results; version 1 for one VM,
    version 2 (every record) for several."""
    primary = report.vms[0].primary
    try:
        with open(args.record, "w", encoding="utf-8") as fp:
            if len(report.vms) == 1:
                header = (
                    f"recorded by memslots replay from {report.source}: the calls with the"
                    f" results of the {primary}"
                )
                write_jsonl(report.vms[0].recorded_calls(), fp, header=header)
                return
            # each VM's calls, in its trace order: taken one by one, O(1) each
            replayed: dict[int | None, Iterator[MemslotCall]] = {
                vm.vm: iter(vm.recorded_calls()) for vm in report.vms
            }
            records: list[Record] = []
            for rec in trace.records:
                calls = replayed.get(rec.vm) if isinstance(rec, MemslotCall) else None
                records.append(rec if calls is None else next(calls, rec))
            out = Trace(records, trace.source, "jsonl", trace.header, trace.end)
            write_trace(out, fp, {"name": "memslots replay --record", "from": report.source})
    except OSError as exc:
        raise CliError(f"--record {args.record}: {exc.strerror or exc}") from None


# =========================================================================== pictures


def _check_pictures(args: argparse.Namespace) -> None:
    """Refuse ``--png`` before replaying when matplotlib is missing."""
    if args.png and not matplotlib_available():
        raise CliError(f"--png needs matplotlib: {PNG_EXTRA}")


def _write_pictures(args: argparse.Namespace, report: TraceReport) -> list[str]:
    """``--html FILE``, ``--png FILE``: the memory map over the trace; what was written."""
    if not args.html and not args.png:
        return []
    view = build(report)
    written = []
    if args.html:
        try:
            with open(args.html, "w", encoding="utf-8") as fp:
                render_html(view, fp)
        except OSError as exc:
            raise CliError(f"--html {args.html}: {exc.strerror or exc}") from None
        written.append(f"Wrote the memory map over the trace to {args.html}")
    if args.png:
        try:
            render_png(view, args.png)
        except ImportError:
            raise CliError(f"--png needs matplotlib: {PNG_EXTRA}") from None
        except OSError as exc:
            raise CliError(f"--png {args.png}: {exc.strerror or exc}") from None
        written.append(f"Wrote the picture of the memory map to {args.png}")
    return written


def run(args: argparse.Namespace) -> int:
    """Run the subcommand: 0 when everything agrees, 1 on a disagreement or a crash.
    Standard output that is closed, full or gone is the command line's to report
    (:func:`memslots.tools.cli.main`)."""
    trace, embedded, skipped = _load(args)
    if not trace.records:  # (its memslot calls are among them)
        bad = f", {plural(len(skipped), 'malformed line')} skipped" if skipped else ""
        raise CliError(f"{trace.source}: no memslot calls found ({trace.fmt} format{bad})")
    unavailable = kvm_unavailable() if args.kvm else None
    if unavailable is not None:
        raise unavailable  # one line, as every command reports it
    _check_pictures(args)
    if args.kernel is not None and (args.kvm is False or args.profile is not None):
        raise CliError("--kernel replays on that kernel: not with --no-kvm or --profile")
    profile = None
    if args.profile is not None:
        if args.kvm:
            raise CliError(
                "--profile and --kvm: the kernel column answers as /dev/kvm does; use --no-kvm"
            )
        try:
            profile = KernelProfile.named(args.profile)
        except KeyError as exc:
            raise CliError(str(exc.args[0])) from None
        args.kvm = False
    impls: tuple[ImplName, ...] = ("engine", "array") if args.impl == "all" else (args.impl,)
    total = len(trace.records)
    tty = stderr_is_terminal()
    # a bar on a terminal, else a line every few seconds
    lines = ProgressLines("memslots replay", enabled=not tty)

    def progress(name: str, done: int, total: int) -> None:
        if bar.enabled:
            bar(name, done, total)
        lines.say(lambda: f"replaying on {name}: {done}/{total} records")

    try:
        with (
            booted_kernel(args) as booted,
            _ProgressBar(enabled=total >= _PROGRESS_MIN and tty) as bar,
        ):
            kernel_vm = None if booted is None else KernelVm(booted.vm_factory, booted.description)
            report = replay_trace(
                trace,
                impls=impls,
                kernel=True if booted is not None else args.kvm,
                embedded=embedded,
                skipped=skipped,
                progress=progress,
                profile=profile,
                kernel_vm=kernel_vm,
            )
    except ValueError as exc:
        raise CliError(str(exc)) from None
    except KvmUnavailable:
        raise
    except OSError as exc:
        raise CliError(f"/dev/kvm: {exc}") from None  # a device that cannot be used: 2

    if args.record:
        _write_record(args, report, trace)
    pictures = _write_pictures(args, report)

    status = 0 if report.ok else 1
    try:
        if args.json:
            json.dump(report.to_json(), sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            render(report, sys.stdout, embedded=embedded, calls=args.calls)
            if args.record:
                print(
                    f"Recorded {plural(report.calls, 'call')} with the"
                    f" {report.vms[0].primary}'s results to {args.record}"
                )
            for line in pictures:
                print(line)
        sys.stdout.flush()
    except BrokenPipeError:
        pass  # the reader went away (``| head``): main ends the output quietly, this status
    return status
