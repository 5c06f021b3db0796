"""The KVM ABI of a kernel booted under QEMU, with the interface of the local one:
:class:`RemoteKvmSystem` (as :class:`memslots.kvm.abi.KvmSystem`), :class:`RemoteVmFd`
(as :class:`memslots.kvm.abi.VmFd`) and :class:`RemoteVcpu` (what
:class:`memslots.kvm.KvmVm` uses of :class:`memslots.kvm.vcpu.KvmVcpu`), so ``KvmVm``
and the tools run unchanged against any kernel.

Every method is one call to the agent in the guest (one round trip, a few ms) and
raises exactly what the local one raises: :class:`memslots.errors.MemslotError` with the
guest kernel's errno and the ioctl's name, :class:`ValueError` for a value that does not
fit its uapi field. File descriptors (VM, vCPU, guest_memfd, ``/dev/null``) are the
guest's numbers: close them with :meth:`RemoteVmFd.close_fd`, never ``os.close``.

Dirty bitmaps are allocated in the guest, ending at a guard page as the local ones do
(a short buffer gives EFAULT); the kernel's bitmap comes back as its non-zero words only.

Dirty rings: :meth:`RemoteVcpu.map_dirty_ring` maps the ring in the guest and returns a
:class:`RingMirror`, a local copy of the ring's bytes that
:class:`memslots.kvm.ring.KernelRing` reads and writes like the mapping;
:meth:`RingMirror.pull` copies the guest's entries into it (only those with flags set
travel) and :meth:`RingMirror.push` writes the flags the host changed (RESET on harvest)
back to the guest with store-release. ``KernelRing`` calls them around its reads and
harvests.

Running guest code (``KVM_RUN``) on a remote vCPU is not supported: it would need guest
memory the engine's host mappings cannot provide; such calls raise
:class:`RemoteUnsupported`.

Batching: :meth:`RemoteVmFd.batch` runs any number of prepared calls (the ``*_call``
builders) in one round trip and returns the replies, for callers that can issue the
kernel side of many operations before looking at the answers.
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Callable
from errno import EBADF
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Self, cast

from memslots.constants import KVM_DIRTY_LOG_PAGE_OFFSET
from memslots.errors import MemslotError
from memslots.kvm.abi import (
    KVM_API_VERSION,
    KVM_CHECK_EXTENSION,
    KVM_CLEAR_DIRTY_LOG,
    KVM_CREATE_GUEST_MEMFD,
    KVM_CREATE_VCPU,
    KVM_CREATE_VM,
    KVM_ENABLE_CAP,
    KVM_GET_API_VERSION,
    KVM_GET_DIRTY_LOG,
    KVM_GET_NR_MMU_PAGES,
    KVM_GET_VCPU_MMAP_SIZE,
    KVM_RESET_DIRTY_RINGS,
    KVM_SET_TSS_ADDR,
    KVM_SET_USER_MEMORY_REGION,
    KVM_SET_USER_MEMORY_REGION2,
    KVM_X86_DEFAULT_VM,
    KvmSystemLike,
    kvm_clear_dirty_log,
    kvm_create_guest_memfd,
    kvm_dirty_log,
    kvm_enable_cap,
    memory_region,
    memory_region2,
)
from memslots.kvm.vcpu import DEFAULT_TSS_ADDR, RunObserver
from memslots.kvm.vm import KvmVm
from memslots.profiles import KernelProfile
from memslots.tools.kernels.protocol import (
    OP_CLOSE,
    OP_FSTAT,
    OP_MMAP,
    OP_MUNMAP,
    OP_OPEN,
    OP_PEEK,
    OP_POKE,
    Call,
    Reply,
    decode_sparse,
    encode_ioctl,
)
from memslots.tools.kernels.qemu import GuestKernel

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["RemoteKvmSystem", "RemoteUnsupported", "RemoteVcpu", "RemoteVmFd", "RingMirror"]

_U32: Final = 0xFFFFFFFF
_U64: Final = 0xFFFFFFFFFFFFFFFF
_O_RDONLY: Final = 0
_ENTRY: Final = 16
_PEEKED = struct.Struct("<IIIQ")


class RemoteUnsupported(MemslotError):
    """An operation a kernel booted under QEMU cannot do through the agent (running
    guest code); errno ENOTSUP."""

    def __init__(self, what: str) -> None:
        super().__init__(95, f"{what}: not supported on a kernel booted under QEMU")


def _check_range(name: str, value: int, limit: int) -> None:
    if not 0 <= value <= limit:
        raise ValueError(f"{name}={value} does not fit its uapi field (0..{limit:#x})")


def _checked(reply: Reply, name: str) -> int:
    """The reply's return value, or ``MemslotError(errno, name)``."""
    if reply.ret < 0:
        raise MemslotError(reply.errno, name)
    return reply.ret


#: seconds a close may take in the guest: the last close of a VM fd destroys the VM
#: (``virt/kvm/kvm_main.c: kvm_destroy_vm``), which took over 6 minutes under TCG for an
#: arm64 VM of a non-default IPA size on 7.2 with 16 KiB pages
CLOSE_TIMEOUT: Final = 900.0


class _RemoteFd:
    """A file descriptor in the guest; closing it is idempotent. A context manager."""

    def __init__(self, guest: GuestKernel, fd: int) -> None:
        self.guest = guest
        self._fd = fd

    @property
    def fd(self) -> int:
        """The guest's descriptor number; ``ValueError`` once closed."""
        if self._fd < 0:
            raise ValueError(f"{type(self).__name__} is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run."""
        return self._fd < 0

    def close(self) -> None:
        """Close the descriptor in the guest (idempotent; nothing to do once the guest
        is gone). The wait is long (:data:`CLOSE_TIMEOUT`): the last close of a VM fd
        destroys the VM, which can take minutes under TCG."""
        fd, self._fd = self._fd, -1
        if fd >= 0 and self.guest.running:
            self.guest.batch([Call(OP_CLOSE, struct.pack("<I", fd))], timeout=CLOSE_TIMEOUT)

    def _ioctl(self, name: str, call: Call) -> int:
        return _checked(self.guest.call(call), name)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class RemoteKvmSystem(_RemoteFd):
    """The guest's ``/dev/kvm`` (opened by the agent at boot): the system ioctls of
    :class:`memslots.kvm.abi.KvmSystem`. ``RemoteKvmSystem(guest)`` needs a booted
    :class:`~memslots.tools.kernels.qemu.GuestKernel` and checks the API version."""

    def __init__(self, guest: GuestKernel) -> None:
        if guest.info is None:
            raise ValueError("the guest kernel is not booted")
        super().__init__(guest, guest.info.kvm_fd)
        version = self.api_version()
        if version != KVM_API_VERSION:
            raise MemslotError(0, f"KVM API version {version}, memslots needs {KVM_API_VERSION}")

    def close(self) -> None:
        """Forget the device (the agent keeps its fd for the next session)."""
        self._fd = -1

    def api_version(self) -> int:
        """``KVM_GET_API_VERSION``."""
        return self._ioctl("KVM_GET_API_VERSION", encode_ioctl(self.fd, KVM_GET_API_VERSION))

    def check_extension(self, cap: int) -> int:
        """``KVM_CHECK_EXTENSION`` on the system fd."""
        return self._ioctl("KVM_CHECK_EXTENSION", encode_ioctl(self.fd, KVM_CHECK_EXTENSION, cap))

    def vcpu_mmap_size(self) -> int:
        """``KVM_GET_VCPU_MMAP_SIZE``."""
        return self._ioctl("KVM_GET_VCPU_MMAP_SIZE", encode_ioctl(self.fd, KVM_GET_VCPU_MMAP_SIZE))

    def profile(self) -> KernelProfile:
        """The guest kernel's :class:`memslots.profiles.KernelProfile`, probed through
        this device (scratch VMs; a few hundred calls, about a second), with the guest's
        release, architecture and page size; what ``KvmVm(system=..., profile=...)``
        takes."""
        info = self.guest.info
        assert info is not None
        arch = "arm64" if info.machine == "aarch64" else info.machine
        return KernelProfile.probe(self, release=info.release, arch=arch, page_size=info.page_size)

    def vm_factory(self, profile: KernelProfile | None = None) -> Callable[..., KvmVm]:
        """A factory of :class:`memslots.kvm.KvmVm` on this kernel (what the tools'
        ``vm_factory`` parameters take): ``factory(strict=..., path=...)`` gives a
        ``KvmVm(system=self, profile=profile)``, ``path`` ignored. The profile is probed
        once (:meth:`profile`) when not given."""
        chosen = profile if profile is not None else self.profile()
        # RemoteVmFd has VmFd's calls without being one (the Protocol names VmFd)
        system = cast(KvmSystemLike, self)

        def factory(*, strict: bool = True, path: str = "", **kwargs: Any) -> KvmVm:
            return KvmVm(strict=strict, system=system, profile=chosen, **kwargs)

        return factory

    def create_vm(self, vm_type: int = KVM_X86_DEFAULT_VM) -> RemoteVmFd:
        """``KVM_CREATE_VM``: a new VM in the guest (one round trip for the mmap size
        and the VM together)."""
        size, vm = self.guest.batch(
            [
                encode_ioctl(self.fd, KVM_GET_VCPU_MMAP_SIZE),
                encode_ioctl(self.fd, KVM_CREATE_VM, vm_type),
            ]
        )
        fd = _checked(vm, "KVM_CREATE_VM")
        return RemoteVmFd(self.guest, fd, vcpu_mmap_size=_checked(size, "KVM_GET_VCPU_MMAP_SIZE"))


class RemoteVmFd(_RemoteFd):
    """A VM in the guest: the methods of :class:`memslots.kvm.abi.VmFd`, each one round
    trip, plus :meth:`close_fd`, :meth:`open_devnull`, :meth:`open_vcpu` and
    :meth:`batch`."""

    def __init__(self, guest: GuestKernel, fd: int, *, vcpu_mmap_size: int) -> None:
        super().__init__(guest, fd)
        #: bytes to map from each vCPU fd (``KVM_GET_VCPU_MMAP_SIZE``)
        self.vcpu_mmap_size = vcpu_mmap_size
        self._tss_addr: int | None = None

    # -- call builders (for batch) ----------------------------------------------------
    def set_user_memory_region_call(
        self, slot: int, flags: int, guest_phys_addr: int, memory_size: int, userspace_addr: int
    ) -> Call:
        """The prepared ``KVM_SET_USER_MEMORY_REGION`` (for :meth:`batch`)."""
        region = memory_region(slot, flags, guest_phys_addr, memory_size, userspace_addr)
        return encode_ioctl(self.fd, KVM_SET_USER_MEMORY_REGION, arg=bytes(region))

    def set_user_memory_region2_call(
        self,
        slot: int,
        flags: int,
        guest_phys_addr: int,
        memory_size: int,
        userspace_addr: int,
        guest_memfd_offset: int = 0,
        guest_memfd: int = 0,
    ) -> Call:
        """The prepared ``KVM_SET_USER_MEMORY_REGION2`` (for :meth:`batch`)."""
        region = memory_region2(
            slot, flags, guest_phys_addr, memory_size, userspace_addr, guest_memfd_offset,
            guest_memfd,
        )  # fmt: skip
        return encode_ioctl(self.fd, KVM_SET_USER_MEMORY_REGION2, arg=bytes(region))

    def batch(self, calls: list[Call]) -> list[Reply]:
        """Run prepared calls in one round trip; the raw replies (``ret``, ``errno``)."""
        return self.guest.batch(calls)

    # -- the VmFd interface ---------------------------------------------------------
    def check_extension(self, cap: int) -> int:
        """``KVM_CHECK_EXTENSION`` on the VM fd."""
        return self._ioctl("KVM_CHECK_EXTENSION", encode_ioctl(self.fd, KVM_CHECK_EXTENSION, cap))

    def set_user_memory_region(
        self, slot: int, flags: int, guest_phys_addr: int, memory_size: int, userspace_addr: int
    ) -> None:
        """``KVM_SET_USER_MEMORY_REGION`` (see the local
        :meth:`memslots.kvm.abi.VmFd.set_user_memory_region`)."""
        self._ioctl(
            "KVM_SET_USER_MEMORY_REGION",
            self.set_user_memory_region_call(
                slot, flags, guest_phys_addr, memory_size, userspace_addr
            ),
        )

    def set_user_memory_region2(
        self,
        slot: int,
        flags: int,
        guest_phys_addr: int,
        memory_size: int,
        userspace_addr: int,
        guest_memfd_offset: int = 0,
        guest_memfd: int = 0,
    ) -> None:
        """``KVM_SET_USER_MEMORY_REGION2``; ``guest_memfd`` is a guest fd number."""
        self._ioctl(
            "KVM_SET_USER_MEMORY_REGION2",
            self.set_user_memory_region2_call(
                slot,
                flags,
                guest_phys_addr,
                memory_size,
                userspace_addr,
                guest_memfd_offset,
                guest_memfd,
            ),
        )

    def get_dirty_log(self, slot: int, nbytes: int) -> bytes:
        """``KVM_GET_DIRTY_LOG`` into an ``nbytes`` guest buffer ending at a guard page;
        the bitmap."""
        _check_range("slot", slot, _U32)
        if nbytes < 0:
            raise ValueError(f"nbytes={nbytes} is negative")
        call = encode_ioctl(
            self.fd,
            KVM_GET_DIRTY_LOG,
            arg=bytes(kvm_dirty_log(slot, 0, 0)),
            buf_offset=kvm_dirty_log.dirty_bitmap.offset,
            buf_len=nbytes,
            return_buf=nbytes > 0,
        )
        reply = self.guest.call(call)
        _checked(reply, "KVM_GET_DIRTY_LOG")
        return decode_sparse(reply.data, nbytes) if nbytes else b""

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int, bitmap: Buffer) -> None:
        """``KVM_CLEAR_DIRTY_LOG`` with ``bitmap`` copied into a guest buffer (as short
        as the local one: ``min(needed, len(bitmap))`` bytes)."""
        _check_range("slot", slot, _U32)
        _check_range("first_page", first_page, _U64)
        _check_range("num_pages", num_pages, _U32)
        need = (num_pages + 63) // 64 * 8
        data = memoryview(bitmap).cast("B").tobytes()
        size = min(need, len(data))
        call = encode_ioctl(
            self.fd,
            KVM_CLEAR_DIRTY_LOG,
            arg=bytes(kvm_clear_dirty_log(slot, num_pages, first_page, 0)),
            buf_offset=kvm_clear_dirty_log.dirty_bitmap.offset,
            buf_len=size,
            buf_in=data[:size],
        )
        self._ioctl("KVM_CLEAR_DIRTY_LOG", call)

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> int:
        """``KVM_ENABLE_CAP`` on the VM with up to four ``args``."""
        if len(args) > 4:
            raise ValueError("kvm_enable_cap has four args")
        _check_range("cap", cap, _U32)
        _check_range("flags", flags, _U32)
        for value in args:
            _check_range("arg", value, _U64)
        request = kvm_enable_cap(cap, flags, (ctypes.c_uint64 * 4)(*args))
        return self._ioctl(
            "KVM_ENABLE_CAP", encode_ioctl(self.fd, KVM_ENABLE_CAP, arg=bytes(request))
        )

    def reset_dirty_rings(self) -> int:
        """``KVM_RESET_DIRTY_RINGS``: how many entries were reset."""
        return self._ioctl("KVM_RESET_DIRTY_RINGS", encode_ioctl(self.fd, KVM_RESET_DIRTY_RINGS))

    def set_tss_addr(self, addr: int) -> None:
        """``KVM_SET_TSS_ADDR`` (x86)."""
        _check_range("addr", addr, _U64)
        self._ioctl("KVM_SET_TSS_ADDR", encode_ioctl(self.fd, KVM_SET_TSS_ADDR, addr))
        self._tss_addr = addr

    @property
    def tss_addr(self) -> int | None:
        """The address last given to :meth:`set_tss_addr` successfully, or None."""
        return self._tss_addr

    def get_nr_mmu_pages(self) -> int:
        """``KVM_GET_NR_MMU_PAGES`` (x86)."""
        return self._ioctl("KVM_GET_NR_MMU_PAGES", encode_ioctl(self.fd, KVM_GET_NR_MMU_PAGES))

    def create_guest_memfd(self, size: int, flags: int = 0) -> int:
        """``KVM_CREATE_GUEST_MEMFD``: the guest's fd number (close it with
        :meth:`close_fd`)."""
        _check_range("size", size, _U64)
        _check_range("flags", flags, _U64)
        request = kvm_create_guest_memfd(size, flags)
        return self._ioctl(
            "KVM_CREATE_GUEST_MEMFD",
            encode_ioctl(self.fd, KVM_CREATE_GUEST_MEMFD, arg=bytes(request)),
        )

    def create_vcpu(self, vcpu_id: int) -> int:
        """``KVM_CREATE_VCPU``: the guest's vCPU fd number."""
        _check_range("vcpu_id", vcpu_id, _U32)
        return self._ioctl("KVM_CREATE_VCPU", encode_ioctl(self.fd, KVM_CREATE_VCPU, vcpu_id))

    def fd_identity(self, fd: int) -> tuple[int, int]:
        """``(st_dev, st_ino)`` of a guest descriptor (which file it is);
        :class:`~memslots.errors.MemslotError` EBADF when it is not open."""
        if not 0 <= fd <= _U32:
            raise MemslotError(EBADF, f"guest_memfd {fd} is not open")
        reply = self.guest.call(Call(OP_FSTAT, struct.pack("<I", fd)))
        if reply.ret < 0:
            raise MemslotError(reply.errno, f"guest_memfd {fd} is not open")
        dev, ino = struct.unpack("<QQ", reply.data)
        return dev, ino

    def close_fd(self, fd: int) -> None:
        """Close a descriptor of the guest (a guest_memfd, ``/dev/null``): ``close(2)``
        there; ``OSError`` with the guest's errno if it fails."""
        reply = self.guest.call(Call(OP_CLOSE, struct.pack("<I", fd & _U32)))
        if reply.ret < 0:
            raise OSError(reply.errno, os.strerror(reply.errno))

    # -- beyond VmFd ----------------------------------------------------------------
    def open_devnull(self) -> int:
        """Open ``/dev/null`` in the guest (an fd that is not a guest_memfd)."""
        reply = self.guest.call(Call(OP_OPEN, struct.pack("<I", _O_RDONLY) + b"/dev/null"))
        if reply.ret < 0:
            raise OSError(reply.errno, os.strerror(reply.errno))
        return reply.ret

    def open_vcpu(self, vcpu_id: int) -> RemoteVcpu:
        """A :class:`RemoteVcpu` (``KVM_CREATE_VCPU``; on x86 the VM gets the TSS
        address the local :class:`memslots.kvm.vcpu.KvmVcpu` gives it first)."""
        return RemoteVcpu(self, vcpu_id)


class RingMirror(bytearray):
    """A local copy of a vCPU's dirty ring mapped in the guest (see the module
    docstring): a ``bytearray`` of the ring's size, kept in step by :meth:`pull` and
    :meth:`push`."""

    def __init__(self, guest: GuestKernel, handle: int, nbytes: int) -> None:
        super().__init__(nbytes)
        self.guest = guest
        self.handle = handle
        self.entries = nbytes // _ENTRY
        self._flags: list[int] = [0] * self.entries

    def _flag_words(self) -> list[int]:
        return memoryview(self).cast("I")[:: _ENTRY // 4].tolist()

    def pull(self) -> None:
        """Copy the guest's ring here: entries with flags set as they are, the others
        zero. One round trip."""
        reply = self.guest.call(Call(OP_PEEK, struct.pack("<II", self.handle, self.entries)))
        _checked(reply, "dirty ring peek")
        fresh = bytearray(len(self))
        flags = [0] * self.entries
        for at in range(0, len(reply.data), _PEEKED.size):
            index, f, slot, offset = _PEEKED.unpack_from(reply.data, at)
            struct.pack_into("<IIQ", fresh, index * _ENTRY, f, slot, offset)
            flags[index] = f
        self[:] = fresh
        self._flags = flags

    def push(self) -> None:
        """Store the flags changed here since :meth:`pull` into the guest's ring
        (store-release, in index order). One round trip, none if nothing changed."""
        now = self._flag_words()
        calls = [
            Call(OP_POKE, struct.pack("<III", self.handle, i, f))
            for i, (f, old) in enumerate(zip(now, self._flags, strict=True))
            if f != old
        ]
        if calls:
            for reply in self.guest.batch(calls):
                _checked(reply, "dirty ring harvest")
        self._flags = now


class RemoteVcpu(_RemoteFd):
    """A vCPU in the guest: what :class:`memslots.kvm.KvmVm` uses of
    :class:`memslots.kvm.vcpu.KvmVcpu` (``fd``, ``vcpu_id``, ``run_observer``,
    :meth:`map_dirty_ring`, :meth:`close`); running guest code raises
    :class:`RemoteUnsupported`."""

    def __init__(self, vm: RemoteVmFd, vcpu_id: int = 0) -> None:
        info = vm.guest.info
        if info is not None and info.machine == "x86_64" and vm.tss_addr is None:
            vm.set_tss_addr(DEFAULT_TSS_ADDR)
        self.vm = vm
        self.vcpu_id = vcpu_id
        super().__init__(vm.guest, vm.create_vcpu(vcpu_id))
        self._ring: RingMirror | None = None
        #: told about every KVM_RUN (never called: remote vCPUs do not run)
        self.run_observer: RunObserver | None = None

    def map_dirty_ring(self, nbytes: int) -> RingMirror:
        """Map the vCPU's dirty ring in the guest (``nbytes`` from page
        ``KVM_DIRTY_LOG_PAGE_OFFSET``) and return its local :class:`RingMirror`, pulled
        once. A second call returns the same mirror."""
        if self._ring is None:
            info = self.guest.info
            page = info.page_size if info is not None else 4096
            args = struct.pack("<IQQ", self.fd, nbytes, KVM_DIRTY_LOG_PAGE_OFFSET * page)
            handle = _checked(self.guest.call(Call(OP_MMAP, args)), "mmap of the dirty ring")
            self._ring = RingMirror(self.guest, handle, nbytes)
            self._ring.pull()
        return self._ring

    def close(self) -> None:
        """Unmap the ring in the guest and close the vCPU fd (idempotent)."""
        if self.closed:
            return
        ring, self._ring = self._ring, None
        if ring is not None and self.guest.running:
            self.guest.call(Call(OP_MUNMAP, struct.pack("<I", ring.handle)))
        super().close()

    def run(self, *args: Any, **kwargs: Any) -> Any:
        """``KVM_RUN`` is not supported remotely: raises :class:`RemoteUnsupported`."""
        raise RemoteUnsupported("running guest code (KVM_RUN)")

    def run_until_hlt(self, *args: Any, **kwargs: Any) -> Any:
        """Not supported remotely: raises :class:`RemoteUnsupported`."""
        raise RemoteUnsupported("running guest code (KVM_RUN)")

    def setup_real_mode(self, *args: Any, **kwargs: Any) -> Any:
        """Not supported remotely: raises :class:`RemoteUnsupported`."""
        raise RemoteUnsupported("setting up guest code")

    def kick(self) -> None:
        """Nothing to interrupt: a remote vCPU never runs."""
