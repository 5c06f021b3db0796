"""``python -m memslots`` and the ``memslots`` console script: the command line of
:mod:`memslots.tools.cli`.

The command line is imported inside :func:`main`, so Ctrl-C at any moment, while the
modules load too, ends in one line ``memslots: interrupted`` and exit status 130, never a
traceback (the package's ``__init__`` imports nothing heavy, see :mod:`memslots`).
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence


def _interrupted() -> int:
    try:
        if sys.stderr is not None:
            sys.stderr.write("memslots: interrupted\n")
            sys.stderr.flush()
    except (OSError, ValueError):
        pass
    return 130


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); the exit status.
    A ``KeyboardInterrupt`` while the command line loads is status 130 too."""
    try:
        from memslots.tools.cli import main as cli_main

        return cli_main(argv)
    except KeyboardInterrupt:
        return _interrupted()


def console() -> int:
    """The ``memslots`` console script: :func:`main`, then SIGINT back to its default
    action, so that a Ctrl-C while the interpreter shuts down ends the process by the
    signal (status 130 in the shell), silently."""
    status = 130
    try:
        try:
            status = main()
        finally:
            _default_sigint()
    except KeyboardInterrupt:
        _default_sigint()
        status = _interrupted()
    return status


def _default_sigint() -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(console())
