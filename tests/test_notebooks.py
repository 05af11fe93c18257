"""Every notebook follows the course conventions (COURSE_DESIGN.md, "Notebook conventions")."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from sft_helpers.install import colab_cell, read_pyproject

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
REPOSITORY = read_pyproject()["tool"]["sft-helpers"]["repository"]
# Text that must never appear in committed outputs: a developer machine's paths.
MACHINE_PATHS = re.compile(r"(/work/|/tmp/|/root/|/home/|/Users/|C:\\\\)")
MAX_NOTEBOOK_BYTES = 1_500_000


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def source(cell: dict) -> str:
    return "".join(cell["source"])


def tags(cell: dict) -> list[str]:
    return cell.get("metadata", {}).get("tags", [])


def output_text(cell: dict) -> str:
    parts = []
    for out in cell.get("outputs", []):
        parts += out.get("text", [])
        for mime, data in out.get("data", {}).items():
            if mime.startswith("text/"):
                parts += data if isinstance(data, list) else [data]
    return "".join(parts)


def test_notebooks_exist():
    assert NOTEBOOKS, "no notebooks found"
    assert NOTEBOOKS[0].name == "00_setup.ipynb"


@pytest.fixture(params=NOTEBOOKS, ids=lambda p: p.name)
def notebook(request) -> tuple[Path, dict]:
    return request.param, load(request.param)


def test_name_is_numbered(notebook):
    path, _ = notebook
    assert re.fullmatch(r"\d\d_[a-z0-9_]+\.ipynb", path.name)


def test_header(notebook):
    path, nb = notebook
    first = nb["cells"][0]
    text = source(first)
    assert first["cell_type"] == "markdown" and text.startswith("# ")
    colab = REPOSITORY.replace("https://github.com/", "https://colab.research.google.com/github/")
    assert f"{colab}/blob/main/notebooks/{path.name}" in text, "Open-in-Colab badge"
    assert "img.shields.io/badge/CPU" in text, "runtime badge"
    for heading in ("What you'll learn", "Prerequisites"):
        assert heading in text, heading


def test_first_code_cell_is_the_colab_install_cell(notebook):
    _, nb = notebook
    first_code = next(c for c in nb["cells"] if c["cell_type"] == "code")
    assert source(first_code) == colab_cell()


def test_one_parameters_cell(notebook):
    _, nb = notebook
    assert sum("parameters" in tags(c) for c in nb["cells"]) == 1


def test_sections_and_exercises(notebook):
    _, nb = notebook
    markdown = "\n".join(source(c) for c in nb["cells"] if c["cell_type"] == "markdown")
    assert re.search(r"^## Summary", markdown, re.M)
    assert re.search(r"^## Next", markdown, re.M)
    assert len(re.findall(r"Check your understanding", markdown)) >= 2
    solutions = [c for c in nb["cells"] if "solution" in tags(c)]
    assert len(solutions) >= 2 and all("check_" in source(c) for c in solutions)


def test_outputs_are_committed_and_clean(notebook):
    path, nb = notebook
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    counts = [c["execution_count"] for c in code]
    assert counts == list(range(1, len(code) + 1)), "execute from a clean kernel, top to bottom"
    for cell in code:
        assert not any(o["output_type"] == "error" for o in cell["outputs"])
        found = MACHINE_PATHS.search(output_text(cell))
        assert found is None, f"machine path {found and found.group()} in an output"
    assert path.stat().st_size < MAX_NOTEBOOK_BYTES
