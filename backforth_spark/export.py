"""Stage `export`: the kept, rewritten pairs -> chat-format JSONL for fine-tuning.

One pair a line: {"messages": [{"role": "user", ...}, {"role": "assistant", ...}], plus source ids}.
The curation policies (backforth_spark/curate.py, and the grounding check when enabled) decide which
rewrites are kept; every removal is counted by its reason.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from backforth_spark.config import ExportConfig
from backforth_spark.context import StageContext

EXPORT_FILE = "pairs.jsonl"
BASELINE_FILE = "distilled.jsonl"  # the distillation baseline, when enabled


def to_record(row: dict, cfg: ExportConfig) -> dict:
    """One exported line from a joined (response, passage, document) row."""
    messages = []
    if cfg.include_system:
        messages.append({"role": "system", "content": cfg.system_prompt})
    messages += [
        {"role": "user", "content": row["instruction"]},
        {"role": "assistant", "content": row["response"]},
    ]
    return {
        "messages": messages,
        "passage_id": row["passage_id"],
        "doc_key": row["doc_key"],
        "source": row["source"],
        "id": row["id"],
        "score": row["score"],
    }


def _write_jsonl(rows, path: Path, record) -> int:
    """Stream rows into path (atomically replaced); partition by partition, so the driver never holds
    the whole export."""
    tmp = Path(f"{path}.tmp")
    n = 0
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows.toLocalIterator():
            f.write(json.dumps(record(row.asDict()), ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, path)
    return n


def run(ctx: StageContext) -> dict[str, int | str]:
    """Apply the curation policies to the current rewrites and write the kept pairs; with the
    distillation baseline on, also write the same instructions answered without their passage."""
    from pyspark.sql import functions as F

    from backforth_spark import tables as t
    from backforth_spark.generate import DISTILL, GROUND, REWRITE, SCORE, fingerprints
    from backforth_spark.model import resolve_model
    from udfs.curation import response_issue_udf

    cur = ctx.cfg.curate
    specs = fingerprints(ctx.cfg, resolve_model(ctx.cfg.llm))
    responses = ctx.tables.read(t.RESPONSES).where(F.col("fingerprint") == specs[REWRITE].fingerprint)
    counts: dict[str, int | str] = {"rows_in": responses.count()}
    low = (
        ctx.tables.read(t.SCORES)
        .where((F.col("fingerprint") == specs[SCORE].fingerprint) & (F.col("status") == "ok"))
        .where(F.col("score") < cur.min_score)
    )
    counts["removed_low_score"] = low.count()

    # each rewrite gets at most one reason to be left out, checked in this order
    issue = F.when(F.col("status") != "ok", F.concat(F.lit("rewrite_"), F.col("status"))).otherwise(
        response_issue_udf(cur)("instruction", "response")
    )
    if cur.grounding:
        grounded = (
            ctx.tables.read(t.GROUNDING)
            .where((F.col("fingerprint") == specs[GROUND].fingerprint) & (F.col("status") == "ok"))
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
        "passage_id", "instruction", "response", "score", "issue"
    )
    judged = ctx.tables.stage("export_judged", judged)
    for r in judged.where("issue IS NOT NULL").groupBy("issue").count().collect():
        counts[f"removed_{r['issue']}"] = r["count"]

    pairs = (
        judged.where("issue IS NULL")
        .join(ctx.tables.read(t.PASSAGES).select("passage_id", "doc_key"), "passage_id")
        .join(ctx.tables.read(t.DOCUMENTS).select("doc_key", "source", "id"), "doc_key")
        .select("passage_id", "doc_key", "source", "id", "instruction", "response", "score")
        .orderBy("passage_id")
    )
    out_dir = ctx.cfg.workdir_path / "export"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / EXPORT_FILE
    counts["rows_out"] = _write_jsonl(pairs, path, lambda row: to_record(row, ctx.cfg.export))
    counts["path"] = str(path)

    if cur.distillation_baseline:
        baseline = (
            ctx.tables.read(t.DISTILLATIONS)
            .where((F.col("fingerprint") == specs[DISTILL].fingerprint) & (F.col("status") == "ok"))
            .join(ctx.tables.read(t.SCORES).where(F.col("fingerprint") == specs[SCORE].fingerprint)
                  .select("passage_id", "score"), "passage_id")
            .join(ctx.tables.read(t.PASSAGES).select("passage_id", "doc_key"), "passage_id")
            .join(ctx.tables.read(t.DOCUMENTS).select("doc_key", "source", "id"), "doc_key")
            .select("passage_id", "doc_key", "source", "id", "instruction", "response", "score")
            .orderBy("passage_id")
        )  # fmt: skip
        base_path = out_dir / BASELINE_FILE
        counts["baseline_pairs"] = _write_jsonl(
            baseline, base_path, lambda row: to_record(row, ctx.cfg.export)
        )
        counts["baseline_path"] = str(base_path)
    return counts
