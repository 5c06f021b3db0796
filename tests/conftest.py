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


def kvm_usable() -> bool:
    """True when /dev/kvm can be opened read-write."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def engine_impls() -> list[Any]:
    """The engine and, once it exists, the array baseline: same API, same results."""
    impls: list[Any] = [pytest.param(Vm, id="tree")]
    try:
        from memslots.baseline import ArrayVm

        impls.append(pytest.param(ArrayVm, id="array"))
    except ImportError:
        pass
    return impls


@pytest.fixture(params=engine_impls())
def make_vm(request: pytest.FixtureRequest) -> Callable[..., Vm]:
    """A constructor of the implementation under test (``make_vm(**limits)``)."""
    impl: Callable[..., Vm] = request.param
    return impl


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``kvm``-marked tests cleanly where /dev/kvm is not usable."""
    if kvm_usable():
        return
    skip = pytest.mark.skip(reason="/dev/kvm is not available on this machine")
    for item in items:
        if "kvm" in item.keywords:
            item.add_marker(skip)
