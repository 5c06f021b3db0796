"""Every validation rule of KVM_SET_USER_MEMORY_REGION(2) with its errno
(``kvm_set_memory_region`` and what this machine's kernel answers), in the kernel's
order, against every implementation; the resulting slot table against tests/model.py."""

from __future__ import annotations

import errno
from collections.abc import Callable

import pytest

from conftest import AnyVm
from memslots import (
    KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
    Change,
    MemslotError,
    Vm,
)
from model import Model

MB = 1 << 20
HVA = 0x7F0000000000
TASK = 0x7FFFFFFFF000
EINVAL, EEXIST = errno.EINVAL, errno.EEXIST

# An existing slot 0: gpa 1 MiB, 1 MiB, hva HVA; slot 1: gpa 4 MiB, 1 MiB, read-only.
SETUP = [(0, 0, MB, MB, HVA), (1, KVM_MEM_READONLY, 4 * MB, MB, HVA + 16 * MB)]

# (name, (slot, flags, gpa, size, hva), v2, expected errno or 0)
CASES: list[tuple[str, tuple[int, int, int, int, int], bool, int]] = [
    ("create ok", (2, 0, 8 * MB, MB, HVA), False, 0),
    ("unknown flag bit 3", (2, 1 << 3, 8 * MB, MB, HVA), False, EINVAL),
    ("unknown flag bit 31", (2, 1 << 31, 8 * MB, MB, HVA), False, EINVAL),
    ("GUEST_MEMFD through v1", (2, KVM_MEM_GUEST_MEMFD, 8 * MB, MB, HVA), False, EINVAL),
    ("GUEST_MEMFD without private mem (v2)", (2, KVM_MEM_GUEST_MEMFD, 8 * MB, MB, HVA), True,
     EINVAL),
    ("slot id 32764", (32764, 0, 8 * MB, MB, HVA), False, EINVAL),
    ("slot id 32767", (32767, 0, 8 * MB, MB, HVA), False, EINVAL),
    ("slot id 0xffff", (0xFFFF, 0, 8 * MB, MB, HVA), False, EINVAL),
    ("last user id", (32763, 0, 8 * MB, MB, HVA), False, 0),
    ("unaligned size", (2, 0, 8 * MB, MB + 1, HVA), False, EINVAL),
    ("unaligned gpa", (2, 0, 8 * MB + 512, MB, HVA), False, EINVAL),
    ("unaligned hva", (2, 0, 8 * MB, MB, HVA + 8), False, EINVAL),
    ("hva range ends at TASK_SIZE_MAX", (2, 0, 8 * MB, 4096, TASK - 4096), False, 0),
    ("hva range past TASK_SIZE_MAX", (2, 0, 8 * MB, 8192, TASK - 4096), False, EINVAL),
    ("hva is the last user page", (2, 0, 8 * MB, 4096, TASK), False, EINVAL),
    ("kernel-half hva", (2, 0, 8 * MB, 4096, 0xFFFF800000000000), False, EINVAL),
    ("hva 0 accepted", (2, 0, 8 * MB, 4096, 0), False, 0),
    ("as_id 2", ((2 << 16) | 2, 0, 8 * MB, MB, HVA), False, EINVAL),
    ("as_id 1 is SMM on x86", ((1 << 16) | 2, 0, MB, MB, HVA), False, 0),
    ("gpa range wraps", (2, 0, (1 << 64) - 4096, 8192, HVA), False, EINVAL),
    ("gpa range ends exactly at 2^64", (2, 0, (1 << 64) - 4096, 4096, HVA), False, EINVAL),
    ("2^31 pages", (2, 0, 0, 1 << 43, 0), False, EINVAL),
    ("2^31-1 pages (max_gfn permitting)", (2, 0, 1 << 44, ((1 << 31) - 1) << 12, 0), False, 0),
    ("gfn beyond max_gfn", (2, 0, 1 << 52, 4096, HVA), False, EINVAL),
    ("slot ending at 2^52", (2, 0, (1 << 52) - 4096, 4096, HVA), False, 0),
    ("delete missing slot", (2, 0, 0, 0, 0), False, EINVAL),
    ("delete ok, gpa/hva/flags ignored", (0, KVM_MEM_LOG_DIRTY_PAGES, 5 * 4096, 0, 4096), False,
     0),
    ("delete with unaligned hva", (0, 0, 0, 0, 8), False, EINVAL),
    ("delete with unknown flag", (0, 1 << 5, 0, 0, 0), False, EINVAL),
    ("change hva", (0, 0, MB, MB, HVA + 4096), False, EINVAL),
    ("change size", (0, 0, MB, 2 * MB, HVA), False, EINVAL),
    ("set READONLY", (0, KVM_MEM_READONLY, MB, MB, HVA), False, EINVAL),
    ("clear READONLY", (1, 0, 4 * MB, MB, HVA + 16 * MB), False, EINVAL),
    ("move and change hva", (0, 0, 2 * MB, MB, HVA + 4096), False, EINVAL),
    ("no-op re-set", (0, 0, MB, MB, HVA), False, 0),
    ("flags-only LOG_DIRTY", (0, KVM_MEM_LOG_DIRTY_PAGES, MB, MB, HVA), False, 0),
    ("LOG_DIRTY on a READONLY slot", (1, KVM_MEM_READONLY | 1, 4 * MB, MB, HVA + 16 * MB),
     False, 0),
    ("move to free space", (0, 0, 16 * MB, MB, HVA), False, 0),
    ("move overlapping own old range", (0, 0, MB + 4096, MB, HVA), False, 0),
    ("move with LOG_DIRTY on", (0, KVM_MEM_LOG_DIRTY_PAGES, 16 * MB, MB, HVA), False, 0),
    ("move onto another slot", (0, 0, 4 * MB, MB, HVA), False, EEXIST),
    ("create exact overlap", (2, 0, MB, MB, HVA), False, EEXIST),
    ("create partial left", (2, 0, MB - 4096, 8192, HVA), False, EEXIST),
    ("create partial right", (2, 0, 2 * MB - 4096, 8192, HVA), False, EEXIST),
    ("create contained", (2, 0, MB + 8192, 4096, HVA), False, EEXIST),
    ("create containing", (2, 0, 0, 8 * MB, HVA), False, EEXIST),
    ("create last page only", (2, 0, 2 * MB - 4096, 4096, HVA), False, EEXIST),
    ("create adjacent below", (2, 0, MB - 4096, 4096, HVA), False, 0),
    ("create adjacent above", (2, 0, 2 * MB, 4096, HVA), False, 0),
    ("same hva as another slot", (2, 0, 8 * MB, MB, HVA), False, 0),
    ("overlap in the other address space", ((1 << 16) | 0, 0, MB, MB, HVA), False, 0),
    ("READONLY|LOG_DIRTY create", (2, 3, 8 * MB, MB, HVA), False, 0),
    # two broken rules: the first in kernel order wins
    ("bad flag and bad slot id: v1 flag check first", (32764, 1 << 2, 8 * MB, MB, HVA), False,
     EINVAL),
    ("unaligned gpa and overlap: EINVAL first", (2, 0, MB + 1, MB, HVA), False, EINVAL),
    ("bad as_id and delete of missing: EINVAL", ((3 << 16) | 7, 0, 0, 0, 0), False, EINVAL),
    ("changed size and overlap: EINVAL first", (0, 0, 4 * MB, 2 * MB, HVA), False, EINVAL),
]  # fmt: skip


def _table(vm: AnyVm) -> list[tuple[int, int, int, int, int, int]]:
    return [s.as_tuple() for s in vm.slots()]


@pytest.mark.parametrize(("name", "req", "v2", "expected"), CASES, ids=[c[0] for c in CASES])
def test_errno_rules(
    make_vm: Callable[..., AnyVm],
    name: str,
    req: tuple[int, int, int, int, int],
    v2: bool,
    expected: int,
) -> None:
    vm = make_vm()
    model = Model(nr_as=vm.nr_address_spaces)  # the slot table the kernel would have
    for s in SETUP:
        vm.set_user_memory_region(*s)
        assert model.apply(False, *s) == 0
    before = _table(vm)
    assert before == model.table()
    gens = [vm.memslots(a).generation for a in range(vm.nr_address_spaces)]
    assert model.apply(v2, *req) == expected, "the model disagrees with the case"
    call = vm.set_user_memory_region2 if v2 else vm.set_user_memory_region
    if expected:
        with pytest.raises(MemslotError) as exc:
            call(*req)
        assert exc.value.errno == expected, exc.value
        assert _table(vm) == before, "a failed request changed the slot table"
        assert [vm.memslots(a).generation for a in range(vm.nr_address_spaces)] == gens
    else:
        call(*req)
        assert _table(vm) != before or vm.last_change is Change.NONE
    assert _table(vm) == model.table()
    assert [vm.memslots(a).generation for a in range(vm.nr_address_spaces)] == model.gen
    assert vm.nr_memslot_pages == model.pages
    vm.check_invariants()


def test_error_is_oserror_with_errno() -> None:
    vm = Vm()
    with pytest.raises(OSError) as exc:
        vm.set_user_memory_region(0, 0, 1, 4096, 0)
    assert isinstance(exc.value, MemslotError)
    assert exc.value.errno == EINVAL
    assert exc.value.errno_name == "EINVAL"


@pytest.mark.parametrize(
    "req",
    [(-1, 0, 0, 4096, 0), (1 << 32, 0, 0, 4096, 0), (0, 0, -4096, 4096, 0),
     (0, 0, 1 << 64, 4096, 0), (0, -1, 0, 4096, 0)],
)  # fmt: skip
def test_values_outside_the_abi_are_einval(req: tuple[int, int, int, int, int]) -> None:
    vm = Vm()
    with pytest.raises(MemslotError) as exc:
        vm.set_user_memory_region(*req)
    assert exc.value.errno == EINVAL


def test_limits_are_configurable(make_vm: Callable[..., AnyVm]) -> None:
    vm = make_vm(nr_address_spaces=1, max_user_slots=8, max_gfn=(1 << 20) - 1)
    with pytest.raises(MemslotError) as exc:
        vm.set_user_memory_region(8, 0, 0, 4096, 0)
    assert exc.value.errno == EINVAL
    with pytest.raises(MemslotError) as exc:
        vm.set_user_memory_region(1 << 16, 0, 0, 4096, 0)
    assert exc.value.errno == EINVAL
    with pytest.raises(MemslotError) as exc:  # max gfn: fails in arch prepare
        vm.set_user_memory_region(0, 0, 1 << 32, 4096, 0)
    assert exc.value.errno == EINVAL
    vm.set_user_memory_region(7, 0, (1 << 32) - 4096, 4096, 0)
    assert vm.memslots(0).generation == 1  # one address space: +1 per swap
