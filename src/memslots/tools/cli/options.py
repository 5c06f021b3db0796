"""argparse types for numeric options with a range.

Every numeric option of the tool has a range; these types check it while argparse
parses, so that a value out of range is a one-line usage error with exit status 2::

    memslots bench: error: argument --slots: 2: must be in 4..32764 (memslots bench
    --help lists the options)

``int_range(4, 32764)`` accepts the integers 4 to 32764 (both included);
``float_range(0.0, 60.0)`` accepts the finite numbers from 0 to 60 (both included;
``nan`` and ``inf`` are refused).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

__all__ = ["float_range", "int_range"]


def _bound(value: float) -> str:
    """A bound as the messages show it: ``60``, ``0.5``, ``1e+06``."""
    return f"{value:g}"


def int_range(lo: int, hi: int, *, what: str = "") -> Callable[[str], int]:
    """An argparse ``type`` accepting the integers ``lo..hi`` (inclusive).

    The error is ``N: must be in LO..HI`` (followed by `` (what)`` when ``what`` is
    given, e.g. ``what="slots per address space"``); a text that is no integer gives
    ``not an integer: 'TEXT'``.
    """
    if lo > hi:
        raise ValueError(f"empty range {lo}..{hi}")
    tail = f" ({what})" if what else ""

    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{value}: must be in {lo}..{hi}{tail}")
        return value

    parse.__name__ = f"int {lo}..{hi}"  # what argparse names in its own messages
    return parse


def float_range(lo: float, hi: float) -> Callable[[str], float]:
    """An argparse ``type`` accepting the finite numbers ``lo..hi`` (inclusive).

    The error is ``N: must be in LO..HI``; ``nan``, ``inf`` and a text that is no number
    give ``not a number: 'TEXT'`` or the range error.
    """
    if not lo <= hi:
        raise ValueError(f"empty range {lo}..{hi}")

    def parse(text: str) -> float:
        try:
            value = float(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if math.isnan(value) or not lo <= value <= hi:
            raise argparse.ArgumentTypeError(
                f"{text.strip()}: must be in {_bound(lo)}..{_bound(hi)}"
            )
        return value

    parse.__name__ = f"number {_bound(lo)}..{_bound(hi)}"
    return parse
