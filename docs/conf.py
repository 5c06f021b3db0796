"""Sphinx configuration of the documentation site (``make docs`` builds it into
``build/docs/``).

The user guide is the Markdown of this folder and the README (MyST), the API reference is
generated from the docstrings (autodoc). The docstrings are read from the pure-Python
build (``make docs`` puts ``.venv/pure`` first on the path): modules compiled by mypyc
lose their module docstrings and members to autodoc. Warnings are errors (``-W``), and
every cross-reference must resolve (``-n``); the Python standard library is not linked
(no network at build time), so its names are let through unresolved.

``{memslots-help} COMMAND`` (a directive of this file) prints a subcommand's ``--help``, so
the command-line page cannot fall behind the parser.

Why Sphinx (measured when the site was set up, on the engine's and the traces' modules):
Sphinx, furo and myst-parser install in 13 s and 96 MB, mkdocs with mkdocs-material and
mkdocstrings-python in 22 s and 143 MB; both built that part in about 2.5 s. The
docstrings are written with Sphinx roles (``:class:``, ``:meth:``, ``>>>`` blocks):
Sphinx renders and resolves them, mkdocstrings printed 124 ``:class:`` and 113
``:meth:`` roles as raw text. mkdocstrings reads the sources statically, which would
have spared the pure build; autodoc imports them, and on the compiled build it lost the
module docstrings and members of the compiled modules (937 lines of text output against
1477), hence the pure build.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import types
from typing import Any

from docutils import nodes
from docutils.parsers.rst import Directive

import memslots

project = "memslots"
author = "the memslots authors"
copyright = "the memslots authors; GPL-2.0-only"
version = release = memslots.__version__

extensions = ["sphinx.ext.autodoc", "myst_parser"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
root_doc = "index"

html_theme = "furo"
html_title = f"memslots {version}"
html_static_path: list[str] = []
html_show_sourcelink = False

myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]
suppress_warnings = ["myst.header"]

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "show-inheritance": True}
python_use_unqualified_type_names = True
add_module_names = False

nitpicky = True
#: names that cannot resolve here: the standard library and typing-only aliases (no
#: intersphinx without a network), type variables, and private helpers named in types
nitpick_ignore_regex = [
    (
        r"py:.*",
        r"(collections|typing|typing_extensions|types|os|io|re|enum|ctypes|mmap|"
        r"threading|argparse|pathlib|subprocess|importlib|contextlib|dataclasses|random|"
        r"array|concurrent|json|weakref|abc|queue|signal|select|socket|errno)(\..*)?",
    ),
    (
        r"py:.*",
        r"(Buffer|Self|StrPath|Traversable|TracebackType|IO|TextIO|BinaryIO|Any|"
        r"Final|Literal|Callable|Iterator|Iterable|Sequence|Mapping|Generator|"
        r"AbstractContextManager|TypeAlias|TypeVar|ParamSpec|NoReturn|Protocol|Generic)",
    ),
    (r"py:.*", r"(.*\.)?_[A-Za-z0-9_]*"),  # private names and type variables (_CT)
    (r"py:.*", r"(.*\.)?[A-Z][A-Za-z]*T(_co|_contra)?"),  # SetT, RecordT, ...
    (r"py:class", r"(dict|list|tuple|set)\[.*"),  # generic aliases split by autodoc
    (r"py:class", r"(.*\.)?[A-Z]"),  # one-letter type variables (ddmin's T)
    (
        r"py:class",
        r"(builtins\.)?(int|str|bytes|bytearray|memoryview|float|bool|object|"
        r"type|list|dict|tuple|set|frozenset|BaseException|Exception|OSError|ValueError|"
        r"TypeError|KeyError|AssertionError|RuntimeError|AttributeError|NotImplementedError)",
    ),
    (r"py:(class|data|obj)", r"rich\..*|np\..*|numpy\..*|pytest\..*|hypothesis\..*"),
]


class MemslotsHelp(Directive):
    """``memslots-help COMMAND``: the ``--help`` text of a subcommand (or, without an
    argument, of ``memslots`` itself), as a literal block."""

    optional_arguments = 1

    def run(self) -> list[nodes.Node]:
        from memslots.tools.cli import build_parser

        os.environ["COLUMNS"] = "88"  # argparse wraps to the terminal's width
        parser = build_parser()
        target = parser.subcommands[self.arguments[0]] if self.arguments else parser
        text = target.format_help().rstrip()
        block = nodes.literal_block(text, text)
        block["language"] = "text"
        return [block]


def _lookup(dotted: str) -> object:
    """The object a dotted name denotes (module, then attributes), or None."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


def _candidates(target: str, module: str | None, klass: str | None) -> list[str]:
    """Where a docstring's ``target`` may live: as written, in the current class and its
    bases, in the current module, in the package of the current module."""
    out = [target]
    if klass and module:
        cls = _lookup(f"{module}.{klass}")
        for base in getattr(cls, "__mro__", ())[:-1]:
            out.append(f"{base.__module__}.{base.__qualname__}.{target}")
    if module:
        out.append(f"{module}.{target}")
        out.append(f"{module.rpartition('.')[0]}.{target}")
    return out


def _canonical(dotted: str) -> str | None:
    """The documented name of what ``dotted`` denotes: ``memslots.Vm`` ->
    ``memslots.vm.Vm`` (re-exports), an inherited method -> its defining class's."""
    obj = _lookup(dotted)
    if obj is None:
        return None
    home = getattr(obj, "__module__", None)
    qual = getattr(obj, "__qualname__", None)
    if isinstance(obj, types.ModuleType):
        return obj.__name__
    if home and qual and "<" not in qual:
        return f"{home}.{qual}"
    return dotted


def _resolve(app: Any, env: Any, node: Any, contnode: Any) -> Any:
    """``missing-reference``: a docstring's reference that Sphinx did not find as
    written is looked for where Python finds it (re-exports, the current module and
    class, base classes) and linked to where it is documented; one that names a real but
    undocumented object (a module constant, an instance attribute) stays code without a
    link. Only a name that Python cannot find either is left to warn."""
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"].lstrip("~.")
    domain = env.get_domain("py")
    module, klass = node.get("py:module"), node.get("py:class")
    for name in _candidates(target, module, klass):
        canonical = _canonical(name)
        if canonical is None:
            continue
        for kind in ("class", "exception", "function", "method", "attribute", "data",
                     "module", "property"):  # fmt: skip
            if canonical in domain.objects or canonical in domain.modules:
                found = domain.resolve_xref(env, node["refdoc"], app.builder, kind,
                                            canonical, node, contnode)  # fmt: skip
                if found is not None:
                    return found
        return contnode  # real, undocumented: code, no link
    last = target.rpartition(".")[2]
    named = [n for n in domain.objects if n.rpartition(".")[2] == last]
    if len(named) == 1 and target in named[0]:  # imported for type checking only
        return domain.resolve_xref(env, node["refdoc"], app.builder, node["reftype"],
                                   named[0], node, contnode)  # fmt: skip
    if node["reftype"] == "attr" and module and klass and _sets_attribute(module, klass, last):
        return contnode  # an instance attribute set in a method: real, undocumented
    return None


def _sets_attribute(module: str, klass: str, name: str) -> bool:
    """Whether class ``klass`` of ``module`` or one of its bases assigns ``self.name``."""
    cls = _lookup(f"{module}.{klass}")
    for base in getattr(cls, "__mro__", ())[:-1]:
        try:
            if f"self.{name} " in inspect.getsource(base):
                return True
        except (OSError, TypeError):
            continue
    return False


def setup(app: Any) -> dict[str, Any]:
    app.add_directive("memslots-help", MemslotsHelp)
    app.connect("missing-reference", _resolve)
    return {"parallel_read_safe": True}


if "memslots" not in sys.modules:  # pragma: no cover - imported above
    raise RuntimeError("memslots must be importable to build the docs")
