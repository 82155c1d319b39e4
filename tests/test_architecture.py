"""The package's import rule: imports flow one way, from the top layer down, and never in a cycle.

Layers, bottom first (a module may import its own layer and those below it):

0. ``errors``, ``paths``, ``registry``, ``version``: plain Python, no frugallm imports above them
1. ``cpu``, ``native``, ``config``, ``sampling``, ``corpus``, ``tokenizer``, ``structured`` (grammar masks)
2. ``model``
3. ``quant``, ``kv``, ``lora``, ``spec``: techniques that wrap or replace model parts (``spec``: proposers
   and verification over a loaded model; the engine loads draft models)
4. ``loading``
5. ``engine``
6. ``serve``, ``lab``, ``cli``, every subsystem's ``commands`` module (CLI plugins), and the package root

Function-local imports count: a deferred import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
LAYERS: list[set[str]] = [
    {"frugallm.errors", "frugallm.paths", "frugallm.registry", "frugallm.version"},
    {"frugallm.cpu", "frugallm.native", "frugallm.config", "frugallm.sampling", "frugallm.corpus",
     "frugallm.tokenizer", "frugallm.structured"},
    {"frugallm.model"},
    {"frugallm.quant", "frugallm.kv", "frugallm.lora", "frugallm.spec"},
    {"frugallm.loading"},
    {"frugallm.engine"},
    {"frugallm.serve", "frugallm.lab", "frugallm.cli", "frugallm"},
]
TOP = len(LAYERS) - 1


def modules() -> dict[str, Path]:
    out = {}
    for p in (SRC / "frugallm").rglob("*.py"):
        name = ".".join(p.relative_to(SRC).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def layer_of(module: str) -> int:
    if module.rsplit(".", 1)[-1] == "commands":
        return TOP
    best, best_len = None, -1
    for i, names in enumerate(LAYERS):
        for prefix in names:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = i, len(prefix)
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best


def imports(mods: dict[str, Path]) -> dict[str, set[tuple[str, int]]]:
    """Each module's imports of other frugallm modules, with the line they are on."""
    graph: dict[str, set[tuple[str, int]]] = {m: set() for m in mods}
    for m, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module
                         for a in node.names]
            else:
                continue
            for n in names:
                while n and n not in mods:
                    n = n.rpartition(".")[0]
                if n and n != m and not m.startswith(n + "."):
                    graph[m].add((n, node.lineno))
    return graph


def test_every_module_has_a_layer() -> None:
    for m in modules():
        layer_of(m)


def test_imports_flow_downward() -> None:
    mods = modules()
    upward = [f"{m}:{line} imports {n} (layer {layer_of(n)} above {layer_of(m)})"
              for m, deps in imports(mods).items() for n, line in deps if layer_of(n) > layer_of(m)]
    assert not upward, "\n".join(sorted(upward))


def test_no_import_cycles() -> None:
    graph = {m: {n for n, _ in deps} for m, deps in imports(modules()).items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(path[path.index(n):] + [n])
            elif n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)
