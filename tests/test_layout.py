"""The house rules of the package layout (README, "Layout"): lower floors never import higher ones,
folders import each other without cycles, and no private name crosses a folder.

Walks every module's `import` statements with `ast` (function-level imports included), so a lazy
import inside a function counts as much as one at the top.
"""
import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# each top-level folder or module of the package, by floor, lowest first
FLOORS = {
    "model parts": {"unet", "text_encoders", "vae", "weights", "weight_files", "file_io", "model_folder"},
    "samplers": {"samplers"},
    "data": {"synthetic"},
    "pipelines": {"pipelines"},
    "training": {"training"},
    "serve": {"serve"},
    "measuring": {"evaluation", "benchmarking"},
    "entry points": {"cli", "__main__", "__init__"},
}
MAY_IMPORT = {
    "model parts": {"model parts"},
    "samplers": {"model parts", "samplers"},
    "data": {"model parts", "data"},
    "pipelines": {"model parts", "samplers", "pipelines"},
    "training": {"model parts", "samplers", "data", "pipelines", "training"},
    "serve": {"model parts", "samplers", "pipelines", "serve"},
    "measuring": set(FLOORS) - {"entry points", "serve"},
    "entry points": {"entry points"},  # the CLI and the package root reach the rest by name, lazily
}
FLOOR_OF = {part: floor for floor, parts in FLOORS.items() for part in parts}
OUTSIDE = ("tests", "benchmarks", "build", "dist", ".venv", ".git")  # not in the package


def package_modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in OUTSIDE or rel.parts[0].startswith("."):
            continue
        yield rel


def part_of(rel: Path) -> str:
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imports(rel: Path):
    """(imported latentloom module, imported names) for every import statement of a module."""
    package = ["latentloom", *rel.parts[:-1]]
    for node in ast.walk(ast.parse((ROOT / rel).read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            yield module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []


def folder_edges():
    """{(from part, to part): [module paths]} for imports between different parts of the package."""
    edges = defaultdict(list)
    for rel in package_modules():
        for module, names in imports(rel):
            parts = module.split(".")
            if parts[0] != "latentloom" or len(parts) < 2:
                continue
            target = parts[1]
            if target in ("__init__",) or target == part_of(rel):
                continue
            edges[(part_of(rel), target)].append((str(rel), module, names))
    return edges


def test_every_part_has_a_floor():
    parts = {part_of(rel) for rel in package_modules()}
    assert parts - set(FLOOR_OF) == set(), "add new folders to FLOORS (and the README's Layout table)"


def test_no_floor_imports_a_higher_one():
    wrong = []
    for (source, target), where in folder_edges().items():
        if FLOOR_OF[target] not in MAY_IMPORT[FLOOR_OF[source]]:
            wrong += [f"{path}: imports {module} ({FLOOR_OF[source]} -> {FLOOR_OF[target]})" for path, module, _ in where]
    assert wrong == []


def test_folders_import_each_other_without_cycles():
    graph = defaultdict(set)
    for source, target in folder_edges():
        graph[source].add(target)
    state = {}

    def visit(node, trail):
        if state.get(node) == "done":
            return
        if state.get(node) == "open":
            pytest.fail(f"import cycle between folders: {' -> '.join(trail + [node])}")
        state[node] = "open"
        for nxt in sorted(graph[node]):
            visit(nxt, trail + [node])
        state[node] = "done"

    for node in sorted(graph):
        visit(node, [])


def test_no_private_name_crosses_a_folder():
    wrong = []
    for (source, target), where in folder_edges().items():
        for path, module, names in where:
            private = [n for n in names if n.startswith("_")] + [p for p in module.split(".")[1:] if p.startswith("_")
                                                                 and p != "__init__"]
            if private:
                wrong.append(f"{path}: {module} {private}")
    assert wrong == []


def test_nothing_imports_the_measuring_floor():
    users = [f"{path} imports {module}" for (source, target), where in folder_edges().items()
             if FLOOR_OF[target] == "measuring" and FLOOR_OF[source] != "measuring" for path, module, _ in where]
    assert users == []


def test_nothing_imports_serve():
    users = [f"{path} imports {module}" for (source, target), where in folder_edges().items()
             if FLOOR_OF[target] == "serve" and FLOOR_OF[source] not in ("serve", "entry points")
             for path, module, _ in where]
    assert users == []
