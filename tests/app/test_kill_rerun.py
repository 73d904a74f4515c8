"""Exactly once across a crash in a CPU stage: killed between its table commits, then rerun, every table
ends as a run that was never killed. (A generation stage killed between its commits, its driver and JVM
SIGKILLed on a cluster, then rerun: tests/app/test_cluster.py.)"""

from __future__ import annotations

import pytest

from backforth_spark.core import schemas as s
from tests.conftest import LOCAL_CONF, REAL_RUN_SETTINGS

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

    from backforth_spark.core.config import load_config
    from backforth_spark.spark.context import StageContext
    from backforth_spark.spark.stages import chunk, dedup, ingest
    from backforth_spark.spark.tables import Tables

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
