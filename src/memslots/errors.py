"""Errors. Every failure of a memslot call is a :class:`MemslotError` carrying the errno
the kernel returns for the same request."""

from __future__ import annotations

import errno as _errno
import os


class MemslotError(OSError):
    """A memslot operation failed; ``.errno`` is the kernel's errno (EINVAL, EEXIST, ...).

    It is an :class:`OSError`, so ``except OSError`` catches it as it catches a failed
    ioctl, and ``.strerror`` is the C library's text for the errno.
    """

    def __init__(self, err: int, detail: str = "") -> None:
        text = os.strerror(err)
        super().__init__(err, f"{text}: {detail}" if detail else text)
        self.detail = detail

    @property
    def errno_name(self) -> str:
        """The symbolic errno name, e.g. ``"EINVAL"``."""
        return _errno.errorcode.get(self.errno or 0, str(self.errno))


def errno_name(err: int | None) -> str:
    """``errno_name(22) == "EINVAL"``; 0 or None gives ``"OK"``."""
    if not err:
        return "OK"
    return _errno.errorcode.get(err, str(err))


class InvariantError(AssertionError):
    """A consistency check (``check_invariants()`` of a VM, a set or an index) found the
    structure corrupted. Raised explicitly, so the checks work under ``python -O`` too;
    an :class:`AssertionError`, so test runners report it as a failed check."""


def require(condition: object, message: str) -> None:
    """Raise :class:`InvariantError` with ``message`` unless ``condition`` is true (the
    checks' ``assert`` that ``-O`` cannot remove)."""
    if not condition:
        raise InvariantError(message)
