"""One real Spark standalone cluster (master and worker started here, the worker offering two `gpu`
addresses through a discovery script): the whole pipeline submitted with `spark-submit --py-files` from a
folder outside the repo, the real vLLM CPU engine in the executors, each LLM task pinned to its own GPU
address. A Python worker is killed in the middle of the backtranslate stage: Spark retries its task
and the run finishes with one row per key. (A refresh with nothing new: tests/test_cli.py; every jobs/
wrapper: test_cli.py too.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from pyspark.sql import functions as F

from backforth_spark.generation import LLM_TASKS
from backforth_spark.stages import STAGES
from tests.cluster_run import DOCS

pytestmark = pytest.mark.e2e

# `cluster_run` (tests/conftest.py): the run, started in the background with the session


def test_the_job_went_through_the_standalone_master(cluster_run):
    assert len(cluster_run["apps"]) == 1
    assert cluster_run["full"]["error"] is None


def test_a_python_worker_killed_during_an_llm_stage_costs_a_task_retry_not_the_run(cluster_run):
    # the kill landed in backtranslate; Spark re-ran that task and the stage owes nothing
    assert len(cluster_run["full"]["killed"]) == 1
    assert "Python worker exited unexpectedly" in cluster_run["full"]["logs"]  # the task it ran failed
    back = cluster_run["full"]["stages"]["backtranslate"]
    assert back["generated"] == DOCS and back["rows_out"] + back.get("status_parse_error", 0) <= DOCS


def test_every_stage_ran_in_the_submitted_pipeline(cluster_run):
    stages = cluster_run["full"]["stages"]
    assert list(stages) == [st.name for st in STAGES if st.enabled_by is None]
    assert stages["ingest"]["rows_out"] == DOCS
    assert stages["chunk"]["rows_out"] == DOCS  # one passage per document
    assert stages["backtranslate"]["generated"] == DOCS
    assert stages["score"]["rows_in"] == stages["backtranslate"]["rows_out"] > 0


def test_each_llm_stage_reports_its_accelerator_seconds(cluster_run):
    for name in ("backtranslate", "score", "rewrite"):
        counts = cluster_run["full"]["stages"][name]
        # one GPU per task: accelerator-seconds are the tasks' own seconds
        assert counts["accelerator_s"] == counts["engine_task_s"] > 0, name
        assert counts["tokens_per_accelerator_s"] == round(counts["tokens_out"] / counts["accelerator_s"], 1)


def test_llm_tasks_each_saw_their_own_gpu(cluster_run, spark):
    rows = spark.read.format("delta").load(str(cluster_run["workdir"] / "tables" / LLM_TASKS[0].table))
    devices = {r["device"]: r["count"] for r in rows.groupBy("device").count().collect()}
    # two tasks ran at once, each pinned (CUDA_VISIBLE_DEVICES) to the address Spark gave it
    assert set(devices) == {"0", "1"}, devices


def test_the_llm_tables_hold_one_row_per_key_from_the_real_model(cluster_run, spark):
    for task in LLM_TASKS[:3]:  # grounding and the baseline are off here (the shared real run has them)
        df = spark.read.format("delta").load(str(cluster_run["workdir"] / "tables" / task.table))
        assert df.count() == df.select("passage_id", "fingerprint").distinct().count() > 0, task.name
        assert df.where(F.col("model").endswith("SmolLM2-135M-Instruct")).count() == df.count()


def test_the_export_is_whole(cluster_run):
    export_dir = Path(cluster_run["full"]["export"]["path"])
    n = sum(1 for f in export_dir.glob("data/*.jsonl") for _ in f.open())
    assert n == cluster_run["full"]["export"]["pairs"] > 0 and (export_dir / "README.md").exists()
