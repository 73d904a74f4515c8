"""Stage `dedup`: exact duplicates by normalised text -> the `dedup_decisions` table.

Incremental: only documents without a decision are hashed. A document that is already a cluster's
representative stays one; a new copy of it is marked a duplicate. Among new documents the
representative is the smallest doc_key, so the result does not depend on partitioning.
"""

from __future__ import annotations

from backforth_spark.context import StageContext

REPRESENTATIVE = "representative"
EXACT = "exact"


def run(ctx: StageContext) -> dict[str, int]:
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    from backforth_spark import tables as t
    from udfs.text import norm_hash_udf

    docs = ctx.tables.read(t.DOCUMENTS)
    t.require_columns(docs, ["doc_key", "text"], t.DOCUMENTS)
    decided = ctx.tables.read(t.DEDUP)
    new = docs.join(decided.select("doc_key"), "doc_key", "left_anti").select(
        "doc_key", norm_hash_udf("text").alias("norm_hash")
    )
    known_reps = decided.where("is_representative").select("norm_hash", F.col("cluster_id").alias("known"))
    by_hash = Window.partitionBy("norm_hash")
    decisions = (
        new.join(known_reps, "norm_hash", "left")
        .withColumn("cluster_id", F.coalesce("known", F.min("doc_key").over(by_hash)))
        .withColumn("is_representative", F.col("cluster_id") == F.col("doc_key"))
        .select(
            "doc_key",
            "norm_hash",
            "cluster_id",
            "is_representative",
            F.when(F.col("is_representative"), F.lit(REPRESENTATIVE)).otherwise(F.lit(EXACT)).alias("reason"),
            F.lit(ctx.run_id).alias("run_id"),
            F.current_timestamp().alias("written_at"),
        )
    )
    before = decided.groupBy().agg(
        F.count("*").alias("n"), F.sum(F.col("is_representative").cast("int")).alias("reps")
    )
    b = before.collect()[0]
    ctx.tables.merge_insert_new(t.DEDUP, decisions, ["doc_key"])
    a = (
        ctx.tables.read(t.DEDUP)
        .groupBy()
        .agg(F.count("*").alias("n"), F.sum(F.col("is_representative").cast("int")).alias("reps"))
        .collect()[0]
    )
    rows_in = a["n"] - b["n"]
    reps = (a["reps"] or 0) - (b["reps"] or 0)
    return {"rows_in": rows_in, "rows_out": reps, "exact_duplicates": rows_in - reps}
