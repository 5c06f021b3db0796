"""``memslots profiles``: the named kernel profiles, one line each, and with ``--probe``
this machine's kernel as the engine sees it (:mod:`memslots.profiles`)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from memslots.profiles import KernelProfile, profile_names


def register(sub: Any) -> None:
    """Add the ``profiles`` subcommand."""
    p = sub.add_parser(
        "profiles",
        help="list the named kernel profiles (what each kernel answers differently)",
        description=(
            "List the named kernel profiles: the kernels whose answers memslots knows "
            "(memslots replay --profile NAME, Vm(profile=KernelProfile.named(NAME))). "
            "With --probe, this machine's kernel too, read from /dev/kvm, and how it "
            "differs from the named profile of its series."
        ),
    )
    p.add_argument("--probe", action="store_true", help="also probe this machine's /dev/kvm")
    p.add_argument("--json", action="store_true", help="print the profiles as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """List the profiles."""
    profiles = [KernelProfile.named(n) for n in profile_names()]
    probed = KernelProfile.probe() if args.probe else None
    if args.json:
        doc: dict[str, Any] = {"profiles": [p.to_dict() for p in profiles]}
        if probed is not None:
            doc["probed"] = probed.to_dict()
        json.dump(doc, sys.stdout, indent=2)
        print()
        return 0
    width = max(len(n) for n in profile_names())
    for name, p in zip(profile_names(), profiles, strict=True):
        print(f"{name:<{width}}  {p.summary()}")
    if probed is not None:
        print(f"\nthis machine: Linux {probed.release} ({probed.arch}): {probed.summary()}")
        nearest = _nearest(probed)
        if nearest is not None:
            diffs = nearest.differences(probed)
            print(f"  differs from {nearest.key} in: " + ("; ".join(diffs) or "nothing"))
    return 0


def _nearest(probed: KernelProfile) -> KernelProfile | None:
    """The named profile of the same architecture and page size with the closest version
    at or below."""
    same = [
        p
        for p in map(KernelProfile.named, profile_names())
        if p.arch == probed.arch and p.page_shift == probed.page_shift
    ]
    below = [p for p in same if p.version <= probed.version]
    return max(below, key=lambda p: p.version) if below else None
