"""The house's rules, read from the code's own imports (AST), not from a grep:

* `udfs` (executor code) never imports `pipelines` (driver code);
* no library module imports an entry point (`pipelines/<job>.py`), and entry points import no other
  entry point;
* no import cycles among the project's modules;
* `pipelines/*.py` holds only entry points (each with a `__main__` guard) and the `estimators`
  re-export that keeps saved pyspark.ml pipelines loadable.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipelines", "udfs")
RE_EXPORTS = {"pipelines.estimators"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports, anywhere in the file (a function-level import counts)."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + [base]).strip(".")
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


MODULES = _modules()
GRAPH = {name: _imports(name, path, set(MODULES)) for name, path in MODULES.items()}
ENTRY_POINTS = {n for n, p in MODULES.items()
                if p.parent == ROOT / "pipelines" and p.name != "__init__.py" and n not in RE_EXPORTS}


def test_the_graph_was_read():
    assert "pipelines.train" in ENTRY_POINTS and "udfs.core.models" in MODULES
    assert "pipelines.training.runners" in GRAPH["pipelines.train"]


def test_udfs_never_imports_pipelines():
    bad = {n: sorted(i for i in deps if i.startswith("pipelines")) for n, deps in GRAPH.items()
           if n.startswith("udfs")}
    assert not {n: d for n, d in bad.items() if d}


def test_no_module_imports_an_entry_point():
    bad = {n: sorted(deps & ENTRY_POINTS) for n, deps in GRAPH.items()}
    assert not {n: d for n, d in bad.items() if d}


def test_no_import_cycles():
    """Tarjan's strongly connected components: every component is a single module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not cycles


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_top_level_modules_are_entry_points(name):
    tree = ast.parse(MODULES[name].read_text())
    guards = [n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)]
    assert guards, f"{name} is not an entry point (no __main__ guard): move it into a subpackage"
    assert any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body)


def test_the_estimators_re_export_keeps_saved_pipelines_loadable():
    from pipelines import estimators
    from pipelines.ml import estimators as real

    assert estimators.FedsparkEstimator is real.FedsparkEstimator
    assert estimators.FedsparkModel is real.FedsparkModel


def _third_party(path: Path) -> set[str]:
    """The top-level names of what `path` imports from outside the standard library and the project."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
        found |= {n.partition(".")[0] for n in names}
    return found - set(sys.stdlib_module_names) - set(PACKAGES) - {"__future__"}


def test_executors_need_only_the_requirements_udfs_declares():
    """What scripts/package.sh ships to executors is udfs.EXECUTOR_REQUIREMENTS: udfs imports
    nothing else but pyspark (import names here equal the distributions' names)."""
    from udfs import EXECUTOR_EXTRAS, EXECUTOR_REQUIREMENTS

    used = set().union(*(_third_party(p) for n, p in MODULES.items() if n.startswith("udfs")))
    import_names = {"scikit-learn": "sklearn"}   # the one distribution imported by another name
    declared = {import_names.get(d, d) for d in set(EXECUTOR_REQUIREMENTS).union(*EXECUTOR_EXTRAS.values())}
    assert used - {"pyspark"} <= declared, sorted(used - {"pyspark"} - declared)
    assert {"numpy", "pyarrow", "cryptography"} <= used   # the walk saw the imports
