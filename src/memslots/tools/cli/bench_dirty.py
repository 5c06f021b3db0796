"""``memslots bench --dirty``: the harvest cost of the dirty ring against
``KVM_GET_DIRTY_LOG`` of bitmaps (:mod:`memslots.tools.bench_dirty`), as a rich table."""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from memslots.tools import bench_dirty as _bench_dirty
from memslots.tools.bench import spread
from memslots.tools.bench_dirty import DirtyBenchResult
from memslots.tools.cli import CliError
from memslots.tools.cli import console as cli_console
from memslots.tools.cli.progress import LineProgress

__all__ = ["print_dirty", "run_dirty"]

_METHODS = (
    ("engine_bitmap_s", "engine_ring_s", "engine"),
    ("kernel_bitmap_s", "kernel_ring_s", "kernel"),
)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3g} ms"


def print_dirty(result: DirtyBenchResult, console: Console) -> None:
    """The title line, the table (per scenario and side, bitmap and ring time and their
    ratio), the spread of the repetitions and the notes."""
    what = "one repetition" if result.repeats == 1 else f"median of {result.repeats} repetitions"
    console.print(
        "[bold]Dirty-page harvest: GET_DIRTY_LOG of every slot + listing its bits, against "
        f"harvesting the vCPU ring + KVM_RESET_DIRTY_RINGS ({what})[/bold]",
        highlight=False,
        soft_wrap=True,
    )
    t = Table()
    for name in ("dirty set", "pages", "side", "bitmap", "ring", "bitmap/ring"):
        t.add_column(name, justify="left" if name in ("dirty set", "side") else "right")
    widest = (0.0, "")
    for scenario, r in result.scenarios.items():
        for bitmap_key, ring_key, side in _METHODS:
            if bitmap_key not in r:
                continue
            b, g = r[bitmap_key], r[ring_key]
            t.add_row(scenario, str(int(r["dirty_pages"])), side, _ms(b), _ms(g), f"{b / g:.1f}x")
            for key in (bitmap_key, ring_key):
                runs = result.runs.get(scenario, {}).get(key, [])
                widest = max(widest, (spread(runs), f"{side} {key.split('_')[1]}, {scenario}"))
    console.print(t)
    if result.repeats > 1:
        console.print(
            f"[dim]spread over the {result.repeats} repetitions, (max - min) / median: "
            f"{widest[0]:.0%} at most ({escape(widest[1])})[/dim]",
            highlight=False,
            soft_wrap=True,
        )
    for note in result.notes:
        console.print(f"[yellow]note[/yellow]: {escape(note)}", highlight=False, soft_wrap=True)


def run_dirty(args: argparse.Namespace) -> int:
    """Run the dirty-harvest benchmark for ``memslots bench --dirty`` (``--quick``: 3
    repetitions, else ``--repetitions`` or 10; ``--json FILE``)."""
    repeats = args.repetitions if args.repetitions is not None else 3 if args.quick else 10
    if not 1 <= repeats <= 1000:
        raise CliError(f"repetitions must be in 1..1000, not {repeats}")
    console = cli_console()
    progress = None if args.no_progress else LineProgress("memslots bench --dirty")
    result = _bench_dirty.run(repeats, progress=progress)
    print_dirty(result, console)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result.to_json(), f, indent=2)
        console.print(f"results written to {args.json}")
    return 0
