"""pytest configuration for the whole checkout (the tests' own fixtures are in
tests/conftest.py).

The ``>>>`` examples in the engine's docstrings are collected from the sources under
src/memslots. In the compiled build the modules that mypyc compiled are imported from
their extensions, not from those sources, so their examples cannot be collected there;
``make test`` runs them on the pure build instead (``make pytest-pure``).
"""

from __future__ import annotations

from pathlib import Path

import memslots
from memslots._build import COMPILED_MODULES

_SRC = Path(__file__).parent / "src" / "memslots"


#: where the memslots being tested comes from: this checkout's src/ (an editable install,
#: or PYTHONPATH), or an installed copy (``pip install .`` of an unpacked sdist)
_IMPORTED = Path(memslots.__file__).resolve().parent
_FROM_SOURCES = _SRC.resolve() == _IMPORTED


def pytest_report_header() -> str:
    where = "this checkout's src/" if _FROM_SOURCES else str(_IMPORTED)
    note = "" if _FROM_SOURCES else " (the docstring examples under src/ are not collected)"
    return f"memslots from {where}{note}"


def pytest_ignore_collect(collection_path: Path) -> bool | None:
    """Leave out the docstring examples of src/ that cannot be imported from there: those
    of the compiled modules, and all of them when memslots is installed elsewhere (their
    modules would clash with the installed package of the same name)."""
    if _SRC in collection_path.parents or collection_path == _SRC:
        if not _FROM_SOURCES:
            return True
        if memslots.COMPILED and collection_path.stem in COMPILED_MODULES:
            return True
    return None
