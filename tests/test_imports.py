"""Every module of the three packages imports (heavy dependencies are imported lazily inside)."""

import importlib
import pkgutil

import pytest

PACKAGES = ("vlpdist", "data_ingest", "launcher")


def _all_modules():
    names = []
    for package_name in PACKAGES:
        package = importlib.import_module(package_name)
        names.append(package_name)
        for info in pkgutil.walk_packages(package.__path__, prefix=f"{package_name}."):
            names.append(info.name)
    return names


def test_there_are_modules_to_import():
    assert {"vlpdist.config", "data_ingest.download", "launcher.demo"} <= set(_all_modules())


@pytest.mark.parametrize("module_name", _all_modules())
def test_module_imports(module_name):
    importlib.import_module(module_name)
