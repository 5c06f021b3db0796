"""The two builds of the engine (setup.py): compiled by mypyc, or pure Python.

``make test`` runs the whole suite on the compiled build and the engine's tests on the
pure one, telling each run which build it expects in ``MEMSLOTS_EXPECT_BUILD``.
"""

from __future__ import annotations

import importlib.machinery
import os
import sys
import time
import warnings
from pathlib import Path

import pytest

import memslots
from memslots import _build
from memslots.memslot_set import MemslotSet
from memslots.slot import Memslot
from memslots.vm import Vcpu, Vm


def _loaded_from_extensions() -> dict[str, bool]:
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    return {
        name: str(sys.modules[f"memslots.{name}"].__file__).endswith(suffixes)
        for name in _build.COMPILED_MODULES
    }


def test_compiled_says_which_build_is_imported() -> None:
    loaded = _loaded_from_extensions()
    assert set(loaded.values()) == {memslots.COMPILED}, loaded
    assert isinstance(memslots.COMPILED, bool)


def test_compiled_matches_the_build_this_run_expects() -> None:
    expected = os.environ.get("MEMSLOTS_EXPECT_BUILD")
    if expected is None:
        pytest.skip("MEMSLOTS_EXPECT_BUILD is not set (make test sets it)")
    assert expected in ("compiled", "pure")
    assert memslots.COMPILED is (expected == "compiled")


def test_a_stale_compiled_module_is_reported(tmp_path: Path) -> None:
    py, so = tmp_path / "vm.py", tmp_path / "vm.cpython-311-x86_64-linux-gnu.so"
    so.write_bytes(b"")
    py.write_text("")
    past = time.time() - 60
    os.utime(so, (past, past))
    with pytest.warns(RuntimeWarning, match=r"older than its source \(vm\.py\)"):
        _build.warn_if_stale({"vm": str(so)})
    os.utime(py, (past - 60, past - 60))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _build.warn_if_stale({"vm": str(so)})


def test_interpreted_subclasses_override_engine_internals() -> None:
    """KvmVm, HistoryVm and the tests subclass Vm, Vcpu and MemslotSet and override
    methods the engine calls on itself: the override runs on both builds."""
    swaps: list[int] = []
    searches: list[int] = []

    class CountingVm(Vm):
        def _swap_active_memslots(self, as_id: int) -> None:
            swaps.append(as_id)
            super()._swap_active_memslots(as_id)

    class CountingSet(MemslotSet):
        def search(self, gfn: int) -> Memslot | None:
            searches.append(gfn)
            return super().search(gfn)

    class NamedVcpu(Vcpu):
        __slots__ = ("name",)
        name: str

    vm = CountingVm(nr_address_spaces=1)
    vm._sets = [(CountingSet(0, 0), CountingSet(0, 1))]
    vm._memslots = [vm._sets[0][0]]
    vm.set_user_memory_region(0, 0, 0, 0x4000, 0x7F0000000000)
    assert swaps == [0]
    vcpu = NamedVcpu(vm, 0)
    vcpu.name = "boot"
    s = vcpu.gfn_to_memslot(2)
    assert s is not None and s.id == 0 and searches == [2]
    assert vcpu.gfn_to_memslot(3) is s and searches == [2]  # a cache hit: no search
    vm.set_user_memory_region(0, 0, 0, 0, 0x7F0000000000)
    assert swaps == [0, 0, 0]  # DELETE: the INVALID copy, then the removal
    vm.check_invariants()
