"""The package as installed: a cheap ``import memslots`` (its names load on first use),
one version everywhere, the console script and ``python -m memslots``."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import memslots

ROOT = Path(__file__).resolve().parent.parent


def test_importing_the_package_loads_nothing_else() -> None:
    code = (
        "import sys, memslots\n"
        "print(sorted(m for m in sys.modules if m.startswith('memslots')))\n"
        "from memslots import Vm, COMPILED\n"
        "print(Vm.__module__, type(COMPILED).__name__, 'memslots.vm' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout.splitlines()  # fmt: skip
    assert out == ["['memslots']", "memslots.vm bool True"]


def test_public_names_and_submodules_resolve() -> None:
    for name in memslots.__all__:
        assert getattr(memslots, name) is not None
    assert set(memslots.__all__) <= set(dir(memslots))
    assert memslots.vm.Vm is memslots.Vm  # a submodule by attribute
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        memslots.no_such_name  # noqa: B018


def test_one_version_and_the_entry_points() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["version"] == memslots.__version__
    assert project["scripts"] == {"memslots": "memslots.__main__:console"}
    assert project["license"] == "GPL-2.0-only" and project["license-files"] == ["LICENSE"]
    assert "GNU GENERAL PUBLIC LICENSE" in (ROOT / "LICENSE").read_text()
    r = subprocess.run([sys.executable, "-m", "memslots", "demo"], capture_output=True,
                       text=True, timeout=60, check=False)  # fmt: skip
    assert r.returncode == 0 and "generation" in r.stdout and r.stderr == ""
