"""GPU pinning on a real Spark standalone cluster (master and worker started here). The worker offers two
`gpu` addresses through a discovery script, so Spark's stage-level scheduling runs without a GPU; the
LLM stage asks for one GPU per task and the real vLLM CPU engine generates."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from pyspark.sql import functions as F

from backforth_spark import tables as t
from backforth_spark.standalone import standalone_cluster
from tests.conftest import DOLMA_SAMPLE, LOCAL_CONF, REPO


@pytest.mark.e2e
def test_llm_tasks_each_see_their_own_gpu_on_a_standalone_cluster(tmp_path, spark):
    workdir = tmp_path / "work"
    with standalone_cluster(tmp_path / "cluster", cores=2, memory="8g", gpus=2) as cluster:
        cmd = [
            sys.executable, "-m", "backforth_spark.cli", "run", "--config", str(LOCAL_CONF),
            "--input", str(DOLMA_SAMPLE), "--workdir", str(workdir),
            "--stages", "ingest,dedup,chunk,backtranslate", "--summary-json", str(tmp_path / "summary.json"),
            "--set", f"spark.master={cluster.master_url}",
            "--set", "spark.conf.spark.driver.memory=1g",
            "--set", "spark.conf.spark.executor.memory=6g",
            "--set", "spark.conf.spark.executor.resource.gpu.amount=2",
            "--set", f"spark.conf.spark.executor.resource.gpu.discoveryScript={cluster.gpu_discovery_script}",
            "--set", "llm.gpus_per_task=1", "--set", "llm.cpus_per_task=1", "--set", "llm.num_partitions=2",
            "--set", "chunk.max_passages_per_doc=1", "--set", "tracking.enabled=false",
        ]  # fmt: skip
        run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=os.environ, timeout=1200)
        assert run.returncode == 0, run.stderr[-4000:]
        apps = cluster.state()["completedapps"] + cluster.state()["activeapps"]
        assert apps, "the run did not go through the standalone master"

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["error"] is None
    bt = summary["stages"]["backtranslate"]
    assert bt["generated"] == summary["stages"]["chunk"]["rows_out"] > 2
    rows = spark.read.format("delta").load(str(workdir / "tables" / t.INSTRUCTIONS))
    devices = {r["device"]: r["count"] for r in rows.groupBy("device").count().collect()}
    # two tasks ran at once, each pinned (CUDA_VISIBLE_DEVICES) to the address Spark gave it
    assert set(devices) == {"0", "1"}, devices
    assert rows.where(F.col("status") == "ok").count() > 0
