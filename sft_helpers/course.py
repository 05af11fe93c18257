"""Course tooling: student copies of the notebooks, and the measured minutes of each.

    python -m sft_helpers.course student --out student/

writes every notebook with each `solution`-tagged cell replaced by a stub that raises
`NotImplementedError` naming the exercise, and every output cleared. A student notebook
therefore stops at its first unanswered exercise instead of passing silently.

    python -m sft_helpers.course times

reads how long each committed notebook took to execute (the per-cell timestamps that
`jupyter nbconvert --execute` stores in the cells' metadata) and writes those minutes into
the notebook's CPU badge and the README's course map and minutes section (`make times`
executes every notebook first). No minute in the course is typed by hand.
"""

from __future__ import annotations

import argparse
import re
import sys
import textwrap
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path

import nbformat

# The folder that holds sft_helpers/ (a clone of the course).
COURSE_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = COURSE_ROOT / "notebooks"
README = COURSE_ROOT / "README.md"
# The runtime badges of a notebook's title cell: CPU minutes as measured; the Colab GPU
# time has not been measured, and the badge says so.
BADGES = re.compile(r"!\[CPU: [^\]]*\]\([^)]*\)(?: !\[Colab GPU: [^\]]*\]\([^)]*\))?")
GPU_BADGE = "![Colab GPU: not timed](https://img.shields.io/badge/Colab%20GPU-not%20timed-lightgrey)"
MAP_ROW = re.compile(r"^\| (\d\d) \| (.*?) \| (.*?) \| ([^|]*?) \| (.*) \|$", re.M)
MINUTES_BLOCK = re.compile(r"<!-- minutes -->\n.*?<!-- /minutes -->", re.S)
# A tqdm bar's text as a widget output keeps it: its first state, "  0%|", frozen in place.
WIDGET = "application/vnd.jupyter.widget-view+json"
PROGRESS_TEXT = re.compile(r"\d+%\|")
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


# --- measured minutes ----------------------------------------------------------------------


def _stamp(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def recorded_minutes(notebook: nbformat.NotebookNode) -> float:
    """Minutes from the first code cell's start to the last one's reply, as recorded in
    the cells' `execution` metadata by the run that produced the committed outputs.

    >>> cell = nbformat.v4.new_code_cell("1")
    >>> cell.metadata["execution"] = {"iopub.execute_input": "2026-01-01T10:00:00Z",
    ...                               "shell.execute_reply": "2026-01-01T10:01:30Z"}
    >>> recorded_minutes(nbformat.v4.new_notebook(cells=[cell]))
    1.5
    """
    runs = [c.metadata.get("execution", {}) for c in notebook.cells if c.cell_type == "code"]
    if not runs or not all("iopub.execute_input" in r and "shell.execute_reply" in r
                           for r in runs):
        raise ValueError("a code cell has no recorded execution time: execute the notebook "
                         "with `make times`")
    start = min(_stamp(r["iopub.execute_input"]) for r in runs)
    end = max(_stamp(r["shell.execute_reply"]) for r in runs)
    return (end - start).total_seconds() / 60


def runtime_badges(minutes: float) -> str:
    """The title cell's badges: measured CPU minutes (rounded up), the GPU time not timed.

    >>> runtime_badges(2.1).split(")")[0]
    '![CPU: 3 min](https://img.shields.io/badge/CPU-3%20min-blue'
    """
    whole = max(1, -int(-minutes // 1))
    return (f"![CPU: {whole} min](https://img.shields.io/badge/CPU-{whole}%20min-blue) "
            + GPU_BADGE)


def is_progress_bar(output: Mapping) -> bool:
    """True for the widget output of a progress bar (what GitHub shows as a frozen "0%").

    >>> is_progress_bar({"output_type": "display_data", "data": {WIDGET: {},
    ...                  "text/plain": "generating:   0%|          | 0/2"}})
    True
    """
    data = output.get("data", {})
    return WIDGET in data and bool(PROGRESS_TEXT.search("".join(data.get("text/plain", ""))))


def without_progress_bars(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """`notebook` with its progress-bar widget outputs removed (a learner running it still
    sees live bars; a reader of the committed outputs would see only their first state)."""
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if not is_progress_bar(o)]
    notebook.metadata.pop("widgets", None)
    return notebook


def notebook_minutes(notebooks: Path = NOTEBOOKS) -> dict[str, float]:
    """{"00": minutes, ...}: the recorded minutes of every committed notebook."""
    return {path.name[:2]: recorded_minutes(nbformat.read(path, as_version=4))
            for path in sorted(notebooks.glob("*.ipynb"))}


def minutes_paragraph(minutes: dict[str, float]) -> str:
    """The README's minutes section, written from `minutes`."""
    listed = ", ".join(f"{number} {value:.1f}" for number, value in minutes.items())
    text = (
        f"Recorded in the committed notebooks (executed from a clean kernel, one after another, "
        f"on the reference machine: 2 cores, AVX2 without AVX-512, no GPU): {listed} minutes, "
        f"{sum(minutes.values()):.1f} minutes for the whole course. In that run notebook 03 "
        "trained the course adapter, 05 its two new-template adapters, 06 its noisy and "
        "filtered adapters and 07 its two mistake adapters (07 scores the instruction-mixture "
        "adapter's replies that bench/ifeval_mixture.py saved); second runs of 05, 06 and 07 "
        "load them from the cache. Plan the lab for "
        "several times that: students read, change and re-run cells. Running `make test` once "
        "while preparing the room also trains and caches the adapters that notebooks 05, 06, "
        "07 and 08 load."
    )
    return "<!-- minutes -->\n" + textwrap.fill(text, width=92) + "\n<!-- /minutes -->"


def write_times(readme: Path = README, notebooks: Path = NOTEBOOKS) -> dict[str, float]:
    """Write every notebook's recorded minutes into its badge and into `readme`, and drop
    the frozen progress bars from the notebooks' outputs."""
    minutes = notebook_minutes(notebooks)
    for path in sorted(notebooks.glob("*.ipynb")):
        notebook = without_progress_bars(nbformat.read(path, as_version=4))
        title = notebook.cells[0]
        found = BADGES.search(title.source)
        if found is None:
            raise ValueError(f"{path.name}: no CPU badge in the title cell")
        badges = runtime_badges(minutes[path.name[:2]])
        title.source = title.source[:found.start()] + badges + title.source[found.end():]
        nbformat.write(notebook, path)

    def row(match: re.Match) -> str:
        number, name, learn, _, colab = match.groups()
        return f"| {number} | {name} | {learn} | {minutes[number]:.1f} | {colab} |"

    text = MAP_ROW.sub(row, readme.read_text(encoding="utf-8"))
    text = MINUTES_BLOCK.sub(lambda _: minutes_paragraph(minutes), text)
    readme.write_text(text, encoding="utf-8")
    return minutes


def readme_minutes(readme: Path = README) -> dict[str, float]:
    """{"00": minutes, ...} as the README's course map states them."""
    return {m.group(1): float(m.group(4))
            for m in MAP_ROW.finditer(readme.read_text(encoding="utf-8"))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Course tooling for teachers and maintainers.")
    commands = parser.add_subparsers(dest="command", required=True)
    student = commands.add_parser("student", help="write student copies of the notebooks")
    student.add_argument("--out", type=Path, required=True, help="folder for the copies")
    commands.add_parser("times", help="write the recorded minutes into badges and README")
    args = parser.parse_args(argv)
    if args.command == "times":
        for number, minutes in write_times().items():
            print(f"{number}: {minutes:.1f} min")
        return 0
    for path in write_student_copies(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
