"""KVM memslot ABI constants (x86-64), named as in the kernel's uapi and kvm_host.h.

Values follow ``include/uapi/linux/kvm.h`` and ``include/linux/kvm_host.h`` of mainline
Linux.
"""

from __future__ import annotations

from typing import Final

#: the default page size, 4 KiB (x86-64, and arm64's usual build); a VM's own is
#: ``VmLimits.page_shift``
PAGE_SHIFT: Final = 12
PAGE_SIZE: Final = 1 << PAGE_SHIFT
#: the page sizes KVM's kernels are built with: 4 KiB, and on arm64 also 16 and 64 KiB
#: (``CONFIG_ARM64_16K_PAGES``, ``CONFIG_ARM64_64K_PAGES``)
PAGE_SHIFTS: Final = (12, 14, 16)

# uapi memslot flags (bits 0-15 are user flags)
KVM_MEM_LOG_DIRTY_PAGES: Final = 1 << 0
KVM_MEM_READONLY: Final = 1 << 1
KVM_MEM_GUEST_MEMFD: Final = 1 << 2

#: flags the v1 ioctl (KVM_SET_USER_MEMORY_REGION) accepts at all
KVM_SET_USER_MEMORY_REGION_V1_FLAGS: Final = KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY

#: internal flag of the temporary copy used while a slot is deleted or moved
KVM_MEMSLOT_INVALID: Final = 1 << 16

#: set in a memslot set's generation while a swap is in flight
KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS: Final = 1 << 63

#: ids below this are user slots; x86 keeps 3 internal slots above them
KVM_MEM_SLOTS_NUM: Final = 0x7FFF  # SHRT_MAX
KVM_INTERNAL_MEM_SLOTS_X86: Final = 3
KVM_USER_MEM_SLOTS_X86: Final = KVM_MEM_SLOTS_NUM - KVM_INTERNAL_MEM_SLOTS_X86  # 32764

#: maximum number of pages in one memslot
KVM_MEM_MAX_NR_PAGES: Final = (1 << 31) - 1

#: x86-64 address spaces (normal and SMM)
KVM_ADDRESS_SPACE_NUM_X86: Final = 2

#: highest gfn x86 accepts with a 52-bit guest physical address space
#: (kvm_mmu_max_gfn(); this machine's kernel was measured to accept a slot ending at 2^52)
X86_MAX_GFN: Final = (1 << (52 - PAGE_SHIFT)) - 1

#: x86-64 TASK_SIZE_MAX with 4-level paging: an hva range must end at or below it
X86_TASK_SIZE_MAX: Final = (1 << 47) - PAGE_SIZE

# KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 bits
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE: Final = 1 << 0
KVM_DIRTY_LOG_INITIALLY_SET: Final = 1 << 1
KVM_DIRTY_LOG_MANUAL_CAPS_X86: Final = (
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET
)

#: what kvm_is_error_hva() rejects: gfn_to_hva() of a hole, an INVALID slot, or (write)
#: a read-only slot gives one of these (``include/linux/kvm_host.h``)
KVM_HVA_ERR_BAD: Final = 1 << 63
KVM_HVA_ERR_RO_BAD: Final = KVM_HVA_ERR_BAD + PAGE_SIZE

#: x86 ``KVM_MAX_VCPU_IDS`` (``KVM_CHECK_EXTENSION(KVM_CAP_MAX_VCPU_ID)``): a vCPU id must be
#: below it; and ``KVM_MAX_VCPUS`` (``KVM_CAP_MAX_VCPUS``), vCPUs per VM
KVM_MAX_VCPU_IDS_X86: Final = 4096
KVM_MAX_VCPUS_X86: Final = 1024

# the dirty ring (KVM_CAP_DIRTY_LOG_RING, include/uapi/linux/kvm.h, kvm_dirty_ring.h)
#: ``struct kvm_dirty_gfn.flags``: published by KVM / harvested by userspace
KVM_DIRTY_GFN_F_DIRTY: Final = 1 << 0
KVM_DIRTY_GFN_F_RESET: Final = 1 << 1
KVM_DIRTY_GFN_F_MASK: Final = 0x3
#: ``sizeof(struct kvm_dirty_gfn)``: ``u32 flags, u32 slot, u64 offset``
KVM_DIRTY_GFN_SIZE: Final = 16
#: entries every ring keeps free for pushes between the soft-full request and the exit
KVM_DIRTY_RING_RSVD_ENTRIES: Final = 64
#: the largest ring, in entries (1 MiB)
KVM_DIRTY_RING_MAX_ENTRIES: Final = 65536
#: where a vCPU fd maps its ring, in pages (x86's ``KVM_DIRTY_LOG_PAGE_OFFSET``)
KVM_DIRTY_LOG_PAGE_OFFSET: Final = 64

U64_MAX: Final = (1 << 64) - 1
U32_MAX: Final = (1 << 32) - 1
