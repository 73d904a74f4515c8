"""Every notebook under notebooks/ runs, cell by cell, against the suite's Spark session
(tests/notebook_shim.py stands in for Databricks' `dbutils.widgets` and `display`), on catalog tables
(Spark's session catalog here), in the order a user meets them: quickstart (the whole pipeline),
run_stage, explore_results. The LLM stages go to the suite's `vllm serve` (the real engine, already
loaded; no engine per test)."""

from __future__ import annotations

import json
import uuid

import pytest
import yaml

from backforth_spark.spark.stages import STAGES
from tests.conftest import API_KEY, DOLMA_SAMPLE, LOCAL_CONF, REPO
from tests.notebook_shim import WidgetNotDefined, Widgets, cells, run_notebook

pytestmark = pytest.mark.e2e

NOTEBOOKS = REPO / "notebooks"
DOCS = 2


@pytest.fixture(scope="module")
def notebook_setup(spark, vllm_server, tmp_path_factory, monkeypatch_module):
    """A catalog schema, a config file (conf/local.yaml with the LLM stages served), an input of DOCS
    documents, and the widget values a user would enter."""
    root = tmp_path_factory.mktemp("notebooks")
    schema = f"spark_catalog.bf_nb_{uuid.uuid4().hex[:8]}"
    spark.sql(f"CREATE SCHEMA {schema} LOCATION '{root / 'warehouse'}'")
    conf = yaml.safe_load(LOCAL_CONF.read_text())
    conf["workdir"] = str(root / "work")
    conf["tables"] = {"staging_format": "delta"}  # a catalog's staging is Delta
    conf["chunk"]["max_passages_per_doc"] = 1
    conf["tracking"]["enabled"] = False
    conf["llm"]["engine"] = "openai"
    conf["llm"]["openai"] = {
        "base_url": vllm_server.url, "served_model": "smollm2", "api_key_env": "BACKFORTH_NOTEBOOK_KEY",
    }  # fmt: skip
    config = root / "notebook.yaml"
    config.write_text(yaml.safe_dump(conf))
    monkeypatch_module.setenv("BACKFORTH_NOTEBOOK_KEY", API_KEY)
    inputs = root / "in"
    inputs.mkdir()
    first = sorted(DOLMA_SAMPLE.glob("*.jsonl"))[0].read_text().splitlines()[:DOCS]
    (inputs / "part-0.jsonl").write_text("\n".join(first) + "\n")
    widgets = {
        "config": str(config), "catalog_schema": schema, "input": str(inputs), "model": vllm_server.model,
    }  # fmt: skip
    return widgets, schema


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def quickstart(spark, notebook_setup):
    widgets, _ = notebook_setup
    return run_notebook(NOTEBOOKS / "quickstart.py", spark, widgets)


def test_every_notebook_is_databricks_source_with_code_cells():
    found = sorted(NOTEBOOKS.glob("*.py"))
    assert [p.name for p in found] == ["explore_results.py", "quickstart.py", "run_stage.py"]
    assert all(len(cells(p)) >= 2 for p in found)


def test_quickstart_runs_the_pipeline_on_catalog_tables_and_shows_the_export(
    spark, quickstart, notebook_setup
):
    _, schema = notebook_setup
    summary = quickstart.namespace["summary"]
    assert summary["error"] is None
    assert summary["stages"]["ingest"]["rows_out"] == DOCS
    assert summary["stages"]["backtranslate"]["generated"] == summary["stages"]["chunk"]["rows_out"] > 0
    assert spark.catalog.tableExists(f"{schema}.passages") and spark.catalog.tableExists(
        f"{schema}.responses"
    )
    pairs = summary["export"]["pairs"]
    # its last cell shows the exported pairs (or says there are none)
    shown = quickstart.displayed[-1] if pairs else []
    assert len(shown) == pairs
    assert all(json.loads(json.dumps(row.asDict(recursive=True)))["messages"] for row in shown)


def test_run_stage_runs_the_chosen_stage_and_shows_its_table(spark, quickstart, notebook_setup):
    widgets, _ = notebook_setup
    run = run_notebook(NOTEBOOKS / "run_stage.py", spark, {**widgets, "stage": "ingest"})
    summary = run.namespace["summary"]
    assert list(summary["stages"]) == ["ingest"]
    assert summary["stages"]["ingest"]["rows_out"] == 0  # the documents are in already
    # each table the stage writes, the documents first
    assert len(run.displayed) == len(STAGES[0].writes) and len(run.displayed[0]) == DOCS


def test_run_stage_refuses_a_stage_that_is_not_among_its_choices(spark, notebook_setup):
    widgets, _ = notebook_setup
    with pytest.raises(ValueError, match="not one of"):
        run_notebook(NOTEBOOKS / "run_stage.py", spark, {**widgets, "stage": "no-such-stage"})


def test_explore_results_shows_scores_failures_and_pairs(spark, quickstart, notebook_setup):
    widgets, schema = notebook_setup
    run = run_notebook(NOTEBOOKS / "explore_results.py", spark, widgets)
    scores, failures, pairs = run.displayed
    n_scored = spark.table(f"{schema}.scores").count()
    assert sum(row["count"] for row in scores) == n_scored > 0
    assert len(failures) == sum(row["count"] for row in scores if row["status"] != "ok")
    ok_rewrites = spark.table(f"{schema}.responses").where("status = 'ok'").count()
    assert len(pairs) == ok_rewrites


def test_a_widget_no_cell_defined_is_an_error_as_on_databricks():
    widgets = Widgets({"config": "x"})
    with pytest.raises(WidgetNotDefined):
        widgets.get("config")


def test_the_config_each_notebook_names_by_default_is_a_file_of_the_repo():
    # relative to the notebook, as a Databricks Git folder runs it
    for path in sorted(NOTEBOOKS.glob("*.py")):
        defaults = [line for line in path.read_text().splitlines() if 'widgets.text("config"' in line]
        for line in defaults:
            relative = line.split(",")[1].strip().strip('"')
            assert (path.parent / relative).resolve().is_file(), (path.name, relative)
