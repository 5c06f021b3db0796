"""A KVM vCPU that runs small 16-bit real-mode guests, with port-I/O and MMIO exits handed
to Python callbacks.

Typical use::

    with KvmSystem() as kvm, kvm.create_vm() as vm:
        vm.set_user_memory_region(0, 0, 0, mem.size, mem.addr)   # code at gpa 0x1000
        with KvmVcpu(vm) as vcpu:
            vcpu.setup_real_mode(0x1000, regs={"rcx": 4}, segments={"es": 0x10000})
            result = vcpu.run_until_hlt(on_io=lambda io: print(io.port, io.value))

The guest runs in KVM's instruction emulator on this kind of machine (about 1 us per
two-instruction loop iteration), so guest programs must stay tiny.

With the VM's dirty ring on (``KVM_CAP_DIRTY_LOG_RING``), :meth:`KvmVcpu.map_dirty_ring`
maps the vCPU's ring and :meth:`KvmVcpu.run_until_hlt` surfaces
``KVM_EXIT_DIRTY_RING_FULL`` (the ring is soft-full; KVM will not enter the guest until
userspace harvests and ``KVM_RESET_DIRTY_RINGS`` frees entries) to a callback, or raises
:class:`DirtyRingFull`; either way the guest goes on where it stopped once entries are
freed and the vCPU runs again.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final, Protocol

from memslots.errors import MemslotError
from memslots.kvm.abi import (
    KVM_DIRTY_LOG_PAGE_OFFSET,
    KVM_EXIT_DIRTY_RING_FULL,
    KVM_EXIT_HLT,
    KVM_EXIT_INTERNAL_ERROR,
    KVM_EXIT_INTR,
    KVM_EXIT_IO,
    KVM_EXIT_IO_OUT,
    KVM_EXIT_MMIO,
    KVM_GET_REGS,
    KVM_GET_SREGS,
    KVM_REGS_NAMES,
    KVM_RUN,
    KVM_SET_REGS,
    KVM_SET_SREGS,
    VmFd,
    _Fd,
    _ioctl,
    _ioctl_checked,
    exit_reason_name,
    kvm_regs,
    kvm_run,
    kvm_segment,
    kvm_sregs,
)

__all__ = [
    "DEFAULT_TSS_ADDR",
    "KICK_SIGNAL",
    "DirtyRingFull",
    "GuestError",
    "GuestTimeout",
    "IoExit",
    "KvmVcpu",
    "MmioExit",
    "RunObserver",
    "RunResult",
    "UnexpectedExit",
    "VcpuExit",
]

#: where :class:`KvmVcpu` puts x86's real-mode TSS (three pages) if the VM has none yet;
#: the value QEMU and the selftests use, just below the 4 GiB BIOS area
DEFAULT_TSS_ADDR: Final = 0xFFFBD000

#: the signal :meth:`KvmVcpu.kick` sends to a thread inside ``KVM_RUN`` (a real-time
#: signal, so it does not clash with SIGUSR1/2 users); a no-op handler is installed for it
#: the first time a vCPU is created from the main thread
KICK_SIGNAL: Final = signal.SIGRTMIN + 4

_SEGMENT_NAMES: Final = ("cs", "ds", "es", "fs", "gs", "ss")
_GPR_NAMES: Final = frozenset(KVM_REGS_NAMES)
_REAL_MODE_LIMIT: Final = 0x100000  # 1 MiB: highest base a real-mode selector can express


# --------------------------------------------------------------------------------------
# exits


@dataclass(slots=True)
class IoExit:
    """A ``KVM_EXIT_IO``: the guest executed ``in``/``out`` (or a string variant).

    ``data`` is a writable view of the ``size * count`` data bytes inside the ``kvm_run``
    mapping: for OUT it holds what the guest wrote, for IN the host fills it. It is valid
    until the next ``KVM_RUN`` and released (any use raises ``ValueError``) after that.
    """

    port: int
    direction: int  # KVM_EXIT_IO_IN (0) or KVM_EXIT_IO_OUT (1)
    size: int  # 1, 2 or 4 bytes per element
    count: int  # elements (1 except for rep ins/outs)
    data: memoryview

    @property
    def is_out(self) -> bool:
        """True for ``out`` (guest to host), False for ``in``."""
        return self.direction == KVM_EXIT_IO_OUT

    @property
    def value(self) -> int:
        """The first element of ``data`` as a little-endian unsigned integer."""
        return int.from_bytes(self.data[: self.size], "little")


@dataclass(frozen=True, slots=True)
class MmioExit:
    """A ``KVM_EXIT_MMIO``: the guest touched a gpa that no writable slot backs (a hole,
    or a write to a read-only slot). ``data`` holds the ``length`` bytes written (zeros
    for a read)."""

    phys_addr: int
    data: bytes
    length: int
    is_write: bool

    @property
    def value(self) -> int:
        """``data`` as a little-endian unsigned integer."""
        return int.from_bytes(self.data, "little")


@dataclass(frozen=True, slots=True)
class VcpuExit:
    """What one ``KVM_RUN`` returned: the exit reason and its decoded details.

    ``reason`` is ``KVM_EXIT_INTR`` when the run was interrupted (a signal or
    :meth:`KvmVcpu.kick`). ``suberror``/``data`` are filled for
    ``KVM_EXIT_INTERNAL_ERROR``; ``rip`` is the guest's rip after the exit (read only for
    exits other than IO/MMIO/HLT, to keep the common path cheap; else None).
    """

    reason: int
    io: IoExit | None = None
    mmio: MmioExit | None = None
    suberror: int | None = None
    data: tuple[int, ...] = ()
    rip: int | None = None

    @property
    def name(self) -> str:
        """The reason's name without ``KVM_EXIT_``, e.g. ``"HLT"``."""
        return exit_reason_name(self.reason)

    def __str__(self) -> str:
        parts = [self.name]
        if self.io is not None:
            parts.append(
                f"port={self.io.port:#x} {'out' if self.io.is_out else 'in'} size={self.io.size}"
            )
        if self.mmio is not None:
            parts.append(
                f"gpa={self.mmio.phys_addr:#x} {'write' if self.mmio.is_write else 'read'}"
                f" len={self.mmio.length}"
            )
        if self.suberror is not None:
            parts.append(f"suberror={self.suberror} data={[hex(d) for d in self.data]}")
        if self.rip is not None:
            parts.append(f"rip={self.rip:#x}")
        return " ".join(parts)


@dataclass(slots=True)
class RunResult:
    """The outcome of :meth:`KvmVcpu.run_until_hlt`."""

    #: the last exit: HLT, or INTR when :meth:`KvmVcpu.kick` stopped the run
    exit: VcpuExit
    #: exits handled in this call, the last one included
    exits: int = 0
    io_exits: int = 0
    mmio_exits: int = 0
    #: ``KVM_EXIT_DIRTY_RING_FULL`` exits answered by ``on_dirty_ring_full``
    dirty_ring_full_exits: int = 0
    #: wall-clock time of the call
    seconds: float = 0.0
    #: whether the guest reached HLT
    halted: bool = field(default=False)


class GuestError(RuntimeError):
    """The guest did not run to HLT as expected; ``.exit`` is the last exit (or None)."""

    def __init__(self, message: str, exit: VcpuExit | None = None) -> None:
        super().__init__(message)
        self.exit = exit


class UnexpectedExit(GuestError):
    """An exit :meth:`KvmVcpu.run_until_hlt` cannot handle: SHUTDOWN, INTERNAL_ERROR,
    FAIL_ENTRY, an unknown reason, or an IO/MMIO exit without a callback."""


class GuestTimeout(GuestError):
    """``timeout`` or ``max_exits`` of :meth:`KvmVcpu.run_until_hlt` ran out."""


class DirtyRingFull(GuestError):
    """``KVM_EXIT_DIRTY_RING_FULL`` reached :meth:`KvmVcpu.run_until_hlt` without an
    ``on_dirty_ring_full`` callback: harvest the rings, ``KVM_RESET_DIRTY_RINGS``, then
    run again; the guest goes on where it stopped (KVM did not enter it)."""


class RunObserver(Protocol):
    """Told about every ``KVM_RUN`` of a :class:`KvmVcpu` (``vcpu.run_observer``): the
    dirty-ring checks of :class:`memslots.kvm.KvmVm` use it."""

    def before_run(self) -> None:
        """Right before the ioctl."""

    def after_run(self, exit: VcpuExit) -> None:
        """Right after it, with the decoded exit (may raise to stop the run)."""


IoHandler = Callable[[IoExit], int | bytes | None]
MmioHandler = Callable[[MmioExit], int | bytes | None]
DirtyRingFullHandler = Callable[[VcpuExit], object]
_KvmRun = kvm_run  # the structure (KvmVcpu.kvm_run is a property of that name)


def _noop_handler(signum: int, frame: object) -> None:
    """The Python-level handler of :data:`KICK_SIGNAL`: the signal's only job is to make
    ``KVM_RUN`` return EINTR in the thread that receives it."""


def _ensure_kick_handler() -> bool:
    """Install the no-op :data:`KICK_SIGNAL` handler if nothing handles it yet and we are
    on the main thread (the only one Python lets install handlers). True if the signal
    is handled (by us or by the application) so a kick can interrupt ``KVM_RUN``."""
    current = signal.getsignal(KICK_SIGNAL)
    if current not in (signal.SIG_DFL, None):
        return current is not signal.SIG_IGN
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(KICK_SIGNAL, _noop_handler)
    return True


class KvmVcpu(_Fd):
    """A vCPU of a :class:`~memslots.kvm.abi.VmFd`: owns its fd and ``kvm_run`` mapping.

    ``KvmVcpu(vm, vcpu_id)`` gives the VM a real-mode TSS address first if it has none
    (``tss_addr``, default :data:`DEFAULT_TSS_ADDR`; an internal memslot on hosts that
    need one), then issues ``KVM_CREATE_VCPU``. Close it (or use ``with``) before the VM
    is expected to go away: the VM lives as long as any vCPU fd or mapping does.

    One thread runs a vCPU at a time; :meth:`kick` may be called from any thread.
    """

    def __init__(self, vm: VmFd, vcpu_id: int = 0, *, tss_addr: int = DEFAULT_TSS_ADDR) -> None:
        if vm.tss_addr is None:
            vm.set_tss_addr(tss_addr)
        self.vm = vm
        self.vcpu_id = vcpu_id
        self._kick_ok = _ensure_kick_handler()
        super().__init__(vm.create_vcpu(vcpu_id))
        try:
            self._map = mmap.mmap(
                self._fd, vm.vcpu_mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
            )
        except BaseException:
            super().close()
            raise
        self._run: kvm_run | None = kvm_run.from_buffer(self._map)
        self._view: memoryview | None = None  # the last IoExit.data, released on next run
        self._lock = threading.Lock()  # guards _thread_id against kick()
        self._thread_id: int | None = None
        self._kicked = False
        self._ring_map: mmap.mmap | None = None
        #: told about every KVM_RUN (see :class:`RunObserver`), or None
        self.run_observer: RunObserver | None = None

    # -- plumbing (``fd``, ``closed`` and the context manager are :class:`_Fd`'s) ------

    @property
    def kvm_run(self) -> kvm_run:
        """The live ``kvm_run`` structure in the vCPU's shared mapping."""
        if self._run is None:
            raise ValueError("KvmVcpu is closed")
        return self._run

    def map_dirty_ring(self, nbytes: int) -> mmap.mmap:
        """Map this vCPU's dirty ring: ``nbytes`` (the VM's ring size) from page
        ``KVM_DIRTY_LOG_PAGE_OFFSET`` (64) of the vCPU fd, shared and read-write, as the
        kernel requires (a private or executable mapping is refused). The mapping belongs
        to the vCPU and is unmapped by :meth:`close` (release views of it first); one
        ring per vCPU, so a second call returns the same mapping."""
        if self._ring_map is None:
            self._ring_map = mmap.mmap(
                self.fd,
                nbytes,
                mmap.MAP_SHARED,
                mmap.PROT_READ | mmap.PROT_WRITE,
                offset=KVM_DIRTY_LOG_PAGE_OFFSET * mmap.PAGESIZE,  # the host's pages
            )
        return self._ring_map

    def close(self) -> None:
        """Unmap ``kvm_run`` and the dirty ring and close the vCPU fd (idempotent)."""
        if self.closed:
            return
        self._release_view()
        self._run = None
        self._map.close()
        if self._ring_map is not None:
            with contextlib.suppress(BufferError):  # a view is alive: the GC unmaps it
                self._ring_map.close()
            self._ring_map = None
        super().close()

    # -- registers ------------------------------------------------------------------

    def get_regs(self) -> kvm_regs:
        """``KVM_GET_REGS``: a copy of the general-purpose registers, rip and rflags."""
        regs = kvm_regs()
        _ioctl_checked(self.fd, KVM_GET_REGS, ctypes.addressof(regs), "KVM_GET_REGS")
        return regs

    def set_regs(self, regs: kvm_regs) -> None:
        """``KVM_SET_REGS``."""
        _ioctl_checked(self.fd, KVM_SET_REGS, ctypes.addressof(regs), "KVM_SET_REGS")

    def get_sregs(self) -> kvm_sregs:
        """``KVM_GET_SREGS``: segments, descriptor tables, control registers."""
        sregs = kvm_sregs()
        _ioctl_checked(self.fd, KVM_GET_SREGS, ctypes.addressof(sregs), "KVM_GET_SREGS")
        return sregs

    def set_sregs(self, sregs: kvm_sregs) -> None:
        """``KVM_SET_SREGS``."""
        _ioctl_checked(self.fd, KVM_SET_SREGS, ctypes.addressof(sregs), "KVM_SET_SREGS")

    def setup_real_mode(
        self,
        entry: int,
        *,
        regs: Mapping[str, int] | None = None,
        segments: Mapping[str, int] | None = None,
        big_real_mode: bool = False,
    ) -> None:
        """Put the vCPU in 16-bit real mode about to execute the code at gpa ``entry``.

        ``entry`` must be below 1 MiB: CS gets base ``entry & ~0xffff`` (selector = base
        / 16) and ip the low 16 bits. Every other general-purpose register is 0 unless
        ``regs`` names it (``{"rcx": 8, "rdi": 0}``); rflags is 2 (interrupts off).
        DS, ES, FS, GS and SS get base 0 unless ``segments`` gives a base gpa
        (``{"es": 0x20000}``). A base below 1 MiB that is a multiple of 16 gets the
        matching selector, so guest code may reload the register; any other base (up to
        4 GiB, e.g. ``{"ds": 0xc0000000}``) lives only in the hidden part of the
        register and holds until the guest reloads it. Limits stay 64 KiB, unless
        ``big_real_mode``: then DS, ES, FS, GS and SS get a 4 GiB limit ("unreal mode"),
        so code using 32-bit addresses (the 0x67 prefix) reaches every gpa below 4 GiB.
        """
        if not 0 <= entry < _REAL_MODE_LIMIT:
            raise ValueError(f"real-mode entry {entry:#x} is not below 1 MiB")
        sregs = self.get_sregs()
        bases = dict.fromkeys(_SEGMENT_NAMES, 0)
        bases["cs"] = entry & ~0xFFFF
        for name, base in (segments or {}).items():
            if name not in _SEGMENT_NAMES or name == "cs":
                raise ValueError(f"segments: {name!r} is not one of ds, es, fs, gs, ss")
            if not 0 <= base < (1 << 32):
                raise ValueError(f"segment base {base:#x} is not below 4 GiB")
            bases[name] = base
        for name, base in bases.items():
            seg: kvm_segment = getattr(sregs, name)
            seg.base = base
            seg.selector = base >> 4 if base < _REAL_MODE_LIMIT and base % 16 == 0 else 0
            big = big_real_mode and name != "cs"
            seg.limit = 0xFFFFFFFF if big else 0xFFFF
            seg.present = 1
            seg.s = 1
            seg.dpl = 0
            seg.db = 0
            seg.l = 0
            seg.g = 1 if big else 0
            seg.unusable = 0
            seg.type = 0x0B if name == "cs" else 0x03  # code exec/read/accessed; data rw/a
        sregs.cr0 &= ~1  # PE off: real mode
        sregs.efer = 0
        self.set_sregs(sregs)

        new = kvm_regs()
        for name, value in (regs or {}).items():
            if name not in _GPR_NAMES or name in ("rip", "rflags"):
                raise ValueError(f"regs: {name!r} is not a general-purpose register name")
            if not 0 <= value < (1 << 64):
                raise ValueError(f"regs: {name}={value:#x} does not fit 64 bits")
            setattr(new, name, value)
        new.rip = entry & 0xFFFF
        new.rflags = 0x2
        self.set_regs(new)

    # -- running --------------------------------------------------------------------

    def _release_view(self) -> None:
        if self._view is not None:
            self._view.release()
            self._view = None

    def run(self) -> VcpuExit:
        """One ``KVM_RUN``: enter the guest and return the exit that ended it, decoded.

        An interrupted run (a signal, or :meth:`kick`) returns reason ``KVM_EXIT_INTR``;
        any other failure raises :class:`~memslots.errors.MemslotError`. The GIL is
        released while the guest runs.
        """
        run = self.kvm_run
        self._release_view()
        observer = self.run_observer
        if observer is not None:
            observer.before_run()
        with self._lock:
            self._thread_id = threading.get_ident()
        try:
            ret: int = _ioctl(self.fd, KVM_RUN, 0)
            err = ctypes.get_errno() if ret < 0 else 0
        finally:
            with self._lock:
                self._thread_id = None
        if ret < 0:
            if err != 4:  # EINTR
                raise MemslotError(err, "KVM_RUN")
            run.immediate_exit = 0
            ex = VcpuExit(KVM_EXIT_INTR)
        else:
            ex = self._decode(run)
        if observer is not None:
            observer.after_run(ex)
        return ex

    def _decode(self, run: _KvmRun) -> VcpuExit:
        """The exit ``KVM_RUN`` left in ``kvm_run``."""
        reason = run.exit_reason
        if reason == KVM_EXIT_IO:
            io = run.io
            start = io.data_offset
            view = memoryview(self._map)[start : start + io.size * io.count]
            self._view = view
            return VcpuExit(reason, io=IoExit(io.port, io.direction, io.size, io.count, view))
        if reason == KVM_EXIT_MMIO:
            m = run.mmio
            length = min(m.len, 8)
            is_write = bool(m.is_write)
            data = bytes(m.data[:length]) if is_write else bytes(length)
            return VcpuExit(reason, mmio=MmioExit(m.phys_addr, data, length, is_write))
        if reason == KVM_EXIT_HLT:
            return VcpuExit(reason)
        rip = self.get_regs().rip
        if reason == KVM_EXIT_INTERNAL_ERROR:
            internal = run.internal
            ndata = min(internal.ndata, 16)
            return VcpuExit(
                reason, suberror=internal.suberror, data=tuple(internal.data[:ndata]), rip=rip
            )
        return VcpuExit(reason, rip=rip)

    def kick(self) -> None:
        """Make the current (or next) :meth:`run` return ``KVM_EXIT_INTR`` soon. Safe from
        any thread: sets ``immediate_exit`` and signals the thread inside ``KVM_RUN``
        with :data:`KICK_SIGNAL`. A guest that never exits can only be kicked when the
        signal has a handler (installed automatically when the first vCPU is created on
        the main thread); otherwise the kick lands at the next exit."""
        self._kicked = True
        run = self._run
        if run is None:
            return
        run.immediate_exit = 1
        with self._lock:
            tid = self._thread_id
            if tid is not None and self._kick_ok:
                signal.pthread_kill(tid, KICK_SIGNAL)

    def run_until_hlt(
        self,
        on_io: IoHandler | None = None,
        on_mmio: MmioHandler | None = None,
        *,
        timeout: float | None = None,
        max_exits: int | None = None,
        on_dirty_ring_full: DirtyRingFullHandler | None = None,
    ) -> RunResult:
        """Run the guest until it executes HLT, handing exits to the callbacks.

        ``on_io(exit)`` gets every port-I/O exit. For IN it returns the value to feed the
        guest: an int (packed little-endian into each element), bytes (copied into
        ``exit.data``), or None (zeros); it may also write ``exit.data`` itself. For OUT
        the return value is ignored. ``on_mmio(exit)`` does the same for MMIO: for a
        read the return value (int, bytes or None for zeros) is what the guest loads.
        ``on_dirty_ring_full(exit)`` gets every ``KVM_EXIT_DIRTY_RING_FULL``: it should
        harvest the rings and reset them; the run then goes on (if the ring is still
        soft-full, the next exit is the same). Without it the exit raises
        :class:`DirtyRingFull`, and calling this method again after harvest and reset
        resumes the guest where it stopped.

        Returns a :class:`RunResult` when the guest halts, or with ``halted`` False when
        :meth:`kick` stopped it. Raises :class:`GuestTimeout` when ``timeout`` seconds or
        ``max_exits`` exits pass first (the vCPU stays usable), and
        :class:`UnexpectedExit` for SHUTDOWN, INTERNAL_ERROR, FAIL_ENTRY, other reasons,
        or an IO/MMIO exit without a callback. Exceptions from a callback propagate.
        """
        start = time.perf_counter()
        deadline = None if timeout is None else start + timeout
        timer: threading.Timer | None = None
        timed_out = threading.Event()
        if timeout is not None:

            def expire() -> None:
                timed_out.set()
                self.kick()

            timer = threading.Timer(timeout, expire)
            timer.daemon = True
            timer.start()
        self._kicked = False
        result = RunResult(VcpuExit(KVM_EXIT_INTR))
        try:
            while True:
                ex = self.run()
                result.exit = ex
                result.exits += 1
                reason = ex.reason
                if reason == KVM_EXIT_HLT:
                    result.halted = True
                    break
                if reason == KVM_EXIT_IO and ex.io is not None:
                    result.io_exits += 1
                    if on_io is None:
                        raise UnexpectedExit(f"port I/O exit without on_io: {ex}", ex)
                    answer = on_io(ex.io)
                    if not ex.io.is_out:
                        _fill(ex.io.data, ex.io.size, answer)
                elif reason == KVM_EXIT_MMIO and ex.mmio is not None:
                    result.mmio_exits += 1
                    if on_mmio is None:
                        raise UnexpectedExit(f"MMIO exit without on_mmio: {ex}", ex)
                    answer = on_mmio(ex.mmio)
                    if not ex.mmio.is_write:
                        buf = (ctypes.c_uint8 * 8)()
                        _fill(memoryview(buf).cast("B"), ex.mmio.length, answer)
                        self.kvm_run.mmio.data = buf
                elif reason == KVM_EXIT_DIRTY_RING_FULL:
                    if on_dirty_ring_full is None:
                        raise DirtyRingFull(f"dirty ring full: {ex}", ex)
                    result.dirty_ring_full_exits += 1
                    on_dirty_ring_full(ex)
                elif reason == KVM_EXIT_INTR:
                    if timed_out.is_set():
                        raise GuestTimeout(f"guest still running after {timeout} s", ex)
                    if self._kicked:
                        self._kicked = False
                        break
                else:
                    raise UnexpectedExit(f"unexpected exit {ex}", ex)
                if max_exits is not None and result.exits >= max_exits:
                    raise GuestTimeout(f"guest did not halt within {max_exits} exits", ex)
                if deadline is not None and time.perf_counter() > deadline:
                    raise GuestTimeout(f"guest still running after {timeout} s", ex)
        finally:
            if timer is not None:
                timer.cancel()
            if self._run is not None:
                self._run.immediate_exit = 0
            result.seconds = time.perf_counter() - start
        return result


def _fill(data: memoryview, size: int, answer: int | bytes | None) -> None:
    """Write a callback's answer into an IN/MMIO-read data area of ``len(data)`` bytes."""
    if answer is None:
        data[:] = bytes(len(data))
    elif isinstance(answer, int):
        element = (answer & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        data[:] = (element * (len(data) // size)).ljust(len(data), b"\0")
    else:
        data[:] = bytes(answer[: len(data)]).ljust(len(data), b"\0")
