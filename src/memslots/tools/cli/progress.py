"""Progress of a long run on standard error, as plain lines: what ``memslots bench``,
``bench --dirty``, ``conform`` and ``replay`` print when standard error is not a terminal
(a terminal gets a live bar), so that a run into a log still says every few seconds how
far it got."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable

__all__ = ["PROGRESS_EVERY", "LineProgress", "ProgressLines", "stderr_is_terminal"]

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


class ProgressLines:
    """Plain progress lines for a run without phases (``conform``, ``replay``):
    ``say(text)`` prints ``COMMAND: TEXT`` on standard error when :data:`PROGRESS_EVERY`
    seconds have passed since the start or the last line, else nothing; ``text`` may be
    a callable, only called then. Nothing at all unless ``enabled`` (a terminal has its
    bar). O(1) a call."""

    def __init__(self, command: str, *, enabled: bool = True) -> None:
        self.command = command
        self.enabled = enabled
        self._last = time.monotonic()

    def say(self, text: str | Callable[[], str]) -> None:
        """Print ``COMMAND: TEXT`` if a line is due."""
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < PROGRESS_EVERY:
            return
        self._last = now
        line = f"{self.command}: {text() if callable(text) else text}"
        with contextlib.suppress(OSError, ValueError):  # standard error closed or full
            print(line, file=sys.stderr, flush=True)


def stderr_is_terminal() -> bool:
    """True when standard error is a terminal (a live bar), False otherwise (lines)."""
    try:
        return sys.stderr.isatty()
    except (ValueError, OSError):
        return False
