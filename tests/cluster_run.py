"""The run on a Spark standalone cluster that tests/test_cluster.py reads (see its docstring): started
in the background with the test session (tests/conftest.py), so the other tests run beside it instead of
waiting minutes for it."""

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

from backforth_spark.standalone import standalone_cluster
from tests.background import Background

DOCS = 6


class ClusterRun:
    """The pipeline submitted to a fresh standalone cluster from a background thread; `result()` waits
    for it, `stop()` ends it early (kills the submitted driver; the cluster then stops)."""

    def __init__(
        self, root: Path, repo: Path, sample_dir: Path, conf: Path, spark_conf: dict[str, str]
    ) -> None:
        self._submitted: list[subprocess.Popen] = []
        self._killed: list[int] = []
        # Its tests come last, so it has until the end of the session; at a lower priority it takes the
        # cores the shared real run (whose follow-ups and readers wait for it) and the tests leave idle.
        self._run = Background(
            "cluster-run", _run_on_a_cluster, root, repo, sample_dir, conf, spark_conf, self._submitted,
            self._killed,
            nice=5,
        )  # fmt: skip

    def result(self, timeout: float = 1800) -> dict:
        return self._run.result(timeout)

    def stop(self) -> None:
        for proc in self._submitted:
            if proc.poll() is None:
                proc.kill()
        self._run.join(120)


def _run_on_a_cluster(
    root: Path, repo: Path, sample_dir: Path, conf: Path, spark_conf: dict[str, str], submitted: list,
    killed: list,
) -> dict:  # fmt: skip
    sys.path.insert(0, str(repo / "scripts"))
    from build_pyfiles import build

    pyfiles = build(root / "dist" / "backforth_spark.zip")
    workdir, cwd = root / "work", root / "cwd"  # not the repo: the code comes from the zip
    cwd.mkdir()
    # the first DOCS documents of the sample: the mechanics, not the volume
    sample = root / "in"
    sample.mkdir()
    lines = [x for f in sorted(sample_dir.glob("*.jsonl")) for x in f.read_text().splitlines() if x.strip()]
    (sample / "sample.jsonl").write_text("\n".join(lines[:DOCS]) + "\n")
    with standalone_cluster(root / "cluster", cores=2, memory="8g", gpus=2) as cluster:
        job = repo / "jobs" / "pipeline.py"
        full = _submit(
            job, conf, spark_conf, cluster, pyfiles, workdir, cwd, submitted, killed, "--input", str(sample)
        )
        state = cluster.state()
    return {"full": full, "apps": state["completedapps"] + state["activeapps"], "workdir": workdir}


def _submit(
    job: Path, conf: Path, spark_conf: dict[str, str], cluster, pyfiles: Path, workdir: Path, cwd: Path,
    submitted: list, killed: list, *extra: str,
) -> dict:  # fmt: skip
    spark_submit = Path(sys.executable).parent / "spark-submit"
    summary = cwd / f"{job.stem}.json"
    cmd = [
        str(spark_submit), "--master", cluster.master_url, "--py-files", str(pyfiles),
        "--packages", "io.delta:delta-spark_4.2_2.13:4.4.0",
        "--conf", "spark.sql.extensions=io.delta.sql.DeltaSparkSessionExtension",
        "--conf", "spark.sql.catalog.spark_catalog=org.apache.spark.sql.delta.catalog.DeltaCatalog",
        "--conf", "spark.executor.resource.gpu.amount=2",
        "--conf", f"spark.executor.resource.gpu.discoveryScript={cluster.gpu_discovery_script}",
        "--driver-memory", "1g", "--executor-memory", "6g",
        *[x for key, value in spark_conf.items() for x in ("--conf", f"{key}={value}")],
        str(job),
        "--config", str(conf), "--workdir", str(workdir), "--summary-json", str(summary),
        "--set", "chunk.max_passages_per_doc=1", "--set", "chunk.max_tokens=128",
        "--set", "llm.gpus_per_task=1", "--set", "llm.cpus_per_task=1", "--set", "llm.num_partitions=2",
        "--set", "llm.cpu_threads=1", "--set", "llm.cpu_kvcache_gib=0.25",  # 128-token passages, 2 engines
        "--set", "tracking.enabled=false", *extra,
        # the mechanics, not the quality: short passages and outputs (the shared real run has full ones)
        "--set", "llm.rewrite.sampling.max_tokens=160", "--set", "llm.backtranslate.sampling.max_tokens=64",
    ]  # fmt: skip
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}
    with subprocess.Popen(
        cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    ) as run:
        submitted.append(run)
        killer = threading.Thread(
            target=_kill_a_worker_during_backtranslate,
            args=(workdir, run, cluster.worker_pid, killed),
            daemon=True,
        )
        killer.start()
        stdout, stderr = run.communicate(timeout=1500)
        killer.join(timeout=5)
    assert run.returncode == 0, f"{job.stem}: {stderr[-4000:]}"
    logs = stderr + "".join(p.read_text() for p in (workdir / "logs").glob("*.log"))
    return {"stdout": stdout, "logs": logs, "killed": killed[:], **json.loads(summary.read_text())}


def _engine_workers(under: int) -> dict[int, int]:
    """pid -> resident KiB of each forked PySpark worker (a pyspark.daemon process whose parent is one)
    that descends from process `under`, the cluster's worker, and has torch loaded: it is running an LLM
    task (only the engine imports torch). Idle workers kept for reuse hold no task, so killing one fails
    nothing; other Spark applications on this machine (the shared real run, which runs beside this test)
    are not this test's to kill."""
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

    def has_torch(pid: int) -> bool:
        try:
            return b"libtorch" in Path(f"/proc/{pid}/maps").read_bytes()
        except OSError:
            return False

    return {
        pid: rss
        for pid, rss in daemons.items()
        if parents.get(pid) in daemons and descends(pid) and has_torch(pid)
    }


def _kill_a_worker_during_backtranslate(
    workdir: Path, run: subprocess.Popen, cluster_worker: int, killed: list
) -> None:
    """Once the backtranslate stage has frozen its inputs and one of its tasks is loading the engine,
    SIGKILL the busiest such Python worker: the task it runs fails and Spark retries it elsewhere."""
    staging = workdir / "tables" / "_staging"
    while run.poll() is None:
        if any(staging.glob("*/backtranslate_todo")):
            workers = _engine_workers(under=cluster_worker)
            if workers:
                pid = max(workers, key=workers.get)
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
        time.sleep(0.2)
