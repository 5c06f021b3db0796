"""memslots.tools.kernels without QEMU: the cpio writer, module ordering, the framing,
``--kernel`` parsing and its errors, the private apt configuration, and the real C agent run
as an ordinary host process over pipes (no mounts, no modules: it only does that as
pid 1), which checks the protocol end to end on calls that need no KVM."""

from __future__ import annotations

import errno
import lzma
import os
import shutil
import stat
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memslots.dirty_ring import DirtyRing
from memslots.errors import MemslotError
from memslots.kvm.abi import KvmSystem, VmFd
from memslots.kvm.ring import KernelRing
from memslots.tools.kernels import agent as agent_mod
from memslots.tools.kernels import debian, spec
from memslots.tools.kernels.initramfs import (
    CpioEntry,
    collect_modules,
    module_depends,
    module_load_order,
    normalize_module_name,
    prune_modules,
    read_cpio,
    write_cpio,
    write_initramfs,
)
from memslots.tools.kernels.protocol import (
    OP_CLOSE,
    OP_FSTAT,
    OP_INFO,
    OP_MMAP,
    OP_OPEN,
    OP_PEEK,
    OP_POKE,
    Call,
    FrameReader,
    ProtocolError,
    decode_reply,
    decode_request_frames,
    decode_sparse,
    encode_frame,
    encode_ioctl,
    encode_request,
    encode_request_frame,
)
from memslots.tools.kernels.qemu import GuestKernel, parse_ready, qemu_command
from memslots.tools.kernels.remote import RemoteKvmSystem, RemoteVcpu, RemoteVmFd, RingMirror
from memslots.tools.kernels.spec import KernelBootError, KernelSpec, cache_dir, parse_spec

# --------------------------------------------------------------------------------------
# cpio


def test_cpio_round_trip_and_layout() -> None:
    entries = [
        CpioEntry("dev", stat.S_IFDIR | 0o755),
        CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdevmajor=5, rdevminor=1),
        CpioEntry("init", stat.S_IFREG | 0o755, b"\x7fELF" + bytes(range(256)) * 3),
        CpioEntry("odd", stat.S_IFREG | 0o644, b"abc"),  # data needs padding
    ]
    data = write_cpio(entries)
    assert data == write_cpio(entries)  # deterministic
    assert len(data) % 4 == 0
    assert data.startswith(b"070701")
    assert read_cpio(data) == entries
    # the trailer is the last member, as the kernel's unpacker expects
    assert b"TRAILER!!!\0" in data[-128:]


@given(
    st.lists(
        st.tuples(
            st.text("abcdefgh/._-", min_size=1, max_size=20),
            st.binary(max_size=70),
        ),
        max_size=6,
    )
)
@settings(max_examples=50, deadline=None)
def test_cpio_round_trip_any_sizes(members: list[tuple[str, bytes]]) -> None:
    entries = [CpioEntry(n, stat.S_IFREG | 0o644, d) for n, d in members]
    assert read_cpio(write_cpio(entries)) == entries


def test_cpio_reader_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        read_cpio(b"not a cpio archive" * 10)
    data = write_cpio([CpioEntry("f", stat.S_IFREG | 0o644, b"x" * 100)])
    with pytest.raises(ValueError):
        read_cpio(data[:150])


@pytest.mark.skipif(shutil.which("cpio") is None, reason="cpio is not installed")
def test_cpio_tool_lists_the_archive(tmp_path: Path) -> None:
    archive = tmp_path / "a.cpio"
    archive.write_bytes(write_initramfs(b"agent", [("kvm.ko", b"elf")]))
    done = subprocess.run(
        ["cpio", "-t"], stdin=archive.open("rb"), capture_output=True, text=True, check=True
    )
    assert "init" in done.stdout.split()
    assert "modules/kvm.ko" in done.stdout.split()


def test_initramfs_members() -> None:
    mods = [("irqbypass.ko", b"A"), ("kvm.ko", b"B"), ("kvm_amd.ko", b"C")]
    members = {e.name: e for e in read_cpio(write_initramfs(b"AGENT", mods))}
    assert members["init"].data == b"AGENT"
    assert members["init"].mode == stat.S_IFREG | 0o755
    console = members["dev/console"]
    assert stat.S_ISCHR(console.mode)
    assert (console.rdevmajor, console.rdevminor) == (5, 1)
    assert members["modules.list"].data == b"irqbypass.ko\nkvm.ko\nkvm_amd.ko\n"
    assert members["modules/kvm.ko"].data == b"B"


# --------------------------------------------------------------------------------------
# modules


def fake_module(depends: str, name: str = "x") -> bytes:
    """An 'ELF' with a .modinfo-like run of NUL-separated strings."""
    return (
        b"\x7fELF\0\0junk\0license=GPL\0"
        + f"depends={depends}\0".encode()
        + f"name={name}\0vermagic=6.1.0 SMP\0".encode()
    )


def make_tree(root: Path, modules: dict[str, str], *, xz: tuple[str, ...] = ()) -> None:
    """``modules``: file name (without suffix) -> depends string, in a /lib/modules-like
    tree; the names in ``xz`` are written compressed."""
    for i, (name, deps) in enumerate(modules.items()):
        where = root / "kernel" / ("arch/x86/kvm" if "kvm" in name else f"drivers/d{i}")
        where.mkdir(parents=True, exist_ok=True)
        data = fake_module(deps, normalize_module_name(name))
        if name in xz:
            (where / f"{name}.ko.xz").write_bytes(lzma.compress(data, format=lzma.FORMAT_XZ))
        else:
            (where / f"{name}.ko").write_bytes(data)


def test_module_depends_parsing() -> None:
    assert module_depends(fake_module("kvm,irqbypass")) == ["kvm", "irqbypass"]
    assert module_depends(fake_module("")) == []
    assert module_depends(b"no modinfo at all") == []
    assert module_depends(fake_module("rng-core")) == ["rng_core"]


def test_normalize_module_name() -> None:
    assert normalize_module_name("kvm-amd.ko.xz") == "kvm_amd"
    assert normalize_module_name("/lib/modules/6.1/kernel/kvm_intel.ko") == "kvm_intel"
    assert normalize_module_name("rng-core.ko.zst") == "rng_core"


def test_load_order_is_the_dependency_closure(tmp_path: Path) -> None:
    # 5.10's shape: ccp needs rng-core; kvm-amd needs kvm and ccp; kvm needs irqbypass
    make_tree(
        tmp_path,
        {
            "kvm-amd": "kvm,ccp",
            "kvm": "irqbypass",
            "ccp": "rng-core",
            "rng-core": "",
            "irqbypass": "",
            "unrelated": "kvm",
        },
        xz=("kvm", "ccp"),
    )
    order = [name for name, _ in collect_modules(tmp_path)]
    assert set(order) == {"kvm_amd.ko", "kvm.ko", "ccp.ko", "rng_core.ko", "irqbypass.ko"}
    pos = {n: i for i, n in enumerate(order)}
    assert pos["irqbypass.ko"] < pos["kvm.ko"] < pos["kvm_amd.ko"]
    assert pos["rng_core.ko"] < pos["ccp.ko"] < pos["kvm_amd.ko"]
    # compressed modules come out decompressed
    data = dict(collect_modules(tmp_path))
    assert data["kvm.ko"].startswith(b"\x7fELF")


def test_load_order_flat_directory_and_both_vendors(tmp_path: Path) -> None:
    for name, deps in {"kvm_intel": "kvm", "kvm-amd": "kvm", "kvm": ""}.items():
        (tmp_path / f"{name}.ko").write_bytes(fake_module(deps))
    assert [n for n, _ in collect_modules(tmp_path)] == ["kvm.ko", "kvm_amd.ko", "kvm_intel.ko"]


def test_load_order_errors() -> None:
    with pytest.raises(KernelBootError, match="kvm_amd needs ccp, which is not there"):
        module_load_order(["kvm-amd"], {"kvm_amd": ["ccp"]})
    with pytest.raises(KernelBootError, match="cycle"):
        module_load_order(["a"], {"a": ["b"], "b": ["a"]})
    assert module_load_order(["kvm-intel"], {"kvm_amd": []}) == []  # absent: skipped


# --------------------------------------------------------------------------------------
# framing


def test_frames_between_garbage() -> None:
    payloads = [b"", b"\x00\x01\xff" * 7, os.urandom(300)]
    stream = (
        b"[    0.000000] Linux version 6.1\r\n"
        + encode_frame(payloads[0])
        + b"kernel: something\n@MS1 zz 00000000\n"  # bad hex: dropped
        + encode_frame(payloads[1])
        + b"@MS1 00 12345678\n"  # bad crc: dropped
        + b"partial line without newline then "
        + encode_frame(payloads[2])
    )
    reader = FrameReader()
    assert reader.feed(stream) == payloads
    assert reader.bad_frames == 2
    assert any("Linux version" in line for line in reader.tail())


@given(st.lists(st.binary(max_size=40), max_size=5), st.integers(1, 50))
@settings(max_examples=60, deadline=None)
def test_frames_survive_any_chunking(payloads: list[bytes], chunk: int) -> None:
    stream = b"noise\n" + b"".join(encode_frame(p) + b"printk\n" for p in payloads)
    reader = FrameReader()
    got: list[bytes] = []
    for i in range(0, len(stream), chunk):
        got += reader.feed(stream[i : i + chunk])
    assert got == payloads


def test_request_frames() -> None:
    a, b = b"hello", os.urandom(100)
    bad = bytearray(encode_request_frame(b"corrupt me"))
    bad[10] ^= 0xFF
    stream = (
        b"\x00garbage" + encode_request_frame(a) + bytes(bad) + b"MS1B" + encode_request_frame(b)
    )
    assert decode_request_frames(stream) == [a, b]
    frame = encode_request_frame(b"xyz")
    assert frame == b"MS1B" + struct.pack("<I", 3) + b"xyz" + struct.pack("<I", zlib.crc32(b"xyz"))


def test_request_and_reply_payloads() -> None:
    calls = [Call(OP_INFO), Call(OP_CLOSE, b"\x05\0\0\0")]
    payload = encode_request(7, calls)
    assert payload[:8] == struct.pack("<II", 7, 2)
    assert payload[8:] == b"\x08\0\0\0\0" + b"\x03\x04\0\0\0\x05\0\0\0"
    reply = struct.pack("<II", 7, 2) + struct.pack("<qiI", 3, 0, 2) + b"ok"
    reply += struct.pack("<qiI", -1, errno.EBADF, 0)
    got = decode_reply(reply, 7, 2)
    assert (got[0].ret, got[0].data) == (3, b"ok")
    assert (got[1].ret, got[1].errno) == (-1, errno.EBADF)
    with pytest.raises(ProtocolError, match="request 7, expected 8"):
        decode_reply(reply, 8, 2)
    with pytest.raises(ProtocolError, match="answered 2 of 3"):
        decode_reply(reply, 7, 3)
    with pytest.raises(ProtocolError, match="truncated"):
        decode_reply(reply[:-3], 7, 2)


def test_sparse_buffers() -> None:
    words = struct.pack("<I", 2) + struct.pack("<IQ", 0, 5) + struct.pack("<IQ", 3, 1 << 63)
    out = decode_sparse(words, 32)
    assert out == struct.pack("<QQQQ", 5, 0, 0, 1 << 63)
    assert (
        decode_sparse(struct.pack("<I", 1) + struct.pack("<IQ", 1, 0xFFFF), 12)[8:]
        == b"\xff\xff\0\0"
    )
    with pytest.raises(ProtocolError):
        decode_sparse(struct.pack("<I", 1) + struct.pack("<IQ", 9, 1), 16)


def test_parse_ready() -> None:
    info, err = parse_ready(b"READY 6.1.0-50-amd64 x86_64 4096 3 0 12 kvm.ko=0 kvm_intel.ko=19")
    assert (info.release, info.machine, info.page_size, info.kvm_fd) == (
        "6.1.0-50-amd64",
        "x86_64",
        4096,
        3,
    )
    assert info.api_version == 12 and err == 0
    assert info.modules == {"kvm.ko": 0, "kvm_intel.ko": errno.ENODEV}
    with pytest.raises(ProtocolError):
        parse_ready(b"hello")


# --------------------------------------------------------------------------------------
# --kernel values, cache, apt configuration, missing tools


def test_spec_parsing(tmp_path: Path) -> None:
    assert parse_spec("debian:7.2", arch="arm64") == KernelSpec(arch="arm64", series="7.2")
    got = parse_spec("debian:6.12/16k", arch="arm64")
    assert got == KernelSpec(arch="arm64", series="6.12", flavour="-16k")
    assert str(got) == "debian:6.12/16k (arm64)"
    assert parse_spec("debian:6.12/4K", arch="arm64") == KernelSpec(arch="arm64", series="6.12")
    image = tmp_path / "bzImage"
    image.write_bytes(b"x")
    got = parse_spec(str(image), modules=str(tmp_path))
    assert (got.image, got.modules, got.series) == (image, tmp_path, None)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("debian:4.19",), "unknown Debian kernel series '4.19': known are 5.10, 6.1, 6.12, 7.2"),
        (("/nonexistent/bzImage",), "/nonexistent/bzImage: no such kernel image"),
        (("debian:6.1", "riscv64"), "unknown architecture 'riscv64': known are x86_64, arm64"),
        (("debian:6.1", "x86_64", "/"), "--modules goes with a kernel image path"),
        (("debian:6.1", "x86_64", "/nonexistent"), "/nonexistent: no such modules directory"),
        (("debian:6.12/64k", "arm64"), "unknown page size '64k': Debian's arm64 kernels come"),
        (("debian:6.12/16k",), "debian:6.12/16k: Debian's 16k kernels are arm64 ones"),
        (("debian:4.19/16k", "arm64"), "unknown Debian kernel series '4.19'"),
    ],
)
def test_spec_errors_are_one_line(args: tuple[str, ...], message: str) -> None:
    arch = args[1] if len(args) > 1 else "x86_64"
    modules = args[2] if len(args) > 2 else None
    with pytest.raises(KernelBootError) as info:
        parse_spec(args[0], arch=arch, modules=modules)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MEMSLOTS_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "memslots" / "kernels"
    monkeypatch.setenv("MEMSLOTS_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"


def test_apt_configuration_is_private(tmp_path: Path) -> None:
    text = debian.apt_config_text(tmp_path)
    for key in (
        "Dir::Etc::SourceList",
        "Dir::Etc::SourceParts",
        "Dir::State::Lists",
        "Dir::State::status",
        "Dir::Cache",
    ):
        line = next(ln for ln in text.splitlines() if ln.startswith(key + " "))
        assert f'"{tmp_path}/' in line, line
    assert 'APT::Architectures { "amd64"; "arm64"; };' in text
    assert "AllowInsecure" not in text and "Trusted" not in text  # signatures stay on
    sources = debian.sources_list_text(("trixie", "bookworm-backports"))
    assert sources.splitlines() == [
        "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg]"
        f" http://deb.debian.org/debian {suite} main"
        for suite in ("trixie", "bookworm-backports")
    ]


def test_series_resolution_picks_the_newest_exact_name() -> None:
    pattern = spec.DEBIAN_SERIES["6.1"][1].format(arch="amd64")
    names = [
        "linux-image-6.1.0-9-amd64",
        "linux-image-6.1.0-50-amd64",
        "linux-image-6.1.0-50-rt-amd64",
        "linux-image-6.1.0-50-amd64-dbg",
        "linux-image-6.1.0-51-arm64",
        "linux-image-6.1.0-47-amd64",
    ]
    assert debian.rank_packages(names, pattern) == [
        "linux-image-6.1.0-50-amd64",
        "linux-image-6.1.0-47-amd64",
        "linux-image-6.1.0-9-amd64",
    ]
    pattern = spec.DEBIAN_SERIES["6.12"][1].format(arch="arm64")
    names = ["linux-image-6.12.9+deb13-arm64", "linux-image-6.12.10+deb13-arm64"]
    assert debian.rank_packages(names, pattern)[0] == "linux-image-6.12.10+deb13-arm64"
    # the arm64-16k flavour: its own packages, not the -dbg or -unsigned ones, and the
    # plain flavour never picks a 16k one
    names = [
        "linux-image-7.2.13+deb14-arm64",
        "linux-image-7.2.13+deb14-arm64-16k",
        "linux-image-7.2.13+deb14-arm64-16k-dbg",
        "linux-image-7.2.13+deb14-arm64-16k-unsigned",
        "linux-image-7.2.9+deb14-arm64-16k",
        "linux-image-arm64-16k",
    ]
    assert debian.rank_packages(names, debian.package_pattern("7.2", "arm64", "-16k")) == [
        "linux-image-7.2.13+deb14-arm64-16k",
        "linux-image-7.2.9+deb14-arm64-16k",
    ]
    assert debian.rank_packages(names, debian.package_pattern("7.2", "arm64")) == [
        "linux-image-7.2.13+deb14-arm64"
    ]


@pytest.mark.parametrize(
    ("arch", "message"),
    [
        ("x86_64", "qemu-system-x86_64 not found: apt-get install qemu-system-x86"),
        ("arm64", "qemu-system-aarch64 not found: apt-get install qemu-system-arm"),
    ],
)
def test_missing_qemu(monkeypatch: pytest.MonkeyPatch, arch: str, message: str) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(KernelBootError, match=message):
        GuestKernel(KernelSpec(arch=arch, series="6.1"), progress=False).boot()


def test_missing_cross_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(KernelBootError) as info:
        agent_mod.build_agent("arm64")
    assert str(info.value) == (
        "aarch64-linux-gnu-gcc not found: apt-get install gcc-aarch64-linux-gnu"
        " libc6-dev-arm64-cross"
    )


def test_qemu_command_lines() -> None:
    x86 = qemu_command("x86_64", "qemu-system-x86_64", Path("/k"), Path("/i"))
    assert x86[x86.index("-cpu") + 1] == "max,la57=off"
    assert "-nodefaults" in x86 and "-no-reboot" in x86
    assert x86[-1] == "console=ttyS0 quiet loglevel=0 panic=-1"
    five = qemu_command("x86_64", "q", Path("/k"), Path("/i"), la57=True)
    assert five[five.index("-cpu") + 1] == "max"
    arm = qemu_command("arm64", "qemu-system-aarch64", Path("/k"), Path("/i"))
    assert arm[arm.index("-M") + 1] == "virt,virtualization=on,gic-version=3"
    assert arm[-1].startswith("console=ttyAMA0 ")


def test_agent_source_is_package_data() -> None:
    source = agent_mod.agent_source()
    assert b"finit_module" in source and b"int main(" in source


# --------------------------------------------------------------------------------------
# the real agent, as a host process (pid != 1: no mounts, no modules, no power-off)


def _static_gcc() -> str | None:
    if shutil.which("gcc") is None:
        return "gcc is not installed"
    return None


@pytest.fixture(scope="module")
def host_agent(tmp_path_factory: pytest.TempPathFactory) -> Path:
    why = _static_gcc()
    if why:
        pytest.skip(why)
    arch = "x86_64" if os.uname().machine == "x86_64" else "arm64"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEMSLOTS_CACHE", str(tmp_path_factory.mktemp("cache")))
        try:
            return agent_mod.build_agent(arch)
        except KernelBootError as exc:
            pytest.skip(f"cannot build the agent here: {exc}")


@pytest.fixture
def agent_guest(host_agent: Path) -> Iterator[GuestKernel]:
    """The agent run on the host over pipes, with /dev/null as its 'KVM device'."""
    guest = GuestKernel(KernelSpec(), progress=False, boot_timeout=30, call_timeout=30)
    guest.description = "host agent"
    guest._start([str(host_agent), "/dev/null"])
    with guest:
        yield guest


def test_agent_ready_and_info(agent_guest: GuestKernel) -> None:
    info = agent_guest.info
    assert info is not None
    assert info.release == os.uname().release
    assert info.page_size == os.sysconf("SC_PAGESIZE")
    assert info.kvm_fd >= 0
    assert info.api_version == -1  # KVM_GET_API_VERSION on /dev/null: ENOTTY
    assert info.modules == {}
    text = agent_guest.call(Call(OP_INFO)).data.decode()
    assert text.split()[0] == os.uname().release


def test_agent_files_and_errnos(agent_guest: GuestKernel) -> None:
    opened = agent_guest.call(Call(OP_OPEN, struct.pack("<I", 0) + b"/dev/null"))
    assert opened.ret >= 0 and opened.errno == 0
    fd = opened.ret
    st_ = os.stat("/dev/null")
    got = agent_guest.call(Call(OP_FSTAT, struct.pack("<I", fd)))
    assert struct.unpack("<QQ", got.data) == (st_.st_dev, st_.st_ino)
    missing = agent_guest.call(Call(OP_OPEN, struct.pack("<I", 0) + b"/nonexistent"))
    assert (missing.ret, missing.errno) == (-1, errno.ENOENT)
    replies = agent_guest.batch(
        [Call(OP_CLOSE, struct.pack("<I", fd)), Call(OP_CLOSE, struct.pack("<I", fd))]
    )
    assert [(r.ret, r.errno) for r in replies] == [(0, 0), (-1, errno.EBADF)]
    assert agent_guest.call(Call(99)).errno == errno.EPROTO  # unknown op
    assert agent_guest.call(Call(OP_CLOSE, b"\x01")).errno == errno.EPROTO  # short args


def test_agent_ioctl_paths(agent_guest: GuestKernel) -> None:
    info = agent_guest.info
    assert info is not None
    vm = RemoteVmFd(agent_guest, info.kvm_fd, vcpu_mmap_size=0)
    # every VmFd call reaches the device and comes back with its errno and name
    with pytest.raises(MemslotError) as e:
        vm.set_user_memory_region(0, 0, 0, 4096, 0x7F0000000000)
    assert e.value.errno == errno.ENOTTY
    assert "KVM_SET_USER_MEMORY_REGION" in str(e.value)
    with pytest.raises(MemslotError, match="KVM_GET_DIRTY_LOG"):
        vm.get_dirty_log(0, 64)
    with pytest.raises(MemslotError, match="KVM_CLEAR_DIRTY_LOG"):
        vm.clear_dirty_log(0, 0, 64, b"\xff" * 8)
    with pytest.raises(ValueError):
        vm.set_user_memory_region(1 << 32, 0, 0, 0, 0)
    # a batch of many calls in one round trip
    trips = agent_guest.round_trips
    replies = vm.batch([encode_ioctl(info.kvm_fd, 0xAE03, 10)] * 300)
    assert agent_guest.round_trips == trips + 1
    assert {(r.ret, r.errno) for r in replies} == {(-1, errno.ENOTTY)}
    # descriptors of the "guest"
    null = vm.open_devnull()
    assert vm.fd_identity(null) == (os.stat("/dev/null").st_dev, os.stat("/dev/null").st_ino)
    vm.close_fd(null)
    with pytest.raises(MemslotError) as e:
        vm.fd_identity(null)
    assert e.value.errno == errno.EBADF


def test_agent_skips_garbage_and_bad_frames(agent_guest: GuestKernel) -> None:
    proc = agent_guest._proc
    assert proc is not None and proc.stdin is not None
    bad = bytearray(encode_request_frame(encode_request(999, [Call(OP_INFO)])))
    bad[-1] ^= 1
    proc.stdin.write(b"line noise MS1\0" + bytes(bad))
    proc.stdin.flush()
    assert agent_guest.call(Call(OP_INFO)).ret == 0  # the next good frame is answered


def test_agent_ring_peek_and_poke(agent_guest: GuestKernel) -> None:
    """A ring mapped from /dev/zero (shared): peek sees what poke stored; the mirror's
    pull/push keep a local copy in step, and KernelRing harvests through it."""
    opened = agent_guest.call(Call(OP_OPEN, struct.pack("<I", 2) + b"/dev/zero"))
    assert opened.ret >= 0
    nbytes = 16 * 64
    handle = agent_guest.call(Call(OP_MMAP, struct.pack("<IQQ", opened.ret, nbytes, 0)))
    assert handle.ret >= 0
    assert agent_guest.call(Call(OP_PEEK, struct.pack("<II", handle.ret, 64))).data == b""
    mirror = RingMirror(agent_guest, handle.ret, nbytes)
    mirror.pull()
    assert bytes(mirror) == bytes(nbytes)
    # "the kernel" publishes two entries: only flags travel through POKE, so publish
    # them by writing the mirror and pushing (the agent stores the flags)
    ring = DirtyRing(nbytes, mirror)
    ring.push(5, 7)
    ring.push(5, 8)
    mirror.push()
    peeked = agent_guest.call(Call(OP_PEEK, struct.pack("<II", handle.ret, 64))).data
    assert [struct.unpack_from("<II", peeked, 20 * i) for i in range(2)] == [(0, 1), (1, 1)]
    # the guest's copy has flags only (slot/offset were never sent): a fresh pull shows
    # exactly what the guest holds
    mirror.pull()
    assert mirror[0:4] == struct.pack("<I", 1) and mirror[16:20] == struct.pack("<I", 1)
    # KernelRing over the mirror: harvest marks RESET here and in the guest
    kring = KernelRing(mirror, nbytes, lambda: {0: 1 << 20}, lambda call, detail: None)
    harvested = kring.harvest()
    assert len(harvested) == 2
    peeked = agent_guest.call(Call(OP_PEEK, struct.pack("<II", handle.ret, 64))).data
    assert [struct.unpack_from("<II", peeked, 20 * i)[1] for i in range(2)] == [3, 3]
    assert kring.predict_reset() == 2
    bad = agent_guest.call(Call(OP_POKE, struct.pack("<III", handle.ret, 64, 1)))
    assert bad.errno == errno.EPROTO  # past the mapping


def test_agent_exit_is_a_clean_error(host_agent: Path) -> None:
    guest = GuestKernel(KernelSpec(), progress=False, boot_timeout=30, call_timeout=30)
    guest.description = "host agent"
    guest._start([str(host_agent), "/dev/null"])
    with guest:
        proc = guest._proc
        assert proc is not None
        proc.kill()
        with pytest.raises(KernelBootError, match="host agent: the guest stopped"):
            guest.call(Call(OP_INFO))
        assert not guest.running


def test_ctrl_c_inside_the_block_kills_the_process(host_agent: Path) -> None:
    guest = GuestKernel(KernelSpec(), progress=False, boot_timeout=30)
    guest._start([str(host_agent), "/dev/null"])
    proc = guest._proc
    assert proc is not None
    with pytest.raises(KeyboardInterrupt), guest:
        raise KeyboardInterrupt
    assert proc.poll() is not None  # killed and reaped
    assert not guest.running


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its new parent counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def test_no_stray_process_when_the_host_dies(host_agent: Path) -> None:
    """The child is killed by the kernel when the process that started it dies without
    cleaning up (SIGKILL): PR_SET_PDEATHSIG."""
    script = (
        "import sys, time\n"
        "from memslots.tools.kernels.qemu import GuestKernel\n"
        "from memslots.tools.kernels.spec import KernelSpec\n"
        "g = GuestKernel(KernelSpec(), progress=False)\n"
        "g._start([sys.argv[1], '/dev/null'])\n"
        "print(g._proc.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    host = subprocess.Popen(
        [sys.executable, "-c", script, str(host_agent)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        assert host.stdout is not None
        child = int(host.stdout.readline())
        assert _alive(child)
    finally:
        host.kill()
        host.wait()
    for _ in range(200):  # bounded wait for the kernel to deliver the signal
        if not _alive(child):
            break
        time.sleep(0.05)
    assert not _alive(child)


def test_prune_keeps_only_the_kvm_closure(tmp_path: Path) -> None:
    make_tree(
        tmp_path,
        {"kvm-amd": "kvm", "kvm": "irqbypass", "irqbypass": "", "snd": "", "e1000": ""},
        xz=("snd",),
    )
    (tmp_path / "modules.dep").write_text("kept\n")  # not a module: stays
    before = collect_modules(tmp_path)
    assert prune_modules(tmp_path) == 2
    assert collect_modules(tmp_path) == before
    left = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert left == ["irqbypass.ko", "kvm-amd.ko", "kvm.ko", "modules.dep"]


def test_remote_classes_offer_the_local_interfaces() -> None:
    """Everything public of the local VmFd/KvmSystem (what KvmVm, the probe and the
    tools call) exists on the remote ones, and what KvmVm uses of a vCPU."""

    def public(cls: type) -> set[str]:
        return {n for n in dir(cls) if not n.startswith("_")}

    assert public(VmFd) - public(RemoteVmFd) == set()
    assert public(KvmSystem) - public(RemoteKvmSystem) == set()
    used_by_kvm_vm = {"fd", "closed", "close", "map_dirty_ring", "run", "run_until_hlt"}
    assert used_by_kvm_vm | {"setup_real_mode", "kick"} <= public(RemoteVcpu)


class _DamagingReader(FrameReader):
    """Damages the first frame line it sees, as a kernel message written into the middle
    of the agent's line would."""

    def __init__(self) -> None:
        super().__init__()
        self.damaged = False

    def feed(self, data: bytes) -> list[bytes]:
        at = data.find(b"@MS1 ")
        if not self.damaged and at >= 0 and len(data) > at + 8:
            data = data[: at + 6] + b"[ 1.0] printk" + data[at + 6 :]
            self.damaged = True
        return super().feed(data)


def test_a_damaged_answer_is_sent_again(agent_guest: GuestKernel) -> None:
    reader = _DamagingReader()
    agent_guest._reader = reader
    reply = agent_guest.call(Call(OP_INFO))
    assert reply.data.decode().split()[0] == os.uname().release
    assert reader.damaged and reader.bad_frames == 1
    assert agent_guest.call(Call(OP_INFO)).ret == 0  # and the exchange is in step
