"""One set of exact pins, installed the same way by make, environment.yml and Colab."""

from __future__ import annotations

import importlib.metadata
import json
import re
import sys
from pathlib import Path

import pytest
import yaml

from sft_helpers import install
from sft_helpers.install import colab_cell, install_commands, read_pyproject

ROOT = Path(__file__).parent.parent
PYPROJECT = read_pyproject()
PIN = re.compile(r"^([A-Za-z0-9_.-]+)==([0-9][0-9A-Za-z.+-]*)$")


def all_pins() -> list[str]:
    project = PYPROJECT["project"]
    extras = [p for group in project["optional-dependencies"].values() for p in group]
    return project["dependencies"] + extras + PYPROJECT["tool"]["sft-helpers"]["no-deps"]


@pytest.mark.parametrize("requirement", all_pins())
def test_every_requirement_is_an_exact_pin(requirement):
    assert PIN.match(requirement), f"{requirement!r} is not pinned with =="


def test_torch_is_pinned_to_the_cpu_wheel_version_and_kept_out_of_colab():
    assert PYPROJECT["project"]["optional-dependencies"]["cpu"] == ["torch==2.13.0"]
    assert not any(p.startswith("torch") for p in PYPROJECT["project"]["dependencies"])
    colab = " ".join(" ".join(c) for c in install_commands("colab"))
    assert "cpu" not in colab and "torch" not in colab


def project_spec(commands: list[list[str]]) -> str:
    """The `path[extras]` argument of the editable install in an install plan."""
    (spec,) = [c[c.index("--editable") + 1] for c in commands if "--editable" in c]
    return spec


def test_make_installs_the_local_plan():
    makefile = (ROOT / "Makefile").read_text()
    assert "sft_helpers/install.py local" in makefile
    spec = project_spec(install_commands("local"))
    assert spec.endswith("[cpu,lab,test]")
    assert install_commands("local")[-1][-1] == PYPROJECT["tool"]["sft-helpers"]["no-deps"][0]


def test_environment_yml_installs_the_same_extras_and_python():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert pip_section == ["--editable .[" + ",".join(install.EXTRAS["local"]) + "]"]
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python"))
    version = tuple(int(x) for x in python.split("=")[1].split("."))
    minimum = tuple(int(x) for x in PYPROJECT["project"]["requires-python"][2:].split("."))
    assert version >= minimum
    # conda cannot pass --no-deps per line: the model package has its own install target
    assert "install.py model" in (ROOT / "environment.yml").read_text()
    assert install_commands("model")[0][-1] == PYPROJECT["tool"]["sft-helpers"]["no-deps"][0]


def test_colab_cell_installs_the_project_pins_through_install_py():
    cell = colab_cell()
    assert "sft_helpers/install.py" in cell and '"colab"' in cell
    assert PYPROJECT["tool"]["sft-helpers"]["repository"] in cell
    assert project_spec(install_commands("colab")).endswith(str(install.ROOT))


def test_colab_cell_dry_run(monkeypatch):
    """Run the cell as Colab would, with the clone and pip calls recorded, not executed."""
    import subprocess

    calls = []
    monkeypatch.setitem(sys.modules, "google.colab", object())
    monkeypatch.setattr(subprocess, "run", lambda args, **kw: calls.append(args))
    monkeypatch.setattr(sys, "path", list(sys.path))
    exec(colab_cell(), {})
    assert calls[0][:2] == ["git", "clone"]
    assert calls[1][-2:] == ["/content/sft-course/sft_helpers/install.py", "colab"]
    assert sys.path[0] == "/content/sft-course"


def test_colab_cell_does_nothing_elsewhere(monkeypatch):
    import subprocess

    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("ran outside Colab"))
    exec(colab_cell(), {})


def test_installed_versions_equal_the_pins():
    for requirement in all_pins():
        name, version = PIN.match(requirement).groups()
        installed = importlib.metadata.version(name)
        assert installed.split("+")[0] == version, f"{name} {installed} is not the pin {version}"


def test_notebook_kernels_are_plain_python3():
    for path in (ROOT / "notebooks").glob("*.ipynb"):
        assert json.loads(path.read_text())["metadata"]["kernelspec"]["name"] == "python3"
