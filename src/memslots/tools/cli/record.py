"""``memslots record``: run a VMM (or attach to one) and write its memslot calls as a trace.

Usage::

    memslots record [-o FILE] [--pid PID] [-q] -- COMMAND [ARG...]

Runs COMMAND under the recorder (:mod:`memslots.tools.record`) and writes, as they happen,
its ``KVM_CREATE_VM``, memslot, guest_memfd, vCPU-creation, dirty-log and dirty-ring calls
with their results, and the ``munmap``/``mremap``/``madvise`` calls that took memory away
from a live slot, to FILE (default ``memslots-trace.jsonl``; ``-`` for standard output) as
a version 2 trace (``docs/trace-format.md``), one VM per ``KVM_CREATE_VM``. ``--pid PID``
attaches to a running process instead (every syscall of it then stops the recorder: slower
for the process) and detaches on Ctrl-C. Replay the trace with ``memslots replay FILE``.

Exit status: COMMAND's (its exit code, or 128 + the signal that ended it); with ``--pid``,
the process's if it ended while attached, else 0; 127 when COMMAND cannot be found, 126
when it cannot be run (not executable), 2 for a usage error, a process that does not
exist or cannot be traced, or a trace that cannot be written (a reader of ``-o -`` that
goes away ends the output silently, status 0). Ctrl-C is passed to COMMAND (a second one
kills it); the trace is complete and on disk either way.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import shutil
import sys
from typing import Any, Final

from memslots.tools.cli import CliError
from memslots.tools.cli.options import int_range
from memslots.tools.text import plural
from memslots.tools.traces import TraceWriteError

#: the largest process id Linux gives (``PID_MAX_LIMIT`` on 64-bit)
PID_MAX: Final = 1 << 22

#: where the trace goes without ``-o``
DEFAULT_OUTPUT: Final = "memslots-trace.jsonl"


def register(sub: Any) -> None:
    """Add the ``record`` subcommand."""
    p = sub.add_parser(
        "record",
        help="run a VMM (or attach to one) and record its memslot calls, one trace per run",
        description=(
            "Run COMMAND (or attach to --pid PID) under ptrace and write its memslot-related"
            " KVM calls (KVM_CREATE_VM, KVM_SET_USER_MEMORY_REGION/REGION2,"
            " KVM_CREATE_GUEST_MEMFD, KVM_CREATE_VCPU, dirty-log capabilities and ioctls,"
            " KVM_RESET_DIRTY_RINGS) with their results, and munmap/mremap/madvise of live"
            " slots' memory, as a JSON Lines trace of every VM. Exit status: COMMAND's."
        ),
        usage="memslots record [-h] [-o FILE] [--pid PID] [-q] -- COMMAND [ARG...]",
    )
    p.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        default=DEFAULT_OUTPUT,
        help=f"trace file, '-' for standard output (default: {DEFAULT_OUTPUT})",
    )
    p.add_argument(
        "--pid",
        type=int_range(1, PID_MAX, what="a process id"),
        help="attach to this running process instead",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no summary line on stderr")
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="COMMAND", help="to run")
    p.set_defaults(func=run)


def _open_output(path: str) -> tuple[int, bool]:
    """The descriptor to write the trace to, and whether this command owns it."""
    if path == "-":
        if sys.stdout is None:
            raise CliError("-o -: standard output is closed")
        try:
            fd = sys.stdout.fileno()
            os.fstat(fd)
        except (OSError, ValueError):
            raise CliError("-o -: standard output is closed") from None
        return fd, False
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644), True
    except OSError as exc:
        raise CliError(f"-o {path}: {exc.strerror or exc}") from None


def _check_command(name: str) -> None:
    """COMMAND must be a program this user may run, as a shell would check: a name
    without ``/`` is looked up on ``PATH`` (none: ``command not found``, status 127); a
    path that exists but cannot be run (not executable, a directory) is ``Permission
    denied``, status 126."""
    if "/" not in name:
        if shutil.which(name) is None:
            raise CliError(f"{name}: command not found", status=127)
        return
    if not os.path.exists(name):
        raise CliError(f"{name}: No such file or directory", status=127)
    if os.path.isdir(name) or not os.access(name, os.X_OK):
        raise CliError(f"{name}: Permission denied", status=126)


def refusal_cause(pid: int) -> str | None:
    """Why the kernel may refuse to ptrace process ``pid`` (``ptrace_attach`` in
    kernel/ptrace.c and the Yama LSM, security/yama/yama_lsm.c), from what this process
    can see: itself, a process already traced, Yama's ``ptrace_scope``, another user's
    process, a kernel thread; for root, what is left. None when nothing is known."""
    if pid == os.getpid():
        return "a process cannot trace itself"
    status = _read(f"/proc/{pid}/status")
    tracer = re.search(r"^TracerPid:\s*(\d+)", status, re.M)
    if tracer and tracer.group(1) != "0":
        return f"process {pid} is already traced by process {tracer.group(1)}"
    if status and not _read(f"/proc/{pid}/cmdline"):
        return f"process {pid} is a kernel thread"
    scope = _read("/proc/sys/kernel/yama/ptrace_scope").strip()
    if scope == "3":
        return "kernel.yama.ptrace_scope is 3: no process may be traced"
    root = os.geteuid() == 0
    if scope == "2" and not root:
        return "kernel.yama.ptrace_scope is 2: only root may attach"
    uid = re.search(r"^Uid:\s*\d+\s+(\d+)", status, re.M)
    if not root and uid and int(uid.group(1)) != os.geteuid():
        return f"process {pid} belongs to another user: run as root"
    if scope == "1" and not root:
        return "kernel.yama.ptrace_scope is 1: only a parent may trace; run as root"
    if root:
        return (
            f"the kernel refused although this is root: process {pid} is not dumpable,"
            " belongs to a user namespace this one has no CAP_SYS_PTRACE over, or a"
            " security module protects it"
        )
    return None


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fp:
            return fp.read()
    except OSError:
        return ""


def run(args: argparse.Namespace) -> int:
    """Run the subcommand; returns COMMAND's exit status."""
    from memslots.tools.record import record

    command = list(args.argv)
    if command[:1] == ["--"]:
        command = command[1:]
    if args.pid is not None and command:
        raise CliError("give either --pid PID or COMMAND, not both")
    if args.pid is None and not command:
        raise CliError("nothing to record: give COMMAND after '--' (or --pid PID)")
    if command:
        _check_command(command[0])
    fd, owned = _open_output(args.output)
    label = "standard output" if args.output == "-" else args.output
    try:
        try:
            result = record(fd, argv=command) if command else record(fd, pid=args.pid)
        except TraceWriteError as exc:
            if exc.errno == errno.EPIPE and args.output == "-":
                return 0  # the reader went away (``| head``): the output ends silently
            raise CliError(f"-o {args.output}: {exc.strerror}") from None
        except PermissionError as exc:
            why = refusal_cause(args.pid) if args.pid is not None else None
            raise CliError(
                f"cannot trace: {exc.strerror or exc}" + (f" ({why})" if why else "")
            ) from None
        except ProcessLookupError:
            raise CliError(f"--pid {args.pid}: no such process") from None
        except OSError as exc:
            raise CliError(f"cannot trace: {exc.strerror or exc}") from None
    finally:
        if owned:
            os.close(fd)
    if not args.quiet:
        what = " ".join(command) if command else f"process {args.pid}"
        ended = {
            "exited": f"exited with status {result.status}",
            "killed": f"was killed (status {result.status})",
            "detached": "was detached and runs on",
        }.get(result.reason, result.reason)
        vms = plural(result.vms, "VM")
        calls = plural(result.calls, "memslot call")
        unreadable = f", {result.unreadable} unreadable" if result.unreadable else ""
        print(
            f"memslots record: {vms}, {calls}, {plural(result.records, 'record')}{unreadable}"
            f" to {label};"
            f" {what} {ended}",
            file=sys.stderr,
        )
    return result.status if result.status is not None else 0
