"""Errors. Every failure of a memslot call is a :class:`MemslotError` carrying the errno
the kernel returns for the same request."""

from __future__ import annotations

import errno as _errno
import os


class MemslotError(OSError):
    """A memslot operation failed; ``.errno`` is the kernel's errno (EINVAL, EEXIST, ...).

    It is an :class:`OSError`, so ``except OSError`` catches it as it catches a failed
    ioctl, and ``.strerror`` is the C library's text for the errno.

    >>> from errno import EEXIST
    >>> e = MemslotError(EEXIST, "gfn range overlaps slot 3")
    >>> e.errno, e.errno_name, isinstance(e, OSError)
    (17, 'EEXIST', True)
    >>> str(e)
    '[Errno 17] File exists: gfn range overlaps slot 3'
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
    """The symbolic name of an errno; 0 or None gives ``"OK"``.

    >>> errno_name(22), errno_name(0), errno_name(None)
    ('EINVAL', 'OK', 'OK')
    """
    if not err:
        return "OK"
    return _errno.errorcode.get(err, str(err))


class InvariantError(AssertionError):
    """A consistency check (``check_invariants()`` of a VM, a set or an index) found the
    structure corrupted. Raised explicitly, so the checks work under ``python -O`` too;
    an :class:`AssertionError`, so test runners report it as a failed check."""


def require(condition: object, message: str) -> None:
    """Raise :class:`InvariantError` with ``message`` unless ``condition`` is true (the
    checks' ``assert`` that ``-O`` cannot remove).

    >>> require(1 + 1 == 2, "arithmetic")
    >>> require([], "the list is empty")
    Traceback (most recent call last):
    ...
    memslots.errors.InvariantError: the list is empty
    """
    if not condition:
        raise InvariantError(message)


class KvmUnavailable(OSError):
    """``/dev/kvm`` (or another KVM device path) cannot be used, and why: raised by
    :class:`memslots.kvm.KvmVm` and :class:`memslots.kvm.abi.KvmSystem`, returned by
    :func:`memslots.kvm.abi.kvm_unavailable`, reported as is by every ``memslots``
    command. ``.errno`` is the failing call's errno (0 for a wrong API version),
    ``.path`` the device, ``.reason`` what is wrong and what to do about it; ``str()``
    is the one line ``PATH: REASON``.

    >>> import errno
    >>> str(KvmUnavailable(errno.EACCES, "/dev/kvm", "permission denied"))
    '/dev/kvm: permission denied'
    """

    def __init__(self, err: int, path: str, reason: str) -> None:
        super().__init__(err, reason)
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.errno, self.path, self.reason))
