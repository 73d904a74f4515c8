"""Databricks artefacts, checked here without a workspace: the bundle's job, its config, the notebooks."""

import ast
import re
import tomllib

import yaml

from backforth_spark.cli import _parser
from backforth_spark.config import load_config
from tests.conftest import REPO

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.py"))


def test_databricks_config_uses_catalog_tables_and_workspace_tracking():
    cfg = load_config(REPO / "conf" / "databricks.yaml")
    assert cfg.tables.catalog_schema == "main.backforth"
    assert cfg.spark.configure_delta is False  # Databricks runtimes ship Delta
    assert cfg.tracking.tracking_uri == "databricks"
    assert cfg.llm.gpus_per_task == 1 and cfg.curate.min_score == 5


def test_bundle_schedules_the_refresh_on_a_gpu_job_cluster_with_the_wheel():
    bundle = yaml.safe_load((REPO / "databricks.yml").read_text())
    job = bundle["resources"]["jobs"]["backforth_refresh"]
    cron = job["schedule"]["quartz_cron_expression"].split()
    assert len(cron) in (6, 7)  # Quartz: seconds first
    [cluster] = job["job_clusters"]
    assert "gpu" in cluster["new_cluster"]["spark_version"]
    assert cluster["new_cluster"]["spark_conf"]["spark.executor.resource.gpu.amount"] == "1"
    [task] = job["tasks"]
    assert task["job_cluster_key"] == cluster["job_cluster_key"]
    assert {"whl": "./dist/*.whl"} in task["libraries"]
    wheel = task["python_wheel_task"]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts[wheel["entry_point"]] == "backforth_spark.cli:main"
    # the parameters are a valid `backforth refresh` command line, and its --set keys exist
    params = [
        re.sub(r"\$\{var\.(\w+)\}", lambda m: bundle["variables"][m[1]]["default"], p)
        for p in wheel["parameters"]
    ]
    args = _parser().parse_args(params)
    assert args.command == "refresh"
    load_config(REPO / "conf" / "databricks.yaml", args.overrides)


def test_notebooks_are_databricks_source_notebooks_that_call_the_library():
    assert {p.stem for p in NOTEBOOKS} >= {"quickstart", "run_stage", "explore_results"}
    for path in NOTEBOOKS:
        text = path.read_text()
        assert text.startswith("# Databricks notebook source\n"), path.name
        cells = text.split("\n# COMMAND ----------\n")
        assert len(cells) > 2, path.name
        code = [c for c in cells if not c.strip().startswith("# MAGIC") and "notebook source" not in c[:30]]
        for cell in code:
            tree = ast.parse(cell)  # every code cell is valid Python
            # the library does the work: no functions or classes copied into a notebook
            assert not [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.ClassDef)], path.name
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom):
                    assert node.module.split(".")[0] in ("backforth_spark", "pyspark"), (
                        path.name,
                        node.module,
                    )
