"""``memslots record``: capture a real VMM's memslot-related calls, live, one trace per run.

:func:`record` runs a command (or attaches to a running process) under ptrace and writes,
as they happen, the calls of :mod:`memslots.tools.record.recorder` as a version 2 trace
(:mod:`memslots.tools.traces`, ``docs/trace-format.md``): every VM of every traced process,
each record with its VM, thread, monotonic timestamp and result. The modules:

- :mod:`~memslots.tools.record.ptrace`: ptrace, seccomp BPF, ``process_vm_readv`` and
  ``kcmp`` through ctypes;
- :mod:`~memslots.tools.record.recorder`: system calls to records, VM and fd tracking;
- :mod:`~memslots.tools.record.tracer`: the event loop, launch and attach, signals.

Works for dynamically and statically linked programs alike (nothing is injected into the
program: the kernel stops it), on x86-64 Linux 5.3+ (``PTRACE_GET_SYSCALL_INFO``); needs
the right to ptrace the program (root, or the same user with ``ptrace_scope`` 0).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from typing import Any

from memslots.tools.record.recorder import CallDecoder
from memslots.tools.record.tracer import TraceResult, attach, launch
from memslots.tools.traces import Record, TraceWriter, header_json

__all__ = ["RecordResult", "host_info", "record"]


@dataclasses.dataclass
class RecordResult:
    """What :func:`record` did: how the program ended (``status``, ``reason``, see
    :class:`~memslots.tools.record.tracer.TraceResult`), the records written, the VMs
    seen, the structures it could not read, and the tracer's stop count."""

    status: int | None
    reason: str
    records: int
    vms: int
    unreadable: int
    stops: int
    calls: int


def host_info() -> dict[str, Any]:
    """The ``host`` part of a trace header: the kernel release and, when ``/dev/kvm`` is
    usable, the kernel's profile (``profile``, what ``memslots replay --no-kvm`` answers
    as: :meth:`memslots.profiles.KernelProfile.probe`) and the limits a default VM has on
    it (``limits``, which older readers take). Costs a few scratch VMs (about 250
    ioctls). Never raises."""
    info: dict[str, Any] = {"kernel": os.uname().release, "machine": os.uname().machine}
    try:
        from memslots.profiles import KernelProfile

        profile = KernelProfile.probe()
        info["profile"] = profile.to_dict()  # what Trace.profile() reads back
        info["limits"] = dataclasses.asdict(profile.vm_limits())  # and Trace.limits()
    except Exception:  # no /dev/kvm: the trace just does not say
        pass
    return info


def record(
    output: int,
    *,
    argv: Sequence[str] | None = None,
    pid: int | None = None,
    host: dict[str, Any] | None = None,
) -> RecordResult:
    """Record ``argv`` (run here) or the running process ``pid`` into the file descriptor
    ``output`` (written line by line, each line complete as soon as it is written).
    Returns when the program has ended (or, attached, on SIGINT/SIGTERM, after
    detaching); the end record is written then. Raises OSError when the program cannot be
    started or traced. ``host`` overrides :func:`host_info` (tests)."""
    if (argv is None) == (pid is None):
        raise ValueError("record needs exactly one of argv and pid")
    from memslots import __version__

    recorder: dict[str, Any] = {
        "name": "memslots record",
        "version": __version__,
        "mode": "attach" if pid is not None else "launch",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if argv is not None:
        recorder["command"] = list(argv)
    else:
        recorder["pid"] = pid
    writer = TraceWriter(output, header_json(recorder, host if host is not None else host_info()))
    calls = 0

    def write(rec: Record) -> None:
        nonlocal calls
        writer.write(rec)
        calls += rec.kind.startswith("set_user_memory_region")

    decoder = CallDecoder(write)
    result: TraceResult | None = None
    try:
        if argv is not None:
            result = launch(argv, decoder)
        elif pid is not None:
            result = attach(pid, decoder)
    finally:
        if result is None:
            writer.end(None, "recorder failed", time.monotonic_ns())
    if result is None:  # pragma: no cover - one of argv and pid is given
        raise ValueError("record needs argv or pid")
    writer.end(result.status, result.reason, time.monotonic_ns())
    return RecordResult(
        status=result.status,
        reason=result.reason,
        records=writer.records,
        vms=len(decoder.vms),
        unreadable=decoder.unreadable,
        stops=result.stops,
        calls=calls,
    )
