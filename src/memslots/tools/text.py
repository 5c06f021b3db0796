"""How the tools write sizes and counts: one formatter for each, used by every command's
text, the replay report and the memory-map pictures, so that a size or a count reads the
same everywhere (``16 MiB``, ``1 slot``, ``2 slots``)."""

from __future__ import annotations

__all__ = ["plural", "size_text"]

#: binary units, largest first: (name, shift)
_UNITS = (("EiB", 60), ("PiB", 50), ("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10))


def size_text(n: int) -> str:
    """A size in bytes as people read it: exact in the largest unit that divides ``n``
    (while that takes fewer than six digits), else one decimal in the largest unit not
    above ``n``; bytes below 1 KiB. O(1).

    >>> size_text(0xB000), size_text(640 << 10), size_text(16 << 20), size_text(3 << 30)
    ('44 KiB', '640 KiB', '16 MiB', '3 GiB')
    >>> size_text(0x1FF40000), size_text(1536 << 10), size_text(0), size_text(100)
    ('511.2 MiB', '1536 KiB', '0 B', '100 B')
    """
    for unit, shift in _UNITS:
        if n and n % (1 << shift) == 0 and (n >> shift) < 100_000:
            return f"{n >> shift} {unit}"
    for unit, shift in _UNITS:
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} B"


def plural(n: int, word: str, many: str | None = None) -> str:
    """``n`` and ``word``, in the plural unless ``n`` is 1 (``many``, default ``word`` +
    ``s``). O(1).

    >>> plural(1, "slot"), plural(2, "slot"), plural(0, "VM"), plural(3, "memslot call")
    ('1 slot', '2 slots', '0 VMs', '3 memslot calls')
    >>> plural(2, "address space"), plural(2, "match", "matches")
    ('2 address spaces', '2 matches')
    """
    return f"{n} {word if n == 1 else (many or word + 's')}"
