"""The ``memslots`` command line tool.

Each subcommand lives in its own module of this package and exposes
``register(subparsers)``, which adds its parser and sets ``func`` (a callable taking the
parsed namespace and returning an exit status). Errors reach the user as one line on
stderr and a non-zero exit status, never as a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from memslots.errors import MemslotError

#: subcommand modules, in the order ``memslots --help`` lists them
SUBCOMMANDS = ("replay", "record", "bench", "conform", "stress", "demo")


class CliError(Exception):
    """A user-facing error: printed as one line, exit status ``status``."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="memslots",
        description="KVM's tree-based memslots: replay traces, benchmark, check conformance.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        module = importlib.import_module(f"memslots.tools.cli.{name}")
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``memslots`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        status: int = args.func(args)
        return status
    except CliError as exc:
        print(f"memslots {args.command}: error: {exc}", file=sys.stderr)
        return exc.status
    except MemslotError as exc:
        print(f"memslots {args.command}: error: {exc.errno_name}: {exc.strerror}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"memslots {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"memslots {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
