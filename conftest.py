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


def pytest_ignore_collect(collection_path: Path) -> bool | None:
    if (
        memslots.COMPILED
        and collection_path.parent == _SRC
        and collection_path.stem in COMPILED_MODULES
    ):
        return True
    return None
