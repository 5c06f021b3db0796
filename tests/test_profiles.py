"""Kernel profiles: the engine answers as the kernel a profile describes; the probe reads
what this kernel does (whatever it is); the command line's profile and --kernel options."""

from __future__ import annotations

import json
from errno import EEXIST, EFAULT, EINVAL, ENOTTY

import pytest

from conftest import host_profile
from memslots import KernelProfile, MemslotError, Vm
from memslots.baseline import ArrayVm
from memslots.constants import KVM_MEM_GUEST_MEMFD, PAGE_SIZE
from memslots.profiles import profile_names
from memslots.tools.cli import main

HVA = 0x7F0000000000


def errno_of(call: object) -> int:
    try:
        call()  # type: ignore[operator]
    except MemslotError as exc:
        return exc.errno or 0
    return 0


@pytest.mark.parametrize("impl", [Vm, ArrayVm])
def test_5_10_answers_as_5_10(impl: type[Vm] | type[ArrayVm]) -> None:
    vm = impl(profile=KernelProfile.named("5.10"))
    assert errno_of(lambda: vm.set_user_memory_region(508, 0, 0, PAGE_SIZE, HVA)) == 0
    assert errno_of(lambda: vm.set_user_memory_region(509, 0, PAGE_SIZE, PAGE_SIZE, HVA)) == EINVAL
    assert errno_of(lambda: vm.set_user_memory_region2(1, 0, 0, PAGE_SIZE, HVA)) == ENOTTY
    assert errno_of(lambda: vm.create_guest_memfd(PAGE_SIZE)) == ENOTTY
    if isinstance(vm, Vm):  # the array design has no dirty ring
        assert errno_of(lambda: vm.reset_dirty_rings()) == ENOTTY
        assert errno_of(lambda: vm.enable_dirty_ring(1 << 16)) == EINVAL
    assert errno_of(lambda: vm.create_vcpu(1022)) == 0
    assert errno_of(lambda: vm.create_vcpu(1023)) == EINVAL
    # no max-gfn check before 5.18: a slot near the top of the gpa space is accepted
    top = ((1 << 52) - 2) << 12
    assert errno_of(lambda: vm.set_user_memory_region(2, 0, top, PAGE_SIZE, HVA)) == 0


def test_6_1_has_no_region2_and_6_12_takes_bigger_vcpu_ids() -> None:
    old, new = Vm(profile=KernelProfile.named("6.1")), Vm(profile=KernelProfile.named("6.12"))
    assert errno_of(lambda: old.set_user_memory_region2(0, 0, 0, PAGE_SIZE, HVA)) == ENOTTY
    assert errno_of(lambda: new.set_user_memory_region2(0, 0, 0, PAGE_SIZE, HVA)) == 0
    assert errno_of(lambda: old.create_vcpu(4096)) == EINVAL
    assert errno_of(lambda: new.create_vcpu(4096)) == 0


def test_7_2_binds_guest_memfd_on_the_default_vm_and_answers_eexist_for_a_range_bound_twice() -> (
    None
):
    vm = Vm(profile=KernelProfile.named("7.2"))
    fd = vm.create_guest_memfd(2 * PAGE_SIZE)
    set2 = vm.set_user_memory_region2
    assert errno_of(lambda: set2(1, KVM_MEM_GUEST_MEMFD, 0, PAGE_SIZE, HVA, 0, fd)) == 0
    assert errno_of(lambda: set2(2, KVM_MEM_GUEST_MEMFD, PAGE_SIZE, PAGE_SIZE, HVA, 0, fd)) == (
        EEXIST
    )
    # 6.12 takes no guest_memfd slot on the default VM at all
    old = Vm(profile=KernelProfile.named("6.12"))
    fd12 = old.create_guest_memfd(2 * PAGE_SIZE)
    assert errno_of(lambda: old.set_user_memory_region2(1, 4, 0, PAGE_SIZE, HVA, 0, fd12)) == (
        EINVAL
    )


def test_arm64_ipa_sizes_set_the_highest_gfn_and_efault_past_it() -> None:
    p = KernelProfile.named("6.12/arm64")
    assert p.vm_limits(0).max_gfn == (1 << 28) - 1  # 40-bit IPA by default
    assert p.vm_limits(36).max_gfn == (1 << 24) - 1
    for bad in (31, p.ipa_limit + 1, 0x100 | 40):
        with pytest.raises(MemslotError) as info:
            p.vm_limits(bad)
        assert info.value.errno == EINVAL
    vm = Vm(profile=p, vm_type=36)
    assert (
        errno_of(lambda: vm.set_user_memory_region(0, 0, (1 << 36) - PAGE_SIZE, PAGE_SIZE, HVA))
        == 0
    )
    assert errno_of(lambda: vm.set_user_memory_region(1, 0, 1 << 36, PAGE_SIZE, HVA)) == EFAULT
    assert errno_of(lambda: vm.set_user_memory_region(32766, 0, 1 << 20, PAGE_SIZE, HVA)) == 0
    # arm64 answers EINVAL for an ioctl it does not have, and has only the ACQ_REL ring
    assert errno_of(lambda: vm.create_guest_memfd(PAGE_SIZE)) == EINVAL
    assert errno_of(lambda: vm.enable_dirty_ring(1 << 16)) == EINVAL
    assert errno_of(lambda: vm.enable_dirty_ring(1 << 16, acq_rel=True)) == 0


def test_arm64_7_2_guest_memfd_slots_need_an_mmap_able_guest_memfd() -> None:
    vm = Vm(profile=KernelProfile.named("7.2/arm64"))
    plain = vm.create_guest_memfd(PAGE_SIZE)
    mappable = vm.create_guest_memfd(PAGE_SIZE, 1)  # GUEST_MEMFD_FLAG_MMAP
    set2 = vm.set_user_memory_region2
    assert errno_of(lambda: set2(1, KVM_MEM_GUEST_MEMFD, 0, PAGE_SIZE, HVA, 0, plain)) == EINVAL
    assert vm.id_to_memslot(1) is None  # refused in prepare, the binding undone
    assert errno_of(lambda: set2(1, KVM_MEM_GUEST_MEMFD, 0, PAGE_SIZE, HVA, 0, mappable)) == 0
    vm.check_invariants()


def test_profiles_round_trip_and_name_what_differs() -> None:
    for name in profile_names():
        p = KernelProfile.named(name)
        assert KernelProfile.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    a, b = KernelProfile.named("6.1"), KernelProfile.named("6.12")
    diffs = a.differences(b)
    assert any(d.startswith("user_memory2: False -> True") for d in diffs)
    assert not any(d.startswith("max_user_slots") for d in diffs)
    with pytest.raises(KeyError, match="known are"):
        KernelProfile.named("4.19")
    with pytest.raises(ValueError, match="not a kernel profile"):
        KernelProfile.from_dict({"name": "x"})
    assert KernelProfile.named("7.2").with_paging(5).task_size_max == (1 << 56) - PAGE_SIZE


@pytest.mark.kvm
def test_the_probe_says_what_this_kernel_does() -> None:
    """Whatever this kernel is: the probed highest gfn and user address line are exact,
    and the probed vCPU-id limit is where the kernel starts refusing."""
    from memslots.kvm.abi import KvmSystem

    p = host_profile()
    assert p.release and p.arch in ("x86_64", "arm64")
    with KvmSystem() as kvm, kvm.create_vm() as vm:
        top = p.max_gfn << 12
        assert errno_of(lambda: vm.set_user_memory_region(0, 0, top, PAGE_SIZE, HVA)) == 0
        vm.set_user_memory_region(0, 0, 0, 0, 0)
        if top + PAGE_SIZE < 1 << 64:
            past = errno_of(
                lambda: vm.set_user_memory_region(0, 0, top + PAGE_SIZE, PAGE_SIZE, HVA)
            )
            assert past == p.max_gfn_errno
        last = p.task_size_max - PAGE_SIZE
        assert errno_of(lambda: vm.set_user_memory_region(1, 0, 0, PAGE_SIZE, last)) == 0
        vm.set_user_memory_region(1, 0, 0, 0, 0)
        assert errno_of(
            lambda: vm.set_user_memory_region(1, 0, 0, PAGE_SIZE, last + PAGE_SIZE)
        ) == (EINVAL)
        fd = vm.create_vcpu(p.max_vcpu_ids - 1)
        vm.close_fd(fd)
        assert errno_of(lambda: vm.create_vcpu(p.max_vcpu_ids)) == EINVAL


# --------------------------------------------------------------------------- the CLI


def test_profiles_command_lists_every_named_profile(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profiles"]) == 0
    out = capsys.readouterr().out
    for name in profile_names():
        assert any(line.startswith(name + " ") for line in out.splitlines()), name
    assert main(["profiles", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    # series/arch, with the page size where it is not 4 KiB (6.12/arm64-16k)
    assert [KernelProfile.from_dict(p).key for p in doc["profiles"]] == profile_names()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["conform", "--arch", "arm64"], "--arch needs --kernel"),
        (["conform", "--modules", "/tmp", "--paging", "5"], "--modules and --paging need --kernel"),
        (["conform", "--kernel", "debian:4.19"], "unknown Debian kernel series '4.19'"),
        (["conform", "--kernel", "/nonexistent/bzImage"], "no such kernel image"),
        (["conform", "--kernel", "debian:6.1", "--device", "/dev/x"], "--kernel and --device"),
        (["replay", "--kernel", "debian:6.1", "--no-kvm"], "not with --no-kvm or --profile"),
        (["replay", "--profile", "4.19", "--no-kvm"], "known are 5.10/x86_64"),
    ],
)
def test_kernel_options_refuse_bad_input_in_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_replay_predicts_another_kernel(
    capsys: pytest.CaptureFixture[str], tmp_path: object
) -> None:
    from pathlib import Path

    trace = Path(str(tmp_path)) / "t.jsonl"
    trace.write_text(
        json.dumps({"slot": 0, "flags": 0, "guest_phys_addr": 0, "memory_size": 4096,
                    "userspace_addr": HVA, "result": 0, "v2": True}) + "\n"
    )  # fmt: skip
    assert main(["replay", str(trace), "--profile", "6.1", "--no-kvm", "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    [row] = [r for r in doc["records"] if r.get("kind", "").endswith("2") or "v2" in json.dumps(r)]
    assert "ENOTTY" in json.dumps(row)
