"""Delta debugging (Zeller and Hildebrandt, "Simplifying and Isolating Failure-Inducing
Input", 2002): shrink a sequence to a 1-minimal one that still makes a test fail. Generic;
``memslots conform`` uses it to shrink operation sequences.

>>> ddmin(list(range(10)), lambda xs: 3 in xs and 7 in xs)
[3, 7]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

__all__ = ["ddmin"]

T = TypeVar("T")


def ddmin(items: Sequence[T], test: Callable[[list[T]], bool], *, budget: int = 5000) -> list[T]:
    """Zeller's delta debugging: a subsequence of ``items`` for which ``test`` still holds
    and from which no single item can be removed (1-minimal), if ``budget`` tests
    suffice (else the smallest found so far). ``test(list(items))`` must hold.

    Tries removing each of ``n`` chunks (complements first: the usual win is dropping
    unrelated operations), then keeping single chunks, doubling ``n`` when neither
    works. O(len^2) tests in the worst case, O(k log len) when k items matter.
    """
    current = list(items)
    n = 2
    tests = 0
    while len(current) >= 2 and tests < budget:
        size = -(-len(current) // n)
        chunks = [current[i : i + size] for i in range(0, len(current), size)]
        reduced = False
        for i in range(len(chunks)):
            complement = [x for j, c in enumerate(chunks) if j != i for x in c]
            tests += 1
            if test(complement):
                current, n, reduced = complement, max(n - 1, 2), True
                break
        if not reduced and len(chunks) > 2:
            for chunk in chunks:
                tests += 1
                if test(chunk):
                    current, n, reduced = chunk, 2, True
                    break
        if not reduced:
            if n >= len(current):
                break
            n = min(2 * n, len(current))
    return current
