"""Replaying memslot traces: every VM's recorded calls through every implementation.

:func:`replay_trace` takes a :class:`~memslots.tools.traces.Trace` and replays each of its
VMs, one after the other, on a fresh VM of each implementation; :func:`replay` does one VM
(a list of records, e.g. the :class:`~memslots.tools.traces.MemslotCall` list of a QEMU
log):

``engine``
    :class:`memslots.Vm`, the tree-based engine;
``array``
    :class:`memslots.baseline.ArrayVm`, the array design before the commit;
``kernel``
    a real VM on ``/dev/kvm`` (by default when it is usable), one per traced VM.

It collects each record's result (0 or the errno) and time on each of them, classifies
each memslot call by what the primary implementation (the engine unless told otherwise)
did with it (create, delete, move, flags, no-op, failed), and compares every result with
the one the trace recorded and with the kernel's. A :class:`TraceReport` holds one
:class:`ReplayReport` per VM (kinds, errors by errno, disagreements, the final memory map
of every address space, every change the primary model made to the slots on the way
(:meth:`ReplayReport.slot_changes`, what :mod:`memslots.tools.mapview` draws), timings) and
the hazards.

The modules: :mod:`.relocation` (trace hvas onto memory of this process), :mod:`.kernel`
(the ``/dev/kvm`` session), :mod:`.report` (what was found, and its JSON), :mod:`.run`
(the replay).

What each record does on the replay VMs, and what is compared:

- memslot calls: made as recorded (hvas relocated for the kernel, see :mod:`.relocation`);
  the errno is compared. A ``KVM_MEM_GUEST_MEMFD`` call names a guest_memfd of the traced
  process: its number is mapped to the guest_memfd the replay created for the recorded
  ``create_guest_memfd`` that returned it (a number the trace never saw created becomes
  an fd that is not open: EBADF).
- ``create_guest_memfd``, ``create_vcpu``, ``enable_cap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)``,
  ``get_dirty_log``, ``clear_dirty_log``: made on every implementation; the errno is
  compared. A dirty bitmap the kernel returned to the traced program holds the pages its
  guest wrote, which no model can know: until the traced VM's first vCPU exists no guest
  can have written, so the replayed bitmap must equal the recorded one; after that every
  replayed dirty page must be among the recorded ones (a guest only adds pages). The
  models' and the kernel's replayed bitmaps must be equal (no guest runs in a replay).
- the dirty ring (``enable_cap`` of ``KVM_CAP_DIRTY_LOG_RING``/``_ACQ_REL``,
  ``reset_dirty_rings``): made on the engine and on the kernel VM through
  ``enable_dirty_ring``/``reset_dirty_rings`` (``KvmVm``'s, so the engine inside it follows
  the kernel's ring: vCPUs created afterwards map it, GET and CLEAR are ENXIO on both);
  the recorded ``flags`` and ``args[1..3]`` are not passed on, as the kernel ignores them.
  The errno is compared. ``reset_dirty_rings`` returns how many ring entries were reset,
  which depends on what the traced guest wrote: the count is not compared (in the replay
  no guest runs, and the kernel's count is checked against the engine's prediction
  inside ``KvmVm``). The array does not model the ring: these records, and its dirty logs
  once the traced VM's ring is on, are shown as not modelled (``null`` in JSON, ``n/a`` in
  tables). ``enable_cap`` of any other capability is not replayed.
- ``munmap``/``mremap``/``madvise`` records are not replayed: the range each took away is
  looked up in the primary model's slots of every live VM of the same process with the
  set's hva interval tree (``iter_hva_range``, what the kernel's MMU notifier does), and
  every slot hit is a :class:`Hazard`: the guest would now see other memory or zeros.
- ``create_vm`` starts a VM, ``release_vm`` ends its hazards. A VM of another type than
  the default is replayed on a default VM.

Limits. With the kernel column on, the engine and the array get the limits ``KvmVm``
finds in the kernel (address spaces, ``KVM_CAP_NR_MEMSLOTS``, ``KVM_CAP_READONLY_MEM``,
the highest gfn, guest_memfd); without it, the limits of the machine the trace was recorded
on when its header gives them (``memslots record`` does), else the x86-64 defaults of
:class:`memslots.Vm`.

JSON document (:meth:`TraceReport.to_json`, what ``memslots replay --json`` prints). Keys
are stable; numbers are integers unless stated; errnos are numbers (0 for success, null
where unknown or not modelled) except where keyed by name. Every document has::

    {
      "version": 3,
      "trace": {"source": str, "embedded": bool, "format": str | null,
                "trace_version": 1 | 2 | null, "vms": int, "calls": int, "records": int,
                "skipped": [{"source": str, "line": int, "message": str}, ...]},
      "agreement": {"calls": int, "agreeing": int, "rate": float | null, ...},
                                         # records with two known results; all VMs
      "kinds": {"create", "delete", "move", "flags", "no-op", "failed": int, ...},
      "disagreements": [{"vm": int, "index": int, "where": "FILE:LINE", "line": int,
                         "record": str, "call": str, "detail": str,
                         "results": {"recorded": int | null, "engine": int | null, ...}}],
      "vms": [VM, ...],                  # one per VM, in creation order
      "hazards": [{"vm": int, "call": "munmap" | "mremap" | "madvise", "where": str,
                   "line": int, "tid": int, "start": int, "end": int,  # hvas hit
                   "slot": int, "as_id": int, "id": int, "flags": int,
                   "slot_gfn_start": int, "slot_gfn_end": int,        # end exclusive
                   "gfn_start": int, "gfn_end": int,                  # the gfns hit
                   "slot_hva": int, "slot_size": int}]
    }

and each ``VM`` (``calls`` is the number of memslot calls replayed; ``records`` one row
per replayed record)::

    {
      "vm": int, "pid": int, "vm_type": int | null, "attached": bool,
      "calls": int,
      "trace": {"source", "embedded", "format", "calls": int, "records": int, "skipped"},
      "primary": "engine" | "array",
      "implementations": {
        "engine" | "array" | "kernel": {
            "status": "ok" | "unavailable" | "crashed" | "off",
            "description": str, "note": str | null}},
      "limits": {"nr_address_spaces", "max_user_slots", "max_gfn": int,
                 "readonly_mem", "private_mem": bool, "task_size_max": int,
                 "source": "kernel" | "trace" | "defaults"},
      "hva_relocation": null | {"total_bytes": int,
            "clusters": [{"start": int, "end": int, "addr": int, "delta": int}]},
      "kinds": {...}, "errors": {"EEXIST": {"errno": 17, "recorded": int, "engine": int,
                                            ...}, ...},
      "agreement": {"calls": int, "agreeing": int, "rate": float | null,
                    "pairs": [{"a": str, "b": str, "compared": int, "agree": int}]},
      "disagreements": [...],            # as above, this VM's
      "map_disagreements": [{"impl": str, "detail": str}],
      "memory_map": {"0": [{"slot", "as_id", "id", "gpa_start", "gpa_end", "size",
                            "flags", "flag_names": [str], "hva"}], ...},
                                         # gpa_end is inclusive; hva is the trace's
      "timings": {"engine" | "array" | "kernel": {
            "calls": int, "total_ns": int, "mean_ns": float, "median_ns": float,
            "by_kind": {kind: {"calls": int, "mean_ns": float}}}},
      "notes": [str],                    # what could not be predicted
      "records": [{"index": int, "where": str, "line": int, "record": str,
                   # memslot calls: "slot", "flags", "guest_phys_addr", "memory_size",
                   # "userspace_addr", "v2"; other records: "call": str
                   "kind": str, "recorded": int | null, "results": {impl: int | null},
                   "time_ns": {impl: int}, "agree": bool, "details"?: {impl: str}}]
    }

For a trace of one VM the top level is, besides ``vms`` and ``hazards``, that VM's
document (version 2 of this document had the rows there under ``calls``, which is now
always the number of memslot calls; the rows are ``records`` everywhere).

Costs: a replay is O(n) records on each implementation, each at the implementation's cost
(O(log n) for the engine, O(n) for the array); relocation is O(n log n) once per VM.
"""

from __future__ import annotations

from memslots.tools.replay.kernel import KernelSession, open_kernel
from memslots.tools.replay.relocation import HvaCluster, HvaRelocation
from memslots.tools.replay.report import (
    IMPLS,
    JSON_VERSION,
    KINDS,
    CallOutcome,
    Disagreement,
    Hazard,
    ImplName,
    ImplRun,
    MapEntry,
    ReplayReport,
    SlotChange,
    TraceReport,
    agreement_percent,
    describe_record,
    flag_names,
)
from memslots.tools.replay.run import PROGRESS_EVERY, replay, replay_trace

__all__ = [
    "IMPLS",
    "JSON_VERSION",
    "KINDS",
    "PROGRESS_EVERY",
    "CallOutcome",
    "Disagreement",
    "Hazard",
    "HvaCluster",
    "HvaRelocation",
    "ImplName",
    "ImplRun",
    "KernelSession",
    "MapEntry",
    "ReplayReport",
    "SlotChange",
    "TraceReport",
    "agreement_percent",
    "describe_record",
    "flag_names",
    "open_kernel",
    "replay",
    "replay_trace",
]
