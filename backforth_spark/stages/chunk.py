"""Stage `chunk`: representative documents -> `passages` that fit the model's context (see chunking.py)."""

from __future__ import annotations

from datetime import UTC, datetime

from pyspark.sql import functions as F

from backforth_spark import schemas as s
from backforth_spark.chunking import LOW_QUALITY, OK
from backforth_spark.context import StageContext
from backforth_spark.model import resolve_model
from backforth_spark.tables import struct
from udfs.chunking import chunk_documents

CHUNK_SCHEMA = struct(s.PASSAGES_COLUMNS)
TASKS_PER_CORE = 4


def run(ctx: StageContext) -> dict[str, int]:
    """Chunk representatives that have no passages yet."""
    reps = ctx.tables.read(s.DEDUP).where("is_representative").select("doc_key")
    done = ctx.tables.read(s.PASSAGES).select("doc_key").distinct()
    pending = reps.join(done, "doc_key", "left_anti")
    # Spread over several tasks per core by key: the documents' own file splits can be far apart in
    # size (a 128 MB row group beside a 22 MB one), and one task tokenising most of the text would
    # leave the other cores idle (measured: 88% of 100k documents' passages from one task).
    runs = ctx.tables.runs_with_keys(s.DOCUMENTS, pending)
    if not runs:
        ctx.tables.ensure(s.PASSAGES)
        return {"rows_in": 0, "rows_out": 0}  # nothing new: no Python workers, no empty commit
    parts = ctx.spark.sparkContext.defaultParallelism * TASKS_PER_CORE
    todo = ctx.tables.rows_for_keys(s.DOCUMENTS, pending, runs=runs)
    todo = todo.select("doc_key", "text").repartition(parts, "doc_key")
    model = resolve_model(ctx.cfg.llm)
    # one timestamp for every row of this call: with the run id it names what this call inserted
    written_at = datetime.now(UTC).replace(tzinfo=None)
    chunks = todo.mapInPandas(chunk_documents(model, ctx.cfg.chunk), CHUNK_SCHEMA).select(
        *CHUNK_SCHEMA.fieldNames(),
        F.lit(ctx.run_id).alias("run_id"),
        F.lit(written_at).cast("timestamp").alias("written_at"),
    )
    # No staging table: an insert-only MERGE reads its source once, and the counts below read back the
    # rows this call inserted (Delta's file statistics skip every other file by run_id and written_at).
    ctx.tables.merge_insert_new(s.PASSAGES, chunks, ["passage_id"])
    inserted = ctx.tables.read(s.PASSAGES).where(
        (F.col("run_id") == ctx.run_id) & (F.col("written_at") == F.lit(written_at).cast("timestamp"))
    )
    # one job for every count (a refresh pays about a second per job): by status and filter, by status,
    # and the documents overall; grouping_id tells the levels apart (bit 0: filter rolled up, 1: status)
    counts = inserted.rollup("status", "quality_filter").agg(
        F.grouping_id().alias("level"), F.count("*").alias("n"), F.countDistinct("doc_key").alias("docs")
    )
    with ctx.tables.timed("count passages"):
        rows = counts.collect()
    by_status = {r["status"]: r["n"] for r in rows if r["level"] == 1}
    by_filter = {r["quality_filter"]: r["n"] for r in rows if r["level"] == 0 and r["status"] == LOW_QUALITY}
    return {
        "rows_in": next((r["docs"] for r in rows if r["level"] == 3), 0),
        "rows_out": by_status.get(OK, 0),
        **{f"passages_{status}": n for status, n in sorted(by_status.items())},
        **{f"filtered_{name}": n for name, n in sorted(by_filter.items())},
    }
