"""Shared fixtures: the implementations under test and /dev/kvm detection."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from memslots import Vm
from memslots.baseline import ArrayVm
from memslots.kvm import kvm_available

#: the kernel matrix (Debian's kernels under QEMU, minutes each) runs only in ``make
#: test-kernels``, which sets MEMSLOTS_KERNEL_MATRIX=1
collect_ignore = [] if os.environ.get("MEMSLOTS_KERNEL_MATRIX") == "1" else ["kernels"]

#: either design: the tree engine (``KvmVm`` too) or the array baseline
AnyVm = Vm | ArrayVm

#: what every command and KvmVm() say when /dev/kvm refuses with EACCES
EACCES_REASON = (
    "permission denied: add yourself to the kvm group (sudo usermod -aG kvm $USER, then"
    " log in again) or run as root"
)


def refuse(err: int) -> Callable[[str], int]:
    """A stand-in for ``memslots.kvm.abi._open_device``: a device that refuses to open
    with ``err`` (the tests run as root, whom file permissions do not stop)."""

    def open_device(path: str) -> int:
        raise OSError(err, os.strerror(err), path)

    return open_device


def engine_impls() -> list[Any]:
    """The engine and the array baseline: same API, same results."""
    return [pytest.param(Vm, id="tree"), pytest.param(ArrayVm, id="array")]


@pytest.fixture(params=engine_impls())
def make_vm(request: pytest.FixtureRequest) -> Callable[..., AnyVm]:
    """A constructor of the implementation under test (``make_vm(**limits)``)."""
    impl: Callable[..., AnyVm] = request.param
    return impl


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``kvm``-marked tests cleanly where /dev/kvm is not usable."""
    if kvm_available():
        return
    skip = pytest.mark.skip(reason="/dev/kvm is not available on this machine")
    for item in items:
        if "kvm" in item.keywords:
            item.add_marker(skip)


def host_profile() -> Any:
    """This machine's kernel profile (``KernelProfile.probe()``, cached), or None without
    a usable /dev/kvm."""
    if not kvm_available():
        return None
    from memslots.profiles import KernelProfile

    return KernelProfile.probe()


def needs_feature(*fields: str) -> pytest.MarkDecorator:
    """Skip unless this machine's kernel offers every profile field in ``fields`` (e.g.
    ``"guest_memfd"``, ``"private_mem"``, ``"user_memory2"``), naming what is missing:
    tests take the kernel's features from the probe, never from an assumption."""
    profile = host_profile()
    missing = [f for f in fields if profile is not None and not getattr(profile, f)]
    return pytest.mark.skipif(
        bool(missing),
        reason=f"this kernel ({os.uname().release}) lacks {', '.join(missing)}",
    )


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The kernel matrix's table (``make test-kernels``): agreement and time per kernel."""
    matrix = sys.modules.get("test_matrix")
    results: list[dict[str, object]] = getattr(matrix, "RESULTS", [])
    if not results:
        return
    tr = terminalreporter
    tr.section("kernel matrix")
    tr.write_line(f"{'kernel':<16} {'release':<24} {'run':<44} {'agreement':>20} {'time':>7}")
    for r in results:
        calls = int(str(r["calls"]))
        agreed = int(str(r["agreed"]))
        pct = f"{100 * agreed / calls:.1f}%" if calls else "-"
        tr.write_line(
            f"{r['kernel']!s:<16} {r['release']!s:<24} {r['what']!s:<44}"
            f" {agreed:>6}/{calls:<6} {pct:>6} {r['seconds']!s:>6}s"
        )
