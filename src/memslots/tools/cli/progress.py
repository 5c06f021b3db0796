"""Progress of a long run on standard error, as plain lines: what ``memslots bench``
and ``bench --dirty`` print when standard error is not a terminal (a terminal gets a
live bar), so that a run into a log still says every few seconds how far it got."""

from __future__ import annotations

import sys
import time

__all__ = ["PROGRESS_EVERY", "LineProgress", "stderr_is_terminal"]

#: seconds between progress lines
PROGRESS_EVERY = 5.0


class LineProgress:
    """:class:`memslots.tools.bench.Progress` as plain lines on standard error, for a
    standard error that is no terminal: ``memslots bench: per-operation sweep 12/56,
    40 s`` when a phase starts and then every ``every`` seconds (at a step's end)."""

    def __init__(self, command: str = "memslots bench", every: float = PROGRESS_EVERY) -> None:
        self.command = command
        self.every = every
        self._start = self._last = time.monotonic()
        self._description = ""
        self._total = 0
        self._done = 0

    def _say(self) -> None:
        self._last = now = time.monotonic()
        print(
            f"{self.command}: {self._description} {self._done}/{self._total}, "
            f"{now - self._start:.0f} s",
            file=sys.stderr,
            flush=True,
        )

    def phase(self, description: str, total: int) -> None:
        self._description, self._total, self._done = description, total, 0
        self._say()

    def advance(self, steps: int = 1) -> None:
        self._done += steps
        if time.monotonic() - self._last >= self.every:
            self._say()


def stderr_is_terminal() -> bool:
    """True when standard error is a terminal (a live bar), False otherwise (lines)."""
    try:
        return sys.stderr.isatty()
    except (ValueError, OSError):
        return False
