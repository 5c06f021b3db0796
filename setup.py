"""Build script: the engine modules compiled with mypyc, or pure Python.

``pip install .`` (and ``pip install -e .``) compiles the modules of :data:`COMPILED`
with mypyc (part of mypy, a build requirement in pyproject.toml) into C extensions when a
C compiler is present; the Python sources stay in the package beside them. With
``MEMSLOTS_PURE_PYTHON=1`` in the environment at install time, or when compilation is
impossible (no compiler, no Python headers, mypyc failing), the package installs as pure
Python, with a warning in the second case. Both builds behave identically;
``memslots.COMPILED`` says which one is running (see docs/benchmarks.md, "Two builds").

Everything else (metadata, dependencies, entry points) is in pyproject.toml.
"""

from __future__ import annotations

import glob
import os
import runpy
import sys
import warnings
from importlib.machinery import EXTENSION_SUFFIXES
from typing import Any

from setuptools import setup
from setuptools.command.build_ext import build_ext

#: the engine modules compiled by mypyc, from the one list the package checks at import
COMPILED = runpy.run_path(os.path.join("src", "memslots", "_build.py"))["COMPILED_MODULES"]


def _pure_requested() -> bool:
    return os.environ.get("MEMSLOTS_PURE_PYTHON", "").strip() not in ("", "0")


def _fallback(reason: str) -> None:
    msg = (
        f"memslots: building pure Python, the mypyc-compiled engine is not available "
        f"({reason}); the library works the same, about 2-3x slower per memslot update"
    )
    warnings.warn(msg, stacklevel=1)
    print(f"WARNING: {msg}", file=sys.stderr)


class BuildExtOrFallBack(build_ext):
    """``build_ext`` that falls back to the pure-Python package when the C build fails."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # CompileError, LinkError, a missing compiler
            _fallback(f"{type(exc).__name__}: {exc}")
            self.extensions = []
            self.distribution.ext_modules = []


def _remove_compiled(where: str) -> None:
    """Delete compiled engine modules under ``where`` so they cannot shadow the sources
    of a pure build (extension modules are imported before ``.py`` files)."""
    for suffix in EXTENSION_SUFFIXES:
        for path in glob.glob(os.path.join(where, "memslots", "*" + suffix)):
            os.remove(path)


def ext_modules() -> list[Any]:
    """The mypyc extensions, or none for the pure build."""
    if _pure_requested():
        print("memslots: MEMSLOTS_PURE_PYTHON is set, building pure Python", file=sys.stderr)
        for build_lib in glob.glob(os.path.join("build", "lib*")):
            _remove_compiled(build_lib)
        if "editable_wheel" in sys.argv or "develop" in sys.argv:
            _remove_compiled("src")  # an editable install imports from src itself
        return []
    try:
        from mypyc.build import mypycify
    except ImportError as exc:
        _fallback(f"mypyc cannot be imported: {exc}")
        return []
    paths = [os.path.join("src", "memslots", f"{m}.py") for m in COMPILED]
    try:
        return list(mypycify(paths, opt_level="3", group_name="memslots._engine"))
    except BaseException as exc:  # mypyc reports type errors with SystemExit
        _fallback(f"mypyc failed: {exc!r}")
        return []


setup(ext_modules=ext_modules(), cmdclass={"build_ext": BuildExtOrFallBack})
