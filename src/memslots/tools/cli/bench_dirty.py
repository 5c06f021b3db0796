"""``memslots bench --dirty``: the harvest cost of the dirty ring against
``KVM_GET_DIRTY_LOG`` of bitmaps (:mod:`memslots.tools.bench_dirty`), as a rich table."""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from memslots.tools import bench_dirty as _bench_dirty
from memslots.tools.bench_dirty import DirtyBenchResult
from memslots.tools.cli import console as cli_console

__all__ = ["print_dirty", "run_dirty"]

_METHODS = (
    ("engine_bitmap_s", "engine_ring_s", "engine"),
    ("kernel_bitmap_s", "kernel_ring_s", "kernel"),
)


def _ms(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds * 1e3:.3g} ms"


def print_dirty(result: DirtyBenchResult, console: Console) -> None:
    """The table: per scenario and side, bitmap and ring time and their ratio."""
    t = Table(
        title="Dirty-page harvest: GET_DIRTY_LOG of every slot + listing its bits, against "
        f"harvesting the vCPU ring + KVM_RESET_DIRTY_RINGS (best of {result.repeats})",
        title_justify="left",
    )
    for name in ("dirty set", "pages", "side", "bitmap", "ring", "bitmap/ring"):
        t.add_column(name, justify="left" if name in ("dirty set", "side") else "right")
    for scenario, r in result.scenarios.items():
        for bitmap_key, ring_key, side in _METHODS:
            if bitmap_key not in r:
                continue
            b, g = r[bitmap_key], r[ring_key]
            t.add_row(scenario, str(int(r["dirty_pages"])), side, _ms(b), _ms(g), f"{b / g:.1f}x")
    console.print(t)
    for note in result.notes:
        console.print(f"[yellow]note[/yellow]: {escape(note)}")


def run_dirty(args: argparse.Namespace) -> int:
    """Run the dirty-harvest benchmark for ``memslots bench --dirty`` (``--quick``: 3
    repetitions, else ``--repetitions`` or 10; ``--json FILE``)."""
    repeats = args.repetitions or (3 if args.quick else 10)
    console = cli_console()
    result = _bench_dirty.run(repeats)
    print_dirty(result, console)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result.to_json(), f, indent=2)
        console.print(f"results written to {args.json}")
    return 0
