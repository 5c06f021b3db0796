"""``memslots demo``: a short tour of the engine that prints the memory map after each
step (create, flags change, move, delete, a rejected overlap)."""

from __future__ import annotations

import argparse
from typing import Any

from rich.table import Table

from memslots import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, MemslotError, Vm
from memslots.errors import errno_name
from memslots.tools.cli import console as cli_console
from memslots.tools.text import size_text

MB = 1 << 20


def register(sub: Any) -> None:
    """Add the ``demo`` subcommand."""
    p = sub.add_parser(
        "demo",
        help="a short tour of the engine, printing the memory map",
        description=(
            "A short tour of the engine on a VM without /dev/kvm: the memory map after each"
            " of a few creates, a flags change, a move, a rejected overlap and a delete."
        ),
    )
    p.set_defaults(func=run)


def flag_names(flags: int) -> str:
    """``"LOG_DIRTY|READONLY"`` style names for memslot flags (``-`` for none)."""
    names = []
    if flags & KVM_MEM_LOG_DIRTY_PAGES:
        names.append("LOG_DIRTY")
    if flags & KVM_MEM_READONLY:
        names.append("READONLY")
    if flags & ~(KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY):
        names.append(f"{flags & ~3:#x}")
    return "|".join(names) or "-"


def memory_map(vm: Vm, title: str | None = None) -> Table:
    """A rich table of every slot of every address space (``title``: a rich title, which
    wraps at the table's width; the demo prints its titles as lines of their own)."""
    t = Table(title=title, title_justify="left")
    for col in ("as", "slot", "gpa range", "size", "flags", "hva"):
        t.add_column(
            col, justify="right" if col in ("as", "slot", "size") else "left", no_wrap=True
        )
    for s in vm.slots():
        gpa = s.guest_phys_addr
        t.add_row(
            str(s.as_id),
            str(s.id),
            f"{gpa:#x}-{gpa + s.memory_size - 1:#x}",
            size_text(s.memory_size),
            flag_names(s.flags),
            f"{s.userspace_addr:#x}",
        )
    return t


def run(args: argparse.Namespace) -> int:
    """Run the tour."""
    con = cli_console()
    vm = Vm()
    steps: list[tuple[str, tuple[int, int, int, int, int]]] = [
        ("create slot 0: 640 KiB of low RAM", (0, 0, 0, 640 * 1024, 0x7F0000000000)),
        (
            "create slot 1: 1 MiB BIOS, read-only",
            (1, KVM_MEM_READONLY, 0xFFF00000, MB, 0x7F1000000000),
        ),
        ("create slot 2: 16 MiB VGA BAR", (2, 0, 0xFD000000, 16 * MB, 0x7F2000000000)),
        (
            "slot 2: turn on dirty logging (FLAGS_ONLY)",
            (2, KVM_MEM_LOG_DIRTY_PAGES, 0xFD000000, 16 * MB, 0x7F2000000000),
        ),
        (
            "slot 2: move the BAR to 0xE0000000 (MOVE)",
            (2, KVM_MEM_LOG_DIRTY_PAGES, 0xE0000000, 16 * MB, 0x7F2000000000),
        ),
        ("create slot 3 overlapping slot 2 (rejected)", (3, 0, 0xE0800000, MB, 0x7F3000000000)),
        ("delete slot 0 (DELETE)", (0, 0, 0, 0, 0)),
    ]
    for title, req in steps:
        try:
            vm.set_user_memory_region(*req)
            result = f"ok ({vm.last_change.value if vm.last_change else '?'})"
        except MemslotError as exc:
            result = f"{errno_name(exc.errno)}: {exc.detail}"
        gen = vm.memslots(0).generation
        con.print(f"{title} -> {result}; generation {gen}", markup=False, highlight=False)
        con.print(memory_map(vm))
    slot = vm.gfn_to_memslot(0xE0000)
    con.print(
        f"gfn 0xe0000 -> slot {slot.id if slot else None}; gfn_to_hva = {vm.gfn_to_hva(0xE0000):#x}"
    )
    vm.check_invariants()
    return 0
