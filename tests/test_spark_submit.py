"""Every spark-submit entry point in jobs/, run with `spark-submit --master spark://...` against a real
standalone cluster started here (scripts/standalone_cluster.py's code), the project shipped as a zip
with --py-files, and the real vLLM CPU engine in the executors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pyspark.sql import functions as F

from backforth_spark import tables as t
from backforth_spark.standalone import standalone_cluster
from tests.conftest import DOLMA_SAMPLE, LOCAL_CONF, REPO

STAGE_JOBS = ["ingest", "dedup", "chunk", "backtranslate", "score", "rewrite", "ground", "distill", "export"]


def _submit(job: str, cluster, pyfiles: Path, workdir: Path, cwd: Path, *extra: str) -> dict:
    spark_submit = Path(sys.executable).parent / "spark-submit"
    summary = cwd / f"{job}.json"
    cmd = [
        str(spark_submit), "--master", cluster.master_url, "--py-files", str(pyfiles),
        "--packages", "io.delta:delta-spark_4.2_2.13:4.4.0",
        "--conf", "spark.sql.extensions=io.delta.sql.DeltaSparkSessionExtension",
        "--conf", "spark.sql.catalog.spark_catalog=org.apache.spark.sql.delta.catalog.DeltaCatalog",
        "--driver-memory", "1g", "--executor-memory", "6g",
        str(REPO / "jobs" / f"{job}.py"),
        "--config", str(LOCAL_CONF), "--workdir", str(workdir), "--summary-json", str(summary),
        "--set", "chunk.max_passages_per_doc=1",
        "--set", "llm.gpus_per_task=0", "--set", "llm.cpus_per_task=2",  # CPU executors: one engine, 2 cores
        "--set", "curate.grounding=true", "--set", "curate.distillation_baseline=true",
        "--set", "curate.min_grounding=1", "--set", "tracking.enabled=false", *extra,
    ]  # fmt: skip
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}
    run = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=1200)
    assert run.returncode == 0, f"{job}: {run.stderr[-4000:]}"
    return {"stdout": run.stdout, **json.loads(summary.read_text())}


@pytest.mark.e2e
def test_every_job_runs_with_spark_submit_on_a_standalone_cluster(tmp_path, spark):
    sys.path.insert(0, str(REPO / "scripts"))
    from build_pyfiles import build

    pyfiles = build(tmp_path / "dist" / "backforth_spark.zip")
    workdir, cwd = tmp_path / "work", tmp_path / "cwd"  # not the repo: the code comes from the zip
    cwd.mkdir()
    with standalone_cluster(tmp_path / "cluster", cores=2, memory="8g") as cluster:
        summaries = {}
        for job in STAGE_JOBS:
            extra = ["--input", str(DOLMA_SAMPLE)] if job == "ingest" else []
            summaries[job] = _submit(job, cluster, pyfiles, workdir, cwd, *extra)
            assert summaries[job]["error"] is None, summaries[job]["error"]
        # nothing new: a scheduled refresh and the whole-pipeline job do no LLM work and say so
        # (max_attempts=1: rows that failed are not retried, which would be LLM work)
        no_retry = ("--input", str(DOLMA_SAMPLE), "--set", "llm.max_attempts=1")
        refresh = _submit("refresh", cluster, pyfiles, workdir, cwd, *no_retry)
        again = _submit("pipeline", cluster, pyfiles, workdir, cwd, *no_retry)
        state = cluster.state()
        apps = state["completedapps"] + state["activeapps"]
    assert len(apps) == len(STAGE_JOBS) + 2  # every job went through the standalone master

    stages = {job: s["stages"][job] for job, s in summaries.items()}
    assert stages["ingest"]["rows_out"] == 10
    n_passages = stages["chunk"]["rows_out"]
    assert n_passages == 10  # one passage per document (max_passages_per_doc=1)
    assert stages["backtranslate"]["generated"] == n_passages
    assert stages["score"]["rows_in"] == stages["backtranslate"]["rows_out"] > 0
    for s in (refresh, again):
        assert "no LLM work: nothing new to generate" in s["stdout"]
        assert all(s["stages"][x]["generated"] == 0 for x in ("backtranslate", "score", "rewrite"))

    read = lambda name: spark.read.format("delta").load(str(workdir / "tables" / name))  # noqa: E731
    assert read(t.DOCUMENTS).count() == 10
    for name in (t.INSTRUCTIONS, t.SCORES, t.RESPONSES, t.GROUNDING, t.DISTILLATIONS):
        df = read(name)
        assert df.count() == df.select("passage_id", "fingerprint").distinct().count() > 0
        assert df.where(F.col("model").endswith("SmolLM2-135M-Instruct")).count() == df.count()
    export_dir = Path(stages["export"]["path"])
    n = sum(1 for f in export_dir.glob("data/*.jsonl") for _ in f.open())
    assert n == stages["export"]["rows_out"] and (export_dir / "README.md").exists()
