"""Guest memory access (placeholder until issue 4 lands)."""

from __future__ import annotations

from errno import EFAULT
from typing import TYPE_CHECKING

from memslots.errors import MemslotError

if TYPE_CHECKING:
    from memslots.vm import Vm


class HostMemory:
    """Placeholder."""


def read_guest(vm: Vm, gpa: int, length: int) -> bytes:
    """Placeholder."""
    raise MemslotError(EFAULT, "guest memory access is not implemented yet")


def write_guest(vm: Vm, gpa: int, data: bytes | bytearray | memoryview) -> None:
    """Placeholder."""
    raise MemslotError(EFAULT, "guest memory access is not implemented yet")


def clear_guest(vm: Vm, gpa: int, length: int) -> None:
    """Placeholder."""
    raise MemslotError(EFAULT, "guest memory access is not implemented yet")
