"""The Linux tracing primitives ``memslots record`` is built on, through ctypes (x86-64).

Named as in the kernel's ``include/uapi/linux/ptrace.h``, ``seccomp.h`` and ``filter.h``:

* :func:`ptrace` and the request and option constants (``PTRACE_SEIZE``,
  ``PTRACE_O_TRACESECCOMP``...), :func:`get_syscall_info` (``PTRACE_GET_SYSCALL_INFO``,
  Linux 5.3+) and :func:`get_event_msg`;
* :func:`seccomp_filter`, a classic-BPF program that makes the kernel stop a traced
  process (``SECCOMP_RET_TRACE``) only on the system calls given, with an optional list of
  allowed values for one argument (the ioctl request numbers, the madvise advice), and lets
  every other call run at full speed (``SECCOMP_RET_ALLOW``); :func:`install_seccomp`
  installs it in the calling process;
* :func:`read_memory`: ``process_vm_readv`` of another process's memory, the only way this
  package reads a traced process (a bad address is an :class:`OSError`, never a crash);
* :func:`kcmp_file`: whether two descriptors (of two processes) are the same open file.

Every call raises :class:`OSError` with the kernel's errno when it fails.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
from collections.abc import Iterable, Sequence
from typing import Final

__all__ = [
    "AUDIT_ARCH_X86_64",
    "PTRACE_EVENT_CLONE",
    "PTRACE_EVENT_EXEC",
    "PTRACE_EVENT_FORK",
    "PTRACE_EVENT_SECCOMP",
    "PTRACE_EVENT_STOP",
    "PTRACE_EVENT_VFORK",
    "BpfRule",
    "SyscallInfo",
    "get_event_msg",
    "get_syscall_info",
    "install_seccomp",
    "kcmp_file",
    "ptrace",
    "read_memory",
    "seccomp_filter",
]

# --------------------------------------------------------------------------- ptrace.h

PTRACE_TRACEME: Final = 0
PTRACE_CONT: Final = 7
PTRACE_KILL: Final = 8
PTRACE_DETACH: Final = 17
PTRACE_SYSCALL: Final = 24
PTRACE_SETOPTIONS: Final = 0x4200
PTRACE_GETEVENTMSG: Final = 0x4201
PTRACE_GETSIGINFO: Final = 0x4202
PTRACE_SEIZE: Final = 0x4206
PTRACE_INTERRUPT: Final = 0x4207
PTRACE_LISTEN: Final = 0x4208
PTRACE_GET_SYSCALL_INFO: Final = 0x420E
#: the requests above by number, for messages
_REQUEST_NAMES: Final = {
    PTRACE_TRACEME: "PTRACE_TRACEME",
    PTRACE_CONT: "PTRACE_CONT",
    PTRACE_KILL: "PTRACE_KILL",
    PTRACE_DETACH: "PTRACE_DETACH",
    PTRACE_SYSCALL: "PTRACE_SYSCALL",
    PTRACE_SETOPTIONS: "PTRACE_SETOPTIONS",
    PTRACE_GETEVENTMSG: "PTRACE_GETEVENTMSG",
    PTRACE_GETSIGINFO: "PTRACE_GETSIGINFO",
    PTRACE_SEIZE: "PTRACE_SEIZE",
    PTRACE_INTERRUPT: "PTRACE_INTERRUPT",
    PTRACE_LISTEN: "PTRACE_LISTEN",
    PTRACE_GET_SYSCALL_INFO: "PTRACE_GET_SYSCALL_INFO",
}

PTRACE_O_TRACESYSGOOD: Final = 1
PTRACE_O_TRACEFORK: Final = 1 << 1
PTRACE_O_TRACEVFORK: Final = 1 << 2
PTRACE_O_TRACECLONE: Final = 1 << 3
PTRACE_O_TRACEEXEC: Final = 1 << 4
PTRACE_O_TRACEEXIT: Final = 1 << 6
PTRACE_O_TRACESECCOMP: Final = 1 << 7
PTRACE_O_EXITKILL: Final = 1 << 20

PTRACE_EVENT_FORK: Final = 1
PTRACE_EVENT_VFORK: Final = 2
PTRACE_EVENT_CLONE: Final = 3
PTRACE_EVENT_EXEC: Final = 4
PTRACE_EVENT_EXIT: Final = 6
PTRACE_EVENT_SECCOMP: Final = 7
PTRACE_EVENT_STOP: Final = 128

PTRACE_SYSCALL_INFO_NONE: Final = 0
PTRACE_SYSCALL_INFO_ENTRY: Final = 1
PTRACE_SYSCALL_INFO_EXIT: Final = 2
PTRACE_SYSCALL_INFO_SECCOMP: Final = 3

#: ``waitpid`` option: wait for every child, threads included (``__WALL``)
WALL: Final = 0x40000000

#: ``AUDIT_ARCH_X86_64`` (``include/uapi/linux/audit.h``)
AUDIT_ARCH_X86_64: Final = 0xC000003E
#: the x32 ABI's bit in a system call number
X32_SYSCALL_BIT: Final = 0x40000000

# x86-64 system call numbers (arch/x86/entry/syscalls/syscall_64.tbl)
SYS_MUNMAP: Final = 11
SYS_IOCTL: Final = 16
SYS_MREMAP: Final = 25
SYS_MADVISE: Final = 28
SYS_KCMP: Final = 312
SYS_SECCOMP: Final = 317

_libc = ctypes.CDLL(None, use_errno=True)
_ptrace = _libc.ptrace
_ptrace.argtypes = (ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
_ptrace.restype = ctypes.c_long
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_prctl = _libc.prctl
_prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
_prctl.restype = ctypes.c_int


def _raise(what: str) -> None:
    err = ctypes.get_errno()
    raise OSError(err, f"{what}: {os.strerror(err)}")


def request_name(request: int) -> str:
    """``"PTRACE_SEIZE"`` for 0x4206: the name of a ptrace request this module knows, else
    its number in hex. O(1)."""
    return _REQUEST_NAMES.get(request, f"{request:#x}")


def ptrace(request: int, pid: int, addr: int = 0, data: int = 0) -> int:
    """``ptrace(request, pid, addr, data)``; the result, or OSError with the errno (its
    text names the request: ``ptrace(PTRACE_SEIZE, 1): Operation not permitted``). O(1)."""
    ret: int = _ptrace(request, pid, addr or None, data or None)
    if ret == -1:
        _raise(f"ptrace({request_name(request)}, {pid})")
    return ret


def get_event_msg(pid: int) -> int:
    """``PTRACE_GETEVENTMSG``: the new tid of a clone/fork event, the former tid of an exec
    event. O(1)."""
    msg = ctypes.c_ulong(0)
    ptrace(PTRACE_GETEVENTMSG, pid, 0, ctypes.addressof(msg))
    return msg.value


class _Entry(ctypes.Structure):
    _fields_ = (("nr", ctypes.c_uint64), ("args", ctypes.c_uint64 * 6))


class _Exit(ctypes.Structure):
    _fields_ = (("rval", ctypes.c_int64), ("is_error", ctypes.c_uint8))


class _Seccomp(ctypes.Structure):
    _fields_ = (
        ("nr", ctypes.c_uint64),
        ("args", ctypes.c_uint64 * 6),
        ("ret_data", ctypes.c_uint32),
    )


class _Union(ctypes.Union):
    _fields_ = (("entry", _Entry), ("exit", _Exit), ("seccomp", _Seccomp))


class ptrace_syscall_info(ctypes.Structure):
    """``struct ptrace_syscall_info`` (88 bytes)."""

    _fields_ = (
        ("op", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
        ("arch", ctypes.c_uint32),
        ("instruction_pointer", ctypes.c_uint64),
        ("stack_pointer", ctypes.c_uint64),
        ("u", _Union),
    )


assert ctypes.sizeof(ptrace_syscall_info) == 88


@dataclasses.dataclass(frozen=True, slots=True)
class SyscallInfo:
    """What ``PTRACE_GET_SYSCALL_INFO`` says of a stopped thread: ``op`` (``ENTRY``,
    ``EXIT``, ``SECCOMP`` or ``NONE``), the architecture, and for entry and seccomp stops
    the call number and its six arguments, for exit stops the return value (``rval``, a
    negative errno when ``is_error``)."""

    op: int
    arch: int
    nr: int = -1
    args: tuple[int, ...] = ()
    rval: int = 0
    is_error: bool = False


def get_syscall_info(pid: int) -> SyscallInfo:
    """``PTRACE_GET_SYSCALL_INFO`` of the stopped thread ``pid`` (Linux 5.3+). O(1)."""
    info = ptrace_syscall_info()
    ptrace(PTRACE_GET_SYSCALL_INFO, pid, ctypes.sizeof(info), ctypes.addressof(info))
    if info.op == PTRACE_SYSCALL_INFO_EXIT:
        return SyscallInfo(
            info.op, info.arch, rval=info.u.exit.rval, is_error=bool(info.u.exit.is_error)
        )
    if info.op == PTRACE_SYSCALL_INFO_ENTRY:
        return SyscallInfo(info.op, info.arch, info.u.entry.nr, tuple(info.u.entry.args))
    if info.op == PTRACE_SYSCALL_INFO_SECCOMP:
        return SyscallInfo(info.op, info.arch, info.u.seccomp.nr, tuple(info.u.seccomp.args))
    return SyscallInfo(info.op, info.arch)


# --------------------------------------------------------------------------- memory


class _iovec(ctypes.Structure):
    _fields_ = (("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t))


_process_vm_readv = _libc.process_vm_readv
_process_vm_readv.argtypes = (
    ctypes.c_int,
    ctypes.POINTER(_iovec),
    ctypes.c_ulong,
    ctypes.POINTER(_iovec),
    ctypes.c_ulong,
    ctypes.c_ulong,
)
_process_vm_readv.restype = ctypes.c_ssize_t

#: most bytes :func:`read_memory` reads in one call (a dirty bitmap of 2^31 pages is 256 MiB)
MAX_READ: Final = 1 << 28


def read_memory(pid: int, addr: int, size: int) -> bytes:
    """``size`` bytes at ``addr`` in process ``pid`` (``process_vm_readv``). Raises
    OSError (EFAULT for an unmapped address, ESRCH for a process that is gone, EIO for a
    short read) and ValueError for a size over :data:`MAX_READ`. O(size)."""
    if size == 0:
        return b""
    if not 0 < size <= MAX_READ:
        raise ValueError(f"cannot read {size} bytes of another process")
    if not 0 <= addr < 1 << 64 or addr + size > 1 << 64:
        raise OSError(14, "bad address")
    buf = ctypes.create_string_buffer(size)
    local = _iovec(ctypes.cast(buf, ctypes.c_void_p), size)
    remote = _iovec(addr, size)
    got = _process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    if got < 0:
        _raise(f"process_vm_readv({pid}, {addr:#x}, {size})")
    if got != size:
        raise OSError(5, f"process_vm_readv({pid}, {addr:#x}, {size}): short read of {got}")
    return buf.raw


def kcmp_file(pid1: int, fd1: int, pid2: int, fd2: int) -> bool:
    """Whether ``fd1`` of ``pid1`` and ``fd2`` of ``pid2`` are the same open file
    (``kcmp(KCMP_FILE)``: a ``dup`` or an fd inherited across fork is; two opens of one
    path are not). False when either fd is not open. Raises OSError (ENOSYS) on kernels
    without ``CONFIG_KCMP``. O(1)."""
    ret = _syscall(
        ctypes.c_long(SYS_KCMP),
        ctypes.c_int(pid1),
        ctypes.c_int(pid2),
        ctypes.c_int(0),  # KCMP_FILE
        ctypes.c_ulong(fd1),
        ctypes.c_ulong(fd2),
    )
    if ret == -1:
        err = ctypes.get_errno()
        if err == 9:  # EBADF: one of them is not open
            return False
        _raise("kcmp")
    return bool(ret == 0)


# --------------------------------------------------------------------------- seccomp

# classic BPF (include/uapi/linux/filter.h, bpf_common.h)
_BPF_LD_W_ABS: Final = 0x20
_BPF_JEQ_K: Final = 0x15
_BPF_RET_K: Final = 0x06

SECCOMP_RET_ALLOW: Final = 0x7FFF0000
SECCOMP_RET_TRACE: Final = 0x7FF00000
SECCOMP_SET_MODE_FILTER: Final = 1
PR_SET_NO_NEW_PRIVS: Final = 38

# offsets in struct seccomp_data
_NR: Final = 0
_ARCH: Final = 4


def _arg_low(index: int) -> int:
    """Offset of the low 32 bits of argument ``index`` (little-endian)."""
    return 16 + 8 * index


class sock_filter(ctypes.Structure):
    """``struct sock_filter``: one classic-BPF instruction."""

    _fields_ = (
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    )


class sock_fprog(ctypes.Structure):
    """``struct sock_fprog``: a BPF program."""

    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.POINTER(sock_filter)))


@dataclasses.dataclass(frozen=True, slots=True)
class BpfRule:
    """Stop on system call ``nr``: always (``arg`` None), or only when the low 32 bits of
    argument ``arg`` are one of ``values`` (the kernel's ioctl ``cmd`` and madvise
    ``advice`` are 32-bit)."""

    nr: int
    arg: int | None = None
    values: tuple[int, ...] = ()


def seccomp_filter(rules: Sequence[BpfRule]) -> list[tuple[int, int, int, int]]:
    """The BPF program, as ``(code, jt, jf, k)`` instructions, that answers
    ``SECCOMP_RET_TRACE`` for the calls ``rules`` select and ``SECCOMP_RET_ALLOW`` for
    everything else (other architectures and the x32 ABI included: x32 call numbers have
    :data:`X32_SYSCALL_BIT` set and never equal an x86-64 one). The program is
    O(rules + values) instructions; the kernel runs it on every system call of the
    filtered process, without a context switch.

    Layout: check the architecture; one ``JEQ nr`` per rule, to ``TRACE`` or to the
    rule's argument block; ``ALLOW``; the argument blocks (``LD arg``, one ``JEQ`` per
    value to ``TRACE``, ``ALLOW``); ``TRACE``.
    """
    n = len(rules)
    dispatch = 4  # first JEQ nr
    block_at: dict[int, int] = {}
    pc = dispatch + n + 1
    for i, rule in enumerate(rules):
        if rule.arg is not None:
            block_at[i] = pc
            pc += len(rule.values) + 2
    trace_at = pc

    def jump(frm: int, to: int) -> int:
        off = to - (frm + 1)
        if not 0 <= off < 256:
            raise ValueError("seccomp filter too long for 8-bit jumps")
        return off

    prog: list[tuple[int, int, int, int]] = [
        (_BPF_LD_W_ABS, 0, 0, _ARCH),
        (_BPF_JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
        (_BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),
        (_BPF_LD_W_ABS, 0, 0, _NR),
    ]
    for i, rule in enumerate(rules):
        target = block_at.get(i, trace_at)
        prog.append((_BPF_JEQ_K, jump(len(prog), target), 0, rule.nr))
    prog.append((_BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW))
    for i, rule in enumerate(rules):
        if rule.arg is None:
            continue
        assert len(prog) == block_at[i]
        prog.append((_BPF_LD_W_ABS, 0, 0, _arg_low(rule.arg)))
        for value in rule.values:
            prog.append((_BPF_JEQ_K, jump(len(prog), trace_at), 0, value & 0xFFFFFFFF))
        prog.append((_BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW))
    prog.append((_BPF_RET_K, 0, 0, SECCOMP_RET_TRACE))
    return prog


def run_filter(prog: Sequence[tuple[int, int, int, int]], data: bytes) -> int:
    """Interpret ``prog`` on a ``struct seccomp_data`` (``data``), as the kernel would:
    for tests of :func:`seccomp_filter`. O(instructions)."""
    pc = 0
    acc = 0
    while True:
        code, jt, jf, k = prog[pc]
        if code == _BPF_LD_W_ABS:
            acc = int.from_bytes(data[k : k + 4], "little")
            pc += 1
        elif code == _BPF_JEQ_K:
            pc += 1 + (jt if acc == k else jf)
        elif code == _BPF_RET_K:
            return k
        else:  # pragma: no cover - seccomp_filter emits nothing else
            raise ValueError(f"unknown BPF code {code:#x}")


def seccomp_data(nr: int, args: Iterable[int] = (), arch: int = AUDIT_ARCH_X86_64) -> bytes:
    """A ``struct seccomp_data`` for :func:`run_filter`."""
    values = [*args, 0, 0, 0, 0, 0, 0][:6]
    return (
        nr.to_bytes(4, "little", signed=nr < 0)
        + arch.to_bytes(4, "little")
        + bytes(8)
        + b"".join(v.to_bytes(8, "little") for v in values)
    )


def install_seccomp(prog: Sequence[tuple[int, int, int, int]]) -> None:
    """Install ``prog`` as a seccomp filter of the calling thread (inherited by its
    children and kept across exec). Without ``CAP_SYS_ADMIN`` the kernel requires
    ``no_new_privs``, which is set then (it also stops set-user-ID programs from gaining
    privileges). Raises OSError."""
    insns = (sock_filter * len(prog))(*(sock_filter(*ins) for ins in prog))
    fprog = sock_fprog(len(prog), insns)

    def attempt() -> int:
        return int(
            _syscall(
                ctypes.c_long(SYS_SECCOMP),
                ctypes.c_uint(SECCOMP_SET_MODE_FILTER),
                ctypes.c_uint(0),
                ctypes.byref(fprog),
            )
        )

    if attempt() == 0:
        return
    if ctypes.get_errno() != 13:  # EACCES: no CAP_SYS_ADMIN and no no_new_privs
        _raise("seccomp")
    if _prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        _raise("prctl(PR_SET_NO_NEW_PRIVS)")
    if attempt() != 0:
        _raise("seccomp")
