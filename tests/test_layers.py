"""The house rules: the package's import graph has no cycle and its layers only import
downwards (engine <- baseline, kvm <- tools).

The graph is read from the source (every ``import`` anywhere in a module, lazy and
``TYPE_CHECKING`` ones included), so a cycle fails here even when import order happens
to hide it at run time.
"""

from __future__ import annotations

import ast
from pathlib import Path

import memslots

PACKAGE = Path(memslots.__file__).parent


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def import_graph() -> dict[str, set[str]]:
    """``module -> modules of the package it imports``."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(mod, is_pkg, node)
                # `from pkg import sub` imports the submodule when there is one
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                           for a in node.names]  # fmt: skip
            for t in targets:
                while t and t not in mods:  # `import memslots.kvm.abi` -> that module
                    t = t.rpartition(".")[0]
                if t and t != mod:
                    graph[mod].add(t)
    return graph


def layer(mod: str) -> int:
    """0 engine, 1 the array baseline, the kvm backend, the kernel profiles (which read
    kernels through the kvm backend) and the package's public names (``memslots``),
    2 tools, 3 ``python -m memslots``."""
    if mod == "memslots.__main__":
        return 3
    if mod == "memslots":
        return 1
    if mod.startswith("memslots.tools"):
        return 2
    if mod.startswith(("memslots.kvm", "memslots.baseline", "memslots.profiles")):
        return 1
    return 0


def test_graph_is_read() -> None:
    g = import_graph()
    assert "memslots.vm" in g and "memslots.memslot_set" in g["memslots.vm"]
    assert "memslots.tools.cli" in g


def test_no_import_cycle() -> None:
    g = import_graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(g[m]):
            if state.get(n) == 1:
                cycles.append([*stack[stack.index(n) :], n])
            elif n not in state:
                visit(n, stack)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_layers_import_only_downwards() -> None:
    g = import_graph()
    bad = [
        f"{m} (layer {layer(m)}) imports {n} (layer {layer(n)})"
        for m, deps in g.items()
        for n in deps
        if layer(n) > layer(m)
    ]
    assert not bad, "\n".join(sorted(bad))


def test_baseline_and_kvm_are_independent_of_each_other() -> None:
    g = import_graph()
    for m, deps in g.items():
        if m.startswith("memslots.kvm"):
            assert "memslots.baseline" not in deps, m
        if m == "memslots.baseline":
            assert not any(d.startswith("memslots.kvm") for d in deps)


def test_the_baseline_shares_no_update_protocol_code_with_the_engine() -> None:
    """ArrayVm is a second implementation: it imports neither the engine's protocol
    (memslots.vm) nor its sets and indexes, and is not a Vm; both build on
    memslots.vm_api, which holds no protocol code and imports neither design."""
    from memslots import Vm
    from memslots.baseline import ArrayVm

    g = import_graph()
    engine_only = {"memslots.vm", "memslots.memslot_set", "memslots.gfn_index", "memslots.hva_tree"}
    assert not engine_only & g["memslots.baseline"]
    assert not (engine_only | {"memslots.baseline"}) & g["memslots.vm_api"]
    assert not issubclass(ArrayVm, Vm)
