"""Checks that survive ``python -O``: invariant checks raise ``InvariantError`` (not bare
``assert``), so an optimised interpreter still catches a corrupted VM, and ``memslots
stress`` still reports the violations of a broken engine; the debug-only precondition
checks (the kernel's ``lockdep_assert_held``) are gone under ``-O``.

Each test runs a small subprocess with ``-O``; inside it, tests use ``pytest.raises`` and
explicit ``raise`` (``assert`` statements are stripped there)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from memslots import Vm
from memslots.errors import InvariantError

TIMEOUT = 120

INNER = """
import sys

import pytest

from memslots import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEMSLOT_INVALID, Vm
from memslots.baseline import ArrayVm
from memslots.constants import KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS
from memslots.errors import InvariantError


def make(impl):
    vm = impl(nr_address_spaces=1)
    vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, 0x10000, 0x10000000)
    vm.set_user_memory_region(1, 0, 0x100000, 0x10000, 0x20000000)
    vm.check_invariants()
    return vm


def pages(vm):
    vm.nr_memslot_pages += 1


def bitmap(vm):
    vm.dirty_bitmap_bytes -= 8


def invalid(vm):
    vm.id_to_memslot(1).flags |= KVM_MEMSLOT_INVALID


def generation(vm):
    vm.memslots(0).generation |= KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS


def structure(vm):
    s = vm.memslots(0)
    if isinstance(vm, ArrayVm):
        s._gfns[0] += 1  # a stale key in the sorted array
    else:
        other = vm._sets[0][s.node_idx ^ 1]
        other._replace(other.id_to_memslot(1), None)  # the two sets disagree


def test_runs_optimised():
    if not sys.flags.optimize:
        raise RuntimeError("not running under python -O")
    try:  # pytest rewrites the asserts of test modules; the library's are compiled so:
        exec(compile("assert False", "<library>", "exec"))
    except AssertionError:
        raise RuntimeError("assert statements are still executed") from None


@pytest.mark.parametrize("impl", [Vm, ArrayVm])
@pytest.mark.parametrize("corrupt", [pages, bitmap, invalid, generation, structure])
def test_a_corrupted_vm_is_caught(impl, corrupt):
    vm = make(impl)
    corrupt(vm)
    with pytest.raises(InvariantError):
        vm.check_invariants()


@pytest.mark.parametrize("impl", [Vm, ArrayVm])
def test_debug_preconditions_cost_nothing(impl):
    vm = make(impl)
    vm.lockless_writer_probe()
"""

PROBES = """
def _vm_probe(self):
    self._inactive_memslots(0)  # kvm_get_inactive_memslots without slots_lock


def _array_probe(self):
    self._inactive_array(0)


Vm.lockless_writer_probe = _vm_probe
ArrayVm.lockless_writer_probe = _array_probe
"""


def _run_optimised(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-O", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def test_python_O_still_catches_a_corrupted_vm(tmp_path: Path) -> None:
    test = tmp_path / "test_inner.py"
    test.write_text(INNER + PROBES)
    r = _run_optimised(["-m", "pytest", "-q", "-p", "no:cacheprovider", str(test)], tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "13 passed" in out, out


def test_the_debug_precondition_is_checked_without_O() -> None:
    """The same probe as inside the ``-O`` run: here it raises."""
    vm = Vm(nr_address_spaces=1)
    with pytest.raises(InvariantError, match="kvm_get_inactive_memslots"):
        vm._inactive_memslots(0)
    with vm.slots_lock:
        vm._inactive_memslots(0)


STRESS = """
import sys
{patch}
from memslots.tools.cli import main
sys.exit(main(["stress", "--seconds", "{seconds}", "--readers", "2", "--seed", "1",
               "--json", "--no-progress"]))
"""
NO_GRACE_PERIODS = "from memslots.sync import Srcu\nSrcu.synchronize = lambda self: None"


@pytest.mark.stress
@pytest.mark.parametrize(("patch", "seconds"), [("", 1), (NO_GRACE_PERIODS, 2)],
                         ids=["correct", "no-grace-periods"])  # fmt: skip
def test_stress_under_O(tmp_path: Path, patch: str, seconds: int) -> None:
    code = textwrap.dedent(STRESS.format(patch=patch, seconds=seconds))
    r = _run_optimised(["-c", code], tmp_path)
    report = json.loads(r.stdout)
    assert report["operations"] > 0 and report["lookups"] > 0
    if patch:
        assert r.returncode == 1, r.stderr
        assert report["violations"] > 0
    else:
        assert r.returncode == 0, r.stderr
        assert report["violations"] == 0, report
