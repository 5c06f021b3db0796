"""The VMM author's calls of tests/test_vm_api_extras.py on a real VM (KvmVm, strict
mode): the same code runs on Vm, ArrayVm and KvmVm, and on KvmVm the kernel agrees."""

from __future__ import annotations

import ctypes
import errno

import pytest

from memslots import KVM_MEM_LOG_DIRTY_PAGES, MemslotError
from memslots.dirty_log import dirty_pages
from memslots.kvm import KvmVm

pytestmark = pytest.mark.kvm
P = 4096


class Entry(ctypes.Structure):
    _fields_ = (("addr", ctypes.c_uint64), ("len", ctypes.c_uint32))


def test_the_vmm_calls_on_a_real_vm() -> None:
    with KvmVm() as vm:
        mem = vm.host_memory(4 * P)
        gpa = vm.find_free_gpa(4 * P, align=1 << 20, start=1 << 30)
        assert gpa == 1 << 30
        slot = vm.free_slot_id()
        assert slot == 0
        vm.set_user_memory_region(slot, KVM_MEM_LOG_DIRTY_PAGES, gpa, 4 * P, mem.addr)
        assert vm.free_slot_id() == 1
        gfn = gpa >> 12
        assert vm.free_gfn_ranges(gfn, gfn + 8) == [(gfn + 4, gfn + 8)]
        vm.write_obj(gpa + 2 * P, Entry(0x1234, 5))
        vm.write_obj(gpa + 3 * P, 0xBEEF, ctypes.c_uint16)
        assert vm.read_obj(gpa + 2 * P, Entry).addr == 0x1234
        # the kernel's log and the engine's (the host write) are merged and compared
        assert dirty_pages(vm.get_dirty_log(slot)) == [2, 3]
        (region,) = vm.regions()
        assert region.memory is mem and region.gpa == gpa
        with region.view() as v:
            assert bytes(v[3 * P : 3 * P + 2]) == b"\xef\xbe"
        assert vm.disagreements == []
    assert mem.closed
    with pytest.raises(MemslotError) as exc:
        vm.host_memory(P)
    assert exc.value.errno == errno.EBADF
