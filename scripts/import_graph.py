"""The static import graph of scaletrain/, shared by tests/unit/test_layers.py (the
package layers the README states) and scripts/arch_metrics.py (issue 14's coupling
figures): which project modules each file imports, where, and the cycles they form.
Pure `ast`: imports nothing of the project, so it reads any checkout.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass


@dataclass(frozen=True)
class ProjectImport:
    """One imported scaletrain module of an import statement."""

    name: str             # "scaletrain.data.loader"
    line: int
    in_function: bool     # written inside a def (a lazy import)
    runtime: bool         # False under `if TYPE_CHECKING:` (typing only)


def _inner_ids(tree: ast.AST, kind) -> set[int]:
    """ids of the nodes nested inside any node of `kind` (whose test passes)."""
    return {id(m) for n in ast.walk(tree) if kind(n) for m in ast.walk(n) if m is not n}


def project_imports(tree: ast.AST, *, submodules: bool = True) -> list[ProjectImport]:
    """Every scaletrain module `tree` imports. With `submodules`, `from pkg import x`
    also names `pkg.x` (x may be a module; names that are not modules are harmless to a
    package-level graph); without, it names `pkg` once per statement (for counting
    statements). Relative imports raise AssertionError: the project writes none."""
    inner = _inner_ids(tree, lambda n: isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))
    typing_only = _inner_ids(tree, lambda n: isinstance(n, ast.If) and isinstance(
        n.test, ast.Name) and n.test.id == "TYPE_CHECKING")
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert not node.level, f"line {node.lineno}: relative import"
            if node.module == "scaletrain":  # from scaletrain import data
                names = [f"scaletrain.{a.name}" for a in node.names]
            else:
                names = [node.module] + ([f"{node.module}.{a.name}" for a in node.names]
                                         if submodules else [])
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found += [ProjectImport(name, node.lineno, id(node) in inner, id(node) not in typing_only)
                  for name in names if name.startswith("scaletrain.")]
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one member, each sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop())
                on.discard(comp[-1])
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out
