"""``memslots check``: why each call of a trace failed, and what the VMM did that loses
data or faults its guest.

:func:`check_trace` replays a :class:`~memslots.tools.traces.Trace` on the engine
(:mod:`.history`), explains every failed call (:mod:`.explain`: the kernel check, its
kernel function, the slot in the way and the record that put it there) and runs the
rules (:mod:`.rules`) on each VM. The :class:`CheckReport` prints as text
(:meth:`CheckReport.render`) or as the JSON document of ``memslots check --json``
(:meth:`CheckReport.to_json`)::

    {
      "version": 1,
      "trace": {"source": str, "format": str | null, "trace_version": int | null,
                "vms": int, "records": int},
      "limits": {"source": "option" | "trace profile" | "trace limits" | "defaults",
                 "profile": str | null, "max_user_slots": int, "nr_address_spaces": int},
      "rules": [{"rule": str, "detects": str, "ran": bool, "why": str | null,
                 "note": str | null, "findings": int}],
      "failures": [{"vm": int, "records": [int], "where": str, "record": str,
                    "call": str, "errno": str,
                    "explanation": {"errno": str, "check": str, "function": str,
                                    "text": str, "summary": str,
                                    "slot": int | null, "record": int | null}}],
      "findings": [{"rule": str, "severity": "info" | "warning" | "error", "vm": int,
                    "records": [int], "slots": [int], "message": str}],
      "notes": [str],
      "summary": {"failures": int, "findings": {"error": int, "warning": int, "info": int},
                  "fail_on": str, "failing": int, "status": 0 | 1}
    }

Records are 1-based line numbers of the trace; slots are ABI slot numbers (``as_id << 16
| id``: the id itself in address space 0). Every rule, what it detects and why it matters
is in docs/check.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any, Final

from memslots.errors import errno_name
from memslots.tools.check.explain import CHECKS, Explanation, Placements, explain
from memslots.tools.check.history import Event, VmHistory, histories
from memslots.tools.check.rules import (
    RULES,
    SEVERITIES,
    Finding,
    Rule,
    RuleContext,
    severity_rank,
)
from memslots.tools.traces import Trace
from memslots.validate import VmLimits
from memslots.vm import Vm

if TYPE_CHECKING:
    from memslots.profiles import KernelProfile

__all__ = [
    "CHECKS",
    "JSON_VERSION",
    "RULES",
    "SEVERITIES",
    "CheckReport",
    "Explanation",
    "Finding",
    "Placements",
    "Rule",
    "RuleContext",
    "check_trace",
    "explain",
    "resolve_limits",
]

#: version of the JSON document
JSON_VERSION: Final = 1

_NEEDS: Final = {
    "hva": "munmap, mremap and madvise",
    "dirty": "KVM_GET_DIRTY_LOG and dirty-ring",
}


@dataclasses.dataclass(frozen=True, slots=True)
class LimitsSource:
    """Where the limits came from: ``source`` (``"option"``, ``"trace profile"``,
    ``"trace limits"``, ``"defaults"``), the profile's name when there is one, and the
    limits per VM type."""

    source: str
    profile: str | None
    limits: Callable[[int | None], VmLimits]


def resolve_limits(trace: Trace, profile: str | None = None) -> LimitsSource:
    """The limits to check ``trace`` with: the named ``profile``
    (:meth:`memslots.profiles.KernelProfile.named`; KeyError, listing the names, for an
    unknown one), else the profile in the trace's header (``host.profile``), else its
    ``host.limits``, else the engine's defaults."""
    # memslots.profiles and memslots.kvm import each other: only an import of
    # memslots.kvm first works, so that one comes first here
    import memslots.kvm  # noqa: F401
    from memslots.profiles import KernelProfile

    if profile is not None:
        named = KernelProfile.named(profile)
        return LimitsSource("option", named.name, _profile_limits(named))
    host = (trace.header or {}).get("host") or {}
    data = host.get("profile") if isinstance(host, dict) else None
    if isinstance(data, dict):
        try:
            found = KernelProfile.from_dict(data)
        except ValueError:
            pass
        else:
            return LimitsSource("trace profile", found.name, _profile_limits(found))
    limits = trace.limits()
    if limits is not None:
        fixed = limits
        return LimitsSource("trace limits", None, lambda _: fixed)
    defaults = Vm().limits
    return LimitsSource("defaults", None, lambda _: defaults)


def _profile_limits(profile: KernelProfile) -> Callable[[int | None], VmLimits]:
    def limits(vm_type: int | None) -> VmLimits:
        try:
            return profile.vm_limits(vm_type or 0)
        except OSError:
            return profile.vm_limits(0)

    return limits


@dataclasses.dataclass
class RuleRun:
    """Whether a rule ran on the trace (``why`` not, when it did not), a ``note`` on how
    it ran, and its findings."""

    rule: Rule
    ran: bool
    why: str | None = None
    note: str | None = None
    findings: int = 0


@dataclasses.dataclass
class CheckReport:
    """What :func:`check_trace` found: the VMs' histories, the rules run, the findings
    (in VM, then record order) and the notes."""

    trace: Trace
    limits: LimitsSource
    vms: list[VmHistory]
    rules: list[RuleRun]
    findings: list[Finding]
    notes: list[str]
    #: failed calls made on no VM (``KVM_CREATE_VM``), explained as not modelled
    orphans: list[Event] = dataclasses.field(default_factory=list)

    def failures(self) -> list[tuple[int | None, Event]]:
        """Every failed call, each with its VM (None for a call made on no VM: a
        failed ``KVM_CREATE_VM``), in trace order."""
        out: list[tuple[int | None, Event]] = [(h.vm, e) for h in self.vms for e in h.failures()]
        out += [(None, e) for e in self.orphans]
        out.sort(key=lambda pair: pair[1].line)
        return out

    def counts(self) -> dict[str, int]:
        """Findings by severity (every severity, highest first)."""
        return {s: sum(f.severity == s for f in self.findings) for s in reversed(SEVERITIES)}

    def failing(self, fail_on: str) -> list[Finding]:
        """The findings at or above ``fail_on``."""
        rank = severity_rank(fail_on)
        return [f for f in self.findings if severity_rank(f.severity) >= rank]

    def status(self, fail_on: str = "warning") -> int:
        """1 when a finding is at or above ``fail_on``, else 0."""
        return 1 if self.failing(fail_on) else 0

    def to_json(self, fail_on: str = "warning") -> dict[str, Any]:
        """The JSON document (module docstring). O(n)."""
        first = self.vms[0].limits if self.vms else Vm().limits
        return {
            "version": JSON_VERSION,
            "trace": {
                "source": self.trace.source,
                "format": self.trace.fmt,
                "trace_version": self.trace.version,
                "vms": len(self.vms),
                "records": len(self.trace.records),
            },
            "limits": {
                "source": self.limits.source,
                "profile": self.limits.profile,
                "max_user_slots": first.max_user_slots,
                "nr_address_spaces": first.nr_address_spaces,
            },
            "rules": [
                {
                    "rule": r.rule.id,
                    "detects": r.rule.detects,
                    "ran": r.ran,
                    "why": r.why,
                    "note": r.note,
                    "findings": r.findings,
                }
                for r in self.rules
            ],
            "failures": [_failure_json(vm, e) for vm, e in self.failures()],
            "findings": [f.to_json() for f in self.findings],
            "notes": list(self.notes),
            "summary": {
                "failures": len(self.failures()),
                "findings": self.counts(),
                "fail_on": fail_on,
                "failing": len(self.failing(fail_on)),
                "status": self.status(fail_on),
            },
        }

    def render(self, out: IO[str], fail_on: str = "warning") -> None:
        """The text report: the trace and limits, the rules, every failed call explained,
        the findings, the notes and the verdict. O(n)."""
        t = self.trace
        n = len(self.vms)
        limits = self.vms[0].limits if self.vms else Vm().limits
        where = self.limits.source + (f" {self.limits.profile}" if self.limits.profile else "")
        print(
            f"memslots check: {t.source} ({t.fmt} format, {n} VM{'s' if n != 1 else ''},"
            f" {len(t.records)} records); limits: {where}, {limits.max_user_slots} slots",
            file=out,
        )
        print("\nRules:", file=out)
        for r in self.rules:
            state = f"ran ({r.findings} found)" if r.ran else "not run"
            text = f"  {r.rule.id:<20} {state}"
            if r.why:
                text += f": {r.why}"
            if r.note:
                text += f"; {r.note}"
            print(text, file=out)
        failures = self.failures()
        print(f"\nFailed calls: {len(failures) or 'none'}", file=out)
        for number, e in failures:
            vm = f"VM {number} " if n > 1 and number is not None else ""
            print(f"  {vm}line {e.line}: {_describe(e)}", file=out)
            if e.explanation is not None:
                print(f"    {e.explanation.line()}", file=out)
        counts = self.counts()
        summary = ", ".join(f"{v} {k}" for k, v in counts.items() if v) or "none"
        print(f"\nFindings: {summary}", file=out)
        for f in self.findings:
            vm = f"VM {f.vm} " if n > 1 else ""
            lines = ", ".join(map(str, f.records[:8])) + (", ..." if len(f.records) > 8 else "")
            print(f"  {f.severity:<7} {f.rule} ({vm}line {lines}): {f.message}", file=out)
        for note in self.notes:
            print(f"Note: {note}", file=out)
        failing = len(self.failing(fail_on))
        print(
            f"\n{failing} finding{'s' if failing != 1 else ''} at or above {fail_on}"
            f" (exit status {self.status(fail_on)})",
            file=out,
        )


def _describe(e: Event) -> str:
    # imported here: memslots.tools.replay imports this package's explain module, which
    # runs this package first
    from memslots.tools.replay.report import describe_record

    return describe_record(e.record)


def _failure_json(vm: int | None, e: Event) -> dict[str, Any]:
    explanation = e.explanation or Explanation(e.result or 0, "unknown", "", "")
    return {
        "vm": vm,
        "records": [e.line],
        "where": e.record.where,
        "record": e.record.kind,
        "call": _describe(e),
        "errno": errno_name(e.result),
        "explanation": explanation.to_json(),
    }


def _context(trace: Trace) -> RuleContext:
    """What the trace's format carries: a version 2 trace (``memslots record``) holds
    vCPU, dirty-log, dirty-ring and hva records; the other formats only memslot calls."""
    full = trace.version == 2
    return RuleContext(vcpus=full, dirty=full, hva=full)


def check_trace(
    trace: Trace,
    *,
    profile: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> CheckReport:
    """Replay ``trace`` on the engine, explain its failed calls and run every rule that
    its format allows. ``profile`` names a kernel profile to check against (KeyError for
    an unknown one); ``progress(done, total)`` is told every few thousand records.
    O(n log n) in the records."""
    source = resolve_limits(trace, profile)
    vms = histories(trace, source.limits, progress)
    ctx = _context(trace)
    fmt = {"qemu": "a QEMU log", "strace": "strace output"}.get(str(trace.fmt), "")
    fmt = fmt or f"a version {trace.version} JSON Lines trace"
    runs: list[RuleRun] = []
    findings: list[Finding] = []
    for rule in RULES:
        if (rule.needs == "hva" and not ctx.hva) or (rule.needs == "dirty" and not ctx.dirty):
            why = f"needs {_NEEDS[rule.needs]} records, which {fmt} does not carry"
            runs.append(RuleRun(rule, False, why))
            continue
        note = None
        if rule.id == "remap-window" and not ctx.vcpus:
            note = f"vCPUs taken to exist throughout: {fmt} does not record KVM_CREATE_VCPU"
        found = [f for h in vms for f in rule.run(h, ctx)]
        runs.append(RuleRun(rule, True, None, note, len(found)))
        findings += found
    findings.sort(key=lambda f: (f.vm, f.records[0] if f.records else 0, f.rule))
    notes = [f"VM {h.vm}: {note}" for h in vms for note in h.notes]
    orphans = [
        Event(
            r,
            r.result,
            explanation=Explanation(
                r.result,
                "unexplained",
                "",
                f"{errno_name(r.result)}: {r.kind} failed on no VM; the engine does not model"
                " it (EMFILE: the process's descriptor limit; EINVAL: a VM type the kernel"
                " does not offer; ENOMEM)",
            ),
        )
        for r in trace.records
        if r.vm is None and r.result and not hasattr(r, "removed")
    ]
    return CheckReport(trace, source, vms, runs, findings, notes, orphans)
