"""Stage `export`: the kept, rewritten pairs -> a fine-tuning dataset folder.

    <workdir>/export/pairs/README.md                         dataset card (counts, distributions, lineage)
    <workdir>/export/pairs/data/train-00000-of-00001.jsonl   one pair a line
    <workdir>/export/pairs/data/train-00000-of-00001.parquet the same rows

Hugging Face `datasets` loads the folder as is (the card's YAML names the data files); the chat style
is TRL's SFT format ({"messages": [system?, user, assistant]}), the alpaca style has instruction, input
and output. Every row keeps its source ids and score. The curation policies (backforth_spark/curate.py,
and the grounding check when enabled) decide which rewrites are kept; every removal is counted by its
reason. With the distillation baseline on, `export/distilled/` holds the same instructions answered
without their passage.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from backforth_spark.config import Config, ExportConfig
from backforth_spark.context import StageContext

PAIRS_DIR = "pairs"
BASELINE_DIR = "distilled"  # the distillation baseline, when enabled
LINEAGE_FIELDS = ("passage_id", "doc_key", "source", "id", "score")
LICENSE_NOTES = {
    "odc-by": "The source passages come from Dolma, released under the Open Data Commons Attribution "
    "License (ODC-BY) v1.0; use of the source text is also bound by the terms of its original sites.",
}

# ---- pure core: records, shard names, dataset card ------------------------------------------------


def to_record(row: dict, cfg: ExportConfig) -> dict:
    """One exported row from a joined (instruction, response, lineage) row, in the configured style."""
    lineage = {k: row[k] for k in LINEAGE_FIELDS}
    if cfg.style == "alpaca":
        return {"instruction": row["instruction"], "input": "", "output": row["response"], **lineage}
    messages = []
    if cfg.include_system:
        messages.append({"role": "system", "content": cfg.system_prompt})
    messages += [
        {"role": "user", "content": row["instruction"]},
        {"role": "assistant", "content": row["response"]},
    ]
    return {"messages": messages, **lineage}


def shard_names(n_rows: int, shard_rows: int) -> list[str]:
    """File stems of the shards, Hugging Face style: train-00000-of-00003 (at least one, even empty)."""
    n = max(1, -(-n_rows // shard_rows))
    return [f"train-{i:05d}-of-{n:05d}" for i in range(n)]


def buckets(edges: list[int]) -> list[tuple[int, int | None, str]]:
    """(low, high-exclusive or None, label) for consecutive edges, the last bucket open-ended."""
    highs = [*edges[1:], None]
    return [
        (lo, hi, f"{lo}-{hi - 1}" if hi is not None else f"{lo}+")
        for lo, hi in zip(edges, highs, strict=True)
    ]


WORD_EDGES = [0, 25, 50, 100, 200, 400, 800]


def dataset_card(title: str, stats: dict[str, Any], lineage: dict[str, Any], cfg: Config) -> str:
    """The dataset's README.md: YAML metadata `datasets` reads, then counts, distributions and lineage."""
    # `datasets` builds every config of a folder with one loader, so the card names one format: Parquet
    # when written; JSONL files beside it load with load_dataset("json", data_files=".../data/*.jsonl")
    fmt = "parquet" if "parquet" in cfg.export.formats else "jsonl"
    configs = [{"config_name": "default", "data_files": [{"split": "train", "path": f"data/train-*.{fmt}"}]}]
    meta = {
        "license": cfg.export.source_license,
        "task_categories": ["text-generation"],
        "tags": ["instruction-tuning", "backtranslation", "synthetic"],
        "configs": configs,
    }

    def table(rows: dict[str, Any], head: tuple[str, str]) -> list[str]:
        return [f"| {head[0]} | {head[1]} |", "|---|---:|", *(f"| {k} | {v} |" for k, v in rows.items())]

    counts = {k: v for k, v in stats["counts"].items() if isinstance(v, int)}
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False).rstrip(),
        "---",
        f"# {title}",
        "",
        f"{stats['rows']} instruction-response pairs made by backforth-spark with instruction",
        "back-and-forth translation (Nguyen et al., 2024, arXiv 2408.04614): a web passage is backtranslated",
        "into the instruction it answers, the pair is scored by an LLM judge, and the passage is rewritten",
        f"into the response. Style: `{cfg.export.style}`; files: {', '.join(cfg.export.formats)};",
        f"{stats['shards']} shard(s) of at most {cfg.export.shard_rows} rows.",
        "",
        f'Load it with `datasets.load_dataset("<this folder>")` ({fmt} files)'
        + (
            ', or the JSONL files with `load_dataset("json", data_files="<this folder>/data/*.jsonl")`.'
            if fmt == "parquet" and "jsonl" in cfg.export.formats
            else "."
        ),
        "",
        "## Counts",
        "",
        *table(counts, ("count", "rows")),
        "",
        "## Judge scores of the exported pairs",
        "",
        *table(stats["scores"], ("score", "pairs")),
        "",
        "## Response length (words)",
        "",
        *table(stats["response_words"], ("words", "pairs")),
        "",
        "## Lineage",
        "",
        f"- pipeline run: `{lineage['run_id']}`; MLflow run: `{lineage['mlflow_run_id']}`",
        f"- model: `{lineage['model']}`",
        *(f"- template `{k}`: `{v}`" for k, v in lineage["templates"].items()),
        *(f"- fingerprint `{k}`: `{v}`" for k, v in lineage["fingerprints"].items()),
        "- Delta table versions read: "
        + ", ".join(f"`{k}` v{v}" for k, v in lineage["table_versions"].items()),
        "",
        "## License",
        "",
        LICENSE_NOTES.get(cfg.export.source_license, f"Source text license: {cfg.export.source_license}."),
        f"The responses were generated by `{lineage['model']}`; its license applies to them as well.",
        "",
        "## Config",
        "",
        "```yaml",
        yaml.safe_dump(lineage["config"], sort_keys=True).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def read_sample(dataset_dir: Path, n: int = 50):
    """The first `n` exported rows of a dataset folder as a flat pandas DataFrame (instruction,
    response, score, passage_id), whatever the export style and file format."""
    import pandas as pd

    files = sorted((dataset_dir / "data").glob("train-*"))
    if not files:
        return pd.DataFrame(columns=["instruction", "response", "score", "passage_id"])
    first = files[0]
    df = pd.read_parquet(first) if first.suffix == ".parquet" else pd.read_json(first, lines=True)
    df = df.head(n)
    if "messages" in df:

        def turn(messages, role: str) -> str:
            return next(m["content"] for m in messages if m["role"] == role)

        df["instruction"] = [turn(ms, "user") for ms in df["messages"]]
        df["response"] = [turn(ms, "assistant") for ms in df["messages"]]
    else:
        df = df.rename(columns={"output": "response"})
    return df[["instruction", "response", "score", "passage_id"]].reset_index(drop=True)


# ---- Spark glue ------------------------------------------------------------------------------------


def _parquet_schema(cfg: ExportConfig):
    import pyarrow as pa

    lineage = [
        ("passage_id", pa.string()),
        ("doc_key", pa.string()),
        ("source", pa.string()),
        ("id", pa.string()),
        ("score", pa.int32()),
    ]
    if cfg.style == "alpaca":
        head = [("instruction", pa.string()), ("input", pa.string()), ("output", pa.string())]
    else:
        message = pa.struct([("role", pa.string()), ("content", pa.string())])
        head = [("messages", pa.list_(message))]
    return pa.schema(head + lineage)


def write_dataset(
    rows, n_rows: int, out_dir: Path, record: Callable[[dict], dict], card: str, cfg: ExportConfig
) -> None:
    """Stream `rows` (a staged DataFrame of `n_rows` rows) into shard files under out_dir/data and `card`
    into out_dir/README.md. Written into a temporary folder and swapped in, so a
    reader never sees half an export; partition by partition, so the driver never holds the whole set."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = shard_names(n_rows, cfg.shard_rows)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "data").mkdir(parents=True)
    schema = _parquet_schema(cfg)
    it = rows.toLocalIterator()
    n = 0
    for name in names:
        batch = []
        for row in it:
            batch.append(record(row.asDict()))
            if len(batch) == cfg.shard_rows:
                break
        n += len(batch)
        if "jsonl" in cfg.formats:
            with (tmp / "data" / f"{name}.jsonl").open("w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in batch)
        if "parquet" in cfg.formats:
            pq.write_table(pa.Table.from_pylist(batch, schema=schema), tmp / "data" / f"{name}.parquet")
    if n != n_rows:
        raise RuntimeError(
            f"export of {out_dir.name}: expected {n_rows} rows but wrote {n}; rerun the export"
        )
    (tmp / "README.md").write_text(card, encoding="utf-8")
    old = out_dir.with_name(f".{out_dir.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def _stats(pairs, counts: dict[str, Any], n_rows: int, cfg: ExportConfig) -> dict[str, Any]:
    from pyspark.sql import functions as F

    scores = {str(r["score"]): r["count"] for r in pairs.groupBy("score").count().orderBy("score").collect()}
    words = F.size(F.split(F.trim("response"), r"\s+"))
    label = F.lit(None)
    for lo, hi, name in reversed(buckets(WORD_EDGES)):
        label = F.when((words >= lo) & (words < hi) if hi is not None else words >= lo, name).otherwise(label)
    found = {r["b"]: r["count"] for r in pairs.groupBy(label.alias("b")).count().collect()}
    return {
        "rows": n_rows,
        "shards": len(shard_names(n_rows, cfg.shard_rows)),
        "counts": counts,
        "scores": scores,
        "response_words": {name: found.get(name, 0) for _, _, name in buckets(WORD_EDGES)},
    }


def _lineage(ctx: StageContext, specs: dict, stages: list[str], tables: list[str]) -> dict[str, Any]:
    return {
        "run_id": ctx.run_id,
        "mlflow_run_id": ctx.mlflow_run_id,
        "model": specs[stages[0]].model,
        "templates": {s: f"{specs[s].template.name} {specs[s].template.hash}" for s in stages},
        "fingerprints": {s: specs[s].fingerprint for s in stages},
        "table_versions": {name: ctx.tables.version(name) for name in tables},
        "config": ctx.cfg.model_dump(mode="json"),
    }


def run(ctx: StageContext) -> dict[str, int | str]:
    """Apply the curation policies to the current rewrites and write the kept pairs; with the
    distillation baseline on, also write the same instructions answered without their passage."""
    from pyspark.sql import functions as F

    from backforth_spark import tables as t
    from backforth_spark.generate import BACKTRANSLATE, DISTILL, GROUND, REWRITE, SCORE, fingerprints
    from backforth_spark.model import resolve_model
    from udfs.curation import response_issue_udf

    cur, exp = ctx.cfg.curate, ctx.cfg.export
    specs = fingerprints(ctx.cfg, resolve_model(ctx.cfg.llm))
    # every table is read as of the version recorded in the card, even if a writer commits meanwhile
    read_tables = [t.DOCUMENTS, t.PASSAGES, t.SCORES, t.RESPONSES]
    read_tables += [t.GROUNDING] if cur.grounding else []
    read_tables += [t.DISTILLATIONS] if cur.distillation_baseline else []
    stages = [BACKTRANSLATE, SCORE, REWRITE] + ([GROUND] if cur.grounding else [])
    stages += [DISTILL] if cur.distillation_baseline else []
    lineage = _lineage(ctx, specs, stages, read_tables)

    def read(name: str):
        return ctx.tables.read(name, lineage["table_versions"][name])

    responses = read(t.RESPONSES).where(F.col("fingerprint") == specs[REWRITE].fingerprint)
    counts: dict[str, int | str] = {"rows_in": responses.count()}
    low = (
        read(t.SCORES)
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
            read(t.GROUNDING)
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

    documents = read(t.DOCUMENTS).select("doc_key", "source", "id")
    doc_keys = read(t.PASSAGES).select("passage_id", "doc_key")
    pairs = ctx.tables.stage(
        "export_pairs",
        judged.where("issue IS NULL")
        .join(doc_keys, "passage_id")
        .join(documents, "doc_key")
        .select(*LINEAGE_FIELDS, "instruction", "response"),
    ).orderBy("passage_id")
    out_dir = ctx.cfg.workdir_path / "export"
    record = lambda row: to_record(row, exp)  # noqa: E731
    path = out_dir / PAIRS_DIR
    stats = _stats(pairs, counts, pairs.count(), exp)
    counts["rows_out"] = stats["rows"]
    judged_ok = counts["rows_in"] + counts["removed_low_score"]
    counts["keep_rate"] = round(stats["rows"] / judged_ok, 4) if judged_ok else 0.0
    counts |= {f"score_{k}": v for k, v in stats["scores"].items()}
    counts |= {f"response_words_{k.replace('+', 'plus')}": v for k, v in stats["response_words"].items()}
    card = dataset_card("backforth-spark pairs", stats, lineage, ctx.cfg)
    write_dataset(pairs, stats["rows"], path, record, card, exp)
    counts["path"] = str(path)

    if cur.distillation_baseline:
        baseline = ctx.tables.stage(
            "export_baseline",
            read(t.DISTILLATIONS)
            .where((F.col("fingerprint") == specs[DISTILL].fingerprint) & (F.col("status") == "ok"))
            .join(read(t.SCORES).where(F.col("fingerprint") == specs[SCORE].fingerprint)
                  .select("passage_id", "score"), "passage_id")
            .join(doc_keys, "passage_id")
            .join(documents, "doc_key")
            .select(*LINEAGE_FIELDS, "instruction", "response"),
        ).orderBy("passage_id")  # fmt: skip
        base_path = out_dir / BASELINE_DIR

        n = baseline.count()
        stats = _stats(baseline, {"rows_out": n}, n, exp)
        card = dataset_card("backforth-spark distillation baseline", stats, lineage, ctx.cfg)
        write_dataset(baseline, n, base_path, record, card, exp)
        counts["baseline_pairs"] = n
        counts["baseline_path"] = str(base_path)
    return counts
