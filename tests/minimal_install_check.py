"""The inference path imports from a minimal install: `python tests/minimal_install_check.py`.

A user who only captions with an export installs `pip install -e .` (no extras), so the modules
below must import without any extra, and what they need at run time must come with the base
dependencies. `.ci/run` runs this script in such a venv, where a heavy top-level import fails
outright; `tests/test_imports.py` runs it in the full install, where the same import succeeds and
only the `sys.modules` check below can catch it. Not a pytest module (no `test_` prefix): it must
run where pytest is not installed. Exit 0 when every check holds, 1 with one line per failure.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import sys
import time

# Packages every module of which is on the inference/evaluation path.
LIGHT_PACKAGES = ("vlpdist.eval", "vlpdist.data")
LIGHT_MODULES = (
    "vlpdist.config",
    "vlpdist.models",
    "vlpdist.models.captioner",
    "vlpdist.models.fold",
    "vlpdist.models.mapper",
    "vlpdist.models.experts",
)
# Entry points of the inference path; each is checked once it exists.
LIGHT_COMMANDS = ("launcher.caption", "launcher.ask")
# Each behind an extra (ingest, process, train, faiss): none may load when a light module is imported.
HEAVY = ("deepspeed", "ray", "faiss", "img2dataset", "open_clip")
# The library's floors point down: importing it never loads a stage or an entry point.
ABOVE_THE_LIBRARY = ("data_ingest", "launcher")
# What the folded captioner needs when it runs (LM, tokenizer, weights); the base dependencies must bring it.
INFERENCE_RUNTIME = ("torch", "transformers", "tokenizers", "safetensors.torch", "yaml", "omegaconf")


def loaded(roots: tuple[str, ...]) -> list[str]:
    return sorted({name.split(".")[0] for name in sys.modules} & set(roots))


def import_or_report(name: str, failures: list[str]) -> bool:
    try:
        importlib.import_module(name)
    except Exception as err:  # an ImportError here is the finding; anything else breaks the module as badly
        failures.append(f"{name}: {type(err).__name__}: {err}")
        return False
    return True


def library_modules() -> list[str]:
    names = list(LIGHT_MODULES)
    for package_name in LIGHT_PACKAGES:
        package = importlib.import_module(package_name)
        names += [package_name, *(info.name for info in pkgutil.walk_packages(package.__path__, prefix=f"{package_name}."))]
    return names


def main() -> int:
    started = time.perf_counter()
    failures: list[str] = []
    modules = library_modules()
    for name in modules:
        import_or_report(name, failures)
    for roots, what in ((HEAVY, "a heavy optional dependency"), (ABOVE_THE_LIBRARY, "a package above the library")):
        if loaded(roots):
            failures.append(f"importing the library's light modules loaded {what}: {loaded(roots)}")
    for name in LIGHT_COMMANDS:
        if importlib.util.find_spec(name) is None:
            print(f"skipped {name}: no such module yet")
            continue
        modules.append(name)
        if import_or_report(name, failures) and loaded(HEAVY):
            failures.append(f"importing {name} loaded a heavy optional dependency: {loaded(HEAVY)}")
    for name in INFERENCE_RUNTIME:
        import_or_report(name, failures)
    for failure in failures:
        print(f"minimal install: {failure}")
    print(f"minimal install: {len(modules)} light modules and {len(INFERENCE_RUNTIME)} runtime dependencies checked, "
          f"{len(failures)} failures, {time.perf_counter() - started:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
