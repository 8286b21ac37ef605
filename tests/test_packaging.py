"""Packaging and layout contract: one top-level package, imports flowing one way."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module" and node.args:
            if isinstance(node.args[0], ast.Constant):
                names.append(node.args[0].value)
    return names


@pytest.mark.parametrize("folder, forbidden", [
    ("shared", ("peftlab.domains", "peftlab.pipelines", "domains", "pipelines")),
    ("domains", ("peftlab.pipelines", "pipelines")),
])
def test_imports_flow_pipelines_to_domains_to_shared(folder, forbidden):
    offenders = []
    for path in (REPO / folder).rglob("*.py"):
        for name in _imports(path):
            if name.startswith(forbidden):
                offenders.append(f"{path.relative_to(REPO)} imports {name}")
    # The task registry fills itself by importing the domains *by name at run time*;
    # that one dynamic import is the only allowed reference from shared to domains.
    offenders = [o for o in offenders if o != "shared/tasks.py imports peftlab.domains"]
    assert not offenders, offenders


def test_every_package_folder_is_declared_in_pyproject():
    import tomllib

    declared = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {"peftlab"}
    for folder in ("shared", "domains", "pipelines"):
        for init in (REPO / folder).rglob("__init__.py"):
            on_disk.add("peftlab." + ".".join(init.parent.relative_to(REPO).parts))
    assert on_disk == declared


def test_wheel_has_peftlab_as_its_only_top_level_package(tmp_path):
    result = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path), str(REPO)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    wheel = next(tmp_path.glob("peftlab-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"peftlab"}
    assert "peftlab/shared/methods/__init__.py" in names
    assert "peftlab/pipelines/recipes/protein-ppi.yaml" in names
    assert "peftlab/data_cards/protein-ppi-demo.md" in names
    assert not any(n.startswith("peftlab/tests/") for n in names)
