"""Concurrent writers: two runs MERGE into the same Delta tables at the same time."""

from __future__ import annotations

import threading

from backforth_spark import ingest
from backforth_spark import tables as t
from backforth_spark.context import StageContext
from tests.conftest import DOLMA_SAMPLE


def test_two_concurrent_ingests_neither_corrupt_nor_duplicate(make_ctx):
    base = make_ctx()
    results, errors = {}, []

    def ingest_as(run_id):
        tables = t.Tables(base.spark, base.tables.root, run_id)
        try:
            ctx = StageContext(base.spark, base.cfg, tables, run_id)
            results[run_id] = ingest.run(ctx, [str(DOLMA_SAMPLE)])
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
