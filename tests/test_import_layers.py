"""The library's modules import one another without circles, and `parallel/` sits below `train/`.

The graph is read from the source with `ast`, counting every import a module makes, at its top or
inside a function: a function-level import is how a circle hides (it runs, until someone moves it
up). A circle means neither module can be understood, tested or moved without the other.
"""

from __future__ import annotations

import ast
from pathlib import Path

from common_fixtures import REPO

LIBRARY = REPO / "vlpdist"


def _module_name(path: Path, base: Path) -> str:
    parts = list(path.relative_to(base).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = LIBRARY) -> dict[str, set[str]]:
    """Module -> the library modules it imports (`from pkg import name` counts `pkg.name` when that is a module)."""
    modules = {_module_name(path, root.parent): path for path in sorted(root.rglob("*.py"))}
    package = root.name
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            else:
                continue
            for target in targets:
                while target and target not in modules:  # `a.b.func` -> the module `a.b`
                    target = target.rpartition(".")[0]
                if target and target not in (name, package):
                    imported.add(target)
        graph[name] = imported
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None (depth-first search, colouring the modules on the path)."""
    on_path: list[str] = []
    state: dict[str, str] = {}  # "open" while on the path, "done" once every import below it is explored

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        on_path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                return on_path[on_path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        on_path.pop()
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_the_library_has_no_import_circle():
    graph = import_graph()
    assert {"vlpdist.models.captioner", "vlpdist.train.loop", "vlpdist.parallel.consolidate"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_parallel_imports_nothing_from_train():
    graph = import_graph()
    upward = {(module, target) for module, targets in graph.items() if module.startswith("vlpdist.parallel")
              for target in targets if target.startswith("vlpdist.train")}
    assert not upward, upward


def test_the_checker_finds_a_circle_hidden_in_a_function(tmp_path):
    """The circle the captioner and export_bundle had: each imported the other inside a function."""
    package = tmp_path / "vlpdist"
    (package / "models").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "models" / "__init__.py").write_text("")
    (package / "models" / "captioner.py").write_text("def load():\n    from vlpdist.models.export_bundle import read\n")
    (package / "models" / "export_bundle.py").write_text("from vlpdist.models import captioner\n")
    graph = import_graph(package)
    assert find_cycle(graph) in (["vlpdist.models.captioner", "vlpdist.models.export_bundle", "vlpdist.models.captioner"],
                                 ["vlpdist.models.export_bundle", "vlpdist.models.captioner", "vlpdist.models.export_bundle"])
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
