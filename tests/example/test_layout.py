"""The example's package is built in floors: each sub-package imports only from the floors below it.

The import graph is read from the source (``ast``), so the test sees every import, including one
hidden inside a function, and fails on a cycle, an import that climbs, an internal import made
inside a function to dodge a cycle, or a call to another module's private name.
"""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "examples" / "madlab"
# Lower floors know nothing of higher ones. Within a floor, sub-packages do not import each other.
FLOORS = {"io": 1, "data": 2, "evaluation": 2, "model": 2, "faces": 3, "attacks": 3, "sources": 4, "run": 5}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def internal_imports(path: Path) -> list[tuple[str, list[str], bool]]:
    """``(module, names, inside a function)`` for each import of a madlab module in ``path``."""
    tree = ast.parse(path.read_text())
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    in_function = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(f)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            if target.split(".")[0] != "madlab":
                continue
            names = [a.name for a in node.names]
            if not node.module:  # from . import module
                found += [(f"{target}.{n}", [], id(node) in in_function) for n in names]
            else:
                found.append((target, names, id(node) in in_function))
        elif isinstance(node, ast.Import):
            found += [(a.name, [], id(node) in in_function) for a in node.names if a.name.startswith("madlab")]
    return found


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
GRAPH = {name: internal_imports(path) for name, path in MODULES.items()}


def floor(module: str) -> int | None:
    parts = module.split(".")
    return FLOORS.get(parts[1]) if len(parts) > 2 else None


def test_every_module_lives_in_a_sub_package_with_a_floor() -> None:
    loose = [m for m, path in MODULES.items() if m.count(".") == 1 and path.name != "__init__.py"]
    assert loose == [], "modules outside the sub-packages"
    packages = {m.split(".")[1] for m in MODULES if m.count(".") >= 1}
    assert packages == set(FLOORS), packages


def test_imports_point_down_the_floors() -> None:
    climbing = []
    for module, imports in GRAPH.items():
        for target, _, _ in imports:
            mine, theirs = floor(module), floor(target)
            if mine is None or theirs is None or module.split(".")[1] == target.split(".")[1]:
                continue
            if theirs >= mine:
                climbing.append(f"{module} (floor {mine}) -> {target} (floor {theirs})")
    assert climbing == []


def test_the_modules_form_no_cycle() -> None:
    edges = {m: {t for t, _, _ in imports if t in MODULES and t != m} for m, imports in GRAPH.items()}
    try:
        tuple(TopologicalSorter(edges).static_order())
    except CycleError as err:
        raise AssertionError(f"import cycle: {' -> '.join(err.args[1])}") from None


def test_no_internal_import_hides_inside_a_function() -> None:
    hidden = [f"{m} imports {t}" for m, imports in GRAPH.items() for t, _, inside in imports if inside]
    assert hidden == []


def test_no_module_imports_another_modules_private_names() -> None:
    private = [f"{m} imports {t}.{n}" for m, imports in GRAPH.items() for t, names, _ in imports
               for n in names if n.startswith("_") and t != m]
    assert private == []


def test_the_graph_reader_sees_what_python_imports() -> None:
    """The check above is only as good as its reader: it must resolve relative imports as Python does."""
    imports = {t for t, _, _ in GRAPH["madlab.run.app"]}
    assert {"madlab.run.training", "madlab.io.config", "madlab.model.hub"} <= imports
    assert all(t in MODULES or t.rsplit(".", 1)[0] in MODULES for m in GRAPH for t, _, _ in GRAPH[m])
