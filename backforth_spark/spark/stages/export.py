"""Stage `export`: the kept, rewritten pairs -> a fine-tuning dataset folder (its shape: dataset.py).

The curation policies (backforth_spark/core/curate.py, and the grounding check when enabled) decide which
rewrites are kept; every removal is counted by its reason. Spark's executors write the data files; the
driver writes only the card, from aggregates. Zero pairs is a normal outcome: the folder then holds its
card and empty data files, and the counts say why.
"""

from __future__ import annotations

from typing import Any

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from backforth_spark.core import schemas as s
from backforth_spark.core import storage
from backforth_spark.core.analysis import analyse, two_sample_accuracy
from backforth_spark.core.config import ExportConfig
from backforth_spark.core.dataset import (
    BASELINE_DIR,
    CARD,
    LINEAGE_FIELDS,
    METRIC_FIELDS,
    PAIRS_DIR,
    WORD_EDGES,
    buckets,
    dataset_card,
    shard_count,
)
from backforth_spark.core.generation import DISTILL, GROUND, REWRITE, SCORE
from backforth_spark.spark.context import StageContext
from backforth_spark.spark.stages.generate import current_specs, hub_for
from udfs.chunking import tokenizer_for
from udfs.curation import response_issue_udf, source_copy_udf


def records(pairs: DataFrame, cfg: ExportConfig) -> DataFrame:
    """The pairs in the configured style (chat: TRL's `messages`, [system?, user, assistant]; alpaca:
    instruction, input "" and output), with their lineage and source-copy rate."""

    def turn(role: str, content) -> Column:
        return F.struct(F.lit(role).alias("role"), content.alias("content"))

    if cfg.style == "alpaca":
        head = [F.col("instruction"), F.lit("").alias("input"), F.col("response").alias("output")]
    else:
        system = [turn("system", F.lit(cfg.system_prompt))] if cfg.include_system else []
        conversation = [*system, turn("user", F.col("instruction")), turn("assistant", F.col("response"))]
        head = [F.array(*conversation).alias("messages")]
    lineage = [F.col(c).cast("int").alias(c) if c == "score" else F.col(c) for c in LINEAGE_FIELDS]
    return pairs.select(*head, *lineage, *METRIC_FIELDS)


def write_dataset(
    rows: DataFrame, n_rows: int, out_uri: str, version: str, card: str, cfg: ExportConfig
) -> None:
    """Write `rows` (records, `n_rows` of them) as export `version` under `out_uri`: Spark's executors
    write the data files (ordered by passage_id, `cfg.shard_rows` rows a file) into
    `<out_uri>/<version>/data/`; then `card`, which names those files, replaces `<out_uri>/README.md`;
    then the older versions go. The card is one small object written last, so on any filesystem a
    reader finds the previous export whole until it is replaced, and a run that dies midway leaves
    only an unnamed folder, which the next export removes."""
    data = storage.join(out_uri, version, "data")
    # ranges of passage_id: shard i holds the i-th part of the order, as one file (maxRecordsPerFile
    # cuts one that sampling made larger)
    ordered = rows.repartitionByRange(shard_count(n_rows, cfg.shard_rows), "passage_id").sortWithinPartitions(
        "passage_id"
    )
    for fmt in cfg.formats:
        writer = ordered.write.mode("append").option("maxRecordsPerFile", cfg.shard_rows)
        if fmt == "parquet":
            writer.parquet(data)
        else:  # JSON lines; a missing value is written as null, as the Parquet files hold it
            writer.option("ignoreNullFields", "false").json(data)
    storage.write_text(storage.join(out_uri, CARD), card)
    for folder in storage.subfolders(out_uri):
        if folder != version:  # the previous export, or one a failed run left without a card
            storage.delete_dir(storage.join(out_uri, folder))


def _stats(pairs, counts: dict[str, Any], n_rows: int, cfg: ExportConfig) -> dict[str, Any]:
    scores = {str(r["score"]): r["count"] for r in pairs.groupBy("score").count().orderBy("score").collect()}
    words = F.size(F.split(F.trim("response"), r"\s+"))
    label = F.lit(None)
    for lo, hi, name in reversed(buckets(WORD_EDGES)):
        label = F.when((words >= lo) & (words < hi) if hi is not None else words >= lo, name).otherwise(label)
    found = {r["b"]: r["count"] for r in pairs.groupBy(label.alias("b")).count().collect()}
    return {
        "rows": n_rows,
        "shards": shard_count(n_rows, cfg.shard_rows),
        "counts": counts,
        "scores": scores,
        "response_words": {name: found.get(name, 0) for _, _, name in buckets(WORD_EDGES)},
    }


# the analyses read at most this many pairs (the first by passage_id): diversity needs every n-gram
# of the set in memory on the driver
ANALYSIS_ROWS = 20_000


def _analysis(pairs, count_tokens) -> tuple[dict[str, Any], list[str]]:
    """The analyses of an exported set, and the responses they read."""
    rows = pairs.select("instruction", "response", "source_copy").limit(ANALYSIS_ROWS).collect()
    responses = [r["response"] for r in rows]
    groups = analyse(
        [r["instruction"] for r in rows], responses, [r["source_copy"] for r in rows], count_tokens
    )
    return {"rows": len(rows), "groups": groups}, responses


def _flat_analysis(analysis: dict[str, Any], prefix: str) -> dict[str, float]:
    """The analyses as numeric counts (MLflow metrics): `<prefix>_<group>_<measure>`."""
    return {f"{prefix}_{g}_{k}": v for g, values in analysis["groups"].items() for k, v in values.items()}


def _lineage(ctx: StageContext, specs: dict, stages: list[str], tables: list[str]) -> dict[str, Any]:
    return {
        "run_id": ctx.run_id,
        "mlflow_run_id": ctx.mlflow_run_id,
        "model": specs[stages[0]].model,
        "templates": {st: f"{specs[st].template.name} {specs[st].template.hash}" for st in stages},
        "fingerprints": {st: specs[st].fingerprint for st in stages},
        "table_versions": {name: ctx.tables.version(name) for name in tables},
        "config": ctx.cfg.model_dump(mode="json"),
    }


def run(ctx: StageContext) -> dict[str, int | str]:
    """Apply the curation policies to the current rewrites and write the kept pairs; with the
    distillation baseline on, also write the same instructions answered without their passage."""
    cur, exp = ctx.cfg.curate, ctx.cfg.export
    specs = current_specs(ctx)
    # every table is read as of the version recorded in the card, even if a writer commits meanwhile
    read_tables = [s.DOCUMENTS, s.PASSAGES, SCORE.table, REWRITE.table]
    read_tables += [GROUND.table] if cur.grounding else []
    read_tables += [DISTILL.table] if cur.distillation_baseline else []
    stages = [task.name for task in ctx.llm_tasks if task.name not in (GROUND.name, DISTILL.name)]
    stages += [GROUND.name] if cur.grounding else []
    stages += [DISTILL.name] if cur.distillation_baseline else []
    lineage = _lineage(ctx, specs, stages, read_tables)

    def read(name: str):
        return ctx.tables.read(name, lineage["table_versions"][name])

    # rewrites of pairs below the current threshold (made under a lower one) are not exported: they
    # are counted with the scores below it
    responses = read(REWRITE.table).where(
        (F.col("fingerprint") == specs[REWRITE.name].fingerprint) & (F.col("score") >= cur.min_score)
    )
    counts: dict[str, int | str] = {"rows_in": responses.count()}
    low = (
        read(SCORE.table)
        .where((F.col("fingerprint") == specs[SCORE.name].fingerprint) & (F.col("status") == "ok"))
        .where(F.col("score") < cur.min_score)
    )
    counts["removed_low_score"] = low.count()

    passages = read(s.PASSAGES).select("passage_id", F.col("text").alias("passage"))
    responses = responses.join(passages, "passage_id", "left")
    # each rewrite gets at most one reason to be left out, checked in this order
    issue = F.when(F.col("status") != "ok", F.concat(F.lit("rewrite_"), F.col("status"))).otherwise(
        response_issue_udf(cur)("instruction", "response", "passage")
    )
    if cur.grounding:
        grounded = (
            read(GROUND.table)
            .where((F.col("fingerprint") == specs[GROUND.name].fingerprint) & (F.col("status") == "ok"))
            .select("passage_id", F.col("score").alias("grounding"))
        )
        responses = responses.join(grounded, "passage_id", "left")
        issue = F.coalesce(
            issue,
            F.when(F.col("grounding").isNull(), F.lit("grounding_unchecked")).when(
                F.col("grounding") < cur.min_grounding, F.lit("ungrounded")
            ),
        )
    judged = responses.withColumn("issue", issue).select(
        "passage_id", "instruction", "response", "score", "issue",
        source_copy_udf()("response", "passage").alias("source_copy"),
    )  # fmt: skip
    judged = ctx.tables.stage("export_judged", judged)
    for r in judged.where("issue IS NOT NULL").groupBy("issue").count().collect():
        counts[f"removed_{r['issue']}"] = r["count"]

    documents = read(s.DOCUMENTS).select("doc_key", "source", "id")
    doc_keys = read(s.PASSAGES).select("passage_id", "doc_key")
    pairs = ctx.tables.stage(
        "export_pairs",
        judged.where("issue IS NULL")
        .join(doc_keys, "passage_id")
        .join(documents, "doc_key")
        .select(*LINEAGE_FIELDS, *METRIC_FIELDS, "instruction", "response"),
    )
    out_dir = storage.join(ctx.cfg.workdir_uri, "export")
    path = storage.join(out_dir, PAIRS_DIR)
    stats = _stats(pairs, counts, pairs.count(), exp)
    count_tokens = tokenizer_for(specs[REWRITE.name].model, hub_for(ctx.cfg.llm)).count
    stats["analysis"], sample = _analysis(pairs, count_tokens)
    counts["rows_out"] = stats["rows"]
    judged_ok = counts["rows_in"] + counts["removed_low_score"]
    counts["keep_rate"] = round(stats["rows"] / judged_ok, 4) if judged_ok else 0.0
    counts |= {f"score_{k}": v for k, v in stats["scores"].items()}
    counts |= {f"response_words_{k.replace('+', 'plus')}": v for k, v in stats["response_words"].items()}
    counts |= _flat_analysis(stats["analysis"], "analysis")
    pairs_stats = stats
    counts["path"] = path

    if cur.distillation_baseline:
        baseline = ctx.tables.stage(
            "export_baseline",
            read(DISTILL.table)
            .where((F.col("fingerprint") == specs[DISTILL.name].fingerprint) & (F.col("status") == "ok"))
            .join(read(SCORE.table).where(F.col("fingerprint") == specs[SCORE.name].fingerprint)
                  .select("passage_id", "score"), "passage_id")
            .join(passages, "passage_id")
            .withColumn("source_copy", source_copy_udf()("response", "passage"))
            .join(doc_keys, "passage_id")
            .join(documents, "doc_key")
            .select(*LINEAGE_FIELDS, *METRIC_FIELDS, "instruction", "response"),
        )  # fmt: skip
        base_path = storage.join(out_dir, BASELINE_DIR)

        n = baseline.count()
        base_stats = _stats(baseline, {"rows_out": n}, n, exp)
        base_stats["analysis"], base_sample = _analysis(baseline, count_tokens)
        # the paper's comparison: rewritten vs distilled responses, side by side
        accuracy = two_sample_accuracy(sample, base_sample)
        for analysis in (stats["analysis"], base_stats["analysis"]):
            analysis["two_sample_accuracy"] = accuracy
        if accuracy is not None:
            counts["analysis_two_sample_accuracy"] = accuracy
        counts |= _flat_analysis(base_stats["analysis"], "baseline_analysis")
        stats = base_stats
        card = dataset_card("backforth-spark distillation baseline", stats, lineage, ctx.cfg, ctx.run_id)
        write_dataset(records(baseline, exp), n, base_path, ctx.run_id, card, exp)
        counts["baseline_pairs"] = n
        counts["baseline_path"] = base_path
    # written last: with the baseline on, its card carries the comparison too
    card = dataset_card("backforth-spark pairs", pairs_stats, lineage, ctx.cfg, ctx.run_id)
    write_dataset(records(pairs, exp), pairs_stats["rows"], path, ctx.run_id, card, exp)
    return counts
