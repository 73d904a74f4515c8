"""Exactly once across a crash: kill the driver in the middle of a generation stage (real engine), rerun,
and check that every key has one row and that the rerun generated only what was missing."""

from __future__ import annotations

import pytest
from pyspark.sql import functions as F

from backforth_spark import schemas as s
from backforth_spark.generation import BACKTRANSLATE
from tests.conftest import LOCAL_CONF, REAL_RUN_SETTINGS


@pytest.mark.e2e
def test_killed_generation_resumes_without_duplicates_or_regeneration(killed_generation, spark):
    """A backtranslate stage (a new fingerprint: every passage owed again) committing every 3 prompts is
    SIGKILLed after its first commit, then rerun (tests/after_real_run.py, on a copy of the real run)."""
    run = killed_generation
    workdir = run["workdir"]
    table = str(workdir / "tables" / BACKTRANSLATE.table)
    total = (
        spark.read.format("delta").load(str(workdir / "tables" / s.PASSAGES)).where("status = 'ok'").count()
    )
    assert total >= 8
    assert run["sliced_before_kill"], "the stage never committed a slice"

    fingerprint_rows = lambda df: df.where(F.col("sampling").contains('"max_tokens": 64'))  # noqa: E731
    # the table as the kill left it
    as_killed = spark.read.format("delta").option("versionAsOf", run["killed_at_version"]).load(table)
    before = fingerprint_rows(as_killed)
    kept = {(r["passage_id"], r["run_id"]) for r in before.where("status = 'ok'").collect()}
    ok_before = len(kept)
    assert 0 < before.count() < total, "the kill should land between commits"

    assert run["rerun_returncode"] == 0, run["rerun_stderr"][-3000:]
    counts = run["summary"]["stages"]["backtranslate"]
    assert counts["generated"] == total - ok_before  # only the missing (and failed) rows

    after = fingerprint_rows(spark.read.format("delta").load(table))
    assert after.groupBy("passage_id").count().where(F.col("count") > 1).count() == 0
    assert after.select("passage_id").distinct().count() == total == after.count()
    # rows committed before the kill kept their original run: they were not generated again
    assert kept <= {(r["passage_id"], r["run_id"]) for r in after.collect()}


# ---- a kill inside a CPU stage between its commits, then a rerun ----------------------------------


class Killed(BaseException):
    """A kill: no `except Exception` catches it, no stage code after it runs."""


def _contents(tables, name):
    df = tables.read(name).drop("run_id", "written_at")
    return sorted(tuple(r) for r in df.collect())


def test_a_kill_inside_ingest_dedup_or_chunk_then_a_rerun_ends_as_the_real_run(
    real_run, spark, tmp_path, monkeypatch
):
    """On the shared run's input, each stage is killed before one of its table commits (ingest and dedup
    between their two tables' commits, chunk before its only one), then rerun; the next stage reads what
    the rerun left. Every table ends row for row as the shared run's, which was never killed."""
    from dataclasses import replace

    from backforth_spark.config import load_config
    from backforth_spark.context import StageContext
    from backforth_spark.stages import chunk, dedup, ingest
    from backforth_spark.tables import Tables

    cfg = load_config(LOCAL_CONF, [f"workdir={tmp_path}", *REAL_RUN_SETTINGS])  # the run's chunking too
    inputs = (str(real_run.corpus),)
    killed = StageContext(spark, cfg, Tables(spark, tmp_path / "tables", "k1"), "k1", inputs=inputs)
    rerun = replace(killed, tables=Tables(spark, tmp_path / "tables", "k2"), run_id="k2")
    reference = Tables(spark, real_run.workdir / "tables")
    commits = {"n": 0, "kill_at": 0}
    real_merge = Tables.merge_insert_new

    def dies_at_a_commit(self, name, df, keys):
        if self.run_id == "k1":  # only the run that gets killed
            commits["n"] += 1
            if commits["n"] == commits["kill_at"]:
                raise Killed
        return real_merge(self, name, df, keys)

    monkeypatch.setattr(Tables, "merge_insert_new", dies_at_a_commit)
    for stage, kill_at in ((ingest, 2), (dedup, 2), (chunk, 1)):
        commits.update(n=0, kill_at=kill_at)
        with pytest.raises(Killed):
            stage.run(killed)
        stage.run(rerun)
    for name in (s.DOCUMENTS, s.QUARANTINE, s.DEDUP, s.MINHASH, s.PASSAGES):
        assert _contents(rerun.tables, name) == _contents(reference, name), name
