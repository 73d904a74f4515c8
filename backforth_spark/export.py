"""Stage `export`: the kept, rewritten pairs -> chat-format JSONL for fine-tuning.

One pair a line: {"messages": [{"role": "user", ...}, {"role": "assistant", ...}], plus source ids}.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from backforth_spark.config import ExportConfig
from backforth_spark.context import StageContext

EXPORT_FILE = "pairs.jsonl"


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


def run(ctx: StageContext) -> dict[str, int | str]:
    from pyspark.sql import functions as F

    from backforth_spark import tables as t
    from backforth_spark.generate import REWRITE, fingerprints
    from backforth_spark.model import resolve_model

    spec = fingerprints(ctx.cfg, resolve_model(ctx.cfg.llm))[REWRITE]
    responses = ctx.tables.read(t.RESPONSES).where(F.col("fingerprint") == spec.fingerprint)
    ok = responses.where("status = 'ok'")
    pairs = (
        ok.join(ctx.tables.read(t.PASSAGES).select("passage_id", "doc_key"), "passage_id")
        .join(ctx.tables.read(t.DOCUMENTS).select("doc_key", "source", "id"), "doc_key")
        .select("passage_id", "doc_key", "source", "id", "instruction", "response", "score")
        .orderBy("passage_id")
    )
    out_dir = ctx.cfg.workdir_path / "export"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / EXPORT_FILE
    tmp = Path(f"{path}.tmp")
    n = 0
    # Streams partition by partition: the driver never holds the whole export.
    with tmp.open("w", encoding="utf-8") as f:
        for row in pairs.toLocalIterator():
            f.write(json.dumps(to_record(row.asDict(), ctx.cfg.export), ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, path)
    return {"rows_in": responses.count(), "rows_out": n, "path": str(path)}
