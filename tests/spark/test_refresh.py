"""Concurrent writers: two runs MERGE into the same Delta tables at the same time."""

from __future__ import annotations

import threading

import pytest

from backforth_spark.core import schemas as t
from backforth_spark.spark.context import StageContext
from backforth_spark.spark.stages import ingest
from backforth_spark.spark.tables import Tables
from tests.conftest import DOLMA_SAMPLE


def test_two_concurrent_ingests_neither_corrupt_nor_duplicate(make_ctx):
    base = make_ctx()
    results, errors = {}, []

    def ingest_as(run_id):
        tables = Tables(base.spark, base.tables.root, run_id)
        try:
            ctx = StageContext(base.spark, base.cfg, tables, run_id, inputs=(str(DOLMA_SAMPLE),))
            results[run_id] = ingest.run(ctx)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=ingest_as, args=(f"run-{i}",)) for i in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    docs = base.tables.read(t.DOCUMENTS)
    assert docs.count() == docs.select("doc_key").distinct().count() == 10
    # between them the two runs inserted each document once
    assert sum(r["documents"] for r in results.values()) == 10


def test_two_refresh_processes_at_once_leave_every_key_once(tmp_path, spark):
    """Two `backforth refresh` processes on the same tables at the same moment (two drivers, two JVMs):
    both hold their staging tables at once (they did overlap), both finish or one names Delta's conflict,
    and between them every document is inserted and decided once."""
    import json
    import subprocess
    import sys
    import time

    from tests.conftest import INTERPRETED_SETTINGS, LOCAL_CONF

    work = tmp_path / "work"

    def refresh(i):
        cmd = [sys.executable, "-m", "backforth_spark.app.cli", "refresh", "--config", str(LOCAL_CONF)]
        cmd += ["--workdir", str(work), "--input", str(DOLMA_SAMPLE), "--stages", "ingest,dedup"]
        cmd += ["--summary-json", str(tmp_path / f"s{i}.json"), "--set", "tracking.enabled=false"]
        # dedup in Spark, which stages scratch tables: their folders show that the two runs overlapped
        cmd += ["--set", "dedup.driver_max_new_docs=0"]
        cmd += [x for setting in INTERPRETED_SETTINGS for x in ("--set", setting)]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    procs = [refresh(i) for i in range(2)]
    most_at_once = 0
    while any(p.poll() is None for p in procs):
        staging = work / "tables" / "_staging"
        runs = [d for d in staging.iterdir() if d.is_dir()] if staging.exists() else []
        most_at_once = max(most_at_once, len(runs))
        time.sleep(0.1)
    outs = [p.communicate(timeout=900) for p in procs]
    assert most_at_once == 2  # each run's staging existed at the same moment: the runs overlapped
    summaries = [json.loads((tmp_path / f"s{i}.json").read_text()) for i in range(2)]
    for proc, (_, err), summary in zip(procs, outs, summaries, strict=True):
        # a run that lost every retry says so and names the table; nothing it did is half-committed
        assert proc.returncode == 0 or "concurrent writer" in (summary["error"] or ""), err[-3000:]
    assert any(p.returncode == 0 for p in procs)

    tables = Tables(spark, work / "tables")
    docs = tables.read(t.DOCUMENTS)
    assert docs.count() == docs.select("doc_key").distinct().count() == 10
    decisions = tables.read(t.DEDUP)
    assert decisions.count() == decisions.select("doc_key").distinct().count() == 10
    # ingest commits before anything can conflict, so both runs report it: each document once between them
    assert sum(s["stages"]["ingest"]["documents"] for s in summaries) == 10


@pytest.mark.e2e
def test_a_refresh_runs_through_spark_connect_and_status_reads_its_tables(refresh_after_new_file, spark):
    """The refresh follow-up is a Spark Connect client (tests/connect_server.py): every stage from
    ingest to export ran without a SparkContext, and `backforth status` through the same server counts
    what the tables hold."""
    refresh = refresh_after_new_file
    assert refresh["returncode"] == 0, refresh["stderr"][-3000:]
    summary = refresh["summary"]
    assert summary["spark"]["connect"] is True
    paper = ["ingest", "dedup", "chunk", "backtranslate", "score", "rewrite", "export"]
    assert [name for name in summary["stages"] if name in paper] == paper
    assert refresh["status_returncode"] == 0, refresh["status"]
    tables = Tables(spark, refresh["workdir"] / "tables")
    for name in (t.DOCUMENTS, t.PASSAGES, "instructions", "scores", "responses"):
        assert refresh["status"]["tables"][name]["rows"] == tables.read(name).count(), name
    print(f"refresh through Spark Connect: {refresh['wall_s']:.1f} s wall")


@pytest.mark.e2e
def test_status_without_a_config_judges_by_the_settings_the_last_run_recorded(refresh_after_new_file, spark):
    """The follow-up's `status` is given neither the config nor the refresh's settings (its backward
    model, its stages left off): it reads them from the workdir, says so, and marks the stages they
    leave off."""
    refresh = refresh_after_new_file
    report = refresh["status"]
    assert report["judged_by"] == {"config": "recorded", "run_id": refresh["summary"]["run_id"]}
    stages = report["llm_stages"]
    assert [name for name, info in stages.items() if not info["enabled"]] == ["ground", "distill"]
    assert stages["ground"]["pending"] == stages["distill"]["pending"] == 0
    # the fingerprints are the refresh's own (the schema's defaults would name other templates and
    # another backward model): the new document's instruction is done under them
    tables = Tables(spark, refresh["workdir"] / "tables")
    new = tables.read(t.PASSAGES).where("doc_key = 'web/new-1'").select("passage_id")
    written = {
        r[0] for r in tables.read("instructions").join(new, "passage_id").select("fingerprint").collect()
    }
    assert written == {stages["backtranslate"]["fingerprint"]}
    assert stages["backtranslate"]["done"] > 0 and stages["rewrite"]["enabled"]


@pytest.mark.e2e
def test_a_refresh_after_a_new_file_generates_only_for_it(refresh_after_new_file, real_run, spark):
    """A scheduled refresh on a copy of the real run after a new file lands (tests/after_real_run.py):
    only the new document flows through the LLM stages, old successes are untouched; its threshold (2)
    is above what the small judge gives most pairs, so real pairs are removed for their score and
    counted. (A refresh with nothing new: tests/app/test_cli.py.)"""
    from pyspark.sql import functions as F

    from backforth_spark.core.generation import LLM_TASKS

    refresh = refresh_after_new_file
    assert refresh["returncode"] == 0, refresh["stderr"][-3000:]
    tables = Tables(spark, refresh["workdir"] / "tables")
    original = Tables(spark, real_run.workdir / "tables")  # what the refresh's copy held before it

    def ok_rows(tables, task):
        df = tables.read(task.table).where("status = 'ok'")
        return {tuple(r) for r in df.select("passage_id", "run_id", "raw_output").collect()}

    stages = refresh["summary"]["stages"]
    assert stages["ingest"]["documents"] == 1
    new_passages = tables.read(t.PASSAGES).where("doc_key = 'web/new-1' AND status = 'ok'").count()
    # backtranslation samples at temperature 1.0 here: its old failures may be sampled again, and say so
    retried = sum(v for k, v in stages["backtranslate"].items() if k.startswith("retried_"))
    assert stages["backtranslate"]["generated"] == new_passages + retried and new_passages > 0
    # the judges and the rewrite run at temperature 0: no old failure is paid for again
    for name in ("score", "rewrite"):
        assert [k for k in stages[name] if k.startswith("retried_") and k != "retried_engine_error"] == []

    # the judge owes a grade for each instruction that became ok in this refresh: the new passages' and
    # any old failure the backtranslation retry above turned into a success (seen in a CI run)
    def ok_instructions(tables):
        df = tables.read("instructions").where(F.col("status") == "ok")
        return {tuple(r) for r in df.select("passage_id", "fingerprint").collect()}

    now_ok = ok_instructions(tables)
    became_ok = now_ok - ok_instructions(original)
    new_ids = {
        r[0] for r in tables.read(t.PASSAGES).where("doc_key = 'web/new-1'").select("passage_id").collect()
    }
    assert {key for key in now_ok if key[0] in new_ids} <= became_ok
    assert stages["score"]["generated"] == len(became_ok) + stages["score"].get("retried_engine_error", 0)
    for task in LLM_TASKS:
        assert ok_rows(original, task) <= ok_rows(tables, task), task.name
    # removed for their score: every current ok score below 2, counted independently from the table
    scores = tables.read("scores").where("status = 'ok'")
    fingerprint = scores.groupBy("fingerprint").count().orderBy("count", ascending=False).first()[0]
    below = scores.where(f"fingerprint = '{fingerprint}' AND score < 2").count()
    assert stages["export"]["removed_low_score"] == below > 0
