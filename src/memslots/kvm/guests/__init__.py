"""Two tiny 16-bit real-mode guest programs, shipped as bytes.

Their assembly source (GNU as, Intel syntax) is beside this file: ``pattern.S`` and
``spin_read.S``, each with the commands that regenerate the bytes. Nothing needs an
assembler at run time; ``tests/test_kvm_abi.py`` re-assembles and compares when ``as`` and
``objcopy`` are installed.

Load a program anywhere in guest memory below 1 MiB and point the vCPU at it with
:meth:`memslots.kvm.vcpu.KvmVcpu.setup_real_mode`, passing the registers and segment
bases that :func:`pattern_writer_args` or :func:`spin_reader_args` build. Both programs
are position independent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

__all__ = [
    "PATTERN_DONE_PORT",
    "PATTERN_WRITER",
    "SPIN_CONTROL_PORT",
    "SPIN_READER",
    "SPIN_VALUE_PORT",
    "GuestArgs",
    "pattern_word",
    "pattern_writer_args",
    "spin_reader_args",
]

PATTERN_WRITER: Final = bytes.fromhex("89cae30e268905408cc381c300018ec3e2f289d0e710f4")
"""``pattern.S``: writes the 16-bit word ``AX + k`` at offset ``DI`` of page ``k`` for
``k`` in ``0 .. CX-1``, the pages starting at segment ``ES`` (one page = 0x100
paragraphs, so it reaches up to 1 MiB and crosses every slot the pages span), then does
``out 0x10, ax`` with the page count and halts. 6 instructions per page."""

SPIN_READER: Final = bytes.fromhex("668b0466e711e41284c074f4f4")
"""``spin_read.S``: loops reading the 32-bit value at ``DS:SI``, reporting each value with
``out 0x11, eax`` and asking ``in al, 0x12`` whether to stop (0 = read again, else HLT).
``DS`` is never reloaded, so its base may be any gpa below 4 GiB. A read of a gpa without
a slot arrives first as a 4-byte MMIO read; the answer is what the guest reports."""

#: port of the pattern writer's final report (2 bytes: pages written)
PATTERN_DONE_PORT: Final = 0x10
#: port of the spin reader's value reports (4 bytes per read)
SPIN_VALUE_PORT: Final = 0x11
#: port the spin reader reads its stop flag from (1 byte; non-zero halts)
SPIN_CONTROL_PORT: Final = 0x12

_PAGE: Final = 4096
_REAL_MODE_LIMIT: Final = 0x100000


@dataclass(frozen=True, slots=True)
class GuestArgs:
    """Register values and segment bases for ``KvmVcpu.setup_real_mode(entry,
    regs=args.regs, segments=args.segments)``."""

    regs: dict[str, int] = field(default_factory=dict)
    segments: dict[str, int] = field(default_factory=dict)


def pattern_word(first_word: int, page: int) -> int:
    """The word :data:`PATTERN_WRITER` leaves in page number ``page`` (0-based)."""
    return (first_word + page) & 0xFFFF


def pattern_writer_args(
    first_gpa: int, pages: int, *, first_word: int = 0xA000, offset: int = 0
) -> GuestArgs:
    """Arguments for :data:`PATTERN_WRITER`: ``pages`` pages from the page-aligned
    ``first_gpa``, all below 1 MiB; the word goes at ``offset`` in each page."""
    if first_gpa % _PAGE or first_gpa < 0:
        raise ValueError(f"first_gpa {first_gpa:#x} is not page-aligned")
    if pages < 0 or first_gpa + pages * _PAGE > _REAL_MODE_LIMIT:
        raise ValueError(f"{pages} pages from {first_gpa:#x} do not stay below 1 MiB")
    if not 0 <= offset <= _PAGE - 2:
        raise ValueError(f"offset {offset} does not leave a word inside the page")
    return GuestArgs(
        regs={"rax": first_word & 0xFFFF, "rcx": pages, "rdi": offset},
        segments={"es": first_gpa},
    )


def spin_reader_args(gpa: int) -> GuestArgs:
    """Arguments for :data:`SPIN_READER` reading the 32-bit value at ``gpa`` (below
    4 GiB): DS gets the page's base, SI the offset inside it."""
    if not 0 <= gpa <= (1 << 32) - 4:
        raise ValueError(f"gpa {gpa:#x} is not below 4 GiB")
    base = gpa & ~(_PAGE - 1)
    return GuestArgs(regs={"rsi": gpa - base}, segments={"ds": base})
