"""A KVM device that cannot be used is reported the same way everywhere: KvmSystem(),
KvmVm(), kvm_unavailable() and every ``memslots`` command name the cause (permission,
no device, no driver, not a KVM device, another API version) in one line.

The tests run as root, whom file permissions do not stop: a refusing device is stood in
for at ``memslots.kvm.abi._open_device``, and one test drops to user ``nobody`` with
``setpriv`` to meet the real EACCES."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import memslots.kvm.abi as abi
from conftest import EACCES_REASON, refuse
from memslots.errors import KvmUnavailable
from memslots.kvm import KvmVm, kvm_available, kvm_unavailable
from memslots.kvm.abi import KvmSystem
from memslots.tools.cli import main

NO_DRIVER = "no KVM driver behind the device (load kvm_intel or kvm_amd"
NO_DEVICE = "no such device: KVM is not enabled on this machine (load kvm_intel or kvm_amd"
NESTED = "in a virtual machine, turn on nested virtualization"


@pytest.mark.parametrize(
    ("err", "reason"),
    [
        (errno.EACCES, EACCES_REASON),
        (errno.EPERM, EACCES_REASON),
        (errno.ENOENT, NO_DEVICE),
        (errno.ENXIO, NO_DRIVER),
        (errno.ENODEV, NO_DRIVER),
        (errno.EBUSY, os.strerror(errno.EBUSY)),
    ],
)
def test_each_cause_is_named_by_the_library(
    monkeypatch: pytest.MonkeyPatch, err: int, reason: str
) -> None:
    monkeypatch.setattr(abi, "_open_device", refuse(err))
    why = kvm_unavailable()
    assert isinstance(why, KvmUnavailable) and isinstance(why, OSError)
    assert why.errno == err and why.path == "/dev/kvm"
    assert str(why).startswith(f"/dev/kvm: {reason}")
    assert "\n" not in str(why)
    assert not kvm_available()
    for make in (KvmSystem, KvmVm):
        with pytest.raises(KvmUnavailable) as exc:
            make()
        assert str(exc.value) == str(why)
    if err in (errno.ENOENT, errno.ENXIO):
        assert NESTED in str(why)


def test_a_missing_device_path(tmp_path: Path) -> None:
    path = str(tmp_path / "kvm")
    with pytest.raises(KvmUnavailable, match=f"^{path}: no such device"):
        KvmVm(path=path)


def test_a_file_that_is_not_a_kvm_device(tmp_path: Path) -> None:
    path = tmp_path / "kvm"
    path.write_bytes(b"")
    why = kvm_unavailable(str(path))
    assert why is not None and why.errno == errno.ENOTTY
    ioctl_error = os.strerror(errno.ENOTTY)
    assert str(why) == f"{path}: not a KVM device (KVM_GET_API_VERSION: {ioctl_error})"


@pytest.mark.kvm
def test_another_api_version(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(KvmSystem, "api_version", lambda self: 11)
    with pytest.raises(KvmUnavailable) as exc:
        KvmVm()
    assert str(exc.value) == "/dev/kvm: KVM API version 11, and memslots needs 12"


def one_error_line(capsys: pytest.CaptureFixture[str], command: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    prefix = f"memslots {command}: error: "
    assert err.startswith(prefix), err
    return err[len(prefix) : -1]


def test_every_command_reports_it_alike(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(abi, "_open_device", refuse(errno.EACCES))
    expected = f"/dev/kvm: {EACCES_REASON}"
    assert main(["replay", "--kvm"]) == 2
    assert one_error_line(capsys, "replay") == expected
    assert main(["conform", "--ops", "10"]) == 2
    assert one_error_line(capsys, "conform") == expected

    # where the kernel is optional, the run goes on without it and says why
    assert main(["replay"]) == 0
    out = capsys.readouterr().out
    assert f"kernel  unavailable: {expected}" in out.replace("\n", " ")
    assert main(["replay", "--json"]) == 0
    assert expected in capsys.readouterr().out
    argv = ["bench", "--scenario", "setup", "--slots", "8", "--impl", "tree,kvm", "--cpu", "none",
            "--duration", "0.001", "--repetitions", "1", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"no KVM ({expected})" in out
    assert f"KvmVm: skipped, {expected}" in out


def _as_nobody() -> list[str]:
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def _nobody_can_run_python() -> bool:
    if os.geteuid() != 0 or shutil.which("setpriv") is None or not os.path.exists("/dev/kvm"):
        return False
    probe = "import os, memslots; os.open('/dev/kvm', os.O_RDWR)"
    r = subprocess.run([*_as_nobody(), sys.executable, "-c", probe], capture_output=True,
                       text=True, timeout=60, check=False)  # fmt: skip
    return "PermissionError" in r.stderr  # memslots imports, /dev/kvm refuses


def test_a_real_user_without_access(tmp_path: Path) -> None:
    """As user nobody (setpriv), where /dev/kvm is not world-accessible."""
    if not _nobody_can_run_python():
        pytest.skip("needs root, setpriv and a /dev/kvm that user nobody may not open")
    env = {**os.environ, "HOME": str(tmp_path)}
    expected = f"/dev/kvm: {EACCES_REASON}"
    cli = [sys.executable, "-m", "memslots"]
    for argv, status in ((["replay", "--kvm"], 2), (["conform", "--ops", "5"], 2)):
        r = subprocess.run([*_as_nobody(), *cli, *argv], capture_output=True, text=True,
                           env=env, timeout=120, check=False)  # fmt: skip
        assert (r.returncode, r.stderr) == (status, f"memslots {argv[0]}: error: {expected}\n")
    code = "from memslots.kvm import KvmVm\nKvmVm()"
    r = subprocess.run([*_as_nobody(), sys.executable, "-c", code], capture_output=True,
                       text=True, env=env, timeout=60, check=False)  # fmt: skip
    assert r.stderr.splitlines()[-1] == f"memslots.errors.KvmUnavailable: {expected}"
