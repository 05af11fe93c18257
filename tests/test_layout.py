"""The package's layout: no import circle among `sft_helpers` modules (imports inside
functions included), and notebooks that import only public names of modules already taught."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sft_helpers"
NOTEBOOKS = sorted((PACKAGE.parent / "notebooks").glob("*.ipynb"))
# The notebook that first teaches each module's concept. A notebook may import a module
# only from this notebook on (the report of `environment` and the exercise checks open
# every notebook; `install` is the set-up notebook's).
TAUGHT_IN = {
    "environment": 0, "runtime": 0, "models": 0, "install": 0, "checks": 0,
    "templates": 1, "viz": 1,
    "masking": 2,
    "data": 3, "generation": 3, "training": 3,
    "lora": 4, "architectures": 4,
    "quant": 5, "memory": 5, "new_tokens": 5,
    "quality": 6, "noisy": 6,
    "evaluation": 3, "ifeval": 7,
    "triage": 8, "train": 8, "formats": 8,
}


def imported_modules(tree: ast.AST) -> dict[str, set[str]]:
    """{course module: names imported from it} for every import in `tree`, at any depth."""
    found: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "sft_helpers":
            for alias in node.names:
                found.setdefault(alias.name, set())
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sft_helpers."):
            found.setdefault(node.module.split(".")[1], set()).update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("sft_helpers."):
                    found.setdefault(alias.name.split(".")[1], set())
    return found


def import_graph() -> dict[str, set[str]]:
    """{module: the course modules it imports} over every module of the package."""
    graph = {}
    for path in PACKAGE.glob("*.py"):
        imports = imported_modules(ast.parse(path.read_text(encoding="utf-8")))
        graph[path.stem] = set(imports) - {path.stem}
    return graph


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph` as a path that ends where it starts, or None."""
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt, node]
            if nxt not in state and (circle := visit(nxt, path + [nxt])):
                return circle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (circle := visit(start, [start])):
            return circle
    return None


def test_the_circle_finder_finds_a_circle_and_only_a_circle():
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circle_in_the_package():
    circle = find_circle(import_graph())
    assert circle is None, "import circle: " + " -> ".join(circle)


def test_every_module_has_a_notebook_that_teaches_it():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "course"}
    assert modules == set(TAUGHT_IN)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebooks_import_public_names_of_modules_already_taught(path):
    number = int(path.name[:2])
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    source = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    tree = ast.parse(source)
    for module, names in imported_modules(tree).items():
        taught = TAUGHT_IN[module]
        assert taught <= number, f"{path.name} imports {module}, first taught in {taught:02d}"
        private = sorted(n for n in names if n.startswith("_"))
        assert not private, f"{path.name} imports private names {private} from {module}"
    for node in ast.walk(tree):
        private = isinstance(node, ast.Attribute) and node.attr.startswith("_")
        if private and not node.attr.startswith("__") and isinstance(node.value, ast.Name):
            assert node.value.id not in TAUGHT_IN, f"{path.name} uses {node.value.id}.{node.attr}"
