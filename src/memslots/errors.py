"""Errors. Every failure of a memslot call is a :class:`MemslotError` carrying the errno
the kernel returns for the same request."""

from __future__ import annotations

import errno as _errno
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from memslots.slot import Memslot


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why the kernel refuses a call, as the engine knows it: ``check`` is a stable
    identifier of the check that failed (``"overlap"``, ``"hva-unaligned"``, ...; the
    list is in docs/check.md), ``function`` the kernel function that makes it
    (``"virt/kvm/kvm_main.c: kvm_set_memory_region"``), and ``slot`` the slot concerned
    when there is one (the slot in the way of an overlapping range, the slot a request
    tried to change).
    """

    check: str
    function: str
    slot: Memslot | None = None


class MemslotError(OSError):
    """A memslot operation failed; ``.errno`` is the kernel's errno (EINVAL, EEXIST, ...).

    It is an :class:`OSError`, so ``except OSError`` catches it as it catches a failed
    ioctl, and ``.strerror`` is the C library's text for the errno. ``.detail`` is the
    reason in words and ``.refusal`` (a :class:`Refusal`, or None) the kernel check that
    refused the call; ``str()`` puts the reason first.

    >>> from errno import EEXIST
    >>> e = MemslotError(EEXIST, "gfn range overlaps slot 3")
    >>> e.errno, e.errno_name, isinstance(e, OSError)
    (17, 'EEXIST', True)
    >>> str(e)
    'gfn range overlaps slot 3 (EEXIST)'
    >>> str(MemslotError(EEXIST))
    'EEXIST: File exists'
    """

    def __init__(self, err: int, detail: str = "", refusal: Refusal | None = None) -> None:
        text = os.strerror(err)
        super().__init__(err, f"{text}: {detail}" if detail else text)
        self.detail = detail
        self.refusal = refusal

    def __str__(self) -> str:
        name = self.errno_name
        return f"{self.detail} ({name})" if self.detail else f"{name}: {self.strerror}"

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.errno, self.detail, self.refusal))

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
