"""The package's import graph: import circles and upward imports (both should be none).

Reads every module of ``catlab/`` with :mod:`ast` (nothing is imported), including
imports inside functions (a lazy import is still a dependency) and those under
``if TYPE_CHECKING:`` (an annotation is a dependency a reader follows too: a circle
closed by a type-only import is still a circle). Two views:

* **modules**: a circle is a set of modules that import each other, directly or not;
* **rooms**: each subpackage (``catlab/selection/``) or top-level module
  (``catlab/sampler.py``) is a room; rooms stand in the layers of :data:`LAYERS`, and a
  room may import only rooms of its own layer or below. An import the other way is
  *upward*; a circle between rooms is a room circle.

``catlab/__init__.py`` is the package's front door (it imports from every room by
design) and is left out. Run::

    python experiments/import_graph.py          # prints the findings; exit status 1 if any
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "catlab"

#: the rooms, bottom first; a room imports only from its own layer or below
LAYERS: list[set[str]] = [
    {"registry", "capabilities", "hashing", "fileio", "progress", "grid"},
    {"reuse", "loggers", "prompts", "embedded"},
    {"selection"},
    {"planner", "models"},
    {"pruning", "stepcache", "families"},
    {"assembly"},
    {"sampler", "stock_pipelines", "testing", "train_toy", "train_video"},
    {"builders", "strategy", "config", "metrics"},  # metrics read the sampler's traces
    {"catlab"},  # the front door (catlab/__init__.py): the applications below import it to register everything
    {"evaluation", "cli", "run", "sweep", "evaluate", "redraw"},
]


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path, modules: set[str], root: Path = ROOT) -> set[str]:
    """The catlab modules ``path`` imports (``from pkg import sub`` names the submodule when it is one)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names if a.name.split(".")[0] == "catlab")
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    base = ".".join(
                        package.split(".")[: len(package.split(".")) - child.level + 1] + ([base] if base else [])
                    )
                if base.split(".")[0] != "catlab":
                    continue
                for alias in child.names:
                    sub = f"{base}.{alias.name}"
                    found.add(sub if sub in modules else base)
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return {m for m in found if m in modules and m != name}


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module → the catlab modules it imports, for every module under ``root`` but the front door."""
    paths = sorted(root.rglob("*.py"))
    modules = {module_name(p, root) for p in paths}
    return {module_name(p, root): imports_of(p, modules, root) for p in paths if module_name(p, root) != "catlab"}


def room(module: str) -> str:
    return module.split(".")[1] if "." in module else module


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return found


def layer(name: str) -> int:
    for i, rooms in enumerate(LAYERS):
        if name in rooms:
            return i
    raise KeyError(f"room '{name}' is in no layer of experiments/import_graph.py's LAYERS: place it")


def findings(root: Path = ROOT) -> dict[str, list]:
    """``{"module circles": [...], "room circles": [...], "upward imports": [(importer, imported), ...]}``."""
    edges = graph(root)
    rooms: dict[str, set[str]] = {}
    upward = []
    for module, targets in edges.items():
        for target in targets:
            a, b = room(module), room(target)
            if a == b:
                continue
            rooms.setdefault(a, set()).add(b)
            if layer(b) > layer(a):
                upward.append((module, target))
    return {"module circles": circles(edges), "room circles": circles(rooms), "upward imports": sorted(upward)}


def main() -> int:
    found = findings()
    for kind, items in found.items():
        print(f"{kind}: {len(items) or 'none'}")
        for item in items:
            print("  " + (" <-> ".join(item) if kind.endswith("circles") else f"{item[0]} -> {item[1]}"))
    return 1 if any(found.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
