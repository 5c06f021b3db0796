"""Which build of the engine is running: compiled by mypyc or pure Python.

``pip install`` compiles the modules of :data:`COMPILED_MODULES` with mypyc where a C
compiler is present (``setup.py`` reads the list from this file, so it imports nothing
from the package); ``MEMSLOTS_PURE_PYTHON=1`` at install time builds pure Python. Both
builds behave identically. :func:`compiled` tells which one was imported.
"""

from __future__ import annotations

import importlib.machinery
import os
import sys
import warnings

#: the engine modules mypyc compiles (the others stay interpreted; see docs/benchmarks.md,
#: "Two builds", for what was measured and why sync and guest_memory are not compiled)
COMPILED_MODULES = (
    "slot",
    "gfn_index",
    "hva_tree",
    "memslot_set",
    "validate",
    "faults",
    "guest_memfd",
    "dirty_log",
    "grace_period",
    "lockdep",
    "vm_api",
    "vm",
)


def _is_extension(path: str | None) -> bool:
    return path is not None and path.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def compiled() -> bool:
    """True when every module of :data:`COMPILED_MODULES` was imported from its compiled
    extension, False when all are pure Python. Imports them. A mix (an install where
    some extensions are missing) warns and counts as not compiled. O(modules)."""
    files = {}
    for name in COMPILED_MODULES:
        __import__(f"memslots.{name}")
        files[name] = getattr(sys.modules[f"memslots.{name}"], "__file__", None)
    ext = {name for name, f in files.items() if _is_extension(f)}
    if ext and len(ext) != len(files):
        warnings.warn(
            "memslots: only part of the engine is compiled ("
            + ", ".join(sorted(set(files) - ext))
            + " interpreted); reinstall memslots",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    if ext:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        if os.path.exists(os.path.join(root, "setup.py")):  # a source checkout
            warn_if_stale(files)
    return bool(ext)


def installed_compiled() -> bool:
    """True when every module of :data:`COMPILED_MODULES` would be imported from its
    compiled extension: what :func:`compiled` says (a stale build in a source checkout
    warns alike), found from the modules' files without importing them (``memslots
    --version`` stays fast). O(modules)."""
    import importlib.util

    files: dict[str, str | None] = {}
    for name in COMPILED_MODULES:
        spec = importlib.util.find_spec(f"memslots.{name}")
        if spec is None or not _is_extension(spec.origin):
            return False
        files[name] = spec.origin
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if os.path.exists(os.path.join(root, "setup.py")):  # a source checkout, as compiled()
        warn_if_stale(files)
    return True


def warn_if_stale(files: dict[str, str | None]) -> None:
    """Warn when an engine source is newer than the compiled module that shadows it (the
    edit would not run). :func:`compiled` checks this in source checkouts (editable
    installs) only; installed wheels are never checked. ``files``: module name -> path
    of its compiled extension, the ``.py`` beside it is compared."""
    stale = []
    for name, so in files.items():
        if so is None:
            continue
        py = os.path.join(os.path.dirname(so), f"{name}.py")
        try:
            if os.stat(py).st_mtime > os.stat(so).st_mtime:
                stale.append(f"{name}.py")
        except OSError:
            continue
    if stale:
        warnings.warn(
            "memslots: the compiled engine is older than its source ("
            + ", ".join(stale)
            + "): the edits do not run; rebuild with `make` or `pip install -e .` "
            "(or remove src/memslots/*.so to run pure Python)",
            RuntimeWarning,
            stacklevel=3,
        )
