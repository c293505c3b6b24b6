"""The package layers (issue 14 item 1): scaletrain's packages import each other only
downward, in the one order the README's architecture paragraph states, with no cycle;
imports sit at the top of their module (cli/ alone loads each command's modules when
the command runs). Static: parses scaletrain/ with `ast`, imports nothing of it.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

from scripts.import_graph import cycles, project_imports

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "scaletrain"

# Bottom -> top. A package may import only the packages before it. README.md says the
# same (test_readme_states_the_order); a top-level module (errors.py, precision.py,
# generate.py) counts as a package.
ORDER = ["errors", "config", "metrics", "precision", "models", "data", "optim", "parallel",
         "plan", "finetune", "checkpoint", "generate", "evaluate", "compress", "train",
         "paramserver", "serve", "bench", "cli"]
# `python -m scaletrain` runs cli; scaletrain/__init__.py imports nothing of the project.
ENTRY = {"__main__": len(ORDER), "__init__": -1}
# Where a function-level import of the project is the design: each command imports its
# modules (torch among them) when it runs, so `scaletrain --help` and a config mistake
# answer at once.
LAZY_OK = "scaletrain/cli/"  # the package of the commands, one module per command


def package_of(path: Path) -> str:
    return path.relative_to(SRC).parts[0].removesuffix(".py")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def files():
    return sorted(SRC.rglob("*.py"))


def package_graph() -> dict[str, dict[str, list[str]]]:
    """package -> imported package -> where (file:line); module- and function-level."""
    graph: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for f in files():
        src = package_of(f)
        for imp in project_imports(ast.parse(f.read_text())):
            other = imp.name.split(".")[1]
            if other != src:
                graph[src][other].append(f"{f.relative_to(ROOT)}:{imp.line}")
    return graph


def test_readme_states_the_order():
    text = (ROOT / "README.md").read_text()
    m = re.search(r"import only downward,\s+in\s+this\s+order\s+\(bottom\s+to\s+top\):(.*?)\.\s",
                  text, re.S)
    assert m, "README.md's architecture paragraph must state the package order"
    assert re.findall(r"`(\w+)`", m.group(1)) == ORDER


def test_every_package_is_placed():
    found = {package_of(f) for f in files()} - set(ENTRY)
    assert found == set(ORDER), f"not in ORDER: {found - set(ORDER)}; gone: {set(ORDER) - found}"


def test_no_package_cycle():
    graph = package_graph()
    assert cycles({p: set(d) for p, d in graph.items()}) == []


def test_imports_only_downward():
    rank = {p: i for i, p in enumerate(ORDER)} | ENTRY
    upward = sorted({f"{where}: {src} imports {dst}"
                     for src, deps in package_graph().items() for dst, wheres in deps.items()
                     for where in wheres if rank[dst] >= rank[src]})
    assert upward == []


def test_imports_at_the_top():
    lazy = sorted({f"{f.relative_to(ROOT)}:{imp.line}" for f in files()
                   if not str(f.relative_to(ROOT)).startswith(LAZY_OK)
                   for imp in project_imports(ast.parse(f.read_text())) if imp.in_function})
    assert lazy == [], "project imports inside functions (move them to the top)"


def module_level_deps(tree: ast.Module, known: set[str]) -> set[str]:
    """The project modules a module needs while it is imported: `from m import name`
    needs m, `from pkg import submodule` the submodule (TYPE_CHECKING blocks: none)."""
    deps = set()
    for imp in project_imports(tree):
        if not imp.in_function and imp.runtime and imp.name in known:
            deps.add(imp.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in known and all(
                f"{node.module}.{a.name}" in known for a in node.names):
            if not any(isinstance(n, ast.ImportFrom) and n.module == node.module and any(
                    f"{n.module}.{a.name}" not in known for a in n.names)
                    for n in ast.walk(tree)):
                deps.discard(node.module)
    return deps


def test_no_module_cycle():
    """Module-level imports between modules form no cycle either (with `from m import
    name`, a cycle fails at import time depending on which module comes first)."""
    known = {module_name(f) for f in files()}
    graph = {module_name(f): module_level_deps(ast.parse(f.read_text()), known) - {module_name(f)}
             for f in files()}
    assert cycles(graph) == []
