"""One real boot: a Debian kernel under QEMU (TCG) with the agent, KVM calls through
RemoteKvmSystem/RemoteVmFd, and a KvmVm on it (the engine against that kernel).

Marked ``qemu`` (deselect with ``-m "not qemu"``). Skips, naming what is missing, without
QEMU, without gcc, or when the kernel can be neither found in the cache nor fetched
(no network). ``MEMSLOTS_TEST_KERNEL`` picks another series (default ``6.12``).
About 10 s with the kernel in the cache.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator

import pytest

from memslots.constants import KVM_MEM_LOG_DIRTY_PAGES
from memslots.errors import MemslotError
from memslots.kvm.abi import KVM_CAP_NR_MEMSLOTS, KVM_CAP_USER_MEMORY
from memslots.tools.kernels import (
    GuestKernel,
    KernelBootError,
    KernelSession,
    RemoteKvmSystem,
    RemoteUnsupported,
    open_kernel,
)
from memslots.tools.kernels.debian import fetch_debian_kernel

pytestmark = pytest.mark.qemu

SERIES = os.environ.get("MEMSLOTS_TEST_KERNEL", "6.12")
HVA = 0x7F0000000000


@pytest.fixture(scope="module")
def session() -> Iterator[KernelSession]:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed (the agent is built with gcc -static)")
    try:
        kernel = fetch_debian_kernel(SERIES)
    except KernelBootError as exc:
        pytest.skip(f"no Debian {SERIES} kernel in the cache and none fetched: {exc}")
    modules = str(kernel.modules) if kernel.modules else None
    with open_kernel(str(kernel.image), modules=modules, progress=False) as k:
        yield k


@pytest.fixture
def guest(session: KernelSession) -> GuestKernel:
    return session.guest


def test_remote_calls(guest: GuestKernel) -> None:
    info = guest.info
    assert info is not None
    assert info.machine == "x86_64" and info.api_version == 12
    kvm = RemoteKvmSystem(guest)
    assert kvm.check_extension(KVM_CAP_USER_MEMORY) == 1
    assert kvm.check_extension(KVM_CAP_NR_MEMSLOTS) > 0
    with kvm.create_vm() as vm:
        vm.set_user_memory_region(0, 0, 0, 1 << 20, HVA)
        with pytest.raises(MemslotError) as e:  # overlaps slot 0
            vm.set_user_memory_region(1, 0, 0x80000, 1 << 20, HVA + (1 << 20))
        assert e.value.errno == errno.EEXIST
        vm.set_user_memory_region(2, KVM_MEM_LOG_DIRTY_PAGES, 1 << 30, 1 << 20, HVA)
        assert vm.get_dirty_log(2, 32) == bytes(32)  # no vCPU ever wrote
        with pytest.raises(MemslotError) as e:  # slot 3 does not exist
            vm.get_dirty_log(3, 32)
        assert e.value.errno == errno.ENOENT
        replies = vm.batch(
            [
                vm.set_user_memory_region_call(10 + i, 0, (8 + i) << 21, 1 << 21, HVA)
                for i in range(8)
            ]
        )
        assert [r.errno for r in replies] == [0] * 8
    # the VM is gone from the guest: a new one starts empty
    with kvm.create_vm() as vm:
        vm.set_user_memory_region(1, 0, 0x80000, 1 << 20, HVA)


def test_kvm_vm_on_the_guest_kernel(session: KernelSession) -> None:
    """The engine in strict mode against the guest kernel: every answer must match."""
    guest, profile = session.guest, session.profile
    assert guest.info is not None and profile.release == guest.info.release
    assert "under QEMU" in session.description
    with session.vm_factory(strict=True) as vm:
        vm.set_user_memory_region(0, 0, 0, 1 << 20, HVA)
        with pytest.raises(MemslotError) as e:
            vm.set_user_memory_region(1, 0, 0x80000, 1 << 20, HVA)
        assert e.value.errno == errno.EEXIST
        vm.set_user_memory_region(0, 0, 1 << 21, 1 << 20, HVA)  # MOVE
        vm.set_user_memory_region(0, 0, 0, 0, 0)  # DELETE
        if profile.dirty_ring_max:
            vm.enable_dirty_ring(4096)
            vcpu = vm.create_vcpu(0)
            assert vcpu.harvest_dirty_ring() == []  # read from the guest's ring
            with pytest.raises(RemoteUnsupported, match="not supported on a kernel booted"):
                vcpu.run()
            assert vm.reset_dirty_rings() == 0
        assert vm.disagreements == []
