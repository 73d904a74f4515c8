"""One real Spark standalone cluster with no disk shared with its driver's work: the workdir and the inputs
are on an S3-compatible store (moto's server, through Spark's s3a connector and Arrow's S3 filesystem),
the worker offers two `gpu` addresses through a discovery script. On it, submitted with
`spark-submit --py-files` from a folder outside the repo, the real vLLM CPU engine in the executor's
engine hosts (one per GPU address) for backtranslate and the suite's `vllm serve` for score and rewrite
(its key from the driver's environment): the whole pipeline, with a Python worker killed in backtranslate
(Spark retries its task) and then the driver and its JVM SIGKILLed between two of the stage's commits;
then a new file lands and a refresh reads it and finishes what the killed run left, to the export; then
`backforth status` on the store's tables. (A refresh with nothing new: tests/app/test_cli.py; every
jobs/ wrapper: tests/app/test_entry_points.py.)"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from pyspark.sql import functions as F

from backforth_spark.core.dataset import current_files
from backforth_spark.core.generation import BACKTRANSLATE, LLM_TASKS
from backforth_spark.spark.stages import STAGES
from tests.cluster_run import DOCS, NEW_DOCS, WORKDIR, WORKDIR_KEY
from tests.conftest import API_KEY
from tests.object_store import ACCESS_KEY, BUCKET, SECRET_KEY

pytestmark = pytest.mark.e2e

# `cluster_run` (tests/conftest.py): the run, started in the background with the session


def _table(cluster_run, name: str, spark, into: Path, version: int | None = None):
    """A Delta table of the run (at `version`, else its last), read from a copy of its objects (the
    suite's own session has no s3a)."""
    store, prefix = cluster_run["store"], f"{WORKDIR_KEY}/tables/{name}/"
    for key in store.list_keys(prefix):
        if key.endswith("/"):  # a folder marker
            continue
        local = into / name / key.removeprefix(prefix)
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(store.read(key))
    reader = spark.read.format("delta")
    return (reader.option("versionAsOf", version) if version is not None else reader).load(str(into / name))


def test_the_jobs_went_through_the_standalone_master(cluster_run):
    # the killed pipeline and the refresh
    assert len(cluster_run["apps"]) == 2
    assert cluster_run["refresh"]["error"] is None


def test_a_python_worker_killed_during_an_llm_stage_costs_a_task_retry_not_the_run(cluster_run):
    # the kill landed in backtranslate; Spark re-ran that task and its slice committed
    killed = cluster_run["killed"]
    assert killed["killed_worker"] is not None
    assert "Python worker exited unexpectedly" in killed["logs"]  # the task it ran failed
    assert killed["killed_at_version"] is not None  # ... and its slice was committed after it


def test_a_run_killed_between_two_commits_then_a_refresh_pays_for_nothing_twice(cluster_run, spark, tmp_path):
    """The pipeline's driver SIGKILLed once backtranslate committed a slice (two passages a slice); the
    refresh that follows generates only the rest and the new file's passages, and every passage, old
    and new, then has one row."""
    killed, refresh = cluster_run["killed"], cluster_run["refresh"]
    assert killed["returncode"] == -9
    table = lambda v=None: _table(cluster_run, BACKTRANSLATE.table, spark, tmp_path, v)  # noqa: E731
    as_killed = table(killed["killed_at_version"])
    assert 0 < as_killed.count() < DOCS, "the kill should land between two commits"
    # (a row that failed to parse is sampled again at temperature > 0: not kept)
    kept = {r["passage_id"]: r["run_id"] for r in as_killed.where("status = 'ok'").collect()}
    back = refresh["stages"]["backtranslate"]
    # committed rows, not planned ones, and only what was missing
    assert back["owed"] == back["generated"] == DOCS - len(kept) + NEW_DOCS
    rows = table()
    after = {r["passage_id"]: r["run_id"] for r in rows.collect()}
    assert len(after) == rows.count() == DOCS + NEW_DOCS  # one row per passage, old and new
    assert all(after[k] == run for k, run in kept.items())  # what the killed run committed stands


def test_every_stage_ran_in_the_refresh_on_the_stores_new_file(cluster_run):
    stages = cluster_run["refresh"]["stages"]
    assert list(stages) == [st.name for st in STAGES if st.enabled_by is None]
    # the killed run had read the first file; the refresh reads the one that landed since, through
    # the Python workers' Arrow S3 filesystem
    assert stages["ingest"]["documents"] == stages["ingest"]["rows_out"] == NEW_DOCS
    assert stages["chunk"]["rows_out"] == NEW_DOCS  # one passage per document
    assert stages["score"]["rows_in"] == stages["backtranslate"]["rows_out"] > 0
    assert stages["score"]["generated"] == stages["score"]["owed"] > 0


def test_each_llm_stage_reports_its_accelerator_seconds(cluster_run):
    for name in ("backtranslate", "score", "rewrite"):
        counts = cluster_run["refresh"]["stages"][name]
        # one GPU per task: accelerator-seconds are the tasks' own seconds
        assert counts["accelerator_s"] == counts["engine_task_s"] > 0, name
        assert counts["tokens_per_accelerator_s"] == round(counts["tokens_out"] / counts["accelerator_s"], 1)


def test_llm_tasks_each_saw_their_own_gpu(cluster_run, spark, tmp_path):
    rows = _table(cluster_run, LLM_TASKS[0].table, spark, tmp_path)
    devices = {r["device"]: r["count"] for r in rows.groupBy("device").count().collect()}
    # two tasks ran at once, each on the engine host of the address Spark gave it
    assert set(devices) == {"0", "1"}, devices


def test_no_engine_host_outlives_its_executor(cluster_run):
    """The killed run's executor started engine hosts (udfs/engine_host.py) in sessions of their own;
    its end ended them."""
    orphans = []
    for d in Path("/proc").iterdir():
        try:
            args = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"udfs.engine_host" in args:
            owner = int(args[args.index(b"--owner") + 1])
            if not Path(f"/proc/{owner}").exists():
                orphans.append((d.name, owner))
    assert orphans == []


def test_the_llm_tables_hold_one_row_per_key_from_the_real_model(cluster_run, spark, tmp_path):
    for task in LLM_TASKS[:3]:  # grounding and the baseline are off here (the shared real run has them)
        df = _table(cluster_run, task.table, spark, tmp_path)
        assert df.count() == df.select("passage_id", "fingerprint").distinct().count() > 0, task.name
        assert df.where(F.col("model").endswith("SmolLM2-135M-Instruct")).count() == df.count()


# What a rerun would not draw again (conf/local.yaml: backtranslate samples at temperature 1, the other
# stages at 0, where a parse failure, a truncation, an empty or refused answer would come back the same)
FINAL = {"ok", "too_long"}
FINAL_AT_ZERO = FINAL | {"parse_error", "truncated", "empty", "refused"}


def test_status_reads_the_stores_tables_and_owes_only_what_a_rerun_may_change(cluster_run, spark, tmp_path):
    report = cluster_run["status"]["report"]
    assert report["workdir"] == WORKDIR and report["tables"]["documents"]["rows"] == DOCS + NEW_DOCS
    for task in LLM_TASKS[:3]:
        stage = report["llm_stages"][task.name]
        rows = _table(cluster_run, task.table, spark, tmp_path)
        rows = rows.where(F.col("fingerprint") == stage["fingerprint"])
        final = FINAL if task is BACKTRANSLATE else FINAL_AT_ZERO
        # every passage has its row; what is owed is a failure a new draw may fix (e.g. a leaked fence
        # marker: the retry draws another), with attempts left
        retry = rows.where(~F.col("status").isin(*final) & (F.col("attempts") < 3)).count()
        assert stage["pending"] == retry and stage["done"] > 0, (task.name, stage)


def test_the_export_on_the_store_loads_with_datasets_through_s3fs(cluster_run, monkeypatch):
    import datasets

    store = cluster_run["store"]
    for key, value in store.env.items():  # where a reader's AWS tools find the store
        monkeypatch.setenv(key, value)
    # datasets reads its offline switch once, at import: another test (test_export) may have imported it
    # offline. The store is not the Hub: reading from it is what this test is for.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    export = cluster_run["refresh"]["export"]  # the last run's export replaced the pipeline's
    assert export["path"] == f"{WORKDIR}/export/pairs"
    version, files = current_files(export["path"])  # Arrow's S3 filesystem, from the environment
    assert version == cluster_run["refresh"]["run_id"] and files
    options = {"key": ACCESS_KEY, "secret": SECRET_KEY, "client_kwargs": {"endpoint_url": store.endpoint}}
    data_files = [f.replace("s3a://", "s3://") for f in files]
    builder = "parquet" if data_files[0].endswith(".parquet") else "json"  # the card's format
    ds = datasets.load_dataset(builder, data_files=data_files, storage_options=options, split="train")
    assert len(ds) == export["pairs"] > 0
    assert {m["role"] for m in ds[0]["messages"]} >= {"user", "assistant"}


def test_nothing_of_the_workdir_lands_on_a_local_disk(cluster_run):
    root: Path = cluster_run["root"]
    # no table, staging folder, checkpoint or export file anywhere on this host: the driver's folder,
    # the executors' work folders, the cluster's logs (a workdir URI taken for a path would show here)
    local = [p for p in root.rglob("*") if p.suffix == ".parquet" or p.name in ("_delta_log", "README.md")]
    # but MLflow's copy of the card, an artifact of the run on the driver's disk
    assert [p for p in local if "mlartifacts" not in p.parts] == []
    assert not list(root.rglob("s3a:*"))
    on_store = cluster_run["store"].list_keys(f"{WORKDIR_KEY}/")
    assert any("/_delta_log/" in k for k in on_store) and any(k.endswith(".parquet") for k in on_store)
    # the driver's own files stay on its disk: logs and the MLflow store
    assert (root / "driver" / "logs").is_dir() and (root / "driver" / "mlflow.db").is_file()


def test_the_store_credentials_are_nowhere_the_runs_left(cluster_run, spark, tmp_path):
    """The store's keys and the API key: not on the console, in the logs, the summaries, any object on
    the store (tables' rows read as text, the export, the card), the driver's files, the executors'
    logs, or the MLflow runs."""
    secrets = (ACCESS_KEY, SECRET_KEY, API_KEY)  # the store's keys, the served stages' API key
    for name in ("killed", "refresh"):
        run = cluster_run[name]
        text = run["stdout"] + run["stderr"] + run["logs"] + json.dumps(run)
        assert not any(s in text for s in secrets), name
    assert not any(s in cluster_run["status"]["stderr"] for s in secrets)
    store = cluster_run["store"]
    for key in store.list_keys(""):
        body = store.read(key)
        assert not any(s.encode() in body for s in secrets), key
    for table in ("documents", LLM_TASKS[0].table, LLM_TASKS[2].table):
        rows = _table(cluster_run, table, spark, tmp_path).collect()
        assert all(s not in str(r.asDict()) for r in rows for s in secrets), table
    root: Path = cluster_run["root"]
    leaks = [
        p
        for p in root.rglob("*")
        if p.is_file() and p.name != "moto.log" and any(s.encode() in p.read_bytes() for s in secrets)
    ]
    assert leaks == []
    with sqlite3.connect(root / "driver" / "mlflow.db") as db:
        logged = db.execute("select key, value from params union all select key, value from tags").fetchall()
    assert logged and not any(s in str(logged) for s in secrets)
    assert BUCKET in str(logged)  # the workdir's URI is logged; its keys are not
