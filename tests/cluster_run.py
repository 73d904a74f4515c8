"""The run on a Spark standalone cluster that tests/app/test_cluster.py reads (see its docstring): started
in the background with the test session (tests/conftest.py), so the other tests run beside it instead of
waiting minutes for it."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from backforth_spark.app.standalone import standalone_cluster
from backforth_spark.core.config import load_config
from backforth_spark.core.generation import BACKTRANSLATE
from tests.background import Background
from tests.object_store import BUCKET, ObjectStore

# the suite's option for its short-lived JVMs (tests/conftest.py sets it for every spark-submit)
SHORT_LIVED_JVM = "-XX:TieredStopAtLevel=1"
# the executors' options of the config the run submits (conf/local.yaml)
_EXECUTOR_OPTIONS = load_config(Path(__file__).resolve().parents[1] / "conf" / "local.yaml").spark.conf.get(
    "spark.executor.extraJavaOptions", ""
)

# Tables of a few rows on a cluster of one 2-core worker: Delta rebuilds each new table version's state
# in 50 partitions by default (50 tasks per version read), and each shuffle writes 200 partitions;
# settings of the test bed, as a cluster config sizes them for its tables (the product leaves both to
# the cluster: conf/cluster.yaml)
SMALL_TABLES = {"spark.databricks.delta.snapshotPartitions": "2", "spark.sql.shuffle.partitions": "4"}

DOCS = 6
# the documents of the file that lands before the refresh: one commit slice each, so that a kill can
# land between two of them
NEW_DOCS = 3
WORKDIR_KEY = "work"
WORKDIR = f"s3a://{BUCKET}/{WORKDIR_KEY}"  # every table, staging folder and export of the run


class ClusterRun:
    """The pipeline submitted to a fresh standalone cluster from a background thread; `result()` waits
    for it, `stop()` ends it early (kills the submitted driver; the cluster then stops)."""

    def __init__(
        self,
        root: Path,
        repo: Path,
        sample_dir: Path,
        conf: Path,
        spark_conf: dict[str, str],
        served: tuple[str, ...] = (),
        served_in_refresh: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self._submitted: list[subprocess.Popen] = []
        self._stores: list[ObjectStore] = []  # up until stop(): the tests read the run's files there
        # Its tests come last, so it has until the end of the session; at a lower priority it takes the
        # cores the shared real run (whose follow-ups and readers wait for it) and the tests leave idle.
        self._run = Background(
            "cluster-run", _run_on_a_cluster, root, repo, sample_dir, conf, spark_conf, self._submitted,
            self._stores, served, served_in_refresh, env or {},
            nice=5,
        )  # fmt: skip

    def result(self, timeout: float = 1800) -> dict:
        return self._run.result(timeout)

    def stop(self) -> None:
        for proc in self._submitted:
            if proc.poll() is None:
                proc.kill()
        self._run.join(120)
        for store in self._stores:
            store.stop()


def _run_on_a_cluster(
    root: Path, repo: Path, sample_dir: Path, conf: Path, spark_conf: dict[str, str], submitted: list,
    stores: list, served: tuple[str, ...], served_in_refresh: tuple[str, ...], env: dict[str, str],
) -> dict:  # fmt: skip
    sys.path.insert(0, str(repo / "scripts"))
    from build_pyfiles import build

    pyfiles = build(root / "dist" / "backforth_spark.zip")
    cwd = root / "cwd"  # not the repo: the code comes from the zip
    cwd.mkdir()
    # the first DOCS documents of the sample: the mechanics, not the volume
    lines = [x for f in sorted(sample_dir.glob("*.jsonl")) for x in f.read_text().splitlines() if x.strip()]
    store = ObjectStore(root / "moto.log")
    stores.append(store)
    for name, part in (("part-0.jsonl", lines[:DOCS]), ("part-1.jsonl", lines[DOCS : DOCS + NEW_DOCS])):
        (root / name).write_text("\n".join(part) + "\n")
    store.upload(root / "part-0.jsonl", "in/part-0.jsonl")
    # the nodes know the store (endpoint and keys in their environment, as an instance profile or a
    # cluster's settings would give them); Spark only its path-style addressing and the jars
    spark_conf = {**spark_conf, **SMALL_TABLES, **store.spark_conf(repo / ".tools" / "s3a-jars")}
    with standalone_cluster(root / "cluster", cores=2, memory="8g", gpus=2, env=store.env) as cluster:
        driver_dir = root / "driver"  # the driver's own files: its logs and MLflow store
        settings = _settings(driver_dir, served)
        submit = _Submitter(
            repo, conf, spark_conf, cluster, pyfiles, cwd, driver_dir, settings, store, submitted, env
        )
        # The pipeline, two kills in its backtranslate stage (one commit slice per two passages): a Python
        # worker loading the engine (Spark retries its task), then, once the first slice is committed,
        # the driver (SIGKILL: spark-submit's JVM and the Python driver, no clean-up at all).
        killer = _kill_a_worker_then_the_driver(store, cluster, BACKTRANSLATE.table)
        slices = ("--set", "llm.commit_rows=2")
        killed = submit("pipeline", "killed", extra=slices, killer=killer)
        killed |= {"killed_worker": killer.worker, "killed_at_version": killer.killed_at}
        # A file lands; a refresh reads it and finishes what the killed run left: every stage to export
        # (backtranslate too on the server: the same model, so the same fingerprints and rows owed,
        # and no engine to load in the executors again)
        store.upload(root / "part-1.jsonl", "in/part-1.jsonl")
        refresh = submit(
            "refresh", "refresh", extra=tuple(x for s in served_in_refresh for x in ("--set", s))
        )
        status = _status(repo, conf, spark_conf, cwd, settings, store)
        state = cluster.state()
    return {
        "killed": killed, "refresh": refresh, "status": status,
        "apps": state["completedapps"] + state["activeapps"], "root": root, "store": store,
    }  # fmt: skip


class _Submitter:
    """spark-submit of a jobs/ wrapper to the cluster, its workdir and inputs on the store."""

    def __init__(
        self, repo, conf, spark_conf, cluster, pyfiles, cwd, driver_dir, settings, store, submitted, env
    ) -> None:
        self.repo, self.conf, self.spark_conf, self.cluster = repo, conf, spark_conf, cluster
        self.pyfiles, self.cwd, self.driver_dir, self.settings = pyfiles, cwd, driver_dir, settings
        self.store, self.submitted, self.env = store, submitted, env

    def __call__(self, job: str, name: str, extra: tuple[str, ...] = (), killer=None) -> dict:
        """Submit `job` and wait for it; `killer(process)` watches it from a thread. A run that ends
        well returns its summary; one that `killer` killed, its return code and output."""
        spark_submit = Path(sys.executable).parent / "spark-submit"
        summary = self.cwd / f"{name}.json"
        cmd = [
            str(spark_submit), "--master", self.cluster.master_url, "--py-files", str(self.pyfiles),
            "--packages", "io.delta:delta-spark_4.2_2.13:4.4.0",
            "--conf", "spark.sql.extensions=io.delta.sql.DeltaSparkSessionExtension",
            "--conf", "spark.sql.catalog.spark_catalog=org.apache.spark.sql.delta.catalog.DeltaCatalog",
            "--conf", "spark.executor.resource.gpu.amount=2",
            "--conf", f"spark.executor.resource.gpu.discoveryScript={self.cluster.gpu_discovery_script}",
            "--driver-memory", "1g", "--executor-memory", "6g",
            *[x for key, value in self.spark_conf.items() for x in ("--conf", f"{key}={value}")],
            str(self.repo / "jobs" / f"{job}.py"),
            "--config", str(self.conf), "--workdir", WORKDIR, "--summary-json", str(summary),
            "--input", f"s3a://{BUCKET}/in/", *self.settings, *extra,
        ]  # fmt: skip
        env = {**os.environ, **self.store.env, **self.env, "PYSPARK_PYTHON": sys.executable}
        env["PYSPARK_DRIVER_PYTHON"] = sys.executable
        # its own process group: a kill of the driver takes spark-submit's JVM and the Python driver
        with subprocess.Popen(
            cmd, cwd=self.cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
            start_new_session=True,
        ) as run:  # fmt: skip
            self.submitted.append(run)
            watcher = None
            if killer is not None:
                watcher = threading.Thread(target=killer, args=(run,), daemon=True)
                watcher.start()
            stdout, stderr = run.communicate(timeout=1500)
            if watcher is not None:
                watcher.join(timeout=5)
        logs = stderr + "".join(p.read_text() for p in (self.driver_dir / "logs").glob("*.log"))
        result = {"returncode": run.returncode, "stdout": stdout, "stderr": stderr, "logs": logs}
        if run.returncode == -signal.SIGKILL and getattr(killer, "killed_at", None) is not None:
            return result  # the driver was killed on purpose: no summary
        assert run.returncode == 0, f"{name}: {stderr[-4000:]}"
        return {**result, **json.loads(summary.read_text())}


def _settings(driver_dir: Path, served: tuple[str, ...]) -> list[str]:
    """The run's settings (`served`: the stages sent to an OpenAI-compatible server)."""
    settings = [
        # the tables and staging on the store: Delta's commits, not Parquet's renames
        "tables.staging_format=delta", f"driver_dir={driver_dir}",
        # the mechanics, not the quality: short passages and outputs (the shared real run has full ones)
        "chunk.max_passages_per_doc=1", "chunk.max_tokens=128",
        "llm.gpus_per_task=1", "llm.cpus_per_task=1", "llm.num_partitions=2",
        "llm.cpu_threads=1", "llm.cpu_kvcache_gib=0.25",  # 128-token passages, 2 engines
        "llm.rewrite.sampling.max_tokens=160", "llm.backtranslate.sampling.max_tokens=64",
        # the stand-in's rewrites mostly describe the task (tests/conftest.py REAL_RUN_SETTINGS): the
        # export on the store is to hold pairs
        "curate.drop_task_talk=false",
        # the executors' JVMs as every short-lived JVM of the suite (tests/conftest.py SHORT_LIVED_JVM;
        # spark-submit gives the driver's its SPARK_SUBMIT_OPTS), beside the config's own options
        f"spark.conf.spark.executor.extraJavaOptions={_EXECUTOR_OPTIONS} {SHORT_LIVED_JVM}",
        *served,
    ]  # fmt: skip
    return [x for s in settings for x in ("--set", s)]


def _status(
    repo: Path, conf: Path, spark_conf: dict[str, str], cwd: Path, settings: list[str], store
) -> dict:
    """`backforth status --json` from the driver's machine, on the store's tables (a local session with
    the connector's jars on its class path)."""
    classpath = spark_conf["spark.driver.extraClassPath"]
    cmd = [
        sys.executable, "-m", "backforth_spark.app.cli", "status", "--json", "--config", str(conf),
        "--workdir", WORKDIR, *settings,  # the run's settings: its stages' fingerprints
        "--set", f"spark.conf.spark.driver.extraClassPath={classpath}",
        "--set", "spark.conf.spark.hadoop.fs.s3a.path.style.access=true",
        "--set", "spark.class_archive=null",  # the archive's class path is pyspark's and Delta's only
        # the code generation settings the run had
        *[x for key, value in spark_conf.items() if key.startswith("spark.sql.codegen")
          for x in ("--set", f"spark.conf.{key}={value}")],
        "--set", f"spark.delta_jars={repo / '.tools' / 'delta-jars'}",  # not the cwd's
    ]  # fmt: skip
    env = {**os.environ, **store.env, "PYTHONPATH": str(repo)}
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"report": json.loads(proc.stdout[proc.stdout.index("{") :]), "stderr": proc.stderr}


def _engine_workers(under: int) -> dict[int, int]:
    """pid -> resident KiB of each forked PySpark worker (a pyspark.daemon process whose parent is one)
    that descends from process `under`, the cluster's worker, and started an engine host
    (udfs/engine_host.py) that is still its child: it is running an LLM task, waiting for that host to
    load. Idle workers kept for reuse hold no task, so killing one fails nothing; other Spark
    applications on this machine (the shared real run, which runs beside this test) are not this
    test's to kill."""
    parents, daemons, hosts = {}, {}, set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            parents[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (d / "cmdline").read_bytes()
            if b"pyspark.daemon" in cmdline:
                rss = re.search(r"VmRSS:\s+(\d+)", (d / "status").read_text())
                daemons[int(d.name)] = int(rss.group(1)) if rss else 0
            elif b"udfs.engine_host" in cmdline:
                hosts.add(int(d.name))
        except OSError:
            continue

    def descends(pid: int) -> bool:
        while pid > 1:
            pid = parents.get(pid, 0)
            if pid == under:
                return True
        return False

    starters = {parents.get(host) for host in hosts}
    return {
        pid: rss
        for pid, rss in daemons.items()
        if parents.get(pid) in daemons and descends(pid) and pid in starters
    }


def _staged(store, table: str) -> bool:
    """Whether a run's staging on the store holds `table` (a stage froze its inputs there)."""
    return any(f"/{table}/" in key for key in store.list_keys(f"{WORKDIR_KEY}/tables/_staging/"))


def _versions(store, table: str) -> list[int]:
    """The committed Delta versions of a table of the run on the store."""
    keys = store.list_keys(f"{WORKDIR_KEY}/tables/{table}/_delta_log/")
    names = (key.rsplit("/", 1)[1] for key in keys)
    return sorted(int(n.removesuffix(".json")) for n in names if n.endswith(".json") and n[:-5].isdigit())


class _kill_a_worker_then_the_driver:  # noqa: N801 (a callable, named for what it does)
    """Once the backtranslate stage has frozen its inputs and one of its tasks waits for the engine host
    it started to load, SIGKILL that Python worker (the task fails, Spark retries it; the host keeps
    loading for the retry); then, once `table` has
    its first commit, SIGKILL the submitted driver's process group (spark-submit's JVM and the Python
    driver; the master then ends its executors). `worker`: the pid killed; `killed_at`: the table's
    last version at the driver's kill."""

    def __init__(self, store, cluster, table: str) -> None:
        self.store, self.cluster, self.table = store, cluster, table
        self.worker: int | None = None
        self.killed_at: int | None = None

    def __call__(self, run: subprocess.Popen) -> None:
        while run.poll() is None and self.worker is None:
            if _staged(self.store, "backtranslate_todo"):
                workers = _engine_workers(under=self.cluster.worker_pid)
                if workers:
                    self.worker = max(workers, key=workers.get)
                    os.kill(self.worker, signal.SIGKILL)
            time.sleep(0.5)
        while run.poll() is None:
            if _versions(self.store, self.table):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(run.pid, signal.SIGKILL)
                self.killed_at = _versions(self.store, self.table)[-1]
                return
            time.sleep(0.2)
