"""Decoding a traced process's system calls into trace records.

:class:`CallDecoder` is told of each system call that a traced thread enters (the ioctls
with a KVM request number, ``munmap``, ``mremap`` and ``madvise``) and answers with what
to do when it returns: a callable that takes the return value and writes the records, or
None when the call is of no interest (then the thread need not stop again). It keeps,
per VM, the slots the kernel accepted (to size dirty bitmaps and to tell which memory a
slot maps) and which descriptors of which process name the VM.

Which fd is which VM:

- ``KVM_CREATE_VM`` on a descriptor of the ``/dev/kvm`` device returns a VM fd: that
  (process, fd) now names a new VM, numbered in creation order, whatever the number
  named before (a closed VM fd's number reused for a new VM is a new VM). Any fd a
  traced ioctl returns (vCPU, guest_memfd) stops naming the VM it named before.
- An ioctl on an fd the decoder has not seen returned, but that ``/proc/PID/fd`` shows as
  ``anon_inode:kvm-vm`` (a ``dup``, an fd inherited across ``fork``), is matched to a
  known VM with ``kcmp(KCMP_FILE)``; one that matches none is a VM made before recording
  began (``memslots record --pid``), recorded as ``create_vm`` with ``attached``.
- A forked process starts with its parent's table; a thread shares its process's.
- A VM lives while some traced process holds a descriptor of it (the VM fd, a vCPU or a
  guest_memfd: each holds the VM). ``close`` is not traced (that would stop the program
  on every close), so this is checked where it matters: before a ``munmap``-like call is
  recorded as touching a VM's slots, and when a process exits. A VM found gone gets a
  ``release_vm`` record.

Structures and bitmaps are read from the traced process with ``process_vm_readv`` only,
at syscall entry for what the kernel reads and at exit for what it writes
(``KVM_GET_DIRTY_LOG``'s bitmap). A structure that cannot be read (a bad pointer) is not
recorded: the kernel fails the call with EFAULT, and the count is in :attr:`unreadable`.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import os
import stat
import time
from collections.abc import Callable
from typing import Final, TypeVar

from memslots.dirty_log import dirty_bitmap_bytes, dirty_runs
from memslots.kvm.abi import (
    KVM_CAP_DIRTY_LOG_RING,
    KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_CLEAR_DIRTY_LOG,
    KVM_CREATE_GUEST_MEMFD,
    KVM_CREATE_VCPU,
    KVM_CREATE_VM,
    KVM_ENABLE_CAP,
    KVM_GET_DIRTY_LOG,
    KVM_RESET_DIRTY_RINGS,
    KVM_SET_USER_MEMORY_REGION,
    KVM_SET_USER_MEMORY_REGION2,
    kvm_clear_dirty_log,
    kvm_create_guest_memfd,
    kvm_dirty_log,
    kvm_enable_cap,
    kvm_userspace_memory_region,
    kvm_userspace_memory_region2,
)
from memslots.tools.record.ptrace import (
    SYS_IOCTL,
    SYS_MADVISE,
    SYS_MREMAP,
    SYS_MUNMAP,
    BpfRule,
    kcmp_file,
    read_memory,
)
from memslots.tools.traces import (
    MADV_DONTNEED,
    MADV_REMOVE,
    ClearDirtyLog,
    CreateGuestMemfd,
    CreateVcpu,
    CreateVm,
    EnableCap,
    GetDirtyLog,
    Madvise,
    MemslotCall,
    Mremap,
    Munmap,
    Record,
    ReleaseVm,
    ResetDirtyRings,
    Runs,
)

__all__ = ["DIRTY_LOG_CAPS", "TRACED_REQUESTS", "CallDecoder", "ExitHandler", "filter_rules"]

#: the ioctl requests whose calls are recorded (and stop the traced program)
TRACED_REQUESTS: Final = (
    KVM_CREATE_VM,
    KVM_SET_USER_MEMORY_REGION,
    KVM_SET_USER_MEMORY_REGION2,
    KVM_CREATE_GUEST_MEMFD,
    KVM_CREATE_VCPU,
    KVM_ENABLE_CAP,
    KVM_GET_DIRTY_LOG,
    KVM_CLEAR_DIRTY_LOG,
    KVM_RESET_DIRTY_RINGS,
)
#: the ``KVM_ENABLE_CAP`` capabilities that are recorded
DIRTY_LOG_CAPS: Final = frozenset(
    (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL)
)
#: the ``/dev/kvm`` character device (``MISC_MAJOR``, ``KVM_MINOR``)
_KVM_RDEV: Final = os.makedev(10, 232)
#: a dirty bitmap with more runs than this is recorded without its contents
_MAX_RUNS: Final = 1 << 20

#: what to do when the call returns: ``handler(rval)`` with the raw return value
#: (a negative errno on failure)
ExitHandler = Callable[[int], None]


def filter_rules() -> list[BpfRule]:
    """The seccomp rules of ``memslots record``: stop on the traced ioctl requests, on
    every ``munmap`` and ``mremap`` and on ``madvise`` with a discarding advice."""
    return [
        BpfRule(SYS_IOCTL, 1, TRACED_REQUESTS),
        BpfRule(SYS_MUNMAP),
        BpfRule(SYS_MREMAP),
        BpfRule(SYS_MADVISE, 2, (MADV_DONTNEED, MADV_REMOVE)),
    ]


_R = TypeVar("_R", bound=Record)


def _at(record: _R, meta: dict[str, int]) -> _R:
    """``record`` with its VM, process, thread and timestamp."""
    replace: Callable[..., _R] = dataclasses.replace
    return replace(record, **meta)


def _result(rval: int) -> int:
    """The errno of a raw return value (0 for success)."""
    return -rval if -4095 <= rval < 0 else 0


@dataclasses.dataclass
class VmState:
    """What the decoder knows of one VM."""

    number: int
    pid: int
    #: ``slot -> (userspace_addr, memory_size)`` of the slots the kernel accepted
    slots: dict[int, tuple[int, int]] = dataclasses.field(default_factory=dict)
    #: (process, fd) that hold the VM, with what anon_inode name each should show
    holders: dict[tuple[int, int], str] = dataclasses.field(default_factory=dict)
    alive: bool = True
    #: the process that created it has exec'd or exited: its slots point nowhere
    mm_gone: bool = False

    def overlaps(self, start: int, end: int) -> bool:
        """Whether a slot's hvas intersect ``[start, end)``."""
        return any(hva < end and start < hva + size for hva, size in self.slots.values())


class CallDecoder:
    """Turns traced system calls into records, written with ``write`` as they complete.

    ``clock`` gives the monotonic timestamp of a record (nanoseconds); ``live_tid(pid)``
    names a live thread of a traced process (for ``kcmp``; None when it is gone).
    """

    def __init__(
        self,
        write: Callable[[Record], None],
        *,
        clock: Callable[[], int] = time.monotonic_ns,
        live_tid: Callable[[int], int | None] = lambda pid: pid,
    ) -> None:
        self._write = write
        self._clock = clock
        self._live_tid = live_tid
        self.vms: list[VmState] = []
        #: (process, fd) -> the VM that fd names
        self._vm_fds: dict[tuple[int, int], VmState] = {}
        #: structures that could not be read (the kernel failed those calls with EFAULT)
        self.unreadable = 0

    # ------------------------------------------------------------------ processes
    def forked(self, parent: int, child: int) -> None:
        """Process ``child`` starts with a copy of ``parent``'s descriptors. O(holders)."""
        for vm in self.vms:
            for (pid, fd), name in list(vm.holders.items()):
                if pid == parent:
                    vm.holders[(child, fd)] = name
        for (pid, fd), vm in list(self._vm_fds.items()):
            if pid == parent:
                self._vm_fds[(child, fd)] = vm

    def execed(self, pid: int) -> None:
        """Process ``pid`` replaced its program: its memory map is new (the slots of the
        VMs it created point nowhere now) and its close-on-exec descriptors are closed."""
        for vm in self.vms:
            if vm.pid == pid:
                vm.mm_gone = True
        self._forget_closed(pid)

    def exited(self, pid: int) -> None:
        """Process ``pid`` is gone, with every descriptor it held."""
        for vm in self.vms:
            if vm.pid == pid:
                vm.mm_gone = True
            for key in [k for k in vm.holders if k[0] == pid]:
                del vm.holders[key]
        for key in [k for k in self._vm_fds if k[0] == pid]:
            del self._vm_fds[key]
        for vm in self.vms:
            if vm.alive and not vm.holders:
                self._release(vm, pid, pid)

    def _forget_closed(self, pid: int) -> None:
        for vm in self.vms:
            for (p, fd), name in list(vm.holders.items()):
                if p == pid and _fd_name(pid, fd) != name:
                    del vm.holders[(p, fd)]
                    self._vm_fds.pop((p, fd), None)

    def _release(self, vm: VmState, pid: int, tid: int) -> None:
        vm.alive = False
        self._write(ReleaseVm(vm=vm.number, pid=pid, tid=tid, time_ns=self._clock()))

    def _claim(self, pid: int, fd: int) -> None:
        """A traced call returned ``fd``: it names nothing it named before."""
        self._vm_fds.pop((pid, fd), None)
        for vm in self.vms:
            vm.holders.pop((pid, fd), None)

    # ------------------------------------------------------------------ entry
    def on_entry(self, pid: int, tid: int, nr: int, args: tuple[int, ...]) -> ExitHandler | None:
        """Thread ``tid`` of process ``pid`` enters system call ``nr``: the handler to
        call with its return value, or None when it needs no record."""
        if nr == SYS_IOCTL:
            return self._ioctl(pid, tid, args[0] & 0xFFFFFFFF, args[1] & 0xFFFFFFFF, args[2])
        if nr == SYS_MUNMAP:
            return self._hva_change(pid, tid, args[0], args[1], Munmap(args[0], args[1]))
        if nr == SYS_MREMAP:
            rec = Mremap(args[0], args[1], args[2], args[3] & 0xFFFFFFFF, args[4])
            return self._hva_change(pid, tid, args[0], args[1], rec)
        if nr == SYS_MADVISE and args[2] & 0xFFFFFFFF in (MADV_DONTNEED, MADV_REMOVE):
            rec_m = Madvise(args[0], args[1], args[2] & 0xFFFFFFFF)
            return self._hva_change(pid, tid, args[0], args[1], rec_m)
        return None

    def _ioctl(self, pid: int, tid: int, fd: int, request: int, arg: int) -> ExitHandler | None:
        if request not in TRACED_REQUESTS:
            return None
        t_ns = self._clock()
        if request == KVM_CREATE_VM:
            if not _is_kvm_device(tid, fd):
                return None
            return lambda rval: self._created_vm(pid, tid, t_ns, arg, rval)
        vm = self._vm_of(pid, tid, fd)
        if vm is None:
            return None
        meta = {"vm": vm.number, "pid": pid, "tid": tid, "time_ns": t_ns}
        try:
            return self._vm_ioctl(vm, pid, tid, request, arg, meta)
        except OSError:
            self.unreadable += 1
            return None

    def _vm_ioctl(
        self, vm: VmState, pid: int, tid: int, request: int, arg: int, meta: dict[str, int]
    ) -> ExitHandler | None:
        if request in (KVM_SET_USER_MEMORY_REGION, KVM_SET_USER_MEMORY_REGION2):
            v2 = request == KVM_SET_USER_MEMORY_REGION2
            ctype = kvm_userspace_memory_region2 if v2 else kvm_userspace_memory_region
            r = ctype.from_buffer_copy(read_memory(tid, arg, ctypes.sizeof(ctype)))
            call = MemslotCall(
                r.slot,
                r.flags,
                r.guest_phys_addr,
                r.memory_size,
                r.userspace_addr,
                None,
                r.guest_memfd_offset if v2 else 0,
                r.guest_memfd if v2 else 0,
                v2,
            )
            call = _at(call, meta)
            return lambda rval: self._set_region(vm, call, rval)
        if request == KVM_CREATE_GUEST_MEMFD:
            g = kvm_create_guest_memfd.from_buffer_copy(read_memory(tid, arg, 64))
            rec_g = _at(CreateGuestMemfd(g.size, g.flags), meta)
            return lambda rval: self._created_fd(vm, pid, rec_g, rval, "anon_inode:[kvm-gmem]")
        if request == KVM_CREATE_VCPU:
            rec_v = _at(CreateVcpu(arg & 0xFFFFFFFF), meta)
            name = f"anon_inode:kvm-vcpu:{arg & 0xFFFFFFFF}"
            return lambda rval: self._created_fd(vm, pid, rec_v, rval, name)
        if request == KVM_ENABLE_CAP:
            c = kvm_enable_cap.from_buffer_copy(
                read_memory(tid, arg, ctypes.sizeof(kvm_enable_cap))
            )
            if c.cap not in DIRTY_LOG_CAPS:
                return None
            args = tuple(c.args)
            rec_c = _at(EnableCap(c.cap, c.flags, (args[0], args[1], args[2], args[3])), meta)
            return lambda rval: self._write(dataclasses.replace(rec_c, result=_result(rval)))
        if request == KVM_GET_DIRTY_LOG:
            d = kvm_dirty_log.from_buffer_copy(read_memory(tid, arg, ctypes.sizeof(kvm_dirty_log)))
            slot, ptr = d.slot, d.dirty_bitmap
            return lambda rval: self._got_dirty_log(vm, tid, slot, ptr, rval, meta)
        if request == KVM_CLEAR_DIRTY_LOG:
            size = ctypes.sizeof(kvm_clear_dirty_log)
            c2 = kvm_clear_dirty_log.from_buffer_copy(read_memory(tid, arg, size))
            num = c2.num_pages
            dirty: Runs | None = None
            if num:
                try:
                    bits = read_memory(tid, c2.dirty_bitmap, dirty_bitmap_bytes(num))
                    dirty = _runs(bits)
                except (OSError, ValueError):
                    dirty = None
            rec_cl = _at(ClearDirtyLog(c2.slot, c2.first_page, num, dirty), meta)
            return lambda rval: self._write(dataclasses.replace(rec_cl, result=_result(rval)))
        # KVM_RESET_DIRTY_RINGS
        rec_r = _at(ResetDirtyRings(), meta)
        return lambda rval: self._write(
            dataclasses.replace(
                rec_r, result=_result(rval), value=rval if _result(rval) == 0 else None
            )
        )

    # ------------------------------------------------------------------ exits
    def _created_vm(self, pid: int, tid: int, t_ns: int, vm_type: int, rval: int) -> None:
        err = _result(rval)
        if err:
            self._write(CreateVm(vm_type, None, err, vm=None, pid=pid, tid=tid, time_ns=t_ns))
            return
        self._claim(pid, rval)
        vm = self._new_vm(pid, rval)
        self._write(CreateVm(vm_type, rval, 0, vm=vm.number, pid=pid, tid=tid, time_ns=t_ns))

    def _new_vm(self, pid: int, fd: int) -> VmState:
        vm = VmState(len(self.vms), pid)
        vm.holders[(pid, fd)] = "anon_inode:kvm-vm"
        self.vms.append(vm)
        self._vm_fds[(pid, fd)] = vm
        return vm

    def _set_region(self, vm: VmState, call: MemslotCall, rval: int) -> None:
        err = _result(rval)
        if not err:
            if call.memory_size:
                vm.slots[call.slot] = (call.userspace_addr, call.memory_size)
            else:
                vm.slots.pop(call.slot, None)
        self._write(dataclasses.replace(call, result=err))

    def _created_fd(
        self, vm: VmState, pid: int, rec: CreateVcpu | CreateGuestMemfd, rval: int, name: str
    ) -> None:
        err = _result(rval)
        if not err:
            self._claim(pid, rval)
            vm.holders[(pid, rval)] = name
        self._write(dataclasses.replace(rec, fd=None if err else rval, result=err))

    def _got_dirty_log(
        self, vm: VmState, tid: int, slot: int, ptr: int, rval: int, meta: dict[str, int]
    ) -> None:
        err = _result(rval)
        dirty: Runs | None = None
        known = vm.slots.get(slot)
        if not err and known is not None:
            try:
                dirty = _runs(read_memory(tid, ptr, dirty_bitmap_bytes(known[1] >> 12)))
            except (OSError, ValueError):
                dirty = None
        self._write(_at(GetDirtyLog(slot, dirty, err), meta))

    # ------------------------------------------------------------------ VMs
    def _vm_of(self, pid: int, tid: int, fd: int) -> VmState | None:
        """The VM ``fd`` of ``pid`` names, or None when it is no VM fd."""
        if _fd_name(tid, fd) != "anon_inode:kvm-vm":
            return None
        vm = self._vm_fds.get((pid, fd))
        if vm is not None and vm.alive:
            return vm
        for (other, other_fd), known in list(self._vm_fds.items()):
            holder = self._live_tid(other)
            if not known.alive or holder is None:
                continue
            try:
                same = kcmp_file(tid, fd, holder, other_fd)
            except OSError:
                continue
            if same:
                known.holders[(pid, fd)] = "anon_inode:kvm-vm"
                self._vm_fds[(pid, fd)] = known
                return known
        # a VM this recording has not seen made: it existed before
        vm = self._new_vm(pid, fd)
        self._write(CreateVm(0, fd, 0, True, vm=vm.number, pid=pid, tid=tid, time_ns=self._clock()))
        return vm

    def _hva_change(
        self, pid: int, tid: int, start: int, length: int, rec: Munmap | Mremap | Madvise
    ) -> ExitHandler | None:
        """A call that may take memory away from ``[start, start + length)``: recorded when
        a live slot of a live VM of this process maps part of it."""
        end = start + ((length + 0xFFF) & ~0xFFF)
        hit = False
        for vm in self.vms:
            if not vm.alive or vm.mm_gone or vm.pid != pid or not vm.overlaps(start, end):
                continue
            if not any(_fd_name(p, fd) == name for (p, fd), name in vm.holders.items()):
                self._release(vm, pid, tid)
                continue
            hit = True
        if not hit:
            return None
        rec = dataclasses.replace(rec, vm=None, pid=pid, tid=tid, time_ns=self._clock())

        def done(rval: int) -> None:
            err = _result(rval)
            if isinstance(rec, Mremap):
                self._write(dataclasses.replace(rec, result=err, value=None if err else rval))
            else:
                self._write(dataclasses.replace(rec, result=err))

        return done


def _runs(bitmap: bytes) -> Runs | None:
    runs = dirty_runs(bitmap)
    if len(runs) > _MAX_RUNS:
        return None
    return tuple(runs)


def _fd_name(pid: int, fd: int) -> str | None:
    """What ``/proc/PID/fd/FD`` points at, or None when it is not open."""
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return None


def _is_kvm_device(pid: int, fd: int) -> bool:
    """Whether ``fd`` of ``pid`` is open on the ``/dev/kvm`` character device (wherever its
    device node lives)."""
    try:
        st = os.stat(f"/proc/{pid}/fd/{fd}")
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.EACCES, errno.ESRCH):
            raise
        return False
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == _KVM_RDEV
