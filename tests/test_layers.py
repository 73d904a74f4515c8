"""The layers import one way: core <- udfs <- stages (Spark glue) <- app (pipeline, CLI, status, jobs,
notebooks). Read from the source of every module, every import at any depth; and the core, imported
alone, leaves pyspark out of the process."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from tests.conftest import REPO

# the layer of each project module; a module may import its own layer or a lower one
CORE = {
    "backforth_spark",
    "backforth_spark.config",
    "backforth_spark.storage",
    "backforth_spark.failures",
    "backforth_spark.text",
    "backforth_spark.minhash",
    "backforth_spark.components",
    "backforth_spark.dedup_local",
    "backforth_spark.dolma",
    "backforth_spark.chunking",
    "backforth_spark.prompts",
    "backforth_spark.curate",
    "backforth_spark.schemas",
    "backforth_spark.dataset",
    "backforth_spark.model",
    "backforth_spark.engine",
    "backforth_spark.vllm_engine",
    "backforth_spark.openai_engine",
    "backforth_spark.generation",
    "backforth_spark.analysis",
}
SPARK = {"backforth_spark.tables", "backforth_spark.session", "backforth_spark.context"}
APP = {
    "backforth_spark.pipeline",
    "backforth_spark.cli",
    "backforth_spark.status",
    "backforth_spark.tracking",
    "backforth_spark.standalone",
}
ORDER = {"core": 0, "udfs": 1, "stages": 2, "app": 3}


def layer(module: str) -> str:
    if module in CORE:
        return "core"
    if module == "udfs" or module.startswith("udfs."):
        return "udfs"
    if module in SPARK or module.startswith("backforth_spark.stages"):
        return "stages"
    if module in APP or module.split(".")[0] in ("jobs", "notebooks"):
        return "app"
    raise AssertionError(f"{module} has no layer: add it to tests/test_layers.py and docs/ARCHITECTURE.md")


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
    code = "import sys\n" + "".join(f"import {m}\n" for m in sorted(CORE))
    code += (
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pyspark', 'delta', 'vllm', 'torch')))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_layer_list_matches_the_modules_on_disk():
    for name in modules():
        layer(name)  # raises for a module no layer names
