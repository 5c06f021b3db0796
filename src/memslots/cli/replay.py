"""`memslots replay` (not implemented yet)."""

from __future__ import annotations

import argparse
from typing import Any

from memslots.cli import CliError


def register(sub: Any) -> None:
    """Add the `replay` subcommand."""
    p = sub.add_parser("replay", help="(not implemented yet)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the subcommand."""
    raise CliError("not implemented yet")
