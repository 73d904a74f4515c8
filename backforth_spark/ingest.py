"""Stage `ingest`: Dolma files -> the bronze `documents` table, bad lines -> `quarantine`.

Every input line is accounted for: lines = new documents + quarantined + repeated (source, id).
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from backforth_spark.config import IngestConfig

# Reasons a line is quarantined.
MALFORMED_JSON = "malformed_json"
NOT_AN_OBJECT = "not_an_object"
MISSING_ID = "missing_id"
MISSING_TEXT = "missing_text"
NON_STRING_TEXT = "non_string_text"
INVALID_UTF8 = "invalid_utf8"
EMPTY_TEXT = "empty_text"
BLANK_LINE = "blank_line"
UNREADABLE_FILE = "unreadable_file"

PARSED_COLUMNS = [
    "kind",  # "doc" or "quarantine"
    "source",
    "id",
    "text",
    "added",
    "created",
    "metadata",
    "url",
    "input_file",
    "line_number",
    "reason",
    "detail",
    "raw_prefix",
]


@dataclass(frozen=True)
class ParsedLine:
    kind: str
    input_file: str
    line_number: int
    source: str | None = None
    id: str | None = None
    text: str | None = None
    added: str | None = None
    created: str | None = None
    metadata: str | None = None
    url: str | None = None
    reason: str | None = None
    detail: str | None = None
    raw_prefix: str | None = None

    def as_row(self) -> dict[str, Any]:
        return {c: getattr(self, c) for c in PARSED_COLUMNS}


def open_lines(path: str, data: bytes) -> Iterator[bytes]:
    """Yield the raw lines of a Dolma file's bytes, decompressing by extension, streaming."""
    raw: io.BufferedIOBase = io.BytesIO(data)
    if path.endswith(".gz"):
        raw = gzip.GzipFile(fileobj=raw)
    elif path.endswith(".zst"):
        import zstandard

        raw = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        raw = io.BufferedReader(raw)
    for line in raw:
        yield line.rstrip(b"\r\n")


def _opt_str(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else json.dumps(value)


def parse_line(path: str, line_number: int, raw: bytes, cfg: IngestConfig) -> ParsedLine:
    """One Dolma line -> a document, or a quarantine record saying why not. Never raises."""

    def bad(reason: str, detail: str) -> ParsedLine:
        prefix = raw[: cfg.raw_prefix_chars].decode("utf-8", errors="replace")
        return ParsedLine("quarantine", path, line_number, reason=reason, detail=detail, raw_prefix=prefix)

    if not raw.strip():
        return bad(BLANK_LINE, "the line is empty")
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return bad(INVALID_UTF8, str(exc))
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        return bad(MALFORMED_JSON, str(exc))
    if not isinstance(obj, dict):
        return bad(NOT_AN_OBJECT, f"expected a JSON object, got {type(obj).__name__}")
    doc_id = obj.get("id")
    if doc_id is None or isinstance(doc_id, (dict, list, bool)) or str(doc_id) == "":
        return bad(MISSING_ID, "no usable 'id' field")
    if "text" not in obj or obj["text"] is None:
        return bad(MISSING_TEXT, "no 'text' field")
    text = obj["text"]
    if not isinstance(text, str):
        return bad(NON_STRING_TEXT, f"'text' is a {type(text).__name__}")
    if not text.strip():
        return bad(EMPTY_TEXT, "'text' is empty or whitespace only")
    source = obj.get("source")
    source = source if isinstance(source, str) and source else cfg.default_source
    metadata = obj.get("metadata")
    url = metadata.get("url") if isinstance(metadata, dict) else None
    return ParsedLine(
        "doc",
        path,
        line_number,
        source=source,
        id=str(doc_id),
        text=text,
        added=_opt_str(obj.get("added")),
        created=_opt_str(obj.get("created")),
        metadata=None if metadata is None else json.dumps(metadata, ensure_ascii=False),
        url=url if isinstance(url, str) else None,
    )


def parse_file(path: str, data: bytes, cfg: IngestConfig) -> Iterator[ParsedLine]:
    """All lines of one file, numbered from 1. A file that cannot be decompressed is one quarantine row."""
    line_number = 0
    try:
        for line_number, raw in enumerate(open_lines(path, data), start=1):  # noqa: B007
            yield parse_line(path, line_number, raw, cfg)
    except Exception as exc:  # a truncated gzip, a corrupt zstd frame
        yield ParsedLine(
            "quarantine",
            path,
            line_number + 1,
            reason=UNREADABLE_FILE,
            detail=f"{type(exc).__name__}: {exc} (after line {line_number})",
        )


# ---- Spark glue ---------------------------------------------------------------------------------


def input_files(spark, cfg: IngestConfig, inputs: list[str]):
    """The Dolma files under `inputs` (files, folders searched recursively, globs) as a binaryFile
    DataFrame (path, modificationTime, length, content; content is read only if selected)."""
    if not inputs:
        raise ValueError("ingest needs at least one input path or glob (--input)")
    return (
        spark.read.format("binaryFile")
        .option("recursiveFileLookup", "true")
        .option("pathGlobFilter", cfg.file_glob)
        .load(inputs)
    )


def run(ctx, inputs: list[str]) -> dict[str, int]:
    """Read Dolma files into `documents` and `quarantine`; returns the stage counts."""
    from pyspark import StorageLevel
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    from backforth_spark import tables as t
    from udfs.ingest import PARSED_SCHEMA, parse_files

    spark, cfg = ctx.spark, ctx.cfg
    files = input_files(spark, cfg.ingest, inputs).select("path", "content")
    # binaryFile partitions are bounded by spark.sql.files.maxPartitionBytes, so one Arrow batch
    # holds at most about that much compressed input.
    parsed = files.mapInPandas(parse_files(cfg.ingest), PARSED_SCHEMA).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        lineage = [F.lit(ctx.run_id).alias("run_id"), F.current_timestamp().alias("written_at")]
        docs = parsed.where("kind = 'doc'")
        first = Window.partitionBy("source", "id").orderBy("input_file", "line_number")
        docs = (
            docs.withColumn("_rank", F.row_number().over(first))
            .where("_rank = 1")
            .select(
                F.concat_ws("/", "source", "id").alias("doc_key"),
                *[c for c in t.without_lineage(t.DOCUMENTS_SCHEMA).fieldNames() if c != "doc_key"],
                *lineage,
            )
        )
        quarantine = parsed.where("kind = 'quarantine'").select(
            "input_file", "line_number", "reason", "detail", "raw_prefix", *lineage
        )
        counts = {r["kind"]: r["n"] for r in parsed.groupBy("kind").agg(F.count("*").alias("n")).collect()}
        n_docs_parsed, n_quarantined = counts.get("doc", 0), counts.get("quarantine", 0)
        # the MERGE's own count: right even when a concurrent run inserts into the table too
        new_docs = ctx.tables.merge_insert_new(t.DOCUMENTS, docs, ["doc_key"])
        ctx.tables.merge_insert_new(t.QUARANTINE, quarantine, ["input_file", "line_number"])
    finally:
        parsed.unpersist()
    return {
        "rows_in": n_docs_parsed + n_quarantined,
        "rows_out": new_docs,
        "lines": n_docs_parsed + n_quarantined,
        "documents": new_docs,
        "quarantined": n_quarantined,
        "repeated_ids": n_docs_parsed - new_docs,
    }
