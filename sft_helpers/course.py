"""Course tooling for teachers: student copies of the notebooks.

    python -m sft_helpers.course student --out student/

writes every notebook with each `solution`-tagged cell replaced by a stub that raises
`NotImplementedError` naming the exercise, and every output cleared. A student notebook
therefore stops at its first unanswered exercise instead of passing silently.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import nbformat

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
EXERCISE_HEADING = re.compile(r"^#+\s*(Check your understanding[^\n]*)", re.M)
CHECK_CALL = re.compile(r"\b(check_\w+)\(")


def exercise_name(notebook_path: Path, cells: list, index: int) -> str:
    """The exercise a solution cell answers: notebook number + the nearest heading above it.

    >>> exercise_name(Path("00_setup.ipynb"), [nbformat.v4.new_markdown_cell(
    ...     "### Check your understanding 2")], 1)
    '00 · Check your understanding 2'
    """
    number = notebook_path.name.split("_", 1)[0]
    for cell in reversed(cells[:index]):
        if cell.cell_type == "markdown":
            found = EXERCISE_HEADING.search(cell.source)
            if found:
                return f"{number} · {found.group(1).strip()}"
    raise ValueError(
        f"{notebook_path.name}: solution cell {index} has no 'Check your understanding' "
        "heading above it"
    )


def student_stub(name: str, solution: str) -> str:
    """The code a student sees in place of a solution: which check to call, and a stop."""
    checks = sorted(set(CHECK_CALL.findall(solution)))
    lines = [f"# {name}: write your answer here."]
    if checks:
        lines.append(f"# Then check it with {', '.join(checks)} (from sft_helpers.checks).")
    lines.append(f'raise NotImplementedError("{name}: replace this cell with your answer")')
    return "\n".join(lines)


def student_notebook(path: Path) -> nbformat.NotebookNode:
    """The student copy of the notebook at `path` (solutions stubbed, outputs cleared)."""
    notebook = nbformat.read(path, as_version=4)
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type != "code":
            continue
        if "solution" in cell.metadata.get("tags", []):
            cell.source = student_stub(exercise_name(path, notebook.cells, index), cell.source)
            cell.metadata["tags"] = ["exercise"]
        cell.outputs = []
        cell.execution_count = None
    return notebook


def write_student_copies(out: Path, notebooks: Path = NOTEBOOKS) -> list[Path]:
    """Write the student copy of every notebook in `notebooks` to `out`; return the paths."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in sorted(notebooks.glob("*.ipynb")):
        target = out / path.name
        nbformat.write(student_notebook(path), target)
        written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Course tooling for teachers.")
    commands = parser.add_subparsers(dest="command", required=True)
    student = commands.add_parser("student", help="write student copies of the notebooks")
    student.add_argument("--out", type=Path, required=True, help="folder for the copies")
    args = parser.parse_args(argv)
    for path in write_student_copies(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
