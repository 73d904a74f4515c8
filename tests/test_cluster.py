"""One real Spark standalone cluster (master and worker started here, the worker offering two `gpu`
addresses through a discovery script): the whole pipeline submitted with `spark-submit --py-files` from a
folder outside the repo, the real vLLM CPU engine in the executors, each LLM task pinned to its own GPU
address. A Python worker is killed in the middle of the backtranslate stage: Spark retries its task
and the run finishes with one row per key. (A refresh with nothing new: tests/test_cli.py; every jobs/
wrapper: test_cli.py too.)"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from pyspark.sql import functions as F

from backforth_spark.generation import LLM_TASKS
from backforth_spark.stages import STAGES
from backforth_spark.standalone import standalone_cluster
from tests.conftest import DOLMA_SAMPLE, LOCAL_CONF, REPO

pytestmark = pytest.mark.e2e

DOCS = 6


def _submit(job: str, cluster, pyfiles: Path, workdir: Path, cwd: Path, *extra: str) -> dict:
    spark_submit = Path(sys.executable).parent / "spark-submit"
    summary = cwd / f"{job}.json"
    cmd = [
        str(spark_submit), "--master", cluster.master_url, "--py-files", str(pyfiles),
        "--packages", "io.delta:delta-spark_4.2_2.13:4.4.0",
        "--conf", "spark.sql.extensions=io.delta.sql.DeltaSparkSessionExtension",
        "--conf", "spark.sql.catalog.spark_catalog=org.apache.spark.sql.delta.catalog.DeltaCatalog",
        "--conf", "spark.executor.resource.gpu.amount=2",
        "--conf", f"spark.executor.resource.gpu.discoveryScript={cluster.gpu_discovery_script}",
        "--driver-memory", "1g", "--executor-memory", "6g",
        str(REPO / "jobs" / f"{job}.py"),
        "--config", str(LOCAL_CONF), "--workdir", str(workdir), "--summary-json", str(summary),
        "--set", "chunk.max_passages_per_doc=1",
        "--set", "llm.gpus_per_task=1", "--set", "llm.cpus_per_task=1", "--set", "llm.num_partitions=2",
        "--set", "llm.cpu_threads=1",
        "--set", "tracking.enabled=false", *extra,
        # the mechanics, not the quality: short outputs (the shared real run has the full ones)
        "--set", "llm.rewrite.sampling.max_tokens=160", "--set", "llm.backtranslate.sampling.max_tokens=64",
    ]  # fmt: skip
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}
    with subprocess.Popen(
        cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    ) as run:
        killer = threading.Thread(
            target=_kill_a_worker_during_backtranslate, args=(workdir, run, cluster.worker_pid), daemon=True
        )
        killer.start()
        stdout, stderr = run.communicate(timeout=1500)
        killer.join(timeout=5)
    assert run.returncode == 0, f"{job}: {stderr[-4000:]}"
    logs = stderr + "".join(p.read_text() for p in (workdir / "logs").glob("*.log"))
    return {"stdout": stdout, "logs": logs, "killed": KILLED[:], **json.loads(summary.read_text())}


KILLED: list[int] = []


def _python_workers(under: int) -> dict[int, int]:
    """pid -> resident KiB of each forked PySpark worker (a pyspark.daemon process whose parent is one)
    that descends from process `under`, the cluster's worker: other Spark applications on this machine
    (the shared real run, which runs beside this test) are not this test's to kill."""
    parents, daemons = {}, {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            parents[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if b"pyspark.daemon" in (d / "cmdline").read_bytes():
                rss = re.search(r"VmRSS:\s+(\d+)", (d / "status").read_text())
                daemons[int(d.name)] = int(rss.group(1)) if rss else 0
        except OSError:
            continue

    def descends(pid: int) -> bool:
        while pid > 1:
            pid = parents.get(pid, 0)
            if pid == under:
                return True
        return False

    return {pid: rss for pid, rss in daemons.items() if parents.get(pid) in daemons and descends(pid)}


def _kill_a_worker_during_backtranslate(workdir: Path, run: subprocess.Popen, cluster_worker: int) -> None:
    """Once the backtranslate stage has frozen its inputs, SIGKILL the cluster's busiest Python worker: the
    task it ran fails and Spark retries it elsewhere."""
    staging = workdir / "tables" / "_staging"
    while run.poll() is None:
        if any(staging.glob("*/backtranslate_todo")):
            time.sleep(3)  # its tasks are loading the engine or generating by now
            workers = _python_workers(under=cluster_worker)
            if workers:
                pid = max(workers, key=workers.get)
                os.kill(pid, signal.SIGKILL)
                KILLED.append(pid)
                return
        time.sleep(0.2)


@pytest.fixture(scope="module")
def submitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    sys.path.insert(0, str(REPO / "scripts"))
    from build_pyfiles import build

    pyfiles = build(root / "dist" / "backforth_spark.zip")
    workdir, cwd = root / "work", root / "cwd"  # not the repo: the code comes from the zip
    cwd.mkdir()
    # the first DOCS documents of the sample: the mechanics, not the volume
    sample = root / "in"
    sample.mkdir()
    lines = [x for f in sorted(DOLMA_SAMPLE.glob("*.jsonl")) for x in f.read_text().splitlines() if x.strip()]
    (sample / "sample.jsonl").write_text("\n".join(lines[:DOCS]) + "\n")
    with standalone_cluster(root / "cluster", cores=2, memory="8g", gpus=2) as cluster:
        full = _submit("pipeline", cluster, pyfiles, workdir, cwd, "--input", str(sample))
        state = cluster.state()
    return {"full": full, "apps": state["completedapps"] + state["activeapps"], "workdir": workdir}


def test_the_job_went_through_the_standalone_master(submitted):
    assert len(submitted["apps"]) == 1
    assert submitted["full"]["error"] is None


def test_a_python_worker_killed_during_an_llm_stage_costs_a_task_retry_not_the_run(submitted):
    # the kill landed in backtranslate; Spark re-ran that task and the stage owes nothing
    assert len(submitted["full"]["killed"]) == 1
    assert "Python worker exited unexpectedly" in submitted["full"]["logs"]  # the task it ran failed
    back = submitted["full"]["stages"]["backtranslate"]
    assert back["generated"] == DOCS and back["rows_out"] + back.get("status_parse_error", 0) <= DOCS


def test_every_stage_ran_in_the_submitted_pipeline(submitted):
    stages = submitted["full"]["stages"]
    assert list(stages) == [st.name for st in STAGES if st.enabled_by is None]
    assert stages["ingest"]["rows_out"] == DOCS
    assert stages["chunk"]["rows_out"] == DOCS  # one passage per document
    assert stages["backtranslate"]["generated"] == DOCS
    assert stages["score"]["rows_in"] == stages["backtranslate"]["rows_out"] > 0


def test_each_llm_stage_reports_its_accelerator_seconds(submitted):
    for name in ("backtranslate", "score", "rewrite"):
        counts = submitted["full"]["stages"][name]
        # one GPU per task: accelerator-seconds are the tasks' own seconds
        assert counts["accelerator_s"] == counts["engine_task_s"] > 0, name
        assert counts["tokens_per_accelerator_s"] == round(counts["tokens_out"] / counts["accelerator_s"], 1)


def test_llm_tasks_each_saw_their_own_gpu(submitted, spark):
    rows = spark.read.format("delta").load(str(submitted["workdir"] / "tables" / LLM_TASKS[0].table))
    devices = {r["device"]: r["count"] for r in rows.groupBy("device").count().collect()}
    # two tasks ran at once, each pinned (CUDA_VISIBLE_DEVICES) to the address Spark gave it
    assert set(devices) == {"0", "1"}, devices


def test_the_llm_tables_hold_one_row_per_key_from_the_real_model(submitted, spark):
    for task in LLM_TASKS[:3]:  # grounding and the baseline are off here (the shared real run has them)
        df = spark.read.format("delta").load(str(submitted["workdir"] / "tables" / task.table))
        assert df.count() == df.select("passage_id", "fingerprint").distinct().count() > 0, task.name
        assert df.where(F.col("model").endswith("SmolLM2-135M-Instruct")).count() == df.count()


def test_the_export_is_whole(submitted):
    export_dir = Path(submitted["full"]["export"]["path"])
    n = sum(1 for f in export_dir.glob("data/*.jsonl") for _ in f.open())
    assert n == submitted["full"]["export"]["pairs"] > 0 and (export_dir / "README.md").exists()
