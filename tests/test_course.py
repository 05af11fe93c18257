"""Student copies: solutions become stubs that stop the notebook at the first exercise; the
minutes the README and the badges state are the ones the committed notebooks recorded."""

from __future__ import annotations

import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from sft_helpers import course
from sft_helpers.course import NOTEBOOKS, exercise_name, main, student_notebook, student_stub

ALL = sorted(NOTEBOOKS.glob("*.ipynb"))


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("student")
    assert main(["student", "--out", str(out)]) == 0
    return out


def test_every_notebook_gets_a_student_copy(student_dir):
    assert sorted(p.name for p in student_dir.glob("*.ipynb")) == [p.name for p in ALL]


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.name)
def test_solutions_are_stubbed_and_outputs_cleared(student_dir, path):
    full = nbformat.read(path, as_version=4)
    student = nbformat.read(student_dir / path.name, as_version=4)
    assert len(full.cells) == len(student.cells)
    stubs = 0
    for original, copy in zip(full.cells, student.cells, strict=True):
        if copy.cell_type != "code":
            assert copy.source == original.source
            continue
        assert copy.outputs == [] and copy.execution_count is None
        if "solution" in original.metadata.get("tags", []):
            stubs += 1
            assert "NotImplementedError" in copy.source
            assert copy.source != original.source
            assert "solution" not in copy.metadata.get("tags", [])
        else:
            assert copy.source == original.source
    assert stubs >= 2


@pytest.mark.slow
def test_student_notebook_stops_at_the_first_exercise(student_dir, tmp_path):
    path = student_dir / "00_setup.ipynb"
    notebook = nbformat.read(path, as_version=4)
    tagged = [i for i, c in enumerate(notebook.cells) if "exercise" in c.metadata.get("tags", [])]
    first = tagged[0]
    name = exercise_name(path, notebook.cells, first)
    client = NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    with pytest.raises(CellExecutionError) as error:
        client.execute()
    assert "NotImplementedError" in str(error.value) and name in str(error.value)
    ran = [c for c in notebook.cells[:first] if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in ran), "cells before the exercise ran"
    later = [c for c in notebook.cells[first + 1:] if c.cell_type == "code"]
    assert all(c.execution_count is None for c in later), "nothing after the exercise ran"


def test_stub_names_the_check_to_call():
    stub = student_stub("00 · Check your understanding 1", "check_parameter_count(model, n)")
    assert "check_parameter_count" in stub
    with pytest.raises(NotImplementedError, match="00 · Check your understanding 1"):
        exec(stub, {})


def test_solution_without_an_exercise_heading_is_an_error(tmp_path):
    notebook = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("## 1. Some section"),
        nbformat.v4.new_code_cell("x = 1", metadata={"tags": ["solution"]}),
    ])
    path = tmp_path / "09_broken.ipynb"
    nbformat.write(notebook, path)
    with pytest.raises(ValueError, match="09_broken.ipynb: solution cell 1"):
        student_notebook(path)



# --- measured minutes ----------------------------------------------------------------------


def test_the_readme_states_the_minutes_the_committed_notebooks_recorded():
    recorded = course.notebook_minutes()
    assert set(recorded) == {p.name[:2] for p in ALL}
    assert course.readme_minutes() == {n: round(m, 1) for n, m in recorded.items()}
    text = course.README.read_text(encoding="utf-8")
    assert course.minutes_paragraph(recorded) in text


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.stem)
def test_each_badge_gives_the_measured_cpu_minutes_and_no_unmeasured_gpu_time(path):
    notebook = nbformat.read(path, as_version=4)
    badges = course.BADGES.search(notebook.cells[0].source).group(0)
    assert badges == course.runtime_badges(course.recorded_minutes(notebook))


def test_write_times_rewrites_badges_and_readme(tmp_path):
    folder = tmp_path / "notebooks"
    folder.mkdir()
    shutil.copy(ALL[0], folder / ALL[0].name)
    readme = tmp_path / "README.md"
    row = "| 00 | [Setup](x) | learn | 9.9 | [colab](y) |"
    readme.write_text(f"{row}\n<!-- minutes -->\nold\n<!-- /minutes -->\n", encoding="utf-8")
    title = nbformat.read(folder / ALL[0].name, as_version=4)
    title.cells[0].source = title.cells[0].source.replace(
        course.BADGES.search(title.cells[0].source).group(0),
        "![CPU: 9 min](https://img.shields.io/badge/CPU-9%20min-blue)")
    nbformat.write(title, folder / ALL[0].name)
    minutes = course.write_times(readme, folder)
    assert course.readme_minutes(readme) == {"00": round(minutes["00"], 1)}
    assert "old" not in readme.read_text(encoding="utf-8")
    rewritten = nbformat.read(folder / ALL[0].name, as_version=4).cells[0].source
    assert course.runtime_badges(minutes["00"]) in rewritten


def test_a_notebook_without_recorded_times_is_refused():
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1")])
    with pytest.raises(ValueError, match="no recorded execution time"):
        course.recorded_minutes(notebook)


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.stem)
def test_no_frozen_progress_bar_in_the_committed_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    frozen = [i for i, cell in enumerate(notebook.cells) if cell.cell_type == "code"
              and any(course.is_progress_bar(o) for o in cell.outputs)]
    assert not frozen, f"{path.name}: cells {frozen} show a progress bar's first state"
