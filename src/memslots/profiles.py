"""Kernel profiles: what one kernel answers, as data, so that the engine answers as it does.

Every answer of the memslot ABI that differs between kernels (which ioctls exist, how many
slots, vCPU ids and address spaces there are, where the user address range ends, which
capabilities and flags are offered, which errno a check gives) is a field of a
:class:`KernelProfile`; the engine takes a VM's share of it as
:class:`memslots.validate.VmLimits` (``profile.vm_limits(vm_type)``):

>>> from memslots import Vm
>>> from memslots.profiles import KernelProfile
>>> p = KernelProfile.named("6.1")
>>> p.release, p.user_memory2, p.max_user_slots
('6.1', False, 32764)
>>> vm = Vm(profile=p)
>>> vm.set_user_memory_region2(0, 0, 0, 0x1000, 0x7F0000000000)
Traceback (most recent call last):
...
memslots.errors.MemslotError: KVM_SET_USER_MEMORY_REGION2 does not exist before Linux 6.8 (ENOTTY)

Profiles come from two places:

- :meth:`KernelProfile.probe` reads a live kernel: ``uname``, ``KVM_CHECK_EXTENSION`` of
  every capability that matters, and small probes on scratch VMs where no capability
  says it (the highest gfn and the end of the user address range by binary search, whether
  the default VM takes guest_memfd slots, the errno of a guest_memfd range bound twice,
  the guest_memfd creation flags, whether ``KVM_RESET_DIRTY_RINGS`` exists). It works on
  the host's ``/dev/kvm`` and on a kernel booted under QEMU (any object with
  :class:`memslots.kvm.abi.KvmSystem`'s calls).
- :meth:`KernelProfile.named` returns a profile measured on a Debian kernel (each booted
  under QEMU, ``-cpu max,la57=off``) or on this project's development host:
  ``memslots profiles`` lists them. Two fields depend on the machine more than on the
  kernel and are given for a typical one: ``max_gfn`` (x86's ``kvm_mmu_max_gfn()``
  follows the host's physical address width; named profiles take 52 bits, as shadow paging
  does) and ``task_size_max`` (4-level paging; 5-level paging moves it to 2^56 - 4 KiB:
  ``profile.with_paging(5)``).

This module sits beside the kvm backend (it reads kernels through
:mod:`memslots.kvm.abi`), above the engine, which only sees ``VmLimits``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from errno import EEXIST, EFAULT, EINVAL, ENOTTY
from typing import Any, Final, Protocol

from memslots.constants import (
    KVM_DIRTY_LOG_MANUAL_CAPS_X86,
    KVM_MEM_GUEST_MEMFD,
    PAGE_SHIFT,
    PAGE_SHIFTS,
    PAGE_SIZE,
)
from memslots.errors import MemslotError
from memslots.kvm import abi
from memslots.kvm.abi import GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP
from memslots.validate import VmLimits

__all__ = [
    "KVM_X86_SW_PROTECTED_VM",
    "KernelProfile",
    "ProbeKernel",
    "ProbeVm",
    "profile_names",
]

_X86_VM_TYPES_DEFAULT: Final = 1 << abi.KVM_X86_DEFAULT_VM
#: ``KVM_X86_SW_PROTECTED_VM``: a VM type with private memory and one address space
KVM_X86_SW_PROTECTED_VM: Final = 1
_MAX_GFN_52: Final = (1 << (52 - PAGE_SHIFT)) - 1
_TASK_SIZE_4LEVEL: Final = (1 << 47) - PAGE_SIZE
_TASK_SIZE_5LEVEL: Final = (1 << 56) - PAGE_SIZE
_RING_MAX: Final = 1 << 20
#: arm64: ``KVM_VM_TYPE_ARM_IPA_SIZE_MASK``, the IPA size bits of ``KVM_CREATE_VM``'s type
_ARM_IPA_SIZE_MASK: Final = 0xFF
#: ``KVM_CAP_ARM_VM_IPA_SIZE``
KVM_CAP_ARM_VM_IPA_SIZE: Final = 165


@dataclass(frozen=True)
class KernelProfile:
    """One kernel's answers, as data (see the module docstring).

    Identity: ``name`` (``"6.1"``, ``"6.12/arm64"``, ``"probed"``), ``release`` (``uname
    -r``), ``version`` (``(6, 1)``), ``arch`` (``"x86_64"`` or ``"arm64"``),
    ``paging_levels`` (4 or 5: where the user address range ends), ``memslot_design``
    (``"array"`` before 5.17, ``"tree"`` since: the engine answers the same either way, it
    says which of ``ArrayVm`` and ``Vm`` is that kernel's own design), ``source`` (how the
    values were obtained).

    The answers: every field of :class:`memslots.validate.VmLimits` of the default VM type
    (``nr_address_spaces``, ``max_user_slots``, ``max_gfn``, ``task_size_max``,
    ``readonly_mem``, ``private_mem``, ``user_memory2``, ``page_shift``, ``guest_memfd``,
    ``guest_memfd_flags``, ``gmem_bound_errno``, ``max_vcpu_ids``, ``max_vcpus``,
    ``manual_dirty_log_caps``, ``dirty_ring_max``, ``dirty_ring_acq_rel``,
    ``dirty_ring_with_bitmap``, ``reset_dirty_rings``), plus ``vm_types`` (the
    ``KVM_CAP_VM_TYPES`` mask: which ``KVM_CREATE_VM`` types exist) and
    ``memory_attributes`` (``KVM_CAP_MEMORY_ATTRIBUTES``).
    """

    name: str
    release: str
    version: tuple[int, int]
    arch: str = "x86_64"
    paging_levels: int = 4
    memslot_design: str = "tree"
    source: str = ""
    # VmLimits of the default VM type
    nr_address_spaces: int = 2
    max_user_slots: int = 32764
    max_gfn: int = _MAX_GFN_52
    task_size_max: int = _TASK_SIZE_4LEVEL
    readonly_mem: bool = True
    private_mem: bool = False
    user_memory2: bool = True
    page_shift: int = PAGE_SHIFT
    guest_memfd: bool = True
    guest_memfd_flags: int = 0
    gmem_bound_errno: int = EINVAL
    max_vcpu_ids: int = 4096
    max_vcpus: int = 1024
    manual_dirty_log_caps: int = KVM_DIRTY_LOG_MANUAL_CAPS_X86
    dirty_ring_max: int = _RING_MAX
    dirty_ring_acq_rel: bool = True
    dirty_ring_with_bitmap: bool = False
    reset_dirty_rings: bool = True
    unknown_ioctl_errno: int = ENOTTY
    max_gfn_errno: int = EINVAL
    gmem_needs_mmap: bool = False
    # the rest of what the kernel offers
    vm_types: int = _X86_VM_TYPES_DEFAULT
    memory_attributes: int = 0
    #: arm64: ``KVM_CAP_ARM_VM_IPA_SIZE``, the largest IPA size a VM type may ask for
    ipa_limit: int = 0

    # ----------------------------------------------------------------------------------
    def vm_limits(self, vm_type: int = 0) -> VmLimits:
        """The limits of a VM of ``vm_type`` (``KVM_CREATE_VM``'s argument): EINVAL for a
        type the kernel does not offer (``kvm_arch_init_vm``). On x86 a
        ``KVM_X86_SW_PROTECTED_VM`` has private memory and one address space
        (``kvm_arch_nr_memslot_as_ids``). O(1)."""
        limits = VmLimits(**{f.name: getattr(self, f.name) for f in dataclasses.fields(VmLimits)})
        if self.arch == "arm64":
            # arch/arm64/kvm/arm.c: kvm_arch_init_vm -> kvm_init_ipa_range: the type is
            # the IPA size in bits (0: the default 40), which sets the highest gfn
            ipa = vm_type & _ARM_IPA_SIZE_MASK
            if vm_type & ~_ARM_IPA_SIZE_MASK or (ipa and not 32 <= ipa <= self.ipa_limit):
                raise MemslotError(EINVAL, f"VM type {vm_type:#x}: no such IPA size")
            if ipa:
                limits = dataclasses.replace(limits, max_gfn=(1 << (ipa - self.page_shift)) - 1)
            return limits
        if vm_type and not (0 <= vm_type < 64 and self.vm_types >> vm_type & 1):
            raise MemslotError(EINVAL, f"VM type {vm_type} is not offered by {self.name}")
        if vm_type == KVM_X86_SW_PROTECTED_VM:
            limits = dataclasses.replace(limits, nr_address_spaces=1, private_mem=True)
        return limits

    def with_paging(self, levels: int) -> KernelProfile:
        """The same kernel on a machine with ``levels``-level paging (x86-64: 4 gives
        user addresses below 2^47, 5 below 2^56)."""
        if levels not in (4, 5):
            raise ValueError("paging levels must be 4 or 5")
        size = _TASK_SIZE_5LEVEL if levels == 5 else _TASK_SIZE_4LEVEL
        return dataclasses.replace(self, paging_levels=levels, task_size_max=size)

    def to_dict(self) -> dict[str, Any]:
        """The profile as JSON-ready data (a trace header's ``host.profile``)."""
        d = dataclasses.asdict(self)
        d["version"] = list(self.version)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KernelProfile:
        """The inverse of :meth:`to_dict`; ValueError for data that is not a profile
        (unknown keys are ignored, so newer traces stay readable)."""
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        try:
            version = kwargs.get("version", ())
            kwargs["version"] = (int(version[0]), int(version[1]))
            profile = cls(**kwargs)
            profile.vm_limits()  # the values must make limits
        except (TypeError, ValueError, IndexError, KeyError) as exc:
            raise ValueError(f"not a kernel profile: {exc}") from None
        return profile

    def differences(self, other: KernelProfile) -> list[str]:
        """The answer-affecting fields where ``other`` differs, as ``"field: a -> b"``."""
        skip = {"name", "release", "source"}
        return [
            f"{f.name}: {getattr(self, f.name)!r} -> {getattr(other, f.name)!r}"
            for f in dataclasses.fields(self)
            if f.name not in skip and getattr(self, f.name) != getattr(other, f.name)
        ]

    def summary(self) -> str:
        """One line: what stands out about this kernel (its page size where it is not
        4 KiB)."""
        feats = [
            f"{self.max_user_slots} slots",
            f"{self.nr_address_spaces} address space{'s' if self.nr_address_spaces != 1 else ''}",
            f"vCPU ids < {self.max_vcpu_ids}",
            "REGION2" if self.user_memory2 else "no REGION2",
            "guest_memfd" if self.guest_memfd else "no guest_memfd",
            "dirty ring: "
            + (
                "+".join(
                    name
                    for name, on in (
                        ("plain", self.dirty_ring_max),
                        ("ACQ_REL", self.dirty_ring_acq_rel),
                    )
                    if on
                )
                or "none"
            ),
            f"{self.paging_levels}-level paging",
        ]
        if self.page_shift != PAGE_SHIFT:
            feats.append(f"{1 << (self.page_shift - 10)} KiB pages")
        return ", ".join(feats)

    @property
    def key(self) -> str:
        """The name :meth:`named` knows it by: ``series/arch``, with the page size after
        the architecture where it is not 4 KiB (``"6.12/arm64-16k"``)."""
        pages = "" if self.page_shift == PAGE_SHIFT else f"-{1 << (self.page_shift - 10)}k"
        return f"{self.name}/{self.arch}{pages}"

    # ----------------------------------------------------------------------------------
    @classmethod
    def named(cls, name: str) -> KernelProfile:
        """A named profile: ``"5.10"``, ``"6.1"``, ``"6.12"``, ``"7.2"`` (Debian's x86-64
        kernels), ``"6.18-pvm"`` (the development host's), with ``"/x86_64"`` or
        ``"/arm64"`` after the series for an architecture, ``"/arm64-16k"`` for Debian's
        arm64 kernels with 16 KiB pages. KeyError, listing the names, for any other."""
        key = name if "/" in name else f"{name}/x86_64"
        try:
            return _NAMED[key]
        except KeyError:
            raise KeyError(
                f"no kernel profile {name!r}: known are {', '.join(profile_names())}"
            ) from None

    @classmethod
    def probe(
        cls, kernel: ProbeKernel | None = None, *, path: str = abi.KVM_DEV_PATH,
        release: str | None = None, arch: str | None = None, page_size: int | None = None,
    ) -> KernelProfile:  # fmt: skip
        """The profile of a live kernel: ``/dev/kvm`` of this machine (``path``; its page
        size is ``sysconf(_SC_PAGESIZE)``), or ``kernel``, an object with
        :class:`memslots.kvm.abi.KvmSystem`'s calls (a kernel under QEMU), whose
        ``release``, ``arch`` and ``page_size`` (4096 unless given: the guest reports
        its own) are then given. Every probe is made in pages of that size. Creates a
        few scratch VMs; about 250 ioctls. The host's profile is cached per path.
        Raises :class:`memslots.errors.KvmUnavailable` when the device cannot be used;
        ValueError for a page size KVM is not built with."""
        if kernel is None:
            return _probe_path(path)
        return _probe(kernel, release or "unknown", arch or "x86_64", page_size or PAGE_SIZE)


def profile_names() -> list[str]:
    """Every name :meth:`KernelProfile.named` knows, ``series/arch`` form."""
    return list(_NAMED)


# ======================================================================================
# Probing
# ======================================================================================
class ProbeVm(Protocol):
    """What the probe needs of a VM fd (:class:`memslots.kvm.abi.VmFd`)."""

    def check_extension(self, cap: int) -> int: ...

    def set_user_memory_region(
        self, slot: int, flags: int, guest_phys_addr: int, memory_size: int, userspace_addr: int
    ) -> None: ...

    def set_user_memory_region2(
        self, slot: int, flags: int, guest_phys_addr: int, memory_size: int,
        userspace_addr: int, guest_memfd_offset: int = 0, guest_memfd: int = 0,
    ) -> None: ...  # fmt: skip

    def create_guest_memfd(self, size: int, flags: int = 0) -> int: ...

    def reset_dirty_rings(self) -> int: ...

    def close_fd(self, fd: int) -> None: ...

    def close(self) -> None: ...


class ProbeKernel(Protocol):
    """What the probe needs of a kernel (:class:`memslots.kvm.abi.KvmSystem`)."""

    def check_extension(self, cap: int) -> int: ...

    def create_vm(self, vm_type: int = 0) -> Any: ...


#: scratch hvas of the probe: an unmapped user address (the kernel does not look)
_PROBE_HVA: Final = 0x10000000


def _version(release: str) -> tuple[int, int]:
    parts = release.split(".")
    try:
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)
    except (IndexError, ValueError):
        return 0, 0


def _errno_of(call: Callable[[], object]) -> int:
    """The errno of ``call`` (0 when it succeeds)."""
    try:
        call()
    except MemslotError as exc:
        return exc.errno or 0
    return 0


def _bisect(accepted: Callable[[int], bool], lo: int, hi: int) -> int:
    """The largest value in ``[lo, hi]`` that ``accepted`` takes (``accepted(lo)``
    holds and acceptance is monotonic)."""
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if accepted(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _accepts(vm: ProbeVm, gpa: int, size: int, hva: int) -> bool:
    try:
        vm.set_user_memory_region(0, 0, gpa, size, hva)
    except MemslotError:
        return False
    vm.set_user_memory_region(0, 0, 0, 0, 0)
    return True


def _probe_gmem(
    vm: ProbeVm, profile_flags: int, page: int = PAGE_SIZE
) -> tuple[bool, bool, int, int]:
    """``(private_mem on the default VM, gmem_needs_mmap, errno of a range bound twice,
    creation flags)`` found by trying them: a guest_memfd of 2 pages (of ``page`` bytes),
    bound by one slot, then by another."""
    needs_mmap = False
    flags_ok = profile_flags
    if not flags_ok:
        for bit in range(8):
            try:
                fd = vm.create_guest_memfd(2 * page, 1 << bit)
            except MemslotError:
                continue
            vm.close_fd(fd)
            flags_ok |= 1 << bit
    fd = vm.create_guest_memfd(2 * page, 0)
    try:
        try:
            vm.set_user_memory_region2(1, KVM_MEM_GUEST_MEMFD, 0, page, _PROBE_HVA, 0, fd)
        except MemslotError as exc:
            if exc.errno != EINVAL:
                raise
            if not flags_ok & GUEST_MEMFD_FLAG_MMAP:
                return False, False, EINVAL, flags_ok
            # arm64 7.x: only gmem-only slots, on a guest_memfd made mmap-able
            vm.close_fd(fd)
            fd = vm.create_guest_memfd(2 * page, GUEST_MEMFD_FLAG_MMAP)
            if _errno_of(
                lambda: vm.set_user_memory_region2(
                    1, KVM_MEM_GUEST_MEMFD, 0, page, _PROBE_HVA, 0, fd
                )
            ):
                return False, False, EINVAL, flags_ok
            needs_mmap = True
        bound_errno = 0
        try:
            vm.set_user_memory_region2(2, KVM_MEM_GUEST_MEMFD, page, page, _PROBE_HVA, 0, fd)
        except MemslotError as exc:
            bound_errno = exc.errno or 0
        else:
            vm.set_user_memory_region(2, 0, 0, 0, 0)
        vm.set_user_memory_region(1, 0, 0, 0, 0)
        return True, needs_mmap, bound_errno or EINVAL, flags_ok
    finally:
        vm.close_fd(fd)


def _probe(kernel: ProbeKernel, release: str, arch: str, page: int = PAGE_SIZE) -> KernelProfile:
    """Probe ``kernel``, whose pages are ``page`` bytes: every slot, hva and guest_memfd
    the probes try is made of whole pages of that size."""
    shift = page.bit_length() - 1
    if page != 1 << shift or shift not in PAGE_SHIFTS:
        raise ValueError(f"page size {page}: KVM's kernels have 4, 16 or 64 KiB pages")
    cap = kernel.check_extension
    version = _version(release)
    ring = cap(abi.KVM_CAP_DIRTY_LOG_RING)
    vm_types = cap(abi.KVM_CAP_VM_TYPES) or _X86_VM_TYPES_DEFAULT
    guest_memfd = bool(cap(abi.KVM_CAP_GUEST_MEMFD))
    vm: ProbeVm = kernel.create_vm(0)
    try:
        nr_as = max(1, vm.check_extension(abi.KVM_CAP_MULTI_ADDRESS_SPACE))
        max_gfn = _bisect(
            lambda g: _accepts(vm, g << shift, page, _PROBE_HVA),
            0, (1 << (64 - shift)) - 1,
        )  # fmt: skip
        # the last user page whose one-page slot is accepted: the hva range ends at or
        # below task_size_max
        last_page = _bisect(
            lambda p: _accepts(vm, 0, page, p << shift),
            0, (1 << (64 - shift)) - 1,
        )  # fmt: skip
        task_size_max = (last_page + 1) << shift
        # what a slot one page past the highest gfn gets (none past 2^64: EINVAL, a wrap)
        past = (max_gfn + 1) << shift
        max_gfn_errno = (
            _errno_of(lambda: vm.set_user_memory_region(0, 0, past, page, _PROBE_HVA))
            if past < 1 << 64
            else EINVAL
        )
        # what kvm_arch_vm_ioctl answers to an ioctl the kernel does not have: seen on
        # KVM_CREATE_GUEST_MEMFD where it is missing, else the architecture's default
        unknown_ioctl_errno = ENOTTY if arch == "x86_64" else EINVAL
        if not guest_memfd:
            unknown_ioctl_errno = _errno_of(lambda: vm.create_guest_memfd(page, 0))
        try:
            vm.reset_dirty_rings()
            reset = True
        except MemslotError as exc:
            reset = exc.errno != ENOTTY
        private_mem, needs_mmap, bound_errno, gmem_flags = False, False, EINVAL, 0
        if guest_memfd:
            private_mem, needs_mmap, bound_errno, gmem_flags = _probe_gmem(
                vm, cap(abi.KVM_CAP_GUEST_MEMFD_FLAGS), page
            )
    finally:
        vm.close()
    return KernelProfile(
        name="probed",
        release=release,
        version=version,
        arch=arch,
        page_shift=shift,
        paging_levels=5 if task_size_max > (1 << 48 if arch == "arm64" else 1 << 47) else 4,
        memslot_design="tree" if version >= (5, 17) else "array",
        source="probed: KVM_CHECK_EXTENSION and probes on scratch VMs",
        nr_address_spaces=nr_as,
        max_user_slots=cap(abi.KVM_CAP_NR_MEMSLOTS),
        max_gfn=max_gfn,
        task_size_max=task_size_max,
        readonly_mem=bool(cap(abi.KVM_CAP_READONLY_MEM)),
        private_mem=private_mem,
        user_memory2=bool(cap(abi.KVM_CAP_USER_MEMORY2)),
        guest_memfd=guest_memfd,
        guest_memfd_flags=gmem_flags,
        gmem_bound_errno=bound_errno,
        gmem_needs_mmap=needs_mmap,
        max_vcpu_ids=cap(abi.KVM_CAP_MAX_VCPU_ID) or 1,
        max_vcpus=cap(abi.KVM_CAP_MAX_VCPUS) or 1,
        manual_dirty_log_caps=cap(abi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2),
        dirty_ring_max=ring,
        dirty_ring_acq_rel=bool(cap(abi.KVM_CAP_DIRTY_LOG_RING_ACQ_REL)),
        dirty_ring_with_bitmap=bool(cap(abi.KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP)),
        reset_dirty_rings=reset,
        unknown_ioctl_errno=unknown_ioctl_errno or ENOTTY,
        max_gfn_errno=max_gfn_errno or EINVAL,
        ipa_limit=cap(KVM_CAP_ARM_VM_IPA_SIZE) if arch == "arm64" else 0,
        vm_types=vm_types,
        memory_attributes=cap(abi.KVM_CAP_MEMORY_ATTRIBUTES),
    )


@functools.cache
def _probe_path(path: str) -> KernelProfile:
    with abi.KvmSystem(path) as system:
        uname = os.uname()
        arch = "arm64" if uname.machine == "aarch64" else uname.machine
        return _probe(system, uname.release, arch, os.sysconf("SC_PAGE_SIZE"))


# ======================================================================================
# Named profiles
# ======================================================================================
def _named() -> Iterator[KernelProfile]:
    debian = "measured on Debian's kernel under QEMU (-cpu max,la57=off)"
    yield KernelProfile(
        # 5.10: array memslots, 509 user slots (KVM_USER_MEM_SLOTS before 5.11), no
        # REGION2, no guest_memfd, no dirty ring (5.11+: ENABLE_CAP is EINVAL and
        # KVM_RESET_DIRTY_RINGS an unknown ioctl), KVM_MAX_VCPU_ID 1023, KVM_MAX_VCPUS
        # 288, and no max-gfn check in kvm_arch_prepare_memory_region (5.18+): only the
        # wrap of gpa + size past 2^64 limits a slot
        name="5.10", release="5.10", version=(5, 10), memslot_design="array", source=debian,
        max_user_slots=509, max_gfn=(1 << 52) - 2, user_memory2=False, guest_memfd=False,
        max_vcpu_ids=1023, max_vcpus=288, dirty_ring_max=0, dirty_ring_acq_rel=False,
        reset_dirty_rings=False,
    )  # fmt: skip
    yield KernelProfile(
        name="6.1", release="6.1", version=(6, 1), source=debian,
        user_memory2=False, guest_memfd=False, max_vcpu_ids=4096, max_vcpus=1024,
    )  # fmt: skip
    yield KernelProfile(
        # Debian sets CONFIG_KVM_MAX_NR_VCPUS=4096: vCPU ids up to 16383; guest_memfd
        # exists but the default VM type takes no KVM_MEM_GUEST_MEMFD slot
        name="6.12", release="6.12", version=(6, 12), source=debian,
        max_vcpu_ids=16384, max_vcpus=4096, memory_attributes=8,
    )  # fmt: skip
    yield KernelProfile(
        # guest_memfd slots on the default VM, the creation flags MMAP and INIT_SHARED,
        # and kvm_gmem_bind answers EEXIST for a range already bound
        name="7.2", release="7.2", version=(7, 2), source=debian,
        max_vcpu_ids=16384, max_vcpus=4096, memory_attributes=8, private_mem=True,
        guest_memfd_flags=GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
        gmem_bound_errno=EEXIST,
    )  # fmt: skip
    arm64 = KernelProfile(
        name="", release="", version=(0, 0),
        # arm64: no internal slots (32767 user slots), one address space, a 40-bit IPA
        # for VM type 0 (the type sets it: KVM_VM_TYPE_ARM_IPA_SIZE), EFAULT past it,
        # only the ACQ_REL dirty ring (with a bitmap), EINVAL for unknown VM ioctls, a
        # 52-bit user address space (LPA2 under QEMU's max CPU), 512 vCPUs (GICv3)
        arch="arm64", source="measured on Debian's arm64 kernel under QEMU (virt, GICv3)",
        nr_address_spaces=1, max_user_slots=32767, max_gfn=(1 << 28) - 1,
        max_gfn_errno=EFAULT, task_size_max=1 << 52, paging_levels=5, ipa_limit=52,
        max_vcpu_ids=512, max_vcpus=512, dirty_ring_max=0, dirty_ring_acq_rel=True,
        dirty_ring_with_bitmap=True, unknown_ioctl_errno=EINVAL,
    )  # fmt: skip
    yield dataclasses.replace(
        arm64, name="6.12", release="6.12", version=(6, 12), guest_memfd=False
    )
    arm64_72 = dataclasses.replace(
        # guest_memfd, whose slots must be mmap-able (gmem-only) on arm64, and
        # kvm_gmem_bind's EEXIST for a range already bound, as on x86
        arm64, name="7.2", release="7.2", version=(7, 2), private_mem=True,
        gmem_needs_mmap=True, gmem_bound_errno=EEXIST,
        guest_memfd_flags=GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
    )  # fmt: skip
    yield arm64_72
    # Debian's arm64-16k flavour (CONFIG_ARM64_16K_PAGES): the same answers in 16 KiB
    # pages; the 40-bit IPA of VM type 0 is 2^26 gfns
    pages16k: dict[str, Any] = {
        "page_shift": 14, "max_gfn": (1 << 26) - 1,
        "source": "measured on Debian's arm64-16k kernel under QEMU (virt, GICv3)",
    }  # fmt: skip
    yield dataclasses.replace(
        arm64, name="6.12", release="6.12", version=(6, 12), guest_memfd=False, **pages16k
    )
    yield dataclasses.replace(arm64_72, **pages16k)
    yield KernelProfile(
        # the development host: KVM's PVM backend, no SMM address space, no guest_memfd
        # (CONFIG_KVM_GUEST_MEMFD off since its 2026-12 build); max gfn 2^40 - 1
        name="6.18-pvm", release="6.18-pvm", version=(6, 18),
        source="measured on the development host's /dev/kvm (Linux 6.18, KVM PVM)",
        nr_address_spaces=1, max_gfn=(1 << 40) - 1, guest_memfd=False,
    )  # fmt: skip


_NAMED: Final = {p.key: p for p in _named()}
