"""Three tiny 16-bit real-mode guest programs, shipped as bytes.

Their assembly source (GNU as, Intel syntax) is beside this file: ``pattern.S``,
``spin_read.S`` and ``stride.S``, each with the commands that regenerate the bytes. Nothing needs an
assembler at run time; ``tests/test_kvm_abi.py`` re-assembles and compares when ``as`` and
``objcopy`` are installed.

Load a program anywhere in guest memory below 1 MiB and point the vCPU at it with
:meth:`memslots.kvm.vcpu.KvmVcpu.setup_real_mode`, passing the registers and segment
bases that :func:`pattern_writer_args`, :func:`spin_reader_args` or
:func:`stride_writer_args` build (at ``entry + args.entry_offset``, with
``big_real_mode=args.big_real_mode``). All are position independent.
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
    "STRIDE_DONE_PORT",
    "STRIDE_EXITING_ENTRY",
    "STRIDE_WRITER",
    "STRIDE_WRITE_PORT",
    "GuestArgs",
    "pattern_word",
    "pattern_writer_args",
    "spin_reader_args",
    "stride_writer_args",
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

STRIDE_WRITER: Final = bytes.fromhex(
    "6631d267e30d266789074066426601df67e2f385ed75066689d066e710f4"
    "6631d267e3ef26678907e7134066426601df67e2f1ebde"
)
"""``stride.S``: writes the word ``AX + k`` at gpa ``EDI + k * EBX`` (32-bit, modulo
2^32) for ``k`` in ``0 .. ECX-1``, in big real mode (every gpa below 4 GiB), then does
``out 0x10, eax`` with the number of writes (unless ``BP`` is not 0) and halts. 5
instructions per write from offset 0; from :data:`STRIDE_EXITING_ENTRY` also
``out 0x13, ax`` after each write (an exit to userspace per write)."""

#: offset of ``stride_writer_exiting`` in :data:`STRIDE_WRITER`
STRIDE_EXITING_ENTRY: Final = 0x1E
#: port of the stride writer's final report (4 bytes: writes made)
STRIDE_DONE_PORT: Final = 0x10
#: port of the exiting stride writer's per-write report (2 bytes: the word written)
STRIDE_WRITE_PORT: Final = 0x13

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
    """Register values and segment bases for ``KvmVcpu.setup_real_mode(entry +
    args.entry_offset, regs=args.regs, segments=args.segments,
    big_real_mode=args.big_real_mode)``."""

    regs: dict[str, int] = field(default_factory=dict)
    segments: dict[str, int] = field(default_factory=dict)
    #: where to start in the program, from its first byte
    entry_offset: int = 0
    #: the program uses 32-bit addresses and needs 4 GiB segment limits
    big_real_mode: bool = False


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


def stride_writer_args(
    first_gpa: int,
    count: int,
    *,
    stride: int = _PAGE,
    first_word: int = 0xA000,
    exit_each_write: bool = False,
    report: bool = True,
) -> GuestArgs:
    """Arguments for :data:`STRIDE_WRITER`: ``count`` writes of a word, the first at
    ``first_gpa`` (below 4 GiB, at most 4094 into its page), each ``stride`` bytes
    (may be 0 or negative; added modulo 2^32) after the one before. With
    ``exit_each_write`` the program starts at :data:`STRIDE_EXITING_ENTRY`; without
    ``report`` it halts right after the last write, with no final OUT."""
    if not 0 <= first_gpa < 1 << 32 or first_gpa % _PAGE > _PAGE - 2:
        raise ValueError(f"first_gpa {first_gpa:#x} is not below 4 GiB with a word in its page")
    if not 0 <= count < 1 << 32:
        raise ValueError(f"count {count} does not fit 32 bits")
    if not -(1 << 31) <= stride < 1 << 32:
        raise ValueError(f"stride {stride} does not fit 32 bits")
    return GuestArgs(
        regs={
            "rax": first_word & 0xFFFF,
            "rcx": count,
            "rdi": first_gpa,
            "rbx": stride & 0xFFFFFFFF,
            "rbp": 0 if report else 1,
        },
        segments={"es": 0},
        entry_offset=STRIDE_EXITING_ENTRY if exit_each_write else 0,
        big_real_mode=True,
    )
