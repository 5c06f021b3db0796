"""``memslots stress``: reader threads check every answer while a writer changes slots.

Usage::

    memslots stress [--seconds N] [--readers R] [--seed S] [--max-slots M]
                    [--fault-rate F] [--switch-interval-us U] [--no-progress] [--json]

Runs :func:`memslots.tools.stress.run_stress`: ``R`` reader threads (VM lookups, vCPU lookups
with a vCPU each, gfn- and hva-range iteration of a set held in a read section) check
every answer against the history of published states, while one writer thread makes
random create/delete/move/flags/no-op/invalid requests, injects a fault into a fraction
``F`` of them and checks the state each failure leaves. ``--switch-interval-us`` sets the
interpreter's thread switch interval for the run (smaller: more interleavings per
second; default 10 us).

Output: operations (by kind, failures as expected, faults fired), lookups (by kind, how
many ran inside a writer's grace period, latency quantiles and maximum), violations and
the first violation messages. Progress goes to stderr: a first line after
:data:`PROGRESS_FIRST` seconds, then every :data:`PROGRESS_EVERY` seconds as lines, or
every second as one live line on a terminal. Exit status: 0 with no violation, 1 with
any, 2 for a usage error; Ctrl-C stops early and reports what ran (status 130 unless a
violation was found).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from memslots.tools.cli import CliError
from memslots.tools.stress import StressProgress, StressReport, run_stress

#: the longest run ``--seconds`` accepts (11.6 days)
MAX_SECONDS = 1e6
#: the largest ``--seed`` (a u64, as conform's)
MAX_SEED = (1 << 64) - 1
#: seconds to the first progress line, and between lines when stderr is not a terminal
PROGRESS_FIRST = 1.5
PROGRESS_EVERY = 5.0
#: seconds between updates of the live line on a terminal
PROGRESS_EVERY_TTY = 1.0


def register(sub: Any) -> None:
    """Add the `stress` subcommand."""
    p = sub.add_parser(
        "stress",
        help="concurrent readers check every lookup while a writer changes slots",
        description="Reader threads check every answer against the history of published "
        "memslot states while a writer makes random requests and injects faults.",
    )
    p.add_argument("--seconds", type=float, default=10.0, help="how long to run (default 10)")
    p.add_argument("--readers", type=int, default=2, help="reader threads (default 2)")
    p.add_argument("--seed", type=int, default=0, help="random seed, 0..2^64-1 (default 0)")
    p.add_argument("--max-slots", type=int, default=16, help="slots per address space (default 16)")
    p.add_argument(
        "--fault-rate",
        type=float,
        default=0.05,
        help="fraction of requests with an injected fault (default 0.05)",
    )
    p.add_argument(
        "--switch-interval-us",
        type=float,
        default=10.0,
        help="thread switch interval during the run, microseconds (default 10)",
    )
    p.add_argument("--no-progress", action="store_true",
                   help=f"no progress on stderr (else a first line after {PROGRESS_FIRST:g} s, "
                   f"then one every {PROGRESS_EVERY:g} s; a live line on a terminal)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def _check_args(args: argparse.Namespace) -> None:
    if not 0 < args.seconds <= MAX_SECONDS:  # also refuses nan and inf
        raise CliError(f"--seconds must be in (0, {MAX_SECONDS:g}], not {args.seconds:g}")
    if not 1 <= args.readers <= 64:
        raise CliError(f"--readers must be in 1..64, not {args.readers}")
    if not 1 <= args.max_slots <= 512:
        raise CliError(f"--max-slots must be in 1..512, not {args.max_slots}")
    if not 0.0 <= args.fault_rate <= 1.0:
        raise CliError(f"--fault-rate must be in 0..1, not {args.fault_rate:g}")
    if not 0 <= args.seed <= MAX_SEED:
        raise CliError(f"--seed must be in 0..2^64-1, not {args.seed}")
    if not 0.1 <= args.switch_interval_us <= 1e6:
        raise CliError(f"--switch-interval-us must be in 0.1..1e6, not {args.switch_interval_us}")


def _progress_printer(tty: bool) -> Any:
    def show(p: StressProgress) -> None:
        line = (
            f"memslots stress: {p.elapsed:5.0f}/{p.seconds:g} s  {p.operations} operations  "
            f"{p.lookups} lookups  {p.violations} violations"
        )
        if tty:
            print(f"\r{line}", end="", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)

    return show


def report_json(report: StressReport) -> dict[str, Any]:
    """The report as a JSON-ready dict (what ``--json`` prints)."""
    w = report.writer
    return {
        "seconds": round(report.seconds, 3),
        "readers": report.readers,
        "seed": report.seed,
        "interrupted": report.interrupted,
        "operations": report.operations,
        "operations_by_kind": dict(sorted(w.ops.items())),
        "faults_armed": dict(w.armed),
        "faults_fired": dict(w.faults),
        "expected_errors": w.expected_errors,
        "callback_calls": w.callback_calls,
        "callback_raises": w.callback_raises,
        "swaps": report.swaps,
        "grace_periods": report.grace_periods,
        "writer_latency_mean_us": round(w.total_op_ns / w.operations / 1e3, 2)
        if w.operations
        else 0.0,
        "writer_latency_max_ms": round(w.max_op_ns / 1e6, 3),
        "lookups": report.lookups,
        "lookups_by_kind": {
            "vm": sum(r.vm_lookups for r in report.reader_stats),
            "vcpu": sum(r.vcpu_lookups for r in report.reader_stats),
            "range": sum(r.range_checks for r in report.reader_stats),
        },
        "lookups_inside_grace_period": sum(r.during_swap for r in report.reader_stats),
        "reader_latency_p50_ns_below": report.reader_latency_quantile(0.5),
        "reader_latency_p999_ns_below": report.reader_latency_quantile(0.999),
        "reader_latency_max_ns": report.max_reader_latency_ns,
        "switch_interval_s": report.switch_interval,
        "violations": report.violations,
        "messages": report.messages,
    }


def run(args: argparse.Namespace) -> int:
    """Run the subcommand; returns the exit status."""
    _check_args(args)
    tty = sys.stderr.isatty()
    progress = None if args.no_progress else _progress_printer(tty)
    report = run_stress(
        args.seconds,
        readers=args.readers,
        seed=args.seed,
        max_slots=args.max_slots,
        fault_rate=args.fault_rate,
        switch_interval=args.switch_interval_us * 1e-6,
        progress=progress,
        progress_every=PROGRESS_EVERY_TTY if tty else PROGRESS_EVERY,
        progress_first=PROGRESS_FIRST,
    )
    if progress is not None and tty and report.seconds >= PROGRESS_FIRST:
        print(file=sys.stderr)
    if args.json:
        print(json.dumps(report_json(report), indent=2))
    else:
        print("memslots stress")
        for line in report.lines():
            print(f"  {line}")
        for msg in report.messages:
            print(f"  ! {msg}")
    if report.violations:
        return 1
    return 130 if report.interrupted else 0
