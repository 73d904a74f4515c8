"""The layers import one way: core <- udfs <- spark (tables, session, stages) <- app (pipeline, CLI,
status, jobs, notebooks), each layer a folder of backforth_spark/ (udfs/, jobs/ and notebooks/ at the
top). Read from the source of every module, every import at any depth; and the core, imported alone,
leaves pyspark out of the process."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from tests.conftest import REPO

# The folders are the layers: a module may import its own layer or a lower one.
ORDER = {"core": 0, "udfs": 1, "spark": 2, "app": 3}


def layer(module: str) -> str:
    parts = module.split(".")
    if module == "backforth_spark":  # the package itself, empty: no import of its own
        return "core"
    if parts[0] == "udfs":
        return "udfs"
    if parts[0] in ("jobs", "notebooks"):
        return "app"
    if parts[0] == "backforth_spark" and len(parts) > 1 and parts[1] in ORDER:
        return parts[1]
    raise AssertionError(f"{module} is in no layer's folder (backforth_spark/core, spark or app)")


def core_modules() -> list[str]:
    return sorted(name for name in modules() if name.startswith("backforth_spark.core"))


def modules() -> dict[str, ast.Module]:
    out = {}
    for folder in ("backforth_spark", "udfs", "jobs", "notebooks"):
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = ast.parse(path.read_text(), str(path))
    return out


def project_imports(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """The project modules `name` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            if node.level:  # relative
                base = ".".join(name.split(".")[: -node.level] + [node.module])
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def test_every_import_goes_down_or_sideways():
    trees = modules()
    known = set(trees)
    wrong = []
    for name, tree in trees.items():
        for target in project_imports(name, tree, known):
            if ORDER[layer(target)] > ORDER[layer(name)]:
                wrong.append(f"{name} ({layer(name)}) imports {target} ({layer(target)})")
    assert wrong == []


def test_there_is_no_import_cycle():
    trees = modules()
    known = set(trees)
    graph = {name: project_imports(name, tree, known) for name, tree in trees.items()}
    # a package importing its own submodules is how Python packages work, not a cycle
    graph = {n: {t for t in ts if not t.startswith(n + ".")} for n, ts in graph.items()}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join([*path, node, nxt]))
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_the_core_imports_without_pyspark():
    code = "import sys\n" + "".join(f"import {m}\n" for m in core_modules())
    code += (
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pyspark', 'delta', 'vllm', 'torch')))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_module_is_in_a_layer():
    for name in modules():
        layer(name)  # raises for a module outside the layers' folders
