"""Stage `chunk`: representative documents -> `passages` that fit the model's context (see chunking.py)."""

from __future__ import annotations

from datetime import UTC, datetime

from pyspark.sql import Column, Observation
from pyspark.sql import functions as F

from backforth_spark.core import schemas as s
from backforth_spark.core.chunking import LOW_QUALITY, OK, QUALITY_FILTERS, STATUSES
from backforth_spark.core.model import resolve_model
from backforth_spark.spark.context import StageContext
from backforth_spark.spark.stages.generate import hub_for
from backforth_spark.spark.tables import struct
from udfs.chunking import chunk_documents

CHUNK_SCHEMA = struct(s.PASSAGES_COLUMNS)
# pending documents up to which their keys are collected to the driver (about 20 bytes each)
COLLECTED_KEYS = 20_000


def run(ctx: StageContext) -> dict[str, int]:
    """Chunk representatives that have no passages yet."""
    reps = ctx.tables.read(s.DEDUP).where("is_representative").select("doc_key")
    done = ctx.tables.read(s.PASSAGES).select("doc_key").distinct()
    pending_keys = reps.join(done, "doc_key", "left_anti")
    docs = ctx.tables.read(s.DOCUMENTS)
    pending = ctx.tables.collect_pending(
        docs.select("doc_key", "run_id").join(pending_keys, "doc_key", "left_semi"),
        COLLECTED_KEYS,
        f"find {s.DOCUMENTS} rows",
    )
    if not pending.runs:
        ctx.tables.ensure(s.PASSAGES)
        return {"rows_in": 0, "rows_out": 0}  # nothing new: no Python workers, no empty commit
    # only the runs that wrote pending documents: each commit writes files of its own run_id, so
    # Delta's file statistics skip every other file
    todo = docs.where(F.col("run_id").isin(pending.runs))
    todo = todo.join(
        pending_keys if pending.keys is None else F.broadcast(pending.keys), "doc_key", "left_semi"
    )
    # Rebalanced by key into partitions of Spark's advisory size (spark.sql.adaptive.
    # advisoryPartitionSizeInBytes, shuffled bytes): adaptive execution splits the large ones and merges
    # the small ones, so a task's text follows that setting, not the corpus, and the documents' own file
    # splits (a 128 MB row group beside a 22 MB one) cannot leave one task with most of the text.
    todo = todo.select("doc_key", "text").hint("rebalance", "doc_key")
    model = resolve_model(ctx.cfg.llm)
    # one timestamp for every row of this call: with the run id it names what this call inserted
    written_at = datetime.now(UTC).replace(tzinfo=None)
    # Counted as the MERGE reads them (Spark's observed metrics ride along with the query that runs):
    # no job of its own, and the new passages are not read back (2-4 s of a small refresh in a fresh
    # process).
    seen_docs, seen_passages = Observation(), Observation()
    todo = todo.observe(seen_docs, F.count(F.lit(1)).alias("documents"))
    chunks = (
        todo.mapInPandas(chunk_documents(model, ctx.cfg.chunk, hub_for(ctx.cfg.llm)), CHUNK_SCHEMA)
        .observe(seen_passages, *_passage_metrics())
        .select(
            *CHUNK_SCHEMA.fieldNames(),
            F.lit(ctx.run_id).alias("run_id"),
            F.lit(written_at).cast("timestamp").alias("written_at"),
        )
    )
    # No staging table: an insert-only MERGE reads its source once.
    inserted = ctx.tables.merge_insert_new(s.PASSAGES, chunks, ["passage_id"])
    observed, documents = _observed(seen_passages), _observed(seen_docs)
    if observed and documents and inserted == observed["passages"]:
        by_status = {status: observed[status] for status in STATUSES if observed[status]}
        by_filter = {name: observed[name] for name in QUALITY_FILTERS if observed[name]}
        return _counts(documents["documents"], by_status, by_filter)
    # Some keys were there already (a concurrent run chunked them too), or the write did not report
    # the metrics: count what this call inserted, read back by run id and time (Delta's file
    # statistics skip every other file).
    inserted_rows = ctx.tables.read(s.PASSAGES).where(
        (F.col("run_id") == ctx.run_id) & (F.col("written_at") == F.lit(written_at).cast("timestamp"))
    )
    # one job for every count: by status and filter, by status, and the documents overall;
    # grouping_id tells the levels apart (bit 0: filter rolled up, 1: status)
    counts = inserted_rows.rollup("status", "quality_filter").agg(
        F.grouping_id().alias("level"), F.count("*").alias("n"), F.countDistinct("doc_key").alias("docs")
    )
    with ctx.tables.timed("count passages"):
        rows = counts.collect()
    by_status = {r["status"]: r["n"] for r in rows if r["level"] == 1}
    by_filter = {r["quality_filter"]: r["n"] for r in rows if r["level"] == 0 and r["status"] == LOW_QUALITY}
    return _counts(next((r["docs"] for r in rows if r["level"] == 3), 0), by_status, by_filter)


def _observed(observation: Observation) -> dict[str, int] | None:
    """The metrics observed by the write that has run, or None if it did not report them: a catalog
    table's first write (Delta's CREATE TABLE AS SELECT) leaves the observation without a row, which
    PySpark fails to convert (an AssertionError from the JVM)."""
    try:
        return observation.get or None
    except Exception:  # whatever the converter raises: the counts are then read back instead
        return None


def _passage_metrics() -> list[Column]:
    """Aggregates observed over the passages: how many, and how many of each status and filter."""

    def how_many(column: str, value: str) -> Column:
        return F.sum(F.when(F.col(column) == value, 1).otherwise(0)).alias(value)

    return [
        F.count(F.lit(1)).alias("passages"),
        *(how_many("status", status) for status in STATUSES),
        *(how_many("quality_filter", name) for name in QUALITY_FILTERS),
    ]


def _counts(documents: int, by_status: dict[str, int], by_filter: dict[str, int]) -> dict[str, int]:
    return {
        "rows_in": documents,
        "rows_out": by_status.get(OK, 0),
        **{f"passages_{status}": n for status, n in sorted(by_status.items())},
        **{f"filtered_{name}": n for name, n in sorted(by_filter.items())},
    }
