"""``memslots check``: why each call of a trace failed, and what the VMM did that loses
data or faults its guest.

Usage::

    memslots check TRACE [--json] [--fail-on info|warning|error] [--profile NAME]

``TRACE`` is any trace ``memslots replay`` reads (a QEMU ``kvm_set_user_memory`` log,
strace output, JSON Lines; ``-`` for standard input). The trace is replayed on the
engine with the limits of the kernel it was recorded on (the header's profile or limits;
``--profile NAME`` names another, ``memslots.profiles.KernelProfile.named``), every failed
call is explained (the kernel check that refused it and its kernel function; for a
conflict, the slot in the way and the record that created it) and the rules run
(:mod:`memslots.tools.check`, docs/check.md). ``--json`` prints the JSON document of
:mod:`memslots.tools.check` instead of text.

Exit status: 0 when no finding is at or above ``--fail-on`` (default ``warning``), 1 when
one is, 2 for bad input (an unreadable or malformed trace, an unknown profile).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any, Final

from memslots.tools.check import SEVERITIES, check_trace
from memslots.tools.cli import CliError
from memslots.tools.traces import Trace, TraceFormatError, bounded_lines, load_trace

#: seconds between two progress lines on standard error
_PROGRESS_EVERY: Final = 3.0


def register(sub: Any) -> None:
    """Add the ``check`` subcommand."""
    p = sub.add_parser(
        "check",
        help="explain every failed call of a trace and find what loses data or faults the guest",
        description=(
            "Replay a memslot trace on the engine, explain every failed call (the kernel"
            " check, its function, the slot in the way and the record that created it) and"
            " report findings: memory unmapped under slots, remap windows, dirty pages lost,"
            " ignored errors, slot budget, slot ids that only grow, host memory aliased."
            " Exit status 1 when a finding is at or above --fail-on."
        ),
    )
    p.add_argument("trace", metavar="TRACE", help="trace file, '-' for standard input")
    p.add_argument("--json", action="store_true", help="print one JSON document instead")
    p.add_argument(
        "--fail-on",
        choices=SEVERITIES,
        default="warning",
        help="exit with status 1 when a finding is at or above this severity (default: warning)",
    )
    p.add_argument(
        "--profile",
        metavar="NAME",
        help="check against this kernel profile (e.g. 6.1; default: the trace's, else the"
        " engine's defaults)",
    )
    p.set_defaults(func=run)


def _load(path: str) -> Trace:
    label = "<stdin>" if path == "-" else path
    try:
        if path == "-":
            if sys.stdin is None:
                raise CliError("<stdin>: standard input is closed")
            return load_trace(bounded_lines(sys.stdin), source=label)
        return load_trace(path, source=label)
    except TraceFormatError as exc:
        raise CliError(str(exc)) from None
    except (OSError, ValueError) as exc:
        raise CliError(f"{label}: {getattr(exc, 'strerror', None) or exc}") from None


def _progress() -> Callable[[int, int], None]:
    """A line on standard error every few seconds: ``memslots check: 40960/100000
    records``."""
    last = [time.monotonic()]

    def tell(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= _PROGRESS_EVERY:
            last[0] = now
            print(f"memslots check: {done}/{total} records", file=sys.stderr, flush=True)

    return tell


def run(args: argparse.Namespace) -> int:
    """Run the subcommand: 0, 1 (a finding at or above ``--fail-on``) or 2 (bad input)."""
    trace = _load(args.trace)
    if not trace.records:
        raise CliError(f"{trace.source}: no memslot calls found ({trace.fmt} format)")
    try:
        report = check_trace(trace, profile=args.profile, progress=_progress())
    except KeyError as exc:  # an unknown profile: the message lists the names
        raise CliError(str(exc.args[0] if exc.args else exc)) from None
    try:
        if args.json:
            json.dump(report.to_json(args.fail_on), sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            report.render(sys.stdout, args.fail_on)
        sys.stdout.flush()
    except BrokenPipeError:
        pass  # the reader went away: main ends the output quietly, with this status
    return report.status(args.fail_on)
