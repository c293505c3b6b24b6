"""Measure the coupling that issue 14 ("one build, one step") sets out to remove.

Run from the repository root: `python scripts/arch_metrics.py`. Prints, for `scaletrain/`:
cross-package imports (module-level vs inside functions), the package cycles of the
module-level import graph (strongly connected components), the places that derive the
micro-batch or resolve `ParallelDims`, `StepOptions`' fields, the code that sniffs the model
family or stashes layout facts on modules, and the longest functions. Static (ast + text),
so it imports nothing of the project and runs on any checkout, before and after a change.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or loaded by path
from import_graph import cycles, project_imports  # noqa: E402  (scripts/import_graph.py)

# Text patterns of the re-derivations and sniffs the issue lists; counted per line.
PATTERNS = {
    "micro-batch derived (`micro_batch_size or …`)": r"micro_batch_size\s+or\b",
    "ParallelDims resolved (`resolve_dims(` / `ParallelDims.resolve(`)": r"(?<!def )resolve_dims\(|ParallelDims\.resolve\(",
    # `env = os.environ; env.get("RANK")` counts too (train/runtime.py read it that way)
    "environment read for WORLD_SIZE/RANK/LOCAL_WORLD_SIZE": r"(environ|\benv)(\.get\(|\[)\s*[\"'](WORLD_SIZE|RANK|LOCAL_WORLD_SIZE)[\"']",
    "family sniff (`hasattr(…, \"tie_weights\")`)": r"hasattr\([^)]*[\"']tie_weights[\"']",
    "layout facts stashed on modules (`_pp_stage_views` …)": r"_pp_stage_views|_tp_loss_parallel|_tied_embedding",
}
# Hits that are the definition itself, not a use: pattern label -> the defining module
# (its own lines are listed apart, marked "definition", and not counted).
DEFINED_IN = {
    "ParallelDims resolved (`resolve_dims(` / `ParallelDims.resolve(`)": "config/dims.py",
    "environment read for WORLD_SIZE/RANK/LOCAL_WORLD_SIZE": "parallel/world.py",
}


def package_of(path: Path, root: Path) -> str:
    return path.relative_to(root).parts[0].removesuffix(".py")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="scaletrain")
    ap.add_argument("--longest", type=int, default=8, help="how many of the longest functions")
    args = ap.parse_args()
    root = Path(args.root)
    files = sorted(root.rglob("*.py"))

    top = lazy = 0
    graph: dict[str, set[str]] = defaultdict(set)
    functions: list[tuple[int, str]] = []
    hits: dict[str, list[str]] = {k: [] for k in PATTERNS}
    step_fields: list[str] = []
    for f in files:
        text = f.read_text()
        tree = ast.parse(text)
        pkg = package_of(f, root)
        for imp in project_imports(tree, submodules=False):
            other = imp.name.split(".")[1]
            if other == pkg:
                continue
            lazy += imp.in_function
            top += not imp.in_function
            if not imp.in_function:
                graph[pkg].add(other)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append((node.end_lineno - node.lineno + 1, f"{f}:{node.lineno} {node.name}"))
            if isinstance(node, ast.ClassDef) and node.name == "StepOptions":
                step_fields = [s.target.id for s in node.body if isinstance(s, ast.AnnAssign)]
        for label, pattern in PATTERNS.items():
            for no, line in enumerate(text.splitlines(), 1):
                if re.search(pattern, line):
                    hits[label].append(f"{f}:{no}")

    total = top + lazy
    print(f"cross-package imports: {total} ({lazy} inside functions, "
          f"{100 * lazy // max(total, 1)}%)")
    found = cycles(graph)
    print(f"package cycles at module level: {len(found)}"
          + "".join(f"\n  {len(c)} packages: {' '.join(c)}" for c in found))
    for label, where in hits.items():
        home = DEFINED_IN.get(label)
        uses = [w for w in where if not (home and w.split(":")[0].endswith(home))]
        print(f"{label}: {len(uses)}" + "".join(f"\n  {w}" for w in uses)
              + "".join(f"\n  ({w}: definition)" for w in where if w not in uses))
    print(f"StepOptions fields: {len(step_fields)} {' '.join(step_fields)}")
    print("longest functions (lines):")
    for length, where in sorted(functions, reverse=True)[:args.longest]:
        print(f"  {length:4d} {where}")


if __name__ == "__main__":
    main()
