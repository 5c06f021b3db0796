"""``memslots conform``: random operation sequences against ``/dev/kvm``, each call
answered by the kernel and by the engine; prints the agreement rate and, for each kind of
disagreement, a minimal reproducer as JSON Lines (format: :mod:`memslots.tools.conform`).

Exit status: 0 when the kernel and the engine agreed on every call, 1 otherwise, 2 for a
usage error or a machine without a usable ``/dev/kvm``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from memslots.errors import errno_name
from memslots.kvm.abi import KVM_DEV_PATH, kvm_unavailable
from memslots.kvm.vm import ENGINE_RAISED, KvmVm
from memslots.tools.cli import CliError
from memslots.tools.cli import console as cli_console
from memslots.tools.cli.kernel_option import add_kernel_options, booted_kernel
from memslots.tools.cli.options import int_range
from memslots.tools.cli.progress import ProgressLines, stderr_is_terminal
from memslots.tools.conform import (
    RING_OPS,
    ConformReport,
    Finding,
    Op,
    is_compared,
    op_to_json,
    read_ops,
    replay_ops,
    run_conform,
)
from memslots.tools.text import plural as _n
from memslots.tools.traces import (
    BINARY,
    MAX_LINE,
    TRACE_FORMAT_NAME,
    bounded_lines,
    detect_format,
    is_binary,
)

if TYPE_CHECKING:
    from memslots.tools.kernels.session import KernelSession

#: the operation kinds the dirty-ring line of the report counts, in this order
RING_OP_NAMES = tuple(cls.name for cls in RING_OPS)
#: the most operations ``--ops`` takes (about 40 minutes here at 4000 operations a second)
MAX_OPS = 10_000_000
#: the largest ``--seed``
MAX_SEED = (1 << 64) - 1
#: the most kinds of disagreement ``--max-reproducers`` shrinks
MAX_REPRODUCERS = 1000


def register(sub: Any) -> None:
    """Add the ``conform`` subcommand."""
    p = sub.add_parser(
        "conform",
        help="random operation sequences against /dev/kvm: agreement rate, minimal reproducers",
        description="Run random memslot, dirty-log, guest_memfd and dirty-ring operations on "
        "real VMs, each answered by the kernel and by the engine; print how often they agree and a "
        "shrunk reproducer (JSON Lines) for every kind of disagreement. Exit status 1 on "
        "any disagreement.",
    )
    p.add_argument(
        "--ops",
        type=int_range(1, MAX_OPS),
        default=5000,
        metavar="N",
        help=f"operations to run, 1..{MAX_OPS} (5000)",
    )
    p.add_argument(
        "--seed",
        type=int_range(0, MAX_SEED),
        default=None,
        metavar="S",
        help="random seed, 0..2^64-1 (default: a new one)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument(
        "--max-reproducers",
        type=int_range(1, MAX_REPRODUCERS),
        default=10,
        metavar="K",
        help=f"shrink at most K kinds of disagreement, 1..{MAX_REPRODUCERS} (10)",
    )
    p.add_argument("--no-shrink", action="store_true", help="report disagreements unshrunk")
    p.add_argument(
        "--replay",
        metavar="FILE",
        help="instead of a random run, replay the operations of a reproducer file",
    )
    p.add_argument(
        "--device", default=KVM_DEV_PATH, metavar="PATH", help="the KVM device (/dev/kvm)"
    )
    add_kernel_options(p)
    p.set_defaults(func=run)


def check_kvm(path: str) -> None:
    """Raise :class:`memslots.errors.KvmUnavailable` (one line, status 2, as every
    command reports it) unless ``path`` is a usable KVM: conform checks the engine
    against a real kernel. A ``--device`` path other than ``/dev/kvm`` that does not
    exist is a mistyped path (``no such file``), not a machine without KVM."""
    if path != KVM_DEV_PATH and not os.path.lexists(path):
        raise CliError(f"--device {path}: no such file")
    unavailable = kvm_unavailable(path)
    if unavailable is not None:
        raise unavailable


def run(args: argparse.Namespace) -> int:
    """Run the subcommand; the exit status."""
    if args.kernel is not None and args.device != KVM_DEV_PATH:
        raise CliError("--kernel and --device: the calls go to one kernel")
    if args.replay:
        ops = _load_reproducer(Path(args.replay))  # the file's problems first: no KVM needed
        with booted_kernel(args) as kernel:
            if kernel is None:
                check_kvm(args.device)
            return _replay(args, ops, kernel)
    with booted_kernel(args) as kernel:
        if kernel is None:
            check_kvm(args.device)
        return _run(args, kernel)


def _run(args: argparse.Namespace, kernel: KernelSession | None) -> int:
    """The random run, on ``kernel`` (booted under QEMU) or ``--device``."""
    vm_factory: Callable[..., KvmVm] = KvmVm if kernel is None else kernel.vm_factory
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    console = cli_console(stderr=True)
    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("disagreements: {task.fields[bad]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    # a bar on a terminal, else a line every few seconds
    lines = ProgressLines("memslots conform", enabled=not stderr_is_terminal())
    with Progress(
        *columns, console=console, transient=True, disable=not console.is_terminal
    ) as progress:
        task = progress.add_task("conform", total=args.ops, bad=0)

        def on_progress(done: int, bad: int) -> None:
            if done % 64 == 0 or done == args.ops:
                progress.update(task, completed=done, bad=bad)
                lines.say(lambda: f"{done}/{args.ops} operations, {_n(bad, 'disagreeing call')}")

        def on_shrink(i: int, n: int) -> None:
            progress.update(task, description=f"shrinking {i + 1}/{n}")
            lines.say(f"shrinking kind {i + 1} of {n} disagreements")

        report = run_conform(
            args.ops,
            seed,
            path=args.device,
            vm_factory=vm_factory,
            progress=on_progress,
            shrink_findings=not args.no_shrink,
            max_reproducers=args.max_reproducers,
            on_shrink=on_shrink,
        )
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        _print_report(report)
    return 1 if report.disagreeing_calls else 0


def _print_report(r: ConformReport) -> None:
    print(
        f"memslots conform: {_n(r.operations, 'operation')} on {_n(r.vms, 'VM')}, seed {r.seed}"
        f" ({r.seconds:.1f} s)"
    )
    if r.profile is not None:
        p = r.profile
        print(f"kernel: Linux {p.release} ({p.arch}): {p.summary()}")
    print(f"calls answered by kernel and engine: {r.calls} ({_n(r.kernel_calls, 'ioctl')})")
    print(f"agreement: {r.agreed}/{r.calls} ({100 * r.agreement:.3f}%)")
    if r.ring_operations:
        counts = ", ".join(f"{n} {r.kinds[n]}" for n in RING_OP_NAMES if n in r.kinds)
        print(
            f"dirty-ring operations: {r.ring_operations} on {_n(r.ring_vms, 'VM')} ({counts});"
            f" GET/CLEAR with the ring on: {r.dirty_log_with_ring}"
        )
    if not r.findings:
        print("disagreements: none")
        return
    print(
        f"disagreements: {_n(r.disagreeing_calls, 'call')}, {_n(len(r.findings), 'kind')}"
        + (f" (shrunk in {r.shrink_seconds:.1f} s)" if r.shrink_seconds else "")
    )
    for i, f in enumerate(r.findings, 1):
        print()
        _print_finding(i, f)


def _describe(f: Finding) -> str:
    d = f.disagreement
    if d.engine == ENGINE_RAISED:
        answers = f"kernel {errno_name(d.kernel)}, engine raised {d.detail}"
    else:
        answers = f"kernel {errno_name(d.kernel)}, engine {errno_name(d.engine)}"
        if d.detail:
            answers += f"; {d.detail}"
    return f"{d.call}: {answers}"


def _print_finding(i: int, f: Finding) -> None:
    print(f"# {i}. {_describe(f)} ({_n(f.count, 'call')})")
    if f.reproducer is not None:
        print(f"#    reproducer: {_n(len(f.reproducer), 'operation')} (shrunk from {len(f.ops)})")
        ops = f.reproducer
    else:
        why = "did not reproduce on a fresh VM" if not f.reproducible else "not shrunk"
        print(f"#    the {len(f.ops)} operations that led to it ({why})")
        ops = f.ops
    for op in ops:
        print(op_to_json(op))


def _bounded_lines(fp: IO[str], source: str) -> Iterator[str]:
    """The lines of ``fp``, none read whole past :data:`MAX_LINE` characters (an error
    then: memory stays bounded, ``/dev/zero`` included), none of binary data."""
    number = 0
    while line := fp.readline(MAX_LINE + 1):
        number += 1
        if len(line) > MAX_LINE:
            raise CliError(f"{source}:{number}: line longer than {MAX_LINE >> 20} MiB: {NOT_REPRO}")
        if is_binary(line):
            raise CliError(f"{source}:{number}: {BINARY}: {NOT_REPRO}")
        yield line


#: what a file that is not a reproducer is told
NOT_REPRO = "not a conform reproducer (one JSON operation a line; traces go to memslots replay)"


def _load_reproducer(path: Path) -> list[Op]:
    """The operations of a reproducer file, or one-line :class:`CliError` naming the file
    and the problem: unreadable, binary data, a memslot trace (``memslots replay``'s),
    a line that is no operation, or no operation at all."""
    source = str(path)
    try:
        with path.open(encoding="utf-8-sig", errors="replace") as fp:
            ops = list(read_ops(_bounded_lines(fp, source), source))
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        if _is_trace(path):
            raise CliError(
                f"{path} is a memslots trace, not a conform reproducer: use memslots replay {path}"
            ) from None
        raise CliError(f"{exc}: {NOT_REPRO}") from None
    if not ops:
        raise CliError(f"{path}: no operations (empty, or only comments): {NOT_REPRO}")
    return ops


def _is_trace(path: Path) -> bool:
    """Whether ``path`` is a trace ``memslots replay`` reads: a QEMU log, strace output or
    a JSON Lines trace with its version 2 header."""
    try:
        fmt = detect_format(path)
        if fmt != "jsonl":
            return True
        with path.open(encoding="utf-8-sig", errors="replace") as fp:
            for line in bounded_lines(fp):
                text = line.strip()
                if text and not text.startswith("#"):
                    return json.loads(text).get("format") == TRACE_FORMAT_NAME  # type: ignore[no-any-return]
    except (OSError, ValueError, AttributeError):
        pass
    return False


def _replay(args: argparse.Namespace, ops: list[Op], kernel: KernelSession | None) -> int:
    path = Path(args.replay)
    vm_factory: Callable[..., KvmVm] = KvmVm if kernel is None else kernel.vm_factory
    done, found = replay_ops(ops, path=args.device, vm_factory=vm_factory)
    calls = sum(map(is_compared, done))
    bad = {i for i, _ in found}
    if args.json:
        print(
            json.dumps(
                {
                    "operations": len(done),
                    "calls": calls,
                    "disagreeing_calls": len(bad),
                    "disagreements": [
                        {"operation": i + 1, "call": d.call, "detail": d.detail}
                        | {"kernel": errno_name(d.kernel)}
                        | {
                            "engine": "raised"
                            if d.engine == ENGINE_RAISED
                            else errno_name(d.engine)
                        }
                        for i, d in found
                    ],
                }
            )
        )
    else:
        print(
            f"memslots conform --replay {path}: {_n(len(done), 'operation')}, {_n(calls, 'call')},"
            f" {len(bad)} disagreeing"
        )
        for i, d in found:
            print(f"# operation {i + 1}: {d}")
            print(op_to_json(done[i]))
    return 1 if found else 0
