"""Every module of the three packages imports; the inference path stays light; the floors point down.

This suite runs in the full install, where an eager heavy import succeeds: the light-path check
therefore runs `minimal_install_check.py` in a fresh interpreter and looks at what got loaded
(`.ci/run` also runs it in a venv with no extras, where such an import fails outright).
"""

import ast
import importlib
import pkgutil
import subprocess
import sys

import pytest
from common_fixtures import REPO

PACKAGES = ("vlpdist", "data_ingest", "launcher")
# Who may import whom: the library sits at the bottom, the stages above it, the entry points on top.
FORBIDDEN_IMPORTS = {"vlpdist": ("data_ingest", "launcher"), "data_ingest": ("launcher",)}


def _all_modules():
    names = []
    for package_name in PACKAGES:
        package = importlib.import_module(package_name)
        names.append(package_name)
        for info in pkgutil.walk_packages(package.__path__, prefix=f"{package_name}."):
            names.append(info.name)
    return names


def _imported_roots(path) -> set[str]:
    """Top-level package names `path` imports anywhere (module top or inside a function)."""
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_there_are_modules_to_import():
    assert {"vlpdist.config", "data_ingest.download", "launcher.demo"} <= set(_all_modules())


@pytest.mark.parametrize("module_name", _all_modules())
def test_module_imports(module_name):
    importlib.import_module(module_name)


@pytest.mark.parametrize("package", sorted(FORBIDDEN_IMPORTS))
def test_floors_only_point_down(package):
    upward = {
        str(path.relative_to(REPO)): sorted(_imported_roots(path) & set(FORBIDDEN_IMPORTS[package]))
        for path in sorted((REPO / package).rglob("*.py"))
    }
    assert {path: roots for path, roots in upward.items() if roots} == {}


def test_inference_path_imports_without_heavy_dependencies():
    result = subprocess.run([sys.executable, str(REPO / "tests" / "minimal_install_check.py")],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 failures" in result.stdout


def test_the_declared_torch_floor_is_the_torch_ci_runs():
    """pyproject's torch floor is the release `.ci/run`'s minimal install runs on: a lower floor admits
    releases nothing here runs, which lack names the code calls (torch.distributed.all_gather_single)."""
    import re

    from packaging.version import Version

    floor = re.search(r'"torch>=([\d.]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    pinned = re.search(r"pip\" install -q torch==([\d.]+)", (REPO / ".ci" / "run").read_text()).group(1)
    assert Version(floor) == Version(pinned)
