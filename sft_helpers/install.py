"""Install the course's pinned packages: one plan for a laptop/CI venv, one for Colab.

Runs with the standard library only (it is executed before anything is installed):

    python sft_helpers/install.py local          # what `make` runs inside .venv
    python sft_helpers/install.py colab          # what the notebooks' first cell runs on Colab
    python sft_helpers/install.py colab --dry-run   # print the commands, run nothing
    python sft_helpers/install.py model          # conda users: the default model's package

Every pin comes from pyproject.toml, so the two plans cannot drift apart.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pip vendors the same parser
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
# Extras of the project per target (None: the project is not installed). Colab gets no
# extras: it keeps its own CUDA torch and its own Jupyter, and loads models from the Hub.
EXTRAS = {"local": ["cpu", "lab", "test"], "colab": [], "model": None}
# The first code cell of every notebook (tests/test_notebooks.py checks each one).
COLAB_CELL = """\
# Colab only: fetch the course and install its pinned packages, keeping Colab's torch.
# Anywhere else this cell does nothing (`make lab` has installed everything).
import sys

if "google.colab" in sys.modules:
    import subprocess

    REPOSITORY, COURSE = "{repository}", "/content/sft-course"
    subprocess.run(["git", "clone", "--quiet", "--depth=1", REPOSITORY, COURSE])
    subprocess.run([sys.executable, f"{{COURSE}}/sft_helpers/install.py", "colab"], check=True)
    sys.path.insert(0, COURSE)"""


def read_pyproject(root: Path = ROOT) -> dict:
    """The parsed pyproject.toml of the course."""
    with open(root / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def install_commands(target: str, root: Path = ROOT) -> list[list[str]]:
    """The pip commands that install the course for `target` ("local" or "colab").

    >>> install_commands("colab")[0][-1] == str(ROOT)  # the project itself, no extras
    True
    """
    if target not in EXTRAS:
        raise ValueError(f"unknown install target {target!r}; choose one of {sorted(EXTRAS)}")
    pip = [sys.executable, "-m", "pip", "install", "--quiet"]
    commands = []
    if EXTRAS[target] is not None:
        extras = ",".join(EXTRAS[target])
        commands.append(pip + ["--editable", f"{root}[{extras}]" if extras else str(root)])
    if target != "colab":
        no_deps = read_pyproject(root)["tool"]["sft-helpers"]["no-deps"]
        commands.append(pip + ["--no-deps", *no_deps])
    return commands


def colab_cell(root: Path = ROOT) -> str:
    """The text of every notebook's first code cell, with the course's repository filled in."""
    return COLAB_CELL.format(repository=read_pyproject(root)["tool"]["sft-helpers"]["repository"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", choices=sorted(EXTRAS))
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = parser.parse_args(argv)
    for command in install_commands(args.target):
        print("+", " ".join(command), flush=True)
        if not args.dry_run:
            subprocess.run(command, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
